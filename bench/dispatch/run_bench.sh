#!/usr/bin/env bash
# Compares the dispatcher's DNS programs with their floors, on loopback, in one run:
#  - server side: dnsperf against uipc-dns-responder --threads 1, the plain
#    recvmmsg/sendmmsg floor responder (blocking: the floor the goal names), the
#    same floor in an epoll loop (the cost of being in an event loop at all,
#    which every event-driven server pays, unbound included) and unbound; q/s and
#    server CPU time per answered query (from /proc/PID/stat);
#  - query side: uipc-dns-query and the plain floor client, same names and number
#    in flight, against one unbound; q/s and client CPU per query.
#    Servers are compared twice: at one fixed offered rate (dnsperf -Q RATE, the
#    fair comparison: same arrivals, same batch sizes) and saturated (dnsperf as
#    fast as it goes; batch sizes then differ with each server's speed).
# Usage: bench/dispatch/run_bench.sh [BUILD_DIR]
#   env: DURATION=8 ROUNDS=2 RATE=100000 QUERIES=300000 INFLIGHT=64
# Needs: dnsperf, unbound (Debian packages 'dnsperf', 'unbound'); taskset pins when there are 2+ CPUs.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build-dispatch}
duration=${DURATION:-8}
rounds=${ROUNDS:-2}
queries=${QUERIES:-300000}
rate=${RATE:-100000}
inflight=${INFLIGHT:-64}
responder=$build/bin/uipc-dns-responder
query=$build/bin/uipc-dns-query
floor_responder=$build/bin/bench_dispatch_floor_responder
floor_query=$build/bin/bench_dispatch_floor_query
for tool in dnsperf unbound; do
  command -v "$tool" > /dev/null || [ -x "/usr/sbin/$tool" ] || { echo "missing $tool (apt-get install $tool)" >&2; exit 2; }
done
for bin in "$responder" "$query" "$floor_responder" "$floor_query"; do
  [ -x "$bin" ] || { echo "missing $bin: build uipc-dns-responder uipc-dns-query bench_dispatch_floor_responder bench_dispatch_floor_query" >&2; exit 2; }
done
unbound=$(command -v unbound || echo /usr/sbin/unbound)
hz=$(getconf CLK_TCK)
server_cpu="" client_cpu=""
if [ "$(nproc)" -ge 2 ] && command -v taskset > /dev/null; then
  server_cpu="taskset -c 1"
  client_cpu="taskset -c 0"
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

# The query mix: answers, NODATA and NXDOMAIN.
cat > "$tmp/names" << 'NAMES'
www.uipc.test A
a.uipc.test A
txt.uipc.test TXT
www.uipc.test AAAA
mail.uipc.test A
missing.uipc.test A
NAMES

free_port() {
  if command -v python3 > /dev/null; then
    python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
  else
    echo $((20000 + RANDOM % 40000))
  fi
}

start_unbound() {  # prints the port
  local port conf
  port=$(free_port)
  conf=$tmp/unbound-$port.conf
  cat > "$conf" << CONF
server:
  interface: 127.0.0.1
  port: $port
  do-ip6: no
  do-tcp: no
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "$tmp"
  pidfile: ""
  logfile: ""
  use-syslog: no
  verbosity: 0
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  local-zone: "uipc.test." static
  local-data: "uipc.test. 300 IN A 192.0.2.1"
  local-data: "a.uipc.test. 300 IN A 127.0.0.1"
  local-data: "www.uipc.test. 300 IN A 192.0.2.10"
  local-data: "www.uipc.test. 300 IN A 192.0.2.11"
  local-data: "www.uipc.test. 300 IN AAAA 2001:db8::10"
  local-data: "mail.uipc.test. 300 IN A 192.0.2.25"
  local-data: "txt.uipc.test. 300 IN TXT \"uipc\""
remote-control:
  control-enable: no
CONF
  $server_cpu "$unbound" -d -c "$conf" > "$tmp/unbound.log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  server_port=$port
  for _ in $(seq 100); do
    if "$query" --server "127.0.0.1:$port" --names "$tmp/names" --count 1 --timeout 100 2> /dev/null | grep -q 'completed 1 '; then return 0; fi
  done
  echo "unbound did not start: $(cat "$tmp/unbound.log")" >&2
  exit 1
}

