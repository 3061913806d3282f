#!/usr/bin/env bash
# The local stack on loopback: Redis, the dev Kafka broker (librdkafka's mock
# cluster) and tansu, with the pipeline's data and command topics created with
# equal partition counts.
#
#   scripts/stack.sh up|down|status|env
#
# Idempotent: `up` starts only what is not running and `down` stops only what
# `up` started (pid files in $STREAMPIPE_STACK_DIR). Settings (environment):
#   STREAMPIPE_STACK_DIR   state, logs, pid files      [.stack]
#   STREAMPIPE_BROKERS     which brokers to run        ["dev tansu"]
#   STREAMPIPE_PIPELINE    pipeline whose topics to create [streampipe]
#   STREAMPIPE_PARTITIONS  partitions of data and command topics [8]
#   STREAMPIPE_REDIS_PORT / _DEVBROKER_PORT / _DEVBROKER_ADMIN_PORT / _TANSU_PORT
#   STREAMPIPE_STACK_ADDRESS  address Redis and the brokers listen on (and the
#                          brokers advertise) [127.0.0.1]; scripts/node.sh's
#                          gateway makes them reachable from pods
set -euo pipefail
source "$(dirname "$0")/lib.sh"

STACK_DIR=${STREAMPIPE_STACK_DIR:-$ROOT/.stack}
BROKERS=${STREAMPIPE_BROKERS:-dev tansu}
PIPELINE=${STREAMPIPE_PIPELINE:-streampipe}
PARTITIONS=${STREAMPIPE_PARTITIONS:-8}
REDIS_PORT=${STREAMPIPE_REDIS_PORT:-16379}
DEV_PORT=${STREAMPIPE_DEVBROKER_PORT:-19092}
DEV_ADMIN_PORT=${STREAMPIPE_DEVBROKER_ADMIN_PORT:-19093}
TANSU_PORT=${STREAMPIPE_TANSU_PORT:-19192}
ADDR=${STREAMPIPE_STACK_ADDRESS:-127.0.0.1}
TOPICS=("$PIPELINE.data:$PARTITIONS" "$PIPELINE.commands:$PARTITIONS" "$PIPELINE.dead-letter:1")

running() { [ -f "$STACK_DIR/$1.pid" ] && kill -0 "$(cat "$STACK_DIR/$1.pid")" 2>/dev/null; }

start() { # name, command...
    local name=$1; shift
    if running "$name"; then log "$name already running (pid $(cat "$STACK_DIR/$name.pid"))"; return; fi
    nohup "$@" >"$STACK_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$STACK_DIR/$name.pid"
    log "$name started (pid $!, log $STACK_DIR/$name.log)"
}

wait_until() { # what, command...
    local what=$1; shift
    for _ in $(seq 1 200); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "timed out waiting for $what"; return 1
}

port_open() { (exec 3<>"/dev/tcp/$ADDR/$1") 2>/dev/null; }

up() {
    ensure_packages
    mkdir -p "$STACK_DIR"
    # AOF, fsynced every second, as production must run it (docs/operations.md,
    # "Redis durability"): a restarted Redis comes back with its channel and
    # subscription sets instead of silently empty. No RDB snapshots on top.
    # No password on a test Redis: protected mode (which refuses clients
    # from other addresses then) stays on for loopback only.
    local protected=yes
    [ "$ADDR" = 127.0.0.1 ] || protected=no
    start redis redis-server --port "$REDIS_PORT" --bind "$ADDR" --protected-mode "$protected" \
        --save '' --appendonly yes --appendfsync everysec --dir "$STACK_DIR"
    wait_until "redis" redis-cli -h "$ADDR" -p "$REDIS_PORT" ping
    case " $BROKERS " in *" dev "*)
        [ -x "$BIN_DIR/streampipe-devbroker" ] || ensure_workspace_bins
        local args=()
        for t in "${TOPICS[@]}"; do args+=(--topic "$t"); done
        start devbroker "$BIN_DIR/streampipe-devbroker" --listen "$ADDR:$DEV_PORT" \
            --admin "$ADDR:$DEV_ADMIN_PORT" "${args[@]}"
        wait_until "dev broker" curl -sf "http://$ADDR:$DEV_ADMIN_PORT/healthz"
    esac
    case " $BROKERS " in *" tansu "*)
        ensure_tansu
        mkdir -p "$STACK_DIR/tansu"
        # The SQLite engine wants a relative path; run from the state folder.
        # (The memory engine reports wrong high watermarks.)
        start tansu bash -c "cd '$STACK_DIR/tansu' && exec '$TANSU_BIN' broker \
            --listener-url tcp://$ADDR:$TANSU_PORT --advertised-listener-url tcp://$ADDR:$TANSU_PORT \
            --storage-engine sqlite://tansu.db"
        wait_until "tansu" port_open "$TANSU_PORT"
        for t in "${TOPICS[@]}"; do
            # Creating an existing topic fails harmlessly; never delete topics on
            # tansu 0.6 (deleting one deletes all).
            "$TANSU_BIN" topic create --broker "tcp://$ADDR:$TANSU_PORT" \
                --partitions "${t##*:}" "${t%:*}" >/dev/null 2>&1 || true
        done
    esac
    env_file >"$STACK_DIR/env"
    status
}

env_file() {
    echo "export STREAMPIPE_TEST_REDIS_URL=redis://$ADDR:$REDIS_PORT"
    echo "export STREAMPIPE_TEST_DEVBROKER=$ADDR:$DEV_PORT"
    echo "export STREAMPIPE_TEST_DEVBROKER_ADMIN=$ADDR:$DEV_ADMIN_PORT"
    echo "export STREAMPIPE_TEST_TANSU=$ADDR:$TANSU_PORT"
}

down() {
    local name pid
    for name in tansu devbroker redis; do
        [ -f "$STACK_DIR/$name.pid" ] || continue
        pid=$(cat "$STACK_DIR/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
            log "$name stopped"
        fi
        rm -f "$STACK_DIR/$name.pid"
    done
}

status() {
    local name
    for name in redis devbroker tansu; do
        if running "$name"; then echo "$name: running (pid $(cat "$STACK_DIR/$name.pid"))"
        else echo "$name: stopped"; fi
    done
    echo "redis:     redis://$ADDR:$REDIS_PORT"
    echo "devbroker: $ADDR:$DEV_PORT (admin http://$ADDR:$DEV_ADMIN_PORT)"
    echo "tansu:     $ADDR:$TANSU_PORT"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) env_file ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
