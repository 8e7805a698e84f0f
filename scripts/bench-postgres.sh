#!/usr/bin/env bash
# PostgreSQL benchmark: dr versus pgBackRest, side by side in one run on the
# same PostgreSQL 15 cluster and the same data. Measures a full backup, the
# backup's size in the repository, a restore of it, and the latency of
# archiving one WAL segment; then dr's remote mode (BASE_BACKUP over the
# replication protocol) versus `pg_basebackup -Ft -X none -D - | zstd | age`;
# and, in the same rounds, the floors: `tar | zstd -1` of PGDATA for a backup
# and writing the restored bytes with `dd conv=fsync` for a restore. Prints
# tables with ratios and a JSON line.
#
# Usage (as root on Debian 12): scripts/bench-postgres.sh [SCALE] [SEGMENTS]
#   SCALE     pgbench scale factor (default 100, about 1.5 GB of data)
#   SEGMENTS  WAL segments timed for the archive-push latency (default 20)
# ROUNDS (default 3) sets how often each backup and restore is timed; the
# medians are reported.
# DR_COMPRESSION_LEVEL sets dr's zstd level for data files (default 3).
# DR_BIN=/path/to/dr uses that binary instead of building a release one.
# Everything lives in $DR_BENCH_DIR (default /tmp/dr-bench-pg), recreated each
# run; the PostgreSQL server it starts is stopped on exit.
#
# Settings that make the two comparable:
#   - both encrypt (dr: age; pgBackRest: repo1-cipher-type=aes-256-cbc) and
#     compress (dr: zstd at its default level 3; pgBackRest: compress-type=lz4,
#     its fastest codec) and use both cores (pgBackRest: process-max=nproc;
#     dr: its default of 4 parallel uploads);
#   - both start the backup with a fast checkpoint and wait until the WAL the
#     backup needs is archived (remote mode and pg_basebackup too);
#   - remote mode and the pg_basebackup pipe both compress with zstd level 3
#     on every core and encrypt with age to the same recipient;
#   - one archive_command feeds both repositories, so both hold the same WAL;
#   - the data files are read into the page cache before each backup, and
#     dirty pages are flushed (untimed) before each timed step; the timed
#     region ends with `sync`, so each side is charged for making its own
#     output durable (both tools fsync what they write, so this is cheap).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/sbin:/sbin"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C # a '.' decimal point in EPOCHREALTIME, awk and printf
SCALE=${1:-100}
SEGMENTS=${2:-20}
ROUNDS=${ROUNDS:-3}
BENCH=${DR_BENCH_DIR:-/tmp/dr-bench-pg}
PGBIN=/usr/lib/postgresql/15/bin
OS_USER=postgres
CORES=$(nproc)

