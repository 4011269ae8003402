#!/bin/sh
# Install, upgrade, roll back or remove grapheon-agent.
#
#   curl -fsSL <release-url>/install.sh | sh -s -- --server-url https://grapheon.example.net
#   sh install.sh --tarball ./grapheon-agent-0.1.0-x86_64-unknown-linux-musl.tar.gz
#
# POSIX sh (BusyBox sh, dash). Every helper below is only a definition: the one call that does
# anything is on the last line, so a download cut short runs nothing. upgrade.sh, rollback.sh and
# uninstall.sh source this file with --mode set; run any of them with --help for the options.
#
# Layout (all paths can be moved with the options, and all of them at once with --root):
#   /opt/grapheon/agent/releases/<version>/   one directory per installed release, kept on upgrade
#   /opt/grapheon/agent/current -> releases/<version>   switched atomically (rename of a symlink)
#   /usr/local/bin/grapheon-agent -> /opt/grapheon/agent/current/grapheon-agent
#   /etc/grapheon-agent.env                   configuration, 0600, written once, never overwritten
#   /var/lib/grapheon-agent/                  agent state, 0700, never touched by upgrades
#   /etc/systemd/system/grapheon-agent.{service,timer}

usage() {
	cat <<'EOF'
Usage: install.sh [options]                 install (or upgrade to) a release
       upgrade.sh [options]                 install a newer release, keep the previous one
       rollback.sh [options] VERSION        switch back to an installed release
       uninstall.sh [options] [--purge-state] [--purge-config]

Where the release comes from (its SHA-256 must match the SHA256SUMS file, whose ed25519
signature SHA256SUMS.sig must match the release key pinned in this script, or nothing is
installed; without OpenSSL 3 only the sums can be checked, and the installer says so):
  --tarball FILE        local grapheon-agent-<version>-<target>.tar.gz (SHA256SUMS beside it)
  --sha256sums FILE     SHA256SUMS to check against (default: beside the tarball / from the base URL)
  --signature FILE      its signature (default: SHA256SUMS.sig beside it / from the base URL)
  --base-url URL        release download directory holding SHA256SUMS and the tarballs, https://
                        (env GRAPHEON_INSTALL_BASE_URL)
  --allow-http          also download over plain http:// (a local mirror); the signature check
                        is then all that protects the download
  --allow-unsigned      install a release that has no SHA256SUMS.sig, on its checksums alone
  --version VERSION     pick this version from the base URL (default: the one SHA256SUMS lists)
  --target TRIPLE       x86_64-unknown-linux-musl | aarch64-unknown-linux-musl |
                        armv7-unknown-linux-musleabihf (default: detected from uname -m)

First configuration (written only when the env file does not exist yet):
  --server-url URL      GRAPHEON_AGENT_SERVER_URL (or set that variable in the environment)
  --enrollment-key KEY  GRAPHEON_AGENT_ENROLLMENT_KEY (prefer the variable: arguments show in ps)

Paths and tools (each also from the environment variable named in brackets):
  --root DIR            treat DIR as / for every path below [GRAPHEON_INSTALL_ROOT]
  --prefix DIR          /opt/grapheon/agent [GRAPHEON_INSTALL_PREFIX]
  --env-file FILE       /etc/grapheon-agent.env [GRAPHEON_INSTALL_ENV_FILE]
  --state-dir DIR       /var/lib/grapheon-agent [GRAPHEON_INSTALL_STATE_DIR]
  --unit-dir DIR        /etc/systemd/system [GRAPHEON_INSTALL_UNIT_DIR]
  --bin-link FILE       /usr/local/bin/grapheon-agent, "none" for no link [GRAPHEON_INSTALL_BIN_LINK]
  --systemctl CMD       systemctl [GRAPHEON_INSTALL_SYSTEMCTL]
  --systemd MODE        auto | yes | no: install the units (auto: when <root>/run/systemd/system
                        exists) [GRAPHEON_INSTALL_SYSTEMD]
  --no-start            install and enable nothing in systemd beyond the unit files
  --force               replace an installed release of the same version whose files differ
  -h, --help            this text
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf 'grapheon-agent %s: warning: %s\n' "$mode" "$*" >&2; }
die() { printf 'grapheon-agent %s: error: %s\n' "$mode" "$*" >&2; exit 1; }
usage_error() { printf 'grapheon-agent %s: %s (see --help)\n' "$mode" "$*" >&2; exit 2; }

# A version or target becomes part of paths: allow only what release names use.
check_name() {
	case $2 in
	'' | .* | *[!A-Za-z0-9._+-]*) die "invalid $1: '$2'" ;;
	esac
}

