#!/usr/bin/env bash
# The main job, locally: Redis and the dev Kafka broker on loopback, two
# reducers, a publisher serving the live odds page, and the demo odds feed.
# Prints the page's URL; runs until Ctrl-C, then stops everything it started.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

export STREAMPIPE_BROKERS=dev
STACK_DIR=${STREAMPIPE_STACK_DIR:-$ROOT/.stack}
REDIS_URL=redis://127.0.0.1:${STREAMPIPE_REDIS_PORT:-16379}
BROKERS=127.0.0.1:${STREAMPIPE_DEVBROKER_PORT:-19092}
PUBLISHER_PORT=${STREAMPIPE_PUBLISHER_PORT:-8080}
PUBLISHER_METRICS_PORT=${STREAMPIPE_PUBLISHER_METRICS_PORT:-9190}

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
DEMO_MARKETS=$("$BIN_DIR/streampipe-feed" --markets 200 --list-markets 12)
# Token mode with a secret made for this run only; the live page mints its
# tokens from the development endpoint (--dev-tokens: never in production).
STREAMPIPE_AUTH_HS256_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export STREAMPIPE_AUTH_HS256_SECRET STREAMPIPE_DEV_TOKENS=true
STREAMPIPE_LOG_FORMAT=text RUST_LOG=warn "$BIN_DIR/streampipe-publisher" \
    --brokers "$BROKERS" --redis-url "$REDIS_URL" --listen "127.0.0.1:$PUBLISHER_PORT" \
    --metrics-listen "127.0.0.1:$PUBLISHER_METRICS_PORT" --demo-markets "$DEMO_MARKETS" >"$STACK_DIR/publisher.log" 2>&1 &
pids+=($!)
"$BIN_DIR/streampipe-feed" --brokers "$BROKERS" --markets 200 --rate 500 \
    --demo-channel demo --demo-markets 5 >"$STACK_DIR/feed.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$PUBLISHER_PORT/readyz" >/dev/null && break
    sleep 0.1
done

cat <<INFO

  streampipe demo is running (Ctrl-C stops it):

    live odds page:  http://127.0.0.1:$PUBLISHER_PORT/

    publisher: http://127.0.0.1:$PUBLISHER_METRICS_PORT/metrics (log: $STACK_DIR/publisher.log)
    reducers:  http://127.0.0.1:9101/metrics  http://127.0.0.1:9102/metrics
    feed:      200 markets, 500 updates/s (log: $STACK_DIR/feed.log)
    raw pub/sub of the first market (one message per update while a page watches it):
      redis-cli -p ${STREAMPIPE_REDIS_PORT:-16379} subscribe 'sp:streampipe:{m:${DEMO_MARKETS%%,*}}:up'

INFO
wait "${pids[@]}"
