#!/usr/bin/env bash
# The pullgate demo, on one machine, offline, as root:
#   1. installs the system dependencies and builds pullgate and the tiny CRI client (examples/cri.rs);
#   2. starts two loopback registries ("public": what docker.io, registry.k8s.io, gcr.io, quay.io and
#      ghcr.io resolve to here; "private": the approved mirror, which also serves the pause image),
#      builds busybox images offline and pushes them;
#   3. starts a private containerd 1.6 and pullgate in front of it, all under $PULLGATE_DEMO_DIR
#      (default /tmp/pullgate-demo);
#   4. makes CRI calls through pullgate, like kubelet would, and shows pullgate's log of them;
#   5. leaves everything running; scripts/demo-stop.sh stops exactly what this started.
#
# Options: --release  build with the release profile (slower to build; default: debug)
#          --no-build use the binaries already in target/
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
export STACK_DIR=${PULLGATE_DEMO_DIR:-/tmp/pullgate-demo}
PROFILE=debug
BUILD=1
for arg in "$@"; do
  case $arg in
    --release) PROFILE=release ;;
    --no-build) BUILD=0 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

# shellcheck source=scripts/lib/stack.sh
source "$REPO/scripts/lib/stack.sh"

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
say() { printf '    %s\n' "$*"; }
show() { # show CMD...: print a command, then run it
  local shown
  shown=$(printf '%q ' "$@")
  printf '\n\033[36m$ %s\033[0m\n' "${shown% }"
  "$@"
}

[[ "$(id -u)" == 0 ]] || stack_die "the demo runs containerd and containers: run it as root"
if [[ -e "$STACK_DIR/pids" ]]; then
  stack_die "$STACK_DIR already holds a demo; stop it first: scripts/demo-stop.sh"
fi

bold "1. Dependencies and build"
./scripts/install-deps.sh
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
TARGET_DIR=${TARGET_DIR:-$REPO/target}
if ((BUILD)); then
  flags=(--bin pullgate --example cri)
  [[ $PROFILE == release ]] && flags+=(--release)
  cargo build "${flags[@]}"
fi
PULLGATE="$TARGET_DIR/$PROFILE/pullgate"
CRI_BIN="$TARGET_DIR/$PROFILE/examples/cri"
[[ -x "$PULLGATE" && -x "$CRI_BIN" ]] || stack_die "missing $PULLGATE or $CRI_BIN (build them, or drop --no-build)"

rm -rf "$STACK_DIR"
mkdir -p "$STACK_DIR/images"
: >"$STACK_DIR/pids"

bold "2. Registries and images (loopback only)"
PUBLIC_PORT=$(start_registry public)
PRIVATE_PORT=$(start_registry private)
PUBLIC=127.0.0.1:$PUBLIC_PORT
PRIVATE=127.0.0.1:$PRIVATE_PORT
say "public registry:  http://$PUBLIC   (docker.io, registry.k8s.io, gcr.io, quay.io, ghcr.io point here)"
say "private registry: http://$PRIVATE  (the approved mirror)"

build_image pause "demo pause" /bin/sleep infinity
PAUSE_DIGEST=$(push_image pause "$PRIVATE" pause:1)
build_image busybox "demo busybox"
BUSYBOX_DIGEST=$(push_image busybox "$PUBLIC" library/busybox:1.36)
build_image tools "demo tools"
TOOLS_DIGEST=$(push_image tools "$PUBLIC" acme/tools:2.0)
copy_by_digest "$PUBLIC" library/busybox "$BUSYBOX_DIGEST" "$PRIVATE" approved/library/busybox
say "pushed $PRIVATE/pause:1                 $PAUSE_DIGEST"
say "pushed docker.io/library/busybox:1.36   $BUSYBOX_DIGEST"
say "pushed quay.io/acme/tools:2.0           $TOOLS_DIGEST"
say "copied busybox by digest to $PRIVATE/approved/library/busybox@$BUSYBOX_DIGEST"

bold "3. containerd and pullgate"
start_containerd "$PUBLIC" "$PRIVATE" "$PRIVATE/pause:1"
say "containerd: $STACK_DIR/containerd/containerd.sock (log: $STACK_DIR/containerd/containerd.log)"
mkdir -p "$STACK_DIR/pullgate"
cat >"$STACK_DIR/pullgate/config.toml" <<TOML
# pullgate demo configuration (see config.example.toml for every key).
[server]
listen = "$STACK_DIR/pullgate/pullgate.sock"
upstream = "$STACK_DIR/containerd/containerd.sock"
drain_grace = "2s"

[log]
format = "text"
# pullgate at debug shows every intercepted call; its libraries stay at info.
level = "pullgate=debug,info"
TOML
start_pullgate "$PULLGATE" "$STACK_DIR/pullgate/config.toml"
PG_SOCK=$STACK_DIR/pullgate/pullgate.sock
say "pullgate:   $PG_SOCK (log: $STACK_DIR/pullgate/pullgate.log)"

# Write a small environment file so people can keep poking at the stack.
cat >"$STACK_DIR/env" <<ENV
# source $STACK_DIR/env
export CRI_SOCKET=$PG_SOCK
export PULLGATE_DEMO_DIR=$STACK_DIR
export PUBLIC_REGISTRY=$PUBLIC
export PRIVATE_REGISTRY=$PRIVATE
export BUSYBOX_DIGEST=$BUSYBOX_DIGEST
alias cri='$CRI_BIN'
ENV

bold "4. CRI calls through pullgate (what kubelet does)"
cri() { "$CRI_BIN" --socket "$PG_SOCK" "$@"; }
log_mark=$(wc -l <"$STACK_DIR/pullgate/pullgate.log")
show cri version
show cri pull docker.io/library/busybox:1.36 --namespace demo
show cri pull "$PRIVATE/approved/library/busybox@$BUSYBOX_DIGEST" --namespace demo
show cri images
show cri image-status docker.io/library/busybox:1.36
show cri image-status quay.io/acme/tools:2.0 || say "(exit status $?: not pulled yet)"
show cri run docker.io/library/busybox:1.36 --namespace demo -- /bin/sh -c 'grep -q "demo busybox" /etc/pullgate-fixture'

bold "5. What pullgate saw (its log lines for the calls above)"
tail -n +"$((log_mark + 1))" "$STACK_DIR/pullgate/pullgate.log" | grep -E 'PullImage|ImageStatus|CreateContainer|intercept' || \
  say "(no intercept lines at debug level yet; full log: $STACK_DIR/pullgate/pullgate.log)"

bold "The stack is still running."
cat <<EOF
    source $STACK_DIR/env          # sets CRI_SOCKET and an alias for the CRI client
    cri images                     # through pullgate
    cri --socket $STACK_DIR/containerd/containerd.sock images   # straight to containerd
    cri pull quay.io/acme/tools:2.0 --namespace demo
    tail -f $STACK_DIR/pullgate/pullgate.log
    cat $STACK_DIR/public/access.log   # every request the "public" registry received

    Stop it:  scripts/demo-stop.sh     (kills exactly the processes in $STACK_DIR/pids, removes $STACK_DIR)
EOF
