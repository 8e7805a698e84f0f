#!/usr/bin/env bash
# Failover benchmark: runs playbooks/pg-promote-standby.toml RUNS times, each
# time on a fresh PostgreSQL 15 primary with two streaming standbys (made with
# pg_basebackup -R) on loopback, and reports the failover RTO (start of the
# run to the first write the promoted standby accepts; detection time is not
# part of it) and the time spent in each step.
#
# Usage (as root on Debian 12): scripts/bench-failover.sh [RUNS]   (default 10)
# Everything lives in $DR_BENCH_DIR (default /tmp/dr-bench-failover),
# recreated each run; every server it starts is stopped on exit.
#
# Server settings are PostgreSQL's defaults (fsync on, synchronous_commit on)
# except: loopback only, max_wal_senders = 10, and
# wal_retrieve_retry_interval = 200ms on the standbys, which README.md
# recommends so that a repointed standby reconnects at once (it affects the
# "repoint standby2" step, not the RTO).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/sbin:/sbin"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export LC_ALL=C
RUNS=${1:-10}
BENCH=${DR_BENCH_DIR:-/tmp/dr-bench-failover}
PGBIN=/usr/lib/postgresql/15/bin
OS_USER=postgres

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
as_pg() { (cd / && runuser -u "$OS_USER" -- "$@"); }

[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL runs as $OS_USER through runuser)"
[[ -x $PGBIN/pg_ctl ]] || die "PostgreSQL 15 is not installed; run scripts/setup.sh"
command -v jq >/dev/null || die "jq is needed; apt-get install jq"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_all() {
    for d in "$BENCH"/run/*/; do
        [[ -f $d/postmaster.pid ]] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
    done
}
trap stop_all EXIT

printf 'building dr (release)…\n' >&2
cargo build --release --locked --quiet
rm -rf -- "$BENCH"
mkdir -p "$BENCH/results"
DR=$BENCH/dr
cp "$CARGO_TARGET_DIR/release/dr" "$DR"

for i in $(seq 1 "$RUNS"); do
    stop_all
    rm -rf -- "$BENCH/run"
    mkdir -p "$BENCH/run"
    chown "$OS_USER:" "$BENCH/run"
    P=$(free_port) S1=$(free_port) S2=$(free_port)
    as_pg "$PGBIN/initdb" -D "$BENCH/run/primary" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
    cat >>"$BENCH/run/primary/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_wal_senders = 10
wal_retrieve_retry_interval = '200ms'
port = $P
EOF
    as_pg "$PGBIN/pg_ctl" -D "$BENCH/run/primary" -l "$BENCH/run/primary.log" -w start >/dev/null
    as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$P" -U postgres -Xq \
        -c "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100000) g"
    for s in standby1:$S1 standby2:$S2; do
        name=${s%:*} port=${s#*:}
        as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$P" -U postgres -D "$BENCH/run/$name" -R -X stream -c fast
        echo "port = $port" >>"$BENCH/run/$name/postgresql.conf"
        as_pg "$PGBIN/pg_ctl" -D "$BENCH/run/$name" -l "$BENCH/run/$name.log" -w start >/dev/null
    done
    # Both standbys streaming before the clock starts.
    for port in "$S1" "$S2"; do
        for _ in $(seq 1 200); do
            st=$(as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U postgres -XAtq \
                -c "SELECT status FROM pg_stat_wal_receiver" 2>/dev/null || true)
            [[ $st == streaming ]] && break
            sleep 0.05
        done
        [[ $st == streaming ]] || die "standby on $port is not streaming"
    done
    {
        printf '[repository]\nrecipients = ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"]\n'
        printf '[[region]]\nname = "local"\ntype = "fs"\npath = "%s/repo"\n' "$BENCH"
        printf '[audit]\npath = "%s/audit.jsonl"\n' "$BENCH"
        printf '[env.bench]\nstate_dir = "%s/state"\n' "$BENCH"
        for s in primary:$P standby1:$S1 standby2:$S2; do
            name=${s%:*} port=${s#*:}
            printf '[env.bench.postgres.%s]\nconninfo = "host=127.0.0.1 port=%s user=postgres dbname=postgres sslmode=disable"\n' "$name" "$port"
            printf 'data_dir = "%s/run/%s"\nbin_dir = "%s"\nos_user = "%s"\n' "$BENCH" "$name" "$PGBIN" "$OS_USER"
        done
    } >"$BENCH/dr.toml"
    out=$BENCH/results/run-$i.json
    if ! "$DR" --config "$BENCH/dr.toml" failover playbooks/pg-promote-standby.toml \
        --env bench --yes --json >"$out" 2>"$BENCH/results/run-$i.log"; then
        cat "$BENCH/results/run-$i.log" >&2
        die "run $i failed"
    fi
    printf 'run %2d: RTO %.3f s, total %.3f s\n' "$i" \
        "$(jq .failover.rto_seconds "$out")" "$(jq .failover.total_seconds "$out")" >&2
done

# Medians over the runs: RTO, total, and each step (share of the total).
jq -s '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor]
                     else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  {
    runs: length,
    rto_median: (map(.failover.rto_seconds) | median),
    rto_min: (map(.failover.rto_seconds) | min),
    rto_max: (map(.failover.rto_seconds) | max),
    total_median: (map(.failover.total_seconds) | median),
    steps: [range(0; .[0].failover.steps | length) as $i
            | { name: .[0].failover.steps[$i].name,
                median: (map(.failover.steps[$i].seconds) | median) }]
  }' "$BENCH"/results/run-*.json >"$BENCH/summary.json"

jq -r '
  "| step | median | share of total |",
  "|---|---:|---:|",
  (.total_median as $t | .steps[]
     | "| \(.name) | \(.median * 1000 | round) ms | \(.median / $t * 100 | round) % |"),
  "| **total** | \(.total_median * 1000 | round) ms | 100 % |",
  "",
  "Failover RTO over \(.runs) runs: median **\(.rto_median * 1000 | round) ms** (min \(.rto_min * 1000 | round) ms, max \(.rto_max * 1000 | round) ms)"
' "$BENCH/summary.json"
