# shellcheck shell=bash
# Shell building blocks of the demo stack (sourced by scripts/demo.sh; the Rust test harness in
# tests/support/ does the same in-process). Everything lives under $STACK_DIR, listens on 127.0.0.1 or
# unix sockets there, and every process started is recorded as "NAME PID" in $STACK_DIR/pids so that
# scripts/demo-stop.sh can kill exactly those.
#
# Callers set STACK_DIR before sourcing. Functions die on error (set -euo pipefail in the caller).

: "${STACK_DIR:?STACK_DIR must be set}"
PUBLIC_REGISTRY_NAMES=(docker.io registry.k8s.io gcr.io quay.io ghcr.io)
# containerd looks runc (Debian: /usr/sbin/runc) up on PATH.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" ;; esac

stack_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# free_port: a 127.0.0.1 TCP port that was free a moment ago.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null && return
  local p
  for p in $(seq 35000 35999 | shuf); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  stack_die "no free port found"
}

# spawn NAME LOGFILE CMD...: starts CMD in its own session, records its PID.
spawn() {
  local name=$1 log=$2
  shift 2
  setsid "$@" </dev/null >>"$log" 2>&1 &
  local pid=$!
  echo "$name $pid" >>"$STACK_DIR/pids"
  echo "$pid"
}

# wait_until TIMEOUT_S DESCRIPTION CMD...: polls CMD every 0.1 s.
wait_until() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

http_ok() { # http_ok PORT PATH
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
  local status
  read -r _ status _ <&3 || true
  exec 3>&-
  [[ "$status" == 200 ]]
}

# start_registry NAME: a Distribution registry on 127.0.0.1:<free port>; prints the port.
# Access log (one line per request): $STACK_DIR/NAME/access.log; own log: $STACK_DIR/NAME/registry.log.
start_registry() {
  local name=$1 dir="$STACK_DIR/$1" port
  mkdir -p "$dir/storage"
  port=$(free_port)
  cat >"$dir/config.yml" <<YML
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YML
  # Distribution writes its access log on stdout and everything else on stderr.
  setsid docker-registry serve "$dir/config.yml" </dev/null >>"$dir/access.log" 2>>"$dir/registry.log" &
  echo "registry-$name $!" >>"$STACK_DIR/pids"
  wait_until 15 "registry $name" http_ok "$port" /v2/ || stack_die "registry $name did not start: $(tail -5 "$dir/registry.log")"
  echo "$port"
}

