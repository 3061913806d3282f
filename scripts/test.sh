#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the integration
# tests against a private stack (Redis, dev broker, tansu) on test ports
# (phase 1), then the node tests on a real kubelet + containerd node
# (phase 2, scripts/node.sh suite: needs root; on a machine that cannot run
# a node it is skipped with a loud message). Installs whatever is missing
# first; `.ci/run` calls exactly this.
#
#   scripts/test.sh          both phases
#   scripts/test.sh node     phase 2 alone (builds what it needs)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

# Every CI run is a fresh clone: incremental state could never be reused,
# only pile up in the shared build cache (16 GB measured), so it is off.
export CARGO_INCREMENTAL=0

export STREAMPIPE_STACK_DIR=$ROOT/.stack-test
export STREAMPIPE_REDIS_PORT=${STREAMPIPE_TEST_REDIS_PORT:-26379}
export STREAMPIPE_DEVBROKER_PORT=${STREAMPIPE_TEST_DEVBROKER_PORT:-29092}
export STREAMPIPE_DEVBROKER_ADMIN_PORT=${STREAMPIPE_TEST_DEVBROKER_ADMIN_PORT:-29093}
export STREAMPIPE_TANSU_PORT=${STREAMPIPE_TEST_TANSU_PORT:-29192}
export STREAMPIPE_BROKERS="dev tansu"
# A private, fresh Kubernetes control plane for the operator's e2e test.
export STREAMPIPE_KUBE_DIR=$ROOT/.kube-test

started=$(date +%s)
phases=${1:-all}
case "$phases" in all | node) ;; *) echo "usage: $0 [node]" >&2; exit 2 ;; esac

# Chromium is for both phases (the node tests open the live page too).
ensure_test_packages

if [ "$phases" = all ]; then
    log "phase 1/2: build, lints, unit and integration tests"
    ensure_tansu

    log "cargo fmt --check"
    cargo fmt --all -- --check

    log "building (debug, all targets)"
    cargo build --workspace --all-targets --quiet

    log "cargo clippy -D warnings"
    cargo clippy --workspace --all-targets --quiet -- -D warnings

    # A fresh stack for every run: no state from an earlier run leaks in.
    scripts/stack.sh down >/dev/null 2>&1 || true
    rm -rf "$STREAMPIPE_STACK_DIR"
    scripts/kube.sh reset >/dev/null 2>&1 || true
    trap 'scripts/stack.sh down >/dev/null 2>&1 || true; scripts/kube.sh down >/dev/null 2>&1 || true' EXIT
    scripts/stack.sh up
    # shellcheck disable=SC1091
    source "$STREAMPIPE_STACK_DIR/env"
    # Builds Kubernetes 1.20.2 from Debian's source package once per machine (cached).
    scripts/kube.sh up
    export STREAMPIPE_TEST_KUBECONFIG=$STREAMPIPE_KUBE_DIR/kubeconfig

    log "JS client unit tests (node --test)"
    node --test publisher/static/test/

    log "cargo test"
    cargo test --workspace --no-fail-fast
    log "phase 1 finished in $(( $(date +%s) - started ))s"
    # Its control plane and stack are done: the node's control plane takes the
    # same ports.
    scripts/stack.sh down >/dev/null 2>&1 || true
    scripts/kube.sh down >/dev/null 2>&1 || true
fi

# Phase 2: the node tests (tests/tests/node_e2e.rs) on a real node, from
# images of the debug binaries phase 1 built. The node's own control plane
# (fresh each run), on the pod network's gateway; `suite` brings everything
# down again on any exit.
node_started=$(date +%s)
log "phase 2/2: node tests on a real node (scripts/node.sh suite)"
STREAMPIPE_KUBE_DIR=$ROOT/.kube-node-test STREAMPIPE_NODE_PROFILE=debug scripts/node.sh suite
log "phase 2 finished in $(( $(date +%s) - node_started ))s"
log "suite finished in $(( $(date +%s) - started ))s"
