#!/usr/bin/env bash
# The .deb and .rpm of build-release.sh: their files, modes and metadata, and the .rpm's scripts
# run by `rpm --root` in a scratch root that has a BusyBox shell and a fake systemctl. (The .deb
# is installed, run, removed and purged under a real systemd by systemd.sh.)
#
#   DIST=dist bash tests/packaging/os-packages.sh
set -euo pipefail
# shellcheck source=tests/packaging/lib.sh
. "$(dirname "$0")/lib.sh"

DIST=$(cd "${DIST:-$REPO/dist}" && pwd)
VERSION=$(cat "$REPO/VERSION")
PKG_VERSION=${VERSION//-/\~}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The unit a package installs: the tarball's, with the binary in /usr/bin.
expected_service() {
	sed -e 's|^Documentation=file:/opt/grapheon/agent/current/README.md$|Documentation=file:/usr/share/doc/grapheon-agent/README.md|' \
		-e 's|^ExecStart=/opt/grapheon/agent/current/grapheon-agent |ExecStart=/usr/bin/grapheon-agent |' \
		"$REPO/deploy/grapheon-agent.service"
}

expected_files() {
	cat <<LIST
/etc/grapheon-agent.env 600
/usr/bin/grapheon-agent 755
/usr/lib/systemd/system/grapheon-agent.service 644
/usr/lib/systemd/system/grapheon-agent.timer 644
/usr/share/doc/grapheon-agent/CHANGELOG.md 644
/usr/share/doc/grapheon-agent/README.md 644
LIST
}

test_deb_holds_the_tarball_binary_units_and_a_0600_conffile() {
	local deb="$DIST/grapheon-agent_${PKG_VERSION}-1_amd64.deb"
	assert_eq "files and modes" "$(expected_files)" \
		"$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { m = $1; sub(/^\./, "", $6); print $6, m }' |
			sed -e 's/ -rw-------$/ 600/' -e 's/ -rwxr-xr-x$/ 755/' -e 's/ -rw-r--r--$/ 644/' | sort)"
	assert_eq "owners" "root/root" "$(dpkg-deb -c "$deb" | awk '{ print $2 }' | sort -u)"
	assert_eq "conffiles" /etc/grapheon-agent.env "$(dpkg-deb -I "$deb" conffiles)"
	assert_eq "control" "grapheon-agent $PKG_VERSION-1 amd64" "$(dpkg-deb -f "$deb" Package Version Architecture | awk -F': ' '{ printf "%s%s", sep, $2; sep = " " } END { print "" }')"
	mkdir -p "$scratch/deb"
	dpkg-deb -x "$deb" "$scratch/deb"
	assert_same_file "$TARGET_DIR/x86_64-unknown-linux-musl/release/grapheon-agent" "$scratch/deb/usr/bin/grapheon-agent"
	assert_eq "service" "$(expected_service)" "$(cat "$scratch/deb/usr/lib/systemd/system/grapheon-agent.service")"
	assert_same_file "$REPO/deploy/grapheon-agent.timer" "$scratch/deb/usr/lib/systemd/system/grapheon-agent.timer"
	assert_same_file "$REPO/deploy/grapheon-agent.env.example" "$scratch/deb/etc/grapheon-agent.env"
	dpkg-deb -e "$deb" "$scratch/deb-control"
	for f in postinst prerm postrm; do
		assert_same_file "$REPO/deploy/deb/$f" "$scratch/deb-control/$f"
	done
}

# A root rpm can run scriptlets in: BusyBox as /bin/sh (with the libraries it links), a fake
# systemctl that logs to /systemctl.log, and /run/systemd/system so the scripts see systemd.
rpm_root() {
	local busybox lib
	R="$scratch/rpmroot"
	mkdir -p "$R/bin" "$R/usr/bin" "$R/run/systemd/system" "$R/var/lib"
	busybox=$(command -v busybox)
	cp "$busybox" "$R/bin/busybox"
	for lib in $(ldd "$busybox" | grep -o '/[^ ]*'); do
		mkdir -p "$R$(dirname "$lib")"
		cp -L "$lib" "$R$lib"
	done
	chroot "$R" /bin/busybox --install -s /bin
	install -m 0755 "$REPO/tests/packaging/fake-systemctl" "$R/bin/fake-systemctl"
	printf '#!/bin/sh\nFAKE_SYSTEMCTL_LOG=/systemctl.log FAKE_SYSTEMCTL_STATE=/systemctl.state exec /bin/fake-systemctl "$@"\n' \
		>"$R/usr/bin/systemctl"
	chmod 755 "$R/usr/bin/systemctl"
	rpm --root "$R" --initdb
}

