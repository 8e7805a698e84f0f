#!/usr/bin/env bash
# The main job on the embedded default (a local filesystem repository):
# builds dr, creates a key pair and a repository, checks it, and round-trips a
# file through the full pipeline (zstd → age → durable write → read back →
# decrypt → decompress → BLAKE3 check).
#
# Usage: scripts/demo.sh [FILE]   (default: 256 MiB of generated data)
# Everything lives in $DR_DEMO_DIR (default /tmp/dr-demo), recreated each run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
DEMO=${DR_DEMO_DIR:-/tmp/dr-demo}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

step "Building dr (release)"
cargo build --release --locked --quiet
DR="$CARGO_TARGET_DIR/release/dr"

rm -rf "$DEMO"
mkdir -p "$DEMO"

step "1. Create an age key pair (the identity file is written 0600)"
run "$DR" keygen --output "$DEMO/identity.txt"
RCPT=$(grep -o 'age1[0-9a-z]*' "$DEMO/identity.txt" | head -1)

step "2. Write a config: one local region"
cat > "$DEMO/dr.toml" <<TOML
[repository]
recipients = ["$RCPT"]
identity_file = "$DEMO/identity.txt"
compression_level = 3

[[region]]
name = "local"
type = "fs"
path = "$DEMO/repo"
TOML
cat "$DEMO/dr.toml"
export DR_CONFIG="$DEMO/dr.toml"

step "3. Initialize the repository"
run "$DR" repo init

step "4. Check config, region, repository and identity"
run "$DR" check

step "5. Round-trip a file through the repository"
if [[ $# -ge 1 ]]; then
    run "$DR" repo selftest --file "$1"
else
    run "$DR" repo selftest --size $((256 << 20))
fi

step "6. The same, as JSON (every command takes --json)"
run "$DR" --json repo selftest --size $((1 << 20))

step "Repository contents"
find "$DEMO/repo" -type f -not -path '*/.tmp/*' | sed "s|$DEMO/||"
printf '\nDone. Config: %s — try: %s --config %s check --json\n' "$DEMO/dr.toml" "$DR" "$DEMO/dr.toml"
