#!/usr/bin/env bash
# A local Kubernetes control plane on loopback for the operator's end-to-end
# tests: etcd, kube-apiserver and kube-controller-manager (no node: pods stay
# Pending, but Deployments get ReplicaSets and Pods, and garbage collection,
# service accounts, namespaces and CRDs work as in a real cluster).
#
#   scripts/kube.sh up|down|status|env|reset|kubectl ARGS...
#
# up       builds Kubernetes 1.20.2 once per machine (Debian bookworm's source
#          package, ~5 min on 2 cores, cached), then starts what is not
#          running and waits until the API server's /readyz and the
#          controller-manager's /healthz answer ok. Idempotent.
# down     stops what `up` started (pid files); keeps the state (etcd data).
# status   what runs, where, and the kubeconfig; exit 1 if something is down.
# env      prints `export KUBECONFIG=...` (use: eval "$(scripts/kube.sh env)").
# reset    down, then deletes the state folder (a fresh, empty cluster next up).
# kubectl  runs the cached kubectl 1.20.2 (built with the servers) on this cluster.
# build    [NAMES...] builds and caches those binaries of the same source
#          (default: the control plane's; scripts/node.sh asks for kubelet,
#          kube-scheduler and the sandbox's `pause`).
#
# Settings (environment):
#   STREAMPIPE_CACHE             build cache            [~/.cache/streampipe]
#   STREAMPIPE_KUBE_DIR          state: etcd data, certs, logs, pids, kubeconfig
#                                                       [<repo>/.kube-local]
#   STREAMPIPE_KUBE_API_PORT     kube-apiserver (https)             [26443]
#   STREAMPIPE_KUBE_CM_PORT      kube-controller-manager (https)    [26444]
#   STREAMPIPE_KUBE_ETCD_PORT    etcd clients (http)                [23790]
#   STREAMPIPE_KUBE_ETCD_PEER_PORT etcd peers (http)                [23800]
#   STREAMPIPE_KUBE_TIMEOUT      seconds to wait for readiness      [120]
#   STREAMPIPE_KUBE_ADDRESS      the API server's address (bind, advertise,
#                                certificate, kubeconfig) [127.0.0.1];
#                                scripts/node.sh sets its pod network's
#                                gateway, which pods can reach
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STREAMPIPE_CACHE=${STREAMPIPE_CACHE:-$HOME/.cache/streampipe}
KUBE_VERSION=1.20.2
KUBE_CACHE=$STREAMPIPE_CACHE/kubernetes-$KUBE_VERSION
KUBE_BIN=$KUBE_CACHE/bin
KUBE_DIR=${STREAMPIPE_KUBE_DIR:-$ROOT/.kube-local}
API_PORT=${STREAMPIPE_KUBE_API_PORT:-26443}
CM_PORT=${STREAMPIPE_KUBE_CM_PORT:-26444}
ETCD_PORT=${STREAMPIPE_KUBE_ETCD_PORT:-23790}
ETCD_PEER_PORT=${STREAMPIPE_KUBE_ETCD_PEER_PORT:-23800}
TIMEOUT=${STREAMPIPE_KUBE_TIMEOUT:-120}
ADDRESS=${STREAMPIPE_KUBE_ADDRESS:-127.0.0.1}
SERVICE_CIDR=10.96.0.0/16 # configuration only: nothing routes it
SERVICE_IP=10.96.0.1      # the `kubernetes` Service's address in that range
# The Go toolchain Debian bookworm ships (1.19), whatever else is on PATH.
GO_DIR=/usr/lib/go-1.19/bin
COMPONENTS=(etcd kube-apiserver kube-controller-manager) # start order

