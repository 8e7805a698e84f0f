//! Argument parsing and output. Handlers parse, call the library, print.

mod check;
mod daemon;
mod docs;
mod drill;
mod expire;
mod failover;
mod ha;
mod keygen;
mod output;
mod pg;
mod rabbitmq;
mod redis;
mod repo;
mod report;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use output::Out;

/// Backup, disaster recovery and failover for PostgreSQL, Redis and RabbitMQ definitions.
#[derive(Parser)]
#[command(name = "dr", version, about, long_about = None)]
struct Cli {
    /// Config file [default: $DR_CONFIG, else ./dr.toml, else /etc/dr/dr.toml]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    config: Option<PathBuf>,
    /// Machine-readable JSON output on stdout.
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = "Global options")]
    verbose: u8,
    /// Only errors.
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Global options"
    )]
    quiet: bool,
    /// Logs as JSON lines on stderr (default: human-readable; `dr daemon`
    /// logs JSON whenever stderr is not a terminal).
    #[arg(long, global = true, help_heading = "Global options")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an age key pair: the identity file (0600) and its public recipient.
    Keygen(keygen::Args),
    /// Manage the repository.
    #[command(subcommand)]
    Repo(repo::Command),
    /// Check the config, every region, the repository and the identity.
    Check,
    /// Take a backup.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Restore to a point in time.
    #[command(subcommand)]
    Restore(RestoreCmd),
    /// Check backups: --list (every object exists, right size), --read-data
    /// (decode and hash every copy) or --restore (restore into a scratch
    /// server, run the checks, report RTO/RPO, clean up).
    Verify(verify::Args),
    /// Delete what each source's retention policy no longer keeps (manifests
    /// first, shared blocks and needed WAL kept, Object Lock respected).
    Expire(expire::Args),
    /// Run a disaster-recovery drill from [drill.NAME]: restore, check,
    /// optional failover playbook, RTO/RPO against the objectives.
    Drill(drill::Args),
    /// List backups and the recoverable window.
    #[command(subcommand)]
    List(ListCmd),
    /// Write one self-contained HTML page: per source the recoverable
    /// window (backups, WAL, gaps, timelines), the latest verification and
    /// drill, and RTO/RPO over time from the reports in the repository.
    Report(report::Args),
    /// Run a failover playbook (see playbooks/ and README, section Failover).
    Failover(failover::Args),
    /// Automatic failover through etcd ([ha]): status, switchover, pause, resume.
    #[command(subcommand)]
    Ha(ha::Command),
    /// Run scheduled jobs (backups, snapshots, restore verification, retention, region sync; cron, UTC); serve /metrics and /healthz.
    Daemon(daemon::Args),
    /// Archive one WAL file (archive_command = 'dr wal-push %p').
    WalPush {
        /// Cluster name (default: the only [postgres.*]).
        #[arg(long)]
        cluster: Option<String>,
        /// The file, as PostgreSQL passes it (%p).
        path: PathBuf,
        /// When a different copy is archived under this name, decrypt it
        /// and, if it is not valid WAL of this cluster, delete it and archive
        /// this file instead (audited; needs the identity).
        #[arg(long)]
        replace_invalid: bool,
    },
    /// Stream WAL over the replication protocol into the repository, in the
    /// foreground, until Ctrl-C/SIGTERM (wal = "stream"; the daemon does the
    /// same for every such cluster).
    WalStream {
        /// Cluster name (default: the only [postgres.*]).
        name: Option<String>,
        /// Exit on the first failure instead of reconnecting.
        #[arg(long)]
        no_loop: bool,
    },
    /// Fetch one WAL file (restore_command = 'dr wal-fetch %f %p'). Exits 1
    /// only when the file is not in the archive, and 200 for any other
    /// failure, which makes PostgreSQL stop recovery instead of ending it.
    WalFetch {
        /// Cluster name (default: the only [postgres.*]).
        #[arg(long)]
        cluster: Option<String>,
        /// File name PostgreSQL wants (%f).
        file: String,
        /// Where to write it (%p).
        dest: PathBuf,
        /// Report segments after this one as not archived: a verification
        /// of `latest` replays the WAL archived when it started, not what
        /// arrives while it runs.
        #[arg(long, value_name = "SEGMENT")]
        until: Option<String>,
    },
    /// Print a shell completion script (e.g. dr completions bash > /etc/bash_completion.d/dr).
    Completions(docs::CompletionsArgs),
    /// Print the manual page, or write one page per command with --out DIR.
    Man(docs::ManArgs),
}

