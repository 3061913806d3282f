#!/usr/bin/env bash
# A real node for the local cluster of scripts/kube.sh: containerd, runc and
# the CNI plugins from Debian, kubelet and kube-scheduler built from the same
# Debian `kubernetes` source as the control plane, and the project's images
# built locally from the workspace's own binaries (release for a try-it-yourself
# node, debug for the tests). Pods run for real; the operator's end-to-end
# tests on it are tests/tests/node_e2e.rs.
#
#   scripts/node.sh up|down|status|env|images [debug|release]|test|suite
#
# up      installs what is missing (Debian packages; kubelet, kube-scheduler
#         and the sandbox's `pause` built once per machine, ~6 min on 2
#         cores, cached with kube.sh's binaries), creates the pod network,
#         starts the control plane (kube.sh, its API server on the gateway
#         address), containerd, kube-scheduler and kubelet, imports the images
#         and waits for the node to be Ready. Idempotent.
# down    stops all of it and removes every pod, mount, network namespace,
#         cgroup, the bridge and the NAT rule; keeps the state folder
#         (containerd's images, the control plane's etcd).
# status  what runs; exit 1 if something is down.
# env     prints the exports the node tests read (eval "$(scripts/node.sh env)").
# images  (re)builds the OCI images of the binaries of a cargo profile
#         (argument or STREAMPIPE_NODE_PROFILE; release unless told) and
#         imports them.
# test    up (debug images), a stack (Redis + dev broker) on the gateway
#         address, then the node tests: cargo test --workspace --test
#         node_e2e. Leaves it all running for a rerun (down stops the stack
#         too).
# suite   what scripts/test.sh runs as its node phase: skips loudly (exit 0)
#         on a machine that cannot run a node (not root, no cgroup
#         hierarchy), else waits for the machine's node lock, resets the
#         node's control plane (a fresh etcd), runs `test`, and runs `down`
#         on every exit, a failed test's included; exits with the tests'
#         status.
#
# The pod network exists only on this machine: a bridge holding the gateway
# address, pods get addresses of its /24 and a route to the service range via
# the gateway, and nothing else (no masquerade, no default route, the host's
# ip_forward untouched). Pods reach the gateway address, where the API server,
# the kubelet and (scripts/stack.sh with STREAMPIPE_STACK_ADDRESS) Redis and
# the brokers listen; one DNAT rule on the bridge sends the `kubernetes`
# Service (10.96.0.1:443) to the API server. No kube-proxy, no cluster DNS:
# other Services' cluster IPs lead nowhere (`kubectl port-forward svc/...`
# works, it picks a pod).
#
# Settings (environment), besides kube.sh's STREAMPIPE_KUBE_*:
#   STREAMPIPE_NODE_DIR      state: containerd root, kubelet, images, logs [<repo>/.node-local]
#   STREAMPIPE_NODE_NET      first three octets of the pod /24; .1 is the gateway [10.244.7]
#   STREAMPIPE_NODE_BRIDGE   the bridge's name                          [spnode0]
#   STREAMPIPE_NODE_NAME     the Node's name                            [streampipe-node]
#   STREAMPIPE_NODE_KUBELET_PORT  kubelet's API, on the gateway address [10250]
#   STREAMPIPE_NODE_PROFILE  cargo profile the images are built from: release
#                            (the Dockerfiles' build) or debug (the test suite's
#                            own build, reused) [release; debug for test/suite]
#   STREAMPIPE_NODE_BIN_DIR  prebuilt binaries (no cargo build) [$CARGO_TARGET_DIR/<profile>]
#   STREAMPIPE_NODE_TIMEOUT  seconds to wait for the node to be Ready   [120]
# `test` passes scripts/stack.sh's STREAMPIPE_REDIS_PORT, _DEVBROKER_PORT and
# _DEVBROKER_ADMIN_PORT through (its state: $STREAMPIPE_NODE_DIR/stack).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KUBE_VERSION=1.20.2
KUBE_BIN=$STREAMPIPE_CACHE/kubernetes-$KUBE_VERSION/bin
KUBE_DIR=${STREAMPIPE_KUBE_DIR:-$ROOT/.kube-local}
API_PORT=${STREAMPIPE_KUBE_API_PORT:-26443}
NODE_DIR=${STREAMPIPE_NODE_DIR:-$ROOT/.node-local}
NET=${STREAMPIPE_NODE_NET:-10.244.7}
GATEWAY=$NET.1
BRIDGE=${STREAMPIPE_NODE_BRIDGE:-spnode0}
NODE_NAME=${STREAMPIPE_NODE_NAME:-streampipe-node}
KUBELET_PORT=${STREAMPIPE_NODE_KUBELET_PORT:-10250}
# The profile (release|debug) is settled per command at the bottom.
PROFILE=${STREAMPIPE_NODE_PROFILE:-}
TIMEOUT=${STREAMPIPE_NODE_TIMEOUT:-120}
SERVICE_CIDR=10.96.0.0/16 # kube.sh's service range
SERVICE_IP=10.96.0.1      # the `kubernetes` Service
SOCK=$NODE_DIR/containerd/containerd.sock
NAT_CHAIN=STREAMPIPE-NODE # our only iptables chain, hooked to the bridge's traffic
# The pod sandbox image (built from the kubernetes tree's pause.c; no
# registry is reachable, so nothing is ever pulled).
PAUSE_IMAGE=streampipe.local/pause:$KUBE_VERSION
# The host settings kubelet rewrites at start (pkg/kubelet/cm, setupKernelTunables).
KERNEL_TUNABLES=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
    kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# Where kubelet 1.20 writes pod logs, whatever its root dir (hard-coded).
