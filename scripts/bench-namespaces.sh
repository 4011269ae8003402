#!/usr/bin/env bash
# Benchmark of what issue 10 and the owner map cost, beside scripts/bench.sh.
#
# Usage (as root): scripts/bench-namespaces.sh
#   BENCH_RUNS=7              runs of each measurement; the median is reported
#   BENCH_NAMESPACES=100      other network namespaces in the second table
#   BENCH_SOCKETS=50          sockets held in each of them
#   BENCH_SIZES="10000 100000"  connections of the owner-map table ("" for none)
#   BENCH_BASELINE=path       an earlier grapheon-agent binary to compare with (both tables)
#   BENCH_TIMEOUT=3600        the whole script is stopped after this many seconds
#   BENCH_KEEP=dir            keep every run's figures (one file per scene and binary) in dir
#
# Every scene lives in network namespaces made here and in a pid namespace of its own, whose
# /proc is the agent's --proc-root: the owners are the scene's processes, not the machine's.
# The agent runs `--dry-run --collector native` in the scene's "host" namespace. CPU is
# user+sys from wait4 and peak RSS is ru_maxrss (scripts/bench/helper.rs measure).
#
# 1. Namespaces: BENCH_NAMESPACES namespaces, one process each holding BENCH_SOCKETS sockets
#    on its own address (a veth of its own; all reported); the agent with `own` and with
#    `all`, run after run in turn. The difference divided by the number of namespaces is the
#    cost of one extra namespace. Two scenes: namespaces as a default kernel makes them, whose
#    TCP and UDP listings walk the socket hashes every namespace shares (and every socket in
#    them: this part runs first, before the owner map's connections leave time-wait
#    sockets), and namespaces made with net.ipv4.tcp_child_ehash_entries and (Linux 6.2+)
#    net.ipv4.udp_child_hash_entries set in their parent, so that each has hashes of its
#    own; in that scene the agent's namespace has its own too, so that the machine's other
#    sockets do not weigh on its own listing. User and kernel CPU are the kernel's split of
#    the run's CPU (tick-sampled where the kernel accounts so: indicative). Beside them,
#    what one read of each file the agent reads per namespace costs the kernel
#    (ns-holder probe, on 20 of the namespaces), and the kernel's floor: the same reads of
#    every namespace made once by a program that parses nothing (ns-holder floor).
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
  [ -n "${BENCH_KEEP:-}" ] && cp -r "$work" "$BENCH_KEEP"
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

