//! `dr keygen`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::Out;

/// Arguments of `dr keygen`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the identity (private key); must not exist.
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run(args: Args, out: &Out) -> anyhow::Result<ExitCode> {
    let k = dr::keys::keygen(&args.output)?;
    if out.json {
        out.json(&serde_json::json!({
            "ok": true,
            "identity_file": k.path,
            "recipient": k.recipient,
        }));
    } else {
        println!("identity written to {} (mode 0600)", k.path.display());
        println!("recipient (public key, for `recipients` in dr.toml):");
        println!("{}", k.recipient);
    }
    Ok(ExitCode::SUCCESS)
}
