#!/usr/bin/env bash
# The installed agent under a real systemd: boots a minimal Debian (systemd as PID 1) in a
# container and, inside it, serves the locally built release over HTTPS on the container's
# loopback, runs the README's curl-and-run install, and runs the service against the fake
# Graphēon server (tests/serve_contract.rs, also on the container's loopback only). Asserts
# registration, approval, a check-in accepted with socket owners, another user's listener in a
# network namespace made in the container (collected with its owner and in metadata.namespaces),
# the journal, the exposure score, upgrade, rollback, uninstall with and without purge, the
# --state-dir variant, and the .deb (timer enabled on install, the service checking in, state
# kept on remove, gone on purge).
#
#   DIST=dist bash tests/packaging/systemd.sh
#
# Needs root, debootstrap and systemd-nspawn (test-packaging.sh installs them). The Debian tree
# (debootstrap --variant=minbase of this machine's release, from the mirror this machine's apt
# uses) is cached under $PACKAGING_TOOLS_DIR and copied for each run; the container has a
# private network (loopback only) and is stopped and removed on exit, failed or not.
set -euo pipefail
# shellcheck source=tests/packaging/lib.sh
. "$(dirname "$0")/lib.sh"

DIST=$(cd "${DIST:-$REPO/dist}" && pwd)
VERSION=$(cat "$REPO/VERSION")
X86=x86_64-unknown-linux-musl
TARBALL="$DIST/grapheon-agent-$VERSION-$X86.tar.gz"
UPGRADE_VERSION=$VERSION-next.1
MAX_EXPOSURE=2.5
tools_dir=${PACKAGING_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/grapheon-packaging-tools}
# What the container needs beyond minbase: systemd as init, the README's download tools, and
# iproute2 for the network namespace of another user's process (ip netns, veth).
CONTAINER_PACKAGES=systemd,systemd-sysv,curl,ca-certificates,openssl,iproute2
ENROLLMENT_KEY=gaek_EXAMPLEonlyPackagingTest0000000000000000
WWW_PORT=8443
BASE=https://127.0.0.1:$WWW_PORT

if [ "$(id -u)" != 0 ]; then
	echo skip >>"$PACKAGING_RESULTS"
	echo "skip systemd/*: booting a container needs root"
	exit 0
fi
for tool in debootstrap systemd-nspawn nsenter; do
	command -v "$tool" >/dev/null || { echo "systemd.sh: $tool is missing (test-packaging.sh installs it)" >&2; exit 1; }
done
[ -f "$TARBALL" ] || { echo "no $TARBALL: run scripts/build-release.sh first" >&2; exit 1; }
DEB=$(ls "$DIST"/grapheon-agent_"${VERSION//-/\~}"-1_amd64.deb)

scratch=$(mktemp -d "${TMPDIR:-/var/tmp}/grapheon-systemd.XXXXXX")
nspawn_pid=''
cleanup() {
	if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
		# SIGTERM asks the container's systemd for an orderly shutdown; then no more waiting.
		kill -TERM "$nspawn_pid" 2>/dev/null || true
		for _ in $(seq 100); do
			kill -0 "$nspawn_pid" 2>/dev/null || break
			sleep 0.2
		done
		kill -KILL "$nspawn_pid" 2>/dev/null || true
		wait "$nspawn_pid" 2>/dev/null || true
	fi
	# The container's mounts live in its own namespace; any left on this tree would be ours.
	if [ -d "$scratch/root" ]; then
		findmnt -rn -o TARGET | grep -F "$scratch/root" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
	fi
	rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The URI of this machine's own apt source for its release (one-line or deb822 format).
debian_mirror() {
	local codename=$1 f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		awk -v s="$codename" '$1 == "deb" {
			i = 2
			if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
			if ($(i + 1) == s) { print $i; exit }
		}' "$f"
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk -v s="$codename" 'BEGIN { RS = ""; FS = "\n" } {
			types = ""; uris = ""; suites = ""
			for (i = 1; i <= NF; i++) {
				if ($i ~ /^Types:/) types = " " substr($i, 7) " "
				if ($i ~ /^URIs:/) uris = substr($i, 6)
				if ($i ~ /^Suites:/) suites = " " substr($i, 8) " "
			}
			gsub(/[ \t]+/, " ", suites); gsub(/[ \t]+/, " ", types)
			if (types ~ / deb / && suites ~ (" " s " ")) { split(uris, u, " "); print u[1]; exit }
		}' "$f"
	done
}

