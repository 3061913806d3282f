#!/usr/bin/env bash
# Publisher benchmark: N WebSocket clients against streampipe's publisher and,
# in the same run, against Socket.IO 4.8 + @socket.io/redis-adapter (the peer
# baseline), same workload: clients spread over channels (rooms), R updates/s
# through Redis. Prints RSS per idle connection, delivered messages/s and
# (Server ports stay below the ephemeral range 32768+, which the clients use.)
# emitter → client latency. Each scenario is CLIENTS:CHANNELS:RATE; the
# arguments replace the default list.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
export STREAMPIPE_STACK_DIR=$ROOT/.stack-bench STREAMPIPE_REDIS_PORT=36379 STREAMPIPE_BROKERS=none
# 10k clients with a channel each at 10k updates/s (the latency target);
# 10 clients per channel (100k messages/s delivered); the most connections
# the sandbox's per-process open-file limit allows.
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=(10000:10000:10000 10000:1000:10000 18000:1800:10000)
SECONDS_LOAD=${SECONDS_LOAD:-10}
ensure_packages
command -v node >/dev/null || ensure_packages nodejs npm
log "building release binaries"
cargo build --release --quiet -p streampipe-publisher -p streampipe-tests --bins
R=$CARGO_TARGET_DIR/release
(cd tests/bench/socketio && { [ -d node_modules ] || npm ci --silent --no-audit --no-fund; })

scripts/stack.sh down >/dev/null 2>&1 || true
rm -rf "$STREAMPIPE_STACK_DIR"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; scripts/stack.sh down >/dev/null 2>&1 || true' EXIT
scripts/stack.sh up >/dev/null
# The sandbox caps open files per process (ulimit -Hn); each side needs one per client.
echo "open-file limit per process: $(ulimit -n) (hard $(ulimit -Hn))"

port=0
for scenario in "${SCENARIOS[@]}"; do
    IFS=: read -r n channels RATE <<<"$scenario"
    port=$((port + 1))
    # streampipe publisher (Kafka is not used: channels are registered in Redis
    # directly and updates published to their pub/sub, as reducers do).
    # Anonymous (hand-registered channels have no owner) and without
    # per-client limits (the load generator is one client).
    "$R/streampipe-publisher" --brokers 127.0.0.1:1 --pipeline bench --redis-url redis://127.0.0.1:36379 \
        --listen 127.0.0.1:$((18180 + port)) --metrics-listen 127.0.0.1:$((18280 + port)) \
        --max-connections 1000000 --auth-mode anonymous --bench-no-client-limits \
        --log-format text >"$STREAMPIPE_STACK_DIR/publisher.log" 2>&1 &
    pub=$!; PIDS+=("$pub")
    for _ in $(seq 1 300); do curl -sf http://127.0.0.1:$((18180 + port))/readyz >/dev/null && break; sleep 0.1; done
    "$R/streampipe-bench-publisher" --target streampipe --addr 127.0.0.1:$((18180 + port)) \
        --metrics-addr 127.0.0.1:$((18280 + port)) --pid "$pub" \
        --clients "$n" --channels "$channels" --markets "$channels" --rate "$RATE" --seconds "$SECONDS_LOAD"
    kill "$pub" 2>/dev/null || true; wait "$pub" 2>/dev/null || true

    node tests/bench/socketio/server.js --port $((13300 + port)) --redis redis://127.0.0.1:36379 >"$STREAMPIPE_STACK_DIR/socketio.log" 2>&1 &
    sio=$!; PIDS+=("$sio")
    for _ in $(seq 1 300); do grep -q ready "$STREAMPIPE_STACK_DIR/socketio.log" && break; sleep 0.1; done
    "$R/streampipe-bench-publisher" --target socketio --addr 127.0.0.1:$((13300 + port)) --pid "$sio" \
        --clients "$n" --channels "$channels" --rate "$RATE" --seconds "$SECONDS_LOAD" \
        --emitter "node tests/bench/socketio/emitter.js --redis redis://127.0.0.1:36379"
    kill "$sio" 2>/dev/null || true; wait "$sio" 2>/dev/null || true
done
