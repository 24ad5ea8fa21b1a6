#!/usr/bin/env bash
# After `apt-get install ./build-package/*.deb`: checks that the installed
# packages work from outside the tree, printing what each step printed.
#   packaging/check_installed.sh
# The tools run, a program builds with pkg-config and with CMake against the
# installed files and runs, the man pages show, and uipc-handled serves under
# socket activation. Exits non-zero at the first step that fails.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
manager=""
trap '[ -z "$manager" ] || kill "$manager" 2>/dev/null; rm -rf "$work"' EXIT
export XDG_RUNTIME_DIR="$work/run" UIPC_SHARED_DIR="$work/shared"
mkdir -m 0700 "$XDG_RUNTIME_DIR"

step() { echo "\$ $*"; "$@"; }

for p in uipcd uipcctl uipc-handled uipc-plugin-runner; do
  [ "$(command -v "$p")" = "/usr/bin/$p" ] || { echo "check: /usr/bin/$p is not installed" >&2; exit 1; }
done
step dpkg-query -W libuipc0.1 libuipc-dev uipc-tools
step uipcctl handles list
step uipcd --print-config | head -12

cp "$here/tests/integration/pkg_config/caps_echo.cpp" "$work/"
step pkg-config --cflags --libs uipc-caps
step c++ -std=c++20 "$work/caps_echo.cpp" $(pkg-config --cflags --libs uipc-caps) -o "$work/with_pkg_config"
mkdir -p "$work/points"
step "$work/with_pkg_config" "$work/points"

cp -r "$here/tests/integration/consumer" "$work/consumer"
echo "\$ cmake -S consumer -B consumer/build -G Ninja -DUIPC_MODULES='core;handles;dispatch;caps;plugin'"
cmake -S "$work/consumer" -B "$work/consumer/build" -G Ninja -DUIPC_MODULES="core;handles;dispatch;caps;plugin" | tail -1
echo "\$ cmake --build consumer/build"
cmake --build "$work/consumer/build" | tail -1
step "$work/consumer/build/consumer"

echo "\$ man uipcctl | head -8"
MANWIDTH=80 man uipcctl >"$work/uipcctl.man"
head -8 "$work/uipcctl.man"
step sh -c 'man -w uipc-handled uipcd uipc.7'
if command -v systemd-analyze >/dev/null; then
  units=(/usr/lib/systemd/user/uipc-handled.{socket,service} /usr/lib/systemd/user/uipcd.{socket,service})
  echo "\$ systemd-analyze --user verify ${units[*]}"
  # Without a user manager it cannot connect to one; anything else it says is a fault.
  said=$(systemd-analyze --user verify "${units[@]}" 2>&1 | grep -v 'Failed to connect' || true)
  [ -z "$said" ] || { echo "$said"; echo "check: the units have faults" >&2; exit 1; }
fi

# Socket activation without systemd as init: the daemon starts at the first
# client and the client's library starts no daemon of its own.
if ! command -v systemd-socket-activate >/dev/null; then
  echo "socket activation: skipped (no systemd-socket-activate; the systemd package has it)"
else
  sock="$XDG_RUNTIME_DIR/uipc-handles.sock"
  # It passes the launched program only the variables named with -E.
  systemd-socket-activate -E XDG_RUNTIME_DIR -l "$sock" uipc-handled --linger-ms 200 >"$work/activate.log" 2>&1 &
  manager=$!
  # Listening, not only bound: /proc/net/unix flags a listening socket 00010000.
  for _ in $(seq 200); do
    awk -v p="$sock" '$4 == "00010000" && $8 == p { found = 1 } END { exit !found }' /proc/net/unix && break
    sleep 0.05
  done
  step env UIPC_HANDLED_PATH=/nonexistent uipcctl handles create manual-event activated --signalled --hold 300
  wait "$manager"
  manager=""
  echo "socket activation: the daemon served and left; $(cat "$work/activate.log" | tr '\n' ' ')"
fi
echo "check: every step passed"
