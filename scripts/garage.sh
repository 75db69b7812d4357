#!/usr/bin/env bash
# A throwaway single-node Garage S3 server for the tests.
#
#   scripts/garage.sh start <dir>   start Garage in <dir> (bucket, key, <dir>/env)
#   scripts/garage.sh stop <dir>    stop the Garage started in <dir>
#
# Everything binds to 127.0.0.1 on free ports, so several instances can coexist.
# `source <dir>/env` exports FIRN_TEST_S3_{ENDPOINT,BUCKET,REGION,ACCESS_KEY_ID,
# SECRET_ACCESS_KEY} and GARAGE_PID (plus GARAGE_CONFIG_FILE, so a plain
# `garage status` works, and GARAGE_ADMIN_ENDPOINT).
# Garage and the setup commands log to <dir>/garage.log (GARAGE_RUST_LOG sets its RUST_LOG).
set -euo pipefail
unset AWS_CA_BUNDLE # breaks S3 clients talking plain HTTP
# garage reads these; ours come from the config file
unset GARAGE_CONFIG_FILE GARAGE_RPC_HOST GARAGE_RPC_SECRET GARAGE_RPC_SECRET_FILE \
    GARAGE_ADMIN_TOKEN GARAGE_ADMIN_TOKEN_FILE GARAGE_METRICS_TOKEN GARAGE_METRICS_TOKEN_FILE

BUCKET=firn-test
REGION=garage
KEY_NAME=firn-test-key

die() {
    echo "garage.sh: $*" >&2
    exit 1
}

usage() { die "usage: $0 start|stop <dir>"; }

garage_bin() {
    if command -v garage >/dev/null 2>&1; then
        command -v garage
    elif [ -x "$HOME/.cargo/bin/garage" ]; then
        echo "$HOME/.cargo/bin/garage"
    else
        die "garage not found; install it with: cargo install garage --locked"
    fi
}

# N distinct free loopback ports (all held open at once so they differ).
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Is $1 a live (not zombie) process?
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

start() {
    local dir=$1 bin pid s3 rpc admin i node
    bin=$(garage_bin)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd -P)
    if [ -f "$dir/garage.pid" ] && alive "$(cat "$dir/garage.pid")"; then
        die "already running in $dir (pid $(cat "$dir/garage.pid"))"
    fi
    local cfg=$dir/garage.toml log=$dir/garage.log
    read -r s3 rpc admin <<<"$(free_ports 3)"

    (
        umask 077
        cat >"$cfg" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 1
# What firn stores is encrypted, so zstd (Garage's default) cannot shrink it and only takes
# CPU from the clients that share this machine with the server.
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(openssl rand -hex 32)"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
admin_token = "$(openssl rand -hex 32)"
EOF
    )

    : >"$log"
    NO_COLOR=1 RUST_LOG=${GARAGE_RUST_LOG:-garage=info} "$bin" -c "$cfg" server </dev/null >>"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/garage.pid"

    g() { "$bin" -c "$cfg" "$@" </dev/null; }
    fail() {
        echo "garage.sh: $*" >&2
        exit 1
    }
    # Whatever goes wrong from here on: show the log, stop the server.
    started=
    local qlog qdir
    qlog=$(printf %q "$log") qdir=$(printf %q "$dir")
    # shellcheck disable=SC2064 # paths expand now, on purpose
    trap "[ -n \"\$started\" ] || { echo '--- garage.log:' >&2; cat $qlog >&2; stop $qdir; }" EXIT

    # Wait until the node answers.
    for i in $(seq 1 60); do
        alive "$pid" || fail "garage exited during startup"
        g status >/dev/null 2>&1 && break
        [ "$i" = 60 ] && fail "garage did not answer within 30s"
        sleep 0.5
    done

    # One node, one zone, layout version 1.
    node=$(g node id -q 2>/dev/null) || fail "garage node id failed"
    node=${node%%@*}
    g layout assign -z dc1 -c 10G "$node" >>"$log" 2>&1 || fail "layout assign failed"
    g layout apply --version 1 >>"$log" 2>&1 || fail "layout apply failed"

    for i in $(seq 1 60); do
        g json-api GetClusterHealth 2>/dev/null |
            python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["status"] != "healthy")' 2>/dev/null &&
            break
        [ "$i" = 60 ] && fail "cluster not healthy within 30s"
        sleep 0.5
    done

    # Bucket and key (the JSON admin API gives the secret in a parseable form).
    g bucket create "$BUCKET" >>"$log" 2>&1 || fail "bucket create failed"
    local key_json key_id key_secret
    key_json=$(g json-api CreateKey "{\"name\":\"$KEY_NAME\"}") || fail "key create failed"
    key_id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["accessKeyId"])' <<<"$key_json")
    key_secret=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["secretAccessKey"])' <<<"$key_json")
    if [ -z "$key_id" ] || [ -z "$key_secret" ]; then fail "could not parse the new key"; fi
    g bucket allow --read --write --owner "$BUCKET" --key "$key_id" >>"$log" 2>&1 ||
        fail "bucket allow failed"

    {
        echo "export FIRN_TEST_S3_ENDPOINT=http://127.0.0.1:$s3"
        echo "export FIRN_TEST_S3_BUCKET=$BUCKET"
        echo "export FIRN_TEST_S3_REGION=$REGION"
        echo "export FIRN_TEST_S3_ACCESS_KEY_ID=$key_id"
        echo "export FIRN_TEST_S3_SECRET_ACCESS_KEY=$key_secret"
        echo "export GARAGE_PID=$pid"
        echo "export GARAGE_CONFIG_FILE=$(printf %q "$cfg")"
        echo "export GARAGE_ADMIN_ENDPOINT=http://127.0.0.1:$admin"
    } >"$dir/env.tmp"
    chmod 600 "$dir/env.tmp"
    mv "$dir/env.tmp" "$dir/env"
    started=1
    echo "garage (pid $pid) serving S3 on http://127.0.0.1:$s3, bucket $BUCKET; env in $dir/env"
}

stop() {
    local dir=$1 pid i
    [ -f "$dir/garage.pid" ] || return 0
    pid=$(cat "$dir/garage.pid")
    # Only ever kill the garage server that uses this directory's config.
    if alive "$pid" && ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/garage.toml"; then
        echo "garage.sh: pid $pid is not the garage of $dir; not killing it" >&2
    elif alive "$pid"; then
        kill "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do
            alive "$pid" || break
            [ "$i" = 50 ] && kill -KILL "$pid" 2>/dev/null
            sleep 0.1
        done
        alive "$pid" && die "could not stop garage (pid $pid)"
        wait "$pid" 2>/dev/null || true # reap it if it is our child
    fi
    rm -f "$dir/garage.pid"
}

[ $# = 2 ] || usage
case $1 in
    start) start "$2" ;;
    stop) stop "$(cd "$2" 2>/dev/null && pwd -P || echo "$2")" ;;
    *) usage ;;
esac
