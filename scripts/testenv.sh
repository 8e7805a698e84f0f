#!/usr/bin/env bash
# Throwaway PostgreSQL 15, Redis, RabbitMQ (with the management plugin),
# Garage (S3), moto (S3 with Object Lock) and etcd (single node) servers for the integration tests, on free loopback ports, all state under
# one directory.
#
# Usage: scripts/testenv.sh start|stop|status|env
#
#   start   start all servers (no-op if already running) and print the
#           environment file; progress goes to stderr, so
#           `eval "$(scripts/testenv.sh start)"` works.
#   stop    stop the servers and delete the state directory.
#   status  report each server; exit 0 only if all of them answer.
#   env     print the environment file ($DR_TESTENV_DIR/env.sh).
#
# State directory: ${DR_TESTENV_DIR:-/tmp/dr-testenv}. Run as root (or as the
# OS user below): PostgreSQL refuses to run as root, so PostgreSQL and Redis
# run as an unprivileged user via runuser. Prerequisites: scripts/setup.sh.
#
# The servers never use the default ports, so system-wide PostgreSQL/Redis
# instances started by Debian's packages neither conflict nor get used.
set -euo pipefail

# garage is cargo-installed; runuser/useradd live in /usr/sbin, which a
# minimal PATH may lack.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

STATE_DIR=$(realpath -m -- "${DR_TESTENV_DIR:-/tmp/dr-testenv}")
MARKER=$STATE_DIR/.dr-testenv
ENV_FILE=$STATE_DIR/env.sh

OS_USER=postgres
PG_BIN_DIR=/usr/lib/postgresql/15/bin
PG_DIR=$STATE_DIR/postgres
PG_DATA=$PG_DIR/data
PG_SOCKET_DIR=$PG_DIR/socket
PG_LOG=$PG_DIR/postgres.log

REDIS_DIR=$STATE_DIR/redis
REDIS_CONF=$REDIS_DIR/redis.conf
REDIS_PIDFILE=$REDIS_DIR/redis.pid
REDIS_LOG=$REDIS_DIR/redis.log

RMQ_DIR=$STATE_DIR/rabbitmq
RMQ_LOG=$RMQ_DIR/startup.log
# The broker's own start script (not the /usr/sbin wrapper, which switches
# to the rabbitmq user); epmd from the Erlang runtime it depends on.
RMQ_SERVER_BIN=/usr/lib/rabbitmq/bin/rabbitmq-server
EPMD_BIN=/usr/bin/epmd
# Administrator created at first boot (default_user in rabbitmq.conf).
RMQ_USER=dr-admin

GARAGE_DIR=$STATE_DIR/garage
GARAGE_CONF=$GARAGE_DIR/garage.toml
GARAGE_PIDFILE=$GARAGE_DIR/garage.pid
GARAGE_LOG=$GARAGE_DIR/garage.log
# Address Garage listens on. Loopback unless a benchmark puts it behind a
# link of its own (scripts/bench-regions.sh: an address of a veth pair).
GARAGE_ADDR=${DR_TESTENV_GARAGE_ADDR:-127.0.0.1}

S3_REGION=garage

ETCD_DIR=$STATE_DIR/etcd
ETCD_PIDFILE=$ETCD_DIR/etcd.pid
ETCD_LOG=$ETCD_DIR/etcd.log
ETCD_BIN=/usr/bin/etcd
S3_BUCKET=dr-test
S3_KEY_NAME=dr-test

MOTO_VENV=${DR_MOTO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dr/moto-venv}
MOTO_DIR=$STATE_DIR/moto
MOTO_PIDFILE=$MOTO_DIR/moto.pid
MOTO_LOG=$MOTO_DIR/moto.log
MOTO_REGION=us-east-1
# Object Lock can only be enabled when a bucket is created.
MOTO_LOCK_BUCKET=dr-test-locked
# moto accepts any credentials; these are fixed so tests can sign requests.
MOTO_KEY_ID=dr-test-moto
MOTO_SECRET=dr-test-moto-secret

# How long to wait for each server to answer before giving up.
START_TIMEOUT=60

