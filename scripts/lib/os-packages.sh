# shellcheck shell=bash
# .deb and .rpm of one target, made from the very binary packed in its tarball (nothing is
# compiled again). Sourced by build-release.sh, which defines die(), $version and
# $source_date_epoch, and runs from the repository's top directory.
# shellcheck disable=SC2154 # version and source_date_epoch come from build-release.sh
#
# Both install the same tree: /usr/bin/grapheon-agent, the units in /usr/lib/systemd/system
# (ExecStart= pointing at /usr/bin), /etc/grapheon-agent.env (0600, a configuration file the
# package manager keeps on upgrade and removal) and the documentation; their scripts enable the
# timer on install, stop it on removal, keep /var/lib/grapheon-agent on removal and (.deb) delete
# it on purge.

# The Debian and RPM architecture names of a Rust target, as "deb|rpm".
os_package_arch() {
	case $1 in
	x86_64-unknown-linux-musl) echo "amd64|x86_64" ;;
	aarch64-unknown-linux-musl) echo "arm64|aarch64" ;;
	armv7-unknown-linux-musleabihf) echo "armhf|armv7hl" ;;
	*) die "no package architecture for $1" ;;
	esac
}

# The tree both packages install, in $1, from binary $2.
os_package_tree() {
	local tree=$1 bin=$2 unit
	install -D -m 0755 "$bin" "$tree/usr/bin/grapheon-agent"
	for unit in grapheon-agent.service grapheon-agent.timer; do
		mkdir -p "$tree/usr/lib/systemd/system"
		sed -e 's|^Documentation=file:/opt/grapheon/agent/current/README.md$|Documentation=file:/usr/share/doc/grapheon-agent/README.md|' \
			-e 's|^ExecStart=/opt/grapheon/agent/current/grapheon-agent |ExecStart=/usr/bin/grapheon-agent |' \
			"deploy/$unit" >"$tree/usr/lib/systemd/system/$unit"
		chmod 0644 "$tree/usr/lib/systemd/system/$unit"
	done
	! grep -q /opt/grapheon "$tree/usr/lib/systemd/system/grapheon-agent.service" ||
		die "deploy/grapheon-agent.service names /opt/grapheon in a line the package does not rewrite"
	install -D -m 0600 deploy/grapheon-agent.env.example "$tree/etc/grapheon-agent.env"
	mkdir -p "$tree/usr/share/doc/grapheon-agent"
	for f in README.md CHANGELOG.md; do
		[ ! -f "$f" ] || install -m 0644 "$f" "$tree/usr/share/doc/grapheon-agent/$f"
	done
	find "$tree" -exec touch -h -d "@$source_date_epoch" {} +
}

# build_deb TARGET BINARY OUT: OUT/grapheon-agent_<version>-1_<arch>.deb; prints its path.
build_deb() {
	local target=$1 bin=$2 out=$3 arch stage debver file
	arch=$(os_package_arch "$target" | cut -d'|' -f1)
	debver="${version//-/\~}-1" # a pre-release sorts before its release, as in SemVer
	stage=$(mktemp -d)
	os_package_tree "$stage/root" "$bin"
	mkdir -p "$stage/root/DEBIAN"
	cat >"$stage/root/DEBIAN/control" <<CONTROL
Package: grapheon-agent
Version: $debver
Architecture: $arch
Maintainer: grapheon-agent maintainers
Installed-Size: $(du -sk --exclude=DEBIAN "$stage/root" | cut -f1)
Section: net
Priority: optional
Description: passive network agent for the Graphēon network-mapping server
 Reports the host's interface addresses, neighbour table, IPv4 routes and TCP/UDP sockets
 with their owning processes to a Graphēon server, one check-in per run of
 grapheon-agent.timer. One static binary; no dependencies.
CONTROL
	echo /etc/grapheon-agent.env >"$stage/root/DEBIAN/conffiles"
	install -m 0755 deploy/deb/postinst deploy/deb/prerm deploy/deb/postrm "$stage/root/DEBIAN/"
	file="$out/grapheon-agent_${debver}_$arch.deb"
	SOURCE_DATE_EPOCH=$source_date_epoch dpkg-deb --root-owner-group -Zxz --build "$stage/root" "$file.tmp" >/dev/null
	mv "$file.tmp" "$file"
	rm -rf "$stage"
	printf '%s\n' "$file"
}

# build_rpm TARGET BINARY OUT: OUT/grapheon-agent-<version>-1.<arch>.rpm; prints its path.
build_rpm() {
	local target=$1 bin=$2 out=$3 arch stage rpmver file
	arch=$(os_package_arch "$target" | cut -d'|' -f2)
	rpmver=${version//-/\~}
	stage=$(mktemp -d)
	os_package_tree "$stage/root" "$bin"
	sed -e "s|@VERSION@|$rpmver|" -e "s|@STAGE@|$stage/root|" \
		deploy/rpm/grapheon-agent.spec >"$stage/grapheon-agent.spec"
	file="$out/grapheon-agent-$rpmver-1.$arch.rpm"
	SOURCE_DATE_EPOCH=$source_date_epoch rpmbuild -bb --quiet --target "$arch-linux" \
		--define "_topdir $stage/rpmbuild" --define "_rpmdir $stage/rpms" \
		--define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
		--define "use_source_date_epoch_as_buildtime 1" --define "clamp_mtime_to_source_date_epoch 1" \
		"$stage/grapheon-agent.spec" >"$stage/rpmbuild.log" 2>&1 || {
		cat "$stage/rpmbuild.log" >&2
		die "rpmbuild failed for $target"
	}
	mv "$stage/rpms/grapheon-agent-$rpmver-1.$arch.rpm" "$file"
	rm -rf "$stage"
	printf '%s\n' "$file"
}
