# shellcheck shell=bash
# need_packages PKG...: installs the Debian packages among the arguments that are not installed
# yet (one `apt-get update` per script run). Sourced by build-release.sh and test-packaging.sh,
# which define say() and die(); a caller that sets install_tools=no gets an error instead.

pkg_sudo=()
[ "$(id -u)" = 0 ] || pkg_sudo=(sudo)
pkg_apt_updated=no

need_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "${install_tools:-yes}" = yes ] || die "missing packages: ${missing[*]} (run without --no-install)"
	command -v apt-get >/dev/null || die "missing packages: ${missing[*]} and no apt-get to install them"
	say "installing ${missing[*]}"
	if [ "$pkg_apt_updated" = no ]; then
		"${pkg_sudo[@]}" apt-get update -qq
		pkg_apt_updated=yes
	fi
	"${pkg_sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
