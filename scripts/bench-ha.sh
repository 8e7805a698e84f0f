#!/usr/bin/env bash
# Automatic failover benchmark: three PostgreSQL 15 members (a primary and two
# standbys made with pg_basebackup, synchronous_standby_names = 'ANY 1 (a, b,
# c)'), one `dr daemon` per member, coordinated through an etcd of the
# script's own, with ttl = 3s and loop_wait = 1s.
#
#   failover:   SIGKILL the leader's postmaster and its daemon together, then
#               time until a standby commits a write (a synchronous commit, so
#               a standby of the new primary has acknowledged it too). The
#               killed member's daemon is then started again: it rewinds its
#               server and rejoins as a standby before the next run, which
#               kills the new leader.
#   switchover: `dr ha switchover --to <a standby>`, timed from the request
#               to the first write the target commits.
#
# Each is repeated RUNS times; median, min and max are printed.
#
# Usage (as root on Debian 12): scripts/bench-ha.sh [RUNS]   (default 10)
# Everything lives in $DR_BENCH_DIR (default /tmp/dr-bench-ha), recreated;
# every server and daemon it starts is stopped on exit. DR_BENCH_PROFILE=debug
# times a debug build instead of building a release one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/sbin:/sbin"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export LC_ALL=C
RUNS=${1:-10}
BENCH=${DR_BENCH_DIR:-/tmp/dr-bench-ha}
PROFILE=${DR_BENCH_PROFILE:-release}
PGBIN=/usr/lib/postgresql/15/bin
ETCD=${DR_TEST_ETCD_BIN:-/usr/bin/etcd}
OS_USER=postgres
MEMBERS=(a b c)

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
log() { printf '%s\n' "$*" >&2; }
as_pg() { (cd / && runuser -u "$OS_USER" -- "$@"); }

[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL runs as $OS_USER through runuser)"
[[ -x $PGBIN/pg_ctl ]] || die "PostgreSQL 15 is not installed; run scripts/setup.sh"
[[ -x $ETCD ]] || die "etcd is not installed at $ETCD; run scripts/setup.sh (Debian package etcd-server)"
command -v jq >/dev/null || die "jq is needed; apt-get install jq"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

declare -A PORT DAEMON
ETCD_PID=

stop_all() {
    local m
    for m in "${MEMBERS[@]}"; do
        [[ -n ${DAEMON[$m]:-} ]] && kill -9 "${DAEMON[$m]}" 2>/dev/null || true
    done
    for m in "${MEMBERS[@]}"; do
        [[ -f $BENCH/$m/postmaster.pid ]] &&
            as_pg "$PGBIN/pg_ctl" -D "$BENCH/$m" -m immediate -w stop >/dev/null 2>&1 || true
    done
    [[ -n $ETCD_PID ]] && kill "$ETCD_PID" 2>/dev/null || true
}
trap stop_all EXIT

if [[ $PROFILE == release ]]; then
    log "building dr (release)…"
    cargo build --release --locked --quiet
else
    cargo build --locked --quiet
fi
rm -rf -- "$BENCH"
mkdir -p "$BENCH/results"
chown "$OS_USER:" "$BENCH"
DR=$BENCH/dr-bin
cp "$CARGO_TARGET_DIR/$PROFILE/dr" "$DR"

# etcd, one member on loopback.
EP=$(free_port) EPEER=$(free_port)
"$ETCD" --name bench --data-dir "$BENCH/etcd" \
    --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
    --listen-peer-urls "http://127.0.0.1:$EPEER" --initial-advertise-peer-urls "http://127.0.0.1:$EPEER" \
    --initial-cluster "bench=http://127.0.0.1:$EPEER" >"$BENCH/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 1 200); do
    [[ $(curl -s --max-time 1 "http://127.0.0.1:$EP/health" || true) == *'"health":"true"'* ]] && break
    sleep 0.05
done
[[ $(curl -s --max-time 1 "http://127.0.0.1:$EP/health" || true) == *'"health":"true"'* ]] ||
    die "etcd did not start; see $BENCH/etcd.log"

