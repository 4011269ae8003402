#!/usr/bin/env bash
# Benchmark of what issue 10 and the owner map cost, beside scripts/bench.sh.
#
# Usage (as root): scripts/bench-namespaces.sh
#   BENCH_RUNS=7              runs of each measurement; the median is reported
#   BENCH_NAMESPACES=100      other network namespaces in the second table
#   BENCH_SOCKETS=50          sockets held in each of them
#   BENCH_SIZES="10000 100000"  connections of the owner-map table ("" for none)
#   BENCH_BASELINE=path       an earlier grapheon-agent binary to compare the owner map with
#   BENCH_TIMEOUT=3600        the whole script is stopped after this many seconds
#
# Every scene lives in network namespaces made here and in a pid namespace of its own, whose
# /proc is the agent's --proc-root: the owners are the scene's processes, not the machine's.
# The agent runs `--dry-run --collector native` in the scene's "host" namespace. CPU is
# user+sys from wait4 and peak RSS is ru_maxrss (scripts/bench/helper.rs measure).
#
# 1. Namespaces: BENCH_NAMESPACES namespaces, one process each holding BENCH_SOCKETS sockets
#    on its own address (a veth of its own; all reported); the agent with `own` and with
#    `all`. The difference divided by the number of namespaces is the cost of one extra
#    namespace. Listing a TCP table walks the kernel's hash of every namespace's sockets,
#    so this part runs first, before the owner map's connections leave time-wait sockets.
#    User and kernel CPU are the kernel's tick-sampled split of the run's CPU: indicative.
# 2. Owner map: N loopback connections in the agent's own namespace, GRAPHEON_AGENT_NAMESPACES
#    =own, this build against BENCH_BASELINE (when given; earlier binaries ignore the variable).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${BENCH_RUNS:-7}
count=${BENCH_NAMESPACES:-100}
per=${BENCH_SOCKETS:-50}
read -r -a sizes <<<"${BENCH_SIZES-10000 100000}"
baseline=${BENCH_BASELINE:-}
limit=${BENCH_TIMEOUT:-3600}

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-namespaces.sh: must run as root (it builds network and pid namespaces)" >&2
  exit 2
fi
for tool in ip unshare rustc cargo timeout; do
  command -v "$tool" >/dev/null || { echo "bench-namespaces.sh: $tool is missing" >&2; exit 2; }
done
if [ -n "$baseline" ] && [ ! -x "$baseline" ]; then
  echo "bench-namespaces.sh: BENCH_BASELINE=$baseline is not an executable" >&2
  exit 2
fi
if [ -z "${BENCH_BOUNDED:-}" ]; then
  BENCH_BOUNDED=1 exec timeout -k 60 "$limit" "$0" "$@"
fi

