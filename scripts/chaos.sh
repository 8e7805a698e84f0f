#!/usr/bin/env bash
# Kill-anywhere campaign: SIGKILLs dr commands at random instants under a
# live workload and checks the repository after every kill (see
# tests/kill_campaign.rs for what is checked), then injects store faults
# and runs commands concurrently (tests/store_faults.rs,
# tests/concurrency.rs).
#
# Usage: scripts/chaos.sh [KILLS_PER_COMMAND] [COMMAND...]
#
#   KILLS_PER_COMMAND  default 100
#   COMMAND            any of: backup-pg backup-pg-remote wal-push wal-stream
#                      backup-redis expire repo-sync restore-pg daemon
#                      s3-server faults concurrency (default: all)
#
# Environment:
#   DR_CHAOS_RESTORE_EVERY  restore to the last mark before the kill every
#                           N kills (default 5; always at the end of a command)
#   DR_CHAOS_JOBS           commands campaigned at once per test binary (default 2)
#   DR_CHAOS_MINUTES        time budget of the kill runs: no kill starts after
#                           it (the table says how many ran); default none
#   DR_CHAOS_OUT            results directory (default $CARGO_TARGET_DIR/chaos-<time>)
#   DR_KILL_SEED            replay the delays of an earlier run
#
# Every PostgreSQL cluster, Redis server and Garage (S3) server that gets
# killed or filled is one the tests start for themselves: the servers of
# the shared test environment are only read from (never killed). The full
# filesystem is a small tmpfs, mounted and unmounted by the test (root).
#
# Prints a per-command table (kills, consistent, inconsistent, next run ok,
# restores) and writes it as JSON to $DR_CHAOS_OUT/chaos.json. Exits 1 if
# any run was inconsistent or any check failed.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}"

ALL=(backup-pg backup-pg-remote wal-push wal-stream backup-redis expire repo-sync restore-pg daemon s3-server faults concurrency)

KILLS=100
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    KILLS=$1
    shift
fi
COMMANDS=("$@")
((${#COMMANDS[@]})) || COMMANDS=("${ALL[@]}")
for c in "${COMMANDS[@]}"; do
    [[ " ${ALL[*]} " == *" $c "* ]] || {
        echo "unknown command '$c'; one of: ${ALL[*]}" >&2
        exit 2
    }
done
[[ $(id -u) == 0 ]] || {
    echo "run as root: PostgreSQL and Redis run as an unprivileged user via runuser, and the full-filesystem test mounts a tmpfs" >&2
    exit 2
}

OUT=${DR_CHAOS_OUT:-$CARGO_TARGET_DIR/chaos-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p -- "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
echo "chaos: $KILLS kills per command, commands: ${COMMANDS[*]}; results in $OUT"

# Test servers: the running environment if there is one (only its
# binaries and OS user are used), otherwise a private one, stopped at exit.
ENV_DIR=${DR_TESTENV_DIR:-/tmp/dr-testenv}
if [[ -f $ENV_DIR/env.sh ]] && DR_TESTENV_DIR=$ENV_DIR bash scripts/testenv.sh status >/dev/null 2>&1; then
    # shellcheck disable=SC1091
    source "$ENV_DIR/env.sh"
    echo "chaos: using the test environment in $ENV_DIR (nothing in it is killed)"
else
    export DR_TESTENV_DIR=/tmp/dr-chaos-env.$$
    trap 'DR_TESTENV_DIR=/tmp/dr-chaos-env.$$ bash "$ROOT/scripts/testenv.sh" stop >/dev/null 2>&1 || true' EXIT
    bash scripts/testenv.sh start >/dev/null
    # shellcheck disable=SC1091
    source "$DR_TESTENV_DIR/env.sh"
    echo "chaos: started a private test environment in $DR_TESTENV_DIR"
fi

cargo build --locked --tests --quiet

kill_cmds=()
run_faults=0
run_conc=0
for c in "${COMMANDS[@]}"; do
    case $c in
    faults) run_faults=1 ;;
    concurrency) run_conc=1 ;;
    *) kill_cmds+=("$c") ;;
    esac
done

status=0
t0=$SECONDS
if ((${#kill_cmds[@]})); then
    until=
    [[ -n ${DR_CHAOS_MINUTES:-} ]] && until=$(($(date +%s) + DR_CHAOS_MINUTES * 60))
    # PostgreSQL commands and the others run side by side, each binary
    # campaigning DR_CHAOS_JOBS commands at once.
    pids=()
    for bin in kill_campaign kill_campaign_services; do
        echo "chaos: $bin (log: $OUT/$bin.log)"
        DR_CHAOS_UNTIL=$until \
            DR_CHAOS_KILLS=$KILLS \
            DR_CHAOS_COMMANDS="${kill_cmds[*]}" \
            DR_CHAOS_RESTORE_EVERY=${DR_CHAOS_RESTORE_EVERY:-5} \
            DR_CHAOS_JSON=$RESULTS \
            cargo test --locked --quiet --test "$bin" -- \
            --test-threads="${DR_CHAOS_JOBS:-2}" --nocapture >"$OUT/$bin.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do
        wait "$p" || status=1
    done
fi

# Fault and concurrency tests: one row per test, pass or fail.
suite_rows() { # suite_rows TEST_BINARY LABEL
    local bin=$1 label=$2 log=$OUT/$1.log
    echo "chaos: $label (log: $log)"
    cargo test --locked --test "$bin" -- --test-threads=2 >"$log" 2>&1 || status=1
    python3 - "$log" "$label" >>"$RESULTS" <<'EOF'
import json, re, sys
log, label = sys.argv[1], sys.argv[2]
for line in open(log, errors="replace"):
    m = re.match(r"^test (\S+) \.\.\. (ok|FAILED)$", line.strip())
    if m:
        ok = m.group(2) == "ok"
        print(json.dumps({"command": f"{label}: {m.group(1)}", "runs": 1, "kills": 0,
                          "faults": 1 if label == "faults" else 0,
                          "consistent": int(ok), "inconsistent": int(not ok),
                          "next_run_ok": int(ok), "restores_checked": 0, "restores_exact": 0,
                          "failures": [] if ok else [f"see {log}"]}))
EOF
}
((run_faults)) && suite_rows store_faults faults
((run_conc)) && suite_rows concurrency concurrency

python3 - "$RESULTS" "$OUT/chaos.json" "$KILLS" "$((SECONDS - t0))" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump({"kills_per_command": int(sys.argv[3]), "seconds": int(sys.argv[4]), "commands": rows},
          open(sys.argv[2], "w"), indent=2)
hdr = ("command", "runs", "kills", "consistent", "inconsistent", "next-run-ok", "restores exact", "orphans left/after expire")
print("\n%-58s %5s %5s %10s %12s %11s %14s %s" % hdr)
for r in rows:
    print("%-58s %5d %5d %10d %12d %11d %9d/%-4d %s" % (
        r["command"][:58], r["runs"], r["kills"], r["consistent"], r["inconsistent"], r["next_run_ok"],
        r.get("restores_exact", 0), r.get("restores_checked", 0),
        "%s/%s" % (r.get("orphans_left_by_kills", "-"), r.get("orphans_after_expire", "-"))))
    for f in r.get("failures", []):
        print("    FAILURE: " + f.replace("\n", " ")[:300])
print("\nJSON: " + sys.argv[2])
EOF
if ((status)); then
    echo "chaos: FAILED (see the logs in $OUT)"
else
    echo "chaos: every run consistent"
fi
exit "$status"
