# Shared settings and install steps of streampipe's scripts (sourced, not run).
# Every install step the project needs lives here, so a fresh Debian machine
# with a Rust toolchain needs nothing else.

ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# Build output and tools are cached outside the clone, so a fresh clone on the
# same machine reuses them (cargo's fingerprints keep that safe).
STREAMPIPE_CACHE=${STREAMPIPE_CACHE:-$HOME/.cache/streampipe}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$STREAMPIPE_CACHE/target}
BIN_DIR=${BIN_DIR:-$CARGO_TARGET_DIR/debug}

TANSU_VERSION=0.6.0
TANSU_BIN=$STREAMPIPE_CACHE/tansu-$TANSU_VERSION/bin/tansu

log() { printf '\033[1m[streampipe]\033[0m %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages: redis-server for the stack, redis-tools for redis-cli and
# redis-benchmark, a C toolchain for librdkafka (built by rdkafka-sys, with
# libssl-dev + pkg-config for its SSL/SASL_SSL support), curl for health checks.
ensure_packages() {
    local missing=()
    local pkg
    for pkg in redis-server redis-tools curl make gcc g++ perl python3 pkg-config libssl-dev "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# tansu, a Kafka-compatible broker from crates.io, built once per machine
# (~15-20 min on 2 cores) and cached. The default features have no storage
# engine: libsql gives the SQLite engine the stack uses.
ensure_tansu() {
    if [ -x "$TANSU_BIN" ]; then return; fi
    log "building tansu $TANSU_VERSION (once per machine; cached in $STREAMPIPE_CACHE)"
    CARGO_TARGET_DIR=$STREAMPIPE_CACHE/tansu-build cargo install tansu --version "$TANSU_VERSION" \
        --locked --features dynostore,libsql --root "$STREAMPIPE_CACHE/tansu-$TANSU_VERSION" >&2
    rm -rf "$STREAMPIPE_CACHE/tansu-build"
}

# What only the test suite needs: Debian's Chromium for the live page's
# end-to-end tests, Node.js (the machine's, else Debian's) for the JS
# client's unit tests, openssl (the CLI, test certificates) and stunnel4 (a
# TLS terminator in front of the broker for the Kafka TLS tests) and
# nginx-light (a real caching proxy in front of the publisher for the
# snapshot tests; the tests run it as a child on a free port).
ensure_test_packages() {
    local extra=(chromium openssl stunnel4 nginx-light)
    command -v node >/dev/null || extra+=(nodejs)
    ensure_packages "${extra[@]}"
}

ensure_workspace_bins() {
    log "building the workspace binaries"
    (cd "$ROOT" && cargo build --workspace --bins --quiet)
}
