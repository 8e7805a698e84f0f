#!/usr/bin/env bash
# Multi-region fan-out benchmark: the same upload (`dr repo selftest`, which
# encodes and writes one object, then reads it back from every region) to one
# S3 region and to two S3 regions, in one run. Fan-out is concurrent, so two
# regions should cost little more than one; prints the write times and the
# ratio, in two settings:
#
#   1. separate links: each region is its own Garage server behind its own
#      rate-limited link (a veth pair into a network namespace this script
#      creates, shaped with tbf), as regions on other hosts are. The upload
#      is bounded by the links, not by the 2 cores dr shares with the servers.
#   2. co-located: both regions are prefixes on one Garage on loopback, with
#      no limit but the CPU that dr and the server share.
#
# Usage (as root): scripts/bench-regions.sh [SIZE_MIB] [LINK_SIZE_MIB]
#   SIZE_MIB       input for the co-located runs (default 1024)
#   LINK_SIZE_MIB  input for the separate-link runs (default 512)
# Environment: RUNS (default 3; the best run of each side counts),
# LINK_MBIT (default 400: each link's rate, both directions).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
LINK_SIZE_MIB=${2:-512}
RUNS=${RUNS:-3}
LINK_MBIT=${LINK_MBIT:-400}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"
die() { echo "error: $*" >&2; exit 1; }
for v in SIZE_MIB LINK_SIZE_MIB RUNS LINK_MBIT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $(id -u) -eq 0 ]] || die "run as root: the separate-link runs create a network namespace and veth pairs"

echo "== building dr (release)"
cargo build --release --locked --quiet
DR="$CARGO_TARGET_DIR/release/dr"