POD_LOG_DIRS=(/var/log/pods /var/log/containers)
# Images of these release binaries, under the names manifests/ and the
# operator's defaults use (operator/src/crd.rs).
IMAGE_BINARIES=(streampipe-operator streampipe-reducer streampipe-publisher)
DAEMONS=(containerd kube-scheduler kubelet) # start order

nlog() { printf '\033[1m[node]\033[0m %s\n' "$*" >&2; }
die() { nlog "error: $*"; exit 1; }
kube() { STREAMPIPE_KUBE_ADDRESS=$GATEWAY "$ROOT/scripts/kube.sh" "$@"; }
kubectl() { KUBECONFIG=$KUBE_DIR/kubeconfig "$KUBE_BIN/kubectl" "$@"; }
ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }

# The release images' repository and tag, as the install manifest names them.
image_of() { # binary
    local ref
    ref=$(sed -n 's#^[[:space:]]*image:[[:space:]]*\(.*\)/streampipe-operator:\(.*\)$#\1 \2#p' "$ROOT/manifests/operator.yaml")
    [ -n "$ref" ] || die "no operator image in manifests/operator.yaml"
    echo "${ref% *}/$1:${ref#* }"
}

binary_of() {
    case "$1" in
        containerd) echo /usr/bin/containerd ;;
        *) echo "$KUBE_BIN/$1" ;;
    esac
}

running() { # daemon: the pid file's process is alive and runs that binary
    local pid
    [ -f "$NODE_DIR/$1.pid" ] || return 1
    pid=$(cat "$NODE_DIR/$1.pid")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$(binary_of "$1")")" ]
}

start() { # name, args...
    local name=$1; shift
    if running "$name"; then nlog "$name already running (pid $(cat "$NODE_DIR/$name.pid"))"; return; fi
    # runc lives in /usr/sbin; containerd finds it (and its shim) on PATH.
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        nohup "$(binary_of "$name")" "$@" >>"$NODE_DIR/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$NODE_DIR/$name.pid"
    nlog "$name started (pid $!, log $NODE_DIR/logs/$name.log)"
}

wait_until() { # what, daemon, command...
    local what=$1 name=$2 deadline=$(( SECONDS + TIMEOUT )); shift 2
    until "$@" >/dev/null 2>&1; do
        if ! running "$name"; then
            tail -n 30 "$NODE_DIR/logs/$name.log" >&2 || true
            die "$name exited (log: $NODE_DIR/logs/$name.log)"
        fi
        [ $SECONDS -lt $deadline ] || die "timed out after ${TIMEOUT}s waiting for $what (log: $NODE_DIR/logs/$name.log)"
        sleep 0.5
    done
}

# --- binaries -----------------------------------------------------------------

ensure_node_packages() {
    # containerd 1.6, runc, the CNI plugins (/usr/lib/cni), iptables for the
    # one DNAT rule, jq for the images' JSON.
    ensure_packages containerd runc containernetworking-plugins iptables iproute2 jq
}

