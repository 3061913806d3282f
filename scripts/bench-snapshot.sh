#!/usr/bin/env bash
# Snapshot benchmark: GET /v1/snapshot?markets=... served by the publisher
# (origin) and by nginx proxy_cache in front of it, same run, alternating
# (tests/src/bin/bench_snapshot.rs, a load generator in its own process).
# Release builds; Redis from scripts/stack.sh (no broker needed: the states
# are written into Redis as the reducer stores them).
# Environment: MARKETS (20), CONNECTIONS (32), SECONDS_LOAD (5), ROUNDS (2),
# MAX_AGE (2, the publisher's --snapshot-max-age-seconds).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
export STREAMPIPE_STACK_DIR=${STREAMPIPE_STACK_DIR:-$ROOT/.stack-bench}
export STREAMPIPE_REDIS_PORT=${STREAMPIPE_REDIS_PORT:-36379} STREAMPIPE_BROKERS=none
PUB_PORT=${PUB_PORT:-18190}
METRICS_PORT=${METRICS_PORT:-18290}
ensure_packages nginx-light
log "building release binaries"
cargo build --release --quiet -p streampipe-publisher -p streampipe-tests --bin streampipe-publisher --bin streampipe-bench-snapshot
R=$CARGO_TARGET_DIR/release

scripts/stack.sh down >/dev/null 2>&1 || true
rm -rf "$STREAMPIPE_STACK_DIR"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; scripts/stack.sh down >/dev/null 2>&1 || true' EXIT
scripts/stack.sh up >/dev/null
REDIS=redis://127.0.0.1:$STREAMPIPE_REDIS_PORT

"$R/streampipe-publisher" --brokers 127.0.0.1:1 --pipeline bench --redis-url "$REDIS" \
    --listen 127.0.0.1:$PUB_PORT --metrics-listen 127.0.0.1:$METRICS_PORT \
    --auth-mode anonymous --bench-no-client-limits --snapshot-max-age-seconds "${MAX_AGE:-2}" \
    --log-format text >"$STREAMPIPE_STACK_DIR/publisher.log" 2>&1 &
pub=$!; PIDS+=("$pub")
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:$PUB_PORT/readyz >/dev/null && break; sleep 0.1; done

"$R/streampipe-bench-snapshot" --publisher 127.0.0.1:$PUB_PORT --metrics 127.0.0.1:$METRICS_PORT \
    --redis-url "$REDIS" --pipeline bench --markets "${MARKETS:-20}" \
    --connections "${CONNECTIONS:-32}" --seconds "${SECONDS_LOAD:-5}" --rounds "${ROUNDS:-2}"