detect_target() {
	machine=$(uname -m)
	case $machine in
	x86_64 | amd64) echo x86_64-unknown-linux-musl ;;
	aarch64 | arm64 | armv8b | aarch64_be) echo aarch64-unknown-linux-musl ;;
	armv7* | armv8l) echo armv7-unknown-linux-musleabihf ;;
	*) die "no release is built for this machine ($machine); pass --target to override" ;;
	esac
}

# Prints the SHA-256 of a file with whichever tool this host has.
sha256_of() {
	if command -v sha256sum >/dev/null 2>&1; then
		sha256sum "$1" | cut -d ' ' -f 1
	elif command -v shasum >/dev/null 2>&1; then
		shasum -a 256 "$1" | cut -d ' ' -f 1
	elif command -v openssl >/dev/null 2>&1; then
		openssl dgst -sha256 -r "$1" | cut -d ' ' -f 1
	else
		die "need sha256sum, shasum or openssl to verify the download"
	fi
}

# Downloads over https only (redirects included), unless --allow-http.
fetch() {
	protocols='=https'
	case $1 in
	https://*) ;;
	http://*)
		[ "$allow_http" = yes ] ||
			die "refusing to download $1 over plain http (use an https:// URL, or --allow-http for a local mirror)"
		protocols='=https,http'
		;;
	*) die "not an https:// URL: $1" ;;
	esac
	if command -v curl >/dev/null 2>&1; then
		dl_status=0
		curl -fsSL --proto "$protocols" --proto-redir "$protocols" --retry 3 -o "$2" "$1" || dl_status=$?
		# 1 is curl's "unsupported protocol": with an https:// URL, only a redirect gets there.
		[ "$dl_status" != 1 ] || [ "$allow_http" = yes ] || refuse_redirect "$1" ''
		[ "$dl_status" = 0 ] || die "download failed: $1"
	elif command -v wget >/dev/null 2>&1; then
		if wget --help 2>&1 | grep -q -- --https-only; then
			if [ "$allow_http" = yes ]; then
				wget -q -O "$2" "$1" || die "download failed: $1"
			else
				wget_https_only "$1" "$2"
			fi
		else
			# BusyBox wget: no --https-only, and it does not check certificates either.
			if [ "$wget_warned" = no ]; then
				warn "this wget (BusyBox?) neither checks the server's certificate nor refuses a redirect to http: only the signature check protects the download"
				wget_warned=yes
			fi
			wget -q -O "$2" "$1" || die "download failed: $1"
		fi
	else
		die "need curl or wget to download $1"
	fi
}

refuse_redirect() {
	die "refusing to download $1: the server redirected it to ${2:-a URL} that is not https (use an https:// URL that serves the release itself, or --allow-http for a local mirror)"
}

