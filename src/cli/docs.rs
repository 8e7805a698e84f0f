//! `dr completions` and `dr man`: shell completion scripts and manual pages,
//! generated from the same argument definitions the parser uses, so they
//! never fall behind the binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

use super::{Cli, Out};

/// Arguments of `dr completions`.
#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    shell: clap_complete::Shell,
}

/// Arguments of `dr man`.
#[derive(clap::Args)]
pub struct ManArgs {
    /// Write dr.1 and one page per subcommand (dr-backup-pg.1, …) into this
    /// directory instead of printing dr.1 on stdout.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "dr", &mut buf);
    std::io::stdout()
        .write_all(&buf)
        .context("writing the completion script to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// Prints dr.1 on stdout, or writes every page into `--out`.
pub fn man(args: ManArgs, out: &Out) -> anyhow::Result<ExitCode> {
    let Some(dir) = args.out else {
        let mut buf = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut buf)
            .context("rendering the manual page")?;
        std::io::stdout()
            .write_all(&buf)
            .context("writing the manual page to stdout")?;
        return Ok(ExitCode::SUCCESS);
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "{} is not a directory; create it first (e.g. mkdir -p {})",
            dir.display(),
            dir.display()
        );
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, &dir, &mut written)?;
    if out.json {
        out.json(&serde_json::json!({ "ok": true, "pages": written }));
    } else {
        for p in &written {
            println!("{}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the page of `cmd` and those of its subcommands. After
/// `Command::build`, a subcommand's display name is its page name
/// (`dr-backup-pg`). Each page is written beside its final name and then
/// renamed, so a reader never sees half a page.
fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let page = clap_mangen::Man::new(cmd.clone());
    let name = page.get_filename();
    let mut buf = Vec::new();
    page.render(&mut buf)
        .with_context(|| format!("rendering {name}"))?;
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, &buf).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}
