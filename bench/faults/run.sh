#!/usr/bin/env bash
# The long versions of the fault tests (tests/handles/faults_test.cpp,
# tests/dispatch/dns_flood_test.cpp), with their figures:
#   bench/faults/run.sh                  1000 client kills, then a 10-minute soak
#   bench/faults/run.sh --kills N --soak-seconds S
# The soak repeats, until its time is up: a flood of connections and garbage
# against the handle daemon, the daemon killed under churning clients, and a
# flood of malformed datagrams against uipc-dns-responder followed by dig.
# Every round checks what the CI version checks; the first failure stops it.
set -euo pipefail
cd "$(dirname "$0")/../.."

kills=1000
soak=600
while [ $# -gt 0 ]; do
  case "$1" in
    --kills) kills="$2"; shift 2 ;;
    --soak-seconds) soak="$2"; shift 2 ;;
    *) echo "usage: bench/faults/run.sh [--kills N] [--soak-seconds S]" >&2; exit 2 ;;
  esac
done

./scripts/setup
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DUIPC_BUILD_TESTS=ON >/dev/null
cmake --build build --target handles_fault_tests dispatch_fault_tests

figures() { grep -E '^faults:|FAILED|Failure' || true; }

# Seven kills a wave: six churning clients and one mutex owner.
waves=$(( (kills + 6) / 7 ))
echo "== $((waves * 7)) client kills in $waves waves"
UIPC_FAULT_WAVES=$waves ./build/bin/handles_fault_tests --gtest_filter='*RandomMoments*' | figures
test "${PIPESTATUS[0]}" -eq 0

echo "== soak: ${soak} s"
end=$(( $(date +%s) + soak ))
round=0
while [ "$(date +%s)" -lt "$end" ]; do
  round=$((round + 1))
  echo "-- round $round"
  UIPC_FAULT_FLOODS=20 ./build/bin/handles_fault_tests --gtest_filter='*Floods*:*DaemonKilled*' | figures
  test "${PIPESTATUS[0]}" -eq 0
  UIPC_FAULT_DATAGRAMS=200000 ./build/bin/dispatch_fault_tests | figures
  test "${PIPESTATUS[0]}" -eq 0
done
echo "soak: $round rounds without a failure"