# The cached Debian tree for this machine's release, made once with debootstrap.
debian_tree() {
	local codename mirror key cache
	codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release | tr -d '"')
	[ -n "$codename" ] || { echo "no VERSION_CODENAME in /etc/os-release: not a Debian-like system" >&2; return 1; }
	key=$(printf '%s %s' "$codename" "$CONTAINER_PACKAGES" | sha256sum | cut -c1-12)
	cache="$tools_dir/debian-$codename-$key"
	if [ ! -x "$cache/rootfs/lib/systemd/systemd" ]; then
		mirror=$(debian_mirror "$codename" | head -n1)
		[ -n "$mirror" ] || { echo "no apt source for $codename in /etc/apt/sources.list{,.d}" >&2; return 1; }
		echo "debootstrap $codename from $mirror into $cache (once; later runs reuse it)" >&2
		rm -rf "$cache.tmp"
		mkdir -p "$cache.tmp"
		timeout 1200 debootstrap --variant=minbase --include="$CONTAINER_PACKAGES" "$codename" \
			"$cache.tmp/rootfs" "$mirror" >"$cache.tmp/debootstrap.log" 2>&1 || {
			tail -n 20 "$cache.tmp/debootstrap.log" >&2
			return 1
		}
		rm -rf "$cache"
		mv "$cache.tmp" "$cache"
	fi
	printf '%s\n' "$cache/rootfs"
}

# Runs a command inside the booted container (all its namespaces, its root), with a timeout.
inside() {
	timeout "${INSIDE_TIMEOUT:-120}" nsenter --target "$leader" --mount --uts --ipc --net --pid --cgroup \
		--root --wd -- /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		LANG=C.UTF-8 "$@"
}