# GNU wget's --https-only covers the links of a recursive download, not redirects (it follows a
# 302 to http:// silently): follow them here one at a time and refuse any that leaves https.
wget_https_only() {
	dl_url=$1
	dl_hops=0
	while :; do
		dl_status=0
		wget -q -S --max-redirect=0 -O "$2" "$dl_url" 2>"$work/wget.headers" || dl_status=$?
		[ "$dl_status" != 0 ] || return 0
		dl_location=$(sed -n 's/^ *[Ll]ocation: *//p' "$work/wget.headers" | tr -d '\r' | tail -n 1)
		if [ "$dl_status" != 8 ] || [ -z "$dl_location" ]; then
			dl_reply=$(sed -n 's/^ *HTTP\/[0-9.]* *//p' "$work/wget.headers" | tr -d '\r' | tail -n 1)
			die "download failed: $dl_url${dl_reply:+ ($dl_reply)}"
		fi
		dl_hops=$((dl_hops + 1))
		[ "$dl_hops" -le 10 ] || die "download failed: $1 (more than 10 redirects)"
		case $dl_location in
		https://*) dl_url=$dl_location ;;
		*://*) refuse_redirect "$1" "$dl_location" ;;
		/*)
			dl_host=${dl_url#https://}
			dl_url="https://${dl_host%%/*}$dl_location"
			;;
		*) dl_url="${dl_url%/*}/$dl_location" ;;
		esac
	done
}

# Checks the ed25519 signature of SHA256SUMS ($1) in $2 against the pinned release key. Refuses a
# bad signature; without OpenSSL 3 (ed25519 verification) it says that only the sums were checked.
verify_signature() {
	if [ "$release_key_kind" = test ]; then
		warn "this installer trusts a TEST signing key, not the release key: never use it outside tests"
	fi
	if ! command -v openssl >/dev/null 2>&1; then
		signature_checked=no
		say "openssl not found: checked the SHA-256 sums only, not the signature of SHA256SUMS"
		return 0
	fi
	printf '%s\n%s\n%s\n' '-----BEGIN PUBLIC KEY-----' "$release_public_key" '-----END PUBLIC KEY-----' \
		>"$work/release-key.pem"
	if openssl pkeyutl -verify -pubin -inkey "$work/release-key.pem" -rawin -in "$1" -sigfile "$2" \
		>"$work/openssl.out" 2>&1; then
		signature_checked=yes
		say "verified the signature of SHA256SUMS (ed25519 release key $release_public_key)"
	elif openssl pkeyutl -help 2>&1 | grep -q -- -rawin; then
		die "the signature of SHA256SUMS does not match the release key pinned in this installer: refusing to install (a tampered or foreign release)"
	else
		signature_checked=no
		say "this openssl ($(openssl version 2>/dev/null)) cannot verify ed25519 signatures: checked the SHA-256 sums only"
	fi
}

# The expected hash of file name $2 in SHA256SUMS $1 ("hash  name" or "hash *name").
expected_sha256() {
	awk -v f="$2" '$2 == f || $2 == "*" f { print $1; exit }' "$1"
}

# The host's systemctl must not act on units written into another root.
can_run_systemctl() {
	[ -z "$root" ] || [ "$systemctl_overridden" = yes ]
}

sc() {
	if ! can_run_systemctl; then
		say "(not run in --root: systemctl $*)"
		return 1
	fi
	# shellcheck disable=SC2086 # the command may carry its own arguments
	$systemctl "$@"
}

use_systemd() {
	case $systemd_mode in
	yes) return 0 ;;
	no) return 1 ;;
	auto) [ -d "$root/run/systemd/system" ] ;;
	*) usage_error "--systemd must be auto, yes or no" ;;
	esac
}

# rename(2) over the old name: readers see the old or the new file, never none.
replace_atomically() {
	if mv -T "$1" "$2" 2>/dev/null; then
		return 0
	fi
	if [ -L "$1" ] && [ -d "$2" ] && [ ! -L "$2" ]; then
		die "$2 is a directory, expected a symlink"
	fi
	# mv without -T (old BusyBox) would move a symlink into the directory the target points to.
	warn "mv -T unsupported: replacing $2 non-atomically"
	rm -f "$2"
	mv "$1" "$2"
}

# Points symlink $2 at $1 if it does not already; link_changed says whether it had to.
# (Mutating helpers report through variables: a function called as a condition runs without
# set -e, so none of them is ever called that way.)
set_symlink() {
	link_changed=no
	if [ -L "$2" ] && [ "$(readlink "$2")" = "$1" ]; then
		return 0
	fi
	mkdir -p "$(dirname "$2")"
	tmp_link="$(dirname "$2")/.$(basename "$2").tmp.$$"
	rm -f "$tmp_link"
	ln -s "$1" "$tmp_link"
	replace_atomically "$tmp_link" "$2"
	link_changed=yes
}

current_version() {
	if [ -L "$opt/current" ]; then
		basename "$(readlink "$opt/current")"
	fi
}

installed_versions() {
	if [ -d "$opt/releases" ]; then
		for d in "$opt/releases"/*; do
			[ -x "$d/grapheon-agent" ] && basename "$d"
		done
	fi
	return 0
}

# Same regular files with the same content in both trees.
same_tree() {
	(cd "$1" && find . -type f | sort) >"$work/tree.a"
	(cd "$2" && find . -type f | sort) >"$work/tree.b"
	cmp -s "$work/tree.a" "$work/tree.b" || return 1
	while IFS= read -r f; do
		cmp -s "$1/$f" "$2/$f" || return 1
	done <"$work/tree.a"
}

# Installs file $1 as $2 (mode $3) unless it is already identical; file_changed says which.
put_file() {
	file_changed=no
	if [ -f "$2" ] && cmp -s "$1" "$2"; then
		return 0
	fi
	mkdir -p "$(dirname "$2")"
	cp "$1" "$2.tmp.$$"
	chmod "$3" "$2.tmp.$$"
	mv -f "$2.tmp.$$" "$2"
	file_changed=yes
}

# Finds the tarball and its SHA256SUMS (downloading them if needed) and checks the hash.
obtain_release() {
	if [ -n "$tarball" ]; then
		[ -f "$tarball" ] || die "no such tarball: $tarball"
		[ -n "$sums" ] || sums="$(dirname "$tarball")/SHA256SUMS"
		[ -f "$sums" ] || die "no SHA256SUMS for $tarball (looked for $sums; pass --sha256sums)"
		[ -n "$sig" ] || sig="$sums.sig"
		tar_name=$(basename "$tarball")
	else
		[ -n "$base_url" ] || usage_error "say where the release is: --tarball FILE or --base-url URL"
		base_url=${base_url%/}
		if [ -z "$sums" ]; then
			fetch "$base_url/SHA256SUMS" "$work/SHA256SUMS"
			sums="$work/SHA256SUMS"
		fi
		if [ -z "$sig" ] && [ "$allow_unsigned" = no ]; then
			fetch "$base_url/SHA256SUMS.sig" "$work/SHA256SUMS.sig"
			sig="$work/SHA256SUMS.sig"
		fi
		if [ -n "$want_version" ]; then
			tar_name="grapheon-agent-$want_version-$target.tar.gz"
		else
			tar_name=$(awk -v t="-$target.tar.gz" '{ n = $2; sub(/^\*/, "", n) }
				n ~ /^grapheon-agent-/ && substr(n, length(n) - length(t) + 1) == t { print n; exit }' "$sums")
			[ -n "$tar_name" ] || die "SHA256SUMS at $base_url lists no tarball for $target"
		fi
		check_name "tarball name" "$tar_name"
	fi
	if [ -n "$sig" ] && [ -f "$sig" ]; then
		verify_signature "$sums" "$sig"
	elif [ "$allow_unsigned" = yes ]; then
		signature_checked=no
		warn "no signature checked (--allow-unsigned): only the SHA-256 sums protect this install"
	else
		die "no signature ${sig:+($sig) }for $sums: releases are signed; refusing to install (--allow-unsigned installs on checksums alone)"
	fi
	expected=$(expected_sha256 "$sums" "$tar_name")
	[ -n "$expected" ] || die "$tar_name is not listed in $sums: refusing to install it"
	if [ -z "$tarball" ]; then
		tarball="$work/$tar_name"
		fetch "$base_url/$tar_name" "$tarball"
	fi
	actual=$(sha256_of "$tarball")
	[ "$expected" = "$actual" ] ||
		die "checksum mismatch for $tar_name (expected $expected, got $actual): refusing to install it"
	if [ "$signature_checked" = yes ]; then
		say "verified $tar_name (sha256 $actual, listed in the signed SHA256SUMS)"
	else
		say "verified $tar_name (sha256 $actual; the signature of SHA256SUMS was NOT checked)"
	fi
}

