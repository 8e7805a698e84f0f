#!/usr/bin/env bash
# Daemon scale benchmark: one `dr daemon` drives many sources at once for
# MINUTES minutes:
#   - PG_CLUSTERS PostgreSQL 15 servers (pgbench scale 1, a light pgbench
#     load each, WAL archived with `dr wal-push`), a base backup of each
#     every minute;
#   - REDIS_INSTANCES Redis servers (2,000 keys each), a snapshot of each
#     every minute;
#   - `dr expire` every minute.
# The runs are spread over the minute with 6-field cron (seconds first), the
# way an operator would lay out 60 jobs a minute, and run with
# max_concurrent_jobs = 4. It samples the daemon's RSS every 5 s and reads
# each run's start delay (scheduled time → start, `delay_seconds` in the
# daemon's log, also `dr_job_start_delay_seconds`) and outcome from the log.
# Prints RSS over time, start-delay percentiles, runs per job (a job that
# ran less than once a minute starved), throughput, and a JSON line.
#
# Usage (as root on Debian 12):
#   scripts/bench-daemon-scale.sh [MINUTES] [PG_CLUSTERS] [REDIS_INSTANCES]
#   (defaults 60, 10 and 50; at most 10 and 50 keep the one-job-per-second
#   layout)
# DR_BIN=/path/to/dr uses that binary instead of building a release one.
# Everything lives in $DR_BENCH_DIR (default /tmp/dr-bench-scale), recreated
# each run; the servers it starts are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/sbin:/sbin"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export LC_ALL=C
MINUTES=${1:-60}
NPG=${2:-10}
NREDIS=${3:-50}
BENCH=${DR_BENCH_DIR:-/tmp/dr-bench-scale}
PGBIN=/usr/lib/postgresql/15/bin
OS_USER=postgres

# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

[[ $(id -u) -eq 0 ]] || die "run as root: the benchmark runs PostgreSQL and Redis as the '$OS_USER' user"
[[ $MINUTES =~ ^[1-9][0-9]*$ ]] || die "MINUTES must be a positive integer (got '$MINUTES')"
[[ $NPG =~ ^[0-9]+$ && $NPG -le 10 ]] || die "PG_CLUSTERS must be 0 to 10 (got '$NPG')"
[[ $NREDIS =~ ^[0-9]+$ && $NREDIS -le 50 ]] || die "REDIS_INSTANCES must be 0 to 50 (got '$NREDIS')"
((NPG + NREDIS > 0)) || die "nothing to back up: PG_CLUSTERS and REDIS_INSTANCES are both 0"
[[ -x $PGBIN/postgres ]] || die "PostgreSQL 15 is not installed; run scripts/setup.sh first"
for tool in redis-server redis-cli curl python3; do
    command -v "$tool" >/dev/null || die "missing $tool: run scripts/setup.sh first"
done

bench_dr_binary

