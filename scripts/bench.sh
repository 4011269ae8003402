#!/usr/bin/env bash
# Benchmark: the agent's native collection against the external commands of the command path,
# side by side, inside a network namespace holding N open TCP connections over loopback.
#
# Usage (as root): scripts/bench.sh [N ...]        default N: 0 1000 10000 100000
#   BENCH_RUNS=7          runs of each tool per size; the median is reported
#   BENCH_TIMEOUT=3600    the whole script is stopped after this many seconds
#
# For each N, in a fresh namespace (so no TIME_WAIT socket of a bigger run is left behind):
#   native    grapheon-agent --dry-run --collector native
#   commands  ip -json addr show; ip -json neigh show; ip -json route show; ss -tunapH
#             (what --collector commands runs): CPU and wall summed over the four, peak RSS
#             the largest of the four
#   agent-cmd grapheon-agent --dry-run --collector commands (for context: the agent, its
#             children and its own parsing)
#   floor     scripts/bench/helper.rs floor: a minimal sock_diag + /proc/*/fd dump, what any
#             socket lister must do at least
#   full      grapheon-agent --force against the contract server (examples/bench_server.rs, in a
#             namespace of its own behind a veth pair, so its sockets are not collected) from a
#             freshly registered state: a full snapshot, in parts
#   delta     the same command right after: the saved snapshot, nothing changed
# CPU is user+sys seconds, peak RSS is ru_maxrss and bytes written is ru_oublock x 512 (what
# /proc/<pid>/io calls write_bytes), all from wait4 (children included), measured by
# scripts/bench/helper.rs; wall is from before the start to after the exit. The state
# directories live under BENCH_STATE_ROOT (default target/bench-state): a real filesystem,
# since tmpfs writes no blocks. `uptime` is printed beside the figures (the machine is shared).
#   BENCH_COMMANDS=0      skip the command path (ss -p takes minutes at 100,000)
# Everything measured runs in a PID namespace of its own (with its own /proc) beside the
# connection holder: the owner walk of /proc/*/fd then sees the scene's processes only, not
# whatever else this machine runs (other builds and tests, thousands of descriptors at times).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${BENCH_RUNS:-7}
limit=${BENCH_TIMEOUT:-3600}
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(0 10000 50000 100000)
with_commands=${BENCH_COMMANDS:-1}
state_root=${BENCH_STATE_ROOT:-$PWD/target/bench-state}

if [ "$(id -u)" -ne 0 ]; then
  echo "bench.sh: must run as root (it builds network namespaces)" >&2
  exit 2
fi
for tool in ip ss rustc cargo timeout unshare nsenter; do
  command -v "$tool" >/dev/null || { echo "bench.sh: $tool is missing" >&2; exit 2; }
done

# Bounded: `timeout` stops the whole script after $limit seconds (the EXIT trap then cleans up;
# every measured command has its own limit, so the trap runs soon after).
if [ -z "${BENCH_BOUNDED:-}" ]; then
  BENCH_BOUNDED=1 exec timeout -k 200 "$limit" "$0" "$@"
fi

work=$(mktemp -d /tmp/grapheon-bench.XXXXXX)
mkdir -p "$state_root"
states=$(mktemp -d "$state_root/run.XXXXXX")
ns=""
srvns=""
server=""
holder=""
anchor=""
cleanup() {
  set +e
  if [ -n "$anchor" ]; then
    # The PID namespace's first process: every process in the namespace dies with it.
    kill -KILL "$anchor" 2>/dev/null
    wait "$anchor" 2>/dev/null
  fi
  if [ -n "$holder" ]; then
    kill -KILL "$holder" 2>/dev/null
    wait "$holder" 2>/dev/null
  fi
  if [ -n "$server" ]; then
    kill -KILL "$server" 2>/dev/null
    wait "$server" 2>/dev/null
  fi
  if [ -n "$ns" ]; then
    ip netns del "$ns" 2>/dev/null
  fi
  if [ -n "$srvns" ]; then
    ip netns del "$srvns" 2>/dev/null
  fi
  rm -rf "$work" "$states"
}
trap cleanup EXIT
trap 'echo "bench.sh: stopped" >&2; exit 130' INT TERM

# The scene is the agent's own namespace: other namespaces on this machine (the root one, seen
# from the bench namespace, and whatever else runs here) would add their cost and their records.
export GRAPHEON_AGENT_NAMESPACES=own
# shellcheck source=scripts/lib/target-dir.sh
. "$PWD/scripts/lib/target-dir.sh"
target_dir=$(cargo_target_dir "$PWD")