#[derive(Subcommand)]
enum BackupCmd {
    /// PostgreSQL base backup (local mode: run on the database host).
    Pg {
        /// Cluster name (default: the only [postgres.*]).
        name: Option<String>,
        /// Store every block again instead of referencing blocks unchanged
        /// since the previous backup (a new, independent base).
        #[arg(long)]
        full: bool,
    },
    /// Redis snapshot over the replication protocol.
    Redis {
        /// Instance name (default: the only [redis.*]).
        name: Option<String>,
    },
    /// RabbitMQ definitions (topology, users, policies) through the management API.
    Rabbitmq {
        /// Broker name (default: the only [rabbitmq.*]).
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum RestoreCmd {
    /// PostgreSQL point-in-time restore.
    Pg(pg::RestoreArgs),
    /// Redis: the newest snapshot at or before a time, as dump.rdb.
    Redis(redis::RestoreArgs),
    /// RabbitMQ: the newest definitions snapshot at or before a time, applied
    /// to a broker, compared with it (--dry-run) or written to a file.
    Rabbitmq(rabbitmq::RestoreArgs),
}

#[derive(Subcommand)]
enum ListCmd {
    /// PostgreSQL backups, WAL and recoverable window.
    Pg {
        /// Cluster name (default: the only [postgres.*]).
        name: Option<String>,
        /// Read every WAL key and every manifest instead of the summaries
        /// (the same output at the cost of the whole history; a check of
        /// the summaries, and what they save).
        #[arg(long)]
        whole_catalog: bool,
    },
    /// Redis snapshots.
    Redis {
        /// Instance name (default: the only [redis.*]).
        name: Option<String>,
    },
    /// RabbitMQ definitions snapshots.
    Rabbitmq {
        /// Broker name (default: the only [rabbitmq.*]).
        name: Option<String>,
    },
}

/// Exit status when stdout is closed before `dr` has printed everything
/// (`dr list pg | head`): 128 + SIGPIPE, what a shell reports for a Unix
/// tool the signal ended, so `set -o pipefail` scripts see the same thing.
const BROKEN_PIPE_STATUS: u8 = 141;

/// Exit status of a command line that cannot be parsed, as clap uses.
const USAGE_STATUS: u8 = 2;

/// Parses arguments, runs the command, prints a one-line cause on failure.
pub fn run() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // For wal-fetch, every failure other than "not in the archive" must stop
    // recovery: argument errors and panics included, whose usual statuses (2,
    // 101) PostgreSQL would read as the end of the archive.
    let fetching = args.iter().any(|a| a == "wal-fetch");
    let json = args.iter().any(|a| a == "--json");
    install_panic_hook(fetching);
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e, json, fetching),
    };
    let fetching = matches!(cli.command, Command::WalFetch { .. });
    init_logging(&cli);
    let out = Out { json: cli.json };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return if fetching {
                ExitCode::from(dr::postgres::wal::FETCH_FAILED_STATUS)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Keygen(args) => keygen::run(args, &out),
            Command::Completions(args) => docs::completions(args),
            Command::Man(args) => docs::man(args, &out),
            Command::Repo(cmd) => repo::run(cmd, cli.config.as_deref(), &out).await,
            Command::Check => check::run(cli.config.as_deref(), &out).await,
            Command::Verify(args) => verify::run(args, cli.config.as_deref(), &out).await,
            Command::Expire(args) => expire::run(args, cli.config.as_deref(), &out).await,
            Command::Backup(BackupCmd::Pg { name, full }) => {
                pg::backup(name, full, cli.config.as_deref(), &out).await
            }
            Command::Backup(BackupCmd::Redis { name }) => {
                redis::backup(name, cli.config.as_deref(), &out).await
            }
            Command::Restore(RestoreCmd::Redis(args)) => {
                redis::restore(args, cli.config.as_deref(), &out).await
            }
            Command::List(ListCmd::Redis { name }) => {
                redis::list(name, cli.config.as_deref(), &out).await
            }
            Command::Backup(BackupCmd::Rabbitmq { name }) => {
                rabbitmq::backup(name, cli.config.as_deref(), &out).await
            }
            Command::Restore(RestoreCmd::Rabbitmq(args)) => {
                rabbitmq::restore(args, cli.config.as_deref(), &out).await
            }
            Command::List(ListCmd::Rabbitmq { name }) => {
                rabbitmq::list(name, cli.config.as_deref(), &out).await
            }
            Command::Restore(RestoreCmd::Pg(args)) => {
                pg::restore(args, cli.config.as_deref(), &out).await
            }
            Command::List(ListCmd::Pg {
                name,
                whole_catalog,
            }) => pg::list(name, whole_catalog, cli.config.as_deref(), &out).await,
            Command::Failover(args) => failover::run(args, cli.config.as_deref(), &out).await,
            Command::Drill(args) => drill::run(args, cli.config.as_deref(), &out).await,
            Command::Report(args) => report::run(args, cli.config.as_deref(), &out).await,
            Command::Daemon(args) => daemon::run(args, cli.config.as_deref(), &out).await,
            Command::Ha(cmd) => ha::run(cmd, cli.config.as_deref(), &out).await,
            Command::WalPush {
                cluster,
                path,
                replace_invalid,
            } => pg::wal_push(cluster, path, replace_invalid, cli.config.as_deref(), &out).await,
            Command::WalStream { name, no_loop } => {
                pg::wal_stream(name, no_loop, cli.config.as_deref()).await
            }
            Command::WalFetch {
                cluster,
                file,
                dest,
                until,
            } => pg::wal_fetch(cluster, file, dest, until, cli.config.as_deref(), &out).await,
        }
    });
    // What the command cost the object store: benchmarks and operators read
    // it with DR_LOG=dr=debug rather than trusting an estimate.
    tracing::debug!(s3_requests = dr::store::s3_requests(), "store requests");
    match result {
        Ok(code) => code,
        Err(e) => {
            out.error(&e);
            if fetching {
                ExitCode::from(dr::postgres::wal::FETCH_FAILED_STATUS)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Turns a panic into the exit statuses callers rely on: a write to a
/// closed stdout ends quietly (no panic message, no backtrace), and under
/// wal-fetch any panic stops recovery.
fn install_panic_hook(fetching: bool) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // println! panics with "failed printing to stdout: Broken pipe".
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        let broken_pipe = message.is_some_and(|m| {
            m.starts_with("failed printing to std")
                && (m.contains("Broken pipe") || m.contains("os error 32"))
        });
        let failed = i32::from(dr::postgres::wal::FETCH_FAILED_STATUS);
        if broken_pipe {
            std::process::exit(if fetching {
                failed
            } else {
                i32::from(BROKEN_PIPE_STATUS)
            });
        }
        default_hook(info);
        if fetching {
            std::process::exit(failed);
        }
    }));
}

