#!/usr/bin/env bash
# ctest: bench/uipcd/run_load.sh for a second per phase at low rates. Passes
# when the script succeeds and prints every row of its table; its figures are
# not judged here.
#   tests/uipcd/run_load_smoke.sh BUILD_DIR
set -uo pipefail
out=$(SECONDS_EACH=1 SOAK=0 FLAT=0 DNS_RATE=500 CAPS_RATE=200 CHURN_RATE=50 \
  "$(dirname "$0")/../../bench/uipcd/run_load.sh" "$1" 2>&1)
status=$?
echo "$out"
[ "$status" -eq 0 ] || { echo "run_load_smoke: the script exited with $status"; exit 1; }
for row in "dns      answered q/s" "caps     p99 latency us" "handles  p99 latency us" \
  "uipcd CPU seconds"; do
  grep -qF "$row" <<<"$out" || { echo "run_load_smoke: no row '$row'"; exit 1; }
done