echo "== building" >&2
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  cargo build --release --locked --target x86_64-unknown-linux-musl >&2
  agent=$target_dir/x86_64-unknown-linux-musl/release/grapheon-agent
  target=x86_64-unknown-linux-musl
else
  cargo build --release --locked >&2
  agent=$target_dir/release/grapheon-agent
  target=$(rustc -vV | sed -n 's/^host: //p')
fi
cargo build --release --locked --example bench_server >&2
bench_server=$target_dir/release/examples/bench_server
helper=$work/helper
rustc -O --edition 2021 -o "$helper" scripts/bench/helper.rs

# Runs a command in the scene: the network namespace $ns and the PID namespace (with its /proc)
# whose first process is $anchor_pid.
scene() { nsenter --target "$anchor_pid" --net --pid --mount "$@"; }

# One measurement: prints "<wall> <cpu> <rss_kib> <bytes written>"; fails the script if the
# command failed. MEASURE_TIMEOUT (default 120) bounds it.
measure() {
  local out code
  out=$(scene "$helper" measure "${MEASURE_TIMEOUT:-120}" "$@")
  code=${out%% *}
  if [ "$code" != 0 ]; then
    echo "bench.sh: '$*' failed (exit $code) in $ns" >&2
    scene "$@" >/dev/null || true
    exit 1
  fi
  echo "${out#* }"
}

