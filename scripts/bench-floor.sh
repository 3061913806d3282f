#!/usr/bin/env bash
# The publisher's CPU per delivered message next to its floor, same script:
# 1. the floor (tests/src/bin/bench_floor.rs): one small WebSocket frame per
#    message written to one of CONNECTIONS loopback TCP connections by
#    (a) one thread with blocking writes and (b) tokio tasks fed through
#    bounded queues (the publisher's shape), reader in its own process;
# 2. the publisher end to end at the same rates and connection count
#    (scripts/bench-fanout.sh --markets CONNECTIONS: one market per watcher,
#    so every message is its own frame).
# Environment: CONNECTIONS (10000), RATES (5000,10000,20000), SECONDS_STEP (5),
# SKIP_RAMP=1 for the floor alone.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
CONNECTIONS=${CONNECTIONS:-10000}
RATES=${RATES:-5000,10000,20000}
SECONDS_STEP=${SECONDS_STEP:-5}
log "building release binaries"
cargo build --release --quiet -p streampipe-tests --bin streampipe-bench-floor
log "floor: $CONNECTIONS connections, rates $RATES"
"$CARGO_TARGET_DIR/release/streampipe-bench-floor" write --connections "$CONNECTIONS" \
    --rates "$RATES" --seconds "$SECONDS_STEP"
[ "${SKIP_RAMP:-0}" = 1 ] && exit 0
log "publisher: the same rates end to end (bench-fanout.sh --markets $CONNECTIONS)"
CLIENTS=$CONNECTIONS REDUCERS=${REDUCERS:-2} scripts/bench-fanout.sh --markets "$CONNECTIONS" \
    --linger-ms 5 --rates "$RATES" --seconds "$SECONDS_STEP"
