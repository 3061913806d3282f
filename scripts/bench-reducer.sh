#!/usr/bin/env bash
# Reducer benchmark: a `redis-benchmark` ceiling, then the reducer
# benchmark, on a private stack (Redis + dev broker) on bench ports. Prints
# figures; compares against the ceiling measured in the same run.
# Extra arguments go to streampipe-bench-reducer (see its --help):
#   scripts/bench-reducer.sh                      update throughput and latency
#   scripts/bench-reducer.sh --markets 10000 --subscribers 10
#   scripts/bench-reducer.sh --mode subscribe     subscribe commands/s: 100 000
#                                                 channels on ONE market, then
#                                                 spread over 100 000 markets
#   scripts/bench-reducer.sh --mode subscribe --subscribes 20000
#   scripts/bench-reducer.sh --history-compare    update throughput twice in one
#                                                 run: history off, then on for
#                                                 every market (XADD per update)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
export STREAMPIPE_STACK_DIR=$ROOT/.stack-bench
export STREAMPIPE_REDIS_PORT=36379 STREAMPIPE_DEVBROKER_PORT=39092 STREAMPIPE_DEVBROKER_ADMIN_PORT=39093
export STREAMPIPE_BROKERS=dev
ensure_packages
log "building release binaries"
cargo build --release --quiet -p streampipe-tests --bins
BIN_DIR=$CARGO_TARGET_DIR/release
scripts/stack.sh down >/dev/null 2>&1 || true
rm -rf "$STREAMPIPE_STACK_DIR"
trap 'kill ${SUB:-} 2>/dev/null || true; scripts/stack.sh down >/dev/null 2>&1 || true' EXIT
# The stack's dev broker must be the release build too.
mkdir -p "$STREAMPIPE_STACK_DIR"
CARGO_TARGET_DIR=$CARGO_TARGET_DIR BIN_DIR=$BIN_DIR scripts/stack.sh up >/dev/null

case " $* " in
*" --mode subscribe "* | *" --mode=subscribe "*)
    # A subscribe costs Redis three SADDs (m2c, c2m, p2m).
    echo "== ceiling: redis-benchmark SADD to one set (pipelined 64, 1 client)"
    redis-benchmark -p 36379 -c 1 -P 64 -n 2000000 -r 1000000 -q SADD 'sp:c:{m:hot}:m2c' 'ch__rand_int__'
    echo "== ceiling: redis-benchmark SADD to many sets (pipelined 64, 1 client)"
    redis-benchmark -p 36379 -c 1 -P 64 -n 2000000 -r 1000000 -q SADD 'sp:c:{c:__rand_int__}:c2m' 'mkt.1'
    ;;
*)
    MSG='{"type":"update","market":"mkt.1","version":1,"ts":1,"payload":{"home":1.95,"draw":3.40,"away":4.20,"status":"open"}}'
    redis-cli -p 36379 subscribe 'sp:ceiling:{m:x}:up' >/dev/null &
    SUB=$!
    sleep 0.3
    echo "== ceiling: redis-benchmark PUBLISH to one subscribed topic (pipelined 64, 1 client)"
    redis-benchmark -p 36379 -c 1 -P 64 -n 2000000 -q PUBLISH 'sp:ceiling:{m:x}:up' "$MSG"
    echo "== ceiling: redis-benchmark PUBLISH (pipelined 64, 50 clients)"
    redis-benchmark -p 36379 -c 50 -P 64 -n 2000000 -q PUBLISH 'sp:ceiling:{m:x}:up' "$MSG"
    echo "== ceiling: redis-benchmark HSET state (pipelined 64, 1 client)"
    redis-benchmark -p 36379 -c 1 -P 64 -n 2000000 -r 10000 -q HSET 'sp:c:{m:__rand_int__}:state' v 1 msg "$MSG"
    kill $SUB 2>/dev/null || true
    ;;
esac
redis-cli -p 36379 flushall >/dev/null

bench() {
    "$BIN_DIR/streampipe-bench-reducer" --brokers 127.0.0.1:39092 --admin 127.0.0.1:39093 \
        --redis-url redis://127.0.0.1:36379 "$@"
}
case " $* " in
*" --history-compare "*)
    args=()
    for a in "$@"; do [ "$a" = --history-compare ] || args+=("$a"); done
    echo "===== history off"
    bench "${args[@]}"
    redis-cli -p 36379 flushall >/dev/null
    echo "===== history on (every market, max len 1000)"
    bench "${args[@]}" --history-prefixes '*'
    ;;
*) bench "$@" ;;
esac