log() { printf '[testenv] %s\n' "$*" >&2; }
die() {
    printf '[testenv] ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# Runs a command as the unprivileged OS user. The working directory is "/"
# because the caller's directory (e.g. /root) may not be readable by it.
as_os_user() {
    if [[ $(id -un) == "$OS_USER" ]]; then
        (cd / && "$@")
    else
        (cd / && runuser -u "$OS_USER" -- "$@")
    fi
}

random_hex() { # random_hex BYTES
    od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}

# Prints N distinct free TCP ports on 127.0.0.1. All sockets are held open
# together so the kernel cannot hand out the same port twice.
free_ports() {
    local n=$1
    local out
    if command -v python3 >/dev/null 2>&1 && out=$(python3 - "$n" 2>/dev/null <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
    ); then
        echo "$out"
        return 0
    fi
    # Fallback without python3: probe random high ports for a listener.
    local ports=() p
    while ((${#ports[@]} < n)); do
        p=$((20000 + RANDOM % 30000))
        [[ " ${ports[*]} " == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            ports+=("$p")
        fi
    done
    echo "${ports[*]}"
}

# True if PID is a live process whose command line mentions NAME (guards
# against a recycled PID from a previous boot or crashed run).
pid_is() { # pid_is PID NAME
    local pid=$1 name=$2 cmdline
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ $cmdline == *"$name"* ]]
}

# For a server this script just started in the background: the process is
# there and not a zombie. Its command line is not checked, because until the
# forked shell has exec'd the server it still shows this script's.
still_running() { # still_running PID
    local state
    [[ $1 =~ ^[0-9]+$ ]] || return 1
    state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && ${state:0:1} != Z ]]
}

read_pid() { # read_pid FILE -> first line of FILE, or nothing
    if [[ -r $1 ]]; then head -n1 -- "$1" 2>/dev/null || true; fi
}

pg_pid() { read_pid "$PG_DATA/postmaster.pid"; }
redis_pid() { read_pid "$REDIS_PIDFILE"; }
garage_pid() { read_pid "$GARAGE_PIDFILE"; }
moto_pid() { read_pid "$MOTO_PIDFILE"; }
rabbitmq_pid() { read_pid "$RMQ_DIR/rabbitmq.pid"; }
epmd_pid() { read_pid "$RMQ_DIR/epmd.pid"; }
etcd_pid() { read_pid "$ETCD_PIDFILE"; }

# Sends SIGTERM, waits, then SIGKILL if the process is still there.
kill_and_wait() { # kill_and_wait LABEL PID NAME
    local label=$1 pid=$2 name=$3 i
    pid_is "$pid" "$name" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_is "$pid" "$name" || return 0
        sleep 0.2
    done
    log "$label (pid $pid) ignored SIGTERM for 20s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# Reports a server that failed to start, with the end of its log, stops
# whatever was already started (the logs stay in the state dir) and exits.
start_failed() { # start_failed LABEL LOGFILE MESSAGE
    local label=$1 logfile=$2 msg=$3
    printf '[testenv] ERROR: %s: %s\n' "$label" "$msg" >&2
    if [[ -s $logfile ]]; then
        # Error lines first: a server may keep logging after the real cause
        # (Garage keeps running when its S3 port cannot be bound).
        if grep -qE 'ERROR|FATAL|PANIC|panicked' -- "$logfile"; then
            printf '[testenv] ---- error lines in %s ----\n' "$logfile" >&2
            grep -E 'ERROR|FATAL|PANIC|panicked' -- "$logfile" | tail -n 10 >&2 || true
        fi
        printf '[testenv] ---- last lines of %s ----\n' "$logfile" >&2
        tail -n 40 -- "$logfile" >&2 || true
        printf '[testenv] ---- end of %s ----\n' "$logfile" >&2
    else
        printf '[testenv] (no log output in %s)\n' "$logfile" >&2
    fi
    stop_servers
    printf '[testenv] servers stopped; logs kept in %s (scripts/testenv.sh stop removes it)\n' "$STATE_DIR" >&2
    exit 1
}

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------
ensure_os_user() {
    id -u "$OS_USER" >/dev/null 2>&1 && return 0
    log "creating system user $OS_USER"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /usr/sbin/nologin "$OS_USER" ||
        die "could not create OS user '$OS_USER' (useradd failed); create it manually"
}

start_postgres() {
    local port=$1
    local label="PostgreSQL (127.0.0.1:$port)"
    mkdir -p "$PG_DIR" "$PG_SOCKET_DIR"
    chown -R "$OS_USER:" "$PG_DIR"

    log "PostgreSQL: initdb"
    # Trust auth is fine: the server only listens on loopback and on a socket
    # inside the state dir. The C locale avoids depending on generated locales.
    if ! as_os_user "$PG_BIN_DIR/initdb" -D "$PG_DATA" -U postgres --data-checksums \
        --auth=trust --encoding=UTF8 --locale=C >"$PG_DIR/initdb.log" 2>&1; then
        start_failed "$label" "$PG_DIR/initdb.log" "initdb failed"
    fi

    # Replication entries are separate in pg_hba ("all" does not match them)
    # and are needed for pg_basebackup / pg_receivewal.
    cat >"$PG_DATA/pg_hba.conf" <<EOF
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
host    all          all   127.0.0.1/32   trust
host    replication  all   127.0.0.1/32   trust
EOF
    # Settings go into postgresql.conf (not the pg_ctl command line) so that a
    # test restarting the server with plain `pg_ctl restart` keeps them.
    # archive_command is a placeholder; tests that exercise WAL archiving set
    # their own (ALTER SYSTEM or editing this file, then reload).
    cat >>"$PG_DATA/postgresql.conf" <<EOF

# ---- dr test environment (scripts/testenv.sh) ----
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PG_SOCKET_DIR'
wal_level = replica
max_wal_senders = 10
archive_mode = on
archive_command = '/bin/true'
EOF
    chown "$OS_USER:" "$PG_DATA/pg_hba.conf" "$PG_DATA/postgresql.conf"

    log "PostgreSQL: starting on 127.0.0.1:$port"
    touch "$PG_LOG" && chown "$OS_USER:" "$PG_LOG"
    if ! as_os_user "$PG_BIN_DIR/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$START_TIMEOUT" start >/dev/null; then
        start_failed "$label" "$PG_LOG" "pg_ctl start failed"
    fi
    if ! "$PG_BIN_DIR/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -XAtqc 'select 1' >/dev/null 2>&1; then
        start_failed "$label" "$PG_LOG" "server started but does not answer queries over TCP"
    fi
}

stop_postgres() {
    local pid
    pid=$(pg_pid)
    pid_is "$pid" postgres || return 0
    log "PostgreSQL: stopping (pid $pid)"
    if ! as_os_user "$PG_BIN_DIR/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1; then
        # e.g. a test replaced the data directory under the running server.
        log "PostgreSQL: pg_ctl stop failed; signalling pid $pid directly"
        kill_and_wait PostgreSQL "$pid" postgres
    fi
}

# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------
start_redis() {
    local port=$1 bin
    local label="Redis (127.0.0.1:$port)"
    bin=$(command -v redis-server)

    mkdir -p "$REDIS_DIR"
    # A config file (rather than flags) keeps CONFIG REWRITE working for tests.
    # No persistence by default: tests that need RDB/AOF files turn it on.
    cat >"$REDIS_CONF" <<EOF
# dr test environment (scripts/testenv.sh)
bind 127.0.0.1
port $port
daemonize yes
pidfile $REDIS_PIDFILE
logfile $REDIS_LOG
dir $REDIS_DIR
save ""
appendonly no
EOF
    chown -R "$OS_USER:" "$REDIS_DIR"

    log "Redis: starting on 127.0.0.1:$port"
    if ! as_os_user "$bin" "$REDIS_CONF" >/dev/null 2>&1; then
        start_failed "$label" "$REDIS_LOG" "redis-server exited with an error"
    fi
    # redis-server daemonizes before binding, so poll until it answers.
    local deadline=$((SECONDS + START_TIMEOUT)) reply pid
    while :; do
        reply=$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null || true)
        [[ $reply == PONG ]] && break
        pid=$(redis_pid)
        if [[ -n $pid ]] && ! pid_is "$pid" redis-server; then
            start_failed "$label" "$REDIS_LOG" "redis-server exited during startup"
        fi
        ((SECONDS < deadline)) || start_failed "$label" "$REDIS_LOG" "no PONG within ${START_TIMEOUT}s"
        sleep 0.1
    done
}

stop_redis() {
    local pid
    pid=$(redis_pid)
    pid_is "$pid" redis-server || return 0
    log "Redis: stopping (pid $pid)"
    kill_and_wait Redis "$pid" redis-server
}

# ---------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------
# A private node (its own name, epmd port, Erlang cookie in its own HOME,
# data and log directories under the state dir) on loopback ports only, so
# neither a system broker nor another test environment is touched.
start_rabbitmq() {
    local amqp_port=$1 mgmt_port=$2 dist_port=$3 epmd_port=$4
    local label="RabbitMQ (management on 127.0.0.1:$mgmt_port)"
    mkdir -p "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
    RMQ_PASSWORD=$(random_hex 16)
    cat >"$RMQ_DIR/rabbitmq.conf" <<EOF
# dr test environment (scripts/testenv.sh)
listeners.tcp.default = 127.0.0.1:$amqp_port
management.tcp.port = $mgmt_port
management.tcp.ip = 127.0.0.1
default_user = $RMQ_USER
default_pass = $RMQ_PASSWORD
default_user_tags.administrator = true
EOF
    # Federation only registers its runtime parameters (federation-upstream),
    # so tests can back up a vhost parameter; nothing is federated.
    echo '[rabbitmq_management,rabbitmq_federation].' >"$RMQ_DIR/enabled_plugins"
    chmod 700 "$RMQ_DIR"
    chown -R "$OS_USER:" "$RMQ_DIR"
    touch "$RMQ_LOG" && chown "$OS_USER:" "$RMQ_LOG"

    # epmd is started here (not by the node, which would daemonize it) so
    # that its PID is known and `stop` can end it.
    log "RabbitMQ: starting epmd on 127.0.0.1:$epmd_port"
    (cd / && exec setpriv --reuid="$OS_USER" --regid="$OS_USER" --init-groups \
        "$EPMD_BIN" -port "$epmd_port" -address 127.0.0.1) </dev/null >>"$RMQ_LOG" 2>&1 &
    echo $! >"$RMQ_DIR/epmd.pid"

    log "RabbitMQ: starting node dr-test@localhost (AMQP :$amqp_port, management :$mgmt_port, distribution :$dist_port)"
    (cd / && exec env -i PATH="$PATH" LANG=C.UTF-8 HOME="$RMQ_DIR" \
        RABBITMQ_NODENAME=dr-test@localhost \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$amqp_port" \
        RABBITMQ_DIST_PORT="$dist_port" \
        ERL_EPMD_PORT="$epmd_port" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia" \
        RABBITMQ_LOG_BASE="$RMQ_DIR/log" \
        RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins" \
        RABBITMQ_PID_FILE="$RMQ_DIR/rabbitmq.pid" \
        setpriv --reuid="$OS_USER" --regid="$OS_USER" --init-groups "$RMQ_SERVER_BIN") \
        </dev/null >>"$RMQ_LOG" 2>&1 &
    local launcher=$! deadline=$((SECONDS + START_TIMEOUT))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -u "$RMQ_USER:$RMQ_PASSWORD" \
        "http://127.0.0.1:$mgmt_port/api/overview" 2>/dev/null || true) == 200 ]]; do
        still_running "$launcher" || start_failed "$label" "$RMQ_LOG" "rabbitmq-server exited during startup"
        ((SECONDS < deadline)) || start_failed "$label" "$RMQ_LOG" "management API did not answer within ${START_TIMEOUT}s"
        sleep 0.3
    done
    [[ -n $(rabbitmq_pid) ]] || start_failed "$label" "$RMQ_LOG" "no pid file $RMQ_DIR/rabbitmq.pid"
}

