#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (RELIABILITY.md, "Fuzzing"): every
# parser of outside bytes, each for SECONDS_PER_TARGET seconds, one at a
# time and at low priority (nice), one libFuzzer process per target (no
# -jobs: its workers log to a shared fuzz-N.log in the working directory,
# which mixes the reports of two scripts run side by side). Not part of
# CI: it needs the nightly toolchain and takes as long as you give it.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 60
#   TARGET              default: every target in fuzz/Cargo.toml
# Environment:
#   FUZZ_CORPUS_DIR     corpora and crash artifacts (default fuzz/corpus
#                       and fuzz/artifacts, both ignored by git)
#   FUZZ_TOOLCHAIN      toolchain for cargo (default nightly)
#
# Prints a summary table: target, runs, seconds, crashes. Exits 1 if any
# target crashed; the crashing inputs are under fuzz/artifacts/<target>/.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT/fuzz"

SECS=${1:-60}
shift || true
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
CORPUS_ROOT=${FUZZ_CORPUS_DIR:-$ROOT/fuzz/corpus}
ARTIFACTS_ROOT=${FUZZ_CORPUS_DIR:+$FUZZ_CORPUS_DIR/artifacts}
ARTIFACTS_ROOT=${ARTIFACTS_ROOT:-$ROOT/fuzz/artifacts}
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
    echo "the $TOOLCHAIN toolchain is not installed (rustup toolchain install $TOOLCHAIN)" >&2
    exit 2
fi

if (($# > 0)); then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo "+$TOOLCHAIN" fuzz list)
fi

# Maximum input length per target: the WAL readers need room for records
# that cross 8 KiB pages, the codec for several damage triples.
max_len() {
    case "$1" in
    wal_records | wal_header) echo 65536 ;;
    tar | replication | rdb) echo 16384 ;;
    *) echo 4096 ;;
    esac
}

# Seeds: small valid inputs, so the fuzzers start on the accepting side.
seed() {
    local t=$1 dir=$2
    [[ -n "$(ls -A "$dir" 2>/dev/null)" ]] && return 0
    case "$t" in
    config) cp "$ROOT"/config/*.toml "$dir"/ 2>/dev/null || true ;;
    playbook) cp "$ROOT"/playbooks/*.toml "$dir"/ 2>/dev/null || true ;;
    timeline) printf '1\t0/3000000\tno recovery target specified\n2\t0/5000000\tbefore 2026-01-01\n' >"$dir/history" ;;
    object_key)
        printf 'pg/main/7301/backups/20261125T184412Z-abcdef/data/0000000a' >"$dir/k1"
        printf 'pg/main/7301/wal/00000002/00000000/000000020000000000000003.partial-%064d' 0 >"$dir/k2"
        printf 'audit/2026/11/20261125T184412Z-abcdef' >"$dir/k3"
        ;;
    tar)
        local src
        src=$(mktemp -d)
        mkdir -p "$src/base/1" && printf 'START WAL LOCATION: 0/2000028\n' >"$src/backup_label"
        head -c 9000 /dev/urandom >"$src/base/1/1259" && ln -s /srv/ts "$src/ts"
        (cd "$src" && tar --format=ustar -cf - . | { printf '\x07\x03'; cat; } >"$dir/ustar")
        (cd "$src" && tar --format=gnu -cf - . | { printf '\x00\x00'; cat; } >"$dir/gnu")
        rm -rf -- "$src"
        ;;
    rdb) printf '\x01\x05\x00REDIS0011\xfa\x09redis-ver\x057.2.4\xfe\x00\xfb\x01\x00\x00\x01k\x01v' >"$dir/rdb" ;;
    esac
}

declare -a ROWS=()
failed=0
for t in "${TARGETS[@]}"; do
    corpus="$CORPUS_ROOT/$t"
    artifacts="$ARTIFACTS_ROOT/$t"
    mkdir -p "$corpus" "$artifacts"
    seed "$t" "$corpus"
    log=$(mktemp)
    echo "== $t: ${SECS}s" >&2
    start=$(date +%s)
    status=0
    nice -n 10 cargo "+$TOOLCHAIN" fuzz run "$t" "$corpus" -- \
        -max_total_time="$SECS" -max_len="$(max_len "$t")" \
        -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    secs=$(($(date +%s) - start))
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n1 || true)
    crashes=$(grep -cE '^==[0-9]+== ERROR: libFuzzer|panicked at|SUMMARY: libFuzzer' "$log" || true)
    if ((status != 0)); then
        failed=1
        ((crashes > 0)) || crashes="exit $status"
        echo "-- $t failed; the log tail:" >&2
        tail -n 40 "$log" >&2
    fi
    cp "$log" "$artifacts/last-run.log"
    rm -f -- "$log"
    ROWS+=("$(printf '%-12s %12s %8s %8s' "$t" "${runs:-?}" "$secs" "${crashes:-0}")")
done

printf '\n%-12s %12s %8s %8s\n' target runs seconds crashes
printf '%s\n' "${ROWS[@]}"
exit "$failed"
