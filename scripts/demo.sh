#!/usr/bin/env bash
# The pullgate demo, on one machine, offline, as root — the whole way from an approval to a node that
# enforces it:
#   1. installs the system dependencies and builds pullgate and the tiny CRI client (examples/cri.rs);
#   2. starts two loopback registries ("public": what docker.io, registry.k8s.io, gcr.io, quay.io and
#      ghcr.io resolve to here; "private": the approved mirror and the bundle channel), builds
#      busybox images offline and pushes them to the public one;
#   3. the administrators: two keys (pullgate keygen), a 2-of-2 trust file, a catalog, and
#      `pullgate approve` of busybox:1.36 and the pause image (two scanner reports each, licence,
#      mirrored by digest into the private registry) → `pullgate bundle build` → `bundle sign` by both
#      → `pullgate bundle publish` to the channel registry/pullgate/bundles:prod;
#   4. starts a private containerd 1.6 (sandbox image: the approved pause copy, pinned by digest) and
#      pullgate in front of it with no bundle but a [sync] section: it takes the published bundle up
#      from the channel by itself, all under $PULLGATE_DEMO_DIR (default /tmp/pullgate-demo);
#   5. makes CRI calls through pullgate like kubelet would: an approved short-name pull rewritten and
#      pinned, a public image blocked, a pod running the approved image; then `pullgate status` (with
#      the sync), a decision explained by the live daemon, and the audit log;
#   6. leaves everything running; scripts/demo-stop.sh stops exactly what this started.
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
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
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
PAUSE_DIGEST=$(push_image pause "$PUBLIC" pause:3.9)
build_image busybox "demo busybox"
BUSYBOX_DIGEST=$(push_image busybox "$PUBLIC" library/busybox:1.36)
build_image tools "demo tools"
TOOLS_DIGEST=$(push_image tools "$PUBLIC" acme/tools:2.0)
say "public:  registry.k8s.io/pause:3.9       $PAUSE_DIGEST"
say "public:  docker.io/library/busybox:1.36  $BUSYBOX_DIGEST"
say "public:  quay.io/acme/tools:2.0          $TOOLS_DIGEST   (never approved)"

bold "3. The administrators: keys, a catalog, approve → build → sign → publish"
KEYS=$STACK_DIR/keys
CATALOG=$STACK_DIR/catalog
mkdir -p "$KEYS" "$CATALOG/reports" "$STACK_DIR/bundle"
"$PULLGATE" keygen --out "$KEYS/alice" >/dev/null
"$PULLGATE" keygen --out "$KEYS/bob" >/dev/null
cat >"$KEYS/trust.toml" <<TOML
# Both administrators must sign (2 of 2).
threshold = 2

[[keys]]
name = "alice"
public_key = "$(cat "$KEYS/alice.pub")"

[[keys]]
name = "bob"
public_key = "$(cat "$KEYS/bob.pub")"
TOML
cp "$KEYS/trust.toml" "$CATALOG/trust.toml"
cat >"$CATALOG/catalog.toml" <<TOML
# The demo's catalog (docs/catalog.md): the private registry is the approved mirror; the public
# registries are reached at the loopback "public" registry.
issuer = "platform-security@corp.example"
private_registry = "$PRIVATE"
validity = "30d"
plain_http = ["$PUBLIC", "$PRIVATE"]
trust = "trust.toml"

[endpoints]
"docker.io" = "$PUBLIC"
"registry.k8s.io" = "$PUBLIC"

[[mirrors]]
source = "docker.io"
target = "approved"

[[mirrors]]
source = "registry.k8s.io"
target = "approved-k8s"
TOML
cat >"$CATALOG/governance.toml" <<TOML
organization = "corp"
application_label = "corp.example/application"
mode = "enforce"

[rules]
min_scanners = 2
max_severity = "high"

[rules.licenses]
allow = ["MIT", "Apache-2.0", "GPL-2.0-only"]

[[programs]]
name = "payments"