stop_rabbitmq() {
    local pid
    pid=$(rabbitmq_pid)
    if pid_is "$pid" beam; then
        log "RabbitMQ: stopping (pid $pid)"
        kill_and_wait RabbitMQ "$pid" beam
    fi
    pid=$(epmd_pid)
    if pid_is "$pid" epmd; then
        log "RabbitMQ: stopping epmd (pid $pid)"
        kill_and_wait epmd "$pid" epmd
    fi
}

# ---------------------------------------------------------------------------
# Garage (S3)
# ---------------------------------------------------------------------------
garage_cli() { garage -c "$GARAGE_CONF" "$@"; }

# Runs a garage CLI step during setup; on failure shows its output and the
# server log, then aborts the start.
garage_step() { # garage_step ARGS...
    local out
    if ! out=$(garage_cli "$@" 2>&1); then
        printf '%s\n' "$out" >&2
        start_failed "Garage" "$GARAGE_LOG" "'garage $*' failed"
    fi
}

start_garage() {
    local s3_port=$1 rpc_port=$2 admin_port=$3
    local label="Garage (S3 on $GARAGE_ADDR:$s3_port)"

    mkdir -p "$GARAGE_DIR/meta" "$GARAGE_DIR/data"
    chmod 700 "$GARAGE_DIR"

    # Fixed-format credentials generated here and imported below, so the
    # script never has to parse `garage key create` output.
    # Access key IDs follow Garage's own format: "GK" + 24 hex digits.
    S3_ACCESS_KEY_ID="GK$(random_hex 12)"
    S3_SECRET_ACCESS_KEY=$(random_hex 32)

    cat >"$GARAGE_CONF" <<EOF
# dr test environment (scripts/testenv.sh): single node, loopback only.
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "sqlite"
replication_factor = 1
# dr stores only compressed, encrypted objects: compressing them again is
# wasted CPU on the machine the tests share with the server.
compression_level = "none"

rpc_bind_addr = "$GARAGE_ADDR:$rpc_port"
rpc_public_addr = "$GARAGE_ADDR:$rpc_port"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "$S3_REGION"
api_bind_addr = "$GARAGE_ADDR:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "$GARAGE_ADDR:$admin_port"
admin_token = "$(random_hex 32)"
EOF
    chmod 600 "$GARAGE_CONF"

    log "Garage: starting (S3 $GARAGE_ADDR:$s3_port, RPC :$rpc_port, admin :$admin_port)"
    # Garage has no daemon mode: run it in the background and record its PID.
    # stdin/stdout are detached so callers capturing our output do not hang.
    NO_COLOR=1 RUST_LOG=${GARAGE_LOG_LEVEL:-garage=info} garage -c "$GARAGE_CONF" server \
        </dev/null >>"$GARAGE_LOG" 2>&1 &
    echo $! >"$GARAGE_PIDFILE"

    local pid deadline=$((SECONDS + START_TIMEOUT))
    pid=$(garage_pid)
    until garage_cli status >/dev/null 2>&1; do
        still_running "$pid" || start_failed "$label" "$GARAGE_LOG" "server process exited"
        ((SECONDS < deadline)) || start_failed "$label" "$GARAGE_LOG" "RPC did not answer within ${START_TIMEOUT}s"
        sleep 0.2
    done

    # Single-node cluster layout: the node must be given a role (zone and
    # capacity) before it stores anything.
    # `node id -q` prints "<64 hex digits>@<rpc_public_addr>".
    local node_id
    node_id=$(garage_cli node id -q 2>&1) ||
        start_failed "$label" "$GARAGE_LOG" "'garage node id -q' failed: $node_id"
    node_id=${node_id%%@*}
    [[ $node_id =~ ^[0-9a-f]{64}$ ]] ||
        start_failed "$label" "$GARAGE_LOG" "unexpected output from 'garage node id -q': $node_id"
    garage_step layout assign -z dc1 -c 1G "$node_id"
    garage_step layout apply --version 1

    garage_step key import --yes -n "$S3_KEY_NAME" "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY"
    garage_step bucket create "$S3_BUCKET"
    garage_step bucket allow --read --write --owner "$S3_BUCKET" --key "$S3_ACCESS_KEY_ID"

    # End-to-end check: a SigV4-signed ListObjectsV2 on the bucket must
    # succeed, which proves the layout, key and permissions all took effect.
    # A short budget: by now the server is up, so a persistent error is a
    # configuration problem, not slowness.
    local code endpoint="http://$GARAGE_ADDR:$s3_port"
    deadline=$((SECONDS + 15))
    while :; do
        code=$(s3_list_status "$endpoint" "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY")
        [[ $code == 200 ]] && break
        ((SECONDS < deadline)) ||
            start_failed "$label" "$GARAGE_LOG" "signed S3 ListObjectsV2 on $endpoint/$S3_BUCKET returned HTTP '${code:-none}' (expected 200)"
        sleep 0.2
    done
}

