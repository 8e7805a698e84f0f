#!/usr/bin/env bash
# The main job on the embedded default (a local filesystem repository), end to
# end: a throwaway PostgreSQL 15 archiving its WAL with `dr wal-push`, a base
# backup, more writes, a point-in-time restore to a moment in between, and a
# check that the restored server holds exactly the data of that moment.
#
# Usage (as root on Debian 12): scripts/demo.sh
# Installs PostgreSQL if missing. Everything lives in $DR_DEMO_DIR (default
# /tmp/dr-demo), recreated each run; both servers are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/sbin:/sbin"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dr/target}
DEMO=${DR_DEMO_DIR:-/tmp/dr-demo}
PGBIN=/usr/lib/postgresql/15/bin
OS_USER=postgres
# Bold headings on a terminal only (and never with NO_COLOR), like dr's logs.
if [[ -t 1 && -z ${NO_COLOR:-} ]]; then
    step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
    step() { printf '\n== %s\n' "$*"; }
fi
as_pg() { runuser -u "$OS_USER" -- "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

[[ $(id -u) -eq 0 ]] || { echo "run as root: the demo installs packages and runs PostgreSQL as the '$OS_USER' user" >&2; exit 1; }

step "Installing prerequisites (PostgreSQL 15) if missing"
bash "$ROOT/scripts/setup.sh" --demo
id "$OS_USER" >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash "$OS_USER"

# The first build compiles every dependency (about 12 minutes on 2 cores);
# cargo's own progress shows it is working. Later runs reuse $CARGO_TARGET_DIR
# and take seconds.
step "Building dr (release; the first build takes about 12 minutes on 2 cores, later ones seconds)"
cargo build --release --locked

# Stop what an earlier run may have left, then start clean.
for d in "$DEMO/data" "$DEMO/restored"; do
    [[ -f $d/postmaster.pid ]] && as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true
done
rm -rf "$DEMO"
mkdir -p "$DEMO/bin"
cp "$CARGO_TARGET_DIR/release/dr" "$DEMO/bin/dr"   # where the postgres user can run it
chown -R "$OS_USER:" "$DEMO"
chmod 755 "$DEMO"
DR="$DEMO/bin/dr"
dr() { printf '$ dr %s\n' "$*"; as_pg "$DR" --config "$DEMO/dr.toml" "$@"; }
cleanup() {
    for d in "$DEMO/data" "$DEMO/restored"; do
        [[ -f $d/postmaster.pid ]] && as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

PORT=$(free_port)
step "1. Key pair, config and repository (dr keygen, dr repo init)"
as_pg "$DR" keygen --output "$DEMO/identity.txt"
RCPT=$(grep -o 'age1[0-9a-z]*' "$DEMO/identity.txt" | head -1)
cat > "$DEMO/dr.toml" <<TOML
[repository]
recipients = ["$RCPT"]
identity_file = "$DEMO/identity.txt"

[audit]
path = "$DEMO/audit.jsonl"

[[region]]
name = "local"
type = "fs"
path = "$DEMO/repo"

[postgres.demo]
conninfo = "host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
data_dir = "$DEMO/data"
bin_dir = "$PGBIN"
os_user = "$OS_USER"
state_dir = "$DEMO/state"
TOML
chown "$OS_USER:" "$DEMO/dr.toml"
dr repo init

step "2. A throwaway PostgreSQL 15 on 127.0.0.1:$PORT, archiving with dr wal-push"
as_pg "$PGBIN/initdb" -D "$DEMO/data" -U postgres --auth=trust --data-checksums >/dev/null
cat >> "$DEMO/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
archive_mode = on
archive_command = '$DR --config $DEMO/dr.toml wal-push %p'
CONF
as_pg "$PGBIN/pg_ctl" -D "$DEMO/data" -l "$DEMO/postgres.log" -w start >/dev/null
sql() { "$PGBIN/psql" -h 127.0.0.1 -p "$1" -U postgres -XAtq -v ON_ERROR_STOP=1 -c "$2"; }
sql "$PORT" "CREATE TABLE orders (id serial PRIMARY KEY, amount numeric, created timestamptz DEFAULT clock_timestamp())"
sql "$PORT" "INSERT INTO orders (amount) SELECT g FROM generate_series(1, 1000) g"
dr check

step "3. Base backup (dr backup pg)"
dr backup pg

step "4. More writes; remember the moment in between"
sql "$PORT" "INSERT INTO orders (amount) SELECT g FROM generate_series(1, 500) g"
sleep 1
TARGET=$(sql "$PORT" "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
EXPECT=$(sql "$PORT" "SELECT count(*) || ' orders, total ' || sum(amount) FROM orders")
sleep 1
echo "at $TARGET: $EXPECT"
sql "$PORT" "INSERT INTO orders (amount) SELECT g FROM generate_series(1, 700) g"
sql "$PORT" "UPDATE orders SET amount = 0 WHERE id % 3 = 0"
NOW=$(sql "$PORT" "SELECT count(*) || ' orders, total ' || sum(amount) FROM orders")
echo "now: $NOW"
SEG=$(sql "$PORT" "SELECT pg_walfile_name(pg_switch_wal())")
for _ in $(seq 100); do
    [[ "$(sql "$PORT" "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")" < "$SEG" ]] || break
    sleep 0.1
done

step "5. What the repository holds (dr list pg)"
dr list pg

step "6. Point-in-time restore to $TARGET (dr restore pg --to … --start)"
PORT2=$(free_port)
dr restore pg --to "$TARGET" --target "$DEMO/restored" --start --port "$PORT2" --no-archive
GOT=$(sql "$PORT2" "SELECT count(*) || ' orders, total ' || sum(amount) FROM orders")

step "7. The restore is in the audit trail ($DEMO/audit.jsonl)"
tail -n 1 "$DEMO/audit.jsonl" | python3 -c '
import json, sys
r = json.load(sys.stdin)
a = r["actor"]
print("%s %s@%s %s %s: %s in %.1fs (backup %s)" % (r["time"], a["user"], a["host"], r["action"],
      r["target"], r["outcome"], r["duration_seconds"], r["details"]["backup"]))
'

step "Result"
printf 'state at %s:  %s\nrestored server:   %s\ncurrent primary:   %s\n' "$TARGET" "$EXPECT" "$GOT" "$NOW"
if [[ "$GOT" == "$EXPECT" ]]; then
    echo "OK: the restored server holds exactly the data of $TARGET"
else
    echo "MISMATCH: restored data differs from the data at $TARGET" >&2
    exit 1
fi
