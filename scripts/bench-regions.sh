#!/usr/bin/env bash
# Multi-region fan-out benchmark: the same upload (`dr repo selftest`, which
# encodes and writes one object, then reads it back from every region) to one
# S3 region and to two S3 regions, in one run. Fan-out is concurrent, so two
# regions should cost little more than one; prints the write times and the
# ratio. Regions are prefixes on the test environment's Garage server.
#
# Usage: scripts/bench-regions.sh [SIZE_MIB]      (default 1024)
# Environment: RUNS (default 3; the best run of each side counts).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
RUNS=${RUNS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export PATH="$HOME/.cargo/bin:$PATH"

echo "== building dr (release)"
cargo build --release --locked --quiet
DR="$CARGO_TARGET_DIR/release/dr"

WORK=$(mktemp -d /tmp/dr-bench-regions.XXXXXX)
chmod 755 "$WORK"
export DR_TESTENV_DIR=$WORK/env
cleanup() {
    bash scripts/testenv.sh stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
echo "== starting Garage (scripts/testenv.sh)"
bash scripts/testenv.sh start >/dev/null
# shellcheck disable=SC1091
source "$DR_TESTENV_DIR/env.sh"

"$DR" keygen --output "$WORK/id.txt" >/dev/null
RCPT=$(grep -o 'age1[0-9a-z]*' "$WORK/id.txt" | head -1)
region() { # region NAME PREFIX
    cat <<TOML
[[region]]
name = "$1"
type = "s3"
endpoint = "$DR_TEST_S3_ENDPOINT"
bucket = "$DR_TEST_S3_BUCKET"
prefix = "$2"
s3_region = "$DR_TEST_S3_REGION"
path_style = true
access_key_id_env = "DR_TEST_S3_ACCESS_KEY_ID"
secret_access_key_env = "DR_TEST_S3_SECRET_ACCESS_KEY"
TOML
}
head_toml() {
    printf '[repository]\nrecipients = ["%s"]\nidentity_file = "%s"\ncompression_level = 3\nmin_regions = %s\n\n' \
        "$RCPT" "$WORK/id.txt" "$1"
}
{ head_toml 1; region a bench-one; } >"$WORK/one.toml"
{ head_toml 2; region a bench-two-a; region b bench-two-b; } >"$WORK/two.toml"
"$DR" --config "$WORK/one.toml" repo init >/dev/null
"$DR" --config "$WORK/two.toml" repo init >/dev/null

echo "== generating ${SIZE_MIB} MiB (alternating 1 MiB random / 1 MiB text)"
python3 - "$WORK/input.bin" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
line = b"1234 INSERT INTO accounts VALUES (42, 'compressible text', now());\n"
text = (line * ((1 << 20) // len(line) + 1))[: 1 << 20]
with open(path, "wb") as f:
    for i in range(mib):
        f.write(os.urandom(1 << 20) if i % 2 == 0 else text)
PY
cat "$WORK/input.bin" >/dev/null

ONE=() TWO=()
write_seconds() { python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['selftest']['write_seconds'])" "$1"; }
# CPU seconds the S3 server used: on a small machine the server's own work
# (hashing and storing every copy) competes with dr for the same cores.
GARAGE_PID=$(head -n1 "$DR_TESTENV_DIR/garage/garage.pid")
server_cpu() { awk '{printf "%.2f\n", ($14 + $15) / 100}' "/proc/$GARAGE_PID/stat"; }
run() { # run LABEL CONFIG OUT
    local before after
    before=$(server_cpu)
    /usr/bin/time -f "%U %S" -o "$WORK/cpu" "$DR" --config "$2" --json repo selftest --file "$WORK/input.bin" >"$3"
    after=$(server_cpu)
    echo "   $1: write $(write_seconds "$3") s; dr CPU $(awk '{print $1 + $2}' "$WORK/cpu") s (write + read-back); S3 server CPU $(python3 -c "print(round($after - $before, 2))") s"
}
for i in $(seq 1 "$RUNS"); do
    echo "== run $i/$RUNS"
    run "one region " "$WORK/one.toml" "$WORK/one.json"
    ONE+=("$(write_seconds "$WORK/one.json")")
    run "two regions" "$WORK/two.toml" "$WORK/two.json"
    TWO+=("$(write_seconds "$WORK/two.json")")
done
best() { printf '%s\n' "$@" | sort -g | head -1; }
O=$(best "${ONE[@]}")
T=$(best "${TWO[@]}")
echo "one region runs (s): ${ONE[*]}"
echo "two region runs (s): ${TWO[*]}"
python3 - "$O" "$T" "$SIZE_MIB" <<'PY'
import sys
o, t, mib = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
print(f"== results ({mib} MiB, best of runs)")
print(f"one region : {o:6.2f} s  ({mib / o:6.1f} MiB/s)")
print(f"two regions: {t:6.2f} s  ({mib / t:6.1f} MiB/s per region)")
print(f"two / one  : {t / o:4.2f}x")
PY