# Prints the HTTP status of a SigV4-signed ListObjectsV2 on the bucket
# ("000" if nothing answered). Garage requires the x-amz-content-sha256
# header, which curl only signs when given explicitly (here: empty body).
s3_list_status() { # s3_list_status ENDPOINT KEY_ID SECRET
    curl -sS -o /dev/null -w '%{http_code}' --max-time 5 \
        --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$2:$3" \
        -H 'x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855' \
        "$1/$S3_BUCKET?list-type=2" 2>/dev/null || true
}

# moto's server keeps everything in memory; it runs as the invoking user
# because the virtualenv lives in that user's cache.
start_moto() {
    local port=$1 label="moto (S3 on 127.0.0.1:$1)" pid code
    mkdir -p "$MOTO_DIR"
    log "moto: starting on 127.0.0.1:$port"
    (cd "$MOTO_DIR" && exec "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$port") \
        </dev/null >>"$MOTO_LOG" 2>&1 &
    echo $! >"$MOTO_PIDFILE"
    pid=$(moto_pid)
    local deadline=$((SECONDS + START_TIMEOUT))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/" 2>/dev/null || true) == 200 ]]; do
        still_running "$pid" || start_failed "$label" "$MOTO_LOG" "server process exited"
        ((SECONDS < deadline)) || start_failed "$label" "$MOTO_LOG" "no answer within ${START_TIMEOUT}s"
        sleep 0.2
    done
    code=$(curl -sS -o "$MOTO_DIR/create-bucket.out" -w '%{http_code}' --max-time 10 -X PUT \
        --aws-sigv4 "aws:amz:$MOTO_REGION:s3" --user "$MOTO_KEY_ID:$MOTO_SECRET" \
        -H 'x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855' \
        -H 'x-amz-bucket-object-lock-enabled: true' \
        "http://127.0.0.1:$port/$MOTO_LOCK_BUCKET" 2>&1 || true)
    [[ $code == 200 ]] ||
        start_failed "$label" "$MOTO_DIR/create-bucket.out" "creating bucket $MOTO_LOCK_BUCKET with Object Lock returned '$code'"
}