/// A command line clap refuses: its message on stderr as usual and, under
/// `--json`, a JSON document on stdout too; exit status 2 (200 for
/// wal-fetch). `--help` and `--version` print as usual and exit 0.
fn usage_error(e: &clap::Error, json: bool, fetching: bool) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let status = if fetching {
        dr::postgres::wal::FETCH_FAILED_STATUS
    } else {
        USAGE_STATUS
    };
    if json {
        let text = e.render().to_string();
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let usage = lines.iter().position(|l| l.starts_with("Usage:"));
        let message = lines[..usage.unwrap_or(lines.len())].join(" ");
        let out = Out { json: true };
        out.json(&serde_json::json!({
            "ok": false,
            "error": message.strip_prefix("error: ").unwrap_or(&message),
            "usage": usage.map(|i| lines[i]),
            "exit_status": status,
        }));
    }
    let _ = e.print();
    ExitCode::from(status)
}

/// Colour only for a person at a terminal, and never with `NO_COLOR` set
/// (no-color.org): PostgreSQL's log captures wal-push's stderr.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let default = if cli.quiet {
        "error"
    } else {
        match cli.verbose {
            0 => "warn,dr=info",
            1 => "info,dr=debug",
            _ => "debug,dr=trace",
        }
    };
    let filter = EnvFilter::try_from_env("DR_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    // A daemon's stderr is usually the journal or a file: JSON there, and
    // human lines with timestamps when someone runs it in a terminal.
    let daemon = matches!(&cli.command, Command::Daemon(a) if !a.check);
    use std::io::IsTerminal;
    if cli.log_json || (daemon && !std::io::stderr().is_terminal()) {
        builder.json().init();
    } else if daemon {
        builder.with_target(false).init();
    } else {
        builder.without_time().with_target(false).init();
    }
}

