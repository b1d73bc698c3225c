#!/usr/bin/env bash
# Packaging test: builds the .deb and the .rpm, then on this machine installs, upgrades, removes and
# purges the .deb and inspects the .rpm. Must run as root on a Debian-like machine (CI: fresh Debian 12).
#
#   tests/packaging/run.sh                 build both packages, then test them
#   PULLGATE_PKG_PREBUILT=1 tests/...      test the packages already in target/packages (no build)
#
# It leaves the machine as it found it: it refuses to start if pullgate is installed or its
# directories exist, and purges the package on exit, failure included. Prints "N passed, N failed"
# last and exits non-zero on any failure.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
out=${PULLGATE_PKG_OUT:-$root/target/packages}
export PULLGATE_PKG_OUT=$out

passed=0
failed=0
tmp=$(mktemp -d /tmp/pullgate-pkgtest.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

ok() { passed=$((passed + 1)); printf 'ok     %s\n' "$1"; }
not_ok() {
    failed=$((failed + 1)); printf 'FAILED %s\n' "$1"
    [ -n "${2:-}" ] && printf '%s\n' "$2" | sed 's/^/       | /' | head -40
    return 0
}
# check DESCRIPTION CMD...: passes when CMD exits 0; shows its output otherwise.
check() {
    local desc=$1; shift
    local output
    if output=$("$@" 2>&1); then ok "$desc"; else not_ok "$desc" "$output"; fi
}
# check_eq DESCRIPTION EXPECTED ACTUAL
check_eq() {
    if [ "$2" = "$3" ]; then ok "$1"; else not_ok "$1" "expected: $2"$'\n'"actual:   $3"; fi
}
finish() {
    printf '\n%d passed, %d failed\n' "$passed" "$failed"
    [ "$failed" -eq 0 ]
    exit $?
}
fatal() { not_ok "$1" "${2:-}"; finish; }

pkg_state() { dpkg-query -W -f='${db:Status-Abbrev}' pullgate 2>/dev/null | tr -d ' '; }
cleanup() {
    # Purge whatever state the package is in (installed, half-configured, config-files).
    if dpkg-query -W pullgate >/dev/null 2>&1; then
        dpkg --purge pullgate >/dev/null 2>&1 || dpkg --purge --force-all pullgate >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
}

# ---------------------------------------------------------------------------------------------------
# Preconditions
[ "$(id -u)" -eq 0 ] || fatal "runs as root (dpkg -i)" "run as root, e.g. in CI"
command -v dpkg >/dev/null || fatal "a Debian-like machine (dpkg)"
case "$(pkg_state)" in
    '' | un | pn) ;;
    *) fatal "pullgate is not installed before the test" "state $(pkg_state); purge it first: dpkg --purge pullgate" ;;
esac
for p in /usr/bin/pullgate /etc/pullgate /var/lib/pullgate; do
    [ -e "$p" ] && fatal "$p does not exist before the test" "refusing to overwrite or purge it"
done
# From here on the package is ours: purge it on any exit.
trap cleanup EXIT

# systemd-analyze, rpm, strip and readelf come from the project's one package list (a no-op when
# everything is installed already, as after scripts/test.sh).
"$root/scripts/install-deps.sh" || fatal "scripts/install-deps.sh" "the packaging checks need its packages"
# Snapshot of systemd's configuration, to prove purge leaves nothing behind.
snapshot() { find /etc/systemd/system /var/lib/systemd/deb-systemd-helper-enabled /var/lib/systemd/deb-systemd-helper-masked ! -type d 2>/dev/null | sort; }
snapshot >"$tmp/systemd.before"

# ---------------------------------------------------------------------------------------------------
echo "== build"
if [ "${PULLGATE_PKG_PREBUILT:-0}" = 1 ]; then
    echo "using the packages in $out"
