#!/usr/bin/env bash
# Synchronous WAL streaming benchmark: pgbench commit latency and TPS on one
# PostgreSQL 15 server with, as its only synchronous standby, either
#   - PostgreSQL's own `pg_receivewal --synchronous` writing to local disk, or
#   - `dr wal-stream` with synchronous = true into a local filesystem
#     repository on the same disk, appending each commit group as an
#     encrypted record to the segment's journal (one fdatasync, as
#     pg_receivewal does); with an S3 region in the mix, as compressed,
#     encrypted pieces (one object per commit group),
# plus a baseline with no synchronous standby. The rounds are interleaved
# (baseline, pg_receivewal, dr, baseline, …) so drift hits all three alike;
# prints the mean of each with ratios, and a JSON line.
#
# Usage (as root on Debian 12): scripts/bench-stream.sh [SECONDS] [ROUNDS] [CLIENTS]
#   SECONDS  pgbench duration of each run (default 30)
#   ROUNDS   runs of each configuration (default 2)
#   CLIENTS  pgbench clients (default 8)
# Environment:
#   REGIONS  the dr repositories to stream into, each its own configuration
#            in every round (default "fs"): "fs" (a directory on the same
#            disk), "s3" (a Garage bucket on loopback), "fs+s3" (both,
#            min_regions = 2: a flush waits for the slower). Any S3 mode
#            starts a scripts/testenv.sh environment for its Garage.
#   DR_BIN   a built dr to use instead of building a release one.
# Everything lives in $DR_BENCH_DIR (default /tmp/dr-bench-stream), recreated
# each run; the servers it starts are stopped on exit.
#
# Both standbys use a physical replication slot and report flush only once
# the WAL is durable: pg_receivewal fsyncs its segment file, dr waits until
# the journal record or piece holding the WAL is durable in min_regions.
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

REGIONS=${REGIONS:-fs}
for mode in $REGIONS; do
    [[ $mode =~ ^(fs|s3|fs\+s3)$ ]] || die "REGIONS: unknown mode '$mode' (use fs, s3 or fs+s3)"
done
if [[ -z ${DR_BIN:-} ]]; then
    step "Building dr (release)"
    cargo build --release --locked --quiet --bin dr
    DR_BIN=$CARGO_TARGET_DIR/release/dr
fi
[[ -x $DR_BIN ]] || die "DR_BIN=$DR_BIN is not an executable"

DATA=$BENCH/data
TESTENV=$BENCH/testenv
STANDBY_PID=
cleanup() {
    # Tolerates failure: under `set -e` a failed step would end this handler
    # and leave the server below running.
    if [[ -n $STANDBY_PID ]] && kill "$STANDBY_PID" 2>/dev/null; then wait "$STANDBY_PID" 2>/dev/null || true; fi
    if [[ -f $DATA/postmaster.pid ]]; then as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true; fi
    if [[ -f $TESTENV/env.sh ]]; then DR_TESTENV_DIR=$TESTENV bash "$REPO_DIR/scripts/testenv.sh" stop >/dev/null 2>&1 || true; fi
}
REPO_DIR=$PWD
cleanup # a server an interrupted earlier run left behind
rm -rf "$BENCH"
mkdir -p "$BENCH"/{bin,receivewal,dr}
cp "$DR_BIN" "$BENCH/bin/dr" # /root is not traversable by postgres
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

if [[ $REGIONS == *s3* ]]; then
    step "Garage for the S3 region (scripts/testenv.sh in $TESTENV)"
    (cd "$REPO_DIR" && DR_TESTENV_DIR=$TESTENV bash scripts/testenv.sh start >/dev/null)
fi

