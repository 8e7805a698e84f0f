# Shared by the daemon benchmarks (bench-daemon.sh, bench-daemon-scale.sh):
# sourced, not run. Expects OS_USER and BENCH to be set.

step() { printf '\n\033[1m== %s\033[0m (at %d s)\n' "$*" "$SECONDS" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
as_pg() { runuser -u "$OS_USER" -- "$@"; }
bg_as_pg() { exec setpriv --reuid="$OS_USER" --regid="$OS_USER" --init-groups -- "$@"; }

# Sets DR_BIN: the given binary, or a release build.
bench_dr_binary() {
    if [[ -z ${DR_BIN:-} ]]; then
        step "Building dr (release)"
        cargo build --release --locked --quiet --bin dr
        DR_BIN=$CARGO_TARGET_DIR/release/dr
    fi
    [[ -x $DR_BIN ]] || die "DR_BIN=$DR_BIN is not an executable"
}

# Recreates $BENCH with the given subdirectories and a copy of dr the OS
# user can run (/root is not traversable by postgres), enters it, and sets
# DR, and RCPT to the recipient of a new identity in $BENCH/identity.txt.
bench_prepare() {
    rm -rf "$BENCH"
    mkdir -p "$BENCH/bin" "${@/#/$BENCH/}"
    cp "$DR_BIN" "$BENCH/bin/dr"
    chown -R "$OS_USER:" "$BENCH"
    chmod 755 "$BENCH"
    cd "$BENCH"
    DR=$BENCH/bin/dr
    as_pg "$DR" keygen --output "$BENCH/identity.txt" >/dev/null
    RCPT=$(grep -o 'age1[0-9a-z]*' "$BENCH/identity.txt" | head -1)
}

# Starts $BENCH/dr.toml with the repository (the new identity) and one fs
# region in $BENCH/repo; callers append their sources and settings.
bench_repo_toml() {
    cat >"$BENCH/dr.toml" <<TOML
[repository]
recipients = ["$RCPT"]
identity_file = "$BENCH/identity.txt"

[[region]]
name = "local"
type = "fs"
path = "$BENCH/repo"
TOML
}

# Saves the daemon's last /metrics to $BENCH/metrics.txt, then stops it
# (DAEMON_PID; MPORT is its listen port).
bench_stop_daemon() {
    curl -fsS "http://127.0.0.1:$MPORT/metrics" >"$BENCH/metrics.txt" || die "no /metrics"
    kill "$DAEMON_PID"
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=
}
