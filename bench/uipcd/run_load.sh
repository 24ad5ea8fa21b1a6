#!/usr/bin/env bash
# uipcd under the combined load of its three front doors, against each alone.
#   bench/uipcd/run_load.sh [BUILD_DIR]          (default: build)
# Starts one uipcd in a private directory and drives its three front doors:
#   dns      dnsperf on the DNS responder: answered q/s, mean latency
#   caps     uipcctl calling uipc.echo (one call in flight): calls/s, mean and
#            p99 latency
#   handles  CHURNERS uipcctl processes churning named events and mutexes:
#            cycles/s, mean and p99 latency of a cycle
# first each alone, then all at once, and prints each figure alone and
# combined with their ratio and uipcd's CPU time per phase; twice:
#   offered load  each client at a fixed rate (DNS_RATE, CAPS_RATE, CHURNERS x
#                 CHURN_RATE): the goal, each figure within 1.3x of alone;
#   flat out      every client as fast as it can (FLAT=0 skips it): with more
#                 busy processes than CPUs the ratio is the share of the CPUs
#                 each gets, so it has no goal.
# Then a soak: offered-load phases for SOAK seconds, sampling uipcd's resident
# memory and open descriptors after each; the last sample is compared with the
# first one after WARMUP seconds (goal: within 5 %).
# Environment: SECONDS_EACH (10), DNS_RATE (5000), CAPS_RATE (2000),
# CHURN_RATE (500), CHURNERS (2), FLAT (1), SOAK (600; 0 skips it), WARMUP (60),
# TASKSET (e.g. "taskset -c 0": every process, uipcd included, on those CPUs).
# Needs dnsperf (scripts/setup installs it). Loopback only; every load ends by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
build="${1:-build}"
bin="$build/bin"
each="${SECONDS_EACH:-10}"
rate="${DNS_RATE:-5000}"
caps_rate="${CAPS_RATE:-2000}"
churn_rate="${CHURN_RATE:-500}"
churners="${CHURNERS:-2}"
soak="${SOAK:-600}"
warmup="${WARMUP:-60}"
pin=(${TASKSET:-})

for p in uipcd uipcctl; do
  [ -x "$bin/$p" ] || { echo "run_load: $bin/$p missing (cmake --build $build --target uipcd uipcctl)" >&2; exit 2; }
done
command -v dnsperf >/dev/null || { echo "run_load: dnsperf missing (scripts/setup installs it)" >&2; exit 2; }

world=$(mktemp -d /tmp/uipc-load-XXXXXX)
pid=
cleanup() {
  [ "$BASHPID" = "$$" ] || return 0  # a load running in the background exits too
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$world"
}
trap cleanup EXIT

"${pin[@]}" "$bin/uipcd" --dir "$world" --listen 127.0.0.1:0 >"$world/out" 2>"$world/log" &
pid=$!
for _ in $(seq 100); do grep -q '^uipcd: serving' "$world/out" 2>/dev/null && break; sleep 0.1; done
grep -q '^uipcd: serving' "$world/out" || { cat "$world/log" >&2; exit 1; }
dns=$(sed -n 's/^dns: //p' "$world/out")
printf 'www.uipc.test A\nmail.uipc.test A\nuipc.test MX\ntxt.uipc.test TXT\nnosuch.uipc.test A\n' >"$world/names"

# uipcd's CPU time so far, in clock ticks (utime + stime of /proc/PID/stat).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
ticks_per_s=$(getconf CLK_TCK)

# Each load writes "<rate> <mean_us> <p99_us>" to its file when it ends
# (dnsperf gives no percentiles: its p99 column is its maximum).
# $mode: "fixed" offers the rates above; "flat" runs every client flat out.
load_dns() {  # file
  local q=$rate
  [ "$mode" = fixed ] || q=1000000
  "${pin[@]}" dnsperf -s "${dns%:*}" -p "${dns##*:}" -d "$world/names" -l "$each" -Q "$q" -c 4 \
    >"$world/dnsperf.$mode" 2>&1 || true
  awk '/Queries per second/ { q = $4 }
       /Average Latency/ { l = $4 * 1e6; m = $8 * 1e6 }
       END { printf "%.0f %.0f %.0f\n", q, l, m }' "$world/dnsperf.$mode" >"$1"
}
load_caps() {  # file
  if [ "$mode" = fixed ]; then
    "${pin[@]}" "$bin/uipcctl" caps --dir "$world" call uipc.echo hello \
      --count $((caps_rate * each)) --rate "$caps_rate" >"$world/caps.out"
  else  # rounds of 5000 calls until the time is up
    : >"$world/caps.out"
    local end=$((SECONDS + each))
    while [ "$SECONDS" -lt "$end" ]; do
      "${pin[@]}" "$bin/uipcctl" caps --dir "$world" call uipc.echo hello --count 5000 \
        >>"$world/caps.out"
    done
  fi
  # "calls N seconds S calls_per_second R mean_us M p50_us P p99_us Q" per run
  awk '{ c += $2; s += $4; l += $2 * $8; if ($12 > m) m = $12 }
    END { printf "%.0f %.1f %.1f\n", c / s, l / c, m }' "$world/caps.out" >"$1"
}
load_handles() {  # file
  local i churns=() pace=()
  [ "$mode" = fixed ] && pace=(--rate "$churn_rate")
  for i in $(seq "$churners"); do
    "${pin[@]}" "$bin/uipcctl" handles --dir "$world" --no-start churn --seconds "$each" \
      "${pace[@]}" >"$world/churn.$i" &
    churns+=($!)
  done
  for i in "${churns[@]}"; do wait "$i"; done  # each: a failed churner fails the script
  # rate: all churners together; latency: the mean of their means, their worst p99.
  cat "$world"/churn.* | awk '{ c += $6; l += $8; if ($12 > m) m = $12 }
    END { printf "%.0f %.1f %.1f\n", c, l / NR, m }' >"$1"
}