WORK=$(mktemp -d /tmp/dr-bench-regions.XXXXXX)
chmod 755 "$WORK"
NS=dr-bench-$$
# Two /24s for the links; refused if this machine already routes them.
NET=(10.201.1 10.201.2)
ENVS=("$WORK/env" "$WORK/env-link1" "$WORK/env-link2")
cleanup() {
    local e
    for e in "${ENVS[@]}"; do
        [[ -d $e ]] && DR_TESTENV_DIR=$e bash scripts/testenv.sh stop >/dev/null 2>&1 || true
    done
    ip netns del "$NS" 2>/dev/null || true # takes both veth pairs with it
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

"$DR" keygen --output "$WORK/id.txt" >/dev/null
RCPT=$(grep -o 'age1[0-9a-z]*' "$WORK/id.txt" | head -1)
region() { # region NAME PREFIX ENV_FILE
    (
        # shellcheck disable=SC1090
        source "$3"
        cat <<TOML
[[region]]
name = "$1"
type = "s3"
endpoint = "$DR_TEST_S3_ENDPOINT"
bucket = "$DR_TEST_S3_BUCKET"
prefix = "$2"
s3_region = "$DR_TEST_S3_REGION"
path_style = true
access_key_id = "$DR_TEST_S3_ACCESS_KEY_ID"
secret_access_key = "$DR_TEST_S3_SECRET_ACCESS_KEY"
TOML
    )
}
head_toml() {
    printf '[repository]\nrecipients = ["%s"]\nidentity_file = "%s"\ncompression_level = 3\nmin_regions = %s\n\n' \
        "$RCPT" "$WORK/id.txt" "$1"
}
make_input() { # make_input PATH MIB: alternating 1 MiB random / 1 MiB text
    python3 - "$1" "$2" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
line = b"1234 INSERT INTO accounts VALUES (42, 'compressible text', now());\n"
text = (line * ((1 << 20) // len(line) + 1))[: 1 << 20]
with open(path, "wb") as f:
    for i in range(mib):
        f.write(os.urandom(1 << 20) if i % 2 == 0 else text)
PY
}
write_seconds() { python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['selftest']['write_seconds'])" "$1"; }
best() { printf '%s\n' "$@" | sort -g | head -1; }
# CPU seconds the S3 servers used: on a small machine the servers' own work
# (hashing and storing every copy) competes with dr for the same cores.
server_cpu() { # server_cpu ENV_DIR...
    local e t=0
    for e in "$@"; do
        t=$(awk -v t="$t" '{printf "%.2f\n", t + ($14 + $15) / 100}' "/proc/$(head -n1 "$e/garage/garage.pid")/stat")
    done
    echo "$t"
}
# compare LABEL INPUT ONE_CFG TWO_CFG ENVS...: RUNS alternating runs, then the
# best of each side and the ratio.
compare() {
    local label=$1 input=$2 one=$3 two=$4 i side cfg before after
    shift 4
    local -a ONE=() TWO=()
    cat "$input" >/dev/null
    for i in $(seq 1 "$RUNS"); do
        echo "== $label: run $i/$RUNS"
        for side in one two; do
            [[ $side == one ]] && cfg=$one || cfg=$two
            before=$(server_cpu "$@")
            /usr/bin/time -f "%U %S" -o "$WORK/cpu" "${RUN_DR[@]}" "$DR" --config "$cfg" --json repo selftest --file "$input" >"$WORK/$side.json"
            after=$(server_cpu "$@")
            echo "   $side region(s): write $(write_seconds "$WORK/$side.json") s; dr CPU $(awk '{print $1 + $2}' "$WORK/cpu") s (write + read-back); S3 server CPU $(python3 -c "print(round($after - $before, 2))") s"
            if [[ $side == one ]]; then ONE+=("$(write_seconds "$WORK/$side.json")"); else TWO+=("$(write_seconds "$WORK/$side.json")"); fi
        done
    done
    echo "one region runs (s): ${ONE[*]}"
    echo "two region runs (s): ${TWO[*]}"
    python3 - "$(best "${ONE[@]}")" "$(best "${TWO[@]}")" "$(($(stat -c %s "$input") >> 20))" "$label" <<'PY'
import sys
o, t, mib, label = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print(f"== results, {label} ({mib} MiB, best of runs)")
print(f"one region : {o:6.2f} s  ({mib / o:6.1f} MiB/s)")
print(f"two regions: {t:6.2f} s  ({mib / t:6.1f} MiB/s per region)")
print(f"two / one  : {t / o:4.2f}x")
PY
}

echo "== separate links: namespace $NS, two veth pairs at ${LINK_MBIT} Mbit/s each"
for n in "${NET[@]}"; do
    [[ -z $(ip -4 route show to match "$n.1" | grep -v '^default') ]] ||
        die "$n.0/24 is already routed on this machine; the benchmark needs it for its links"
done
ip netns add "$NS"
ip -n "$NS" link set lo up
for i in 0 1; do
    host=drb$$h$i peer=drb$$n$i
    ip link add "$host" type veth peer name "$peer" netns "$NS"
    ip addr add "${NET[i]}.1/24" dev "$host"
    ip link set "$host" up
    ip -n "$NS" addr add "${NET[i]}.2/24" dev "$peer"
    ip -n "$NS" link set "$peer" up
    # Uploads leave through the namespace's end, read-backs through the host's.
    tc qdisc add dev "$host" root tbf rate "${LINK_MBIT}mbit" burst 256kb latency 200ms
    tc -n "$NS" qdisc add dev "$peer" root tbf rate "${LINK_MBIT}mbit" burst 256kb latency 200ms
done
for i in 0 1; do
    echo "== starting Garage $((i + 1)) on ${NET[i]}.1 (scripts/testenv.sh)"
    DR_TESTENV_DIR=${ENVS[i + 1]} DR_TESTENV_GARAGE_ADDR=${NET[i]}.1 bash scripts/testenv.sh start >/dev/null
done
{ head_toml 1; region a bench-one "${ENVS[1]}/env.sh"; } >"$WORK/link-one.toml"
{ head_toml 2; region a bench-two "${ENVS[1]}/env.sh"; region b bench-two "${ENVS[2]}/env.sh"; } >"$WORK/link-two.toml"
RUN_DR=(ip netns exec "$NS") # dr runs in the namespace, so its traffic takes the links
for c in link-one link-two; do "${RUN_DR[@]}" "$DR" --config "$WORK/$c.toml" repo init >/dev/null; done
make_input "$WORK/link-input.bin" "$LINK_SIZE_MIB"
compare "separate links at ${LINK_MBIT} Mbit/s" "$WORK/link-input.bin" "$WORK/link-one.toml" "$WORK/link-two.toml" "${ENVS[1]}" "${ENVS[2]}"
for e in "${ENVS[1]}" "${ENVS[2]}"; do DR_TESTENV_DIR=$e bash scripts/testenv.sh stop >/dev/null 2>&1; done
rm -f "$WORK/link-input.bin"

echo "== co-located: one Garage on loopback (scripts/testenv.sh)"
DR_TESTENV_DIR=${ENVS[0]} bash scripts/testenv.sh start >/dev/null
{ head_toml 1; region a bench-one "${ENVS[0]}/env.sh"; } >"$WORK/one.toml"
{ head_toml 2; region a bench-two-a "${ENVS[0]}/env.sh"; region b bench-two-b "${ENVS[0]}/env.sh"; } >"$WORK/two.toml"
RUN_DR=()
for c in one two; do "$DR" --config "$WORK/$c.toml" repo init >/dev/null; done
make_input "$WORK/input.bin" "$SIZE_MIB"
compare "co-located on loopback" "$WORK/input.bin" "$WORK/one.toml" "$WORK/two.toml" "${ENVS[0]}"
