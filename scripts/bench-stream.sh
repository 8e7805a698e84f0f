#!/usr/bin/env bash
# Synchronous WAL streaming benchmark: pgbench commit latency and TPS on one
# PostgreSQL 15 server with, as its only synchronous standby, either
#   - PostgreSQL's own `pg_receivewal --synchronous` writing to local disk, or
#   - `dr wal-stream` with synchronous = true, writing compressed, encrypted
#     pieces to a local filesystem repository (the same disk),
# plus a baseline with no synchronous standby. The rounds are interleaved
# (baseline, pg_receivewal, dr, baseline, …) so drift hits all three alike;
# prints the mean of each with ratios, and a JSON line.
#
# Usage (as root on Debian 12): scripts/bench-stream.sh [SECONDS] [ROUNDS] [CLIENTS]
#   SECONDS  pgbench duration of each run (default 30)
#   ROUNDS   runs of each configuration (default 2)
#   CLIENTS  pgbench clients (default 8)
# Everything lives in $DR_BENCH_DIR (default /tmp/dr-bench-stream), recreated
# each run; the servers it starts are stopped on exit.
#
# Both standbys use a physical replication slot and report flush only once
# the WAL is durable: pg_receivewal fsyncs its segment file, dr waits until
# the piece holding the WAL is fsynced in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/sbin:/sbin"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export LC_ALL=C
SECS=${1:-30}
ROUNDS=${2:-2}
CLIENTS=${3:-8}
BENCH=${DR_BENCH_DIR:-/tmp/dr-bench-stream}
PGBIN=/usr/lib/postgresql/15/bin
OS_USER=postgres
SCALE=10

step() { printf '\n\033[1m== %s\033[0m (at %d s)\n' "$*" "$SECONDS" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
as_pg() { runuser -u "$OS_USER" -- "$@"; }
# For background processes: setpriv execs (runuser forks and does not pass
# SIGTERM on), so $! is the process itself and `kill $!` stops it.
bg_as_pg() { exec setpriv --reuid="$OS_USER" --regid="$OS_USER" --init-groups -- "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

[[ $(id -u) -eq 0 ]] || die "run as root: the benchmark runs PostgreSQL as the '$OS_USER' user"
for v in SECS ROUNDS CLIENTS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ -x $PGBIN/postgres && -x $PGBIN/pg_receivewal ]] ||
    die "PostgreSQL 15 is not installed; run scripts/setup.sh first"
id "$OS_USER" >/dev/null 2>&1 || die "no '$OS_USER' user; run scripts/setup.sh first"

step "Building dr (release)"
cargo build --release --locked --quiet

DATA=$BENCH/data
STANDBY_PID=
cleanup() {
    # Tolerates failure: under `set -e` a failed step would end this handler
    # and leave the server below running.
    if [[ -n $STANDBY_PID ]] && kill "$STANDBY_PID" 2>/dev/null; then wait "$STANDBY_PID" 2>/dev/null || true; fi
    if [[ -f $DATA/postmaster.pid ]]; then as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true; fi
}
cleanup # a server an interrupted earlier run left behind
rm -rf "$BENCH"
mkdir -p "$BENCH"/{bin,receivewal,dr}
cp "$CARGO_TARGET_DIR/release/dr" "$BENCH/bin/dr" # /root is not traversable by postgres
chown -R "$OS_USER:" "$BENCH"
chmod 755 "$BENCH"
cd "$BENCH"
DR=$BENCH/bin/dr
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

