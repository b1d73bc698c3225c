#!/usr/bin/env bash
# Builds the pullgate .deb and .rpm from this checkout.
#
#   packaging/build.sh [deb|rpm|packages]      (default: packages = both)
#   make deb | make rpm | make packages        (the same, from the repository root)
#
# Output: target/packages/pullgate_<version>-1_<arch>.deb and target/packages/pullgate-<version>-1.<arch>.rpm
# (override the directory with PULLGATE_PKG_OUT). Needs cargo, strip and gzip; installs cargo-deb and
# cargo-generate-rpm from crates.io into ~/.cargo/bin when they are missing.
#
# Steps: release build -> stripped copy of the binary -> man pages and shell completions generated
# from the clap definition (examples/gen-docs.rs) -> cargo deb / cargo generate-rpm, whose file lists
# live in Cargo.toml ([package.metadata.deb], [package.metadata.generate-rpm]) and point at the
# staging directory target/pkg-stage.
set -euo pipefail

what=${1:-packages}
case "$what" in
    deb|rpm|packages) ;;
    *) echo "usage: $0 [deb|rpm|packages]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target_dir=${CARGO_TARGET_DIR:-$root/target}
# Cargo.toml's package metadata names these paths relative to the repository root.
stage=$root/target/pkg-stage
out=${PULLGATE_PKG_OUT:-$root/target/packages}

# Versions known to work with the metadata in Cargo.toml.
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

log() { printf '==> %s\n' "$*" >&2; }

ensure_tool() { # cargo subcommand binary, crate, version
    if ! command -v "$1" >/dev/null 2>&1; then
        log "installing $2 $3 from crates.io (once)"
        cargo install --locked "$2" --version "$3"
    fi
}

[ "$what" = rpm ] || ensure_tool cargo-deb cargo-deb "$CARGO_DEB_VERSION"
[ "$what" = deb ] || ensure_tool cargo-generate-rpm cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"

log "cargo build --release"
cargo build --release --bin pullgate

rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/gen" "$out"

# The release profile keeps symbols; ship a stripped copy (cargo-deb's own stripping is turned off
# so that the .deb and the .rpm carry byte-identical binaries).
log "stripping the binary"
strip --strip-unneeded -o "$stage/bin/pullgate" "$target_dir/release/pullgate"
chmod 0755 "$stage/bin/pullgate"

log "generating man pages and shell completions from the CLI definition"
cargo run --quiet --example gen-docs -- "$stage/gen"
gzip -9n "$stage"/gen/man/*.1

version=$(cargo metadata --no-deps --format-version 1 |
    sed -n 's/.*"name":"pullgate","version":"\([^"]*\)".*/\1/p')
[ -n "$version" ] || { echo "cannot read the crate version" >&2; exit 1; }

if [ "$what" != rpm ]; then
    log "cargo deb"
    rm -f "$out"/pullgate_*.deb
    cargo deb --no-build --no-strip --output "$out"
fi
if [ "$what" != deb ]; then
    log "cargo generate-rpm"
    rm -f "$out"/pullgate-*.rpm
    cargo generate-rpm --output "$out"
fi

log "packages in $out:"
ls -l "$out" >&2
