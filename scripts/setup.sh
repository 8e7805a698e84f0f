#!/usr/bin/env bash
# Installs everything the test suite needs on a Debian 12 machine (run as root).
#
# Every step checks first and only installs what is missing, so a second run
# takes about a second. Safe to run unattended (CI=true, no stdin).
#
# What gets installed and why:
#   - PostgreSQL 15 server, client tools and contrib (amcheck): real servers
#     for the integration tests; the client tools (psql, pg_basebackup, ...)
#     are what `dr` drives.
#   - redis-server / redis-tools: real Redis for the integration tests.
#   - rabbitmq-server (3.10, with its management plugin): a real broker for
#     the RabbitMQ definitions tests; scripts/testenv.sh runs a private node.
#   - zstd, age: command-line tools used to cross-check the formats `dr` writes.
#   - ca-certificates, pkg-config, gcc, make: building crates with C parts.
#   - curl: scripts/testenv.sh uses it to check that the S3 endpoint answers.
#   - time (GNU): the benchmarks report peak memory with it.
#   - prometheus (with promtool): the alert rules are checked and unit-tested
#     with promtool, and a real Prometheus scrapes a real `dr daemon` in the
#     monitoring tests. Only the binaries are used; no service is started.
#   - chromium: the HTML reports are loaded in headless Chromium (console,
#     DOM, screenshot).
#   - groff-base: the tests render the manual pages `dr man` writes.
#   - cargo-nextest: the test runner.
#   - Garage 2.x: a small S3-compatible object store, built from crates.io
#     because Debian 12 does not package it.
set -euo pipefail

# cargo-installed tools live in ~/.cargo/bin; the system directories are
# appended because a minimal PATH may lack them (runuser, useradd are in
# /usr/sbin; the machine's own cargo-nextest may be in /usr/local/bin).
CARGO_BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$CARGO_BIN_DIR:$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export DEBIAN_FRONTEND=noninteractive

# Garage major version the test environment is written for (config keys and
# CLI syntax changed between 1.x and 2.x).
GARAGE_VERSION_REQ='^2'