# Boots the container in this shell (later tests need its leader pid). Runs under `if`, where
# set -e does not apply: every step says what failed and returns 1.
boot_container() {
	local tree state
	tree=$(debian_tree) || return 1
	C="$scratch/root"
	cp -a "$tree" "$C" || return 1
	# The release, as GitHub would serve it: releases/latest/download/install.sh and
	# releases/download/vX/..., under https://127.0.0.1:8443 with a test CA the container trusts.
	# shellcheck disable=SC2015 # any failing step leads to the message
	mkdir -p "$C/srv/www/latest/download" "$C/srv/www/download/v$VERSION" "$C/srv/contract" &&
		cp "$TARBALL" "$C/srv/www/download/v$VERSION/" &&
		(cd "$DIST" && grep -F " $(basename "$TARBALL")" SHA256SUMS) >"$C/srv/www/download/v$VERSION/SHA256SUMS" &&
		sign_test_release "$C/srv/www/download/v$VERSION" &&
		published_installer "$BASE/download/v$VERSION" >"$C/srv/www/latest/download/install.sh" &&
		make_upgrade_release "$C/srv/www/download/v$UPGRADE_VERSION" &&
		install -m 0644 "$REPO/tests/fixtures/tls/ca.pem" "$C/usr/local/share/ca-certificates/grapheon-test-ca.crt" &&
		install -m 0600 "$REPO/tests/fixtures/tls/server.pem" "$REPO/tests/fixtures/tls/server.key" "$C/srv/" &&
		install -m 0755 "$CONTRACT_SERVER" "$C/usr/local/bin/contract-server" || {
		echo "cannot fill the container's tree" >&2
		return 1
	}

	# Under timeout too: should this script be killed outright (no cleanup), the container still
	# stops by itself (timeout passes the SIGTERM of cleanup() on to nspawn as well).
	timeout --kill-after=30 1800 systemd-nspawn --quiet --register=no --keep-unit --private-network \
		--directory="$C" --machine="grapheon-test-$$" --boot --console=passive >"$scratch/nspawn.log" 2>&1 &
	nspawn_pid=$!
	leader=''
	for _ in $(seq 150); do
		leader=$(pgrep -P "$(pgrep -P "$nspawn_pid" -x systemd-nspawn || echo 0)" -x systemd || true)
		[ -n "$leader" ] && break
		kill -0 "$nspawn_pid" 2>/dev/null || break
		sleep 0.2
	done
	if [ -z "$leader" ]; then
		cat "$scratch/nspawn.log" >&2
		echo "the container did not start systemd" >&2
		return 1
	fi
	# Until its systemd answers at all (the bus socket appears a moment after PID 1 starts), then
	# until the boot is over.
	state=''
	for _ in $(seq 300); do
		state=$(INSIDE_TIMEOUT=90 inside systemctl is-system-running --wait 2>/dev/null) && break
		case $state in
		'' | offline | unknown) sleep 0.2 ;;
		*) break ;;
		esac
	done
	if [ "$state" != running ]; then
		inside systemctl --failed --no-pager >&2
		echo "the container's systemd is '$state', not running" >&2
		return 1
	fi
	inside update-ca-certificates >/dev/null || return 1
	# Both servers listen on the container's loopback only (its network is private anyway).
	inside systemd-run --quiet --unit=release-www --property=WorkingDirectory=/srv/www \
		openssl s_server -quiet -accept "127.0.0.1:$WWW_PORT" -cert /srv/server.pem -key /srv/server.key -WWW || return 1
	inside systemd-run --quiet --unit=contract-server --setenv=GRAPHEON_CONTRACT_SERVE_DIR=/srv/contract \
		--setenv=GRAPHEON_CONTRACT_ENROLLMENT_KEY="$ENROLLMENT_KEY" \
		/usr/local/bin/contract-server --exact served_fake_registers_approves_on_command_and_stops --nocapture || return 1
	# Listening (state 0A) on 127.0.0.1 (0100007F) at the release port, as the kernel sees it.
	for _ in $(seq 100); do
		[ -s "$C/srv/contract/url" ] &&
			inside grep -q "^ *[0-9]*: 0100007F:$(printf '%04X' "$WWW_PORT") 00000000:0000 0A " /proc/net/tcp && break
		sleep 0.1
	done
	SERVER_URL=$(cat "$C/srv/contract/url") || {
		inside journalctl -u contract-server --no-pager >&2
		echo "the contract server wrote no url" >&2
		return 1
	}
	echo "container leader pid $leader; release at $BASE; server at $SERVER_URL"
}

# install.sh as the release workflow publishes it (its stamping command, run as written there).
published_installer() {
	local stamp work
	stamp=$(grep -F "sed \"s|^" "$REPO/.github/workflows/release.yml" | sed 's/^ *//')
	work=$(mktemp -d "$scratch/stamp.XXXXXX")
	mkdir -p "$work/scripts" "$work/dist"
	# Trusting the test key this test release is signed with (the one change a test release has).
	stamp_test_key "$REPO/scripts/install.sh" "$work/scripts/install.sh" "$(public_key_b64 "$TEST_SIGNING_KEY")"
	(cd "$work" && BASE_URL=$1 eval "$stamp")
	cat "$work/dist/install.sh"
}

# A later release for the upgrade: the same files under another version, its binary a wrapper
# that reports that version and runs the real one.
make_upgrade_release() {
	local out=$1 work name
	work=$(mktemp -d "$scratch/upgrade.XXXXXX")
	tar -xzf "$TARBALL" -C "$work"
	name="grapheon-agent-$UPGRADE_VERSION-$X86"
	mv "$work/grapheon-agent-$VERSION-$X86" "$work/$name"
	echo "$UPGRADE_VERSION" >"$work/$name/VERSION"
	mv "$work/$name/grapheon-agent" "$work/$name/grapheon-agent.real"
	# shellcheck disable=SC2016 # expanded by the wrapper, not here
	printf '#!/bin/sh\n[ "$1" = --version ] && { echo %s; exit 0; }\nexec "$(dirname "$0")/grapheon-agent.real" "$@"\n' \
		"$UPGRADE_VERSION" >"$work/$name/grapheon-agent"
	chmod 755 "$work/$name/grapheon-agent"
	mkdir -p "$out"
	tar --sort=name --owner=0 --group=0 --format=ustar -C "$work" -cf - "$name" | gzip -n >"$out/$name.tar.gz"
	(cd "$out" && sha256sum "$name.tar.gz" >SHA256SUMS)
	sign_test_release "$out"
	rm -rf "$work"
}