# Unpacks the verified tarball and checks it is the release its name says.
unpack_release() {
	case $tar_name in
	grapheon-agent-*-*.tar.gz) ;;
	*) die "not a release tarball name: $tar_name" ;;
	esac
	rest=${tar_name#grapheon-agent-}
	rest=${rest%.tar.gz}
	tar_target=''
	for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf; do
		case $rest in
		*-"$t") tar_target=$t ;;
		esac
	done
	[ -n "$tar_target" ] || die "unknown target in $tar_name"
	version=${rest%-"$tar_target"}
	check_name version "$version"
	[ "$tar_target" = "$target" ] || die "$tar_name is for $tar_target, not $target (see --target)"
	mkdir "$work/unpack"
	gzip -dc "$tarball" | (cd "$work/unpack" && tar -xf -) || die "cannot unpack $tar_name"
	src="$work/unpack/grapheon-agent-$version-$target"
	for f in grapheon-agent VERSION deploy/grapheon-agent.service deploy/grapheon-agent.timer \
		deploy/grapheon-agent.env.example scripts/install.sh; do
		[ -f "$src/$f" ] || die "$tar_name lacks $f"
	done
	[ "$(cat "$src/VERSION")" = "$version" ] || die "$tar_name holds VERSION $(cat "$src/VERSION")"
	check_release_binary "$src/grapheon-agent"
}

# Never point current at a binary that cannot start on this host, or that is another version
# than the release it came in (a stale binary packed by mistake would run under a wrong name).
# Checked on the unpacked copy, before anything is written; where the temporary directory does not
# allow running programs (noexec), on the installed copy before current is switched.
check_release_binary() {
	version_checked=no
	if [ "$tar_target" != "$(detect_target 2>/dev/null || true)" ]; then
		version_checked=yes
		say "not run: the $tar_target binary cannot run on this machine ($(uname -m)), so its version is unchecked"
		return 0
	fi
	status=0
	out=$("$1" --version 2>&1) || status=$?
	if [ "$status" = 126 ] && [ "$1" = "$src/grapheon-agent" ]; then
		say "cannot run programs in ${TMPDIR:-/tmp} (noexec?): checking the version once installed"
		return 0
	fi
	[ "$status" = 0 ] || die "the $version binary does not run here: $out"
	[ "$out" = "$version" ] ||
		die "$tar_name holds a binary that says it is version '$out', not $version: refusing to install it"
	version_checked=yes
}