log() { printf '\033[1m[kube]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_packages() { # Debian packages, installed if missing
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

mirror_url() { # debian | debian-security: first such URL in the machine's apt sources
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v '^[[:space:]]*#' | grep -oE "https?://[^[:space:]]+/$1/?([[:space:]]|\$)" \
        | head -n1 | sed -E 's#/?[[:space:]]*$##' || true
}

# The control plane's binaries; scripts/node.sh asks for the node's too.
CONTROL_PLANE_BINARIES=(kube-apiserver kube-controller-manager kubectl)

have_binaries() { # names... (default: the control plane's)
    local b
    for b in "${@:-${CONTROL_PLANE_BINARIES[@]}}"; do [ -x "$KUBE_BIN/$b" ] || return 1; done
}

# Build the named binaries (default: kube-apiserver, kube-controller-manager
# and kubectl; `pause` is the pod sandbox's C program) from Debian bookworm's
# `kubernetes` source package (upstream v1.20.2 with its vendor/), once per
# machine. The source is fetched with a private apt configuration so the
# machine's apt sources stay untouched. Only the binaries are kept, added to
# $KUBE_BIN next to the ones already there.
ensure_binaries() { # names...
    local wanted=("${@:-${CONTROL_PLANE_BINARIES[@]}}")
    have_binaries "${wanted[@]}" && return
    ensure_packages golang-go make rsync jq dpkg-dev golang-github-modern-go-reflect2-dev gcc libc6-dev
    [ -x "$GO_DIR/go" ] || die "$GO_DIR/go missing (Debian's golang-go 1.19 expected)"
    mkdir -p "$KUBE_CACHE"
    # One build at a time (two `up`s at once wait for each other).
    exec 9>"$KUBE_CACHE/.build.lock"
    flock 9
    if have_binaries "${wanted[@]}"; then exec 9>&-; return; fi

    local started=$SECONDS work=$KUBE_CACHE/build apt=$KUBE_CACHE/build/apt
    log "building ${wanted[*]} of Kubernetes $KUBE_VERSION (once per machine, ~5 min on 2 cores; cached in $KUBE_BIN)"
    rm -rf "$work"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$work/src"
    # The Debian mirrors the machine's own apt sources name, else Debian's CDN.
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg debian security
    debian=$(mirror_url debian)
    security=$(mirror_url debian-security)
    {
        echo "deb-src [signed-by=$keyring] ${debian:-http://deb.debian.org/debian} bookworm main"
        echo "deb-src [signed-by=$keyring] ${debian:-http://deb.debian.org/debian} bookworm-updates main"
        echo "deb-src [signed-by=$keyring] ${security:-http://deb.debian.org/debian-security} bookworm-security main"
    } >"$apt/sources.list"
    local aptopts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
    apt-get "${aptopts[@]}" -qq update
    log "fetching Debian's source package kubernetes (bookworm)"
    (cd "$work/src" && apt-get "${aptopts[@]}" -qq source kubernetes >/dev/null)
    local src version
    src=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
    [ -n "$src" ] || die "apt-get source kubernetes unpacked nothing"
    version=$(sed -n 's/^Version: //p' "$work"/src/kubernetes_*.dsc | head -n1)
    case "$version" in
        *really$KUBE_VERSION-* | $KUBE_VERSION-*) ;;
        *) die "Debian's kubernetes source is '$version', not upstream $KUBE_VERSION" ;;
    esac

    # The vendored github.com/modern-go/reflect2 v1.0.1 breaks with Go >= 1.18
    # (the API server dies with SIGSEGV on the first custom resource it
    # writes); v1.0.2, from Debian's package, is the fixed release.
    local reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
    [ -f "$reflect2/go_above_118.go" ] || die "$reflect2 is not reflect2 >= 1.0.2"
    rm -rf "$src/vendor/github.com/modern-go/reflect2"
    cp -rL "$reflect2" "$src/vendor/github.com/modern-go/reflect2"

    # Upstream's build (GOPATH mode, generates the OpenAPI code first). Its Go
    # build cache lives in _output and goes with it.
    local b what=()
    for b in "${wanted[@]}"; do [ "$b" = pause ] || what+=("cmd/$b"); done
    if [ ${#what[@]} -gt 0 ]; then
        (cd "$src" && env -u GOFLAGS -u GO111MODULE -u GOPATH -u GOROOT -u GOBIN PATH="$GO_DIR:$PATH" CGO_ENABLED=0 \
            make WHAT="${what[*]}" >"$work/build.log" 2>&1) \
            || { tail -n 40 "$work/build.log" >&2; die "build failed (log: $work/build.log)"; }
    fi
    # The pod sandbox ("pause"): static, so its image needs nothing else.
    case " ${wanted[*]} " in *" pause "*)
        mkdir -p "$src/_output/bin"
        gcc -Os -static -Wall -Werror -DVERSION="v$KUBE_VERSION-streampipe" -o "$src/_output/bin/pause" "$src/build/pause/linux/pause.c" \
            || die "building pause failed"
    esac

    mkdir -p "$KUBE_BIN"
    for b in "${wanted[@]}"; do
        cp "$src/_output/bin/$b" "$KUBE_BIN/.$b.tmp"
        mv "$KUBE_BIN/.$b.tmp" "$KUBE_BIN/$b"
    done
    echo "${wanted[*]}: Debian source package kubernetes $version, reflect2 vendored from $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev), $("$GO_DIR/go" version)" \
        >>"$KUBE_BIN/BUILT-FROM"
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
    exec 9>&-
    log "built ${wanted[*]} in $(( SECONDS - started ))s"
}