phase() {  # name modules...
  local name=$1 before after m jobs=()
  shift
  before=$(cpu_ticks)
  rm -f "$world/$name".*  # no figure left from an earlier table
  for m in "$@"; do
    "load_$m" "$world/$name.$m" &
    jobs+=($!)
  done
  for m in "${jobs[@]}"; do wait "$m"; done  # each, not a bare wait: uipcd is a child too
  after=$(cpu_ticks)
  echo "$after $before" | awk -v t="$ticks_per_s" '{ printf "%.2f\n", ($1 - $2) / t }' >"$world/$name.cpu"
}

figure() { awk "{ print \$$2 }" "$world/$1"; }
row() {  # module label column higher-is-better
  local a c
  a=$(figure "alone-$1.$1" "$3")
  c=$(figure "combined.$1" "$3")
  awk -v m="$1" -v l="$2" -v a="$a" -v c="$c" -v up="$4" -v goal="$goal" 'BEGIN {
    r = (up ? a / c : c / a)
    printf "%-8s %-22s %12s %12s %7.2fx%s\n", m, l, a, c, r,
      (goal == "" ? "" : (r <= goal ? "" : "  (goal " goal "x: missed)")) }'
}
table() {  # title goal
  local m
  goal=$2
  for m in dns caps handles; do phase "alone-$m" "$m"; done
  phase combined dns caps handles
  printf '\n%s\n%-8s %-22s %12s %12s %8s\n' "$1" module figure alone combined ratio
  row dns "answered q/s" 1 1
  row dns "mean latency us" 2 0
  row caps "calls/s" 1 1
  row caps "mean latency us" 2 0
  row caps "p99 latency us" 3 0
  row handles "cycles/s (all)" 1 1
  row handles "mean latency us" 2 0
  row handles "p99 latency us" 3 0
  printf 'uipcd CPU seconds: dns alone %s, caps alone %s, handles alone %s, combined %s\n' \
    "$(cat "$world/alone-dns.cpu")" "$(cat "$world/alone-caps.cpu")" \
    "$(cat "$world/alone-handles.cpu")" "$(cat "$world/combined.cpu")"
}

echo "uipcd (pid $pid) on $dns; ${each} s per phase; $(nproc) CPUs${TASKSET:+; $TASKSET}"
mode=fixed
table "offered load: dns $rate q/s, caps $caps_rate calls/s, handles $churners x $churn_rate cycles/s" 1.3
if [ "${FLAT:-1}" = 1 ]; then
  mode=flat
  table "flat out (every client as fast as it can: with more clients than CPUs, the ratio is the CPU share each gets)" ""
fi
mode=fixed

[ "$soak" -gt 0 ] || exit 0

# The soak: combined phases back to back. uipcd is sampled between phases, when
# every client of the last one has gone, so a sample counts what uipcd keeps,
# not the connections open at that moment.
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$pid/status"; }
fds() { ls "/proc/$pid/fd" | wc -l; }
echo
echo "soak: ${soak} s of combined load in ${each} s phases; uipcd's RSS and descriptors after each"
printf '%6s %10s %6s\n' second rss_kib fds
start=$SECONDS
while [ $((SECONDS - start)) -lt "$soak" ]; do
  phase soak dns caps handles
  sleep 0.2
  printf '%6d %10d %6d\n' $((SECONDS - start)) "$(rss_kib)" "$(fds)" | tee -a "$world/samples"
done
awk -v w="$warmup" '
  $1 >= w && !base { base = 1; r0 = $2; f0 = $3; t0 = $1 }
  { r1 = $2; f1 = $3; t1 = $1 }
  END {
    if (!base) { print "soak: shorter than its warm-up, nothing to compare"; exit }
    dr = (r1 - r0) * 100 / r0; df = (f1 - f0) * 100 / f0
    printf "soak: RSS %d KiB at %d s, %d KiB at %d s (%+.1f %%); descriptors %d then %d (%+.1f %%)%s\n",
      r0, t0, r1, t1, dr, f0, f1, df,
      ((dr <= 5 && dr >= -5 && df <= 5 && df >= -5) ? "" : "  (goal within 5 %: missed)") }' "$world/samples"
kill -TERM "$pid"
wait "$pid" && echo "uipcd exited with status 0"
pid=