# Copies the unpacked release to releases/<version>, next to any other installed one.
install_release() {
	dest="$opt/releases/$version"
	if [ -d "$dest" ]; then
		if same_tree "$src" "$dest"; then
			return 0
		fi
		[ "$force" = yes ] || die "release $version is already installed with other files; --force replaces it"
	fi
	mkdir -p "$opt/releases"
	stage="$opt/releases/.$version.tmp.$$"
	rm -rf "$stage"
	cp -R "$src" "$stage"
	chmod -R u=rwX,go=rX "$stage"
	chmod 0755 "$stage/grapheon-agent" "$stage"/scripts/*.sh
	if [ -d "$dest" ]; then
		rm -rf "$dest.old.$$"
		mv "$dest" "$dest.old.$$"
		mv "$stage" "$dest"
		rm -rf "$dest.old.$$"
	else
		mv "$stage" "$dest"
	fi
	changed=yes
	say "installed release $version in $prefix/releases/$version"
}

# A value goes into the env file unquoted, so refuse what the file format cannot carry as is.
check_env_value() {
	case $2 in
	*[!A-Za-z0-9._~:/?\&=+%@,-]*) die "$1 holds characters the env file cannot carry unquoted" ;;
	esac
}

# Writes the env file from the release's example the first time; never touches it afterwards.
write_env_file() {
	if [ -e "$root$env_file" ] || [ -L "$root$env_file" ]; then
		if [ -n "$server_url$enrollment_key" ] && [ "$mode" = install ]; then
			say "$env_file exists and is left as it is: edit it to change the server URL or key"
		fi
		case $(ls -lL "$root$env_file") in
		-rw-------* | -r--------*) ;;
		*) warn "$env_file can be read by other users and may hold the enrollment key: chmod 600 it" ;;
		esac
		check_env_state_dir
		return 0
	fi
	mkdir -p "$(dirname "$root$env_file")"
	(
		umask 077
		GRAPHEON_SET_URL=$server_url GRAPHEON_SET_KEY=$enrollment_key GRAPHEON_SET_STATE=$state_dir awk '
			/^#GRAPHEON_AGENT_SERVER_URL=/ && ENVIRON["GRAPHEON_SET_URL"] != "" {
				print "GRAPHEON_AGENT_SERVER_URL=" ENVIRON["GRAPHEON_SET_URL"]; next }
			/^#GRAPHEON_AGENT_ENROLLMENT_KEY=/ && ENVIRON["GRAPHEON_SET_KEY"] != "" {
				print "GRAPHEON_AGENT_ENROLLMENT_KEY=" ENVIRON["GRAPHEON_SET_KEY"]; next }
			/^#GRAPHEON_AGENT_STATE_DIR=/ && ENVIRON["GRAPHEON_SET_STATE"] != "/var/lib/grapheon-agent" {
				print "GRAPHEON_AGENT_STATE_DIR=" ENVIRON["GRAPHEON_SET_STATE"]; next }
			{ print }' "$opt/releases/$version/deploy/grapheon-agent.env.example" >"$root$env_file.tmp.$$"
	)
	chmod 0600 "$root$env_file.tmp.$$"
	mv -f "$root$env_file.tmp.$$" "$root$env_file"
	changed=yes
	say "wrote $env_file (mode 0600)"
}

# The value of KEY in the env file, as the agent reads it (last assignment wins; optional
# `export`, quotes and spaces around the value removed); empty when the file does not set it.
env_file_value() {
	awk -v k="$1" '
		{ line = $0; sub(/^[ \t]*/, "", line); sub(/^export[ \t]+/, "", line) }
		index(line, k "=") == 1 {
			v = substr(line, length(k) + 2); sub(/^[ \t]*/, "", v); sub(/[ \t]*$/, "", v)
			if (v ~ /^".*"$/ || v ~ /^\047.*\047$/) v = substr(v, 2, length(v) - 2)
			found = v
		}
		END { print found }' "$root$env_file" 2>/dev/null
}

