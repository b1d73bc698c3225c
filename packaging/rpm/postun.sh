# pullgate .rpm %postun ($1: 0 = erase, 1 or more = upgrade).
# Erase keeps /var/lib/pullgate (bundles, audit log), trust keys and a modified config.toml (rpm
# saves it as config.toml.rpmsave); rpm has no purge: delete them by hand (see operations.md).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    # Upgrade: restart a running daemon on the new binary, but only on a configuration it accepts.
    if [ "$1" -ge 1 ] && /usr/bin/pullgate check-config --config /etc/pullgate/config.toml >/dev/null 2>&1; then
        systemctl try-restart pullgate.service >/dev/null 2>&1 || :
    fi
fi
exit 0