/// Loads the config named by `--config` or the default search.
fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<dr::config::Config> {
    let p = path
        .map(|p| p.to_path_buf())
        .unwrap_or_else(dr::config::default_config_path);
    Ok(dr::validate::load(&p)?)
}

/// Parses `--to`: `latest` (None) or a time, telling the user when a time
/// without an offset was read as local time.
fn parse_to(to: &str, out: &Out) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    if to == "latest" {
        return Ok(None);
    }
    let (t, local) = dr::time::parse_time(to).map_err(anyhow::Error::msg)?;
    if local && !out.json {
        eprintln!(
            "{to} has no offset; using local time = {} UTC",
            t.format("%Y-%m-%d %H:%M:%S%.3f")
        );
    }
    Ok(Some(t))
}

/// A token cancelled on Ctrl-C or SIGTERM, so long operations can stop
/// their scratch servers and remove their directories before exiting.
fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot watch for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                t.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("interrupted: stopping scratch servers and removing scratch directories…");
        t.cancel();
    });
    token
}

/// Writes the audit record of an operation that is about to start, then opens
/// the repository (a failure to open is audited too).
async fn audited_open(
    cfg: &dr::config::Config,
    action: &str,
    target: &str,
    details: serde_json::Value,
) -> anyhow::Result<(dr::audit::Audit, dr::repo::Repository)> {
    Ok(dr::audit::Audit::begin_open(cfg, action, target, details).await?)
}

/// Says which regions were skipped after a failure (degraded mode) and returns
/// them for JSON output. Writes still met `min_regions`.
fn report_degraded(repo: &dr::repo::Repository, out: &Out) -> serde_json::Value {
    let d = repo.regions.degraded();
    if !out.json {
        for (region, why) in &d {
            eprintln!(
                "DEGRADED: region {region} missed writes: it {why}. {} of {} regions hold this run's data (min_regions = {}). Fix the cause (for a directory region refusing access: its owner, see `dr check` as this user), then run `dr repo sync`.",
                repo.regions.len() - d.len(),
                repo.regions.len(),
                repo.regions.min_regions()
            );
        }
    }
    serde_json::json!(
        d.iter()
            .map(|(r, why)| serde_json::json!({ "region": r, "error": why }))
            .collect::<Vec<_>>()
    )
}