# An env file written earlier (or by hand) that names another state directory than this install
# would make manual runs (--status, --set-api-key) and the service disagree: say so.
check_env_state_dir() {
	file_state_dir=$(env_file_value GRAPHEON_AGENT_STATE_DIR)
	if [ -n "$file_state_dir" ] && [ "$file_state_dir" != "$state_dir" ]; then
		warn "$env_file sets GRAPHEON_AGENT_STATE_DIR=$file_state_dir but this install uses $state_dir: the service uses $state_dir (set in its unit); edit $env_file so that both agree"
	elif [ -z "$file_state_dir" ] && [ "$state_dir" != /var/lib/grapheon-agent ]; then
		warn "$env_file does not set GRAPHEON_AGENT_STATE_DIR, so runs by hand use /var/lib/grapheon-agent while the service uses $state_dir: add GRAPHEON_AGENT_STATE_DIR=$state_dir to $env_file"
	fi
}

env_file_has_server() {
	grep -Eq '^[[:space:]]*GRAPHEON_AGENT_SERVER_URL=[^[:space:]]' "$root$env_file" 2>/dev/null
}

make_state_dir() {
	if [ -d "$root$state_dir" ]; then
		case $(ls -ld "$root$state_dir") in
		drwx------*) return 0 ;;
		esac
	fi
	mkdir -p "$root$state_dir"
	chmod 0700 "$root$state_dir"
	changed=yes
	say "state directory $state_dir (mode 0700)"
}

# The units carry the default paths; rewrite them when the install moved those.
render_unit() {
	sed -e "s|/opt/grapheon/agent/|$prefix/|g" \
		-e "s|/etc/grapheon-agent\\.env|$env_file|g" "$1" >"$2.sed"
	if [ "$state_dir" != /var/lib/grapheon-agent ]; then
		# The agent must be told the directory too: the environment wins over the env file.
		sed -e "s|^StateDirectory=grapheon-agent\$|ReadWritePaths=$state_dir\\
Environment=GRAPHEON_AGENT_STATE_DIR=$state_dir|" \
			-e "/^StateDirectoryMode=/d" "$2.sed" >"$2"
	else
		mv "$2.sed" "$2"
	fi
	rm -f "$2.sed"
}

# Installs the units of release $1 and reloads systemd when they changed.
install_units() {
	units_changed=no
	for u in grapheon-agent.service grapheon-agent.timer; do
		render_unit "$opt/releases/$1/deploy/$u" "$work/$u"
		put_file "$work/$u" "$root$unit_dir/$u" 0644
		if [ "$file_changed" = yes ]; then
			units_changed=yes
			changed=yes
			say "installed $unit_dir/$u"
		fi
	done
	if [ "$units_changed" = yes ]; then
		sc daemon-reload || warn "systemctl daemon-reload failed"
	fi
}

activate_timer() {
	if [ "$no_start" = yes ]; then
		say "timer not enabled (--no-start); to start it: systemctl enable --now grapheon-agent.timer"
	elif ! env_file_has_server; then
		say "no server URL in $env_file yet: set GRAPHEON_AGENT_SERVER_URL (and the enrollment key) there,"
		say "then run: systemctl enable --now grapheon-agent.timer"
	elif ! can_run_systemctl; then
		say "installed into $root: enable the timer on that system with systemctl enable --now grapheon-agent.timer"
	else
		if ! sc is-enabled --quiet grapheon-agent.timer; then
			sc enable grapheon-agent.timer || die "systemctl enable grapheon-agent.timer failed"
			changed=yes
			say "enabled grapheon-agent.timer"
		fi
		if ! sc is-active --quiet grapheon-agent.timer; then
			sc start grapheon-agent.timer || die "systemctl start grapheon-agent.timer failed"
			changed=yes
			say "started grapheon-agent.timer"
		fi
	fi
}

print_cron_hint() {
	say "systemd not found: run the agent from cron instead, for example as root's crontab entry"
	say "  */15 * * * * $prefix/current/grapheon-agent --config $env_file >/dev/null 2>&1"
	say "(keep GRAPHEON_AGENT_TIMER_INTERVAL_SECONDS in $env_file equal to the cron period, in seconds)"
}