# Certificates, keys, the admin token and kubeconfigs; made once per state dir.
ensure_credentials() {
    local pki=$KUBE_DIR/pki
    mkdir -p "$pki"
    if [ ! -f "$pki/ca.crt" ]; then
        log "making certificates in $pki"
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=streampipe-local-ca" \
            -keyout "$pki/ca.key" -out "$pki/ca.crt" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
    fi
    # (Re)issued when the API server's address is not among its names.
    if [ ! -f "$pki/apiserver.crt" ] || ! grep -q "IP:$ADDRESS," "$pki/apiserver.ext"; then
        openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=kube-apiserver" \
            -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
        printf '%s\n' \
            "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=serverAuth" \
            "subjectAltName=IP:127.0.0.1,IP:$ADDRESS,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
            >"$pki/apiserver.ext"
        openssl x509 -req -sha256 -days 3650 -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
            -CAcreateserial -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt.tmp" 2>/dev/null
        mv "$pki/apiserver.crt.tmp" "$pki/apiserver.crt"
    fi
    # The API server's client certificate towards kubelets (logs, exec,
    # port-forward); a node's kubelet trusts this CA.
    if [ ! -f "$pki/apiserver-kubelet-client.crt" ]; then
        openssl req -newkey rsa:2048 -nodes -sha256 -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
            -keyout "$pki/apiserver-kubelet-client.key" -out "$pki/apiserver-kubelet-client.csr" 2>/dev/null
        printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=clientAuth" >"$pki/apiserver-kubelet-client.ext"
        openssl x509 -req -sha256 -days 3650 -in "$pki/apiserver-kubelet-client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
            -CAcreateserial -extfile "$pki/apiserver-kubelet-client.ext" -out "$pki/apiserver-kubelet-client.crt.tmp" 2>/dev/null
        mv "$pki/apiserver-kubelet-client.crt.tmp" "$pki/apiserver-kubelet-client.crt"
    fi
    if [ ! -f "$pki/sa.pub" ]; then
        openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
        openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    fi
    if [ ! -f "$KUBE_DIR/tokens.csv" ]; then
        local admin cm
        admin=$(openssl rand -hex 24)
        cm=$(openssl rand -hex 24)
        # token,user,uid,"groups"
        printf '%s,%s,%s,"%s"\n' \
            "$admin" admin admin system:masters \
            "$cm" system:kube-controller-manager kube-controller-manager system:masters \
            >"$KUBE_DIR/tokens.csv.tmp"
        mv "$KUBE_DIR/tokens.csv.tmp" "$KUBE_DIR/tokens.csv"
        chmod 600 "$KUBE_DIR/tokens.csv"
    fi
    write_kubeconfig "$KUBE_DIR/kubeconfig" admin "$(token_of admin)"
    write_kubeconfig "$KUBE_DIR/controller-manager.kubeconfig" kube-controller-manager "$(token_of system:kube-controller-manager)"
}

token_of() { awk -F, -v u="$1" '$2 == u { print $1 }' "$KUBE_DIR/tokens.csv"; }

write_kubeconfig() { # path, user, token
    local ca
    ca=$(base64 -w0 <"$KUBE_DIR/pki/ca.crt")
    cat >"$1.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: streampipe-local
  cluster:
    server: https://$ADDRESS:$API_PORT
    certificate-authority-data: $ca
users:
- name: $2
  user:
    token: $3
contexts:
- name: streampipe-local
  context:
    cluster: streampipe-local
    user: $2
    namespace: default
current-context: streampipe-local
EOF
    chmod 600 "$1.tmp"
    mv "$1.tmp" "$1"
}