bin_dir() { echo "${STREAMPIPE_NODE_BIN_DIR:-$CARGO_TARGET_DIR/$PROFILE}"; }

# Always asked of cargo (a no-op when fresh): the images must hold the
# workspace's current code. STREAMPIPE_NODE_BIN_DIR skips it (prebuilt).
ensure_binaries() {
    [ -z "${STREAMPIPE_NODE_BIN_DIR:-}" ] || return 0
    case "$PROFILE" in
        release)
            nlog "release binaries (zlib static, as the Dockerfiles do)"
            (cd "$ROOT" && LIBZ_SYS_STATIC=1 cargo build --release --locked --quiet \
                -p streampipe-operator -p streampipe-reducer -p streampipe-publisher --bins) ;;
        debug)
            # Exactly scripts/test.sh's build command: after the suite's
            # build it is a no-op. A narrower `-p … --bins` can unify other
            # features of the dependencies, and rebuild them.
            nlog "debug binaries (the test suite's build: cargo build --workspace --all-targets)"
            (cd "$ROOT" && cargo build --workspace --all-targets --quiet) ;;
        *) die "STREAMPIPE_NODE_PROFILE is '$PROFILE': debug or release" ;;
    esac
}

# --- images -------------------------------------------------------------------

# An OCI image layout tar of one binary: the binary, the shared libraries
# `ldd` lists with the dynamic loader, a passwd/group with the nonroot user
# 65532 (the manifests' runAsUser) and the CA bundle. Rebuilt when the binary
# is newer than the tar. Deterministic (sorted, mtime 0, root-owned).
build_image() { # name (image reference), output tar, entrypoint binary path inside, source binary
    local ref=$1 out=$2 inside=$3 src=$4 work
    [ -f "$out" ] && [ "$out" -nt "$src" ] && [ "$out" -nt "$0" ] && return
    work=$(mktemp -d "$NODE_DIR/images/.build.XXXXXX")
    mkdir -p "$work/rootfs$(dirname "$inside")" "$work/rootfs/etc/ssl/certs" "$work/rootfs/tmp" "$work/oci/blobs/sha256"
    # Without debug info (the release profile keeps it): ~4x smaller images.
    strip --strip-debug -o "$work/rootfs$inside" "$src" 2>/dev/null || cp "$src" "$work/rootfs$inside"
    local lib
    for lib in $(ldd "$src" 2>/dev/null | grep -oE '/[^ ]+' || true); do
        mkdir -p "$work/rootfs$(dirname "$lib")"
        cp -L "$lib" "$work/rootfs$lib"
    done
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' \
        >"$work/rootfs/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$work/rootfs/etc/group"
    [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/"
    chmod 1777 "$work/rootfs/tmp"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/rootfs" -cf "$work/layer.tar" .
    local layer_sha layer_size config config_sha manifest manifest_sha
    layer_sha=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
    layer_size=$(stat -c %s "$work/layer.tar")
    mv "$work/layer.tar" "$work/oci/blobs/sha256/$layer_sha"
    config=$(jq -cn --arg entry "$inside" --arg diff "sha256:$layer_sha" '{
        architecture: "amd64", os: "linux",
        config: {User: "65532:65532", Entrypoint: [$entry],
                 Env: ["PATH=/usr/local/bin:/usr/bin:/bin"], WorkingDir: "/"},
        rootfs: {type: "layers", diff_ids: [$diff]}}')
    config_sha=$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)
    printf '%s' "$config" >"$work/oci/blobs/sha256/$config_sha"
    manifest=$(jq -cn --arg c "sha256:$config_sha" --argjson cs "${#config}" --arg l "sha256:$layer_sha" --argjson ls "$layer_size" '{
        schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
        layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $l, size: $ls}]}')
    manifest_sha=$(printf '%s' "$manifest" | sha256sum | cut -d' ' -f1)
    printf '%s' "$manifest" >"$work/oci/blobs/sha256/$manifest_sha"
    jq -cn --arg m "sha256:$manifest_sha" --argjson ms "${#manifest}" --arg ref "$ref" '{
        schemaVersion: 2, manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json",
        digest: $m, size: $ms, platform: {architecture: "amd64", os: "linux"},
        annotations: {"io.containerd.image.name": $ref, "org.opencontainers.image.ref.name": ($ref | split(":") | last)}}]}' \
        >"$work/oci/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/oci" -cf "$out.tmp" .
    mv "$out.tmp" "$out"
    rm -rf "$work"
    nlog "image $ref: $(du -h "$out" | cut -f1)"
}