for m in "${MEMBERS[@]}"; do PORT[$m]=$(free_port); done

# The servers: wal_log_hints and wal_keep_size for pg_rewind, cluster_name as the
# application_name synchronous_standby_names lists, and a fast reconnect of
# repointed standbys (README.md).
as_pg "$PGBIN/initdb" -D "$BENCH/a" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
cat >>"$BENCH/a/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_wal_senders = 10
wal_log_hints = on
wal_keep_size = '256MB'
wal_retrieve_retry_interval = '200ms'
EOF
own_conf() { printf "port = %s\ncluster_name = '%s'\n" "${PORT[$1]}" "$1" >>"$BENCH/$1/postgresql.conf"; }
own_conf a
as_pg "$PGBIN/pg_ctl" -D "$BENCH/a" -l "$BENCH/a.log" -w start >/dev/null
as_pg "$PGBIN/psql" -h 127.0.0.1 -p "${PORT[a]}" -U postgres -Xq -c "CREATE TABLE bench (at timestamptz)"
# Synchronous from here on (a commit before any standby would wait forever);
# the standbys copy the setting, so it holds whoever leads.
echo "synchronous_standby_names = 'ANY 1 (a, b, c)'" >>"$BENCH/a/postgresql.conf"
as_pg "$PGBIN/pg_ctl" -D "$BENCH/a" reload >/dev/null
for m in b c; do
    as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "${PORT[a]}" -U postgres -D "$BENCH/$m" -R -X stream -c fast
    own_conf "$m"
    as_pg "$PGBIN/pg_ctl" -D "$BENCH/$m" -l "$BENCH/$m.log" -w start >/dev/null
done

{
    printf '[repository]\nrecipients = ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"]\n'
    printf '[[region]]\nname = "local"\ntype = "fs"\npath = "%s/repo"\n' "$BENCH"
    printf '[audit]\npath = "%s/audit.jsonl"\n' "$BENCH"
    printf '[ha]\nendpoints = ["http://127.0.0.1:%s"]\nprefix = "/bench"\nttl = "3s"\nloop_wait = "1s"\n' "$EP"
    for m in "${MEMBERS[@]}"; do
        printf '[ha.postgres.main.member.%s]\n' "$m"
        printf 'conninfo = "host=127.0.0.1 port=%s user=postgres dbname=postgres sslmode=disable"\n' "${PORT[$m]}"
        printf 'data_dir = "%s/%s"\nbin_dir = "%s"\nos_user = "%s"\n' "$BENCH" "$m" "$PGBIN" "$OS_USER"
    done
} >"$BENCH/operator.toml"
for m in "${MEMBERS[@]}"; do
    {
        printf '[daemon]\nlisten = "127.0.0.1:%s"\nstate_dir = "%s/state-%s"\n' "$(free_port)" "$BENCH" "$m"
        cat "$BENCH/operator.toml"
    } >"$BENCH/$m.toml"
done

start_daemon() {
    "$DR" --config "$BENCH/$1.toml" -v daemon --member "$1" >>"$BENCH/daemon-$1.log" 2>&1 &
    DAEMON[$1]=$!
}

status() { "$DR" --config "$BENCH/operator.toml" --json ha status 2>/dev/null || echo '{}'; }

