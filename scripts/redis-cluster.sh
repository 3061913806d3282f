#!/usr/bin/env bash
# A local Redis Cluster on loopback: 3 masters + 3 replicas of the Debian
# redis-server, for the reducer's cluster mode and its tests.
#
#   scripts/redis-cluster.sh up|down|status DIR BASE_PORT
#
# Nodes listen on 127.0.0.1:BASE_PORT..BASE_PORT+5 (cluster bus: port+10000).
# `up` writes DIR/url, the seed list `redis://127.0.0.1:BASE_PORT,...`.
# Idempotent like scripts/stack.sh: `up` starts only nodes that are not
# running and creates the cluster only once; `down` stops exactly the
# processes `up` started (pid files in DIR) and removes DIR's files.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ACTION=${1:-}
DIR=${2:-}
BASE_PORT=${3:-}
if [ -z "$ACTION" ] || [ -z "$DIR" ] || [ -z "$BASE_PORT" ]; then
    echo "usage: $0 up|down|status DIR BASE_PORT" >&2; exit 2
fi
# Three masters with one replica each: the smallest cluster that survives a
# master's death (a majority of masters must agree to promote its replica).
NODES=6
# Milliseconds before a silent master is declared failed and its replica
# promoted: short, so failover tests finish in seconds.
NODE_TIMEOUT_MS=2000
# Each node gets its own --dbfilename: a replica writes its master's
# snapshot to DIR/<dbfilename> and then loads that file, so replicas sharing
# one name could load each other's data. `up` returns only once every
# replica finished its first sync (and replication starts at once, not after
# the default 5 s diskless-sync delay): a master killed before that leaves a
# replica with no data, which Redis rightly refuses to promote (the cluster
# then stays down), and which would lose every key if it were promoted.
# Starts of one node before giving up, 2 s apart: a port inside the
# ephemeral range (32768-60999 on Linux) can be held by a client socket in
# TIME-WAIT for 60 s, which makes redis-server's bind fail.
START_ATTEMPTS=35
PORTS=()
for i in $(seq 0 $((NODES - 1))); do PORTS+=($((BASE_PORT + i))); done

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

wait_until() { # what, tries (0.1 s each), command...
    local what=$1 tries=$2; shift 2
    for _ in $(seq 1 "$tries"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "timed out waiting for $what"; return 1
}

replica_synced() { # port: a master, or a replica whose first sync is done
    local info
    info=$(redis-cli -h 127.0.0.1 -p "$1" info replication 2>/dev/null) || return 1
    grep -q '^role:master' <<<"$info" && return 0
    grep -q '^master_link_status:up' <<<"$info" && grep -q '^master_sync_in_progress:0' <<<"$info"
}

all_synced() {
    local p
    for p in "${PORTS[@]}"; do
        running "$p" || continue
        replica_synced "$p" || return 1
    done
}

cluster_ok() { # port
    redis-cli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

all_ok() {
    local p
    for p in "${PORTS[@]}"; do
        running "$p" || continue
        cluster_ok "$p" || return 1
    done
}

# Slots assigned on the first node: 0 until `--cluster create` ran.
assigned_slots() {
    redis-cli -h 127.0.0.1 -p "${PORTS[0]}" cluster info 2>/dev/null \
        | sed -n 's/^cluster_slots_assigned:\([0-9]*\).*/\1/p'
}

node_answers() { # port: waits up to 10 s while the process lives
    local pid _
    pid=$(cat "$DIR/$1.pid")
    for _ in $(seq 1 100); do
        # Our process, not someone else's server on the same port.
        redis-cli -h 127.0.0.1 -p "$1" info server 2>/dev/null | grep -q "^process_id:$pid" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

start_node() { # port
    local p=$1 attempt
    for attempt in $(seq 1 "$START_ATTEMPTS"); do
        # --daemonize no + nohup: the pid in the file is redis-server itself.
        nohup redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file "$DIR/nodes-$p.conf" --cluster-node-timeout "$NODE_TIMEOUT_MS" \
            --cluster-announce-ip 127.0.0.1 --repl-diskless-sync-delay 0 \
            --appendonly no --save '' --dir "$DIR" --dbfilename "dump-$p.rdb" \
            >"$DIR/$p.log" 2>&1 </dev/null &
        echo $! >"$DIR/$p.pid"
        if node_answers "$p"; then
            log "redis $p started (pid $(cat "$DIR/$p.pid"), log $DIR/$p.log)"
            return 0
        fi
        # The port (or its bus port, +10000) held by another socket makes
        # redis-server exit at once (see START_ATTEMPTS): try again.
        kill -KILL "$(cat "$DIR/$p.pid")" 2>/dev/null || true
        log "redis $p: attempt $attempt: $(tail -1 "$DIR/$p.log")"
        sleep 2
    done
    rm -f "$DIR/$p.pid"
    log "redis $p did not start"; return 1
}

up() {
    ensure_packages
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    local p
    for p in "${PORTS[@]}"; do
        if running "$p"; then log "redis $p already running (pid $(cat "$DIR/$p.pid"))"; continue; fi
        start_node "$p"
    done
    if [ "$(assigned_slots)" != 16384 ]; then
        local addrs=()
        for p in "${PORTS[@]}"; do addrs+=("127.0.0.1:$p"); done
        redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log" 2>&1 \
            || { log "cluster create failed (see $DIR/create.log)"; cat "$DIR/create.log" >&2; return 1; }
    fi
    wait_until "cluster_state:ok on every node" 300 all_ok
    wait_until "every replica synced with its master" 300 all_synced
    local url="" sep=""
    for p in "${PORTS[@]}"; do url+="${sep}redis://127.0.0.1:$p"; sep=","; done
    echo "$url" >"$DIR/url"
    status
}

down() {
    [ -d "$DIR" ] || return 0
    local p pid
    for p in "${PORTS[@]}"; do
        pid=$(cat "$DIR/$p.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
            log "redis $p stopped"
        fi
        rm -f "$DIR/$p.pid" "$DIR/$p.log" "$DIR/nodes-$p.conf" "$DIR/dump-$p.rdb"
    done
    rm -f "$DIR/url" "$DIR/create.log"
    rmdir "$DIR" 2>/dev/null || true
}

status() {
    local p role
    for p in "${PORTS[@]}"; do
        if running "$p"; then
            role=$(redis-cli -h 127.0.0.1 -p "$p" role 2>/dev/null | head -1 || true)
            echo "redis $p: running (pid $(cat "$DIR/$p.pid"), ${role:-unknown})"
        else
            echo "redis $p: stopped"
        fi
    done
    if all_ok; then echo "cluster: ok"; else echo "cluster: not ok"; fi
    [ -f "$DIR/url" ] && echo "url: $(cat "$DIR/url")"
    return 0
}

case "$ACTION" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status DIR BASE_PORT" >&2; exit 2 ;;
esac