else
    start=$(date +%s)
    if packaging/build.sh packages >"$tmp/build.log" 2>&1; then
        ok "packaging/build.sh packages ($(($(date +%s) - start))s)"
    else
        fatal "packaging/build.sh packages" "$(tail -30 "$tmp/build.log")"
    fi
fi
version=$(cargo metadata --no-deps --format-version 1 2>/dev/null |
    sed -n 's/.*"name":"pullgate","version":"\([^"]*\)".*/\1/p')
shopt -s nullglob
debs=("$out"/pullgate_*.deb)
rpms=("$out"/pullgate-*.rpm)
shopt -u nullglob
[ ${#debs[@]} -eq 1 ] || fatal "exactly one .deb in $out" "$(ls -l "$out" 2>&1)"
[ ${#rpms[@]} -eq 1 ] || fatal "exactly one .rpm in $out" "$(ls -l "$out" 2>&1)"
deb=${debs[0]} rpmf=${rpms[0]}
check_eq ".deb file name carries the crate version" "pullgate_${version}-1_$(dpkg --print-architecture).deb" "$(basename "$deb")"
check_eq ".rpm file name carries the crate version" "pullgate-${version}-1.$(uname -m).rpm" "$(basename "$rpmf")"

# ---------------------------------------------------------------------------------------------------
echo "== .deb contents (dpkg-deb)"
# "MODE OWNER/GROUP PATH" of every non-directory entry, zsh's distro-specific directory normalised.
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { p=$6; sub(/^\./, "", p); o=$2; if (o == "0/0") o="root/root"; print substr($1, 2), o, p }' |
    sed 's#/usr/share/zsh/vendor-completions/#/usr/share/zsh/COMPLETIONS/#' | sort >"$tmp/deb.files"
rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}/%{FILEGROUPNAME} %{FILENAMES}\n]' "$rpmf" 2>/dev/null |
    awk '$1 !~ /^d/ { print substr($1, 2), $2, $3 }' |
    sed 's#/usr/share/zsh/site-functions/#/usr/share/zsh/COMPLETIONS/#' | sort >"$tmp/rpm.files"

expect_file() { # MODE PATH: in the .deb listing with that mode, owned by root
    if grep -qx "$1 root/root $2" "$tmp/deb.files"; then ok ".deb ships $2 ($1 root:root)"
    else not_ok ".deb ships $2 ($1 root:root)" "$(grep -F " $2" "$tmp/deb.files" || echo 'not in the package')"; fi
}
expect_file rwxr-xr-x /usr/bin/pullgate
expect_file rw-r--r-- /usr/lib/systemd/system/pullgate.service
expect_file rw-r--r-- /etc/pullgate/config.toml
expect_file rw-r--r-- /usr/share/doc/pullgate/examples/kubelet-pullgate.conf
expect_file rw-r--r-- /usr/share/doc/pullgate/operations.md
expect_file rw-r--r-- /usr/share/doc/pullgate/copyright
expect_file rw-r--r-- /usr/share/man/man1/pullgate.1.gz
expect_file rw-r--r-- /usr/share/bash-completion/completions/pullgate
expect_file rw-r--r-- /usr/share/zsh/COMPLETIONS/_pullgate
expect_file rw-r--r-- /usr/share/fish/vendor_completions.d/pullgate.fish
expect_file rw-r--r-- /usr/share/pullgate/prometheus/pullgate.rules.yml
expect_file rw-r--r-- /usr/share/pullgate/prometheus/pullgate.rules.test.yml
expect_file rw-r--r-- /usr/share/pullgate/grafana/pullgate-dashboard.json
check "every .deb entry is owned by root:root and not group/world-writable" \
    awk '$2 != "root/root" || substr($1, 5, 1) == "w" || substr($1, 8, 1) == "w" { print; bad = 1 } END { exit bad }' "$tmp/deb.files"
dpkg-deb -e "$deb" "$tmp/control"
check_eq ".deb conffiles: exactly /etc/pullgate/config.toml" "/etc/pullgate/config.toml" "$(cat "$tmp/control/conffiles" 2>&1)"
for s in postinst prerm postrm; do
    check ".deb has an executable $s" test -x "$tmp/control/$s"
done
check ".deb postinst validates the configuration" grep -q 'pullgate check-config' "$tmp/control/postinst"
check ".deb postinst only starts/restarts when systemd runs" grep -q '/run/systemd/system' "$tmp/control/postinst"
check ".deb postrm deletes config and state on purge" grep -q 'rm -rf /etc/pullgate /var/lib/pullgate' "$tmp/control/postrm"
check ".deb maintainer scripts are valid sh" sh -n "$tmp/control/postinst" "$tmp/control/prerm" "$tmp/control/postrm"
check ".deb Depends lists libc6" sh -c "dpkg-deb -f '$deb' Depends | grep -q libc6"

# ---------------------------------------------------------------------------------------------------
echo "== .rpm (rpm -qpl, --requires, -K)"
check "rpm -K: digests OK" sh -c "rpm -K '$rpmf' | grep -q 'digests OK'"
rpm -qpl "$rpmf" >"$tmp/rpm.qpl" 2>&1
check_eq "rpm -qpl lists the same paths as the .rpm file table" \
    "$(awk '{ print $3 }' "$tmp/rpm.files" | sed 's#/usr/share/zsh/COMPLETIONS/#/usr/share/zsh/site-functions/#' | sort)" \
    "$(grep -v '^/.*/$' "$tmp/rpm.qpl" | sort)"
if diff -u "$tmp/deb.files" "$tmp/rpm.files" >"$tmp/files.diff"; then
    ok ".deb and .rpm ship the same files with the same modes and owners ($(wc -l <"$tmp/deb.files") files)"
else
    not_ok ".deb and .rpm ship the same files with the same modes and owners" "$(cat "$tmp/files.diff")"
fi
for f in /usr/share/pullgate/prometheus/pullgate.rules.yml /usr/share/pullgate/grafana/pullgate-dashboard.json; do
    check ".rpm ships $f (644 root:root)" grep -qx "rw-r--r-- root/root $f" "$tmp/rpm.files"
done
rpm -qp --requires "$rpmf" >"$tmp/rpm.requires" 2>&1
for r in '/bin/sh' 'systemd' 'util-linux' 'libc.so.6()(64bit)'; do
    check "rpm -qp --requires: $r" grep -qxF "$r" "$tmp/rpm.requires"
done
check "the .rpm needs nothing newer than glibc 2.34 (RHEL 9)" \
    sh -c "! grep -E 'GLIBC_2\.(3[5-9]|[4-9][0-9])' '$tmp/rpm.requires'"
check ".rpm marks /etc/pullgate/config.toml %config(noreplace)" \
    sh -c "rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' '$rpmf' | grep -qx 'cn /etc/pullgate/config.toml'"
rpm -qp --scripts "$rpmf" >"$tmp/rpm.scripts" 2>&1
check ".rpm %post validates the configuration" grep -q 'pullgate check-config' "$tmp/rpm.scripts"
check ".rpm %preun stops and disables on erase" grep -q 'disable pullgate.service' "$tmp/rpm.scripts"
check ".rpm %postun restarts on upgrade" grep -q 'try-restart pullgate.service' "$tmp/rpm.scripts"
# Same binary in both: the .rpm's recorded digest of /usr/bin/pullgate against the .deb's file.
mkdir -p "$tmp/debroot" && dpkg-deb -x "$deb" "$tmp/debroot"
check_eq "the .deb and the .rpm carry the same /usr/bin/pullgate" \
    "$(sha256sum <"$tmp/debroot/usr/bin/pullgate" | cut -d' ' -f1)" \
    "$(rpm -qp --dump "$rpmf" 2>/dev/null | awk '$1 == "/usr/bin/pullgate" { print $4 }')"

# ---------------------------------------------------------------------------------------------------
echo "== dpkg -i"
if [ -d /run/systemd/system ]; then echo "(systemd is running: the service will be started)"; else echo "(systemd is not running: maintainer scripts must cope)"; fi
if dpkg -i "$deb" </dev/null >"$tmp/install.log" 2>&1; then ok "dpkg -i $(basename "$deb")"
else fatal "dpkg -i $(basename "$deb")" "$(cat "$tmp/install.log")"; fi
check_eq "dpkg reports pullgate installed" "ii" "$(pkg_state)"

expect_path() { # TYPE(f|d) MODE PATH
    local got
    got=$(stat -c '%F %a %U:%G' "$3" 2>&1)
    local want
    case $1 in f) want="regular file $2 root:root" ;; d) want="directory $2 root:root" ;; esac
    check_eq "installed $3 ($want)" "$want" "$got"
}
expect_path f 755 /usr/bin/pullgate
expect_path f 644 /usr/lib/systemd/system/pullgate.service
expect_path d 755 /etc/pullgate
expect_path f 644 /etc/pullgate/config.toml
expect_path d 755 /etc/pullgate/trust
expect_path d 700 /var/lib/pullgate
expect_path f 644 /usr/share/doc/pullgate/examples/kubelet-pullgate.conf
expect_path f 644 /usr/share/doc/pullgate/operations.md
expect_path f 644 /usr/share/pullgate/prometheus/pullgate.rules.yml
expect_path f 644 /usr/share/pullgate/grafana/pullgate-dashboard.json
check "promtool accepts the installed alerting rules" promtool check rules /usr/share/pullgate/prometheus/pullgate.rules.yml
check "the installed rules pass their shipped unit tests" promtool test rules /usr/share/pullgate/prometheus/pullgate.rules.test.yml
check "the installed Grafana dashboard is JSON" /usr/bin/python3 -m json.tool /usr/share/pullgate/grafana/pullgate-dashboard.json
check "installed files match dpkg's md5sums (dpkg --verify)" dpkg --verify pullgate
check "/usr/bin/pullgate is stripped (no .symtab)" sh -c "! readelf -S /usr/bin/pullgate | grep -q '\.symtab'"
check_eq "pullgate --version" "pullgate $version" "$(/usr/bin/pullgate --version 2>&1)"
check "pullgate check-config accepts the packaged configuration" \
    /usr/bin/pullgate check-config --config /etc/pullgate/config.toml