start_listening() {  # a program that prints "listening on ADDR:PORT"
  : > "$tmp/out"
  $server_cpu "$@" > "$tmp/out" 2> "$tmp/err" &
  server_pid=$!
  pids+=("$server_pid")
  for _ in $(seq 200); do
    server_port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$tmp/out")
    [ -n "$server_port" ] && return 0
    sleep 0.02
  done
  echo "$1 did not start: $(cat "$tmp/err")" >&2
  exit 1
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# dnsperf against the running server (at most $1 q/s; 0: no limit); prints
# "qps cpu_us_per_query answered".
perf_server() {
  local before after out answered qps limit=()
  [ "$1" != 0 ] && limit=(-Q "$1")
  before=$(ticks "$server_pid")
  out=$($client_cpu dnsperf -s 127.0.0.1 -p "$server_port" -d "$tmp/names" -l "$duration" -c 1 -T 1 -q 200 -t 2 "${limit[@]}" 2>&1)
  after=$(ticks "$server_pid")
  answered=$(echo "$out" | sed -n 's/^ *Queries completed: *\([0-9]*\).*/\1/p')
  qps=$(echo "$out" | sed -n 's/^ *Queries per second: *\([0-9.]*\).*/\1/p')
  echo "$qps $(awk -v t=$((after - before)) -v hz="$hz" -v n="${answered:-0}" 'BEGIN{if (n + 0 > 0) printf "%.3f", t * 1e6 / hz / n; else printf "n/a"}') $answered"
}

stop_server() { kill "$server_pid"; wait "$server_pid" 2> /dev/null || true; }

# Runs are interleaved (uipc, floor, unbound, uipc, ...) so that each round's
# ratios compare runs made under the same conditions (a VM's load drifts); the
# result is the median of the per-round ratios.
declare -A cpu_of qps_of
record() {  # name round qps cpu
  qps_of[$1-$2]=$3
  cpu_of[$1-$2]=$4
}
median_ratio() {  # array-name name-a name-b
  local -n values=$1
  local r
  for r in $(seq "$rounds"); do
    # A round with no figure (n/a, 0) gives no ratio.
    awk -v x="${values[$2-$r]}" -v y="${values[$3-$r]}" 'BEGIN{if (y + 0 > 0 && x ~ /^[0-9.]+$/) printf "%.3f\n", x / y}'
  done | sort -n | awk '{v[NR]=$1} END{if (NR == 0) printf "n/a"; else printf "%.3f", NR % 2 ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'
}
per_round() {  # array-name name-a name-b
  local -n values=$1
  local r out=""
  for r in $(seq "$rounds"); do
    out+=$(awk -v x="${values[$2-$r]}" -v y="${values[$3-$r]}" 'BEGIN{if (y + 0 > 0 && x ~ /^[0-9.]+$/) printf "%.3f ", x / y; else printf "n/a "}')
  done
  echo "$out"
}

for mode in "$rate" 0; do
  label=saturated
  [ "$mode" != 0 ] && label="at $mode q/s"
  echo "== server side, $label: dnsperf -l $duration -q 200, $rounds rounds, CPU time per answered query (us)"
  for round in $(seq "$rounds"); do
    for server in uipc floor epoll unbound; do
      case $server in
        uipc) start_listening "$responder" --listen 127.0.0.1:0 --threads 1 ;;
        floor) start_listening "$floor_responder" --listen 127.0.0.1:0 ;;
        epoll) start_listening "$floor_responder" --listen 127.0.0.1:0 --epoll ;;
        unbound) start_unbound ;;
      esac
      read -r qps cpu answered < <(perf_server "$mode")
      stop_server
      printf '  round %d %-8s q/s %10s  cpu/query %8s us  answered %s\n' "$round" "$server" "$qps" "$cpu" "$answered"
      record "$server-$mode" "$round" "$qps" "$cpu"
    done
  done
done

echo "== query side: $queries queries, $inflight in flight, against unbound"
start_unbound
for round in $(seq "$rounds"); do
  for client in uipc floor; do
    bin=$query
    [ $client = floor ] && bin=$floor_query
    line=$($client_cpu "$bin" --server "127.0.0.1:$server_port" --names "$tmp/names" --count "$queries" \
      --inflight "$inflight" --timeout 2000)
    qps=$(echo "$line" | sed -n 's/.* qps \([0-9.]*\).*/\1/p')
    cpu=$(echo "$line" | sed -n 's/.* cpu_s \([0-9.]*\).*/\1/p')
    completed=$(echo "$line" | sed -n 's/^completed \([0-9]*\).*/\1/p')
    # Nothing completed (server down, every query timed out): no per-query figure.
    per=$(awk -v c="$cpu" -v n="${completed:-0}" 'BEGIN{if (n + 0 > 0) printf "%.3f", c * 1e6 / n; else printf "n/a"}')
    printf '  round %d %-8s %s  cpu/query %s us\n' "$round" "$client" "$line" "$per"
    record "query-$client" "$round" "$qps" "$per"
  done
done
stop_server

echo "== results: median of the per-round ratios (each round's ratios listed)"
for mode in "$rate" 0; do
  label=saturated
  [ "$mode" != 0 ] && label="at $mode q/s"
  printf '  RATIO responder %s cpu/query uipc/floor   = %s (goal <= 1.15)  rounds: %s\n' "$label" \
    "$(median_ratio cpu_of "uipc-$mode" "floor-$mode")" "$(per_round cpu_of "uipc-$mode" "floor-$mode")"
  printf '  RATIO responder %s cpu/query uipc/unbound = %s (goal < 1)      rounds: %s\n' "$label" \
    "$(median_ratio cpu_of "uipc-$mode" "unbound-$mode")" "$(per_round cpu_of "uipc-$mode" "unbound-$mode")"
  printf '  ratio responder %s q/s uipc/floor         = %s\n' "$label" "$(median_ratio qps_of "uipc-$mode" "floor-$mode")"
  printf '  ratio responder %s cpu/query epoll/floor  = %s (the event loop'"'"'s own cost)  rounds: %s\n' "$label" \
    "$(median_ratio cpu_of "epoll-$mode" "floor-$mode")" "$(per_round cpu_of "epoll-$mode" "floor-$mode")"
  printf '  ratio responder %s cpu/query uipc/epoll   = %s (what the dispatcher adds)  rounds: %s\n' "$label" \
    "$(median_ratio cpu_of "uipc-$mode" "epoll-$mode")" "$(per_round cpu_of "uipc-$mode" "epoll-$mode")"
done
printf '  RATIO query q/s uipc/floor                = %s (goal >= 0.8)   rounds: %s\n' \
  "$(median_ratio qps_of query-uipc query-floor)" "$(per_round qps_of query-uipc query-floor)"
printf '  ratio query cpu/query uipc/floor          = %s\n' "$(median_ratio cpu_of query-uipc query-floor)"
