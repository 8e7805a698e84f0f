#!/usr/bin/env bash
# Daemon memory benchmark: one `dr daemon` runs the schedules of a busy
# host for MINUTES minutes, and its RSS is sampled every 2 s:
#   - PostgreSQL 15, pgbench scale 20 under a steady pgbench load, WAL
#     archived with `dr wal-push`; a base backup every 20 s, a scratch-restore
#     verification every minute;
#   - Redis with 200k keys, a snapshot every 10 s;
#   - `dr expire` every 30 s.
# Prints RSS at start, after the first minute, peak and at the end, job
# counts from /metrics, and a JSON line. Run it with MALLOC_ARENA_MAX, or
# LD_PRELOAD of another allocator, in the environment to compare them.
#
# Usage (as root on Debian 12): scripts/bench-daemon.sh [MINUTES]   (default 4)
# DR_BIN=/path/to/dr uses that binary instead of building a release one.
# Everything lives in $DR_BENCH_DIR (default /tmp/dr-bench-daemon), recreated
# each run; the servers it starts are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/sbin:/sbin"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export LC_ALL=C
MINUTES=${1:-4}
BENCH=${DR_BENCH_DIR:-/tmp/dr-bench-daemon}
PGBIN=/usr/lib/postgresql/15/bin
OS_USER=postgres

# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

[[ $(id -u) -eq 0 ]] || die "run as root: the benchmark runs PostgreSQL and Redis as the '$OS_USER' user"
[[ $MINUTES =~ ^[1-9][0-9]*$ ]] || die "MINUTES must be a positive integer (got '$MINUTES')"
[[ -x $PGBIN/postgres ]] || die "PostgreSQL 15 is not installed; run scripts/setup.sh first"
for tool in redis-server redis-cli curl python3; do
    command -v "$tool" >/dev/null || die "missing $tool: run scripts/setup.sh first"
done

bench_dr_binary

DATA=$BENCH/data
DAEMON_PID= LOAD_PID= REDIS_PID=
cleanup() {
    # Each step tolerates failure: under `set -e` a failed step would end
    # this handler and leave the servers below running.
    if [[ -n $LOAD_PID ]] && kill "$LOAD_PID" 2>/dev/null; then wait "$LOAD_PID" 2>/dev/null || true; fi
    if [[ -n $DAEMON_PID ]] && kill "$DAEMON_PID" 2>/dev/null; then wait "$DAEMON_PID" 2>/dev/null || true; fi
    if [[ -n $REDIS_PID ]] && kill "$REDIS_PID" 2>/dev/null; then
        while kill -0 "$REDIS_PID" 2>/dev/null; do sleep 0.1; done
    fi
    if [[ -f $DATA/postmaster.pid ]]; then as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true; fi
}
cleanup
bench_prepare repo state scratch redis
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
PORT=$(free_port)
RPORT=$(free_port)
MPORT=$(free_port)

step "Redis on 127.0.0.1:$RPORT, 200k keys"
cat >"$BENCH/redis/redis.conf" <<CONF
bind 127.0.0.1
port $RPORT
daemonize yes
pidfile $BENCH/redis/redis.pid
logfile $BENCH/redis/redis.log
dir $BENCH/redis
save ""
appendonly no
repl-diskless-sync-delay 0
CONF
chown -R "$OS_USER:" "$BENCH/redis"
as_pg redis-server "$BENCH/redis/redis.conf"
for _ in $(seq 100); do
    [[ $(redis-cli -p "$RPORT" ping 2>/dev/null || true) == PONG ]] && break
    sleep 0.1
done
REDIS_PID=$(cat "$BENCH/redis/redis.pid")
redis-cli -p "$RPORT" eval 'for i = 1, 200000 do redis.call("SET", "k:" .. i, string.rep("v", 64)) end return 1' 0 >/dev/null

bench_repo_toml
cat >>"$BENCH/dr.toml" <<TOML

[postgres.bench]
conninfo = "host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
data_dir = "$DATA"
bin_dir = "$PGBIN"
os_user = "$OS_USER"
state_dir = "$BENCH/state"
[postgres.bench.retention]
keep_full = 3
[postgres.bench.verify]
scratch_dir = "$BENCH/scratch"
[postgres.bench.schedule]
backup = "*/20 * * * * *"
verify = "0 * * * * *"