# One folder of tars per profile: switching profiles re-imports, it does not
# rebuild. The image names are the same either way (the manifests' names).
images() {
    mkdir -p "$NODE_DIR/images/$PROFILE"
    ensure_binaries
    build_image "$PAUSE_IMAGE" "$NODE_DIR/images/pause.tar" /pause "$KUBE_BIN/pause"
    local b src
    for b in "${IMAGE_BINARIES[@]}"; do
        src=$(bin_dir)/$b
        [ -x "$src" ] || die "no $src (build it, or set STREAMPIPE_NODE_BIN_DIR)"
        build_image "$(image_of "$b")" "$NODE_DIR/images/$PROFILE/$b.tar" "/usr/local/bin/$b" "$src"
    done
    if running containerd; then
        ctr_ images import "$NODE_DIR/images/pause.tar" >/dev/null
        for b in "${IMAGE_BINARIES[@]}"; do
            ctr_ images import "$NODE_DIR/images/$PROFILE/$b.tar" >/dev/null
        done
        nlog "imported ($PROFILE binaries): $(ctr_ images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
    fi
}

# --- network ------------------------------------------------------------------

network_up() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        nlog "bridge $BRIDGE created"
    fi
    ip addr show dev "$BRIDGE" | grep -q "inet $GATEWAY/24" || ip addr add "$GATEWAY/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    # In-cluster clients (the operator) dial the `kubernetes` Service; with
    # no kube-proxy one rule, only for traffic entering from the bridge,
    # sends it to the API server on the gateway.
    iptables -t nat -N "$NAT_CHAIN" 2>/dev/null || true
    iptables -t nat -C PREROUTING -i "$BRIDGE" -j "$NAT_CHAIN" 2>/dev/null \
        || iptables -t nat -A PREROUTING -i "$BRIDGE" -j "$NAT_CHAIN"
    iptables -t nat -C "$NAT_CHAIN" -d "$SERVICE_IP" -p tcp --dport 443 -j DNAT --to-destination "$GATEWAY:$API_PORT" 2>/dev/null \
        || iptables -t nat -A "$NAT_CHAIN" -d "$SERVICE_IP" -p tcp --dport 443 -j DNAT --to-destination "$GATEWAY:$API_PORT"

    mkdir -p "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam"
    # isGateway false: the bridge already has the gateway address, and the
    # plugin would otherwise turn on ip_forward. No ipMasq, no default route.
    jq -n --arg br "$BRIDGE" --arg net "$NET" --arg svc "$SERVICE_CIDR" --arg data "$NODE_DIR/cni/ipam" '{
        cniVersion: "0.4.0", name: "streampipe-node",
        plugins: [{type: "bridge", bridge: $br, isGateway: false, ipMasq: false, hairpinMode: true,
                   ipam: {type: "host-local", dataDir: $data,
                          ranges: [[{subnet: ($net + ".0/24"), rangeStart: ($net + ".10"), gateway: ($net + ".1")}]],
                          routes: [{dst: $svc, gw: ($net + ".1")}]}},
                  {type: "loopback"}]}' >"$NODE_DIR/cni/net.d/10-streampipe.conflist"
}

network_down() {
    if iptables -t nat -C PREROUTING -i "$BRIDGE" -j "$NAT_CHAIN" 2>/dev/null; then
        iptables -t nat -D PREROUTING -i "$BRIDGE" -j "$NAT_CHAIN"
    fi
    if iptables -t nat -L "$NAT_CHAIN" -n >/dev/null 2>&1; then
        iptables -t nat -F "$NAT_CHAIN"
        iptables -t nat -X "$NAT_CHAIN"
    fi
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        # The pods' veths normally die with their network namespaces; one
        # whose namespace outlived an interrupted run would outlive the
        # bridge too, so they go first (deleting one end deletes the pair).
        local veth
        for veth in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
            ip link del "$veth" 2>/dev/null || true
        done
        ip link del "$BRIDGE"
        nlog "bridge $BRIDGE removed"
    fi
    rm -rf "$NODE_DIR/cni/ipam"
}