stop_moto() {
    local pid
    pid=$(moto_pid)
    pid_is "$pid" moto_server || return 0
    log "moto: stopping (pid $pid)"
    kill_and_wait moto "$pid" moto_server
}

# ---------------------------------------------------------------------------
# etcd (the store `dr daemon` coordinates automatic failover through)
# ---------------------------------------------------------------------------
start_etcd() {
    local client_port=$1 peer_port=$2 label="etcd (127.0.0.1:$1)" pid
    mkdir -p "$ETCD_DIR/data"
    chmod 700 "$ETCD_DIR/data"
    touch "$ETCD_LOG"
    chown -R "$OS_USER:" "$ETCD_DIR"
    log "etcd: starting on 127.0.0.1:$client_port"
    # One member, loopback only, as the unprivileged user; setpriv execs, so
    # the pid recorded is the server's own.
    (cd / && exec setpriv --reuid="$OS_USER" --regid="$OS_USER" --init-groups "$ETCD_BIN" --name dr-test \
        --data-dir "$ETCD_DIR/data" \
        --listen-client-urls "http://127.0.0.1:$client_port" \
        --advertise-client-urls "http://127.0.0.1:$client_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "dr-test=http://127.0.0.1:$peer_port" \
        --initial-cluster-state new) </dev/null >>"$ETCD_LOG" 2>&1 &
    echo $! >"$ETCD_PIDFILE"
    pid=$(etcd_pid)
    local deadline=$((SECONDS + START_TIMEOUT))
    until [[ $(curl -s --max-time 2 "http://127.0.0.1:$client_port/health" 2>/dev/null || true) == *'"health":"true"'* ]]; do
        still_running "$pid" || start_failed "$label" "$ETCD_LOG" "server process exited"
        ((SECONDS < deadline)) || start_failed "$label" "$ETCD_LOG" "not healthy within ${START_TIMEOUT}s"
        sleep 0.2
    done
}