# Median of column $2 of the result file $1.
col() { awk -v i="$2" '{ print $i }' "$work/$1" | median; }
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ms() { awk -v x="$1" 'BEGIN { printf "%.1f", x * 1000 }'; }
mib() { awk -v x="$1" 'BEGIN { printf "%.1f", x / 1024 }'; }
# Connection records in the agent's --dry-run with collector $1.
count() {
  scene "$agent" "${agent_args[@]}" --collector "$1" |
    awk -F '"local_port"' '{ n += NF - 1 } END { print n + 0 }'
}
mb() { awk -v x="$1" 'BEGIN { printf "%.2f", x / 1000000 }'; }
kib() { awk -v x="$1" 'BEGIN { printf "%.1f", x / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

agent_args=(--dry-run --state-dir "$work/no-state" --config /dev/null)
cmds=("ip -json addr show" "ip -json neigh show" "ip -json route show" "ss -tunapH")

rows=()
detail=()
checkins=()
loads=()
for n in "${sizes[@]}"; do
  echo "== $n connections" >&2
  ns=ga-bench-$$-$n
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  # A small realistic scene besides the connections: one interface, its neighbour, routes.
  ip -n "$ns" link add eq0 address 02:00:00:00:00:01 type veth peer name eq1 address 02:00:00:00:00:02
  ip -n "$ns" -batch - <<'EOF'
addr add 192.0.2.1/24 dev eq0
addr add fd00:6761::1/64 dev eq0 nodad
link set eq0 up
link set eq1 up
neigh add 192.0.2.2 lladdr 02:00:00:00:00:02 dev eq0 nud permanent
route add default via 192.0.2.2
route add blackhole 203.0.113.0/24
EOF
  ip netns exec "$ns" sh -c 'echo "1024 65535" > /proc/sys/net/ipv4/ip_local_port_range'
  # The scene's PID namespace: a first process that only waits, with a /proc of its own.
  ip netns exec "$ns" unshare --pid --fork --kill-child --mount-proc sleep 1000000 &
  anchor=$!
  anchor_pid=""
  until [ -n "$anchor_pid" ]; do
    kill -0 "$anchor" 2>/dev/null || { echo "bench.sh: cannot make a PID namespace" >&2; exit 1; }
    anchor_pid=$(cat "/proc/$anchor/task/$anchor/children" 2>/dev/null | awk '{ print $1 }')
    [ -n "$anchor_pid" ] || sleep 0.1
  done
  if [ "$n" -gt 0 ]; then
    rm -f "$work/ready"
    scene "$helper" hold "$n" "$work/ready" &
    holder=$!
    deadline=$((SECONDS + 120 + n / 500))
    until [ -s "$work/ready" ]; do
      kill -0 "$holder" 2>/dev/null || { echo "bench.sh: the connection holder died" >&2; exit 1; }
      [ $SECONDS -lt $deadline ] || { echo "bench.sh: $n connections not ready in time" >&2; exit 1; }
      sleep 0.2
    done
  fi
  established=$(ip netns exec "$ns" ss -tanH state established | wc -l)
  # What both collectors report (not timed): the same number of connection records.
  native_records=$(count native)
  if [ "$with_commands" = 1 ]; then
    command_records=$(count commands)
    echo "   $established established sockets; connection records: native $native_records, commands $command_records" >&2
    if [ "$native_records" != "$command_records" ]; then
      echo "bench.sh: the collectors disagree; the comparison would be meaningless" >&2
      exit 1
    fi
  else
    echo "   $established established sockets; connection records: native $native_records" >&2
  fi

  : >"$work/native" && : >"$work/commands" && : >"$work/agentcmd" && : >"$work/floor"
  for c in "${cmds[@]}"; do : >"$work/cmd-${c// /_}"; done
  for r in $(seq 0 "$runs"); do
    # Run 0 warms the page cache and is not counted.
    a=$(measure "$agent" "${agent_args[@]}" --collector native)
    fl=$(measure "$helper" floor)
    if [ "$r" -gt 0 ]; then
      echo "$a" >>"$work/native"
      echo "$fl" >>"$work/floor"
    fi
    [ "$with_commands" = 1 ] || continue
    wall=0 cpu=0 rss=0
    for c in "${cmds[@]}"; do
      # shellcheck disable=SC2086 # the command line is split on purpose
      m=$(measure $c)
      if [ "$r" -gt 0 ]; then
        echo "$m" >>"$work/cmd-${c// /_}"
      fi
      read -r w u k _ <<<"$m"
      wall=$(awk -v a="$wall" -v b="$w" 'BEGIN { print a + b }')
      cpu=$(awk -v a="$cpu" -v b="$u" 'BEGIN { print a + b }')
      if [ "$k" -gt "$rss" ]; then
        rss=$k
      fi
    done
    b=$(measure "$agent" "${agent_args[@]}" --collector commands)
    if [ "$r" -gt 0 ]; then
      echo "$wall $cpu $rss" >>"$work/commands"
      echo "$b" >>"$work/agentcmd"
    fi
  done

  # Check-ins: the server in a namespace of its own, reached over a veth pair with permanent
  # neighbour entries, so that nothing of it (sockets, ARP states) changes the agent's tables
  # between the full and the delta check-in.
  srvns=$ns-srv
  ip netns add "$srvns"
  ip -n "$srvns" link set lo up
  ip -n "$ns" link add ck0 address 02:00:00:00:01:01 type veth peer name ck1 address 02:00:00:00:01:02 netns "$srvns"
  ip -n "$ns" addr add 198.51.100.1/30 dev ck0
  ip -n "$ns" link set ck0 up
  ip -n "$ns" neigh add 198.51.100.2 lladdr 02:00:00:00:01:02 dev ck0 nud permanent
  ip -n "$srvns" addr add 198.51.100.2/30 dev ck1
  ip -n "$srvns" link set ck1 up
  ip -n "$srvns" neigh add 198.51.100.1 lladdr 02:00:00:00:01:01 dev ck1 nud permanent
  # The enrollment key of tests/support, in an env file as on a host.
  printf 'GRAPHEON_AGENT_ENROLLMENT_KEY=gaek_integrationTestEnrollmentKey0001\n' >"$work/agent.env"
  : >"$work/full" && : >"$work/delta" && : >"$work/size"
  for r in $(seq 0 "$runs"); do
    # A fresh server each run: it keeps every report it accepted in memory.
    rm -f "$work/url"
    ip netns exec "$srvns" "$bench_server" 198.51.100.2:8080 "$work/url" &
    server=$!
    until [ -s "$work/url" ]; do
      kill -0 "$server" 2>/dev/null || { echo "bench.sh: the contract server died" >&2; exit 1; }
      sleep 0.1
    done
    sd=$states/$n-$r
    rm -rf "$sd"
    ck_args=(--config "$work/agent.env" --state-dir "$sd" --server-url "$(cat "$work/url")" --collector native)
    scene "$agent" "${ck_args[@]}" --register-only 2>/dev/null
    # The previous run's own connection to the server would be a TIME_WAIT record in this
    # run's tables; on a host, 15 minutes apart, it is long gone. Remove it.
    settle() { sync; ip netns exec "$ns" ss -K -tan state time-wait >/dev/null; }
    settle
    f=$(MEASURE_TIMEOUT=900 measure "$agent" "${ck_args[@]}" --force)
    settle
    d=$(MEASURE_TIMEOUT=300 measure "$agent" "${ck_args[@]}" --force)
    if [ "$r" -gt 0 ]; then
      echo "$f" >>"$work/full"
      echo "$d" >>"$work/delta"
      stat -c %s "$sd/state.json" >>"$work/size"
    fi
    kill -KILL "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
    rm -rf "$sd"
  done
  ip netns del "$srvns"
  srvns=""

  nw=$(col native 1) nc=$(col native 2) nr=$(col native 3)
  fw=$(col full 1) fc=$(col full 2) fr=$(col full 3) fb=$(col full 4)
  dw=$(col delta 1) dc=$(col delta 2) dr=$(col delta 3) db=$(col delta 4)
  size=$(median <"$work/size")
  flc=$(col floor 2)
  checkins+=("| $n | $(ms "$flc") | $(ms "$nc") | $(ratio "$nc" "$flc") | $(mib "$nr") | $(ms "$fc") | $(ms "$fw") | $(mib "$fr") | $(mb "$fb") | $(mb "$size") | $(ratio "$fb" "$size") | $(ms "$dc") | $(ms "$dw") | $(mib "$dr") | $(kib "$db") |")
  if [ "$with_commands" = 1 ]; then
    cw=$(col commands 1) cc=$(col commands 2) cr=$(col commands 3)
    aw=$(col agentcmd 1) ac=$(col agentcmd 2) ar=$(col agentcmd 3)
    rows+=("| $n | $(ms "$nc") | $(ms "$nw") | $(mib "$nr") | $(ms "$cc") | $(ms "$cw") | $(mib "$cr") | $(ratio "$nc" "$cc") | $(ratio "$nw" "$cw") | $(ratio "$nr" "$cr") | $(ms "$ac") | $(ms "$aw") | $(mib "$ar") |")
    line="| $n"
    for c in "${cmds[@]}"; do
      f="cmd-${c// /_}"
      line+=" | $(ms "$(col "$f" 2)") / $(mib "$(col "$f" 3)")"
    done
    detail+=("$line |")
  fi
  loads+=("$n: $(cut -d' ' -f1-3 /proc/loadavg)")

  kill -KILL "$anchor" 2>/dev/null || true
  wait "$anchor" 2>/dev/null || true
  anchor=""
  if [ -n "$holder" ]; then
    kill -KILL "$holder" 2>/dev/null || true
    wait "$holder" 2>/dev/null || true
    holder=""
  fi
  ip netns del "$ns"
  ns=""
done

cat <<EOF

grapheon-agent $("$agent" --version 2>/dev/null | head -1) ($target, $(stat -c %s "$agent") bytes)
$(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), Linux $(uname -r), $(ip -V), $(ss -V)
Median of $runs runs. CPU = user+sys. Load average (1, 5, 15 min) after each size: ${loads[*]}

Check-ins (native collector) against the contract server. Floor = a minimal sock_diag and
/proc/*/fd dump; dry-run = grapheon-agent --dry-run --collector native. Written = bytes written
to the state directory's filesystem by the run (ru_oublock); state.json = its size after the
full check-in.

| connections | floor CPU ms | dry-run CPU ms | dry-run / floor | dry-run peak RSS MiB | full CPU ms | full wall ms | full peak RSS MiB | full written MB | state.json MB | written / state.json | delta CPU ms | delta wall ms | delta peak RSS MiB | delta written KiB |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
EOF
printf '%s\n' "${checkins[@]}"
[ "$with_commands" = 1 ] || exit 0
cat <<EOF

Native collection against the command path. Ratios are native / commands (below 1: native is cheaper).

| connections | native CPU ms | native wall ms | native peak RSS MiB | commands CPU ms | commands wall ms | commands peak RSS MiB | CPU ratio | wall ratio | RSS ratio | agent --collector commands CPU ms | wall ms | peak RSS MiB |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
EOF
printf '%s\n' "${rows[@]}"
cat <<EOF

Each external command alone (median CPU ms / peak RSS MiB):

| connections | ip -json addr show | ip -json neigh show | ip -json route show | ss -tunapH |
|---:|---:|---:|---:|---:|
EOF
printf '%s\n' "${detail[@]}"
