//! The recovery settings written for the chosen target.

use super::*;

/// The recovery settings of `opts`, quoted for postgresql.auto.conf; built
/// before anything is written so a value that cannot be written is refused
/// first.
/// How recovery stops for a time target.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stop {
    /// `recovery_target_time` (or the extra target asked for).
    AsAsked,
    /// At consistency: nothing committed between the backup's end and the
    /// target.
    Immediate,
    /// Right after the last commit, which is the target.
    AfterLsn(crate::postgres::Lsn),
}

pub(super) fn recovery_settings(
    opts: &RestoreOptions,
    timeline: u32,
    stop: Stop,
) -> Result<Vec<String>, PgError> {
    use crate::postgres::quote::conf_line;
    let mut lines = vec![
        conf_line(
            "restore_command",
            &format!("{} %f %p", opts.restore_command),
        )?,
        // Never 'latest': a stray branch (a restored copy that archived)
        // must not be followed away from the target's own history.
        format!("recovery_target_timeline = '{timeline}'"),
        "recovery_target_action = 'promote'".to_string(),
    ];
    let extra = &opts.extra;
    let has_extra = extra.lsn.is_some() || extra.xid.is_some() || extra.name.is_some();
    match (stop, has_extra) {
        (Stop::Immediate, false) => lines.push("recovery_target = 'immediate'".to_string()),
        (Stop::AfterLsn(lsn), false) => {
            lines.push(conf_line("recovery_target_lsn", &lsn.to_string())?);
        }
        _ => {}
    }
    if let (Target::Time(t), false, Stop::AsAsked) = (&opts.target, has_extra, stop) {
        let t = t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
        lines.push(conf_line("recovery_target_time", &t)?);
    }
    if let Some(l) = &extra.lsn {
        lines.push(conf_line("recovery_target_lsn", l)?);
    }
    if let Some(x) = &extra.xid {
        lines.push(conf_line("recovery_target_xid", x)?);
    }
    if let Some(n) = &extra.name {
        lines.push(conf_line("recovery_target_name", n)?);
    }
    Ok(lines)
}

pub(super) fn write_recovery(
    m: &PgManifest,
    dir: &Path,
    settings: &[String],
) -> std::io::Result<()> {
    std::fs::write(dir.join("backup_label"), &m.backup_label)?;
    // No tablespace_map: it would make PostgreSQL relink pg_tblspc to the
    // original locations. dr has already placed each tablespace (in place,
    // or linked to its --tablespace-map directory).
    std::fs::write(dir.join("recovery.signal"), b"")?;
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("postgresql.auto.conf"))?;
    writeln!(
        conf,
        "\n# Added by dr restore of backup {}\n{}",
        m.id,
        settings.join("\n")
    )?;
    conf.sync_all()
}