stop_etcd() {
    local pid
    pid=$(etcd_pid)
    pid_is "$pid" etcd || return 0
    log "etcd: stopping (pid $pid)"
    kill_and_wait etcd "$pid" etcd
}

stop_garage() {
    local pid
    pid=$(garage_pid)
    pid_is "$pid" garage || return 0
    log "Garage: stopping (pid $pid)"
    kill_and_wait Garage "$pid" garage
}

# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------
stop_servers() {
    stop_etcd
    stop_moto
    stop_garage
    stop_rabbitmq
    stop_redis
    stop_postgres
}

all_running() {
    pid_is "$(pg_pid)" postgres && pid_is "$(redis_pid)" redis-server && pid_is "$(garage_pid)" garage &&
        pid_is "$(moto_pid)" moto_server && pid_is "$(rabbitmq_pid)" beam && pid_is "$(etcd_pid)" etcd
}

# Refuses to delete a directory this script did not create.
remove_state_dir() {
    [[ -e $STATE_DIR ]] || return 0
    [[ $STATE_DIR != / && -e $MARKER ]] ||
        die "refusing to delete $STATE_DIR: it was not created by scripts/testenv.sh (no $MARKER)"
    rm -rf -- "$STATE_DIR"
}

write_env_file() {
    local pg_port=$1 redis_port=$2 s3_port=$3 moto_port=$4 amqp_port=$5 mgmt_port=$6 etcd_port=$7 tmp=$ENV_FILE.tmp
    {
        echo "# Generated by scripts/testenv.sh start; removed by scripts/testenv.sh stop."
        printf 'export %s=%q\n' \
            DR_TEST_PG_HOST 127.0.0.1 \
            DR_TEST_PG_PORT "$pg_port" \
            DR_TEST_PG_USER postgres \
            DR_TEST_PG_BIN_DIR "$PG_BIN_DIR" \
            DR_TEST_PG_DATA "$PG_DATA" \
            DR_TEST_PG_SOCKET_DIR "$PG_SOCKET_DIR" \
            DR_TEST_OS_USER "$OS_USER" \
            DR_TEST_REDIS_URL "redis://127.0.0.1:$redis_port" \
            DR_TEST_REDIS_SERVER_BIN "$(command -v redis-server)" \
            DR_TEST_RABBITMQ_URL "http://127.0.0.1:$mgmt_port" \
            DR_TEST_RABBITMQ_AMQP_PORT "$amqp_port" \
            DR_TEST_RABBITMQ_USER "$RMQ_USER" \
            DR_TEST_RABBITMQ_PASSWORD "$RMQ_PASSWORD" \
            DR_TEST_RABBITMQ_SERVER_BIN "$RMQ_SERVER_BIN" \
            DR_TEST_S3_ENDPOINT "http://$GARAGE_ADDR:$s3_port" \
            DR_TEST_S3_REGION "$S3_REGION" \
            DR_TEST_S3_BUCKET "$S3_BUCKET" \
            DR_TEST_S3_ACCESS_KEY_ID "$S3_ACCESS_KEY_ID" \
            DR_TEST_S3_SECRET_ACCESS_KEY "$S3_SECRET_ACCESS_KEY" \
            DR_TEST_MOTO_ENDPOINT "http://127.0.0.1:$moto_port" \
            DR_TEST_MOTO_REGION "$MOTO_REGION" \
            DR_TEST_MOTO_LOCK_BUCKET "$MOTO_LOCK_BUCKET" \
            DR_TEST_MOTO_ACCESS_KEY_ID "$MOTO_KEY_ID" \
            DR_TEST_MOTO_SECRET_ACCESS_KEY "$MOTO_SECRET" \
            DR_TEST_ETCD_ENDPOINTS "http://127.0.0.1:$etcd_port" \
            DR_TESTENV_DIR "$STATE_DIR"
    } >"$tmp"
    mv -f -- "$tmp" "$ENV_FILE"
}