[[programs.projects]]
name = "checkout"
namespaces = ["checkout"]
TOML
reports() { # reports NAME REPO DIGEST: a clean Trivy and Grype report about REPO@DIGEST, made an hour ago
  local at
  at=$(date -u -d '-1 hour' +%FT%TZ)
  cat >"$CATALOG/reports/$1-trivy.json" <<JSON
{"SchemaVersion": 2, "Trivy": {"Version": "0.58.1"}, "CreatedAt": "$at", "ArtifactName": "$2@$3",
 "ArtifactType": "container_image",
 "Metadata": {"ImageID": "", "RepoDigests": ["$2@$3"], "RepoTags": [], "DiffIDs": []},
 "Results": [{"Target": "$2@$3", "Class": "os-pkgs", "Type": "busybox", "Vulnerabilities": []}]}
JSON
  cat >"$CATALOG/reports/$1-grype.json" <<JSON
{"matches": [],
 "source": {"type": "image", "target": {"userInput": "$2@$3", "imageID": "", "manifestDigest": "$3",
            "repoDigests": ["$2@$3"], "tags": []}},
 "descriptor": {"name": "grype", "version": "0.86.0", "timestamp": "$at"}}
JSON
}
reports busybox docker.io/library/busybox "$BUSYBOX_DIGEST"
reports pause registry.k8s.io/pause "$PAUSE_DIGEST"
show "$PULLGATE" approve docker.io/library/busybox:1.36 --catalog "$CATALOG" --scope corp \
  --license GPL-2.0-only --report "$CATALOG/reports/busybox-trivy.json" \
  --report "$CATALOG/reports/busybox-grype.json" --key "$KEYS/alice.key"
show "$PULLGATE" approve registry.k8s.io/pause:3.9 --catalog "$CATALOG" --scope corp \
  --license Apache-2.0 --report "$CATALOG/reports/pause-trivy.json" \
  --report "$CATALOG/reports/pause-grype.json" --key "$KEYS/alice.key"
BUNDLE=$STACK_DIR/bundle/bundle.json
show "$PULLGATE" bundle build --catalog "$CATALOG" --out "$BUNDLE"
show "$PULLGATE" bundle sign --key "$KEYS/alice.key" "$BUNDLE"
show "$PULLGATE" bundle sign --key "$KEYS/bob.key" "$BUNDLE"
CHANNEL=$PRIVATE/pullgate/bundles:prod
show "$PULLGATE" bundle publish "$BUNDLE" --to "$CHANNEL" --trust "$KEYS/trust.toml" --plain-http "$PRIVATE"

bold "4. containerd and pullgate"
SANDBOX="$PRIVATE/approved-k8s/pause@$PAUSE_DIGEST"
start_containerd "$PUBLIC" "$PRIVATE" "$SANDBOX"
say "containerd: $STACK_DIR/containerd/containerd.sock (sandbox image $SANDBOX)"
PG=$STACK_DIR/pullgate
mkdir -p "$PG"
METRICS_PORT=$(free_port)
CONFIG=$PG/config.toml
cat >"$CONFIG" <<TOML
# pullgate demo configuration (see config.example.toml for every key).
[server]
listen = "$PG/pullgate.sock"
upstream = "$STACK_DIR/containerd/containerd.sock"
drain_grace = "2s"

[log]
format = "text"
# pullgate at debug shows every intercepted call; its libraries stay at info.
level = "pullgate=debug,info"

[policy]
mode = "enforce"
trust = "$KEYS/trust.toml"
state_dir = "$PG/state"

[audit]
path = "$PG/audit.log"

[metrics]
# A fixed port (picked free now), for /metrics, /readyz and /status.
listen = "127.0.0.1:$METRICS_PORT"

[admin]
# pullgate status, bundle install, explain --live and watch talk to the daemon here (0600, root only).
socket = "$PG/admin.sock"

[sync]
# Bundles come from the channel in the private registry; a short interval for the demo.
source = "$CHANNEL"
interval = "2s"
plain_http = ["$PRIVATE"]
seed = "demo-node"
TOML
start_pullgate "$PULLGATE" "$CONFIG"
PG_SOCK=$PG/pullgate.sock
say "pullgate:   $PG_SOCK (started without a bundle)"
say "            log $PG/pullgate.log, audit $PG/audit.log, status http://127.0.0.1:$METRICS_PORT/status"
say "waiting for the sync to take the published bundle up from $CHANNEL …"
synced() { "$PULLGATE" status --config "$CONFIG" --json 2>/dev/null | grep -q '"bundle":{'; }
wait_until 30 "the bundle sync" synced || stack_die "pullgate did not take the bundle up: $(tail -20 "$PG/pullgate.log")"
grep -F 'bundle sync: installed' "$PG/pullgate.log" | tail -n 1 | sed 's/^/      /'
show tail -n 1 "$PG/audit.log"