check "pullgate check-config accepts the shipped config.example.toml" \
    /usr/bin/pullgate check-config --config /usr/share/doc/pullgate/examples/config.example.toml
check "the packaged configuration does not enforce (no mode = \"enforce\")" \
    sh -c "! grep -Eq '^[[:space:]]*mode[[:space:]]*=[[:space:]]*\"enforce\"' /etc/pullgate/config.toml"
if grep -Eq '^\[policy\]' /etc/pullgate/config.toml; then
    check "the packaged configuration sets [policy] mode = \"warn\"" \
        sh -c "sed -n '/^\[policy\]/,/^\[/p' /etc/pullgate/config.toml | grep -Eq '^[[:space:]]*mode[[:space:]]*=[[:space:]]*\"warn\"'"
fi
printf '[server]\nno_such_key = 1\n' >"$tmp/bad.toml"
/usr/bin/pullgate check-config --config "$tmp/bad.toml" >/dev/null 2>&1
check_eq "check-config exits 78 on a configuration error (RestartPreventExitStatus=78)" 78 "$?"
check "deb-systemd-helper enabled the unit (multi-user.target.wants)" \
    test -L /etc/systemd/system/multi-user.target.wants/pullgate.service

# ---------------------------------------------------------------------------------------------------
echo "== systemd units"
unit=/usr/lib/systemd/system/pullgate.service
units="$tmp/units"
mkdir -p "$units/kubelet.service.d"
# Stand-ins for the units the ordering refers to (neither containerd nor kubelet is installed here).
printf '[Unit]\nDescription=containerd (test stub)\n[Service]\nExecStart=/bin/true\n' >"$units/containerd.service"
printf '[Unit]\nDescription=kubelet (test stub)\n[Service]\nExecStart=/bin/true $KUBELET_EXTRA_ARGS\n' >"$units/kubelet.service"
cp /usr/share/doc/pullgate/examples/kubelet-pullgate.conf "$units/kubelet.service.d/20-pullgate.conf"
man_opt=--man=yes
command -v man >/dev/null || man_opt=--man=no
verify_out=$(SYSTEMD_UNIT_PATH="$units:" systemd-analyze verify "$man_opt" "$unit" "$units/kubelet.service" 2>&1)
rc=$?
# verify exits 0 on mere warnings (unknown keys, …): an honest pass needs silence too.
if [ "$rc" -eq 0 ] && [ -z "$verify_out" ]; then
    ok "systemd-analyze verify $man_opt: pullgate.service and kubelet.service + the drop-in, no warnings"
