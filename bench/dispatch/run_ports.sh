#!/usr/bin/env bash
# Random source ports (port_mode::exclusive) against the shared socket, on loopback
# against unbound:
#  - rate: uipc-dns-query --shared-port, --random-ports and the plain floor client
#    (bench_dispatch_floor_query), interleaved rounds; q/s and client CPU per query;
#  - forgery: while uipc-dns-query runs (one name that unbound answers NOERROR),
#    bench_dispatch_forger sprays NXDOMAIN replies spoofed from unbound's address
#    and port with random IDs: at the query tool's one port (shared mode: the
#    port is no secret to anyone who sees one query) or at random ports of the
#    range (random-port mode). Every NXDOMAIN the tool counts is an accepted forgery.
# Usage: bench/dispatch/run_ports.sh [BUILD_DIR]
#   env: ROUNDS=3 QUERIES=200000 INFLIGHT=64 FORGE_INFLIGHT=256
#        FORGE_SHARED=1000000 FORGE_RANDOM=10000000 (FORGE=0: the rates only)
#        PLACE=same (unbound and the clients on CPU 0) | split (unbound on
#        CPU 1, the clients on CPU 0); unset: where the scheduler puts them
# Needs: unbound, root (the forger's raw socket), ss (iproute2).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
rounds=${ROUNDS:-3}
queries=${QUERIES:-200000}
inflight=${INFLIGHT:-64}
forge_inflight=${FORGE_INFLIGHT:-256}
forge_shared=${FORGE_SHARED:-1000000}
forge_random=${FORGE_RANDOM:-10000000}
case "${PLACE:-}" in
  "") server_cpu=(); client_cpu=() ;;
  same) server_cpu=(taskset -c 0); client_cpu=(taskset -c 0) ;;
  split) server_cpu=(taskset -c 1); client_cpu=(taskset -c 0) ;;
  *) echo "PLACE is same or split" >&2; exit 2 ;;
esac
query=$build/bin/uipc-dns-query
floor_query=$build/bin/bench_dispatch_floor_query
forger=$build/bin/bench_dispatch_forger
for bin in "$query" "$floor_query" "$forger"; do
  [ -x "$bin" ] || { echo "missing $bin: build uipc-dns-query bench_dispatch_floor_query bench_dispatch_forger" >&2; exit 2; }
done
unbound=$(command -v unbound || echo /usr/sbin/unbound)
[ -x "$unbound" ] || { echo "missing unbound (apt-get install unbound)" >&2; exit 2; }
read -r range_first range_last < /proc/sys/net/ipv4/ip_local_port_range

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$tmp/unbound.conf" << CONF
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
  local-data: "a.uipc.test. 300 IN A 127.0.0.1"
  local-data: "www.uipc.test. 300 IN A 192.0.2.10"
  local-data: "www.uipc.test. 300 IN A 192.0.2.11"
  local-data: "mail.uipc.test. 300 IN A 192.0.2.25"
remote-control:
  control-enable: no
CONF
"${server_cpu[@]}" "$unbound" -d -c "$tmp/unbound.conf" > "$tmp/unbound.log" 2>&1 &
pids+=($!)
printf 'www.uipc.test A\na.uipc.test A\nmail.uipc.test A\n' > "$tmp/names"
echo 'a.uipc.test A' > "$tmp/one"
for _ in $(seq 100); do
  if "$query" --server "127.0.0.1:$port" --names "$tmp/one" --count 1 --timeout 100 2> /dev/null | grep -q 'completed 1 '; then break; fi
done

field() { echo "$2" | sed -n "s/.* $1 \([0-9.]*\).*/\1/p"; }

