# pullgate .rpm %preun ($1: 0 = erase, 1 or more = upgrade): stop and disable on erase only.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop pullgate.service >/dev/null 2>&1 || :
    fi
    systemctl --no-reload disable pullgate.service >/dev/null 2>&1 || :
fi
exit 0