do_install() {
	obtain_release
	unpack_release
	previous=$(current_version)
	if [ "$mode" = upgrade ] && [ -z "$previous" ]; then
		die "grapheon-agent is not installed in $prefix: use install.sh"
	fi
	changed=no
	release_was_installed=no
	[ ! -d "$opt/releases/$version" ] || release_was_installed=yes
	install_release
	if [ "$version_checked" = no ]; then
		if ! (check_release_binary "$opt/releases/$version/grapheon-agent"); then
			[ "$release_was_installed" = yes ] || rm -rf "$opt/releases/$version"
			exit 1
		fi
	fi
	set_symlink "releases/$version" "$opt/current"
	if [ "$link_changed" = yes ]; then
		changed=yes
		say "current -> releases/$version"
	fi
	if [ "$bin_link" != none ]; then
		set_symlink "$prefix/current/grapheon-agent" "$root$bin_link"
		if [ "$link_changed" = yes ]; then
			changed=yes
			say "$bin_link -> $prefix/current/grapheon-agent"
		fi
	fi
	write_env_file
	make_state_dir
	if use_systemd; then
		install_units "$version"
		activate_timer
	elif [ -z "$previous" ]; then
		print_cron_hint
	fi
	if [ "$changed" = no ]; then
		say "nothing to do: grapheon-agent $version is installed and current"
	elif [ -n "$previous" ] && [ "$previous" != "$version" ]; then
		say "upgraded grapheon-agent $previous -> $version (release $previous is kept)"
		say "to roll back: sh $prefix/current/scripts/rollback.sh $previous"
	else
		say "grapheon-agent $version is installed"
	fi
}

do_rollback() {
	[ -n "$want_version" ] || usage_error "name the version to roll back to (installed: $(installed_versions | tr '\n' ' '))"
	check_name version "$want_version"
	[ -x "$opt/releases/$want_version/grapheon-agent" ] ||
		die "release $want_version is not installed (installed: $(installed_versions | tr '\n' ' '))"
	previous=$(current_version)
	changed=no
	set_symlink "releases/$want_version" "$opt/current"
	if [ "$link_changed" = yes ]; then
		say "current -> releases/$want_version"
	else
		say "grapheon-agent $want_version is already current"
	fi
	if use_systemd; then
		install_units "$want_version"
	fi
	if [ -n "$previous" ] && [ "$previous" != "$want_version" ]; then
		say "rolled back grapheon-agent $previous -> $want_version"
		say "to undo: sh $prefix/current/scripts/rollback.sh $previous"
	fi
}

do_uninstall() {
	if use_systemd; then
		if [ -f "$root$unit_dir/grapheon-agent.timer" ] || [ -f "$root$unit_dir/grapheon-agent.service" ]; then
			sc disable --now grapheon-agent.timer || true
			sc stop grapheon-agent.service || true
			rm -f "$root$unit_dir/grapheon-agent.timer" "$root$unit_dir/grapheon-agent.service"
			sc daemon-reload || true
			say "removed the systemd units"
		fi
	fi
	if [ "$bin_link" != none ] && [ -L "$root$bin_link" ] &&
		[ "$(readlink "$root$bin_link")" = "$prefix/current/grapheon-agent" ]; then
		rm -f "$root$bin_link"
		say "removed $bin_link"
	fi
	if [ -d "$opt/releases" ] || [ -L "$opt/current" ]; then
		# Only what the installer made: the prefix may be shared (e.g. --prefix /opt).
		rm -rf "$opt/current" "$opt/releases" "$opt"/.current.tmp.*
		rmdir "$opt" 2>/dev/null || true
		if [ "$prefix" = /opt/grapheon/agent ]; then
			rmdir "$root/opt/grapheon" 2>/dev/null || true
		fi
		say "removed $prefix"
	fi
	if [ "$purge_state" = yes ]; then
		rm -rf "$root$state_dir"
		say "removed the state directory $state_dir"
	elif [ -d "$root$state_dir" ]; then
		say "kept the state directory $state_dir (agent identity and API key; --purge-state removes it)"
	fi
	if [ "$purge_config" = yes ]; then
		rm -f "$root$env_file"
		say "removed $env_file"
	elif [ -e "$root$env_file" ]; then
		say "kept $env_file (--purge-config removes it)"
	fi
}

