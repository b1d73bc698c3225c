#!/usr/bin/env bash
# Installs the Debian packages pullgate's tests and demo need. Idempotent: when every package is
# already installed it touches nothing (no apt-get at all); otherwise, as root, it runs
# `apt-get update` once and `apt-get install -y` for the missing ones.
#
# Usage: scripts/install-deps.sh            (as root, or with everything already installed)
#        scripts/install-deps.sh --list     (print the package list and exit)
set -euo pipefail

# The one list of system packages the project needs, and why.
PACKAGES=(
  protobuf-compiler   # protoc, for k8s-cri's build script
  containerd          # the real CRI runtime of the end-to-end tests (1.6 on Debian 12)
  runc                # containerd's OCI runtime
  docker-registry     # Distribution v2: the loopback "public" and "private" registries
  skopeo              # pushes fixture images and copies them by digest
  umoci               # builds fixture images offline (OCI layouts)
  busybox-static      # the static binary inside every fixture image
  ca-certificates     # apt over https on minimal images
  systemd             # systemd-analyze verify for the unit files (no systemd needs to run)
  rpm                 # rpmbuild/rpm for the packaging checks
  binutils            # strip (packaging/build.sh) and readelf (packaging checks)
  python3-grpcio      # a C-core based gRPC peer (client and server) for the interop tests
  python3-h2          # a raw HTTP/2 client for the tests (sends any :authority, or none)
  prometheus          # promtool, to check and unit-test the shipped alerting rules
)

if [[ "${1:-}" == "--list" ]]; then
  printf '%s\n' "${PACKAGES[@]}"
  exit 0
fi

log() { printf 'install-deps: %s\n' "$*" >&2; }

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  log "all ${#PACKAGES[@]} Debian packages already installed"
else
  log "missing Debian packages: ${missing[*]}"
  if [[ "$(id -u)" != 0 ]]; then
    log "ERROR: installing them needs root. Run: sudo $0"
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    log "ERROR: apt-get not found; this script supports Debian/Ubuntu only. Install: ${missing[*]}"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  log "installed: ${missing[*]}"
fi

if ! command -v cargo >/dev/null; then
  log "ERROR: cargo not found on PATH. Install a Rust toolchain (rustup, or Debian's cargo) first."
  exit 1
fi
for bin in protoc containerd containerd-shim-runc-v2 docker-registry skopeo umoci busybox; do
  command -v "$bin" >/dev/null || { log "ERROR: $bin still not on PATH after installation"; exit 1; }
done
command -v runc >/dev/null || [[ -x /usr/sbin/runc ]] || { log "ERROR: runc not found"; exit 1; }
