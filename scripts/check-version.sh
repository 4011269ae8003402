#!/usr/bin/env bash
# Check that every place naming the release version agrees:
#   VERSION, Cargo.toml ([package] version), Cargo.lock (the grapheon-agent package),
#   the newest released entry of CHANGELOG.md (`## [X.Y.Z] - YYYY-MM-DD`; `## [Unreleased]` is
#   skipped) and `grapheon-agent --version` (exactly VERSION and a newline).
#
#   scripts/check-version.sh [--repo DIR] [--binary PATH | --no-binary]
#
# Without --binary it runs the first of <target>/x86_64-unknown-linux-musl/release/grapheon-agent
# and <target>/release/grapheon-agent that exists, <target> being cargo's target directory
# (CARGO_TARGET_DIR or .cargo/config.toml honoured; target/ of --repo otherwise). Prints one line per check; exit 1 on any mismatch.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
binary=''
check_binary=yes

while [ $# -gt 0 ]; do
	case $1 in
	--repo) repo=${2:?--repo needs a value}; shift ;;
	--binary) binary=${2:?--binary needs a value}; shift ;;
	--no-binary) check_binary=no ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "check-version: unknown option $1" >&2; exit 2 ;;
	esac
	shift
done

failures=0
ok() { printf 'check-version: ok   %s\n' "$*"; }
bad() {
	printf 'check-version: FAIL %s\n' "$*" >&2
	failures=$((failures + 1))
}

[ -f "$repo/VERSION" ] || { bad "no VERSION file in $repo"; exit 1; }
version=$(cat "$repo/VERSION")
if [ "$(wc -l <"$repo/VERSION")" -ne 1 ] || [ "$version" != "$(head -n1 "$repo/VERSION")" ]; then
	bad "VERSION must be one line ending in a newline"
fi
if [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$ ]]; then
	ok "VERSION is $version"
else
	bad "VERSION '$version' is not a semantic version"
fi

# The version key of the [package] table, not of a dependency table.
cargo_version=$(awk '
	/^\[/ { in_package = ($0 == "[package]") }
	in_package && /^version[[:space:]]*=/ { v = $0; sub(/^[^"]*"/, "", v); sub(/".*$/, "", v); print v; exit }
' "$repo/Cargo.toml" 2>/dev/null || true)
if [ "$cargo_version" = "$version" ]; then
	ok "Cargo.toml version is $cargo_version"
else
	bad "Cargo.toml [package] version is '${cargo_version}', VERSION is '$version'"
fi

if [ -f "$repo/Cargo.lock" ]; then
	lock_version=$(awk '
		/^\[\[package\]\]/ { ours = 0 }
		/^name = "grapheon-agent"$/ { ours = 1 }
		ours && /^version = / { v = $0; sub(/^[^"]*"/, "", v); sub(/".*$/, "", v); print v; exit }
	' "$repo/Cargo.lock")
	if [ "$lock_version" = "$version" ]; then
		ok "Cargo.lock grapheon-agent version is $lock_version"
	else
		bad "Cargo.lock has grapheon-agent '${lock_version}', VERSION is '$version' (run cargo update -p grapheon-agent)"
	fi
fi

if [ -f "$repo/CHANGELOG.md" ]; then
	heading=$(grep -E '^## \[' "$repo/CHANGELOG.md" | grep -v -i '^## \[unreleased\]' | head -n1 || true)
	if [[ $heading =~ ^##\ \[([^]]+)\]\ -\ ([0-9]{4}-[0-9]{2}-[0-9]{2})$ ]]; then
		if [ "${BASH_REMATCH[1]}" = "$version" ]; then
			ok "CHANGELOG.md newest entry is [$version] of ${BASH_REMATCH[2]}"
		else
			bad "CHANGELOG.md newest entry is [${BASH_REMATCH[1]}], VERSION is '$version'"
		fi
	else
		bad "CHANGELOG.md newest entry '${heading}' is not '## [X.Y.Z] - YYYY-MM-DD'"
	fi
else
	bad "no CHANGELOG.md in $repo"
fi

if [ "$check_binary" = yes ]; then
	if [ -z "$binary" ]; then
		# shellcheck source=scripts/lib/target-dir.sh
		. "$(dirname "$0")/lib/target-dir.sh"
		target_dir=$(cargo_target_dir "$repo" 2>/dev/null) || target_dir=${CARGO_TARGET_DIR:-$repo/target}
		for candidate in x86_64-unknown-linux-musl/release/grapheon-agent release/grapheon-agent; do
			if [ -x "$target_dir/$candidate" ]; then
				binary=$target_dir/$candidate
				break
			fi
		done
	fi
	if [ -z "$binary" ] || [ ! -x "$binary" ]; then
		bad "no grapheon-agent binary to ask (build it, or pass --binary PATH / --no-binary)"
	else
		# The sentinel (x and the exit status) keeps the newline that $(...) would strip.
		printed=$("$binary" --version 2>/dev/null; echo "x$?")
		if [ "$printed" = "$version"$'\n'x0 ]; then
			ok "grapheon-agent --version prints $version"
		else
			bad "grapheon-agent --version printed '${printed%x*}' and exited ${printed##*x}, expected '$version', a newline and 0"
		fi
	fi
fi

if [ $failures -ne 0 ]; then
	echo "check-version: $failures check(s) failed" >&2
	exit 1
fi
echo "check-version: all versions agree on $version"