as_pg "$DR" keygen --output "$BENCH/identity.txt" >/dev/null
RCPT=$(grep -o 'age1[0-9a-z]*' "$BENCH/identity.txt" | head -1)
fs_region() {
    printf '[[region]]\nname = "local"\ntype = "fs"\npath = "%s"\n\n' "$BENCH/dr/repo-$1"
}
s3_region() {
    (
        # shellcheck disable=SC1091
        source "$TESTENV/env.sh"
        cat <<TOML
[[region]]
name = "garage"
type = "s3"
endpoint = "$DR_TEST_S3_ENDPOINT"
bucket = "$DR_TEST_S3_BUCKET"
prefix = "bench-stream-$1"
s3_region = "$DR_TEST_S3_REGION"
path_style = true
access_key_id = "$DR_TEST_S3_ACCESS_KEY_ID"
secret_access_key = "$DR_TEST_S3_SECRET_ACCESS_KEY"

TOML
    )
}
# One configuration (and repository) per mode; `fs+s3` needs both regions.
for mode in $REGIONS; do
    tag=${mode/+/-}
    {
        printf '[repository]\nrecipients = ["%s"]\nmin_regions = %d\n\n' "$RCPT" "$(($(tr -cd + <<<"$mode" | wc -c) + 1))"
        [[ $mode == *fs* ]] && fs_region "$tag"
        [[ $mode == *s3* ]] && s3_region "$tag"
        cat <<TOML
[postgres.bench]
conninfo = "host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
data_dir = "$DATA"
bin_dir = "$PGBIN"
os_user = "$OS_USER"
state_dir = "$BENCH/dr/state-$tag"
wal = "stream"
synchronous = true
TOML
    } >"$BENCH/dr-$tag.toml"
    chown "$OS_USER:" "$BENCH/dr-$tag.toml"
    as_pg "$DR" --config "$BENCH/dr-$tag.toml" repo init >/dev/null
done
chown "$OS_USER:" "$BENCH/identity.txt"
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
    for mode in $REGIONS; do
        tag=${mode/+/-}
        with_standby "dr_$mode" dr_bench "$BENCH/dr-stream-$tag.log" \
            "$DR" --config "$BENCH/dr-$tag.toml" wal-stream
    done
done

step "Results"
args=("$SECS" "$ROUNDS" "$CLIENTS" "$(du -sb "$BENCH/receivewal" | cut -f1)")
for label in baseline pg_receivewal; do args+=("$label" "${TPS[$label]}" "${LAT[$label]}" 0); done
for mode in $REGIONS; do
    bytes=0
    [[ -d $BENCH/dr/repo-${mode/+/-} ]] && bytes=$(du -sb "$BENCH/dr/repo-${mode/+/-}" | cut -f1)
    args+=("dr_$mode" "${TPS[dr_$mode]}" "${LAT[dr_$mode]}" "$bytes")
done
python3 - "${args[@]}" <<'PY'
import json, statistics, sys
secs, rounds, clients, recv_bytes = (int(x) for x in sys.argv[1:5])
rows = {}
rest = sys.argv[5:]
for i in range(0, len(rest), 4):
    label, tps, lat, size = rest[i:i + 4]
    rows[label] = {"tps": statistics.mean(float(x) for x in tps.split()),
                   "latency_ms": statistics.mean(float(x) for x in lat.split()),
                   "runs_tps": [float(x) for x in tps.split()], "stored_bytes": int(size)}
names = {"baseline": "no sync standby", "pg_receivewal": "pg_receivewal --synchronous"}
r = rows["pg_receivewal"]
print(f"pgbench TPC-B, scale 10, {clients} clients, {secs} s x {rounds} rounds (means)")
print(f"{'':32}{'TPS':>10}{'latency ms':>12}{'vs pg_receivewal':>20}")
for label, v in rows.items():
    name = names.get(label, f"dr wal-stream, {label[3:]}")
    ratio = "" if label in names else f"TPS x{v['tps'] / r['tps']:.2f}, lat x{v['latency_ms'] / r['latency_ms']:.2f}"
    print(f"{name:32}{v['tps']:10.1f}{v['latency_ms']:12.3f}{ratio:>28}")
    if label not in names:
        v["tps_ratio"] = v["tps"] / r["tps"]
        v["latency_ratio"] = v["latency_ms"] / r["latency_ms"]
fs = [l for l in rows if l.startswith("dr_fs")]
for l in fs:
    print(f"stored WAL: {l} {rows[l]['stored_bytes'] / 2**20:.1f} MiB (compressed, encrypted), "
          f"pg_receivewal {recv_bytes / 2**20:.1f} MiB")
print(json.dumps({"clients": clients, "seconds": secs, "rounds": rounds, **rows}, separators=(",", ":")))
PY
