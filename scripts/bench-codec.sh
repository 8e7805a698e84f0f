#!/usr/bin/env bash
# Codec benchmark: dr's streaming zstd+age encoder versus the command-line
# pipeline `zstd -3 -T0 | age -r …`, on the same 1 GiB input (half random,
# half compressible), in one run. Prints MB/s for both, the ratio, and dr's
# peak RSS. Usage: scripts/bench-codec.sh [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
export PATH="$HOME/.cargo/bin:$PATH"

for tool in zstd age /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/setup.sh" >&2; exit 1; }
done

echo "== building dr (release)"
cargo build --release --locked --quiet
DR="$CARGO_TARGET_DIR/release/dr"

WORK=$(mktemp -d /tmp/dr-bench-codec.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "== generating ${SIZE_MIB} MiB input (alternating 1 MiB random / 1 MiB text)"
python3 - "$WORK/input.bin" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
line = b"1234 INSERT INTO accounts VALUES (42, 'compressible text', now());\n"
text = (line * ((1 << 20) // len(line) + 1))[: 1 << 20]
with open(path, "wb") as f:
    for i in range(mib):
        f.write(os.urandom(1 << 20) if i % 2 == 0 else text)
PY
BYTES=$(stat -c %s "$WORK/input.bin")

"$DR" keygen --output "$WORK/id.txt" >/dev/null
RCPT=$(grep -o 'age1[0-9a-z]*' "$WORK/id.txt" | head -1)
cat > "$WORK/dr.toml" <<TOML
[repository]
recipients = ["$RCPT"]
identity_file = "$WORK/id.txt"
compression_level = 3

[[region]]
name = "local"
type = "fs"
path = "$WORK/repo"
TOML
"$DR" --config "$WORK/dr.toml" repo init >/dev/null

# Warm the page cache so both sides read the input from memory.
cat "$WORK/input.bin" >/dev/null

# Both sides make their output durable: dr fsyncs every object it stores, so the
# pipeline's output goes through `dd conv=fsync`. Each side runs RUNS times,
# alternating, and the best run counts (the least disturbed by other load).
RUNS=${RUNS:-3}
PIPE_TIMES=()
DR_TIMES=()
RSS_KB=0
for i in $(seq 1 "$RUNS"); do
    echo "== run $i/$RUNS: zstd -3 -T0 | age | dd conv=fsync"
    start=$(date +%s.%N)
    zstd -3 -T0 -q -c "$WORK/input.bin" | age -r "$RCPT" | dd of="$WORK/pipeline.age" bs=1M conv=fsync status=none
    end=$(date +%s.%N)
    PIPE_TIMES+=("$(python3 -c "print($end - $start)")")
    PIPE_OUT=$(stat -c %s "$WORK/pipeline.age")
    rm -f "$WORK/pipeline.age"

    echo "== run $i/$RUNS: dr codec (encode + BLAKE3 + fsync'd write, then read back and verify)"
    /usr/bin/time -f "%M" -o "$WORK/rss" \
        "$DR" --config "$WORK/dr.toml" --json repo selftest --file "$WORK/input.bin" > "$WORK/dr.json"
    DR_TIMES+=("$(python3 -c "import json;print(json.load(open('$WORK/dr.json'))['selftest']['write_seconds'])")")
    DR_OUT=$(python3 -c "import json;print(json.load(open('$WORK/dr.json'))['selftest']['stored_size'])")
    DR_OK=$(python3 -c "import json;print(json.load(open('$WORK/dr.json'))['ok'])")
    [[ "$DR_OK" == "True" ]] || { echo "dr read-back verification failed" >&2; exit 1; }
    RSS_KB=$(( $(cat "$WORK/rss") > RSS_KB ? $(cat "$WORK/rss") : RSS_KB ))
done
PIPE_S=$(printf '%s\n' "${PIPE_TIMES[@]}" | sort -g | head -1)
DR_S=$(printf '%s\n' "${DR_TIMES[@]}" | sort -g | head -1)
echo "pipeline runs (s): ${PIPE_TIMES[*]}"
echo "dr runs (s):       ${DR_TIMES[*]}"

python3 - "$BYTES" "$PIPE_S" "$PIPE_OUT" "$DR_S" "$DR_OUT" "$RSS_KB" "$DR_OK" <<'PY'
import sys
b, ps, po, ds, do, rss, ok = sys.argv[1:]
b, ps, po, ds, do, rss = int(b), float(ps), int(po), float(ds), int(do), int(rss)
mb = b / 1e6
print()
print(f"input: {b / 2**20:.0f} MiB, {__import__('os').cpu_count()} cores")
print(f"{'':28}{'MB/s':>10}{'seconds':>10}{'stored MiB':>12}")
print(f"{'zstd -3 -T0 | age | dd':28}{mb / ps:>10.0f}{ps:>10.2f}{po / 2**20:>12.1f}")
print(f"{'dr codec (+fsync, +BLAKE3)':28}{mb / ds:>10.0f}{ds:>10.2f}{do / 2**20:>12.1f}")
print(f"ratio dr / pipeline: {ps / ds:.2f}x")
print(f"dr peak RSS (encode, then read back + decode + verify): {rss / 1024:.0f} MiB")
print(f"dr read-back verification ok: {ok} (best of each side's runs shown)")
PY