# --- containerd ---------------------------------------------------------------

containerd_config() {
    local c=$NODE_DIR/containerd
    mkdir -p "$c/root" "$c/state"
    # Own root, state and socket: nothing shared with a containerd the
    # machine may run. restrict_oom_score_adj: root here lacks
    # CAP_SYS_RESOURCE, and runc's oom_score_adj write would fail every
    # sandbox ("can't get final child's PID from pipe: EOF").
    cat >"$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
    max_conf_num = 1
EOF
}

containerd_ready() { ctr --address "$SOCK" version >/dev/null 2>&1; }

# --- kubelet ------------------------------------------------------------------

kubelet_config() {
    mkdir -p "$NODE_DIR/kubelet"
    cat >"$NODE_DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GATEWAY
port: $KUBELET_PORT
readOnlyPort: 0
healthzPort: 0
# Only the API server (its client certificate from kube.sh's CA) may call
# the kubelet's API (logs, exec, port-forward).
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $KUBE_DIR/pki/ca.crt}
authorization: {mode: AlwaysAllow}
# No KUBE-FIREWALL / KUBE-MARK-* / KUBE-POSTROUTING chains: they are for
# kube-proxy (not run here) and would change the host's firewall (the filter
# chain drops non-loopback traffic to 127.0.0.0/8 for the whole machine).
makeIPTablesUtilChains: false
cgroupDriver: cgroupfs
cgroupsPerQOS: true
failSwapOn: false
# A shared build machine's disk is often >85% full: without these the node
# reports DiskPressure (taint) and image GC deletes images nothing can pull.
evictionHard: {memory.available: 100Mi, nodefs.available: 2Gi, imagefs.available: 2Gi}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
}

