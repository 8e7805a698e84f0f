#!/usr/bin/env bash
# Catalog cost against history: writes one PostgreSQL cluster with a long
# history (SEGMENTS WAL segments, BACKUPS backups; real encoded objects,
# see tests/common/catalog_fixture.rs) to Garage, then times each catalog
# command and reads the S3 requests it sent from dr's own count (the
# `store requests` debug line, DR_LOG=dr=debug):
#
#   dr list pg                              every backup, window and gap, from summaries
#   dr list pg --whole-catalog              the same from every key and manifest
#   dr restore pg --to latest --dry-run     restore planning, newest point
#   dr restore pg --to <mid> --dry-run      restore planning, a past time
#   dr verify pg --list                     every object checked
#   dr expire --dry-run                     what retention would delete
#
# `dr list pg --whole-catalog` loads the whole catalog (every key, every
# manifest), as listing and planning did before summaries: it is the
# side-by-side peer of the listing and planning rows, and the script prints
# the ratios and checks both listings print the same JSON. Goal (design §3,
# issue #22): listing and planning ≤ 10 requests and < 2 s whatever the
# history. verify --list and expire --dry-run read every object by design.
#
# Usage: scripts/bench-catalog.sh [SEGMENTS] [BACKUPS]   (default 100000 1000)
# Environment: DR_BIN=/path/to/dr reuses a built dr (else a release build);
# with DR_TEST_S3_ENDPOINT etc. set (`source $DR_TESTENV_DIR/env.sh`) the
# running test Garage is used under a fresh prefix, else the script starts
# its own test environment and stops it at exit. RUNS (default 3): each
# command runs that many times; the best time counts.
set -euo pipefail
cd "$(dirname "$0")/.."
SEGMENTS=${1:-100000}
BACKUPS=${2:-1000}
RUNS=${RUNS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export PATH="$HOME/.cargo/bin:$PATH"
die() { echo "error: $*" >&2; exit 1; }
for v in SEGMENTS BACKUPS RUNS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
((SEGMENTS >= 3 * BACKUPS)) || die "SEGMENTS must be at least 3 × BACKUPS"

if [[ -n ${DR_BIN:-} ]]; then
    [[ -x $DR_BIN ]] || die "DR_BIN=$DR_BIN is not an executable"
    DR=$DR_BIN
    echo "== building the history writer (dev profile; dependencies are optimized)"
    cargo build --locked --quiet --example catalog_fixture
    FIXTURE="$CARGO_TARGET_DIR/debug/examples/catalog_fixture"
else
    echo "== building dr and the history writer (release)"
    cargo build --release --locked --quiet --bin dr --example catalog_fixture
    DR="$CARGO_TARGET_DIR/release/dr"
    FIXTURE="$CARGO_TARGET_DIR/release/examples/catalog_fixture"
fi

WORK=$(mktemp -d /tmp/dr-bench-catalog.XXXXXX)
OWN_ENV=""
cleanup() {
    [[ -n $OWN_ENV ]] && DR_TESTENV_DIR=$OWN_ENV bash scripts/testenv.sh stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
if [[ -z ${DR_TEST_S3_ENDPOINT:-} ]]; then
    OWN_ENV=$WORK/env
    echo "== starting a test environment in $OWN_ENV"
    DR_TESTENV_DIR=$OWN_ENV bash scripts/testenv.sh start >/dev/null
    # shellcheck disable=SC1091
    source "$OWN_ENV/env.sh"
fi

"$DR" keygen --output "$WORK/id.txt" >/dev/null
RCPT=$(grep -o 'age1[0-9a-z]*' "$WORK/id.txt" | head -1)
PREFIX=bench-catalog-$$-$RANDOM
cat >"$WORK/dr.toml" <<TOML
[repository]
recipients = ["$RCPT"]
identity_file = "$WORK/id.txt"

[audit]
path = "$WORK/audit.jsonl"

[[region]]
name = "garage"
type = "s3"
endpoint = "$DR_TEST_S3_ENDPOINT"
bucket = "$DR_TEST_S3_BUCKET"
prefix = "$PREFIX"
s3_region = "$DR_TEST_S3_REGION"
path_style = true
access_key_id = "$DR_TEST_S3_ACCESS_KEY_ID"
secret_access_key = "$DR_TEST_S3_SECRET_ACCESS_KEY"

[postgres.main]
conninfo = "host=127.0.0.1 port=1 user=postgres dbname=postgres"
data_dir = "$WORK/data"
state_dir = "$WORK/state"
retention = { keep_full = $((BACKUPS / 2)) }
TOML
"$DR" --config "$WORK/dr.toml" repo init >/dev/null

echo "== writing $SEGMENTS segments and $BACKUPS backups to $DR_TEST_S3_ENDPOINT/$DR_TEST_S3_BUCKET/$PREFIX"
"$FIXTURE" "$WORK/dr.toml" "$SEGMENTS" "$BACKUPS" >"$WORK/fixture.json"
MID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mid_target"])' "$WORK/fixture.json")
MID_BACKUP=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mid_backup"])' "$WORK/fixture.json")
NEWEST=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["newest_backup"])' "$WORK/fixture.json")
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("   written in %.1f s" % d["seconds"])' "$WORK/fixture.json"

echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), dr $("$DR" --version 2>/dev/null || echo '?')"
# run NAME EXPECT -- ARGS...: best wall time of RUNS and the S3 requests of
# that run; EXPECT, if not empty, must appear in the output.
run() {
    local name=$1 expect=$2
    shift 3
    local best="" reqs="" i t0 t1 dt n
    for ((i = 0; i < RUNS; i++)); do
        t0=$(date +%s.%N)
        DR_LOG=dr=debug "$DR" --config "$WORK/dr.toml" "$@" >"$WORK/out" 2>"$WORK/err" ||
            { cat "$WORK/err" >&2; die "$name failed"; }
        t1=$(date +%s.%N)
        [[ -z $expect ]] || grep -q -- "$expect" "$WORK/out" || die "$name: output lacks $expect"
        n=$(grep -o 's3_requests=[0-9]*' "$WORK/err" | tail -1 | cut -d= -f2)
        [[ -n $n ]] || die "$name: no request count in its log"
        dt=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
        if [[ -z $best ]] || python3 -c "import sys; sys.exit(0 if $dt < $best else 1)"; then
            best=$dt reqs=$n
        fi
    done
    printf '| %-40s | %8s | %8s |\n' "$name" "$best" "$reqs"
    printf '%s\t%s\t%s\n' "$name" "$best" "$reqs" >>"$WORK/results"
}
echo
echo "| command ($SEGMENTS segments, $BACKUPS backups) | seconds | S3 requests |"
echo "|---|---:|---:|"
run "dr list pg" "$NEWEST" -- list pg --json
cp "$WORK/out" "$WORK/list-summaries.json"
run "dr list pg --whole-catalog" "$NEWEST" -- list pg --whole-catalog --json
cmp -s "$WORK/out" "$WORK/list-summaries.json" ||
    die "dr list pg and dr list pg --whole-catalog printed different JSON"
run "dr restore pg --to latest --dry-run" "$NEWEST" -- restore pg --to latest --dry-run --json
run "dr restore pg --to $MID --dry-run" "$MID_BACKUP" -- restore pg --to "$MID" --dry-run --json
run "dr verify pg --list" "" -- verify pg --list --json
run "dr expire --dry-run" "" -- expire --dry-run --json
echo
python3 - "$WORK/results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
plans = [r for r in rows if r[0].startswith("dr restore") or r[0] == "dr list pg"]
whole = next(r for r in rows if r[0] == "dr list pg --whole-catalog")
# The whole catalog is what listing and planning read before summaries:
# the peer of those rows.
for r in plans:
    print("%s: %.2fx the time, %.3fx the requests of the whole catalog"
          % (r[0], float(r[1]) / max(float(whole[1]), 0.01), int(r[2]) / max(int(whole[2]), 1)))
ok = bool(plans) and all(float(r[1]) < 2.0 and int(r[2]) <= 10 for r in plans)
print("listing and planning goal (<= 10 requests and < 2 s):", "met" if ok else "NOT met")
PY