# The README's install command with this test's release URL, key and server.
readme_install_command() {
	local cmd
	cmd=$(doc_block "$REPO/README.md" '^curl -fsSL https://github.com/')
	# docs/operating.md shows the same command.
	[ "$cmd" = "$(doc_block "$REPO/docs/operating.md" '^curl -fsSL https://github.com/')" ] ||
		fail "README.md and docs/operating.md show different install commands"
	cmd=${cmd//https:\/\/github.com\/<owner>\/grapheon-agent\/releases/$BASE}
	cmd=${cmd//<key>/$ENROLLMENT_KEY}
	cmd=${cmd//https:\/\/grapheon.example.net/$SERVER_URL}
	printf '%s %s\n' "$cmd" "$*"
}

# The agents file of the contract server once it holds $1 lines, within 10 s.
agents_with() {
	local count=$1
	for _ in $(seq 100); do
		[ "$(wc -l <"$C/srv/contract/agents")" -ge "$count" ] && break
		sleep 0.1
	done
	cat "$C/srv/contract/agents"
}

# Waits up to 10 s for a line of the server's checkins file matching the regular expression $1
# (the server refreshes its files every 50 ms), and prints how many lines match it.
wait_checkins() {
	for _ in $(seq 100); do
		grep -qE "$1" "$C/srv/contract/checkins" && break
		sleep 0.1
	done
	grep -cE "$1" "$C/srv/contract/checkins" || true
}

approve() {
	echo "$1" >"$C/srv/contract/.approve"
	mv "$C/srv/contract/.approve" "$C/srv/contract/approve"
	for _ in $(seq 100); do
		grep -qx "$1 active" "$C/srv/contract/agents" && return 0
		sleep 0.1
	done
	fail "the server did not approve $1"
}

# One run of the service, as the timer would start it; fails unless it exits 0.
run_service() {
	INSIDE_TIMEOUT=300 inside systemctl start grapheon-agent.service ||
		{ inside journalctl -u grapheon-agent.service --no-pager -n 30 || true; fail "the service failed"; }
	assert_eq "service result" "Result=success
ExecMainStatus=0" "$(inside systemctl show -p Result -p ExecMainStatus grapheon-agent.service)"
}

journal_since() {
	inside journalctl -u grapheon-agent.service -o cat --no-pager --since "@$1"
}

test_readme_install_under_systemd_enables_the_timer() {
	out=$(INSIDE_TIMEOUT=300 inside sh -c "$(readme_install_command)" 2>&1)
	echo "$out"
	assert_contains_line "installer output" "verified the signature of SHA256SUMS (ed25519 release key $(public_key_b64 "$TEST_SIGNING_KEY"))" "$out"
	assert_contains_line "installer output" "verified grapheon-agent-$VERSION-$X86.tar.gz (sha256 $(sha256sum "$TARBALL" | cut -d' ' -f1), listed in the signed SHA256SUMS)" "$out"
	assert_contains_line "installer output" "enabled grapheon-agent.timer" "$out"
	assert_eq "timer" "enabled
active" "$(inside systemctl is-enabled grapheon-agent.timer; inside systemctl is-active grapheon-agent.timer)"
	assert_eq "current" "releases/$VERSION" "$(readlink "$C/opt/grapheon/agent/current")"
	assert_mode "$C/etc/grapheon-agent.env" 600
}

test_service_registers_then_checks_in_with_socket_owners_once_approved() {
	local since uuid port key
	since=$(date +%s)
	run_service
	uuid=$(cat "$C/var/lib/grapheon-agent/agent_uuid")
	assert_eq "agents on the server" "$uuid pending" "$(agents_with 1)"
	assert_contains_line journal "grapheon-agent info: registered as $uuid; awaiting approval by an administrator on the server" "$(journal_since "$since")"
	approve "$uuid"
	since=$(date +%s)
	run_service
	journal=$(journal_since "$since")
	echo "$journal"
	key=$(cat "$C/var/lib/grapheon-agent/api_key")
	assert_contains_line journal "grapheon-agent info: API key ${key:0:8}… received and stored" "$journal"
	grep -qE '^grapheon-agent info: check-in accepted: [0-9]+ records sent \(full snapshot\), sequence number 1$' <<<"$journal" ||
		fail "no accepted check-in in the journal"
	! grep -qF "$key" <<<"$(inside journalctl --no-pager -o cat)" || fail "the API key is in the journal"
	# The fake server's own listener, owned by its process (another unit, other cgroup).
	port=${SERVER_URL##*:}
	server_pid=$(inside systemctl show -p MainPID --value contract-server.service)
	www_pid=$(inside systemctl show -p MainPID --value release-www.service)
	assert_eq "check-ins" 1 "$(wait_checkins "^checkin $uuid full_snapshot=true ")"
	checkins=$(cat "$C/srv/contract/checkins")
	echo "$checkins"
	assert_contains_line "the first check-in" "checkin $uuid full_snapshot=true connections=$(sed -n '1s/.*connections=//p' <<<"$checkins")" "$checkins"
	assert_contains_line "socket owners" "  tcp 127.0.0.1:$port listen contract-server $server_pid" "$checkins"
	assert_contains_line "socket owners" "  tcp 127.0.0.1:$WWW_PORT listen openssl $www_pid" "$checkins"
	assert_mode "$C/var/lib/grapheon-agent" 700
	assert_mode "$C/var/lib/grapheon-agent/api_key" 600
}

test_service_exposure_is_at_most_2_5() {
	out=$(inside systemd-analyze security --no-pager grapheon-agent.service)
	score=$(sed -n 's/.*Overall exposure level for grapheon-agent.service: \([0-9.]*\).*/\1/p' <<<"$out")
	echo "exposure $score"
	[ -n "$score" ] || { echo "$out"; fail "no exposure score"; }
	awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }' || fail "exposure $score is above $MAX_EXPOSURE"
}

# Another user's listener in a network namespace of its own, made inside the container: ip netns,
# a veth pair between it and the container's namespace (10.213.77.0/24, which exists only in
# there), and a TCP listener of uid 65534 (nobody) on the namespace's address. The service reads
# it through /proc/<pid>/ns/net and /proc/<pid>/net without entering the namespace; for another
# user's process that takes the unit's CAP_SYS_PTRACE, past ProtectProc=invisible.
NS_NAME=grapheon-other
NS_ADDR=10.213.77.2
NS_PEER_ADDR=10.213.77.1
NS_PORT=7411

# An IPv4 address as /proc/net/tcp shows it (the 32-bit value in host byte order, in hex).
proc_net_ipv4() {
	local a b c d
	IFS=. read -r a b c d <<<"$1"
	printf '%02X%02X%02X%02X' "$d" "$c" "$b" "$a"
}

remove_other_namespace() {
	inside systemctl stop ns-listener.service 2>/dev/null || true
	inside systemctl reset-failed ns-listener.service 2>/dev/null || true
	# Deleting the namespace destroys the veth pair with it.
	inside ip netns delete "$NS_NAME" 2>/dev/null || true
}

test_service_collects_another_users_listener_in_another_network_namespace() {
	local uuid pid since journal checkins last
	trap remove_other_namespace EXIT
	inside ip netns add "$NS_NAME"
	inside ip link add gv-host type veth peer name gv-ns netns "$NS_NAME"
	inside ip addr add "$NS_PEER_ADDR/24" dev gv-host
	inside ip link set gv-host up
	# No IPv6 link-local address: the namespace's addresses are then exactly the one given here.
	inside ip -n "$NS_NAME" link set gv-ns addrgenmode none
	inside ip -n "$NS_NAME" addr add "$NS_ADDR/24" dev gv-ns
	inside ip -n "$NS_NAME" link set gv-ns up
	inside ip -n "$NS_NAME" link set lo up
	# The listener's code in a file: systemd would expand the $ of an inline script.
	cat >"$C/srv/ns-listener.pl" <<'PERL'
# A TCP listener on the address and port given, held until the process is stopped.
use strict;
use Socket;
my ($addr, $port) = @ARGV;
socket(my $s, PF_INET, SOCK_STREAM, 0) or die "socket: $!\n";
bind($s, pack_sockaddr_in($port, inet_aton($addr))) or die "bind $addr:$port: $!\n";
listen($s, 16) or die "listen: $!\n";
sleep;
PERL
	chmod 0644 "$C/srv/ns-listener.pl"
	inside systemd-run --quiet --unit=ns-listener ip netns exec "$NS_NAME" \
		setpriv --reuid 65534 --regid 65534 --clear-groups perl /srv/ns-listener.pl "$NS_ADDR" "$NS_PORT"
	pid=''
	for _ in $(seq 100); do
		pid=$(inside systemctl show -p MainPID --value ns-listener.service)
		[ "${pid:-0}" != 0 ] &&
			inside grep -q "^ *[0-9]*: $(proc_net_ipv4 "$NS_ADDR"):$(printf '%04X' "$NS_PORT") 00000000:0000 0A " "/proc/$pid/net/tcp" &&
			break
		pid=''
		sleep 0.1
	done
	[ -n "$pid" ] || { inside journalctl -u ns-listener.service --no-pager >&2; fail "the listener in $NS_NAME did not start"; }
	assert_eq "the listener's uid" 65534 "$(inside stat -c %u "/proc/$pid")"
	[ "$(inside readlink "/proc/$pid/ns/net")" != "$(inside readlink /proc/1/ns/net)" ] ||
		fail "the listener is in the container's own network namespace"
	uuid=$(cat "$C/var/lib/grapheon-agent/agent_uuid")
	since=$(date +%s)
	run_service
	journal=$(journal_since "$since")
	echo "$journal"
	assert_eq "check-ins holding the listener" 1 "$(wait_checkins "^  tcp $NS_ADDR:$NS_PORT listen perl $pid\$")"
	checkins=$(cat "$C/srv/contract/checkins")
	echo "$checkins"
	# The last check-in (this run's), from its header line on.
	last=$(awk '$1 == "checkin" { block = "" } { block = block $0 "\n" } END { printf "%s", block }' <<<"$checkins")
	grep -q "^checkin $uuid full_snapshot=" <<<"$last" || fail "the last check-in is not this agent's"
	assert_contains_line "the check-in's connections" "  tcp $NS_ADDR:$NS_PORT listen perl $pid" "$last"
	assert_contains_line "the check-in's metadata.namespaces.list" "  namespace $pid perl systemd ns-listener.service $NS_ADDR" "$last"
	! grep -qF "cannot read this process's network namespace" <<<"$journal" ||
		fail "the service could not read its own network namespace"
}

test_upgrade_then_rollback_keep_the_service_working() {
	local before
	before=$(grep -c '^checkin ' "$C/srv/contract/checkins")
	out=$(INSIDE_TIMEOUT=300 inside sh /opt/grapheon/agent/current/scripts/upgrade.sh --base-url "$BASE/download/v$UPGRADE_VERSION" 2>&1)
	echo "$out"
	assert_contains_line "upgrade output" "upgraded grapheon-agent $VERSION -> $UPGRADE_VERSION (release $VERSION is kept)" "$out"
	assert_eq "current" "releases/$UPGRADE_VERSION" "$(readlink "$C/opt/grapheon/agent/current")"
	assert_eq "version the service runs" "$UPGRADE_VERSION" "$(inside /usr/local/bin/grapheon-agent --version)"
	inside systemctl is-active --quiet grapheon-agent.timer || fail "the timer stopped"
	run_service
	out=$(inside sh /opt/grapheon/agent/current/scripts/rollback.sh "$VERSION" 2>&1)
	echo "$out"
	assert_contains_line "rollback output" "rolled back grapheon-agent $UPGRADE_VERSION -> $VERSION" "$out"
	assert_eq "version the service runs" "$VERSION" "$(inside /usr/local/bin/grapheon-agent --version)"
	run_service
	for _ in $(seq 100); do
		[ "$(grep -c '^checkin ' "$C/srv/contract/checkins")" -ge $((before + 2)) ] && break
		sleep 0.1
	done
	assert_eq "check-ins after upgrade and rollback" $((before + 2)) "$(grep -c '^checkin ' "$C/srv/contract/checkins")"
}

test_uninstall_keeps_state_and_config() {
	state_before=$(tree_snapshot "$C/var/lib/grapheon-agent")
	out=$(inside sh /opt/grapheon/agent/current/scripts/uninstall.sh 2>&1)
	echo "$out"
	assert_eq "grapheon units left" "" "$(inside systemctl list-unit-files --no-legend 'grapheon-agent*')"
	assert_absent "$C/opt/grapheon"
	assert_absent "$C/usr/local/bin/grapheon-agent"
	assert_eq "state" "$state_before" "$(tree_snapshot "$C/var/lib/grapheon-agent")"
	assert_mode "$C/etc/grapheon-agent.env" 600
}

test_state_dir_variant_runs_under_protect_system_strict() {
	local since uuid first
	first=$(cat "$C/var/lib/grapheon-agent/agent_uuid")
	out=$(INSIDE_TIMEOUT=300 inside sh -c "$(readme_install_command --state-dir /srv/agent-state)" 2>&1)
	echo "$out"
	# The env file kept from the first install does not name this directory: said so.
	assert_contains_line "installer output" "grapheon-agent install: warning: /etc/grapheon-agent.env does not set GRAPHEON_AGENT_STATE_DIR, so runs by hand use /var/lib/grapheon-agent while the service uses /srv/agent-state: add GRAPHEON_AGENT_STATE_DIR=/srv/agent-state to /etc/grapheon-agent.env" "$out"
	since=$(date +%s)
	run_service
	uuid=$(cat "$C/srv/agent-state/agent_uuid")
	[ "$uuid" != "$first" ] || fail "the state-dir install reused the first identity"
	assert_eq "agents on the server" "$first active
$uuid pending" "$(agents_with 2)"
	approve "$uuid"
	run_service
	assert_eq "check-ins from the state-dir agent" 1 "$(wait_checkins "^checkin $uuid full_snapshot=true ")"
	assert_mode "$C/srv/agent-state" 700
	[ -s "$C/srv/agent-state/api_key" ] || fail "no API key in /srv/agent-state"
}

test_uninstall_with_purge_removes_state_and_config() {
	out=$(inside sh /opt/grapheon/agent/current/scripts/uninstall.sh --purge-state --purge-config 2>&1)
	echo "$out"
	assert_contains_line "uninstall output" "removed the state directory /srv/agent-state" "$out"
	assert_absent "$C/srv/agent-state"
	assert_absent "$C/etc/grapheon-agent.env"
	assert_eq "grapheon units left" "" "$(inside systemctl list-unit-files --no-legend 'grapheon-agent*')"
	assert_absent "$C/opt/grapheon"
}

# The .deb on the same container: it reuses the identity the first install left in
# /var/lib/grapheon-agent (kept by the uninstall without purge), so it checks in at once.
test_deb_enables_the_timer_and_its_service_checks_in() {
	local deb uuid before
	deb=$(basename "$DEB")
	cp "$DEB" "$C/srv/$deb"
	uuid=$(cat "$C/var/lib/grapheon-agent/agent_uuid")
	out=$(INSIDE_TIMEOUT=300 inside dpkg -i "/srv/$deb" 2>&1)
	echo "$out"
	assert_eq "timer" "enabled
active" "$(inside systemctl is-enabled grapheon-agent.timer; inside systemctl is-active grapheon-agent.timer)"
	assert_contains_line "dpkg output" "grapheon-agent: set GRAPHEON_AGENT_SERVER_URL and GRAPHEON_AGENT_ENROLLMENT_KEY in /etc/grapheon-agent.env;" "$out"
	assert_mode "$C/etc/grapheon-agent.env" 600
	assert_eq "ExecStart" "ExecStart=/usr/bin/grapheon-agent --config /etc/grapheon-agent.env" \
		"$(inside systemctl cat grapheon-agent.service | grep '^ExecStart=')"
	# What an operator does next: the server URL in the env file, then the timer (or a run now).
	sed -i "s|^#GRAPHEON_AGENT_SERVER_URL=.*|GRAPHEON_AGENT_SERVER_URL=$SERVER_URL|" "$C/etc/grapheon-agent.env"
	before=$(grep -c "^checkin $uuid " "$C/srv/contract/checkins")
	run_service
	for _ in $(seq 100); do
		[ "$(grep -c "^checkin $uuid " "$C/srv/contract/checkins")" -gt "$before" ] && break
		sleep 0.1
	done
	assert_eq "check-ins of the kept identity" $((before + 1)) "$(grep -c "^checkin $uuid " "$C/srv/contract/checkins")"
	score=$(inside systemd-analyze security --no-pager grapheon-agent.service |
		sed -n 's/.*Overall exposure level for grapheon-agent.service: \([0-9.]*\).*/\1/p')
	awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s != "" && s <= m) }' || fail "exposure '$score' of the .deb's unit"
}

test_deb_remove_keeps_state_and_purge_removes_it() {
	state_before=$(tree_snapshot "$C/var/lib/grapheon-agent")
	INSIDE_TIMEOUT=300 inside dpkg -r grapheon-agent
	assert_eq "grapheon units left" "" "$(inside systemctl list-unit-files --no-legend 'grapheon-agent*')"
	assert_absent "$C/usr/bin/grapheon-agent"
	assert_eq "state after remove" "$state_before" "$(tree_snapshot "$C/var/lib/grapheon-agent")"
	assert_mode "$C/etc/grapheon-agent.env" 600
	INSIDE_TIMEOUT=300 inside dpkg -P grapheon-agent
	assert_absent "$C/var/lib/grapheon-agent"
	assert_absent "$C/etc/grapheon-agent.env"
	# shellcheck disable=SC2016 # a dpkg-query format, not a shell expansion
	assert_eq "dpkg status" "" "$(inside dpkg-query -W -f='${Status}' grapheon-agent 2>/dev/null || true)"
}

# The fake server: the test binary of tests/serve_contract.rs, as cargo built it.
CONTRACT_SERVER=$(cd "$REPO" && cargo test --locked --test serve_contract --no-run --message-format=json 2>/dev/null |
	grep -F '"name":"serve_contract"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
[ -x "$CONTRACT_SERVER" ] || { echo "systemd.sh: could not build tests/serve_contract.rs" >&2; exit 1; }

boot_started=$(date +%s)
if boot_container >"$PACKAGING_LOGS/systemd_boot.log" 2>&1; then
	echo pass >>"$PACKAGING_RESULTS"
	echo "ok   systemd/container_boots ($(($(date +%s) - boot_started)) s)"
else
	echo fail >>"$PACKAGING_RESULTS"
	echo "FAIL systemd/container_boots; its output:"
	sed 's/^/    | /' "$PACKAGING_LOGS/systemd_boot.log"
	exit 1
fi
# In this order: each test starts from what the one before left.
for t in readme_install_under_systemd_enables_the_timer \
	service_registers_then_checks_in_with_socket_owners_once_approved service_exposure_is_at_most_2_5 \
	service_collects_another_users_listener_in_another_network_namespace \
	upgrade_then_rollback_keep_the_service_working uninstall_keeps_state_and_config \
	state_dir_variant_runs_under_protect_system_strict uninstall_with_purge_removes_state_and_config \
	deb_enables_the_timer_and_its_service_checks_in deb_remove_keeps_state_and_purge_removes_it; do
	run_test "systemd/$t" "test_$t"
done