log() { printf '[setup] %s\n' "$*" >&2; }
die() {
    printf '[setup] ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------
# Each entry is "package:check". A check starting with "/" is a file that the
# package installs; anything else is a command that must be on PATH. Checking
# files/commands instead of dpkg status also covers virtual packages such as
# postgresql-contrib-15 (provided by postgresql-15 on Debian 12).
APT_PACKAGES=(
    "postgresql-15:/usr/lib/postgresql/15/bin/postgres"
    "postgresql-client-15:/usr/lib/postgresql/15/bin/pg_basebackup"
    "postgresql-contrib-15:/usr/share/postgresql/15/extension/amcheck.control"
    "redis-server:redis-server"
    "redis-tools:redis-cli"
    "rabbitmq-server:/usr/lib/rabbitmq/bin/rabbitmq-server"
    "zstd:zstd"
    "age:age"
    "ca-certificates:/etc/ssl/certs/ca-certificates.crt"
    "pkg-config:pkg-config"
    "gcc:cc"
    "make:make"
    "curl:curl"
    "time:/usr/bin/time"
    "python3-venv:/usr/lib/python3.11/ensurepip/__init__.py"
    "prometheus:/usr/bin/promtool"
    "chromium:/usr/bin/chromium"
    "groff-base:groff"
    "etcd-server:/usr/bin/etcd"
    "protobuf-compiler:/usr/bin/protoc"
)

is_present() {
    local check=$1
    if [[ $check == /* ]]; then
        [[ -e $check ]]
    else
        command -v "$check" >/dev/null 2>&1
    fi
}

install_apt_packages() {
    local entry pkg check
    local missing=()
    for entry in "${APT_PACKAGES[@]}"; do
        pkg=${entry%%:*}
        check=${entry#*:}
        is_present "$check" || missing+=("$pkg")
    done

    if ((${#missing[@]} == 0)); then
        log "Debian packages: all present"
        return 0
    fi

    [[ $(id -u) == 0 ]] ||
        die "missing Debian packages (${missing[*]}) and not running as root; re-run as root or install them with: sudo apt-get install ${missing[*]}"
    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages (${missing[*]}) and apt-get is not available; this script expects Debian 12"

    log "Debian packages: installing ${missing[*]}"
    # Wait for a concurrent apt/dpkg run instead of failing on its lock.
    local apt=(apt-get -q -y -o DPkg::Lock::Timeout=600)
    "${apt[@]}" update ||
        die "'apt-get update' failed; check that the Debian package mirrors in /etc/apt/sources.list* are reachable"
    "${apt[@]}" install --no-install-recommends "${missing[@]}" ||
        die "'apt-get install ${missing[*]}' failed; see the apt output above (try 'dpkg --configure -a' if dpkg was interrupted)"

    for entry in "${APT_PACKAGES[@]}"; do
        is_present "${entry#*:}" ||
            die "package ${entry%%:*} was installed but ${entry#*:} is still missing"
    done
}

# ---------------------------------------------------------------------------
# Rust tools
# ---------------------------------------------------------------------------
require_cargo() {
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found (looked on PATH and in $CARGO_BIN_DIR); install the Rust toolchain with rustup"
}

install_nextest() {
    if cargo nextest --version >/dev/null 2>&1; then
        log "cargo-nextest: present"
        return 0
    fi
    log "cargo-nextest: installing from crates.io (a few minutes)"
    # CARGO_TARGET_DIR is unset so that the tool builds in cargo's own
    # temporary directory, not in the project's (possibly shared) target dir.
    env -u CARGO_TARGET_DIR cargo install cargo-nextest --locked ||
        die "'cargo install cargo-nextest --locked' failed; see the cargo output above"
}

# Sets GARAGE_BIN/GARAGE_VERSION to a Garage 2.x binary, or leaves GARAGE_BIN empty.
find_garage() {
    local bin version
    GARAGE_BIN=
    GARAGE_VERSION=
    for bin in "$(command -v garage 2>/dev/null || true)" "$CARGO_BIN_DIR/garage"; do
        [[ -n $bin && -x $bin ]] || continue
        # Captured first rather than piped into grep -q: with pipefail an
        # early-exiting grep could turn a good binary into a failure.
        version=$("$bin" --version 2>/dev/null || true)
        if [[ $version =~ (^|[^0-9.])v?2\.[0-9]+ ]]; then
            GARAGE_BIN=$bin
            GARAGE_VERSION=${version%%$'\n'*}
            return 0
        fi
    done
}

# Another process may already be building Garage (it takes a long time on a
# small machine). Starting a second build would compete for the same cores
# and the same install destination, so wait for that one instead.
wait_for_other_garage_install() {
    local waited=0 max_wait=$((120 * 60))
    while pgrep -f '^[^ ]*cargo install .*garage' >/dev/null 2>&1; do
        if ((waited == 0)); then
            log "Garage: another 'cargo install garage' is running; waiting for it to finish"
        elif ((waited % 300 == 0)); then
            log "Garage: still waiting for the other build ($((waited / 60)) min so far)"
        fi
        if ((waited >= max_wait)); then
            die "gave up after $((max_wait / 60)) min waiting for another 'cargo install garage' (see: pgrep -af 'cargo install'); stop it or let it finish, then re-run"
        fi
        sleep 10
        waited=$((waited + 10))
    done
}

install_garage() {
    find_garage
    if [[ -z $GARAGE_BIN ]]; then
        wait_for_other_garage_install
        find_garage
    fi
    if [[ -n $GARAGE_BIN ]]; then
        log "Garage: present ($GARAGE_BIN, $GARAGE_VERSION)"
        return 0
    fi

    log "Garage: building 2.x from crates.io (about 10 minutes on 2 cores)"
    # bundled-libs: no system libsodium/zstd/sqlite needed.
    # sqlite only: the default LMDB engine is not needed for a test server.
    env -u CARGO_TARGET_DIR cargo install garage --locked --version "$GARAGE_VERSION_REQ" \
        --no-default-features --features bundled-libs,sqlite ||
        die "'cargo install garage' failed; see the cargo output above (a C compiler and make are required)"

    find_garage
    [[ -n $GARAGE_BIN ]] || die "Garage was built but no 2.x 'garage' binary is on PATH or in $CARGO_BIN_DIR"
    log "Garage: installed ($GARAGE_BIN, $GARAGE_VERSION)"
}

# moto's S3 server (the S3 implementation with Object Lock used by the tests),
# in a virtualenv of its own so the system Python stays untouched.
MOTO_VENV=${DR_MOTO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dr/moto-venv}
MOTO_VERSION_REQ="moto[server]>=5.1,<6"
install_moto() {
    if [[ -x $MOTO_VENV/bin/moto_server ]] && "$MOTO_VENV/bin/python" -c 'import moto.server' 2>/dev/null; then
        log "moto: present ($MOTO_VENV, $("$MOTO_VENV/bin/python" -c 'import moto; print(moto.__version__)'))"
        return 0
    fi
    log "moto: installing '$MOTO_VERSION_REQ' from PyPI into $MOTO_VENV"
    /usr/bin/python3 -m venv "$MOTO_VENV" ||
        die "'python3 -m venv $MOTO_VENV' failed (is python3-venv installed?)"
    "$MOTO_VENV/bin/pip" install -q "$MOTO_VERSION_REQ" ||
        die "'pip install $MOTO_VERSION_REQ' failed; see the pip output above (PyPI must be reachable)"
    log "moto: installed"
}

install_apt_packages
require_cargo
# --demo: what scripts/demo.sh needs (no test runner, no S3 server).
if [[ ${1:-} == --demo ]]; then
    log "done (demo prerequisites)"
    exit 0
fi
install_nextest
install_garage
install_moto
log "done"