# A small environment file so people can keep poking at the stack.
cat >"$STACK_DIR/env" <<ENV
# source $STACK_DIR/env
export CRI_SOCKET=$PG_SOCK
export PULLGATE_DEMO_DIR=$STACK_DIR
export PUBLIC_REGISTRY=$PUBLIC
export PRIVATE_REGISTRY=$PRIVATE
export BUSYBOX_DIGEST=$BUSYBOX_DIGEST
export PATH="$TARGET_DIR/$PROFILE:\$PATH"
alias cri='$CRI_BIN'
ENV

cri() { "$CRI_BIN" --socket "$PG_SOCK" "$@"; }
lines() { wc -l <"$1"; }
since() { tail -n +"$(($2 + 1))" "$1"; } # since FILE MARK: the lines appended after line MARK

bold "5. An approved short name: rewritten to the private mirror, pinned by digest"
pub_mark=$(lines "$STACK_DIR/public/access.log")
priv_mark=$(lines "$STACK_DIR/private/access.log")
log_mark=$(lines "$PG/pullgate.log")
show cri pull busybox:1.36 --namespace demo
say "pullgate's log:"
since "$PG/pullgate.log" "$log_mark" | grep -F 'method="PullImage"' | sed 's/^/      /'
say "the private registry served:"
since "$STACK_DIR/private/access.log" "$priv_mark" | grep -o '"[A-Z]* /v2/[^ ]*/manifests/[^ "]*' |
  tr -d '"' | sed 's/^/      /'
say "the public registry received $(($(lines "$STACK_DIR/public/access.log") - pub_mark)) requests"
show cri image-status busybox:1.36

bold "6. A public image that is not in the bundle: blocked before any registry is contacted"
pub_mark=$(lines "$STACK_DIR/public/access.log")
show cri pull quay.io/acme/tools:2.0 --namespace demo || say "(exit status $?: denied)"
say "the public registry received $(($(lines "$STACK_DIR/public/access.log") - pub_mark)) requests"

bold "7. A pod running the approved image (host network), started the way kubelet starts it"
# The container exits 0 only if it runs the approved build (its marker file says "demo busybox").
show cri run busybox:1.36 --namespace demo --name hello -- \
  /bin/sh -c 'grep -qx "demo busybox" /etc/pullgate-fixture'

bold "8. pullgate status (through the admin socket), and a decision explained by the live daemon"
show "$PULLGATE" status --config "$CONFIG"
show "$PULLGATE" explain --live --config "$CONFIG" quay.io/acme/tools:2.0 || say "(exit status $?: denied)"

bold "9. The audit log (one JSON object per decision)"
show tail -n 4 "$PG/audit.log"

bold "The stack is still running. Try:"
cat <<EOF
    source $STACK_DIR/env        # CRI_SOCKET, pullgate on PATH, and an alias for the CRI client
    pullgate explain busybox:1.36 --bundle $BUNDLE --trust $KEYS/trust.toml
    pullgate explain --live --config $CONFIG busybox:1.35
    pullgate watch --config $CONFIG          # decisions as they happen (another terminal: cri pull …)
    pullgate status --config $CONFIG
    pullgate bundle fetch $CHANNEL --out /tmp/fetched --plain-http $PRIVATE
    pullgate bundle inspect $BUNDLE
    cri images                   # through pullgate (note the source tags it adds)
    cri --socket $STACK_DIR/containerd/containerd.sock images   # straight to containerd
    cri run busybox:1.36 -- /bin/echo hi
    tail -f $PG/pullgate.log $PG/audit.log
    cat $STACK_DIR/public/access.log   # every request the "public" registry received

    Stop it:  scripts/demo-stop.sh     (kills exactly the processes in $STACK_DIR/pids, removes $STACK_DIR)
EOF
