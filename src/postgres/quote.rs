//! Quoting for what `dr` hands to PostgreSQL: command lines it runs through
//! `/bin/sh` (`restore_command`, `archive_command`, `pg_ctl -o`) and values
//! it writes into `postgresql.auto.conf`. A path with a space or a quote must
//! reach the command unchanged, and a value must not end its line early.

use std::path::Path;

use super::PgError;

/// Quotes `s` as one `/bin/sh` word: bare when it holds only characters the
/// shell never interprets, else in single quotes (a `'` becomes `'\''`).
pub fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// One directory as an element of a list setting (`unix_socket_directories`),
/// which PostgreSQL splits at commas: in double quotes (a `"` doubled), so
/// a directory whose name holds a comma or a space stays one directory.
pub fn list_element(dir: &Path) -> String {
    format!("\"{}\"", dir.display().to_string().replace('"', "\"\""))
}

/// Escapes `%` for `restore_command` / `archive_command`, where PostgreSQL
/// replaces `%f`, `%p`, `%r` and reads `%%` as one `%`.
pub fn percent_escape(s: &str) -> String {
    s.replace('%', "%%")
}

/// A command line of `words` for PostgreSQL to run through the shell: each
/// word shell-quoted, every `%` escaped so only placeholders the caller
/// appends are replaced.
pub fn pg_command(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| percent_escape(&shell_quote(w)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes `value` as PostgreSQL's configuration file parser reads a string:
/// in single quotes, `'` doubled and `\` doubled (the parser treats a
/// backslash as an escape). A newline or NUL cannot be part of a value, so
/// it is an error naming the setting.
pub fn conf_quote(name: &str, value: &str) -> Result<String, PgError> {
    if value.contains(['\n', '\r', '\0']) {
        return Err(PgError::Other(format!(
            "{name} {value:?} contains a line break or NUL, which a postgresql.conf value \
             cannot hold; use a value without them"
        )));
    }
    Ok(format!(
        "'{}'",
        value.replace('\\', "\\\\").replace('\'', "''")
    ))
}

/// `name = 'value'`, quoted by [`conf_quote`].
pub fn conf_line(name: &str, value: &str) -> Result<String, PgError> {
    Ok(format!("{name} = {}", conf_quote(name, value)?))
}

/// How PostgreSQL runs this `dr` binary `exe` with the config file `config`
/// (both absolute: the server runs commands in its data directory), ready
/// for [`wal_fetch_command`]. Paths must be UTF-8 to be written into
/// postgresql.conf.
pub fn dr_command(exe: &Path, config: &Path) -> Result<String, PgError> {
    fn utf8(p: &Path) -> Result<&str, PgError> {
        p.to_str().ok_or_else(|| {
            PgError::Other(format!(
                "{} is not valid UTF-8, so PostgreSQL's restore_command cannot name it; \
                 move it to a UTF-8 path",
                p.display()
            ))
        })
    }
    Ok(pg_command(&[utf8(exe)?, "--config", utf8(config)?]))
}

/// [`dr_command`] of the running binary and the config at `config`, made
/// absolute.
pub fn current_dr_command(config: &Path) -> Result<String, PgError> {
    let config = std::fs::canonicalize(config).map_err(|e| PgError::io(config, e))?;
    let exe = std::env::current_exe().map_err(|e| {
        PgError::Other(format!(
            "cannot locate the dr binary ({e}), which PostgreSQL must run as restore_command"
        ))
    })?;
    dr_command(&exe, &config)
}

/// The `restore_command` prefix (PostgreSQL appends nothing; `%f %p` follow)
/// that fetches WAL of `cluster` with `dr_command` (from [`dr_command`]).
pub fn wal_fetch_command(dr_command: &str, cluster: &str) -> String {
    format!(
        "{dr_command} {}",
        pg_command(&["wal-fetch", "--cluster", cluster])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `cmd` through /bin/sh with `printf '%s\n'` prepended and returns
    /// the words the shell passed.
    fn sh_words(cmd: &str) -> Vec<String> {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf '%s\\n' {cmd}"))
            .output()
            .expect("run /bin/sh");
        assert!(out.status.success(), "{cmd}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn shell_quote_survives_the_shell() {
        for s in [
            "plain",
            "/a b/c",
            "it's",
            "a'b\"c\\d$e`f`*?;&|<>()",
            "",
            "-n",
            "%p",
            "tab\there",
        ] {
            assert_eq!(sh_words(&shell_quote(s)), vec![s.to_string()], "{s:?}");
        }
        assert_eq!(shell_quote("/usr/bin/dr"), "/usr/bin/dr");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn pg_command_escapes_percent_outside_placeholders() {
        assert_eq!(
            pg_command(&["/opt/my dr/dr", "--config", "/etc/100%/dr.toml"]),
            "'/opt/my dr/dr' --config /etc/100%%/dr.toml"
        );
        let c = dr_command(Path::new("/x y/dr"), Path::new("/c/it's.toml")).expect("utf8");
        assert_eq!(c, "'/x y/dr' --config '/c/it'\\''s.toml'");
        assert_eq!(
            wal_fetch_command(&c, "main"),
            "'/x y/dr' --config '/c/it'\\''s.toml' wal-fetch --cluster main"
        );
    }

    #[test]
    fn conf_quote_doubles_quotes_and_backslashes() {
        assert_eq!(conf_quote("n", "plain").expect("ok"), "'plain'");
        assert_eq!(conf_quote("n", "a'b").expect("ok"), "'a''b'");
        assert_eq!(conf_quote("n", "a\\b").expect("ok"), "'a\\\\b'");
        assert_eq!(
            conf_line("restore_command", "'/x y/dr' %f").expect("ok"),
            "restore_command = '''/x y/dr'' %f'"
        );
        for bad in ["a\nb", "a\rb", "a\0b"] {
            let e = conf_quote("recovery_target_name", bad).expect_err("refused");
            assert!(e.to_string().contains("recovery_target_name"), "{e}");
        }
    }

    #[test]
    fn a_directory_with_a_comma_stays_one_list_element() {
        assert_eq!(
            list_element(Path::new("/srv/r-full, min = 1")),
            "\"/srv/r-full, min = 1\""
        );
        assert_eq!(list_element(Path::new("/a\"b")), "\"/a\"\"b\"");
    }
}