else
    not_ok "systemd-analyze verify $man_opt: pullgate.service and kubelet.service + the drop-in, no warnings" "rc=$rc"$'\n'"$verify_out"
fi
dropin=/usr/share/doc/pullgate/examples/kubelet-pullgate.conf
check "kubelet drop-in points the runtime endpoint at pullgate's socket" \
    grep -q -- '--container-runtime-endpoint=unix:///run/pullgate/pullgate.sock' "$dropin"
check "kubelet drop-in points the image endpoint at pullgate's socket" \
    grep -q -- '--image-service-endpoint=unix:///run/pullgate/pullgate.sock' "$dropin"
check "kubelet drop-in orders kubelet after pullgate" grep -qx 'After=pullgate.service' "$dropin"
# Settings the unit must carry, read from the installed unit.
unit_has() { check "pullgate.service: $1" grep -qx -- "$1" "$unit"; }
unit_has 'Type=notify'
unit_has 'After=containerd.service'
unit_has 'Requires=containerd.service'
unit_has 'Before=kubelet.service'
unit_has 'Restart=always'
unit_has 'RestartPreventExitStatus=78'
unit_has 'ExecReload=/bin/kill -HUP $MAINPID'
unit_has 'NoNewPrivileges=yes'
unit_has 'ProtectSystem=strict'
unit_has 'ProtectHome=yes'
unit_has 'PrivateTmp=yes'
unit_has 'CapabilityBoundingSet=CAP_CHOWN'
unit_has 'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6'
unit_has 'RuntimeDirectory=pullgate'
unit_has 'RuntimeDirectoryMode=0750'
unit_has 'StateDirectory=pullgate'
unit_has 'StateDirectoryMode=0700'
check "pullgate.service: ExecStartPre runs pullgate check-config" grep -Eq '^ExecStartPre=-?/usr/bin/pullgate check-config' "$unit"
# TimeoutStopSec must exceed the drain grace of the packaged configuration.
to_seconds() { case $1 in *min) echo $((${1%min} * 60)) ;; *m) echo $((${1%m} * 60)) ;; *s) echo "${1%s}" ;; *) echo "$1" ;; esac; }
stop_timeout=$(to_seconds "$(sed -n 's/^TimeoutStopSec=//p' "$unit")")
grace=$(sed -n 's/^[[:space:]]*drain_grace[[:space:]]*=[[:space:]]*"\([0-9]*[a-z]*\)".*/\1/p' /etc/pullgate/config.toml)
grace=$(to_seconds "${grace:-10s}")
check "TimeoutStopSec (${stop_timeout}s) exceeds the drain grace (${grace}s) by at least 10s" \
    test "$stop_timeout" -ge $((grace + 10))
