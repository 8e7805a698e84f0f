//! `dr repo …`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dr::repo::Repository;
use dr::store::ByteStream;

use super::output::{bytes, table};
use super::{Out, load_config};

/// Repository subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Create the repository (writes dr-repo.json to every region that lacks it).
    Init {
        /// Make directory regions owned by this OS user (the one running
        /// `archive_command`, usually postgres) when run as root, so that
        /// archiving can write where root created the repository.
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
    },
    /// Round-trip data through the codec and every region, then remove it.
    Selftest {
        /// File to send (default: generated data of --size bytes).
        #[arg(long, conflicts_with = "size")]
        file: Option<PathBuf>,
        /// Bytes of generated data (half random, half compressible).
        #[arg(long, default_value_t = 64 << 20)]
        size: u64,
    },
    /// Copy what a region is missing (and replace bad copies) from the others,
    /// as ciphertext; manifests go last.
    Sync {
        /// Only bring this region up to date.
        #[arg(long)]
        region: Option<String>,
        /// Also decode every copy to find bad ones of the right size (needs
        /// the identity; reads everything).
        #[arg(long)]
        read_data: bool,
    },
}

pub async fn run(cmd: Command, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    match cmd {
        Command::Sync { region, read_data } => {
            super::verify::sync(&cfg, region.as_deref(), read_data, out).await
        }
        Command::Init { owner } => {
            let rep = Repository::init(&cfg).await?;
            if let Some(user) = &owner {
                for spec in &cfg.region_specs {
                    if let dr::config::RegionKind::Fs { path } = &spec.kind {
                        dr::os::chown_to(path, user).await?;
                    }
                }
            }
            if out.json {
                out.json(&serde_json::json!({ "ok": true, "repository": rep }));
            } else {
                println!(
                    "repository {} initialized in: {}",
                    rep.id,
                    rep.initialized.join(", ")
                );
                if !rep.already.is_empty() {
                    println!("already present in: {}", rep.already.join(", "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest { file, size } => {
            let repo = Repository::open(&cfg).await?;
            let (body, hint): (ByteStream, u64) = match &file {
                Some(f) => {
                    let file = tokio::fs::File::open(f)
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", f.display()))?;
                    let len = file.metadata().await?.len();
                    (
                        Box::pin(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)),
                        len,
                    )
                }
                None => (dr::store::generated(size), size),
            };
            let rep = repo.selftest(body, Some(hint)).await?;
            let ok = rep.regions.iter().all(|r| r.ok);
            if out.json {
                out.json(&serde_json::json!({ "ok": ok, "selftest": rep }));
            } else {
                println!(
                    "wrote {} ({} stored, blake3 {}) to {} region(s) in {:.2}s ({:.0} MB/s)",
                    bytes(rep.plain_size),
                    bytes(rep.stored_size),
                    &rep.plain_hash[..16],
                    rep.regions.len(),
                    rep.write_seconds,
                    rep.plain_size as f64 / 1e6 / rep.write_seconds.max(1e-9)
                );
                let rows: Vec<Vec<String>> = rep
                    .regions
                    .iter()
                    .map(|r| {
                        vec![
                            r.region.clone(),
                            if r.ok { "ok".into() } else { "FAIL".into() },
                            format!("{:.2}s", r.read_seconds),
                            r.error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["REGION", "READ BACK", "TIME", "ERROR"], &rows)
                );
                if !rep.cleaned_up {
                    println!(
                        "note: the temporary object {} could not be removed everywhere:",
                        rep.key
                    );
                    for n in &rep.cleanup_notes {
                        println!("  {n}");
                    }
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