binary_of() {
    case "$1" in
        etcd) echo /usr/bin/etcd ;;
        *) echo "$KUBE_BIN/$1" ;;
    esac
}

# Running: the pid file's process is alive and still runs that binary.
running() {
    local pid
    [ -f "$KUBE_DIR/$1.pid" ] || return 1
    pid=$(cat "$KUBE_DIR/$1.pid")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$(binary_of "$1")")" ]
}

start() { # name, args...
    local name=$1; shift
    if running "$name"; then log "$name already running (pid $(cat "$KUBE_DIR/$name.pid"))"; return; fi
    nohup "$(binary_of "$name")" "$@" >>"$KUBE_DIR/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$KUBE_DIR/$name.pid"
    log "$name started (pid $!, log $KUBE_DIR/logs/$name.log)"
}

wait_until() { # what, name of the process, command...
    local what=$1 name=$2 deadline=$(( SECONDS + TIMEOUT )); shift 2
    until "$@" >/dev/null 2>&1; do
        if ! running "$name"; then
            tail -n 30 "$KUBE_DIR/logs/$name.log" >&2 || true
            die "$name exited (log: $KUBE_DIR/logs/$name.log)"
        fi
        if [ $SECONDS -ge $deadline ]; then
            tail -n 30 "$KUBE_DIR/logs/$name.log" >&2 || true
            die "timed out after ${TIMEOUT}s waiting for $what (log: $KUBE_DIR/logs/$name.log)"
        fi
        sleep 0.2
    done
}

answers_ok() { # url
    [ "$(curl -s --max-time 5 --cacert "$KUBE_DIR/pki/ca.crt" "$1")" = ok ]
}