if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
    exposure=$(systemd-analyze security --offline=yes "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for pullgate.service: \([0-9.]*\).*/\1/p')
    check "systemd-analyze security: exposure ${exposure:-?} at most 2.5" \
        awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 2.5) }'
fi

# ---------------------------------------------------------------------------------------------------
echo "== CLI help, man pages, completions"
# Every (sub)command, found by walking the "Commands:" sections of the help itself.
cmds=()
walk() {
    local help sub
    cmds+=("$*")
    help=$(/usr/bin/pullgate "$@" --help 2>&1) || return 0
    for sub in $(printf '%s\n' "$help" | awk '/^Commands:/ { on = 1; next } /^[^ ]/ { on = 0 } on && /^  [a-z]/ && $1 != "help" { print $1 }'); do
        walk "$@" "$sub"
    done
}
walk
check "the CLI has the documented subcommands" sh -c 'for c in serve check-config keygen bundle explain; do printf "%s\n" "$@" | grep -qx "$c" || exit 1; done' _ "${cmds[@]}"
# A help text is complete when it exits 0, starts with a description, shows the usage, and every
# argument, option and subcommand it lists has a description (on its line or the next, indented).
help_complete() {
    local help
    help=$(/usr/bin/pullgate "$@" --help 2>&1) || { echo "exit $?"; return 1; }
    printf '%s\n' "$help" | awk -v want="Usage: pullgate${1:+ $*}" '
        NR == 1 { if ($0 == "" || $0 ~ /^Usage:/) { print "no description line"; bad = 1 } }
        index($0, want) == 1 { usage = 1 }
        /^(Arguments|Options|Commands):$/ { section = 1; section_name = $0; next }
        /^[^ ]/ { section = 0 }
        section && /^ +[^ ]/ {
            line = $0; sub(/^ +/, "", line)
            # clap puts "[default: …]" / "[possible values: …]" on a line of their own when the
            # description wraps: those belong to the entry above, they are not entries
            if ((line ~ /^[-<]/ || (line ~ /^\[/ && line !~ /^\[(default|possible values|env|aliases): /)) || (section_name == "Commands:" && $0 ~ /^  [^ ]/)) {
                # an entry: its description is on this line after 2+ spaces, or on the next line
                if (pending) { print "undocumented: " pending; bad = 1 }
                pending = (line ~ /[^ ]  +[^ ]/) ? "" : line
            } else {
                pending = ""   # a description line
            }
            next
        }
        END {
            if (pending) { print "undocumented: " pending; bad = 1 }
            if (!usage) { print "no \"" want "\" line"; bad = 1 }
            exit bad
        }'
}
for c in "${cmds[@]}"; do
    # shellcheck disable=SC2086 # word splitting intended: "bundle sign" -> bundle sign
    check "pullgate${c:+ $c} --help is complete" help_complete $c
done
help_mentions() { # SUBCOMMAND WORD...
    local sub=$1 help; shift
    help=$(/usr/bin/pullgate "$sub" --help 2>&1)
    for w in "$@"; do printf '%s' "$help" | grep -q -- "$w" || { echo "missing: $w"; return 1; }; done
}
check "pullgate serve --help mentions --config, --listen, --upstream" help_mentions serve --config --listen --upstream
check "pullgate check-config --help mentions --config and the default path" help_mentions check-config --config /etc/pullgate/config.toml
check "pullgate keygen --help mentions --out" help_mentions keygen --out
check "pullgate explain --help mentions its IMAGE argument" help_mentions explain '<IMAGE>'
for c in "${cmds[@]}"; do
    page=/usr/share/man/man1/pullgate${c:+-${c// /-}}.1.gz
    check "man page $page is installed and names its command" sh -c "gzip -dc '$page' | grep -q '^\.TH'"
done
check_eq "one man page per (sub)command in the .deb" "${#cmds[@]}" "$(grep -c ' /usr/share/man/man1/pullgate.*\.1\.gz$' "$tmp/deb.files")"
check "bash completion is valid bash" bash -n /usr/share/bash-completion/completions/pullgate
for c in "${cmds[@]}"; do
    [ -n "$c" ] || continue
    last=${c##* }
    check "completions (bash, zsh, fish) know 'pullgate $c'" sh -c \
        "grep -qw -- '$last' /usr/share/bash-completion/completions/pullgate &&
         grep -qw -- '$last' /usr/share/zsh/vendor-completions/_pullgate &&
         grep -qw -- '$last' /usr/share/fish/vendor_completions.d/pullgate.fish"
done

# ---------------------------------------------------------------------------------------------------
echo "== upgrade (reinstall over itself)"
echo '# local edit by the packaging test' >>/etc/pullgate/config.toml
edited=$(sha256sum </etc/pullgate/config.toml)
echo 'trust-key-placeholder' >/etc/pullgate/trust/test.pub
echo 'audit-placeholder' >/var/lib/pullgate/audit.log
chmod 0755 /var/lib/pullgate
check "dpkg -i over the installed package (upgrade path)" sh -c "dpkg -i '$deb' </dev/null"
check_eq "upgrade keeps the edited /etc/pullgate/config.toml" "$edited" "$(sha256sum </etc/pullgate/config.toml)"
check_eq "upgrade restores /var/lib/pullgate to 0700" 700 "$(stat -c %a /var/lib/pullgate)"
cp /etc/pullgate/config.toml "$tmp/good.toml"
printf '\n[server]\nno_such_key = 1\n' >>/etc/pullgate/config.toml
if dpkg -i "$deb" </dev/null >"$tmp/badupgrade.log" 2>&1; then
    not_ok "upgrade with an invalid configuration fails in postinst" "$(cat "$tmp/badupgrade.log")"
else
    ok "upgrade with an invalid configuration fails in postinst (no restart)"
fi
check_eq "... and leaves the package half-configured" "iF" "$(pkg_state)"
cp "$tmp/good.toml" /etc/pullgate/config.toml
check "dpkg --configure -a succeeds once the configuration is fixed" sh -c 'dpkg --configure -a </dev/null'
check_eq "dpkg reports pullgate installed again" "ii" "$(pkg_state)"

# ---------------------------------------------------------------------------------------------------
echo "== dpkg -r (remove)"
check "dpkg -r pullgate" sh -c 'dpkg -r pullgate </dev/null'
check_eq "dpkg reports config-files only" "rc" "$(pkg_state)"
for p in /usr/bin/pullgate /usr/lib/systemd/system/pullgate.service /usr/share/doc/pullgate/operations.md /usr/share/man/man1/pullgate.1.gz; do
    check "remove deletes $p" test ! -e "$p"
done
check "remove keeps /etc/pullgate/config.toml (edited)" test -f /etc/pullgate/config.toml
check "remove keeps trust keys" test -f /etc/pullgate/trust/test.pub
check "remove keeps state (/var/lib/pullgate/audit.log)" test -f /var/lib/pullgate/audit.log
check "remove leaves the unit unable to start (masked or no longer enabled)" sh -c \
    '[ "$(readlink /etc/systemd/system/pullgate.service)" = /dev/null ] || [ ! -e /etc/systemd/system/multi-user.target.wants/pullgate.service ]'

echo "== dpkg -P (purge)"
check "dpkg -P pullgate" sh -c 'dpkg -P pullgate </dev/null'
state=$(pkg_state)
check "dpkg keeps nothing of pullgate (state '$state')" test -z "${state#un}"
for p in /etc/pullgate /var/lib/pullgate /run/pullgate /usr/bin/pullgate /usr/share/doc/pullgate /usr/share/pullgate; do
    check "purge leaves no $p" test ! -e "$p"
done
snapshot >"$tmp/systemd.after"
check "purge leaves systemd's configuration as it was (enablement, masks)" diff -u "$tmp/systemd.before" "$tmp/systemd.after"

finish