# Checked before anything starts, so a missing tool never leaves a
# half-started environment behind.
check_prereqs() {
    local missing=() tool
    for tool in "$PG_BIN_DIR/initdb" "$PG_BIN_DIR/pg_ctl" "$PG_BIN_DIR/psql"; do
        [[ -x $tool ]] || missing+=("$tool")
    done
    for tool in "$RMQ_SERVER_BIN" "$EPMD_BIN" "$ETCD_BIN"; do
        [[ -x $tool ]] || missing+=("$tool")
    done
    for tool in redis-server redis-cli garage curl runuser setpriv od; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [[ -x $MOTO_VENV/bin/moto_server ]] || missing+=("$MOTO_VENV/bin/moto_server")
    ((${#missing[@]} == 0)) ||
        die "missing: ${missing[*]}; run scripts/setup.sh (garage is looked for on PATH and in ~/.cargo/bin)"
}

cmd_start() {
    if [[ -f $ENV_FILE ]] && all_running; then
        log "already running ($STATE_DIR)"
        cat -- "$ENV_FILE"
        return 0
    fi
    if [[ -e $STATE_DIR ]]; then
        if [[ -e $MARKER ]]; then
            log "cleaning up a stale or partial test env in $STATE_DIR"
            stop_servers
            remove_state_dir
        elif [[ -n $(ls -A -- "$STATE_DIR" 2>/dev/null) ]]; then
            die "$STATE_DIR exists, is not empty and was not created by this script; set DR_TESTENV_DIR to another path"
        fi
    fi

    [[ $(id -u) == 0 || $(id -un) == "$OS_USER" ]] ||
        die "run as root (PostgreSQL and Redis are started as user '$OS_USER' via runuser)"
    [[ $(id -u) != 0 ]] || ensure_os_user
    check_prereqs

    local t0=$SECONDS
    mkdir -p -- "$STATE_DIR"
    touch -- "$MARKER"
    # The servers run as $OS_USER and must be able to reach their
    # subdirectories (e.g. mktemp -d creates mode 0700 directories).
    chmod 755 -- "$STATE_DIR"
    as_os_user test -x "$STATE_DIR" ||
        die "user '$OS_USER' cannot access $STATE_DIR (a parent directory is not searchable); set DR_TESTENV_DIR to a path under /tmp"
    # Unix socket paths are limited to 107 bytes.
    ((${#PG_SOCKET_DIR} < 80)) ||
        die "DR_TESTENV_DIR is too long for PostgreSQL's Unix socket path; use a shorter one"

    local ports pg_port redis_port s3_port rpc_port admin_port moto_port amqp_port mgmt_port dist_port epmd_port etcd_port etcd_peer_port
    ports=$(free_ports 12)
    read -r pg_port redis_port s3_port rpc_port admin_port moto_port amqp_port mgmt_port dist_port epmd_port etcd_port etcd_peer_port <<<"$ports"

    start_postgres "$pg_port"
    start_redis "$redis_port"
    start_rabbitmq "$amqp_port" "$mgmt_port" "$dist_port" "$epmd_port"
    start_garage "$s3_port" "$rpc_port" "$admin_port"
    start_moto "$moto_port"
    start_etcd "$etcd_port" "$etcd_peer_port"

    write_env_file "$pg_port" "$redis_port" "$s3_port" "$moto_port" "$amqp_port" "$mgmt_port" "$etcd_port"
    log "all servers up in $((SECONDS - t0))s; environment in $ENV_FILE"
    cat -- "$ENV_FILE"
}

cmd_stop() {
    if [[ ! -e $STATE_DIR ]]; then
        log "not running (no $STATE_DIR)"
        return 0
    fi
    stop_servers
    remove_state_dir
    log "stopped; removed $STATE_DIR"
}

cmd_status() {
    if [[ ! -f $ENV_FILE ]]; then
        log "not running (no $ENV_FILE)"
        return 3
    fi
    # shellcheck disable=SC1090
    source "$ENV_FILE"
    local ok=0 pid reply code
    local redis_port=${DR_TEST_REDIS_URL##*:}

    pid=$(pg_pid)
    if pid_is "$pid" postgres &&
        "$PG_BIN_DIR/pg_isready" -q -h 127.0.0.1 -p "$DR_TEST_PG_PORT" -U postgres; then
        echo "postgres: running (pid $pid, 127.0.0.1:$DR_TEST_PG_PORT, data $PG_DATA)"
    else
        echo "postgres: NOT answering (127.0.0.1:$DR_TEST_PG_PORT; log $PG_LOG)"
        ok=3
    fi

    pid=$(redis_pid)
    reply=$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null || true)
    if pid_is "$pid" redis-server && [[ $reply == PONG ]]; then
        echo "redis:    running (pid $pid, 127.0.0.1:$redis_port)"
    else
        echo "redis:    NOT answering (127.0.0.1:$redis_port; log $REDIS_LOG)"
        ok=3
    fi

    pid=$(rabbitmq_pid)
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -u "$DR_TEST_RABBITMQ_USER:$DR_TEST_RABBITMQ_PASSWORD" \
        "$DR_TEST_RABBITMQ_URL/api/overview" 2>/dev/null || true)
    if pid_is "$pid" beam && [[ $code == 200 ]]; then
        echo "rabbitmq: running (pid $pid, management $DR_TEST_RABBITMQ_URL, AMQP 127.0.0.1:$DR_TEST_RABBITMQ_AMQP_PORT)"
    else
        echo "rabbitmq: NOT answering (management $DR_TEST_RABBITMQ_URL returned '${code:-none}'; log $RMQ_LOG)"
        ok=3
    fi

    pid=$(garage_pid)
    code=$(s3_list_status "$DR_TEST_S3_ENDPOINT" "$DR_TEST_S3_ACCESS_KEY_ID" "$DR_TEST_S3_SECRET_ACCESS_KEY")
    if pid_is "$pid" garage && [[ $code == 200 ]]; then
        echo "garage:   running (pid $pid, S3 $DR_TEST_S3_ENDPOINT, bucket $DR_TEST_S3_BUCKET)"
    else
        echo "garage:   NOT answering (S3 $DR_TEST_S3_ENDPOINT returned '${code:-none}'; log $GARAGE_LOG)"
        ok=3
    fi

    pid=$(moto_pid)
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$DR_TEST_MOTO_ENDPOINT/" 2>/dev/null || true)
    if pid_is "$pid" moto_server && [[ $code == 200 ]]; then
        echo "moto:     running (pid $pid, S3 $DR_TEST_MOTO_ENDPOINT, Object Lock bucket $DR_TEST_MOTO_LOCK_BUCKET)"
    else
        echo "moto:     NOT answering (S3 $DR_TEST_MOTO_ENDPOINT returned '${code:-none}'; log $MOTO_LOG)"
        ok=3
    fi

    pid=$(etcd_pid)
    reply=$(curl -s --max-time 5 "$DR_TEST_ETCD_ENDPOINTS/health" 2>/dev/null || true)
    if pid_is "$pid" etcd && [[ $reply == *'"health":"true"'* ]]; then
        echo "etcd:     running (pid $pid, $DR_TEST_ETCD_ENDPOINTS)"
    else
        echo "etcd:     NOT answering ($DR_TEST_ETCD_ENDPOINTS/health; log $ETCD_LOG)"
        ok=3
    fi
    return "$ok"
}

cmd_env() {
    [[ -f $ENV_FILE ]] || die "test env not started (no $ENV_FILE); run: scripts/testenv.sh start"
    cat -- "$ENV_FILE"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cmd_env ;;
*)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
