#!/usr/bin/env bash
# Redis snapshot benchmark: `dr backup redis` versus the usual pipeline
# `redis-cli --rdb FILE && zstd -3 -T0 FILE | age -r … > out`, on the same
# dataset (KEYS keys of six types), in one run, with the server both in
# disk-based and in diskless replication mode. Prints wall time, peak RSS and
# stored size for both sides and the time ratio; then the time of one
# snapshot at the server's default diskless delay (5 s) for `redis-cli --rdb`
# and for dr with `sync = "auto"` and `sync = "diskless"`.
#
# Usage: scripts/bench-redis.sh [KEYS]        (default 3000000)
# Environment: RUNS (default 3; the best run of each side counts); DR_BIN
# to time that dr binary instead of building a release one.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${1:-3000000}
RUNS=${RUNS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export PATH="$HOME/.cargo/bin:$PATH"
OS_USER=${DR_TEST_OS_USER:-postgres}

for tool in redis-server redis-cli zstd age /usr/bin/time python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/setup.sh" >&2; exit 1; }
done

if [[ -n ${DR_BIN:-} ]]; then
    DR=$DR_BIN
else
    echo "== building dr (release)"
    cargo build --release --locked --quiet
    DR="$CARGO_TARGET_DIR/release/dr"
fi
[[ -x $DR ]] || { echo "no dr binary at $DR" >&2; exit 1; }

WORK=$(mktemp -d /tmp/dr-bench-redis.XXXXXX)
chmod 755 "$WORK"
REDIS_PID=
cleanup() {
    if [[ -n $REDIS_PID ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
        kill "$REDIS_PID"
        while kill -0 "$REDIS_PID" 2>/dev/null; do sleep 0.1; done
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

as_user() {
    if [[ $(id -u) == 0 ]]; then runuser -u "$OS_USER" -- "$@"; else "$@"; fi
}

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$WORK/redis"
cat >"$WORK/redis/redis.conf" <<EOF
bind 127.0.0.1
port $PORT
daemonize yes
pidfile $WORK/redis/redis.pid
logfile $WORK/redis/redis.log
dir $WORK/redis
save ""
appendonly no
repl-diskless-sync-delay 0
EOF
[[ $(id -u) == 0 ]] && chown -R "$OS_USER:" "$WORK/redis"
as_user redis-server "$WORK/redis/redis.conf"
for _ in $(seq 1 100); do
    [[ $(redis-cli -p "$PORT" ping 2>/dev/null || true) == PONG ]] && break
    sleep 0.1
done
REDIS_PID=$(cat "$WORK/redis/redis.pid")
echo "== redis-server $(redis-server --version | grep -o 'v=[0-9.]*') on 127.0.0.1:$PORT (pid $REDIS_PID)"

echo "== loading $KEYS keys (strings, hashes, lists, sets, sorted sets, streams)"
LUA='
local from, to = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = from, to do
    local k = "k:" .. i
    local t = i % 6
    if t == 0 then redis.call("SET", k, "value-" .. i .. "-" .. string.rep("x", i % 50))
    elseif t == 1 then redis.call("HSET", k, "a", i, "b", "x" .. i, "c", i * 3)
    elseif t == 2 then redis.call("RPUSH", k, i, i + 1, "tail-" .. i)
    elseif t == 3 then redis.call("SADD", k, "m" .. i, "n" .. i, "o")
    elseif t == 4 then redis.call("ZADD", k, i, "a" .. i, i / 7, "b", 0.5, "c")
    else redis.call("XADD", k, "1-1", "f", i) end
end
return to'
for ((from = 0; from < KEYS; from += 100000)); do
    to=$((from + 100000 > KEYS ? KEYS - 1 : from + 99999))
    redis-cli -p "$PORT" eval "$LUA" 0 "$from" "$to" >/dev/null
done
echo "   DBSIZE $(redis-cli -p "$PORT" dbsize), used_memory $(redis-cli -p "$PORT" info memory | grep '^used_memory_human' | cut -d: -f2 | tr -d '\r')"

"$DR" keygen --output "$WORK/id.txt" >/dev/null
RCPT=$(grep -o 'age1[0-9a-z]*' "$WORK/id.txt" | head -1)
cat >"$WORK/dr.toml" <<TOML
[repository]
recipients = ["$RCPT"]
compression_level = 3

[audit]
path = "$WORK/audit.jsonl"

[[region]]
name = "local"
type = "fs"
path = "$WORK/repo"

[redis.bench]
url = "redis://127.0.0.1:$PORT"
TOML
"$DR" --config "$WORK/dr.toml" repo init >/dev/null

best() { printf '%s\n' "$@" | sort -g | head -1; }
max_rss() { sort -n "$@" | tail -1; }

RESULTS=()
for mode in disk diskless; do
    if [[ $mode == disk ]]; then
        redis-cli -p "$PORT" config set repl-diskless-sync no >/dev/null
    else
        redis-cli -p "$PORT" config set repl-diskless-sync yes >/dev/null
    fi
    PIPE_T=() DR_T=() PIPE_RSS=0 DR_RSS=0
    for i in $(seq 1 "$RUNS"); do
        echo "== [$mode] run $i/$RUNS: redis-cli --rdb + zstd -3 -T0 | age | dd conv=fsync"
        rm -f "$WORK/dump.rdb" "$WORK/out.age"
        start=$(date +%s.%N)
        /usr/bin/time -f %M -o "$WORK/rss.cli" redis-cli -p "$PORT" --rdb "$WORK/dump.rdb" >/dev/null 2>&1
        /usr/bin/time -f %M -o "$WORK/rss.zstd" zstd -3 -T0 -q -c "$WORK/dump.rdb" |
            /usr/bin/time -f %M -o "$WORK/rss.age" age -r "$RCPT" |
            dd of="$WORK/out.age" bs=1M conv=fsync status=none
        end=$(date +%s.%N)
        PIPE_T+=("$(python3 -c "print($end - $start)")")
        PIPE_SIZE=$(stat -c %s "$WORK/out.age")
        RDB_SIZE=$(stat -c %s "$WORK/dump.rdb")
        r=$(max_rss "$WORK/rss.cli" "$WORK/rss.zstd" "$WORK/rss.age")
        ((r > PIPE_RSS)) && PIPE_RSS=$r
        rm -f "$WORK/dump.rdb" "$WORK/out.age"

        echo "== [$mode] run $i/$RUNS: dr backup redis"
        start=$(date +%s.%N)
        /usr/bin/time -f %M -o "$WORK/rss.dr" "$DR" --config "$WORK/dr.toml" --json backup redis >"$WORK/dr.json"
        end=$(date +%s.%N)
        DR_T+=("$(python3 -c "print($end - $start)")")
        DR_SIZE=$(python3 -c "import json;print(json.load(open('$WORK/dr.json'))['snapshot']['stored_size'])")
        python3 -c "import json;s=json.load(open('$WORK/dr.json'))['snapshot'];print(f\"   dr: server took {s['wait_seconds']:.2f} s to start sending; transfer {s['throughput']/1e6:.0f} MB/s\")"
        r=$(cat "$WORK/rss.dr")
        ((r > DR_RSS)) && DR_RSS=$r
    done
    P=$(best "${PIPE_T[@]}")
    D=$(best "${DR_T[@]}")
    echo "   pipeline runs (s): ${PIPE_T[*]}"
    echo "   dr runs (s):       ${DR_T[*]}"
    RESULTS+=("$(python3 - "$mode" "$P" "$D" "$PIPE_RSS" "$DR_RSS" "$PIPE_SIZE" "$DR_SIZE" "$RDB_SIZE" <<'PY'
import sys
mode, p, d, prss, drss, psize, dsize, rdb = sys.argv[1:]
p, d = float(p), float(d)
mib = 1 << 20
print(f"{mode:9} | RDB {int(rdb)/mib:7.1f} MiB | pipeline {p:6.2f} s, {int(prss)/1024:6.1f} MiB RSS, {int(psize)/mib:6.1f} MiB stored"
      f" | dr {d:6.2f} s, {int(drss)/1024:6.1f} MiB RSS, {int(dsize)/mib:6.1f} MiB stored | dr speed {p/d:4.2f}x")
PY
)")
done

# Latency at the server's default diskless settings (diskless, 5 s delay
# for more replicas): redis-cli --rdb announces diskless support and waits;
# dr's sync = "auto" asks for a disk-based sync instead.
redis-cli -p "$PORT" config set repl-diskless-sync yes >/dev/null
redis-cli -p "$PORT" config set repl-diskless-sync-delay 5 >/dev/null
for m in auto diskless; do
    sed "s/^\[redis.bench\]\$/[redis.bench]\nsync = \"$m\"/" "$WORK/dr.toml" >"$WORK/dr-$m.toml"
done
LAT=()
for side in redis-cli dr-auto dr-diskless; do
    T=()
    for i in $(seq 1 "$RUNS"); do
        echo "== [delay 5] run $i/$RUNS: $side"
        rm -f "$WORK/dump.rdb"
        start=$(date +%s.%N)
        case $side in
        redis-cli) redis-cli -p "$PORT" --rdb "$WORK/dump.rdb" >/dev/null 2>&1 ;;
        dr-auto) "$DR" --config "$WORK/dr-auto.toml" --json backup redis >"$WORK/dr.json" ;;
        dr-diskless) "$DR" --config "$WORK/dr-diskless.toml" --json backup redis >"$WORK/dr.json" ;;
        esac
        end=$(date +%s.%N)
        T+=("$(python3 -c "print($end - $start)")")
    done
    LAT+=("$(printf '%-12s best %6.2f s   runs (s): %s' "$side" "$(best "${T[@]}")" "${T[*]}")")
done
rm -f "$WORK/dump.rdb"

echo
echo "== results ($KEYS keys, best of $RUNS; ratio = pipeline time / dr time)"
printf '%s\n' "${RESULTS[@]}"
echo
echo "== snapshot time at repl-diskless-sync-delay 5 (redis-cli --rdb alone, no compression; dr stores encrypted)"
printf '%s\n' "${LAT[@]}"