work=$(mktemp -d /tmp/grapheon-bench-ns.XXXXXX)
made=()
scene=""
cleanup() {
  set +e
  stop_scene
  for ns in "${made[@]}"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "bench-namespaces.sh: stopped" >&2; exit 130' INT TERM

echo "== building" >&2
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  cargo build --release --locked --target x86_64-unknown-linux-musl >&2
  agent=$PWD/target/x86_64-unknown-linux-musl/release/grapheon-agent
else
  cargo build --release --locked >&2
  agent=$PWD/target/release/grapheon-agent
fi
helper=$work/helper
holder=$work/ns-holder
rustc -O --edition 2021 -o "$helper" scripts/bench/helper.rs
rustc -O --edition 2021 -o "$holder" scripts/bench/ns-holder.rs

# A fresh namespace for the agent for each scene: time-wait sockets of the last one would
# stay in the report and hold its addresses.
new_host() {
  host=ga-bnh-$$-$1
  ip netns add "$host"
  made+=("$host")
  ip -n "$host" link set lo up
  ip netns exec "$host" sh -c 'echo "1024 65535" > /proc/sys/net/ipv4/ip_local_port_range'
}

# Starts "$@" as init of a new pid namespace inside $host; sets $scene (unshare) and $init.
start_scene() {
  rm -f "$work/ready"
  ip netns exec "$host" unshare --pid --fork --mount-proc "$@" &
  scene=$!
  init=""
  local deadline=$((SECONDS + 600))
  until [ -s "$work/ready" ]; do
    kill -0 "$scene" 2>/dev/null || { echo "bench-namespaces.sh: the scene died" >&2; exit 1; }
    [ $SECONDS -lt $deadline ] || { echo "bench-namespaces.sh: the scene is not ready in time" >&2; exit 1; }
    sleep 0.2
  done
  init=$(tr -d ' \n' <"/proc/$scene/task/$scene/children")
}
stop_scene() {
  if [ -n "$scene" ]; then
    # The pid namespace dies with its init, and every process in it.
    if [ -n "${init:-}" ]; then kill -KILL "$init" 2>/dev/null || true; fi
    kill -KILL "$scene" 2>/dev/null || true
    wait "$scene" 2>/dev/null || true
    scene=""
  fi
}

# One measurement of binary $2 with GRAPHEON_AGENT_NAMESPACES=$1:
# "<wall> <cpu> <rss_kib> <user> <sys>".
measure() {
  local out
  out=$(ip netns exec "$host" timeout 300 "$holder" measure env GRAPHEON_AGENT_NAMESPACES="$1" \
    "$2" --dry-run --collector native --config /dev/null --state-dir "$work/no-state" \
    --proc-root "/proc/$init/root/proc")
  if [ "${out%% *}" != 0 ]; then
    echo "bench-namespaces.sh: $2 failed (exit ${out%% *})" >&2
    exit 1
  fi
  read -r _ w u s k <<<"$out"
  awk -v w="$w" -v u="$u" -v s="$s" -v k="$k" 'BEGIN { printf "%s %.6f %s %s %s\n", w, u + s, k, u, s }'
}
# Connection records of one --dry-run (all parts).
records() {
  ip netns exec "$host" env GRAPHEON_AGENT_NAMESPACES="$1" "$2" --dry-run --collector native \
    --config /dev/null --state-dir "$work/no-state" --proc-root "/proc/$init/root/proc" 2>/dev/null |
    awk -F '"local_port"' '{ n += NF - 1 } END { print n + 0 }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
col() { awk -v i="$2" '{ print $i }' "$work/$1" | median; }
ms() { awk -v x="$1" 'BEGIN { printf "%.1f", x * 1000 }'; }
mib() { awk -v x="$1" 'BEGIN { printf "%.1f", x / 1024 }'; }

# ---- 1. other namespaces (first: time-wait sockets left by the owner-map scenes would
# lengthen every TCP table listing for a minute) ----
echo "== $count namespaces of $per sockets" >&2
new_host ns
names=()
for i in $(seq 1 "$count"); do
  ns=ga-bn-$$-$i
  ip netns add "$ns"
  made+=("$ns")
  names+=("$ns")
  ip -n "$ns" -batch - <<EOF
link set lo up
link add d0 type veth peer name d1
link set d0 addrgenmode none
link set d1 addrgenmode none
addr add 10.203.$((i / 200)).$((i % 200 + 1))/32 dev d0
link set d0 up
link set d1 up
EOF
done
start_scene "$holder" "$work/ready" "$per" "${names[@]}"
: >"$work/own" && : >"$work/all"
for r in $(seq 0 "$runs"); do
  a=$(measure own "$agent")
  b=$(measure all "$agent")
  if [ "$r" -gt 0 ]; then
    echo "$a" >>"$work/own"
    echo "$b" >>"$work/all"
  fi
done
own_records=$(records own "$agent")
all_records=$(records all "$agent")
oc=$(col own 2) ac=$(col all 2)
per_ns=$(awk -v a="$ac" -v o="$oc" -v n="$count" 'BEGIN { printf "%.3f", (a - o) * 1000 / n }')
per_user=$(awk -v a="$(col all 4)" -v o="$(col own 4)" -v n="$count" 'BEGIN { printf "%.3f", (a - o) * 1000 / n }')
per_sys=$(awk -v a="$(col all 5)" -v o="$(col own 5)" -v n="$count" 'BEGIN { printf "%.3f", (a - o) * 1000 / n }')
stop_scene

# The same namespaces made with net.ipv4.tcp_child_ehash_entries=1024 in their parent
# (Linux 6.1+): each gets a TCP hash of its own, which its /proc listing walks instead.
echo "== $count namespaces of $per sockets, own TCP hash tables" >&2
new_host own-ehash
parent=ga-bnp-$$
ip netns add "$parent"
made+=("$parent")
ip netns exec "$parent" sysctl -qw net.ipv4.tcp_child_ehash_entries=1024
start_scene "$holder" "$work/ready" "$per" --fresh "$parent" "$count"
: >"$work/small"
for r in $(seq 0 "$runs"); do
  b=$(measure all "$agent")
  [ "$r" -gt 0 ] && echo "$b" >>"$work/small"
done
small_records=$(records all "$agent")
sc=$(col small 2)
per_small=$(awk -v a="$sc" -v o="$oc" -v n="$count" 'BEGIN { printf "%.3f", (a - o) * 1000 / n }')
stop_scene

# ---- 2. the owner map ----
owner_rows=()
for n in "${sizes[@]}"; do
  echo "== owner map: $n connections" >&2
  new_host "$n"
  start_scene "$helper" hold "$n" "$work/ready"
  : >"$work/new" && : >"$work/old"
  for r in $(seq 0 "$runs"); do
    a=$(measure own "$agent")
    b=""
    [ -n "$baseline" ] && b=$(measure own "$baseline")
    if [ "$r" -gt 0 ]; then # run 0 warms the caches
      echo "$a" >>"$work/new"
      [ -n "$b" ] && echo "$b" >>"$work/old"
    fi
  done
  row="| $n | $(records own "$agent")"
  if [ -n "$baseline" ]; then
    bc=$(col old 2) tc=$(col new 2)
    row+=" | $(ms "$bc") | $(ms "$tc") | $(awk -v a="$tc" -v b="$bc" 'BEGIN { printf "%.2f", a / b }')"
    row+=" | $(mib "$(col old 3)") | $(mib "$(col new 3)") |"
  else
    row+=" | - | $(ms "$(col new 2)") | - | - | $(mib "$(col new 3)") |"
  fi
  owner_rows+=("$row")
  stop_scene
done

cat <<EOF

grapheon-agent $("$agent" --version 2>/dev/null | head -1), $(nproc) CPUs, Linux $(uname -r). Median of $runs runs; CPU = user+sys.

Owner map (N connections in the agent's own namespace; baseline: ${baseline:-none}):

| connections | records | baseline CPU ms | this CPU ms | ratio | baseline peak RSS MiB | this peak RSS MiB |
|---:|---:|---:|---:|---:|---:|---:|
EOF
printf '%s\n' "${owner_rows[@]}"
cat <<EOF

Other namespaces ($count namespaces, $per sockets each, all reported):

| --namespaces | connection records | CPU ms | user ms | sys ms | wall ms | peak RSS MiB |
|---|---:|---:|---:|---:|---:|---:|
| own | $own_records | $(ms "$oc") | $(ms "$(col own 4)") | $(ms "$(col own 5)") | $(ms "$(col own 1)") | $(mib "$(col own 3)") |
| all | $all_records | $(ms "$ac") | $(ms "$(col all 4)") | $(ms "$(col all 5)") | $(ms "$(col all 1)") | $(mib "$(col all 3)") |
| all, namespaces with their own TCP hash (tcp_child_ehash_entries=1024) | $small_records | $(ms "$sc") | $(ms "$(col small 4)") | $(ms "$(col small 5)") | $(ms "$(col small 1)") | $(mib "$(col small 3)") |

CPU per extra namespace of $per sockets: $per_ns ms ($per_user ms user, $per_sys ms kernel; target: at most 0.5 ms)
CPU per extra namespace with a TCP hash of its own: $per_small ms
Kernel: TCP established hash of $(dmesg 2>/dev/null | sed -n 's/.*TCP established hash table entries: \([0-9]*\).*/\1/p' | head -1) buckets (each TCP table listing walks all of them)
EOF