PORT=$(free_port)
sql() { "$PGBIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }

step "PostgreSQL 15 on 127.0.0.1:$PORT, pgbench scale $SCALE"
as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --auth=trust --data-checksums >/dev/null
cat >>"$DATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 4
synchronous_commit = on
CONF
as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$BENCH/postgres.log" -w start >/dev/null
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1

as_pg "$DR" keygen --output "$BENCH/identity.txt" >/dev/null
RCPT=$(grep -o 'age1[0-9a-z]*' "$BENCH/identity.txt" | head -1)
cat >"$BENCH/dr.toml" <<TOML
[repository]
recipients = ["$RCPT"]

[[region]]
name = "local"
type = "fs"
path = "$BENCH/dr/repo"

[postgres.bench]
conninfo = "host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
data_dir = "$DATA"
bin_dir = "$PGBIN"
os_user = "$OS_USER"
state_dir = "$BENCH/dr/state"
wal = "stream"
synchronous = true
TOML
chown "$OS_USER:" "$BENCH/dr.toml" "$BENCH/identity.txt"
as_pg "$DR" --config "$BENCH/dr.toml" repo init >/dev/null
sql "SELECT pg_create_physical_replication_slot('recv', true)" >/dev/null

# Sets synchronous_standby_names and waits until `app` is the sync standby.
make_sync() {
    local app=$1
    sql "ALTER SYSTEM SET synchronous_standby_names = '$app'" >/dev/null
    sql "SELECT pg_reload_conf()" >/dev/null
    for _ in $(seq 300); do
        [[ $(sql "SELECT count(*) FROM pg_stat_replication WHERE application_name = '$app' AND sync_state = 'sync'") == 1 ]] && return 0
        sleep 0.1
    done
    die "$app did not become the synchronous standby (see $BENCH/*.log)"
}

no_sync() {
    sql "ALTER SYSTEM RESET synchronous_standby_names" >/dev/null
    sql "SELECT pg_reload_conf()" >/dev/null
}

# pgbench (TPC-B-like, the default script) → "tps latency_ms" on stdout.
run_pgbench() {
    local out
    out=$("$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c "$CLIENTS" -j 2 -T "$SECS" -n postgres 2>&1) ||
        { echo "$out" >&2; die "pgbench failed"; }
    awk '/^latency average/ { lat = $4 } /^tps = / { tps = $3 } END { print tps, lat }' <<<"$out"
}

declare -A TPS LAT
record() { TPS[$1]+="$2 "; LAT[$1]+="$3 "; printf '  %-14s %8.1f tps  %7.3f ms\n' "$1" "$2" "$3" >&2; }

# with_standby LABEL APP LOG CMD…: starts CMD as the synchronous standby
# APP (output appended to LOG), runs pgbench, records it as LABEL, stops CMD.
with_standby() {
    local label=$1 app=$2 log=$3 t l
    shift 3
    bg_as_pg "$@" >>"$log" 2>&1 &
    STANDBY_PID=$!
    make_sync "$app"
    read -r t l < <(run_pgbench)
    record "$label" "$t" "$l"
    no_sync
    kill "$STANDBY_PID" || die "$label exited early (see $log)"
    wait "$STANDBY_PID" 2>/dev/null || true
    STANDBY_PID=
}

for round in $(seq "$ROUNDS"); do
    step "Round $round of $ROUNDS ($SECS s each, $CLIENTS clients)"
    no_sync
    read -r t l < <(run_pgbench)
    record baseline "$t" "$l"

    with_standby pg_receivewal pg_receivewal "$BENCH/receivewal.log" \
        "$PGBIN/pg_receivewal" -h 127.0.0.1 -p "$PORT" -U postgres -D "$BENCH/receivewal" \
        -S recv --synchronous --no-loop
    with_standby dr_sync dr_bench "$BENCH/dr-stream.log" \
        "$DR" --config "$BENCH/dr.toml" wal-stream
done

step "Results"
python3 - "$SECS" "$ROUNDS" "$CLIENTS" "${TPS[baseline]}" "${LAT[baseline]}" \
    "${TPS[pg_receivewal]}" "${LAT[pg_receivewal]}" "${TPS[dr_sync]}" "${LAT[dr_sync]}" "$(du -sb "$BENCH/dr/repo" | cut -f1)" \
    "$(du -sb "$BENCH/receivewal" | cut -f1)" <<'PY'
import json, statistics, sys
secs, rounds, clients = (int(x) for x in sys.argv[1:4])
vals = [[float(x) for x in a.split()] for a in sys.argv[4:10]]
mean = statistics.mean
b_tps, b_lat, r_tps, r_lat, d_tps, d_lat = (mean(v) for v in vals)
dr_bytes, recv_bytes = int(sys.argv[10]), int(sys.argv[11])
print(f"pgbench TPC-B, scale 10, {clients} clients, {secs} s x {rounds} rounds (means)")
print(f"{'':26}{'TPS':>10}{'latency ms':>12}")
print(f"{'no sync standby':26}{b_tps:10.1f}{b_lat:12.3f}")
print(f"{'pg_receivewal --synchronous':26}{r_tps:10.1f}{r_lat:12.3f}")
print(f"{'dr wal-stream synchronous':26}{d_tps:10.1f}{d_lat:12.3f}")
print(f"dr vs pg_receivewal: TPS x{d_tps / r_tps:.2f}, latency x{d_lat / r_lat:.2f}")
print(f"stored WAL: dr {dr_bytes / 2**20:.1f} MiB (compressed, encrypted), pg_receivewal {recv_bytes / 2**20:.1f} MiB")
print(json.dumps({"clients": clients, "seconds": secs, "rounds": rounds,
                  "baseline": {"tps": b_tps, "latency_ms": b_lat},
                  "pg_receivewal": {"tps": r_tps, "latency_ms": r_lat},
                  "dr": {"tps": d_tps, "latency_ms": d_lat},
                  "tps_ratio": d_tps / r_tps, "latency_ratio": d_lat / r_lat},
                 separators=(",", ":")))
PY