step() { printf '\n\033[1m== %s\033[0m (at %d s)\n' "$*" "$SECONDS" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
as_pg() { runuser -u "$OS_USER" -- "$@"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

[[ $(id -u) -eq 0 ]] || die "run as root: the benchmark installs packages and runs PostgreSQL as the '$OS_USER' user"
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || die "SCALE must be a positive integer (got '$SCALE')"
[[ $SEGMENTS =~ ^[1-9][0-9]*$ ]] || die "SEGMENTS must be a positive integer (got '$SEGMENTS')"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"

step "Prerequisites"
# "package:check": a check starting with / is a file the package installs,
# anything else a command. postgresql-contrib-15 is virtual on Debian 12, so a
# file it provides is checked instead of dpkg status.
PACKAGES=(
    "postgresql-15:$PGBIN/postgres"
    "postgresql-contrib-15:/usr/share/postgresql/15/extension/amcheck.control"
    "pgbackrest:pgbackrest"
    "zstd:zstd"
    "age:age"
    "python3:python3"
)
missing=()
for entry in "${PACKAGES[@]}"; do
    check=${entry#*:}
    if [[ $check == /* ]]; then [[ -e $check ]]; else command -v "$check" >/dev/null 2>&1; fi ||
        missing+=("${entry%%:*}")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt=(apt-get -q -y -o DPkg::Lock::Timeout=600)
    "${apt[@]}" update
    "${apt[@]}" install --no-install-recommends "${missing[@]}"
else
    echo "all present" >&2
fi
command -v cargo >/dev/null || die "cargo not found; install the Rust toolchain"
id "$OS_USER" >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash "$OS_USER"
PGBACKREST=$(command -v pgbackrest)

if [[ -z ${DR_BIN:-} ]]; then
    step "Building dr (release)"
    cargo build --release --locked --quiet --bin dr
    DR_BIN=$CARGO_TARGET_DIR/release/dr
fi
[[ -x $DR_BIN ]] || die "DR_BIN=$DR_BIN is not an executable"

DATA=$BENCH/data
stop_pg() {
    if [[ -f $DATA/postmaster.pid ]]; then as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true; fi
}
stop_pg # a server an interrupted earlier run left behind
rm -rf "$BENCH"
mkdir -p "$BENCH"/{bin,sock,walcopy,dr,pgbr/{conf,lock,log,spool}}
cp "$DR_BIN" "$BENCH/bin/dr" # /root is not traversable by postgres
chown -R "$OS_USER:" "$BENCH"
chmod 755 "$BENCH"
cd "$BENCH" # postgres tools warn about a cwd they cannot read
DR=$BENCH/bin/dr
trap stop_pg EXIT
trap 'exit 130' INT TERM HUP # so the EXIT trap runs on a signal too

PORT=$(free_port)
PGBR_CONF=$BENCH/pgbr/conf # --config-path: only this directory's config counts, not /etc/pgbackrest
pgbr() { as_pg "$PGBACKREST" --config-path="$PGBR_CONF" "$@"; }
sql() { "$PGBIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }

step "Configuring dr and pgBackRest"
as_pg "$DR" keygen --output "$BENCH/identity.txt" >/dev/null
RCPT=$(grep -o 'age1[0-9a-z]*' "$BENCH/identity.txt" | head -1)
# Two dr repositories: "repo" takes the archive_command's WAL and the backup;
# "walrepo" is empty until the WAL-latency phase, so every push there is new.
for name in repo walrepo remote; do
    cat >"$BENCH/dr/$name.toml" <<TOML
[repository]
recipients = ["$RCPT"]
identity_file = "$BENCH/identity.txt"
compression_level = ${DR_COMPRESSION_LEVEL:-3}

[audit]
path = "$BENCH/audit.jsonl"

[[region]]
name = "local"
type = "fs"
path = "$BENCH/dr/$name"

[postgres.bench]
conninfo = "host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
data_dir = "$DATA"
bin_dir = "$PGBIN"
os_user = "$OS_USER"
state_dir = "$BENCH/dr/state-$name"
TOML
done
# Remote mode backs up into "repo" too (the stop segment must be in the
# repository it records the backup in), from a host with no identity and no
# state: a full backup, as pg_basebackup takes, not an incremental one.
sed -i -e '/^identity_file/d' -e '/^data_dir/d' -e "s|path = \"$BENCH/dr/remote\"|path = \"$BENCH/dr/repo\"|" \
    -e 's|^\[postgres.bench\]|[postgres.bench]\nmode = "remote"|' "$BENCH/dr/remote.toml"
# The same split for pgBackRest: stanza "bench" gets the archive_command's
# WAL and the backup, stanza "walbench" (its own repository) the timed pushes.
PGBR_PASS=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
cat >"$PGBR_CONF/pgbackrest.conf" <<CONF
[global]
repo1-path=$BENCH/pgbr/repo
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$PGBR_PASS
repo1-retention-full=1
compress-type=lz4
process-max=$CORES
start-fast=y
archive-check=y
lock-path=$BENCH/pgbr/lock
log-path=$BENCH/pgbr/log
spool-path=$BENCH/pgbr/spool
log-level-console=warn

[bench]
pg1-path=$DATA
pg1-port=$PORT
pg1-socket-path=$BENCH/sock

[walbench]
repo1-path=$BENCH/pgbr/walrepo
pg1-path=$DATA
pg1-port=$PORT
pg1-socket-path=$BENCH/sock
CONF
chown -R "$OS_USER:" "$BENCH/dr" "$PGBR_CONF"
chmod 600 "$PGBR_CONF/pgbackrest.conf" # holds the cipher passphrase
as_pg "$DR" --config "$BENCH/dr/repo.toml" repo init >&2
as_pg "$DR" --config "$BENCH/dr/walrepo.toml" repo init >&2

step "PostgreSQL 15 on 127.0.0.1:$PORT, archiving to both tools"
as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --auth=trust --data-checksums >/dev/null
# pgBackRest talks to the server over a Unix socket only, so one is opened in
# the bench dir (dr connects over TCP on loopback).
cat >>"$DATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$BENCH/sock'
archive_mode = on
archive_command = '$DR --quiet --config $BENCH/dr/repo.toml wal-push %p && $PGBACKREST --config-path=$PGBR_CONF --stanza=bench archive-push %p'
CONF
as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$BENCH/postgres.log" -w start >/dev/null
pgbr --stanza=bench stanza-create
pgbr --stanza=walbench stanza-create
pgbr --stanza=bench check # also proves the archive_command reaches pgBackRest

# Switches to a new segment and waits until the archiver has nothing left to
# do, so no timed step competes with archiving.
wait_archived() {
    local seg failed
    failed=$(sql "SELECT failed_count FROM pg_stat_archiver")
    # pg_switch_wal() is a no-op (returning the unfinished current segment)
    # when nothing was written since the last switch; a checkpoint record
    # guarantees there is something to switch away from.
    sql "CHECKPOINT" >/dev/null
    seg=$(sql "SELECT pg_walfile_name(pg_switch_wal())")
    for _ in $(seq 6000); do
        if ! compgen -G "$DATA/pg_wal/archive_status/*.ready" >/dev/null &&
            [[ ! "$(sql "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")" < "$seg" ]]; then
            return 0
        fi
        [[ $(sql "SELECT failed_count FROM pg_stat_archiver") == "$failed" ]] ||
            { tail -n 20 "$BENCH/postgres.log" >&2; die "archive_command failed (log above)"; }
        sleep 0.1
    done
    die "WAL archiving did not catch up within 10 minutes"
}

step "Loading data: pgbench -i -s $SCALE"
t0=$(now)
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s "$SCALE" -q postgres 2>&1 | tail -n 1 >&2
sql "CHECKPOINT"
wait_archived
echo "loaded and archived in $(elapsed "$t0" "$(now)") s; PGDATA is $(du -sh "$DATA" | cut -f1)" >&2
# The same WAL is in both archives now. Measured before the backups because
# pgBackRest's backup ends with an expire that drops the WAL older than it.
DR_ARCHIVE=$(du -sb "$BENCH"/dr/repo/pg/*/*/wal | awk '{ s += $1 } END { print s }')
PGBR_ARCHIVE=$(du -sb "$BENCH/pgbr/repo/archive" | cut -f1)
DR_ARCHIVED=$(find "$BENCH"/dr/repo/pg/*/*/wal -type f -regextype posix-extended -regex '.*/[0-9A-F]{24}-[0-9a-f]{64}' | wc -l)
PGBR_ARCHIVED=$(find "$BENCH/pgbr/repo/archive" -type f -regextype posix-extended -regex '.*/[0-9A-F]{24}-[0-9a-f]{40}(\.[a-z0-9]+)?' | wc -l)
((DR_ARCHIVED == PGBR_ARCHIVED)) || die "the archives differ: dr holds $DR_ARCHIVED segments, pgBackRest $PGBR_ARCHIVED"

# Reads every data file once so both backups read PGDATA from memory, then
# flushes whatever else is dirty so neither timed region pays for it.
prepare() {
    find "$DATA" -type f -exec cat {} + >/dev/null 2>&1 || true
    sync
}

# Backups and restores run ROUNDS times, the two tools alternating which
# goes first, and the medians count: on a virtual disk single runs of either
# tool vary by a factor of two. Rounds after the first take full backups
# again (dr --full, pgBackRest --type=full), so each round does the same work.
backup_dr() { # backup_dr ROUND
    local full=() t0
    (($1 > 1)) && full=(--full)
    wait_archived # WAL the other tool's backup left must not be archived during this one
    prepare
    t0=$(now)
    as_pg "$DR" --json --config "$BENCH/dr/repo.toml" backup pg "${full[@]}" >"$BENCH/dr-backup-$1.json"
    sync
    DR_BACKUP+=("$(elapsed "$t0" "$(now)")")
    echo "round $1, dr: ${DR_BACKUP[-1]} s" >&2
}
backup_pgbr() { # backup_pgbr ROUND
    local t0
    wait_archived
    prepare
    t0=$(now)
    pgbr --stanza=bench --type=full backup
    sync
    PGBR_BACKUP+=("$(elapsed "$t0" "$(now)")")
    echo "round $1, pgBackRest: ${PGBR_BACKUP[-1]} s" >&2
}
# Both restore the latest backup into an empty directory and configure
# recovery to the end of the archive; neither starts the server.
restore_dr() { # restore_dr ROUND
    local t0
    rm -rf "$BENCH/restore-dr"
    sync
    t0=$(now)
    as_pg "$DR" --json --config "$BENCH/dr/repo.toml" restore pg --to latest --target "$BENCH/restore-dr" >"$BENCH/dr-restore.json"
    sync
    DR_RESTORE+=("$(elapsed "$t0" "$(now)")")
    echo "round $1, dr: ${DR_RESTORE[-1]} s" >&2
}
restore_pgbr() { # restore_pgbr ROUND
    local t0
    rm -rf "$BENCH/restore-pgbr"
    install -d -m 700 -o "$OS_USER" -g "$(id -gn "$OS_USER")" "$BENCH/restore-pgbr"
    sync
    t0=$(now)
    pgbr --stanza=bench --pg1-path="$BENCH/restore-pgbr" restore
    sync
    PGBR_RESTORE+=("$(elapsed "$t0" "$(now)")")
    echo "round $1, pgBackRest: ${PGBR_RESTORE[-1]} s" >&2
}
# The floors: what the same work costs without any backup tool. For a
# backup, `tar | zstd -1` of PGDATA (read from memory, one compressor thread
# per core) into a file made durable; for a restore, writing as many bytes
# as the restored PGDATA holds with `dd conv=fsync`, from memory.
floor_backup() { # floor_backup ROUND
    local t0
    wait_archived
    prepare
    t0=$(now)
    tar -cf - -C "$DATA" --exclude=./pg_wal . | zstd -q -1 -T0 -o "$BENCH/floor.tar.zst" -f
    sync
    FLOOR_BACKUP+=("$(elapsed "$t0" "$(now)")")
    rm -f "$BENCH/floor.tar.zst"
    echo "round $1, tar | zstd -1: ${FLOOR_BACKUP[-1]} s" >&2
}
floor_restore() { # floor_restore ROUND
    local t0
    [[ -f $BENCH/floor.src ]] || tar -cf "$BENCH/floor.src" -C "$BENCH/restore-dr" .
    cat "$BENCH/floor.src" >/dev/null
    rm -f "$BENCH/floor.out"
    sync
    t0=$(now)
    dd if="$BENCH/floor.src" of="$BENCH/floor.out" bs=4M conv=fsync status=none
    sync
    FLOOR_RESTORE+=("$(elapsed "$t0" "$(now)")")
    rm -f "$BENCH/floor.out"
    echo "round $1, dd conv=fsync of the restored bytes: ${FLOOR_RESTORE[-1]} s" >&2
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
DR_BACKUP=() PGBR_BACKUP=() DR_RESTORE=() PGBR_RESTORE=() FLOOR_BACKUP=() FLOOR_RESTORE=()

for round in $(seq "$ROUNDS"); do
    step "Full backup, round $round of $ROUNDS"
    if ((round % 2)); then backup_dr "$round"; backup_pgbr "$round"; else backup_pgbr "$round"; backup_dr "$round"; fi
    floor_backup "$round"
    if ((round == 1)); then
        # Backup only: dr's data objects and manifests; pgBackRest's backup
        # set and its backup.info/manifest. WAL is compared separately below.
        DR_SIZE=$(du -sb "$BENCH"/dr/repo/pg/*/*/backups | awk '{ s += $1 } END { print s }')
        PGBR_SIZE=$(du -sb "$BENCH/pgbr/repo/backup" | cut -f1)
    fi
done
pgbr --stanza=bench --output=json info >"$BENCH/pgbr-info.json"
cp "$BENCH/dr-backup-1.json" "$BENCH/dr-backup.json"
for round in $(seq "$ROUNDS"); do
    step "Restore, round $round of $ROUNDS"
    if ((round % 2)); then restore_dr "$round"; restore_pgbr "$round"; else restore_pgbr "$round"; restore_dr "$round"; fi
    floor_restore "$round"
done
rm -f "$BENCH/floor.src"
FLOOR_BACKUP_S=$(median "${FLOOR_BACKUP[@]}")
FLOOR_RESTORE_S=$(median "${FLOOR_RESTORE[@]}")
DR_BACKUP_S=$(median "${DR_BACKUP[@]}")
PGBR_BACKUP_S=$(median "${PGBR_BACKUP[@]}")
DR_RESTORE_S=$(median "${DR_RESTORE[@]}")
PGBR_RESTORE_S=$(median "${PGBR_RESTORE[@]}")
DR_RESTORED=$(du -sb "$BENCH/restore-dr" | cut -f1)
PGBR_RESTORED=$(du -sb "$BENCH/restore-pgbr" | cut -f1)

step "Full backup, remote mode: dr (BASE_BACKUP)"
wait_archived
prepare
t0=$(now)
as_pg "$DR" --json --config "$BENCH/dr/remote.toml" backup pg >"$BENCH/dr-remote-backup.json"
sync
DR_REMOTE_S=$(elapsed "$t0" "$(now)")
echo "dr remote mode: $DR_REMOTE_S s" >&2
REMOTE_ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["backup"]["id"])' "$BENCH/dr-remote-backup.json")
DR_REMOTE_SIZE=$(du -sb "$BENCH"/dr/repo/pg/*/*/backups/"$REMOTE_ID" | awk '{ s += $1 } END { print s }')

step "Full backup: pg_basebackup -Ft -X none -D - | zstd | age"
wait_archived
prepare
t0=$(now)
"$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres -Ft -X none -c fast --manifest-checksums=NONE -D - |
    zstd -q -3 -T0 | age -r "$RCPT" >"$BENCH/pg_basebackup.tar.zst.age"
sync
PGBB_S=$(elapsed "$t0" "$(now)")
PGBB_SIZE=$(stat -c %s "$BENCH/pg_basebackup.tar.zst.age")
echo "pg_basebackup | zstd | age: $PGBB_S s" >&2

step "WAL archiving latency: $SEGMENTS segments"
# Real, full segments are needed, each new to the repository it goes to.
# While they are produced the archive_command only copies them aside; the
# copies are then pushed by hand into the two empty repositories.
wait_archived
sql "ALTER SYSTEM SET archive_command = 'cp %p $BENCH/walcopy/%f'"
sql "SELECT pg_reload_conf()" >/dev/null
count_copies() { find "$BENCH/walcopy" -regextype posix-extended -regex '.*/[0-9A-F]{24}' | wc -l; }
for _ in $(seq 1000); do
    (($(count_copies) >= SEGMENTS)) && break
    # Rows 1..100000 exist at every scale; one round writes about a segment.
    sql "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 100000"
done
wait_archived
sql "ALTER SYSTEM RESET archive_command"
sql "SELECT pg_reload_conf()" >/dev/null
mapfile -t WALFILES < <(find "$BENCH/walcopy" -regextype posix-extended -regex '.*/[0-9A-F]{24}' | sort | head -n "$SEGMENTS")
((${#WALFILES[@]} == SEGMENTS)) || die "only ${#WALFILES[@]} WAL segments were produced"
chown -R "$OS_USER:" "$BENCH/walcopy"
cat "${WALFILES[@]}" >/dev/null # both read the segments from memory, as the archiver usually does

# One shell as postgres times every push, as PostgreSQL's archiver would run
# it: from PGDATA (both tools read global/pg_control there), without runuser's
# cost per call. The order alternates so neither side always goes first.
# shellcheck disable=SC2016 # the script expands its own arguments
as_pg bash -c '
    set -euo pipefail
    data=$1 dr=$2 drconf=$3 pgbackrest=$4 pgbrconf=$5 log=$6; shift 6
    cd "$data"
    ms() { echo $(( (${2/./} - ${1/./}) / 1000 )).$(printf %03d $(( (${2/./} - ${1/./}) % 1000 ))); }
    i=0
    for f in "$@"; do
        for side in $( ((i % 2)) && echo "pgbr dr" || echo "dr pgbr"); do
            t0=$EPOCHREALTIME
            if [[ $side == dr ]]; then
                "$dr" --quiet --config "$drconf" wal-push "$f" >>"$log" 2>&1
                d=$(ms "$t0" "$EPOCHREALTIME")
            else
                "$pgbackrest" --config-path="$pgbrconf" --stanza=walbench archive-push "$f" >>"$log" 2>&1
                p=$(ms "$t0" "$EPOCHREALTIME")
            fi
        done
        echo "$d $p"
        i=$((i + 1))
    done
' bash "$DATA" "$DR" "$BENCH/dr/walrepo.toml" "$PGBACKREST" "$PGBR_CONF" "$BENCH/wal-push.log" "${WALFILES[@]}" >"$BENCH/wal-push-ms.txt"
DR_WAL_STORED=$(du -sb "$BENCH/dr/walrepo/pg" | cut -f1)
PGBR_WAL_STORED=$(du -sb "$BENCH/pgbr/walrepo/archive" | cut -f1)
# Every segment must have landed in both repositories.
(($(find "$BENCH/dr/walrepo/pg" -path '*/wal/*' -type f | wc -l) == SEGMENTS)) || die "dr's WAL repository does not hold $SEGMENTS segments"
(($(find "$BENCH/pgbr/walrepo/archive" -type f -name '[0-9A-F]*-*' | wc -l) == SEGMENTS)) || die "pgBackRest's WAL repository does not hold $SEGMENTS segments"

step "Results"
python3 - "$BENCH" <<PY
import json, statistics, sys
bench = sys.argv[1]
dr_b = json.load(open(f"{bench}/dr-backup.json"))["backup"]
dr_r = json.load(open(f"{bench}/dr-restore.json"))["restore"]
pi = json.load(open(f"{bench}/pgbr-info.json"))[0]["backup"][-1]["info"]
rows = [tuple(map(float, l.split())) for l in open(f"{bench}/wal-push-ms.txt")]
dr_ms = [r[0] for r in rows]
pg_ms = [r[1] for r in rows]
r = {
    "scale": $SCALE, "cores": $CORES, "wal_segments": len(rows),
    "database_bytes": {"dr": dr_b["size"], "pgbackrest": pi["size"]},
    "rounds": $ROUNDS,
    "backup_seconds": {"dr": $DR_BACKUP_S, "pgbackrest": $PGBR_BACKUP_S},
    "backup_seconds_runs": {"dr": [${DR_BACKUP[*]/%/,}], "pgbackrest": [${PGBR_BACKUP[*]/%/,}]},
    "backup_seconds_reported_by_dr": dr_b["duration_seconds"],
    "backup_repo_bytes": {"dr": $DR_SIZE, "pgbackrest": $PGBR_SIZE},
    "restore_seconds": {"dr": $DR_RESTORE_S, "pgbackrest": $PGBR_RESTORE_S},
    "restore_seconds_runs": {"dr": [${DR_RESTORE[*]/%/,}], "pgbackrest": [${PGBR_RESTORE[*]/%/,}]},
    "restore_seconds_reported_by_dr": dr_r.get("restore_seconds"),
    "restored_bytes": {"dr": $DR_RESTORED, "pgbackrest": $PGBR_RESTORED},
    "floor_seconds": {"backup_tar_zstd1": $FLOOR_BACKUP_S, "restore_dd_fsync": $FLOOR_RESTORE_S},
    "floor_seconds_runs": {"backup_tar_zstd1": [${FLOOR_BACKUP[*]/%/,}], "restore_dd_fsync": [${FLOOR_RESTORE[*]/%/,}]},
    "wal_archive_bytes": {"dr": $DR_ARCHIVE, "pgbackrest": $PGBR_ARCHIVE}, "wal_archive_segments": $DR_ARCHIVED,
    "wal_push_ms_median": {"dr": statistics.median(dr_ms), "pgbackrest": statistics.median(pg_ms)},
    "wal_push_ms_mean": {"dr": statistics.fmean(dr_ms), "pgbackrest": statistics.fmean(pg_ms)},
    "wal_push_stored_bytes": {"dr": $DR_WAL_STORED, "pgbackrest": $PGBR_WAL_STORED},
    "remote_backup_seconds": {"dr": $DR_REMOTE_S, "pg_basebackup": $PGBB_S},
    "remote_backup_bytes": {"dr": $DR_REMOTE_SIZE, "pg_basebackup": $PGBB_SIZE},
    "remote_backup_database_bytes": json.load(open(f"{bench}/dr-remote-backup.json"))["backup"]["size"],
}
mib = lambda b: f"{b / 2**20:.1f} MiB"
sec = lambda s: f"{s:.2f} s"
ms = lambda m: f"{m:.1f} ms"
def ratio(key, inverse=False, other="pgbackrest"):
    d, p = r[key]["dr"], r[key][other]
    v = (d / p) if inverse else (p / d)
    r.setdefault("ratios", {})[key] = round(v, 3)
    return f"{v:.2f}x"
table = [
    ("", "dr", "pgBackRest", "ratio"),
    ("full backup", sec(r["backup_seconds"]["dr"]), sec(r["backup_seconds"]["pgbackrest"]), ratio("backup_seconds")),
    ("backup in repository", mib(r["backup_repo_bytes"]["dr"]), mib(r["backup_repo_bytes"]["pgbackrest"]), ratio("backup_repo_bytes", True)),
    ("restore", sec(r["restore_seconds"]["dr"]), sec(r["restore_seconds"]["pgbackrest"]), ratio("restore_seconds")),
    ("WAL push, median", ms(r["wal_push_ms_median"]["dr"]), ms(r["wal_push_ms_median"]["pgbackrest"]), ratio("wal_push_ms_median")),
    ("WAL push, mean", ms(r["wal_push_ms_mean"]["dr"]), ms(r["wal_push_ms_mean"]["pgbackrest"]), ratio("wal_push_ms_mean")),
    (f"WAL archive of the load ({r['wal_archive_segments']} seg.)", mib(r["wal_archive_bytes"]["dr"]), mib(r["wal_archive_bytes"]["pgbackrest"]), ratio("wal_archive_bytes", True)),
    ("database backed up", mib(r["database_bytes"]["dr"]), mib(r["database_bytes"]["pgbackrest"]), ""),
    ("restored PGDATA", mib(r["restored_bytes"]["dr"]), mib(r["restored_bytes"]["pgbackrest"]), ""),
]
fl = r["floor_seconds"]
r["floor_ratios"] = {
    "backup_vs_tar_zstd1": round(r["backup_seconds"]["dr"] / fl["backup_tar_zstd1"], 3),
    "restore_vs_dd_fsync": round(r["restore_seconds"]["dr"] / fl["restore_dd_fsync"], 3),
}
table += [
    ("floor: tar | zstd -1 of PGDATA", sec(fl["backup_tar_zstd1"]), "", f"dr {r['floor_ratios']['backup_vs_tar_zstd1']:.2f}x it"),
    ("floor: dd conv=fsync, restored bytes", sec(fl["restore_dd_fsync"]), "", f"dr {r['floor_ratios']['restore_vs_dd_fsync']:.2f}x it"),
]
w = [max(len(row[i]) for row in table) for i in range(4)]
for row in table:
    print(f"{row[0]:<{w[0]}}  {row[1]:>{w[1]}}  {row[2]:>{w[2]}}  {row[3]:>{w[3]}}")
print(f"\nscale {r['scale']}, {r['cores']} cores, {r['wal_segments']} WAL segments timed, "
      f"backups and restores: medians of {r['rounds']} rounds; "
      "ratios are pgBackRest/dr for times (above 1: dr is faster) and dr/pgBackRest for sizes (below 1: dr is smaller)")
remote = [
    ("remote mode (BASE_BACKUP)", "dr", "pg_basebackup|zstd|age", "ratio"),
    ("full backup", sec(r["remote_backup_seconds"]["dr"]), sec(r["remote_backup_seconds"]["pg_basebackup"]), ratio("remote_backup_seconds", other="pg_basebackup")),
    ("backup stored", mib(r["remote_backup_bytes"]["dr"]), mib(r["remote_backup_bytes"]["pg_basebackup"]), ratio("remote_backup_bytes", True, "pg_basebackup")),
    ("database backed up", mib(r["remote_backup_database_bytes"]), "", ""),
]
w = [max(len(row[i]) for row in remote) for i in range(4)]
print()
for row in remote:
    print(f"{row[0]:<{w[0]}}  {row[1]:>{w[1]}}  {row[2]:>{w[2]}}  {row[3]:>{w[3]}}")
print("ratios are pg_basebackup/dr for times and dr/pg_basebackup for sizes")
print(json.dumps(r, separators=(",", ":")))
PY
