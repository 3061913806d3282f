#!/usr/bin/env bash
# Hot-market fan-out benchmark: N watchers with a channel each, all on ONE
# market, whose updates are produced at 1/10/100 updates/s. Runs on a private
# stack (Redis + dev broker or tansu, own ports and folder): R reducers, P publishers
# (each on its own port) and `streampipe-bench-fanout run`, which runs the
# same-run redis-benchmark baselines, the client swarm in its own processes
# and the producer, and prints per step: Redis CPU per update, EVALSHA
# µs/call, pub/sub output buffers, delivered msg/s, loss, resets, p50/p99.
#
#   CLIENTS=10000 PUBLISHERS=1 REDUCERS=1 scripts/bench-fanout.sh [bench args]
#
# The sandbox caps open files at 20 000 per process (hard limit), so a
# publisher (and a swarm process) holds at most PER_PROCESS (18 000) sockets:
# PUBLISHERS defaults to ceil(CLIENTS / PER_PROCESS). Extra arguments go to
# the benchmark (see `streampipe-bench-fanout run --help`), e.g.
# `--rates 1,10 --seconds 10`. Server ports stay below the ephemeral range
# (32768+), which the clients' sockets use.
#
# The end-to-end ramp (Kafka → reducers → Redis → publisher → WebSocket, one
# market per watcher, the producer round robin over the markets) is the same
# script with `--markets`:
#
#   CLIENTS=10000 REDUCERS=2 scripts/bench-fanout.sh --markets 10000 \
#       --rates 5000,10000,20000,40000 --seconds 10
#
# It ends with the highest step that kept p99 ≤ 100 ms with no watcher
# lost, and the publisher's CPU per delivered message. REDIS_CLUSTER=1 runs
# either on a 3-master + 3-replica Redis Cluster (scripts/redis-cluster.sh,
# ports 26500-26505) instead of the standalone Redis; Redis figures are then
# summed over the six nodes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
CLIENTS=${CLIENTS:-10000}
PER_PROCESS=${PER_PROCESS:-18000}
PUBLISHERS=${PUBLISHERS:-$(((CLIENTS + PER_PROCESS - 1) / PER_PROCESS))}
REDUCERS=${REDUCERS:-1}
# Extra publisher flags (word-split), e.g. PUBLISHER_ARGS="--socket-send-buffer-bytes 0"
# for the kernel's send-buffer autotuning instead of the publisher's default.
read -r -a PUBLISHER_EXTRA <<<"${PUBLISHER_ARGS:-}"
# BROKER=dev (librdkafka's mock cluster) or tansu. The mock cluster keeps at
# most 5 MB per partition and all of one market's commands share a partition,
# so a lagging reducer is reset past commands it never read once the
# subscribe + begin commands of more than ~25 000 watchers pile up: use tansu
# beyond that.
BROKER=${BROKER:-dev}
REDIS_PORT=26479
REDIS_CLUSTER=${REDIS_CLUSTER:-0}
CLUSTER_PORT=26500
# PIN_REDIS=1 gives Redis a core of its own (CPU 0; everything else, this
# script's children included, runs on CPU 1), as a production Redis has its
# own machine: on 2 shared cores, a script call's wall time otherwise
# includes Redis being descheduled by the publishers and the swarm.
PIN_REDIS=${PIN_REDIS:-0}
# State and logs (redis.log, reducer-*.log, publisher-*.log) live outside
# the clone, like the build cache.
export STREAMPIPE_STACK_DIR=$STREAMPIPE_CACHE/stack-fanout STREAMPIPE_BROKERS=$BROKER STREAMPIPE_PIPELINE=fanout
export STREAMPIPE_REDIS_PORT=$REDIS_PORT STREAMPIPE_DEVBROKER_PORT=29192 STREAMPIPE_DEVBROKER_ADMIN_PORT=29193
export STREAMPIPE_TANSU_PORT=29392
case $BROKER in
    dev) KAFKA=127.0.0.1:29192 ;;
    tansu) KAFKA=127.0.0.1:29392 ;;
    *) log "BROKER must be dev or tansu"; exit 2 ;;
esac
ensure_packages
log "building release binaries"
cargo build --release --quiet -p streampipe-publisher -p streampipe-reducer -p streampipe-tests --bins
R=$CARGO_TARGET_DIR/release
# After the build (which keeps both cores): children inherit the affinity.
if [ "$PIN_REDIS" = 1 ]; then taskset -cp 1 $$ >/dev/null; fi

