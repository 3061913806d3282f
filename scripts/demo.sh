#!/usr/bin/env bash
# The main job, locally: Redis and the dev Kafka broker on loopback, two
# reducers, and the demo odds feed. Runs until Ctrl-C, then stops everything
# it started.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

export STREAMPIPE_BROKERS=dev
STACK_DIR=${STREAMPIPE_STACK_DIR:-$ROOT/.stack}
REDIS_URL=redis://127.0.0.1:${STREAMPIPE_REDIS_PORT:-16379}
BROKERS=127.0.0.1:${STREAMPIPE_DEVBROKER_PORT:-19092}

ensure_packages
ensure_workspace_bins
scripts/stack.sh up >/dev/null

pids=()
cleanup() {
    trap - EXIT INT TERM
    log "stopping the demo"
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    scripts/stack.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

for i in 1 2; do
    STREAMPIPE_LOG_FORMAT=text RUST_LOG=warn "$BIN_DIR/streampipe-reducer" \
        --brokers "$BROKERS" --redis-url "$REDIS_URL" --listen "127.0.0.1:910$i" \
        >"$STACK_DIR/reducer-$i.log" 2>&1 &
    pids+=($!)
done
"$BIN_DIR/streampipe-feed" --brokers "$BROKERS" --markets 200 --rate 500 \
    --demo-channel demo --demo-markets 5 >"$STACK_DIR/feed.log" 2>&1 &
pids+=($!)

cat <<INFO

  streampipe demo is running (Ctrl-C stops it):
    reducers:  http://127.0.0.1:9101/metrics  http://127.0.0.1:9102/metrics
    feed:      200 markets, 500 updates/s (log: $STACK_DIR/feed.log)
    watch the channel "demo" (5 markets) live:
      redis-cli -p ${STREAMPIPE_REDIS_PORT:-16379} subscribe sp:streampipe:ch:demo
    The browser page comes with the publisher (issue 3).

INFO
wait "${pids[@]}"