etcd_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
apiserver_ready() { answers_ok "https://$ADDRESS:$API_PORT/readyz"; }
# The controller-manager serves /healthz with a self-signed certificate.
cm_healthy() { [ "$(curl -sk --max-time 5 "https://127.0.0.1:$CM_PORT/healthz")" = ok ]; }

default_sa_ready() {
    curl -sf --max-time 5 --cacert "$KUBE_DIR/pki/ca.crt" -H "Authorization: Bearer $(token_of admin)" \
        "https://$ADDRESS:$API_PORT/api/v1/namespaces/default/serviceaccounts/default" | grep -q '"secrets"'
}

port_free() { # port, [address]
    ! (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null
}

check_port() { # component, port, [address]
    running "$1" && return
    port_free "$2" "${3:-}" || die "port $2 (for $1) is taken by another process; set STREAMPIPE_KUBE_*_PORT"
}

up() {
    local started=$SECONDS
    ensure_packages etcd-server openssl curl ca-certificates
    ensure_binaries
    mkdir -p "$KUBE_DIR/logs" "$KUBE_DIR/etcd" "$KUBE_DIR/controller-manager"
    chmod 700 "$KUBE_DIR/etcd"
    check_port etcd "$ETCD_PORT"
    check_port etcd "$ETCD_PEER_PORT"
    check_port kube-apiserver "$API_PORT" "$ADDRESS"
    check_port kube-controller-manager "$CM_PORT"
    ensure_credentials

    start etcd --name streampipe-local --data-dir "$KUBE_DIR/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "streampipe-local=http://127.0.0.1:$ETCD_PEER_PORT" \
        --quota-backend-bytes=$(( 2 * 1024 * 1024 * 1024 )) --log-level=warn
    wait_until "etcd" etcd etcd_healthy

    # --insecure-port=0: 1.20 would otherwise also serve plain HTTP on 8080.
    # --endpoint-reconciler-type=none: the `kubernetes` Service would
    # otherwise get a loopback endpoint, which validation rejects (noise).
    start kube-apiserver \
        --advertise-address="$ADDRESS" --bind-address="$ADDRESS" --secure-port="$API_PORT" --insecure-port=0 \
        --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
        --tls-cert-file="$KUBE_DIR/pki/apiserver.crt" --tls-private-key-file="$KUBE_DIR/pki/apiserver.key" \
        --client-ca-file="$KUBE_DIR/pki/ca.crt" \
        --kubelet-client-certificate="$KUBE_DIR/pki/apiserver-kubelet-client.crt" \
        --kubelet-client-key="$KUBE_DIR/pki/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types=InternalIP,Hostname \
        --token-auth-file="$KUBE_DIR/tokens.csv" \
        --authorization-mode=RBAC \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-signing-key-file="$KUBE_DIR/pki/sa.key" \
        --service-account-key-file="$KUBE_DIR/pki/sa.pub" \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --endpoint-reconciler-type=none \
        --allow-privileged=true \
        --profiling=false \
        --v=1
    wait_until "kube-apiserver /readyz" kube-apiserver apiserver_ready

    # --port=0: no insecure HTTP port (1.20 defaults to 10252). No
    # authentication/authorization kubeconfig: /healthz is always allowed, and
    # without a front-proxy CA on the API server delegated authentication only
    # logs errors.
    start kube-controller-manager \
        --kubeconfig="$KUBE_DIR/controller-manager.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port="$CM_PORT" --port=0 \
        --cert-dir="$KUBE_DIR/controller-manager" \
        --controllers='*' \
        --use-service-account-credentials=false \
        --leader-elect=false \
        --service-account-private-key-file="$KUBE_DIR/pki/sa.key" \
        --root-ca-file="$KUBE_DIR/pki/ca.crt" \
        --cluster-signing-cert-file="$KUBE_DIR/pki/ca.crt" \
        --cluster-signing-key-file="$KUBE_DIR/pki/ca.key" \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --profiling=false \
        --v=1
    wait_until "kube-controller-manager /healthz" kube-controller-manager cm_healthy
    # Pods can be created once the namespace's service account has its token.
    wait_until "the default service account's token" kube-controller-manager default_sa_ready

    log "up in $(( SECONDS - started ))s"
    status
}

stop() { # name
    local name=$1 pid
    [ -f "$KUBE_DIR/$name.pid" ] || return 0
    if running "$name"; then
        pid=$(cat "$KUBE_DIR/$name.pid")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        log "$name stopped"
    fi
    rm -f "$KUBE_DIR/$name.pid"
}

down() {
    local i
    for (( i = ${#COMPONENTS[@]} - 1; i >= 0; i-- )); do stop "${COMPONENTS[$i]}"; done
}

status() {
    local name bad=0
    for name in "${COMPONENTS[@]}"; do
        if running "$name"; then echo "$name: running (pid $(cat "$KUBE_DIR/$name.pid"))"
        else echo "$name: stopped"; bad=1; fi
    done
    if running kube-apiserver && apiserver_ready; then echo "readyz: ok"; else echo "readyz: not ready"; bad=1; fi
    if running kube-controller-manager && cm_healthy; then echo "controller-manager healthz: ok"; else echo "controller-manager healthz: not ok"; bad=1; fi
    echo "api server:         https://$ADDRESS:$API_PORT"
    echo "controller-manager: https://127.0.0.1:$CM_PORT/healthz"
    echo "etcd:               http://127.0.0.1:$ETCD_PORT (peer $ETCD_PEER_PORT)"
    echo "kubeconfig:         $KUBE_DIR/kubeconfig"
    if have_binaries; then echo "binaries:           $KUBE_BIN"
    else echo "binaries:           $KUBE_BIN (not built yet)"; fi
    return $bad
}

kubectl_bin() {
    if [ -x "$KUBE_BIN/kubectl" ]; then echo "$KUBE_BIN/kubectl"
    elif command -v kubectl >/dev/null; then command -v kubectl
    else die "no kubectl: run '$0 up' first"; fi
}

case "${1:-}" in
    up) up ;;
    build) shift; ensure_binaries "$@" ;;
    down) down ;;
    status) status ;;
    env) echo "export KUBECONFIG=$KUBE_DIR/kubeconfig" ;;
    reset) down; rm -rf "$KUBE_DIR"; log "removed $KUBE_DIR" ;;
    kubectl) shift; KUBECONFIG=$KUBE_DIR/kubeconfig exec "$(kubectl_bin)" "$@" ;;
    *) echo "usage: $0 up|down|status|env|reset|build [NAMES...]|kubectl ARGS..." >&2; exit 2 ;;
esac