scripts/stack.sh down >/dev/null 2>&1 || true
rm -rf "$STREAMPIPE_STACK_DIR"
mkdir -p "$STREAMPIPE_STACK_DIR"
PIDS=()
cleanup() {
    local p
    if [ -n "${BENCH:-}" ]; then pkill -TERM -P "$BENCH" 2>/dev/null || true; kill "$BENCH" 2>/dev/null || true; fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    # A reducer whose Redis is gone can hang in its final flush: 5 s, then KILL.
    for p in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    scripts/stack.sh down >/dev/null 2>&1 || true
    if [ "$REDIS_CLUSTER" = 1 ]; then
        scripts/redis-cluster.sh down "$STREAMPIPE_STACK_DIR/cluster" "$CLUSTER_PORT" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
# The stack's dev broker must be the release build too.
BIN_DIR=$R scripts/stack.sh up >/dev/null
ulimit -n "$(ulimit -Hn)"
echo "open-file limit per process: $(ulimit -n) (hard $(ulimit -Hn)); $CLIENTS watchers, $PUBLISHERS publisher(s), $REDUCERS reducer(s), broker $BROKER"

port_free() { # port: fail early rather than measure a leftover process
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then log "port $1 is in use"; exit 1; fi
}
wait_ready() { # url
    for _ in $(seq 1 300); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done
    log "not ready: $1"; return 1
}
if [ "$REDIS_CLUSTER" = 1 ]; then
    scripts/redis-cluster.sh up "$STREAMPIPE_STACK_DIR/cluster" "$CLUSTER_PORT" >/dev/null
    REDIS_URL=$(cat "$STREAMPIPE_STACK_DIR/cluster/url")
    PID_ARGS=()
    for f in "$STREAMPIPE_STACK_DIR"/cluster/*.pid; do
        PID_ARGS+=(--pid "redis=$(cat "$f")")
        if [ "$PIN_REDIS" = 1 ]; then taskset -acp 0 "$(cat "$f")" >/dev/null; fi
    done
    COMMON=(--brokers "$KAFKA" --pipeline fanout --redis-url "$REDIS_URL" --redis-cluster --log-format text)
else
    REDIS_URL=redis://127.0.0.1:$REDIS_PORT
    PID_ARGS=(--pid "redis=$(cat "$STREAMPIPE_STACK_DIR/redis.pid")")
    if [ "$PIN_REDIS" = 1 ]; then taskset -acp 0 "$(cat "$STREAMPIPE_STACK_DIR/redis.pid")" >/dev/null; fi
    COMMON=(--brokers "$KAFKA" --pipeline fanout --redis-url "$REDIS_URL" --log-format text)
fi
for i in $(seq 1 "$REDUCERS"); do
    port_free $((28380 + i))
    "$R/streampipe-reducer" "${COMMON[@]}" --listen "127.0.0.1:$((28380 + i))" \
        >"$STREAMPIPE_STACK_DIR/reducer-$i.log" 2>&1 &
    PIDS+=($!); PID_ARGS+=(--pid "reducer=$!")
    wait_ready "http://127.0.0.1:$((28380 + i))/readyz"
done
ADDRS=()
METRICS=()
for i in $(seq 1 "$PUBLISHERS"); do
    port_free $((28280 + i))
    "$R/streampipe-publisher" "${COMMON[@]}" --listen "127.0.0.1:$((28280 + i))" \
        --metrics-listen "127.0.0.1:$((28180 + i))" --max-connections 1000000 \
        --auth-mode anonymous --bench-no-client-limits ${PUBLISHER_EXTRA[@]+"${PUBLISHER_EXTRA[@]}"} \
        >"$STREAMPIPE_STACK_DIR/publisher-$i.log" 2>&1 &
    PIDS+=($!); PID_ARGS+=(--pid "publisher=$!")
    wait_ready "http://127.0.0.1:$((28280 + i))/readyz"
    ADDRS+=("127.0.0.1:$((28280 + i))")
    METRICS+=("127.0.0.1:$((28180 + i))")
done

"$R/streampipe-bench-fanout" run --clients "$CLIENTS" --per-process "$PER_PROCESS" \
    --publishers "$(IFS=,; echo "${ADDRS[*]}")" --brokers "$KAFKA" --data-topic fanout.data \
    --redis-url "$REDIS_URL" "${PID_ARGS[@]}" "$@" &
BENCH=$!
# The machine is shared: if free memory falls below MIN_FREE_MB (publishers
# buffering for 100k lagging watchers can take GBs), stop the benchmark and
# its swarm processes rather than the neighbours.
while kill -0 "$BENCH" 2>/dev/null; do
    avail=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
    if [ "$avail" -lt "${MIN_FREE_MB:-3000}" ]; then
        log "only $avail MB of memory left: stopping the benchmark"
        pkill -TERM -P "$BENCH" 2>/dev/null || true
        kill "$BENCH" 2>/dev/null || true
        break
    fi
    sleep 1
done
status=0
wait "$BENCH" || status=$?

# The publishers' own counters over the whole run (all steps): updates the
# hub's ingest queue conflated, frames the outboxes conflated, closes, slow
# clients closed, pub/sub reconnects. Scraped after the swarm stopped, so
# closes include the teardown.
for a in "${METRICS[@]}"; do
    echo "publisher $a: $(curl -sf "http://$a/metrics" | grep -E '^streampipe_publisher_(hub_conflated_total|conflated_total|closes_total|redis_reconnects_total|slow_clients_closed_total|redis_messages_total)' | tr '\n' ' ')"
done
# Where the time went, over the whole run: the reducers' record → publish
# latency, batch sizes and flush times; the publishers' lag behind Redis
# and record → hub latency (sums and counts: mean = sum / count).
for i in $(seq 1 "$REDUCERS"); do
    echo "reducer $i: $(curl -sf "http://127.0.0.1:$((28380 + i))/metrics" | grep -E '^streampipe_reducer_(record_to_publish_seconds|flush_seconds|batch_records)_(sum|count)' | tr '\n' ' ')"
done
for a in "${METRICS[@]}"; do
    echo "publisher $a: $(curl -sf "http://$a/metrics" | grep -E '^streampipe_publisher_(hub_lag_seconds|update_latency_seconds)_(sum|count)' | tr '\n' ' ')"
done
# What the servers logged about the pub/sub connection.
echo "redis.log: $(grep -c 'output buffer limits' "$STREAMPIPE_STACK_DIR/redis.log" || true) client(s) closed for overcoming output buffer limits"
for f in "$STREAMPIPE_STACK_DIR"/publisher-*.log; do
    echo "$(basename "$f"): $(grep -ci 'reconnected' "$f" || true) pub/sub reconnection(s)"
done
exit "$status"
