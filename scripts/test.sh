#!/usr/bin/env bash
# Runs every test against real servers: installs prerequisites, starts a
# private throwaway test environment, runs the test suite, stops the servers.
#
# Usage: scripts/test.sh [extra cargo-nextest arguments]
# Exits with the test runner's status.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

banner() { printf '\n===== %s =====\n' "$*"; }

banner "1/4 Installing prerequisites (scripts/setup.sh)"
bash "$ROOT/scripts/setup.sh"

# Same search path as setup.sh: cargo-installed tools first, system dirs last.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Outside the work tree so that builds are reused across fresh clones (CI
# clones the repository anew for every run).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}"
mkdir -p -- "$CARGO_TARGET_DIR"

# Screenshots and other files tests leave for people to look at (the HTML
# reports rendered in headless Chromium).
export DR_ARTIFACTS_DIR="${DR_ARTIFACTS_DIR:-$CARGO_TARGET_DIR/artifacts}"
mkdir -p -- "$DR_ARTIFACTS_DIR"

banner "2/4 Starting test servers (scripts/testenv.sh)"
# A state directory of its own (unless the caller chose one), so this run
# neither reuses leftover data nor stops an environment someone started by
# hand at the default location.
export DR_TESTENV_DIR="${DR_TESTENV_DIR:-/tmp/dr-testenv.run-$$}"

# shellcheck disable=SC2317  # invoked through the trap below
stop_env() {
    local rc=$?
    trap - EXIT INT TERM
    banner "Stopping test servers"
    bash "$ROOT/scripts/testenv.sh" stop ||
        echo "warning: 'scripts/testenv.sh stop' failed; leftover state in $DR_TESTENV_DIR" >&2
    exit "$rc"
}
trap stop_env EXIT
# Turn signals into a normal exit so the EXIT trap stops the servers.
trap 'exit 130' INT
trap 'exit 143' TERM

bash "$ROOT/scripts/testenv.sh" start >/dev/null
# shellcheck disable=SC1091
source "$DR_TESTENV_DIR/env.sh"
bash "$ROOT/scripts/testenv.sh" status

banner "3/4 Lints (cargo fmt --check, cargo clippy -D warnings)"
# Formatting and lints are part of the suite: CI fails on either, after the
# tests have run, so one run shows everything that is wrong.
lint=0
cargo fmt --all --check || {
    echo "LINT: unformatted code (run: cargo fmt)" >&2
    lint=1
}
cargo clippy --all-targets --locked -- -D warnings || {
    echo "LINT: clippy warnings (see above)" >&2
    lint=1
}

banner "4/4 Running tests (cargo nextest run)"
echo "cargo:   $(cargo --version)"
echo "nextest: $(cargo nextest --version 2>/dev/null | head -n1)"
echo "target:  $CARGO_TARGET_DIR"
echo "artifacts (screenshots): $DR_ARTIFACTS_DIR"
status=0
cargo nextest run --locked --no-fail-fast "$@" || status=$?

echo "artifacts (screenshots): $DR_ARTIFACTS_DIR"
if ((status == 0 && lint != 0)); then
    banner "Tests passed, but lints FAILED (see LINT above)"
    exit 1
fi
if ((status == 0)); then
    banner "Tests passed"
else
    banner "Tests FAILED (cargo nextest exit status $status)"
fi
exit "$status"