[redis.cache]
url = "redis://127.0.0.1:$RPORT"
server_bin = "$(command -v redis-server)"
os_user = "$OS_USER"
[redis.cache.retention]
keep_snapshots = 5
[redis.cache.schedule]
snapshot = "*/10 * * * * *"

[retention]
schedule = "*/30 * * * * *"
orphan_age = "10m"

[daemon]
listen = "127.0.0.1:$MPORT"
state_dir = "$BENCH/state"
max_concurrent_jobs = 2

[audit]
path = "$BENCH/audit.jsonl"
TOML
chown "$OS_USER:" "$BENCH/dr.toml" "$BENCH/identity.txt"
as_pg "$DR" --config "$BENCH/dr.toml" repo init >/dev/null

step "PostgreSQL 15 on 127.0.0.1:$PORT, pgbench scale 20, archiving with dr wal-push"
as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --auth=trust --data-checksums >/dev/null
cat >>"$DATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
archive_mode = on
archive_command = '$DR --config $BENCH/dr.toml wal-push %p'
CONF
as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$BENCH/postgres.log" -w start >/dev/null
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -q -s 20 postgres >/dev/null 2>&1

step "pgbench load (2 clients, 50 TPS) and dr daemon for $MINUTES minutes"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c 2 -j 1 -R 50 -T $((MINUTES * 60 + 30)) -n postgres \
    >"$BENCH/pgbench.log" 2>&1 &
LOAD_PID=$!
bg_as_pg "$DR" --config "$BENCH/dr.toml" --log-json daemon >"$BENCH/daemon.log" 2>&1 &
DAEMON_PID=$!

: >"$BENCH/rss.tsv"
end=$((SECONDS + MINUTES * 60))
while ((SECONDS < end)); do
    kill -0 "$DAEMON_PID" 2>/dev/null || die "the daemon exited (see $BENCH/daemon.log)"
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$DAEMON_PID/status")
    printf '%d\t%d\n' "$SECONDS" "$rss" >>"$BENCH/rss.tsv"
    sleep 2
done
bench_stop_daemon

step "Results"
python3 - "$BENCH/rss.tsv" "$BENCH/metrics.txt" "$MINUTES" "${MALLOC_ARENA_MAX:-}" "${LD_PRELOAD:-}" <<'PY'
import json, re, sys
rows = [tuple(int(x) for x in l.split()) for l in open(sys.argv[1]) if l.strip()]
t0 = rows[0][0]
rss = [(t - t0, kb / 1024) for t, kb in rows]
def at(sec):
    return next((r for t, r in rss if t >= sec), rss[-1][1])
runs = {}
for line in open(sys.argv[2]):
    m = re.match(r'dr_job_(runs|failures)_total\{([^}]*)\} (\d+)', line)
    if m:
        kind = re.search(r'kind="([^"]+)"', m.group(2)).group(1)
        runs.setdefault(kind, {"runs": 0, "failures": 0})[m.group(1)] += int(m.group(3))
start, minute, peak, last = rss[0][1], at(60), max(r for _, r in rss), rss[-1][1]
late = [r for t, r in rss if t >= rss[-1][0] / 2]
print(f"daemon RSS over {sys.argv[3]} min (MALLOC_ARENA_MAX={sys.argv[4] or 'unset'}, LD_PRELOAD={sys.argv[5] or 'unset'}):")
print(f"  start {start:.0f} MiB, after 1 min {minute:.0f} MiB, peak {peak:.0f} MiB, end {last:.0f} MiB")
print(f"  second half: min {min(late):.0f}, max {max(late):.0f} MiB")
for k, v in sorted(runs.items()):
    print(f"  {k:10} runs {v['runs']:4}  failures {v['failures']}")
print(json.dumps({"minutes": int(sys.argv[3]), "malloc_arena_max": sys.argv[4] or None,
                  "ld_preload": sys.argv[5] or None,
                  "rss_mib": {"start": round(start), "after_1_min": round(minute),
                              "peak": round(peak), "end": round(last)},
                  "jobs": runs}, separators=(",", ":")))
PY
