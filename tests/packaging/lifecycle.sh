#!/usr/bin/env bash
# Installer lifecycle tests: install, re-install, upgrade, rollback, uninstall, refusals, under
# BusyBox sh (with only BusyBox applets on PATH) and under dash, each in a temporary root with a
# fake systemctl. Needs the x86_64 and aarch64 tarballs of build-release.sh in $DIST.
#
#   DIST=dist bash tests/packaging/lifecycle.sh [busybox|dash ...]
set -euo pipefail
# shellcheck source=tests/packaging/lib.sh
. "$(dirname "$0")/lib.sh"

DIST=$(cd "${DIST:-$REPO/dist}" && pwd)
VERSION=$(cat "$REPO/VERSION")
X86=x86_64-unknown-linux-musl
ARM64=aarch64-unknown-linux-musl
REAL_TARBALL="$DIST/grapheon-agent-$VERSION-$X86.tar.gz"
[ -f "$REAL_TARBALL" ] || { echo "no $REAL_TARBALL: run scripts/build-release.sh first" >&2; exit 1; }

scratch=$(mktemp -d)
server_pid=''
cleanup() {
	[ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
	[ -z "${redirect_pid:-}" ] || kill "$redirect_pid" 2>/dev/null || true
	rm -rf "$scratch"
}
trap cleanup EXIT

# BusyBox's applets as the whole userland, so no GNU tool hides a missing BusyBox feature.
BUSYBOX=$(command -v busybox)
BB_BIN="$scratch/busybox-bin"
mkdir -p "$BB_BIN"
"$BUSYBOX" --install -s "$BB_BIN"
# The lifecycle scripts as a test release packs them: trusting the test signing key.
SCRIPTS="$scratch/scripts"
make_test_scripts "$SCRIPTS"
FAKE_BIN="$scratch/fake-bin"
mkdir -p "$FAKE_BIN"
cp "$REPO/tests/packaging/fake-systemctl" "$FAKE_BIN/systemctl"

# A release with the real tarball's layout under another version; its binary reports that version
# (a wrapper around the real one) unless binary=stale keeps the real binary, as a release packed
# from a stale target directory would. "variant" changes a unit, as a release that ships an
# updated unit would.
make_release() {
	local version=$1 out=$2 variant=${3:-} binary=${4:-matching} work name
	work=$(mktemp -d "$scratch/mk.XXXXXX")
	gzip -dc "$REAL_TARBALL" | tar -xf - -C "$work"
	name="grapheon-agent-$version-$X86"
	if [ "$version" != "$VERSION" ]; then
		mv "$work/grapheon-agent-$VERSION-$X86" "$work/$name"
		if [ "$binary" = matching ]; then
			mv "$work/$name/grapheon-agent" "$work/$name/grapheon-agent.real"
			# shellcheck disable=SC2016 # expanded by the wrapper, not here
			printf '#!/bin/sh\n[ "$1" = --version ] && { echo %s; exit 0; }\nexec "$(dirname "$0")/grapheon-agent.real" "$@"\n' \
				"$version" >"$work/$name/grapheon-agent"
			chmod 755 "$work/$name/grapheon-agent"
		fi
	fi
	echo "$version" >"$work/$name/VERSION"
	if [ -n "$variant" ]; then
		echo "# $variant" >>"$work/$name/deploy/grapheon-agent.service"
	fi
	mkdir -p "$out"
	tar --sort=name --owner=0 --group=0 --format=ustar -C "$work" -cf - "$name" | gzip -n >"$out/$name.tar.gz"
	(cd "$out" && sha256sum ./*.tar.gz | sed 's| \./| |' >SHA256SUMS)
	sign_test_release "$out"
	rm -rf "$work"
}

make_release 99.0.0 "$scratch/rel-99.0.0" "release 99.0.0 unit"
make_release "$VERSION" "$scratch/rel-$VERSION-rebuilt" "rebuilt with another unit"
make_release 98.0.0 "$scratch/rel-98.0.0-stale" "" stale
# What a download directory holds: only SHA256SUMS and the tarballs.
mkdir -p "$scratch/www"
cp "$scratch/rel-99.0.0"/* "$scratch/www/"

DASH=$(command -v dash)

# Runs a lifecycle script with the shell under test, in root $R, with the fake systemctl
# (PATH_UNDER_TEST, when set, is the whole PATH it runs with).
run_script() {
	local script=$1
	shift
	case $SHELL_UNDER_TEST in
	busybox) env PATH="${PATH_UNDER_TEST:-$FAKE_BIN:$BB_BIN}" "$BUSYBOX" sh "$script" "$@" ;;
	dash) env PATH="${PATH_UNDER_TEST:-$FAKE_BIN:$PATH}" "$DASH" "$script" "$@" ;;
	esac
}

installer() {
	GRAPHEON_INSTALL_ROOT=$R GRAPHEON_INSTALL_SYSTEMCTL=systemctl \
		FAKE_SYSTEMCTL_LOG="$R.systemctl.log" FAKE_SYSTEMCTL_STATE="$R.systemctl.state" \
		run_script "$@"
}

new_root() {
	R=$(mktemp -d "$scratch/root.XXXXXX")
	if [ "${1:-systemd}" = systemd ]; then
		mkdir -p "$R/run/systemd/system"
	fi
}

systemctl_calls() {
	cat "$R.systemctl.log" 2>/dev/null || true
	rm -f "$R.systemctl.log"
}

OPT=opt/grapheon/agent

expected_env_file() {
	sed -e "s|^#GRAPHEON_AGENT_SERVER_URL=.*|GRAPHEON_AGENT_SERVER_URL=$1|" \
		-e "s|^#GRAPHEON_AGENT_ENROLLMENT_KEY=.*|GRAPHEON_AGENT_ENROLLMENT_KEY=$2|" \
		"$REPO/deploy/grapheon-agent.env.example"
}

# The state an agent would have written, to prove upgrades and rollbacks leave it alone.
seed_state() {
	echo 0f0e0d0c-1111-4222-8333-444455556666 >"$R/var/lib/grapheon-agent/agent_uuid"
	(umask 077 && echo gpak_EXAMPLEonly >"$R/var/lib/grapheon-agent/api_key")
	(umask 077 && echo '{"sequence_number":7}' >"$R/var/lib/grapheon-agent/state.json")
}

installed_fresh() {
	new_root
	GRAPHEON_AGENT_ENROLLMENT_KEY=enroll-EXAMPLEonly installer "$SCRIPTS/install.sh" \
		--tarball "$REAL_TARBALL" --server-url https://grapheon.test >/dev/null
	systemctl_calls >/dev/null
}

test_install_creates_layout_config_state_and_units() {
	new_root
	out=$(GRAPHEON_AGENT_ENROLLMENT_KEY=enroll-EXAMPLEonly installer "$SCRIPTS/install.sh" \
		--tarball "$REAL_TARBALL" --server-url https://grapheon.test)
	echo "$out"
	assert_eq "current" "releases/$VERSION" "$(readlink "$R/$OPT/current")"
	assert_same_file "$TARGET_DIR/$X86/release/grapheon-agent" "$R/$OPT/releases/$VERSION/grapheon-agent"
	assert_mode "$R/$OPT/releases/$VERSION/grapheon-agent" 755
	assert_eq "command link" /opt/grapheon/agent/current/grapheon-agent "$(readlink "$R/usr/local/bin/grapheon-agent")"
	assert_eq "env file" "$(expected_env_file https://grapheon.test enroll-EXAMPLEonly)" "$(cat "$R/etc/grapheon-agent.env")"
	assert_mode "$R/etc/grapheon-agent.env" 600
	assert_mode "$R/var/lib/grapheon-agent" 700
	assert_same_file "$REPO/deploy/grapheon-agent.service" "$R/etc/systemd/system/grapheon-agent.service"
	assert_same_file "$REPO/deploy/grapheon-agent.timer" "$R/etc/systemd/system/grapheon-agent.timer"
	assert_eq "systemctl calls" "daemon-reload
is-enabled --quiet grapheon-agent.timer
enable grapheon-agent.timer
is-active --quiet grapheon-agent.timer
start grapheon-agent.timer" "$(systemctl_calls)"
	assert_contains_line output "grapheon-agent $VERSION is installed" "$out"
}

test_existing_open_env_file_is_kept_with_a_warning() {
	new_root
	mkdir -p "$R/etc"
	echo GRAPHEON_AGENT_SERVER_URL=https://earlier.test >"$R/etc/grapheon-agent.env"
	chmod 644 "$R/etc/grapheon-agent.env"
	out=$(installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --server-url https://grapheon.test 2>&1)
	echo "$out"
	assert_eq "env file" GRAPHEON_AGENT_SERVER_URL=https://earlier.test "$(cat "$R/etc/grapheon-agent.env")"
	assert_mode "$R/etc/grapheon-agent.env" 644
	assert_contains_line output "grapheon-agent install: warning: /etc/grapheon-agent.env can be read by other users and may hold the enrollment key: chmod 600 it" "$out"
	assert_contains_line output "/etc/grapheon-agent.env exists and is left as it is: edit it to change the server URL or key" "$out"
}

test_reinstall_changes_nothing() {
	installed_fresh
	before=$(tree_snapshot "$R")
	out=$(installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --server-url https://other.test)
	echo "$out"
	assert_eq "tree after re-install" "$before" "$(tree_snapshot "$R")"
	assert_eq "systemctl calls" "is-enabled --quiet grapheon-agent.timer
is-active --quiet grapheon-agent.timer" "$(systemctl_calls)"
	assert_contains_line output "nothing to do: grapheon-agent $VERSION is installed and current" "$out"
}

test_upgrade_keeps_previous_config_and_state_and_prints_rollback() {
	installed_fresh
	seed_state
	echo GRAPHEON_AGENT_LOG_LEVEL=debug >>"$R/etc/grapheon-agent.env"
	env_before=$(cat "$R/etc/grapheon-agent.env")
	state_before=$(tree_snapshot "$R/var/lib/grapheon-agent")
	old_release=$(tree_snapshot "$R/$OPT/releases/$VERSION")
	out=$(installer "$R/$OPT/current/scripts/upgrade.sh" --tarball "$scratch/rel-99.0.0/grapheon-agent-99.0.0-$X86.tar.gz")
	echo "$out"
	assert_eq "current" releases/99.0.0 "$(readlink "$R/$OPT/current")"
	assert_eq "previous release" "$old_release" "$(tree_snapshot "$R/$OPT/releases/$VERSION")"
	assert_eq "env file" "$env_before" "$(cat "$R/etc/grapheon-agent.env")"
	assert_mode "$R/etc/grapheon-agent.env" 600
	assert_eq "state" "$state_before" "$(tree_snapshot "$R/var/lib/grapheon-agent")"
	assert_same_file "$R/$OPT/releases/99.0.0/deploy/grapheon-agent.service" "$R/etc/systemd/system/grapheon-agent.service"
	assert_eq "systemctl calls" "daemon-reload
is-enabled --quiet grapheon-agent.timer
is-active --quiet grapheon-agent.timer" "$(systemctl_calls)"
	assert_contains_line output "upgraded grapheon-agent $VERSION -> 99.0.0 (release $VERSION is kept)" "$out"
	assert_contains_line output "to roll back: sh /opt/grapheon/agent/current/scripts/rollback.sh $VERSION" "$out"
}

test_tarball_whose_binary_is_another_version_is_refused() {
	new_root
	tarball="$scratch/rel-98.0.0-stale/grapheon-agent-98.0.0-$X86.tar.gz"
	expect_failure installer "$SCRIPTS/install.sh" --tarball "$tarball" --server-url https://grapheon.test
	assert_contains_line output "grapheon-agent install: error: $(basename "$tarball") holds a binary that says it is version '$VERSION', not 98.0.0: refusing to install it" "$out"
	assert_eq "files written" "$(printf '%s\n' '. -> ' './run -> ' './run/systemd -> ' './run/systemd/system -> ' | sort)" \
		"$(cd "$R" && find . -printf '%p -> %l\n' | sort)"
	assert_eq "systemctl calls" "" "$(systemctl_calls)"
}

# Hardened hosts mount /tmp noexec: the version is then checked on the installed copy.
test_version_is_checked_after_installing_where_tmp_is_noexec() {
	new_root
	noexec=$(mktemp -d "$scratch/noexec.XXXXXX")
	mount -t tmpfs -o noexec,size=64m tmpfs "$noexec"
	status=0
	(
		out=$(TMPDIR=$noexec installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --server-url https://grapheon.test 2>&1)
		echo "$out"
		assert_contains_line output "cannot run programs in $noexec (noexec?): checking the version once installed" "$out"
		assert_eq "current" "releases/$VERSION" "$(readlink "$R/$OPT/current")"
		tarball="$scratch/rel-98.0.0-stale/grapheon-agent-98.0.0-$X86.tar.gz"
		TMPDIR=$noexec expect_failure installer "$SCRIPTS/install.sh" --tarball "$tarball"
		assert_contains_line output "grapheon-agent install: error: $(basename "$tarball") holds a binary that says it is version '$VERSION', not 98.0.0: refusing to install it" "$out"
		assert_absent "$R/$OPT/releases/98.0.0"
		assert_eq "current" "releases/$VERSION" "$(readlink "$R/$OPT/current")"
	) || status=$?
	umount "$noexec"
	return $status
}

test_state_dir_reaches_the_agent_through_unit_and_env_file() {
	new_root
	installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --state-dir /srv/ga-state \
		--server-url https://grapheon.test >/dev/null
	unit="$R/etc/systemd/system/grapheon-agent.service"
	assert_eq "unit lines naming the state directory" "ReadWritePaths=/srv/ga-state
Environment=GRAPHEON_AGENT_STATE_DIR=/srv/ga-state" "$(grep -E '^(ReadWritePaths|Environment|StateDirectory)' "$unit")"
	assert_eq "env file" "$(sed -e 's|^#GRAPHEON_AGENT_SERVER_URL=.*|GRAPHEON_AGENT_SERVER_URL=https://grapheon.test|' \
		-e 's|^#GRAPHEON_AGENT_STATE_DIR=.*|GRAPHEON_AGENT_STATE_DIR=/srv/ga-state|' \
		"$REPO/deploy/grapheon-agent.env.example")" "$(cat "$R/etc/grapheon-agent.env")"
	assert_mode "$R/srv/ga-state" 700
	systemctl_calls >/dev/null
	# An upgrade without --state-dir keeps the directory of the installed unit.
	installer "$R/$OPT/current/scripts/upgrade.sh" --tarball "$scratch/rel-99.0.0/grapheon-agent-99.0.0-$X86.tar.gz" >/dev/null
	assert_eq "unit lines after the upgrade" "ReadWritePaths=/srv/ga-state
Environment=GRAPHEON_AGENT_STATE_DIR=/srv/ga-state" "$(grep -E '^(ReadWritePaths|Environment|StateDirectory)' "$unit")"
	out=$(installer "$R/$OPT/current/scripts/uninstall.sh" --purge-state)
	assert_contains_line output "removed the state directory /srv/ga-state" "$out"
	assert_absent "$R/srv/ga-state"
}

test_env_file_naming_another_state_dir_is_reported() {
	new_root
	mkdir -p "$R/etc"
	(umask 077 && printf '%s\n' GRAPHEON_AGENT_SERVER_URL=https://earlier.test \
		"export GRAPHEON_AGENT_STATE_DIR='/var/lib/elsewhere'" >"$R/etc/grapheon-agent.env")
	out=$(installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --state-dir /srv/ga-state 2>&1)
	echo "$out"
	assert_contains_line output "grapheon-agent install: warning: /etc/grapheon-agent.env sets GRAPHEON_AGENT_STATE_DIR=/var/lib/elsewhere but this install uses /srv/ga-state: the service uses /srv/ga-state (set in its unit); edit /etc/grapheon-agent.env so that both agree" "$out"
	echo GRAPHEON_AGENT_SERVER_URL=https://earlier.test >"$R/etc/grapheon-agent.env"
	out=$(installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --state-dir /srv/ga-state 2>&1)
	assert_contains_line output "grapheon-agent install: warning: /etc/grapheon-agent.env does not set GRAPHEON_AGENT_STATE_DIR, so runs by hand use /var/lib/grapheon-agent while the service uses /srv/ga-state: add GRAPHEON_AGENT_STATE_DIR=/srv/ga-state to /etc/grapheon-agent.env" "$out"
	echo GRAPHEON_AGENT_STATE_DIR=/srv/ga-state >>"$R/etc/grapheon-agent.env"
	out=$(installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --state-dir /srv/ga-state 2>&1)
	if grep -v 'TEST signing key' <<<"$out" | grep -q warning; then
		printf '%s\n' "$out" >&2
		fail "a warning for an env file that agrees"
	fi
}

test_upgrade_requires_an_installed_agent() {
	new_root
	expect_failure installer "$SCRIPTS/upgrade.sh" --tarball "$scratch/rel-99.0.0/grapheon-agent-99.0.0-$X86.tar.gz"
	assert_contains_line output "grapheon-agent upgrade: error: grapheon-agent is not installed in /opt/grapheon/agent: use install.sh" "$out"
	assert_absent "$R/$OPT"
}

test_rollback_switches_current_and_units_back() {
	installed_fresh
	seed_state
	installer "$SCRIPTS/upgrade.sh" --tarball "$scratch/rel-99.0.0/grapheon-agent-99.0.0-$X86.tar.gz" >/dev/null
	systemctl_calls >/dev/null
	env_before=$(cat "$R/etc/grapheon-agent.env")
	state_before=$(tree_snapshot "$R/var/lib/grapheon-agent")
	out=$(installer "$R/$OPT/current/scripts/rollback.sh" "$VERSION")
	echo "$out"
	assert_eq "current" "releases/$VERSION" "$(readlink "$R/$OPT/current")"
	assert_same_file "$REPO/deploy/grapheon-agent.service" "$R/etc/systemd/system/grapheon-agent.service"
	assert_eq "systemctl calls" daemon-reload "$(systemctl_calls)"
	assert_eq "env file" "$env_before" "$(cat "$R/etc/grapheon-agent.env")"
	assert_eq "state" "$state_before" "$(tree_snapshot "$R/var/lib/grapheon-agent")"
	assert_contains_line output "rolled back grapheon-agent 99.0.0 -> $VERSION" "$out"
	assert_contains_line output "to undo: sh /opt/grapheon/agent/current/scripts/rollback.sh 99.0.0" "$out"
	[ -x "$R/$OPT/releases/99.0.0/grapheon-agent" ] || fail "release 99.0.0 was removed"
}

test_rollback_to_a_missing_release_is_refused() {
	installed_fresh
	expect_failure installer "$R/$OPT/current/scripts/rollback.sh" 9.9.9
	assert_contains_line output "grapheon-agent rollback: error: release 9.9.9 is not installed (installed: $VERSION )" "$out"
	assert_eq "current" "releases/$VERSION" "$(readlink "$R/$OPT/current")"
	assert_eq "systemctl calls" "" "$(systemctl_calls)"
}

test_uninstall_keeps_state_and_config() {
	installed_fresh
	seed_state
	env_before=$(cat "$R/etc/grapheon-agent.env")
	state_before=$(tree_snapshot "$R/var/lib/grapheon-agent")
	out=$(installer "$R/$OPT/current/scripts/uninstall.sh")
	echo "$out"
	assert_eq "systemctl calls" "disable --now grapheon-agent.timer
stop grapheon-agent.service
daemon-reload" "$(systemctl_calls)"
	assert_absent "$R/opt/grapheon"
	assert_absent "$R/usr/local/bin/grapheon-agent"
	assert_absent "$R/etc/systemd/system/grapheon-agent.service"
	assert_absent "$R/etc/systemd/system/grapheon-agent.timer"
	assert_eq "env file" "$env_before" "$(cat "$R/etc/grapheon-agent.env")"
	assert_eq "state" "$state_before" "$(tree_snapshot "$R/var/lib/grapheon-agent")"
	assert_contains_line output "kept the state directory /var/lib/grapheon-agent (agent identity and API key; --purge-state removes it)" "$out"
	# A second uninstall finds nothing to do and calls nothing.
	installer "$SCRIPTS/uninstall.sh" >/dev/null
	assert_eq "systemctl calls of a second uninstall" "" "$(systemctl_calls)"
}

test_uninstall_purge_state_removes_state_only() {
	installed_fresh
	seed_state
	installer "$R/$OPT/current/scripts/uninstall.sh" --purge-state >/dev/null
	assert_absent "$R/var/lib/grapheon-agent"
	assert_mode "$R/etc/grapheon-agent.env" 600
	assert_absent "$R/opt/grapheon"
}

test_tampered_tarball_is_refused() {
	new_root
	dir=$(mktemp -d "$scratch/tampered.XXXXXX")
	cp "$DIST/SHA256SUMS" "$DIST/SHA256SUMS.sig" "$REAL_TARBALL" "$dir/"
	tarball="$dir/$(basename "$REAL_TARBALL")"
	# Flip one byte in the middle of the gzip stream.
	size=$(stat -c %s "$tarball")
	printf '\377' | dd of="$tarball" bs=1 seek=$((size / 2)) conv=notrunc status=none
	expect_failure installer "$SCRIPTS/install.sh" --tarball "$tarball" --server-url https://grapheon.test
	grep -q "error: checksum mismatch for $(basename "$REAL_TARBALL") (expected .*, got .*): refusing to install it" <<<"$out" ||
		fail "no checksum mismatch message"
	assert_eq "files written" "$(printf '%s\n' '. -> ' './run -> ' './run/systemd -> ' './run/systemd/system -> ' | sort)" \
		"$(cd "$R" && find . -printf '%p -> %l\n' | sort)"
	assert_eq "systemctl calls" "" "$(systemctl_calls)"
}

test_tarball_without_checksum_is_refused() {
	new_root
	dir=$(mktemp -d "$scratch/nosums.XXXXXX")
	cp "$REAL_TARBALL" "$dir/"
	expect_failure installer "$SCRIPTS/install.sh" --tarball "$dir/$(basename "$REAL_TARBALL")"
	assert_contains_line output "grapheon-agent install: error: no SHA256SUMS for $dir/$(basename "$REAL_TARBALL") (looked for $dir/SHA256SUMS; pass --sha256sums)" "$out"
	expect_failure installer "$SCRIPTS/install.sh" --tarball "$dir/$(basename "$REAL_TARBALL")" \
		--sha256sums "$scratch/rel-99.0.0/SHA256SUMS"
	assert_contains_line output "grapheon-agent install: error: $(basename "$REAL_TARBALL") is not listed in $scratch/rel-99.0.0/SHA256SUMS: refusing to install it" "$out"
	assert_absent "$R/opt"
}

test_same_version_with_other_files_needs_force() {
	installed_fresh
	rebuilt="$scratch/rel-$VERSION-rebuilt/grapheon-agent-$VERSION-$X86.tar.gz"
	expect_failure installer "$SCRIPTS/install.sh" --tarball "$rebuilt"
	assert_contains_line output "grapheon-agent install: error: release $VERSION is already installed with other files; --force replaces it" "$out"
	assert_same_file "$REPO/deploy/grapheon-agent.service" "$R/$OPT/releases/$VERSION/deploy/grapheon-agent.service"
	installer "$SCRIPTS/install.sh" --tarball "$rebuilt" --force >/dev/null
	grep -qx '# rebuilt with another unit' "$R/$OPT/releases/$VERSION/deploy/grapheon-agent.service" || fail "not replaced"
	assert_same_file "$R/$OPT/releases/$VERSION/deploy/grapheon-agent.service" "$R/etc/systemd/system/grapheon-agent.service"
	assert_eq "leftovers in releases/" "$VERSION" "$(ls -A "$R/$OPT/releases")"
}

test_without_systemd_prints_cron_line_and_calls_nothing() {
	new_root no-systemd
	out=$(installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --server-url https://grapheon.test)
	echo "$out"
	assert_contains_line output "  */15 * * * * /opt/grapheon/agent/current/grapheon-agent --config /etc/grapheon-agent.env >/dev/null 2>&1" "$out"
	assert_eq "systemctl calls" "" "$(systemctl_calls)"
	assert_absent "$R/etc/systemd"
	assert_eq "current" "releases/$VERSION" "$(readlink "$R/$OPT/current")"
}

test_install_without_server_url_leaves_the_timer_off() {
	new_root
	out=$(installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL")
	echo "$out"
	assert_same_file "$REPO/deploy/grapheon-agent.env.example" "$R/etc/grapheon-agent.env"
	assert_mode "$R/etc/grapheon-agent.env" 600
	assert_eq "systemctl calls" daemon-reload "$(systemctl_calls)"
	assert_contains_line output "then run: systemctl enable --now grapheon-agent.timer" "$out"
}

test_unsafe_config_value_is_refused_before_writing() {
	new_root
	expect_failure installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --server-url 'https://grapheon.test/#x y'
	assert_contains_line output "grapheon-agent install: error: the server URL holds characters the env file cannot carry unquoted" "$out"
	assert_absent "$R/opt"
}

test_download_from_base_url_over_loopback_http() {
	new_root
	[ -n "$BASE_URL" ] || fail "no loopback server"
	out=$(installer "$SCRIPTS/install.sh" --base-url "$BASE_URL/" --allow-http --server-url https://grapheon.test 2>&1)
	echo "$out"
	assert_eq "current" releases/99.0.0 "$(readlink "$R/$OPT/current")"
	hash=$(sha256sum "$scratch/www/grapheon-agent-99.0.0-$X86.tar.gz" | cut -d' ' -f1)
	if [ "$SHELL_UNDER_TEST" = busybox ]; then
		# Only BusyBox applets on PATH: no openssl to check the signature with.
		assert_contains_line output "openssl not found: checked the SHA-256 sums only, not the signature of SHA256SUMS" "$out"
		assert_contains_line output "verified grapheon-agent-99.0.0-$X86.tar.gz (sha256 $hash; the signature of SHA256SUMS was NOT checked)" "$out"
	else
		assert_contains_line output "verified the signature of SHA256SUMS (ed25519 release key $(public_key_b64 "$TEST_SIGNING_KEY"))" "$out"
		assert_contains_line output "verified grapheon-agent-99.0.0-$X86.tar.gz (sha256 $hash, listed in the signed SHA256SUMS)" "$out"
	fi
	assert_contains_line output "grapheon-agent install: warning: this installer trusts a TEST signing key, not the release key: never use it outside tests" "$out"
	expect_failure installer "$SCRIPTS/install.sh" --base-url "$BASE_URL" --allow-http --version 0.3.0
	grep -qE "^grapheon-agent install: error: grapheon-agent-0\.3\.0-$X86\.tar\.gz is not listed in .*/SHA256SUMS: refusing to install it$" <<<"$out" ||
		fail "a version the server does not list was not refused"
	assert_eq "current" releases/99.0.0 "$(readlink "$R/$OPT/current")"
}

# release.yml publishes an install.sh that knows its release's download URL: run that very
# command (taken from the workflow) with the loopback server's URL, then the installer alone.
test_published_installer_downloads_from_its_release() {
	new_root
	stamp=$(grep -F "sed \"s|^" "$REPO/.github/workflows/release.yml" | sed 's/^ *//')
	[ -n "$stamp" ] || fail "no installer stamping command in release.yml"
	work=$(mktemp -d "$scratch/stamp.XXXXXX")
	mkdir -p "$work/scripts" "$work/dist"
	cp "$SCRIPTS/install.sh" "$work/scripts/"
	(cd "$work" && eval "$stamp")
	grep -qF "default_base_url='$BASE_URL'" "$work/dist/install.sh" || fail "the URL was not stamped in"
	installer "$work/dist/install.sh" --allow-http --server-url https://grapheon.test >/dev/null 2>&1
	assert_eq "current" releases/99.0.0 "$(readlink "$R/$OPT/current")"
}

test_plain_http_download_needs_allow_http() {
	new_root
	expect_failure installer "$SCRIPTS/install.sh" --base-url "$BASE_URL" --server-url https://grapheon.test
	assert_contains_line output "grapheon-agent install: error: refusing to download $BASE_URL/SHA256SUMS over plain http (use an https:// URL, or --allow-http for a local mirror)" "$out"
	assert_absent "$R/opt"
}

# A release directory holding the real tarball, its SHA256SUMS and the given signature file.
release_dir_with_signature() {
	dir=$(mktemp -d "$scratch/signed.XXXXXX")
	cp "$DIST/SHA256SUMS" "$REAL_TARBALL" "$dir/"
	[ -z "$1" ] || cp "$1" "$dir/SHA256SUMS.sig"
}

test_signature_by_another_key_is_refused_where_openssl_can_check() {
	new_root
	openssl genpkey -algorithm ed25519 -out "$scratch/other-key.pem" 2>/dev/null
	release_dir_with_signature ''
	bash "$REPO/scripts/sign-release.sh" --key "$scratch/other-key.pem" --test-key "$dir" >/dev/null
	if [ "$SHELL_UNDER_TEST" = busybox ]; then
		# No openssl among the BusyBox applets: the sums alone are checked, and it says so.
		out=$(installer "$SCRIPTS/install.sh" --tarball "$dir/$(basename "$REAL_TARBALL")" 2>&1)
		echo "$out"
		assert_contains_line output "openssl not found: checked the SHA-256 sums only, not the signature of SHA256SUMS" "$out"
		assert_eq "current" "releases/$VERSION" "$(readlink "$R/$OPT/current")"
		return 0
	fi
	expect_failure installer "$SCRIPTS/install.sh" --tarball "$dir/$(basename "$REAL_TARBALL")"
	assert_contains_line output "grapheon-agent install: error: the signature of SHA256SUMS does not match the release key pinned in this installer: refusing to install (a tampered or foreign release)" "$out"
	# The installer as committed pins the release key: it refuses the test-signed release too.
	expect_failure installer "$REPO/scripts/install.sh" --tarball "$REAL_TARBALL"
	assert_contains_line output "grapheon-agent install: error: the signature of SHA256SUMS does not match the release key pinned in this installer: refusing to install (a tampered or foreign release)" "$out"
	assert_absent "$R/opt"
}

test_unsigned_release_needs_allow_unsigned() {
	new_root
	release_dir_with_signature ''
	expect_failure installer "$SCRIPTS/install.sh" --tarball "$dir/$(basename "$REAL_TARBALL")"
	assert_contains_line output "grapheon-agent install: error: no signature ($dir/SHA256SUMS.sig) for $dir/SHA256SUMS: releases are signed; refusing to install (--allow-unsigned installs on checksums alone)" "$out"
	assert_absent "$R/opt"
	out=$(installer "$SCRIPTS/install.sh" --tarball "$dir/$(basename "$REAL_TARBALL")" --allow-unsigned 2>&1)
	echo "$out"
	assert_contains_line output "grapheon-agent install: warning: no signature checked (--allow-unsigned): only the SHA-256 sums protect this install" "$out"
	assert_eq "current" "releases/$VERSION" "$(readlink "$R/$OPT/current")"
}

# docs/operating.md's offline install, run as written there (for this version and target).
test_offline_install_from_the_docs_writes_the_enrollment_key() {
	new_root
	dir=$(mktemp -d "$scratch/offline.XXXXXX")
	cp "$DIST/SHA256SUMS" "$DIST/SHA256SUMS.sig" "$REAL_TARBALL" "$dir/"
	block=$(doc_block "$REPO/docs/operating.md" 'scripts/install.sh')
	block=${block//0.1.0-aarch64-unknown-linux-musl/$VERSION-$X86}
	block=${block//<key>/enroll-EXAMPLEonly}
	block=${block//https:\/\/grapheon.example.net/https:\/\/grapheon.test}
	echo "$block"
	(cd "$dir" && GRAPHEON_INSTALL_ROOT=$R GRAPHEON_INSTALL_SYSTEMCTL=systemctl FAKE_SYSTEMCTL_LOG="$R.systemctl.log" \
		FAKE_SYSTEMCTL_STATE="$R.systemctl.state" PATH="$FAKE_BIN:$PATH" sh -c "$block")
	assert_eq "env file" "$(expected_env_file https://grapheon.test enroll-EXAMPLEonly)" "$(cat "$R/etc/grapheon-agent.env")"
	assert_eq "current" "releases/$VERSION" "$(readlink "$R/$OPT/current")"
}

test_foreign_tarball_needs_target_flag() {
	new_root
	tarball="$DIST/grapheon-agent-$VERSION-$ARM64.tar.gz"
	expect_failure installer "$SCRIPTS/install.sh" --tarball "$tarball"
	assert_contains_line output "grapheon-agent install: error: $(basename "$tarball") is for $ARM64, not $X86 (see --target)" "$out"
	installer "$SCRIPTS/install.sh" --tarball "$tarball" --target "$ARM64" >/dev/null
	file -b "$R/$OPT/current/grapheon-agent" | grep -q 'ARM aarch64' || fail "not the aarch64 binary"
}

test_custom_paths_are_honoured() {
	new_root
	installer "$SCRIPTS/install.sh" --tarball "$REAL_TARBALL" --prefix /srv/ga --env-file /etc/ga.env \
		--state-dir /srv/ga-state --unit-dir /run/systemd/system --bin-link none \
		--server-url https://grapheon.test >/dev/null
	assert_eq "current" "releases/$VERSION" "$(readlink "$R/srv/ga/current")"
	assert_mode "$R/etc/ga.env" 600
	assert_mode "$R/srv/ga-state" 700
	assert_absent "$R/usr/local/bin/grapheon-agent"
	grep -qx 'ExecStart=/srv/ga/current/grapheon-agent --config /etc/ga.env' "$R/run/systemd/system/grapheon-agent.service" ||
		fail "ExecStart not rewritten"
	grep -qx 'ReadWritePaths=/srv/ga-state' "$R/run/systemd/system/grapheon-agent.service" || fail "state dir not writable"
	grep -qx 'Environment=GRAPHEON_AGENT_STATE_DIR=/srv/ga-state' "$R/run/systemd/system/grapheon-agent.service" ||
		fail "the agent is not told the state dir"
	! grep -q '^StateDirectory' "$R/run/systemd/system/grapheon-agent.service" || fail "StateDirectory left in"
}

# A download cut short must run nothing: every prefix of the script, cut at a line end or in
# the middle of a line, leaves the root untouched.
test_truncated_installer_runs_nothing() {
	new_root
	before=$(tree_snapshot "$R")
	lines=$(wc -l <"$SCRIPTS/install.sh")
	bytes=$(stat -c %s "$SCRIPTS/install.sh")
	for cut in "-n $((lines / 4))" "-n $((lines / 2))" "-n $((lines - 1))" "-c $((bytes / 3))" "-c $((bytes - 10))"; do
		# shellcheck disable=SC2086 # cut is "-n N" or "-c N"
		head $cut "$SCRIPTS/install.sh" >"$scratch/truncated.sh"
		installer "$scratch/truncated.sh" --tarball "$REAL_TARBALL" --server-url https://grapheon.test >/dev/null 2>&1 || true
		assert_eq "tree after running install.sh cut at head $cut" "$before" "$(tree_snapshot "$R")"
	done
	assert_eq "systemctl calls" "" "$(systemctl_calls)"
}

# The download tools under test, one at a time: a PATH where TOOL (curl or GNU wget) is the only
# downloader the installer finds before BusyBox's applets.
path_with_only() {
	local dir="$scratch/only-$1"
	mkdir -p "$dir"
	ln -sf "$(command -v "$1")" "$dir/$1"
	printf '%s\n' "$dir:$FAKE_BIN:$BB_BIN"
}

# Both tools trust the test CA of the redirecting server (curl through CURL_CA_BUNDLE, GNU wget
# through its startup file).
with_test_ca() {
	CURL_CA_BUNDLE="$REPO/tests/fixtures/tls/ca.pem" WGETRC="$scratch/wgetrc" "$@"
}

test_redirect_from_https_to_plain_http_is_refused_by_curl_and_gnu_wget() {
	local tool where before
	for tool in curl wget; do
		new_root
		before=$(tree_snapshot "$R")
		PATH_UNDER_TEST=$(path_with_only "$tool") with_test_ca expect_failure installer "$SCRIPTS/install.sh" \
			--base-url "$REDIRECT_URL/to-http" --server-url https://grapheon.test
		case $tool in
		curl) where='a URL' ;;
		wget) where="http://127.0.0.1:$PLAIN_PORT/SHA256SUMS" ;;
		esac
		assert_contains_line "$tool: output" "grapheon-agent install: error: refusing to download $REDIRECT_URL/to-http/SHA256SUMS: the server redirected it to $where that is not https (use an https:// URL that serves the release itself, or --allow-http for a local mirror)" "$out"
		assert_eq "$tool: requests the plain http server received" "" "$(cat "$scratch/plain-requests" 2>/dev/null || true)"
		assert_eq "$tool: tree after the refused install" "$before" "$(tree_snapshot "$R")"
	done
}

# The counterpart: a redirect that stays on https (as GitHub's to its asset host) is followed.
test_redirect_that_stays_on_https_is_followed_by_curl_and_gnu_wget() {
	local tool hash
	hash=$(sha256sum "$scratch/www/grapheon-agent-99.0.0-$X86.tar.gz" | cut -d' ' -f1)
	for tool in curl wget; do
		new_root
		out=$(PATH_UNDER_TEST=$(path_with_only "$tool") with_test_ca installer "$SCRIPTS/install.sh" \
			--base-url "$REDIRECT_URL/to-https" --server-url https://grapheon.test 2>&1) ||
			{ printf '%s\n' "$out" >&2; fail "$tool: the install over an https redirect failed"; }
		echo "$out"
		# No openssl on this PATH (BusyBox applets only besides the tool): the sums are checked.
		assert_contains_line "$tool: output" "verified grapheon-agent-99.0.0-$X86.tar.gz (sha256 $hash; the signature of SHA256SUMS was NOT checked)" "$out"
		assert_eq "$tool: current" releases/99.0.0 "$(readlink "$R/$OPT/current")"
		assert_eq "$tool: requests the plain http server received" "" "$(cat "$scratch/plain-requests" 2>/dev/null || true)"
	done
}

# An https server on loopback with the test CA's certificate: /to-http/PATH answers 302 to PATH
# on a plain http server (which serves the release too, so that following it would succeed, and
# logs every request it gets to $scratch/plain-requests); /to-https/PATH answers 302 to
# /files/PATH on itself, which serves the release over https.
start_redirecting_server() {
	python3 - "$scratch/www" "$REPO/tests/fixtures/tls" "$scratch/redirect-ports" "$scratch/plain-requests" <<'EOF' &
import http.server, os, ssl, sys, threading
www, tls_dir, ports_file, requests_file = sys.argv[1:5]

class Plain(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=www, **kwargs)
    def log_message(self, *args):
        with open(requests_file, "a") as f:
            f.write(self.requestline + "\n")

plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain)

class Tls(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=www, **kwargs)
    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_GET(self):
        if self.path.startswith("/to-http/"):
            self.redirect("http://127.0.0.1:%d/%s" % (plain.server_address[1], self.path[len("/to-http/"):]))
        elif self.path.startswith("/to-https/"):
            self.redirect("/files/" + self.path[len("/to-https/"):])
        elif self.path.startswith("/files/"):
            self.path = self.path[len("/files"):]
            super().do_GET()
        else:
            self.send_error(404)
    def log_message(self, *args):
        pass

tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Tls)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(tls_dir + "/server.pem", tls_dir + "/server.key")
tls.socket = context.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=plain.serve_forever, daemon=True).start()
with open(ports_file + ".tmp", "w") as f:
    f.write("%d %d\n" % (tls.server_address[1], plain.server_address[1]))
os.rename(ports_file + ".tmp", ports_file)
tls.serve_forever()
EOF
	redirect_pid=$!
	for _ in $(seq 50); do
		[ -s "$scratch/redirect-ports" ] && break
		sleep 0.1
	done
	read -r tls_port PLAIN_PORT <"$scratch/redirect-ports" || {
		echo "lifecycle.sh: the redirecting https server did not start" >&2
		exit 1
	}
	REDIRECT_URL="https://127.0.0.1:$tls_port"
	echo "ca_certificate = $REPO/tests/fixtures/tls/ca.pem" >"$scratch/wgetrc"
}

start_server() {
	python3 - "$scratch/www" "$scratch/port" <<'EOF' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
server.timeout = 1
open(sys.argv[2], "w").write(str(server.server_address[1]))
server.serve_forever()
EOF
	server_pid=$!
	for _ in $(seq 50); do
		[ -s "$scratch/port" ] && break
		sleep 0.1
	done
	BASE_URL="http://127.0.0.1:$(cat "$scratch/port")"
}

BASE_URL=''
start_server
redirect_pid=''
start_redirecting_server
shells=("$@")
[ ${#shells[@]} -gt 0 ] || shells=(busybox dash)
for SHELL_UNDER_TEST in "${shells[@]}"; do
	export SHELL_UNDER_TEST
	for t in $(declare -F | awk '$3 ~ /^test_/ { print $3 }'); do
		run_test "$SHELL_UNDER_TEST/${t#test_}" "$t"
	done
done
