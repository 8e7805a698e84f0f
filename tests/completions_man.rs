//! `dr completions` and `dr man`: the bash script loads in bash and
//! completes a subcommand, every shell gets a script, and groff renders the
//! manual pages without warnings.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn dr(args: &[&str]) -> Output {
    Command::new(common::dr_bin())
        .args(args)
        .output()
        .expect("run dr")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "dr failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("UTF-8 output")
}

/// What bash completes for the words of `line` with the script loaded.
fn bash_complete(script: &Path, line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split(' ').collect();
    let program = format!(
        "source {} || exit 3; complete -p dr >/dev/null || exit 4; \
         COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; \
         _dr dr '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len().saturating_sub(2)],
    );
    let o = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program])
        .output()
        .expect("run bash (install it: apt-get install bash)");
    assert!(
        o.status.success(),
        "bash could not load or run the completion script (status {:?}): {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completion_loads_and_completes_subcommands_and_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("dr.bash");
    std::fs::write(&script, stdout(&dr(&["completions", "bash"]))).expect("write script");

    let got = bash_complete(&script, "dr fai");
    assert_eq!(got, ["failover"]);
    let got = bash_complete(&script, "dr backup ");
    assert!(
        got.contains(&"pg".to_string()) && got.contains(&"redis".to_string()),
        "{got:?}"
    );
    let got = bash_complete(&script, "dr backup pg --fu");
    assert_eq!(got, ["--full"]);
    let got = bash_complete(&script, "dr completions ");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        assert!(
            got.contains(&shell.to_string()),
            "{shell} missing from {got:?}"
        );
    }
}

#[test]
fn every_shell_gets_a_script_naming_the_subcommands() {
    let markers = [
        ("zsh", "#compdef dr"),
        ("fish", "complete -c dr"),
        ("elvish", "edit:completion:arg-completer[dr]"),
        ("powershell", "Register-ArgumentCompleter"),
    ];
    for (shell, marker) in markers {
        let text = stdout(&dr(&["completions", shell]));
        assert!(
            text.contains(marker),
            "{shell}: no {marker:?} in the script"
        );
        assert!(
            text.contains("failover") && text.contains("wal-fetch"),
            "{shell}"
        );
    }
    let o = dr(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tcsh") && err.contains("bash"), "{err}");
}

/// The page rendered as text by groff, which must not warn about it.
fn render(page: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww"])
        .env("GROFF_NO_SGR", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run groff (scripts/setup.sh installs it: apt-get install groff-base)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page)
        .expect("write page");
    let o = child.wait_with_output().expect("groff");
    assert!(o.status.success(), "groff failed");
    let warnings = String::from_utf8_lossy(&o.stderr);
    assert!(warnings.is_empty(), "groff warnings: {warnings}");
    // Overstrike bold/underline (x\bx) back to plain text.
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let mut plain = String::new();
    for c in text.chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    plain
}

#[test]
fn man_page_renders_and_out_writes_one_page_per_command() {
    let page = dr(&["man"]);
    let text = render(stdout(&page).as_bytes());
    for want in [
        "NAME",
        "SYNOPSIS",
        "SUBCOMMANDS",
        "dr-failover(1)",
        "--config",
    ] {
        assert!(text.contains(want), "{want:?} missing from dr.1:\n{text}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let o = dr(&[
        "man",
        "--out",
        dir.path().to_str().expect("UTF-8 path"),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    let pages = report["pages"].as_array().expect("pages");
    assert!(pages.len() > 15, "{report}");
    for name in [
        "dr.1",
        "dr-failover.1",
        "dr-backup-pg.1",
        "dr-completions.1",
    ] {
        let path = dir.path().join(name);
        let page = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = render(&page);
        assert!(text.contains("NAME"), "{name}:\n{text}");
    }
    let pg = render(&std::fs::read(dir.path().join("dr-backup-pg.1")).expect("page"));
    assert!(pg.contains("--full") && pg.contains("dr-backup-pg"), "{pg}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let o = dr(&["man", "--out", "/nonexistent/man1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/man1") && err.contains("mkdir -p"),
        "{err}"
    );
}