test_rpm_installs_files_and_modes_and_its_scripts_manage_the_timer() {
	local rpmfile="$DIST/grapheon-agent-$PKG_VERSION-1.x86_64.rpm"
	rpm_root
	rpm --root "$R" -i --nodeps "$rpmfile"
	assert_eq "package" "grapheon-agent-$PKG_VERSION-1.x86_64" "$(rpm --root "$R" -q grapheon-agent)"
	assert_eq "files and modes" "$(expected_files)" \
		"$(cd "$R" && for f in $(rpm --root "$R" -ql grapheon-agent); do [ -f ".$f" ] && echo "$f $(stat -c %a ".$f")"; done | sort)"
	assert_eq "config files" /etc/grapheon-agent.env "$(rpm --root "$R" -qc grapheon-agent)"
	assert_same_file "$TARGET_DIR/x86_64-unknown-linux-musl/release/grapheon-agent" "$R/usr/bin/grapheon-agent"
	assert_eq "service" "$(expected_service)" "$(cat "$R/usr/lib/systemd/system/grapheon-agent.service")"
	assert_eq "systemctl calls of the install" "daemon-reload
enable grapheon-agent.timer
start grapheon-agent.timer" "$(cat "$R/systemctl.log")"
	# State the agent made; an edited configuration.
	mkdir -m 0700 "$R/var/lib/grapheon-agent"
	echo 0f0e0d0c-1111-4222-8333-444455556666 >"$R/var/lib/grapheon-agent/agent_uuid"
	echo GRAPHEON_AGENT_SERVER_URL=https://grapheon.test >>"$R/etc/grapheon-agent.env"
	: >"$R/systemctl.log"
	rpm --root "$R" -e grapheon-agent
	assert_eq "systemctl calls of the removal" "disable --now grapheon-agent.timer
stop grapheon-agent.service
daemon-reload" "$(cat "$R/systemctl.log")"
	assert_absent "$R/usr/bin/grapheon-agent"
	assert_absent "$R/usr/lib/systemd/system/grapheon-agent.service"
	assert_eq "kept state" 0f0e0d0c-1111-4222-8333-444455556666 "$(cat "$R/var/lib/grapheon-agent/agent_uuid")"
	# An edited %config(noreplace) file is kept as .rpmsave, mode and all.
	assert_mode "$R/etc/grapheon-agent.env.rpmsave" 600
}

test_rpm_and_deb_carry_the_same_binary_for_aarch64() {
	mkdir -p "$scratch/arm-deb" "$scratch/arm-rpm"
	dpkg-deb -x "$DIST/grapheon-agent_${PKG_VERSION}-1_arm64.deb" "$scratch/arm-deb"
	(cd "$scratch/arm-rpm" && rpm2cpio "$DIST/grapheon-agent-$PKG_VERSION-1.aarch64.rpm" | cpio -idm --quiet)
	assert_same_file "$TARGET_DIR/aarch64-unknown-linux-musl/release/grapheon-agent" "$scratch/arm-deb/usr/bin/grapheon-agent"
	assert_same_file "$TARGET_DIR/aarch64-unknown-linux-musl/release/grapheon-agent" "$scratch/arm-rpm/usr/bin/grapheon-agent"
	assert_eq "rpm architecture" aarch64 "$(rpm -qp --qf '%{ARCH}' "$DIST/grapheon-agent-$PKG_VERSION-1.aarch64.rpm")"
}

for t in $(declare -F | awk '$3 ~ /^test_/ { print $3 }'); do
	run_test "os-packages/${t#test_}" "$t"
done
