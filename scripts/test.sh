#!/usr/bin/env bash
# THE test command (README, and .ci/run calls exactly this): installs the system dependencies, checks
# formatting and lints, runs the whole cargo test suite (unit, integration and the real-containerd
# end-to-end tests), then every extra shell suite that exists.
#
# End-to-end tests run by default and need root plus the packages of scripts/install-deps.sh; a missing
# prerequisite FAILS them. Opt out explicitly with PULLGATE_SKIP_E2E=1 (they then print a loud notice).
# Extra cargo test arguments can be passed through: scripts/test.sh -- --test-threads 1
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$SECONDS
step() { printf '\n==> [%4ss] %s\n' "$((SECONDS - started))" "$*"; }

extra=()
if [[ "${1:-}" == "--" ]]; then
  shift
  extra=("$@")
fi

# One run from a clean clone gains nothing from incremental compilation, whose caches would take more
# disk than the rest of the debug build together. Set CARGO_INCREMENTAL=1 to keep them.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# A clean build of everything this script runs takes about need_mib MiB of disk under target/. Say so up
# front when the disk has less: a full disk otherwise shows up only as a failed link, minutes in.
need_mib=4096
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
free_mib=$(df -Pm "$target_dir" | awk 'NR == 2 { print $4 }')
if [[ "$free_mib" =~ ^[0-9]+$ ]] && (( free_mib < need_mib )); then
  echo "warning: $free_mib MiB free under $target_dir; a clean build of the test suite takes about $need_mib MiB." >&2
  echo "warning: free some disk (an old target/ directory, say) if the build fails with 'No space left on device'." >&2
fi

step "install system dependencies (scripts/install-deps.sh)"
./scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

if [[ "${PULLGATE_SKIP_E2E:-}" =~ ^(1|true|yes)$ ]]; then
  cat <<'BANNER'

!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!! PULLGATE_SKIP_E2E is set: the end-to-end tests against a real
!!! containerd are SKIPPED. Nothing proves pullgate works on a real node.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
BANNER
elif [[ "$(id -u)" != 0 ]]; then
  echo "note: not root: the end-to-end tests will FAIL (they need root); set PULLGATE_SKIP_E2E=1 to skip them" >&2
fi

step "cargo test (unit, integration, end-to-end, doc tests)"
cargo test ${extra[@]+"${extra[@]}"}

if [[ -x tests/packaging/run.sh ]]; then
  step "tests/packaging/run.sh"
  tests/packaging/run.sh
elif [[ -e tests/packaging/run.sh ]]; then
  echo "error: tests/packaging/run.sh exists but is not executable" >&2
  exit 1
fi

step "all checks passed"
