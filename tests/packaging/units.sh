#!/usr/bin/env bash
# systemd unit tests: `systemd-analyze verify` is clean on the units as install.sh writes them, the
# service's offline exposure score is at most 2.5, and the timer sets nothing that does nothing.
#
# verify checks that ExecStart= exists, so the units are verified inside a temporary root that
# install.sh filled from the real x86_64 tarball, with `--root`; that root also gets a copy of
# this machine's own system units, which the targets our units name (sysinit, timers,
# network-online) come from.
#
#   DIST=dist bash tests/packaging/units.sh
set -euo pipefail
# shellcheck source=tests/packaging/lib.sh
. "$(dirname "$0")/lib.sh"

DIST=$(cd "${DIST:-$REPO/dist}" && pwd)
VERSION=$(cat "$REPO/VERSION")
TARBALL="$DIST/grapheon-agent-$VERSION-x86_64-unknown-linux-musl.tar.gz"
MAX_EXPOSURE=2.5
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
SCRIPTS="$scratch/scripts"
make_test_scripts "$SCRIPTS"

system_unit_dir() {
	local d
	for d in /usr/lib/systemd/system /lib/systemd/system; do
		[ -f "$d/sysinit.target" ] && { echo "$d"; return; }
	done
	return 1
}

# A root with the host's system units and our units installed by install.sh ($@ = its options).
installed_root() {
	R=$(mktemp -d "$scratch/root.XXXXXX")
	mkdir -p "$R/run/systemd/system" "$R/usr/lib/systemd"
	cp -R "$(system_unit_dir)" "$R/usr/lib/systemd/system"
	FAKE_SYSTEMCTL_LOG="$R.log" FAKE_SYSTEMCTL_STATE="$R.state" \
		dash "$SCRIPTS/install.sh" --root "$R" --systemctl "$REPO/tests/packaging/fake-systemctl" \
		--tarball "$TARBALL" --server-url https://grapheon.test "$@" >/dev/null
}

verify_clean() {
	local unit_dir=$1 out status=0
	out=$(systemd-analyze verify --root="$R" "$unit_dir/grapheon-agent.service" "$unit_dir/grapheon-agent.timer" 2>&1) || status=$?
	printf '%s\n' "$out"
	[ $status -eq 0 ] || fail "systemd-analyze verify exited $status"
	[ -z "$out" ] || fail "systemd-analyze verify printed warnings"
}

test_installed_units_verify_clean() {
	installed_root
	assert_same_file "$REPO/deploy/grapheon-agent.service" "$R/etc/systemd/system/grapheon-agent.service"
	verify_clean /etc/systemd/system
}

test_units_with_moved_paths_verify_clean() {
	installed_root --prefix /srv/ga --env-file /etc/ga.env --state-dir /srv/ga-state
	verify_clean /etc/systemd/system
}

test_verify_notices_a_missing_binary() {
	installed_root
	rm "$R/opt/grapheon/agent/current"
	if systemd-analyze verify --root="$R" /etc/systemd/system/grapheon-agent.service >/dev/null 2>&1; then
		fail "verify passed without the ExecStart binary: the root is not what it checks"
	fi
}

test_service_exposure_is_at_most_2_5() {
	local out score
	out=$(systemd-analyze security --offline=true "$REPO/deploy/grapheon-agent.service" 2>&1)
	printf '%s\n' "$out" | grep -E '✗|Overall'
	score=$(sed -n 's/.*Overall exposure level for grapheon-agent.service: \([0-9.]*\).*/\1/p' <<<"$out")
	[ -n "$score" ] || fail "no exposure score in the output"
	echo "exposure score: $score (target <= $MAX_EXPOSURE)"
	awk -v s="$score" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(s <= max) }' || fail "exposure $score > $MAX_EXPOSURE"
}

test_service_runs_current_binary_with_its_config_file() {
	local unit="$REPO/deploy/grapheon-agent.service"
	assert_eq "ExecStart" "ExecStart=/opt/grapheon/agent/current/grapheon-agent --config /etc/grapheon-agent.env" \
		"$(grep '^ExecStart=' "$unit")"
	assert_eq "Type" "Type=oneshot" "$(grep '^Type=' "$unit")"
	# Secrets stay in the file the agent reads itself, out of the unit's environment.
	! grep -qE '^(Environment|EnvironmentFile)=' "$unit" || fail "the unit passes configuration through the environment"
	# RuntimeMaxSec= has no effect on Type=oneshot; TimeoutStartSec= bounds the run.
	grep -qE '^TimeoutStartSec=[1-9]' "$unit" || fail "no start timeout"
	! grep -q '^RuntimeMaxSec=' "$unit" || fail "RuntimeMaxSec= does nothing for a oneshot"
	assert_eq "capabilities" "CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_SYS_PTRACE" "$(grep '^CapabilityBoundingSet=' "$unit")"
	assert_eq "address families" "RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX" "$(grep '^RestrictAddressFamilies=' "$unit")"
}

test_timer_sets_no_option_that_does_nothing() {
	local timer="$REPO/deploy/grapheon-agent.timer"
	for key in OnBootSec OnUnitActiveSec RandomizedDelaySec; do
		grep -qE "^$key=[1-9]" "$timer" || fail "timer lacks $key="
	done
	if grep -q '^Persistent=' "$timer" && ! grep -q '^OnCalendar=' "$timer"; then
		fail "Persistent= has no effect without OnCalendar="
	fi
	assert_eq "period" "OnUnitActiveSec=15min" "$(grep '^OnUnitActiveSec=' "$timer")"
}

command -v systemd-analyze >/dev/null || { echo "systemd-analyze is not installed" >&2; exit 1; }
for t in $(declare -F | awk '$3 ~ /^test_/ { print $3 }'); do
	run_test "units/${t#test_}" "$t"
done