echo "== rate: $queries queries, $inflight in flight, against unbound, $rounds rounds, placement: ${PLACE:-unpinned}"
declare -A qps cpu
for round in $(seq "$rounds"); do
  for client in shared random floor; do
    case $client in
      shared) line=$("${client_cpu[@]}" "$query" --shared-port --server "127.0.0.1:$port" --names "$tmp/names" --count "$queries" --inflight "$inflight") ;;
      random) line=$("${client_cpu[@]}" "$query" --random-ports --server "127.0.0.1:$port" --names "$tmp/names" --count "$queries" --inflight "$inflight") ;;
      floor) line=$("${client_cpu[@]}" "$floor_query" --server "127.0.0.1:$port" --names "$tmp/names" --count "$queries" --inflight "$inflight") ;;
    esac
    completed=$(echo "$line" | sed -n 's/^completed \([0-9]*\).*/\1/p')
    qps[$client-$round]=$(field qps "$line")
    cpu[$client-$round]=$(awk -v c="$(field cpu_s "$line")" -v n="${completed:-0}" 'BEGIN{if (n > 0) printf "%.3f", c * 1e6 / n; else print "n/a"}')
    printf '  round %d %-7s q/s %8s  cpu/query %6s us  (%s)\n' "$round" "$client" "${qps[$client-$round]}" "${cpu[$client-$round]}" "$line"
  done
done
median() {  # array-name a b
  local -n v=$1
  for r in $(seq "$rounds"); do awk -v x="${v[$2-$r]}" -v y="${v[$3-$r]}" 'BEGIN{if (y > 0) printf "%.3f\n", x / y}'; done |
    sort -n | awk '{a[NR]=$1} END{if (NR == 0) print "n/a"; else print NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'
}
echo "  RATIO q/s random/floor      = $(median qps random floor) (goal >= 0.7)"
echo "  ratio q/s random/shared     = $(median qps random shared)"
echo "  ratio cpu/query random/shared = $(median cpu random shared)"

# One forgery run: mode, forgeries; prints what the tool and the forger said.
forge() {
  local mode=$1 count=$2 flag target_ports tool_pid line tool_port
  flag=--shared-port
  [ "$mode" = random ] && flag=--random-ports
  "$query" "$flag" --server "127.0.0.1:$port" --names "$tmp/one" --count 2000000000 \
    --inflight "$forge_inflight" --timeout 2000 > "$tmp/tool.out" 2> "$tmp/tool.err" &
  tool_pid=$!
  pids+=("$tool_pid")
  sleep 0.5
  if [ "$mode" = shared ]; then
    tool_port=$(ss -uanp | grep "pid=$tool_pid," | awk '{print $4}' | sed 's/.*://' | sort -u | head -1)
    target_ports="$tool_port-$tool_port"
  else
    target_ports="$range_first-$range_last"
  fi
  "$forger" --server "127.0.0.1:$port" --ports "$target_ports" --count "$count" > "$tmp/forger.out"
  kill -INT "$tool_pid"
  wait "$tool_pid" || true
  line=$(cat "$tmp/tool.out")
  local accepted reached
  accepted=$(echo "$line" | sed -n 's/.* nxdomain \([0-9]*\).*/\1/p')
  # Forgeries that got past the port (the kernel's check) and were refused by
  # the ID check: counted by the dispatcher as unmatched for the mode.
  reached=$(echo "$line" | sed -n "s/.* unmatched_$mode \([0-9]*\).*/\1/p")
  printf '  %-6s ports %-11s forged %9s  past the port %9s (%.2e each)  accepted %6s = %10.3f per million\n' \
    "$mode" "$target_ports" "$count" "$reached" "$(awk -v a="$reached" -v n="$count" 'BEGIN{print a / n}')" \
    "$accepted" "$(awk -v a="$accepted" -v n="$count" 'BEGIN{print a * 1e6 / n}')"
  printf '         tool: %s\n         forger: %s\n' "$line" "$(cat "$tmp/forger.out")"
}
echo "== forgery: $forge_inflight queries in flight for a.uipc.test; forged NXDOMAIN replies with random IDs"
echo "   expected per forgery: shared ~ M/65536 = $(awk -v m="$forge_inflight" 'BEGIN{printf "%.2e", m / 65536}');" \
  "random ~ M/(65536 x $((range_last - range_first + 1))) = $(awk -v m="$forge_inflight" -v r=$((range_last - range_first + 1)) 'BEGIN{printf "%.2e", m / 65536 / r}')" \
  "(at most: a forgery counts only if it arrives before the real reply; one that passes"\
  "the port check is then accepted with odds 1/65536)"
[ "${FORGE:-1}" = 0 ] && exit 0
forge shared "$forge_shared"
forge random "$forge_random"