# build_image TAG MARKER ENTRYPOINT...: a busybox-static image in the OCI layout $STACK_DIR/images/oci.
build_image() {
  local tag=$1 marker=$2
  shift 2
  local layout="$STACK_DIR/images/oci" rootfs="$STACK_DIR/images/rootfs-$tag" busybox
  busybox=$(command -v busybox) || stack_die "busybox not found (install busybox-static)"
  [[ -d "$layout" ]] || umoci init --layout "$layout"
  rm -rf "$rootfs"
  mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev}
  cp "$busybox" "$rootfs/bin/busybox"
  local applet
  for applet in sh true false sleep cat echo ls env id hostname printf test wc grep; do
    ln -s busybox "$rootfs/bin/$applet"
  done
  printf '%s\nbuilt %s\n' "$marker" "$(date -u +%FT%T.%NZ)" >"$rootfs/etc/pullgate-fixture"
  echo 'root:x:0:0:root:/:/bin/sh' >"$rootfs/etc/passwd"
  umoci new --image "$layout:$tag"
  umoci insert --image "$layout:$tag" "$rootfs" /
  local args=(--config.env PATH=/bin --config.workingdir / --config.label "pullgate.fixture=$marker")
  if (($# > 0)); then
    local e
    for e in "$@"; do args+=(--config.entrypoint "$e"); done
  else
    args+=(--config.cmd /bin/sh)
  fi
  umoci config --image "$layout:$tag" "${args[@]}"
  rm -rf "$rootfs"
}

# manifest_digest HOST REPO_REF: sha256 of the manifest HOST serves for REPO:TAG or REPO@DIGEST.
manifest_digest() {
  echo "sha256:$(skopeo inspect --raw --tls-verify=false "docker://$1/$2" | sha256sum | cut -d' ' -f1)"
}

# push_image TAG HOST REPO:TAG: pushes a layout tag; prints the manifest digest the registry serves.
push_image() {
  skopeo copy --quiet --dest-tls-verify=false "oci:$STACK_DIR/images/oci:$1" "docker://$2/$3"
  manifest_digest "$2" "$3"
}

# copy_by_digest SRC_HOST SRC_REPO DIGEST DST_HOST DST_REPO: copies keeping the digest, and checks it.
copy_by_digest() {
  skopeo copy --quiet --preserve-digests --src-tls-verify=false --dest-tls-verify=false \
    "docker://$1/$2@$3" "docker://$4/$5@$3"
  local got
  got=$(manifest_digest "$4" "$5@$3")
  [[ "$got" == "$3" ]] || stack_die "copy of $2@$3 to $4/$5 changed the digest to $got"
}

hosts_toml() { # hosts_toml CERTS_DIR NAME TARGET_HOST
  mkdir -p "$1/$2"
  cat >"$1/$2/hosts.toml" <<TOML
# $2 -> loopback registry $3 (nothing may reach the internet)
server = "http://$3"

[host."http://$3"]
  capabilities = ["pull", "resolve"]
TOML
}

overlay_works() {
  local p="$STACK_DIR/.overlay-probe" ok=1
  mkdir -p "$p"/{lower,upper,work,merged}
  if mount -t overlay overlay -o "lowerdir=$p/lower,upperdir=$p/upper,workdir=$p/work" "$p/merged" 2>/dev/null; then
    umount "$p/merged"
    ok=0
  fi
  rm -rf "$p"
  return $ok
}

# start_containerd PUBLIC_HOST PRIVATE_HOST SANDBOX_IMAGE: containerd 1.6 with everything under
# $STACK_DIR/containerd; socket $STACK_DIR/containerd/containerd.sock.
start_containerd() {
  local public=$1 private=$2 sandbox=$3 d="$STACK_DIR/containerd" snapshotter=native name
  mkdir -p "$d"/{root,state,tmp,opt,runc,runc-v1,certs.d,cni/bin,cni/net.d}
  # _default: containerd's fallback for every registry name not listed, so none reaches the internet.
  for name in "${PUBLIC_REGISTRY_NAMES[@]}" "$public" _default; do hosts_toml "$d/certs.d" "$name" "$public"; done
  hosts_toml "$d/certs.d" "$private" "$private"
  overlay_works && snapshotter=overlayfs
  cat >"$d/config.toml" <<TOML
# containerd 1.6 config of the pullgate demo: every path lives under $d.
version = 2
root = "$d/root"
state = "$d/state"
temp = "$d/tmp"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "$d/containerd.sock"

[ttrpc]
  address = "$d/containerd.sock.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$d/opt"
  [plugins."io.containerd.runtime.v1.linux"]
    runtime_root = "$d/runc-v1"
  [plugins."io.containerd.grpc.v1.cri"]
    restrict_oom_score_adj = true
    sandbox_image = "$sandbox"
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "$d/cni/bin"
      conf_dir = "$d/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "$snapshotter"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          Root = "$d/runc"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "$d/certs.d"
TOML
  spawn containerd "$d/containerd.log" containerd --config "$d/config.toml" >/dev/null
  wait_until 30 containerd grep -q "containerd successfully booted" "$d/containerd.log" ||
    stack_die "containerd did not start: $(tail -5 "$d/containerd.log")"
  wait_until 10 "containerd socket" test -S "$d/containerd.sock" || stack_die "no containerd socket"
}

# start_pullgate BINARY CONFIG: pullgate in front of the stack's containerd;
# socket $STACK_DIR/pullgate/pullgate.sock, log $STACK_DIR/pullgate/pullgate.log.
start_pullgate() {
  local bin=$1 config=$2 d="$STACK_DIR/pullgate"
  mkdir -p "$d"
  spawn pullgate "$d/pullgate.log" env NO_COLOR=1 "$bin" serve --config "$config" \
    --listen "$d/pullgate.sock" --upstream "$STACK_DIR/containerd/containerd.sock" >/dev/null
  wait_until 20 pullgate test -S "$d/pullgate.sock" || stack_die "pullgate did not start: $(tail -20 "$d/pullgate.log")"
}