# Starts "$@" as init of a new pid namespace; sets $scene (unshare), $init and $enter (the
# command prefix that runs a program in the scene's network namespace). The network
# namespace is $host, or with $child_of set a new one made inside that one (so that it takes
# its sysctls).
start_scene() {
  rm -f "$work/ready"
  if [ -n "${child_of:-}" ]; then
    ip netns exec "$child_of" unshare --net --pid --fork --mount-proc \
      sh -c 'ip link set lo up && exec "$@"' scene "$@" &
  else
    ip netns exec "$host" unshare --pid --fork --mount-proc "$@" &
  fi
  scene=$!
  init=""
  local deadline=$((SECONDS + 600))
  until [ -s "$work/ready" ]; do
    kill -0 "$scene" 2>/dev/null || { echo "bench-namespaces.sh: the scene died" >&2; exit 1; }
    [ $SECONDS -lt $deadline ] || { echo "bench-namespaces.sh: the scene is not ready in time" >&2; exit 1; }
    sleep 0.2
  done
  init=$(tr -d ' \n' <"/proc/$scene/task/$scene/children")
  if [ -n "${child_of:-}" ]; then
    enter=(nsenter "--net=/proc/$init/ns/net")
  else
    enter=(ip netns exec "$host")
  fi
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
  out=$("${enter[@]}" timeout 300 "$holder" measure env GRAPHEON_AGENT_NAMESPACES="$1" \
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
  "${enter[@]}" env GRAPHEON_AGENT_NAMESPACES="$1" "$2" --dry-run --collector native \
    --config /dev/null --state-dir "$work/no-state" --proc-root "/proc/$init/root/proc" 2>/dev/null |
    awk -F '"local_port"' '{ n += NF - 1 } END { print n + 0 }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
col() { awk -v i="$2" '{ print $i }' "$work/$1" | median; }
ms() { awk -v x="$1" 'BEGIN { printf "%.1f", x * 1000 }'; }
mib() { awk -v x="$1" 'BEGIN { printf "%.1f", x / 1024 }'; }
# The CPU per extra namespace of scene $1 in column $2 (2 all, 4 user, 5 kernel), in ms:
# from the medians, or with $3 = fastest from the fastest runs (the other work on a shared
# machine slows the CPU of a run down too, never speeds it up).
per_ns() {
  local pick=col
  [ "${3:-}" = fastest ] && pick=fastest
  awk -v a="$($pick "$1-all" "$2")" -v o="$($pick "$1-own" "$2")" -v n="$count" \
    'BEGIN { printf "%.3f", (a - o) * 1000 / n }'
}
fastest() { awk -v i="$2" '{ print $i }' "$work/$1" | sort -g | head -1; }
# What $per sockets cost in the agent's own namespace, in ms: the same scene's own run
# against the run of the first scene that reported no socket (medians).
sockets_own() {
  awk -v a="$(col same-own 2)" -v o="$(col shared-own 2)" -v n="$count" \
    'BEGIN { printf "%.3f", (a - o) * 1000 / n }'
}
# The CPU per extra namespace of scene $1 beyond what its sockets cost in the agent's own.
beyond() {
  awk -v p="$(per_ns "$1" 2)" -v s="$(sockets_own)" 'BEGIN { printf "%.3f", p - s }'
}
# TCP sockets of the whole machine (every namespace): what a shared hash holds.
machine_tcp() { sed -n 's/^TCP: .* alloc \([0-9]*\).*/\1/p' /proc/net/sockstat; }
# The kernel's floor: `ns-holder floor` (what the agent reads per namespace, read once and
# not parsed) over every namespace of the scene ($1 = all), or over none ($1 = none: the cost
# of starting it): "<wall> <cpu> <rss_kib> <user> <sys>".
measure_floor() {
  local out pids=()
  if [ "$1" = all ]; then
    read -r -a pids <"/proc/$init/task/$init/children"
  fi
  out=$("$holder" measure "$holder" floor "${pids[@]}")
  read -r _ w u s k <<<"$out"
  awk -v w="$w" -v u="$u" -v s="$s" -v k="$k" 'BEGIN { printf "%s %.6f %s %s %s\n", w, u + s, k, u, s }'
}
# Runs the agent with own and with all in turn in the current scene $1 (and the baseline,
# when given, in the same turns): the measurements go to $work/$1-{own,all,base-own,base-all},
# the probe of 20 namespaces to $work/$1-probe.
run_scene() {
  : >"$work/$1-own" && : >"$work/$1-all" && : >"$work/$1-base-own" && : >"$work/$1-base-all"
  : >"$work/$1-floor-own" && : >"$work/$1-floor-all"
  local before r a b c d e f
  before=$(machine_tcp)
  for r in $(seq 0 "$runs"); do
    a=$(measure own "$agent")
    b=$(measure all "$agent")
    e=$(measure_floor none)
    f=$(measure_floor all)
    c="" d=""
    if [ -n "$baseline" ]; then
      c=$(measure own "$baseline")
      d=$(measure all "$baseline")
    fi
    if [ "$r" -gt 0 ]; then # run 0 warms the caches
      echo "$a" >>"$work/$1-own"
      echo "$b" >>"$work/$1-all"
      echo "$e" >>"$work/$1-floor-own"
      echo "$f" >>"$work/$1-floor-all"
      [ -n "$c" ] && echo "$c" >>"$work/$1-base-own" && echo "$d" >>"$work/$1-base-all"
    fi
  done
  printf '%s to %s\n' "$before" "$(machine_tcp)" >"$work/$1-tcp"
  echo "$(records own "$agent") $(records all "$agent")" >"$work/$1-records"
  # shellcheck disable=SC2046 # one pid per word
  "$holder" probe 5 $(tr ' ' '\n' <"/proc/$init/task/$init/children" | head -20) >"$work/$1-probe"
}

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
run_scene shared
stop_scene

# The same sockets held by as many processes in the agent's own namespace (on an address of
# its loopback interface): what reporting them costs without any other namespace. The
# difference to the scene above is what the namespaces themselves cost.
echo "== $count processes of $per sockets in the agent's own namespace" >&2
new_host same
ip -n "$host" addr add 10.205.0.1/32 dev lo
start_scene "$holder" "$work/ready" "$per" --same "$host" "$count"
run_scene same
stop_scene

# The same namespaces made inside a parent that gives its children hashes of their own.
echo "== $count namespaces of $per sockets, hashes of their own" >&2
parent=ga-bnp-$$
ip netns add "$parent"
made+=("$parent")
own_hashes="net.ipv4.tcp_child_ehash_entries=1024"
ip netns exec "$parent" sysctl -qw net.ipv4.tcp_child_ehash_entries=1024
if [ -e /proc/sys/net/ipv4/udp_child_hash_entries ]; then # Linux 6.2+
  ip netns exec "$parent" sysctl -qw net.ipv4.udp_child_hash_entries=1024
  own_hashes+=", net.ipv4.udp_child_hash_entries=1024"
fi
child_of=$parent
start_scene "$holder" "$work/ready" "$per" --fresh "$parent" "$count"
run_scene own
stop_scene
child_of=""

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

Other namespaces ($count namespaces, $per sockets each, all reported; own and all run in turn):

| scene | --namespaces | connection records | CPU ms | user ms | sys ms | wall ms | peak RSS MiB |
|---|---|---:|---:|---:|---:|---:|---:|
EOF
for sc in shared own; do
  read -r own_n all_n <"$work/$sc-records"
  label="default kernel (shared hashes)"
  [ "$sc" = own ] && label="hashes of their own ($own_hashes)"
  for mode in own all; do
    n=$own_n
    [ "$mode" = all ] && n=$all_n
    echo "| $label | $mode | $n | $(ms "$(col "$sc-$mode" 2)") | $(ms "$(col "$sc-$mode" 4)") | $(ms "$(col "$sc-$mode" 5)") | $(ms "$(col "$sc-$mode" 1)") | $(mib "$(col "$sc-$mode" 3)") |"
  done
done
cat <<EOF

CPU per extra namespace of $per sockets (target: at most 0.5 ms), from the medians (and the fastest runs):
  default kernel:      $(per_ns shared 2) ms ($(per_ns shared 4) ms agent user, $(per_ns shared 5) ms kernel) ($(per_ns shared 2 fastest) ms); TCP sockets on the machine: $(cat "$work/shared-tcp")
  hashes of their own: $(per_ns own 2) ms ($(per_ns own 4) ms agent user, $(per_ns own 5) ms kernel) ($(per_ns own 2 fastest) ms); TCP sockets on the machine: $(cat "$work/own-tcp")
  the kernel's floor (ns-holder floor: the same reads, once, unparsed): default kernel $(per_ns shared-floor 2) ms ($(per_ns shared-floor 2 fastest) ms), hashes of their own $(per_ns own-floor 2) ms ($(per_ns own-floor 2 fastest) ms)
  the same $per sockets per process in the agent's own namespace ($(read -r n _ <"$work/same-records"; echo "$n") records): $(sockets_own) ms each $per
  so a namespace, beyond what its sockets cost anywhere: default kernel $(beyond shared) ms, hashes of their own $(beyond own) ms
EOF
if [ -n "$baseline" ]; then
  cat <<EOF
  baseline ($baseline), the same turns: default kernel $(per_ns shared-base 2) ms ($(per_ns shared-base 2 fastest) ms), hashes of their own $(per_ns own-base 2) ms ($(per_ns own-base 2 fastest) ms)
EOF
fi
cat <<EOF

What the kernel takes for each file the agent reads per namespace (median µs of CPU, 20 namespaces x 5 reads):

| file | calls | µs, default kernel | µs, hashes of their own |
|---|---:|---:|---:|
EOF
paste -d ' ' "$work/shared-probe" "$work/own-probe" |
  awk '{ printf "| %s | %s %s | %s | %s |\n", $1, $2, $3, $4, $8 }'
cat <<EOF

Kernel hashes at boot: $(dmesg 2>/dev/null | sed -n 's/.*\] \(TCP established\|tcp_listen_portaddr_hash\|UDP\) hash table entries: \([0-9]*\).*/\1 \2/p' | paste -sd ';' -)
A TCP listing walks every bucket of the established hash (and of the listening one, which stays shared); a UDP listing walks the UDP hash from its first bucket at every read().
EOF