main() {
	set -eu
	umask 022
	mode=${GRAPHEON_INSTALL_MODE:-install}
	root=${GRAPHEON_INSTALL_ROOT:-}
	prefix=${GRAPHEON_INSTALL_PREFIX:-/opt/grapheon/agent}
	env_file=${GRAPHEON_INSTALL_ENV_FILE:-/etc/grapheon-agent.env}
	state_dir=${GRAPHEON_INSTALL_STATE_DIR:-}
	unit_dir=${GRAPHEON_INSTALL_UNIT_DIR:-/etc/systemd/system}
	bin_link=${GRAPHEON_INSTALL_BIN_LINK:-/usr/local/bin/grapheon-agent}
	systemctl=${GRAPHEON_INSTALL_SYSTEMCTL:-systemctl}
	systemctl_overridden=no
	[ -n "${GRAPHEON_INSTALL_SYSTEMCTL:-}" ] && systemctl_overridden=yes
	systemd_mode=${GRAPHEON_INSTALL_SYSTEMD:-auto}
	default_base_url='' # set by the release workflow in the copy it publishes
	# The public half of the release signing key (ed25519, base64 DER). build-release.sh --test-key
	# replaces both lines in the copies it packs; see docs/operating.md, "Signed releases".
	release_public_key='MCowBQYDK2VwAyEAgyfDOdCgu5Mi1+Yb1RsAosNuawkZlpX74yKGQ59/lQM='
	release_key_kind=release
	base_url=${GRAPHEON_INSTALL_BASE_URL:-$default_base_url}
	server_url=${GRAPHEON_AGENT_SERVER_URL:-}
	enrollment_key=${GRAPHEON_AGENT_ENROLLMENT_KEY:-}
	tarball='' sums='' sig='' want_version='' target=''
	no_start=no force=no purge_state=no purge_config=no
	allow_http=no allow_unsigned=no signature_checked=no wget_warned=no version_checked=no

	while [ $# -gt 0 ]; do
		case $1 in
		--*=*)
			opt_name=${1%%=*}
			opt_value=${1#*=}
			shift
			set -- "$opt_name" "$opt_value" "$@"
			continue
			;;
		esac
		case $1 in
		-h | --help) usage; exit 0 ;;
		--no-start) no_start=yes ;;
		--force) force=yes ;;
		--purge-state) purge_state=yes ;;
		--purge-config) purge_config=yes ;;
		--allow-http) allow_http=yes ;;
		--allow-unsigned) allow_unsigned=yes ;;
		--mode | --tarball | --sha256sums | --signature | --base-url | --version | --target | --server-url | \
			--enrollment-key | --root | --prefix | --env-file | --state-dir | --unit-dir | \
			--bin-link | --systemctl | --systemd)
			[ $# -ge 2 ] || usage_error "$1 needs a value"
			case $1 in
			--mode) mode=$2 ;;
			--tarball) tarball=$2 ;;
			--sha256sums) sums=$2 ;;
			--signature) sig=$2 ;;
			--base-url) base_url=$2 ;;
			--version) want_version=$2 ;;
			--target) target=$2 ;;
			--server-url) server_url=$2 ;;
			--enrollment-key) enrollment_key=$2 ;;
			--root) root=$2 ;;
			--prefix) prefix=$2 ;;
			--env-file) env_file=$2 ;;
			--state-dir) state_dir=$2 ;;
			--unit-dir) unit_dir=$2 ;;
			--bin-link) bin_link=$2 ;;
			--systemctl) systemctl=$2 systemctl_overridden=yes ;;
			--systemd) systemd_mode=$2 ;;
			esac
			shift
			;;
		-*) usage_error "unknown option $1" ;;
		*)
			if [ "$mode" != rollback ] || [ -n "$want_version" ]; then
				usage_error "unexpected argument $1"
			fi
			want_version=$1
			;;
		esac
		shift
	done

	case $mode in
	install | upgrade | rollback | uninstall) ;;
	*) usage_error "unknown mode $mode" ;;
	esac
	root=${root%/}
	if [ -z "$state_dir" ]; then
		# Upgrades, rollbacks and uninstalls keep the directory an earlier --state-dir chose.
		state_dir=$(sed -n 's/^Environment=GRAPHEON_AGENT_STATE_DIR=//p' \
			"$root$unit_dir/grapheon-agent.service" 2>/dev/null | tail -n1)
		[ -n "$state_dir" ] || state_dir=/var/lib/grapheon-agent
	fi
	# The paths are written into the units with sed: keep them plain.
	for p in "$prefix" "$env_file" "$state_dir" "$unit_dir" "$bin_link" "${root:-/}"; do
		case $p in
		none) [ "$p" = "$bin_link" ] || usage_error "paths must be absolute: $p" ;;
		*[!A-Za-z0-9._/+-]*) usage_error "unusual characters in path: $p" ;;
		/*) ;;
		*) usage_error "paths must be absolute: $p" ;;
		esac
	done
	prefix=${prefix%/}
	opt="$root$prefix"
	if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
		die "run as root (or give --root DIR to install into another tree)"
	fi

	if [ -z "$target" ]; then
		target=$(detect_target)
	fi
	check_name target "$target"
	# Refuse bad input before anything is written.
	check_env_value "the server URL" "$server_url"
	check_env_value "the enrollment key" "$enrollment_key"

	work=$(mktemp -d "${TMPDIR:-/tmp}/grapheon-agent-install.XXXXXX") || die "cannot create a temporary directory"
	trap 'rm -rf "$work"' EXIT
	trap 'exit 130' INT TERM

	case $mode in
	install | upgrade) do_install ;;
	rollback) do_rollback ;;
	uninstall) do_uninstall ;;
	esac
}

main "$@"
