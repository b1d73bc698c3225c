#!/usr/bin/env bash
# Stops the demo started by scripts/demo.sh: kills exactly the processes recorded in
# $PULLGATE_DEMO_DIR/pids (default /tmp/pullgate-demo) — each only if its command line still refers to
# the demo dir, so a recycled PID is never hit — plus the containerd shims (and their containers) that
# the demo's containerd started, found by their exact `-address`; then unmounts what is left below the
# dir and removes it.
set -euo pipefail

DIR=${PULLGATE_DEMO_DIR:-/tmp/pullgate-demo}
PIDS="$DIR/pids"
[[ -e "$PIDS" ]] || { echo "no demo running in $DIR (no $PIDS)"; exit 0; }

cmdline() { { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null || true; }
alive() { [[ -e /proc/$1 ]] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

stop_pid() { # stop_pid NAME PID
  local name=$1 pid=$2
  alive "$pid" || { echo "  $name ($pid): already gone"; return; }
  if [[ "$(cmdline "$pid")" != *"$DIR"* ]]; then
    echo "  $name ($pid): PID now belongs to something else; left alone"
    return
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    alive "$pid" || { echo "  $name ($pid): stopped"; return; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  echo "  $name ($pid): killed"
}

shims() { # PIDs of containerd shims started by the demo's containerd
  local sock="$DIR/containerd/containerd.sock" p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    case "$(cmdline "$p")" in
      *containerd-shim*"-address $sock "* | *containerd-shim*"-address $sock") echo "$p" ;;
    esac
  done
}

echo "stopping the pullgate demo in $DIR"
# pullgate first, then containerd's shims and containers, then containerd and the registries.
tac "$PIDS" | while read -r name pid; do
  if [[ $name == pullgate ]]; then stop_pid "$name" "$pid"; fi
done
shim_sockets() { # the /run/containerd/s/* sockets a shim listens on (left behind when it is killed)
  local inodes
  inodes=$(find "/proc/$1/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n')
  [[ -n "$inodes" ]] || return 0
  awk -v list="$inodes" 'BEGIN { n = split(list, a, "\n"); for (i = 1; i <= n; i++) want[a[i]] = 1 }
    NR > 1 && ($7 in want) && index($8, "/run/containerd/s/") == 1 { print $8 }' "/proc/$1/net/unix" 2>/dev/null
}
for shim in $(shims); do
  sockets=$(shim_sockets "$shim")
  for child in $(pgrep -P "$shim" || true); do kill -KILL "$child" 2>/dev/null || true; done
  kill -KILL "$shim" 2>/dev/null || true
  for s in $sockets; do rm -f "$s"; done
  echo "  containerd shim ($shim): killed"
done
tac "$PIDS" | while read -r name pid; do
  if [[ $name != pullgate ]]; then stop_pid "$name" "$pid"; fi
done

# Unmount anything still mounted below the demo dir, deepest first.
awk -v d="$DIR" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r |
  while read -r m; do umount -l "$m" 2>/dev/null || true; done
rm -rf "$DIR"
echo "removed $DIR"