node_ready() {
    [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# Ready as reported by the kubelet running now: the Node object (and its
# Ready condition) outlives a down/up in etcd.
node_ready_since() { # epoch seconds
    local beat
    node_ready || return 1
    beat=$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}')
    [ -n "$beat" ] && [ "$(date -d "$beat" +%s)" -ge "$1" ]
}

save_kernel_tunables() { # before kubelet's first start only
    [ -f "$NODE_DIR/kernel-tunables" ] && return
    local t
    for t in "${KERNEL_TUNABLES[@]}"; do echo "$t=$(sysctl -n "$t")"; done >"$NODE_DIR/kernel-tunables"
}

restore_kernel_tunables() {
    [ -f "$NODE_DIR/kernel-tunables" ] || return 0
    local line changed=()
    while IFS= read -r line; do
        if [ "$(sysctl -n "${line%%=*}")" != "${line#*=}" ]; then
            sysctl -qw "$line"
            changed+=("$line")
        fi
    done <"$NODE_DIR/kernel-tunables"
    [ ${#changed[@]} -eq 0 ] || nlog "restored what kubelet rewrote: ${changed[*]}"
}

# --- up / down ----------------------------------------------------------------

up() {
    local started=$SECONDS
    [ "$(id -u)" = 0 ] || die "a node needs root (containerd, kubelet, the bridge)"
    ensure_node_packages
    "$ROOT/scripts/kube.sh" build kubelet kube-scheduler pause
    mkdir -p "$NODE_DIR/logs"
    network_up
    kube up >/dev/null
    containerd_config
    start containerd --config "$NODE_DIR/containerd/config.toml"
    wait_until "containerd's socket" containerd containerd_ready
    images

    # The scheduler: no HTTP endpoints (nothing polls them), one replica.
    start kube-scheduler --kubeconfig="$KUBE_DIR/kubeconfig" --leader-elect=false \
        --port=0 --secure-port=0 --profiling=false --v=1

    kubelet_config
    if ! running kubelet; then
        save_kernel_tunables
        # Pod log folders kubelet creates (removed by down if we made them).
        local d
        for d in "${POD_LOG_DIRS[@]}"; do
            [ -e "$d" ] || [ -e "$NODE_DIR/created-${d//\//_}" ] || touch "$NODE_DIR/created-${d//\//_}"
        done
    fi
    # The kubelet refuses a loopback node IP: the node is the gateway. cgroups
    # go to /kubepods (removed by down).
    local kubelet_started
    if running kubelet; then kubelet_started=$(stat -c %Y "$NODE_DIR/kubelet.pid")
    else kubelet_started=$(date +%s); fi
    start kubelet --config="$NODE_DIR/kubelet/config.yaml" --kubeconfig="$KUBE_DIR/kubeconfig" \
        --root-dir="$NODE_DIR/kubelet/root" --cert-dir="$NODE_DIR/kubelet/pki" \
        --container-runtime=remote --container-runtime-endpoint="unix://$SOCK" \
        --runtime-request-timeout=2m \
        --node-ip="$GATEWAY" --hostname-override="$NODE_NAME" \
        --pod-infra-container-image="$PAUSE_IMAGE" \
        --v=1
    wait_until "node $NODE_NAME Ready" kubelet node_ready_since "$kubelet_started"
    restore_kernel_tunables
    nlog "up in $(( SECONDS - started ))s"
    status
}

stop() { # daemon
    local name=$1 pid
    [ -f "$NODE_DIR/$name.pid" ] || return 0
    if running "$name"; then
        pid=$(cat "$NODE_DIR/$name.pid")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        nlog "$name stopped"
    fi
    rm -f "$NODE_DIR/$name.pid"
}

# The shims of our containerd (each names our socket in its arguments).
our_shims() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink -f "$p/exe" 2>/dev/null)" = /usr/bin/containerd-shim-runc-v2 ] || continue
        tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-address $SOCK " && echo "${p#/proc/}"
    done
    return 0
}

# Processes in kubelet's pod cgroups (/kubepods: ours, one node per machine).
pod_processes() {
    local h
    for h in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
        [ -d "$h" ] && find "$h" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -u
    return 0
}

# Mount points under the state folder, deepest first.
our_mounts() {
    awk '{print $5}' /proc/self/mountinfo | grep -F "$NODE_DIR/" | sort -r || true
}

down() {
    # The test stack listens on the gateway address: it goes first.
    if [ -d "$NODE_DIR/stack" ]; then
        STREAMPIPE_STACK_DIR=$NODE_DIR/stack "$ROOT/scripts/stack.sh" down
    fi
    stop kubelet
    stop kube-scheduler
    restore_kernel_tunables
    rm -f "$NODE_DIR/kernel-tunables"
    # Every container of our containerd: killed and deleted (this unmounts
    # their root filesystems); the sandboxes' network namespaces go with the
    # mounts below.
    if running containerd; then
        local t
        for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
        for _ in $(seq 1 50); do
            ctr_ tasks ls 2>/dev/null | awk 'NR > 1 && $3 != "STOPPED"' | grep -q . || break
            sleep 0.1
        done
        for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
    fi
    stop containerd
    local pid
    for pid in $(our_shims); do kill -KILL "$pid" 2>/dev/null || true; done
    # Container processes whose containerd died first (an interrupt reaches
    # the daemons too, they share the script's process group): still in
    # kubelet's /kubepods cgroups, holding their network namespaces.
    for pid in $(pod_processes); do kill -KILL "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do [ -z "$(pod_processes)" ] && break; sleep 0.1; done
    local m
    for m in $(our_mounts); do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || nlog "could not unmount $m"; done
    # The pods' cgroups (kubelet's /kubepods in every hierarchy), leaves first.
    local h
    for h in /sys/fs/cgroup/*/; do
        [ -d "$h/kubepods" ] || continue
        find "$h/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        [ -d "$h/kubepods" ] && nlog "cgroup $h/kubepods still busy"
    done
    network_down
    local d
    for d in "${POD_LOG_DIRS[@]}"; do
        if [ -e "$NODE_DIR/created-${d//\//_}" ]; then rm -rf "$d" "$NODE_DIR/created-${d//\//_}"; fi
    done
    kube down
}

run_tests() {
    up
    export STREAMPIPE_STACK_DIR=$NODE_DIR/stack STREAMPIPE_STACK_ADDRESS=$GATEWAY STREAMPIPE_BROKERS=dev
    "$ROOT/scripts/stack.sh" up >/dev/null
    # shellcheck disable=SC1091
    source "$STREAMPIPE_STACK_DIR/env"
    eval "$(env_file)"
    local started=$SECONDS
    # --workspace, as the suite's `cargo test`: the same feature set, so
    # nothing is rebuilt after it. One test at a time (they share the node).
    (cd "$ROOT" && cargo test --workspace --test node_e2e -- --nocapture --test-threads=1)
    nlog "node tests passed in $(( SECONDS - started ))s"
}

# Why this machine cannot run a node, or nothing.
cannot_run() {
    [ "$(id -u)" = 0 ] || { echo "not root (containerd, kubelet and the pod bridge need root)"; return; }
    [ -d /sys/fs/cgroup ] && [ -n "$(ls -A /sys/fs/cgroup 2>/dev/null)" ] \
        || { echo "no cgroup hierarchy under /sys/fs/cgroup (kubelet needs one)"; return; }
    [ -w /sys/fs/cgroup ] || [ -w /sys/fs/cgroup/memory ] || [ -w /sys/fs/cgroup/unified ] \
        || { echo "the cgroup hierarchy is read-only (kubelet creates /kubepods)"; return; }
    command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] \
        || { echo "no ip(8) (iproute2) for the pod bridge"; return; }
    return 0
}

# One node per machine (bridge, kubelet port, /kubepods, /var/log/pods):
# a second suite waits for the first rather than breaking it.
NODE_LOCK=/run/lock/streampipe-node.lock
# Longer than one suite's node phase (~10 min cold, kubelet build included).
NODE_LOCK_WAIT_SECONDS=1800

suite() {
    local why
    why=$(cannot_run)
    if [ -n "$why" ]; then
        nlog "======================================================================"
        nlog "NODE TESTS SKIPPED: $why."
        nlog "tests/tests/node_e2e.rs did not run; see docs/node.md."
        nlog "======================================================================"
        return 0
    fi
    mkdir -p "$(dirname "$NODE_LOCK")"
    exec 8>"$NODE_LOCK"
    if ! flock -n 8; then
        nlog "another node runs on this machine: waiting up to ${NODE_LOCK_WAIT_SECONDS}s for $NODE_LOCK"
        flock -w "$NODE_LOCK_WAIT_SECONDS" 8 || die "the machine's node stayed busy"
    fi
    # Whatever happens from here (a failed test, an interrupt), down runs.
    trap 'rc=$?; nlog "down (exit $rc)"; down >&2 || nlog "down failed: see above"; exit $rc' EXIT
    trap 'exit 130' INT TERM
    # A fresh control plane (no object of an earlier run); images stay.
    kube reset >/dev/null 2>&1 || true
    local started=$SECONDS
    run_tests
    nlog "node phase done in $(( SECONDS - started ))s"
}

status() {
    local name bad=0
    for name in "${DAEMONS[@]}"; do
        if running "$name"; then echo "$name: running (pid $(cat "$NODE_DIR/$name.pid"))"
        else echo "$name: stopped"; bad=1; fi
    done
    if running kubelet && node_ready; then echo "node $NODE_NAME: Ready"
    else echo "node $NODE_NAME: not ready"; bad=1; fi
    echo "gateway:    $GATEWAY on $BRIDGE (pods: $NET.0/24)"
    echo "kubeconfig: $KUBE_DIR/kubeconfig"
    echo "containerd: $SOCK"
    return $bad
}

env_file() {
    echo "export STREAMPIPE_TEST_NODE_KUBECONFIG=$KUBE_DIR/kubeconfig"
    echo "export STREAMPIPE_TEST_NODE_GATEWAY=$GATEWAY"
    echo "export STREAMPIPE_TEST_NODE_KUBECTL=$KUBE_BIN/kubectl"
}

# The images' profile: the tests reuse the suite's debug build (no release
# build on a CI run); a node brought up to try it runs release binaries.
case "${1:-}" in
    test | suite) PROFILE=${PROFILE:-debug} ;;
    images) PROFILE=${2:-${PROFILE:-release}} ;;
    *) PROFILE=${PROFILE:-release} ;;
esac
case "$PROFILE" in debug | release) ;; *) die "profile '$PROFILE': debug or release" ;; esac

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) env_file ;;
    images) mkdir -p "$NODE_DIR/logs"; images ;;
    test) run_tests ;;
    suite) suite ;;
    *) echo "usage: $0 up|down|status|env|images [debug|release]|test|suite" >&2; exit 2 ;;
esac
