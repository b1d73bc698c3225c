# pullgate .rpm %post ($1: 1 = first install, 2 or more = upgrade).
# Same policy as the .deb postinst; the service itself is restarted on upgrade by %postun.
install -d -m 0755 -o root -g root /etc/pullgate /etc/pullgate/trust
install -d -m 0700 -o root -g root /var/lib/pullgate
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if ! /usr/bin/pullgate check-config --config /etc/pullgate/config.toml; then
    echo "pullgate: /etc/pullgate/config.toml is invalid (see above); the service will NOT be (re)started." >&2
    exit 1
fi
if [ "$1" -eq 1 ]; then
    # Fedora/RHEL convention (what %systemd_post does): enablement follows the system preset;
    # enable explicitly with `systemctl enable --now pullgate` (see operations.md).
    systemctl --no-reload preset pullgate.service >/dev/null 2>&1 || :
fi
exit 0