# Waits until one member leads and the two others are standbys streaming
# from it; prints the leader.
wait_settled() {
    local s leader n
    for _ in $(seq 1 600); do
        s=$(status)
        leader=$(jq -r '.leader // empty' <<<"$s")
        if [[ -n $leader ]] &&
            [[ $(jq -r --arg l "$leader" '[.members[] | select(.healthy and
                  ((.name == $l and .role == "primary") or (.name != $l and .role == "standby")))] | length' <<<"$s") == 3 ]]; then
            n=$(as_pg "$PGBIN/psql" -h 127.0.0.1 -p "${PORT[$leader]}" -U postgres -XAtq \
                -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" 2>/dev/null || true)
            if [[ $n == 2 ]]; then
                echo "$leader"
                return
            fi
        fi
        sleep 0.1
    done
    die "the cluster did not settle within 60s; see $BENCH/daemon-*.log"
}

# Commits a row on member $1; fails at once when it cannot.
write_on() {
    as_pg "$PGBIN/psql" -h 127.0.0.1 -p "${PORT[$1]}" -U postgres -XAtq -v ON_ERROR_STOP=1 \
        -c "INSERT INTO bench VALUES (now())" "connect_timeout=1" >/dev/null 2>&1
}

# Seconds since $1 (an $EPOCHREALTIME) until one of the members $2… commits
# a write; prints "seconds member".
until_written() {
    local t0=$1 m
    shift
    for _ in $(seq 1 3000); do
        for m in "$@"; do
            if write_on "$m"; then
                awk -v a="$t0" -v b="$EPOCHREALTIME" -v m="$m" 'BEGIN { printf "%.3f %s\n", b - a, m }'
                return
            fi
        done
        sleep 0.01
    done
    die "no member accepted a write within 60s; see $BENCH/daemon-*.log"
}

summary() { # summary NAME FILE
    sort -n "$2" | awk -v name="$1" '{ v[NR] = $1 } END {
        med = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%s over %d runs: median %.2f s (min %.2f s, max %.2f s)\n", name, NR, med, v[1], v[NR] }'
}

for m in "${MEMBERS[@]}"; do start_daemon "$m"; done
leader=$(wait_settled)
log "settled: $leader leads"

: >"$BENCH/results/failover.txt"
for i in $(seq 1 "$RUNS"); do
    others=()
    for m in "${MEMBERS[@]}"; do [[ $m != "$leader" ]] && others+=("$m"); done
    pm=$(head -1 "$BENCH/$leader/postmaster.pid")
    t0=$EPOCHREALTIME
    kill -9 "${DAEMON[$leader]}" "$pm"
    secs=
    read -r secs winner < <(until_written "$t0" "${others[@]}") || true
    [[ -n ${secs:-} ]] || die "run $i: no standby committed a write; see $BENCH/daemon-*.log"
    log "failover run $i: $leader killed → $winner committed a write after ${secs}s"
    echo "$secs" >>"$BENCH/results/failover.txt"
    wait "${DAEMON[$leader]}" 2>/dev/null || true
    # The killed member comes back as a standby of the new leader.
    start_daemon "$leader"
    leader=$(wait_settled)
    [[ $leader == "$winner" ]] || die "$leader leads after the rejoin, expected $winner"
done

: >"$BENCH/results/switchover.txt"
for i in $(seq 1 "$RUNS"); do
    others=()
    for m in "${MEMBERS[@]}"; do [[ $m != "$leader" ]] && others+=("$m"); done
    to=${others[$((i % 2))]}
    t0=$EPOCHREALTIME
    "$DR" --config "$BENCH/operator.toml" --json ha switchover --to "$to" >"$BENCH/results/switchover-$i.json" &
    sw=$!
    secs=
    read -r secs _ < <(until_written "$t0" "$to") || true
    [[ -n ${secs:-} ]] || die "switchover run $i: $to committed no write; see $BENCH/daemon-*.log"
    wait "$sw" || die "dr ha switchover --to $to failed; see $BENCH/daemon-*.log"
    log "switchover run $i: $leader → $to committed a write after ${secs}s (dr reports RTO $(jq .rto_seconds "$BENCH/results/switchover-$i.json") s)"
    echo "$secs" >>"$BENCH/results/switchover.txt"
    leader=$(wait_settled)
    [[ $leader == "$to" ]] || die "$leader leads after the switchover to $to"
done

summary "failover (SIGKILL of the leader's postmaster and daemon → first commit on the new primary)" \
    "$BENCH/results/failover.txt"
summary "switchover (dr ha switchover → first commit on the target)" "$BENCH/results/switchover.txt"