DAEMON_PID=
LOAD_PIDS=()
cleanup() {
    # Each step tolerates failure: under `set -e` a failed step would end
    # this handler and leave servers running.
    local p
    for p in "${LOAD_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [[ -n $DAEMON_PID ]] && kill "$DAEMON_PID" 2>/dev/null; then wait "$DAEMON_PID" 2>/dev/null || true; fi
    for p in "$BENCH"/redis/*/redis.pid; do
        [[ -f $p ]] || continue
        p=$(cat "$p" 2>/dev/null) || continue
        kill "$p" 2>/dev/null || true
    done
    for d in "$BENCH"/pg/*; do
        if [[ -f $d/postmaster.pid ]]; then as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true; fi
    done
}
cleanup
bench_prepare repo state pg redis
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
read -r -a PORTS <<<"$(free_ports $((NPG + NREDIS + 1)))"
MPORT=${PORTS[0]}

bench_repo_toml
cat >>"$BENCH/dr.toml" <<TOML

[retention]
schedule = "30 * * * * *"
orphan_age = "10m"

[daemon]
listen = "127.0.0.1:$MPORT"
state_dir = "$BENCH/state"
max_concurrent_jobs = 4

[audit]
path = "$BENCH/audit.jsonl"
TOML

# One job a second: PostgreSQL cluster i at second 6i, Redis instances on
# the seconds in between.
second=0
next_second() { # sets $at; not in a subshell, so the count carries on
    while ((second % 6 == 0 && second / 6 < NPG)); do second=$((second + 1)); done
    at=$second
    second=$((second + 1))
}

step "$NPG PostgreSQL 15 servers (pgbench scale 1), archiving with dr wal-push"
for ((i = 0; i < NPG; i++)); do
    port=${PORTS[$((1 + i))]}
    data=$BENCH/pg/pg$i
    as_pg "$PGBIN/initdb" -D "$data" -U postgres --auth=trust --data-checksums >/dev/null
    cat >>"$data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
shared_buffers = 16MB
max_connections = 20
wal_level = replica
archive_mode = on
archive_command = '$DR --config $BENCH/dr.toml wal-push --cluster pg$i %p'
CONF
    as_pg "$PGBIN/pg_ctl" -D "$data" -l "$BENCH/pg/pg$i.log" -w start >/dev/null
    "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -i -q -s 1 postgres >/dev/null 2>&1
    cat >>"$BENCH/dr.toml" <<TOML

[postgres.pg$i]
conninfo = "host=127.0.0.1 port=$port user=postgres dbname=postgres"
data_dir = "$data"
bin_dir = "$PGBIN"
os_user = "$OS_USER"
state_dir = "$BENCH/state"
[postgres.pg$i.retention]
keep_full = 2
[postgres.pg$i.schedule]
backup = "$((6 * i)) * * * * *"
TOML
done

step "$NREDIS Redis servers, 2,000 keys each"
for ((j = 0; j < NREDIS; j++)); do
    port=${PORTS[$((1 + NPG + j))]}
    dir=$BENCH/redis/r$j
    mkdir -p "$dir"
    cat >"$dir/redis.conf" <<CONF
bind 127.0.0.1
port $port
daemonize yes
pidfile $dir/redis.pid
logfile $dir/redis.log
dir $dir
save ""
appendonly no
CONF
    chown -R "$OS_USER:" "$dir"
    next_second
    as_pg redis-server "$dir/redis.conf"
    for _ in $(seq 100); do
        [[ $(redis-cli -p "$port" ping 2>/dev/null || true) == PONG ]] && break
        sleep 0.1
    done
    redis-cli -p "$port" eval 'for i = 1, 2000 do redis.call("SET", "k:" .. i, string.rep("v", 64)) end return 1' 0 >/dev/null
    cat >>"$BENCH/dr.toml" <<TOML

[redis.r$j]
url = "redis://127.0.0.1:$port"
server_bin = "$(command -v redis-server)"
os_user = "$OS_USER"
[redis.r$j.retention]
keep_snapshots = 3
[redis.r$j.schedule]
snapshot = "$at * * * * *"
TOML
done
chown "$OS_USER:" "$BENCH/dr.toml" "$BENCH/identity.txt"
as_pg "$DR" --config "$BENCH/dr.toml" repo init >/dev/null
as_pg "$DR" --config "$BENCH/dr.toml" daemon --check >/dev/null

step "a light pgbench load on each cluster (2 TPS) and dr daemon for $MINUTES minutes"
for ((i = 0; i < NPG; i++)); do
    "$PGBIN/pgbench" -h 127.0.0.1 -p "${PORTS[$((1 + i))]}" -U postgres -c 1 -R 2 \
        -T $((MINUTES * 60 + 60)) -n postgres >"$BENCH/pg/pgbench$i.log" 2>&1 &
    LOAD_PIDS+=($!)
done
bg_as_pg "$DR" --config "$BENCH/dr.toml" --log-json daemon >"$BENCH/daemon.log" 2>&1 &
DAEMON_PID=$!

: >"$BENCH/rss.tsv"
end=$((SECONDS + MINUTES * 60))
next_report=$((SECONDS + 300))
while ((SECONDS < end)); do
    kill -0 "$DAEMON_PID" 2>/dev/null || die "the daemon exited (see $BENCH/daemon.log)"
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$DAEMON_PID/status")
    printf '%d\t%d\n' "$SECONDS" "$rss" >>"$BENCH/rss.tsv"
    if ((SECONDS >= next_report)); then
        printf '  %d min: RSS %d MiB, %d runs finished\n' $(((SECONDS - end + MINUTES * 60) / 60)) \
            $((rss / 1024)) "$(grep -c '"job succeeded"\|"job failed"' "$BENCH/daemon.log" || true)" >&2
        next_report=$((next_report + 300))
    fi
    sleep 5
done
bench_stop_daemon

step "Results"
python3 - "$BENCH" "$MINUTES" "$NPG" "$NREDIS" <<'PY'
import json, statistics, sys
bench, minutes, npg, nredis = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = [tuple(int(x) for x in l.split()) for l in open(f"{bench}/rss.tsv") if l.strip()]
t0 = rows[0][0]
rss = [(t - t0, kb / 1024) for t, kb in rows]
delays, runs, fails, nbytes = [], {}, {}, 0
for line in open(f"{bench}/daemon.log"):
    try:
        f = json.loads(line).get("fields", {})
    except ValueError:
        continue
    job = f.get("job")
    if f.get("message") == "job started":
        delays.append(float(f["delay_seconds"]))
    elif f.get("message") == "job succeeded":
        runs[job] = runs.get(job, 0) + 1
        nbytes += int(f.get("bytes", 0))
    elif f.get("message") == "job failed":
        fails[job] = fails.get(job, 0) + 1
delays.sort()
def pct(p):
    return delays[min(len(delays) - 1, int(p / 100 * len(delays)))] if delays else float("nan")
jobs = npg + nredis + 1
per_job = [runs.get(j, 0) for j in set(runs) | set(fails)]
fewest = min(per_job) if per_job else 0
second_half = [r for t, r in rss if t >= rss[-1][0] / 2]
last10 = [r for t, r in rss if t >= rss[-1][0] - 600]
# Least-squares slope of RSS over the second half, MiB per hour.
pts = [(t, r) for t, r in rss if t >= rss[-1][0] / 2]
mt, mr = statistics.fmean(t for t, _ in pts), statistics.fmean(r for _, r in pts)
den = sum((t - mt) ** 2 for t, _ in pts) or 1
slope = sum((t - mt) * (r - mr) for t, r in pts) / den * 3600
print(f"one dr daemon, {npg} PostgreSQL clusters + {nredis} Redis instances + expire, every minute, {minutes} min")
print("RSS (MiB) by 10 minutes: " + ", ".join(
    f"{t // 60}m {r:.0f}" for t, r in rss if t % 600 < 5))
print(f"  start {rss[0][1]:.0f}, peak {max(r for _, r in rss):.0f}, end {rss[-1][1]:.0f}; "
      f"second half {min(second_half):.0f}-{max(second_half):.0f}, last 10 min max {max(last10):.0f}, "
      f"slope over the second half {slope:+.1f} MiB/h")
print(f"start delay over {len(delays)} runs: p50 {pct(50) * 1000:.0f} ms, p99 {pct(99) * 1000:.0f} ms, "
      f"max {delays[-1] * 1000 if delays else float('nan'):.0f} ms")
print(f"runs: {sum(runs.values())} succeeded, {sum(fails.values())} failed, "
      f"{len(per_job)} of {jobs} jobs ran, fewest runs of one job {fewest} (expected ~{minutes})")
print(f"throughput: {sum(runs.values()) / minutes:.1f} runs/min, {nbytes / minutes / 2**20:.1f} MiB read/min")
print(json.dumps({
    "minutes": minutes, "pg_clusters": npg, "redis_instances": nredis,
    "rss_mib": {"start": round(rss[0][1]), "peak": round(max(r for _, r in rss)),
                "end": round(rss[-1][1]), "second_half_max": round(max(second_half)),
                "slope_mib_per_hour": round(slope, 1)},
    "start_delay_ms": {"p50": round(pct(50) * 1000), "p99": round(pct(99) * 1000),
                       "max": round(delays[-1] * 1000) if delays else None},
    "runs": sum(runs.values()), "failures": fails, "fewest_runs_of_a_job": fewest,
    "jobs_that_ran": len(per_job), "jobs": jobs,
}, separators=(",", ":")))
PY
