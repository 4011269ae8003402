# shellcheck shell=bash
# Helpers shared by the packaging tests (sourced by bash; not executable on its own).
#
# A test is a function; `run_test NAME FUNCTION [ARGS...]` runs it in a subshell with `set -e`,
# keeps its output in a log and prints `ok NAME` or `FAIL NAME` followed by that log. Assertions
# print what differs and exit the subshell. Counts go to $PACKAGING_RESULTS (one word a line:
# pass, fail or skip) so that test-packaging.sh can add them up across files.

PACKAGING_RESULTS=${PACKAGING_RESULTS:-$(mktemp)}
PACKAGING_LOGS=${PACKAGING_LOGS:-$(mktemp -d)}
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=scripts/lib/target-dir.sh
. "$REPO/scripts/lib/target-dir.sh"
# Where cargo put the binaries build-release.sh packed (CARGO_TARGET_DIR honoured).
TARGET_DIR=${TARGET_DIR:-$(cargo_target_dir "$REPO")}
# shellcheck source=scripts/lib/signing.sh
. "$REPO/scripts/lib/signing.sh"
# The ed25519 key test releases are signed with: made by test-packaging.sh on its first run and
# kept with the other tools. It is a test key: only installers stamped by stamp_test_key (or
# build-release.sh --test-key) trust it, and they warn about it on every run.
TEST_SIGNING_KEY=${GRAPHEON_TEST_SIGNING_KEY:-${PACKAGING_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/grapheon-packaging-tools}/test-release-signing-key.pem}

die() {
	fail "$@"
}

# make_test_scripts DIR: the four lifecycle scripts in DIR, install.sh trusting the test key.
make_test_scripts() {
	mkdir -p "$1"
	cp "$REPO/scripts/upgrade.sh" "$REPO/scripts/rollback.sh" "$REPO/scripts/uninstall.sh" "$1/"
	stamp_test_key "$REPO/scripts/install.sh" "$1/install.sh" "$(public_key_b64 "$TEST_SIGNING_KEY")"
	chmod 755 "$1"/*.sh
}

# doc_block FILE REGEX: the fenced code block of FILE (without its fences) holding a line that
# matches REGEX, so that tests run the commands the documentation shows, as written there.
doc_block() {
	awk -v re="$2" '
		/^```/ { if (inside) { if (hit) { printf "%s", block; found = 1; exit } inside = 0 } else { inside = 1; block = ""; hit = 0 } next }
		inside { block = block $0 "\n"; if ($0 ~ re) hit = 1 }
		END { if (!found) exit 1 }' "$1" || fail "no code block matching '$2' in $1"
}

# sign_test_release DIR: DIR/SHA256SUMS.sig made with the test key.
sign_test_release() {
	bash "$REPO/scripts/sign-release.sh" --key "$TEST_SIGNING_KEY" --test-key "$1" >/dev/null
}

run_test() {
	local name=$1 log status
	shift
	log="$PACKAGING_LOGS/${name//\//_}.log"
	set +e
	(
		set -euo pipefail
		"$@"
	) >"$log" 2>&1
	status=$?
	set -e
	if [ $status -eq 0 ]; then
		echo pass >>"$PACKAGING_RESULTS"
		echo "ok   $name"
	elif [ $status -eq 77 ]; then
		echo skip >>"$PACKAGING_RESULTS"
		echo "skip $name: $(tail -n1 "$log")"
	else
		echo fail >>"$PACKAGING_RESULTS"
		echo "FAIL $name (exit $status); its output:"
		sed 's/^/    | /' "$log"
	fi
}

fail() {
	echo "assertion failed: $*" >&2
	exit 1
}

skip() {
	echo "$*"
	exit 77
}

# Whole-value comparison; shows both sides on failure.
assert_eq() {
	local what=$1 expected=$2 actual=$3
	if [ "$expected" != "$actual" ]; then
		echo "--- expected $what" >&2
		printf '%s\n' "$expected" >&2
		echo "--- actual $what" >&2
		printf '%s\n' "$actual" >&2
		fail "$what differs"
	fi
}

assert_contains_line() {
	local what=$1 line=$2 text=$3
	if ! grep -qxF -- "$line" <<<"$text"; then
		echo "--- $what" >&2
		printf '%s\n' "$text" >&2
		fail "$what lacks the line: $line"
	fi
}

assert_mode() {
	assert_eq "mode of $1" "$2" "$(stat -c %a "$1")"
}

assert_same_file() {
	cmp -s "$1" "$2" || {
		diff -u "$1" "$2" >&2 || true
		fail "$2 differs from $1"
	}
}

assert_absent() {
	if [ -e "$1" ] || [ -L "$1" ]; then
		fail "$1 exists"
	fi
}

# Exit status of a command that is expected to fail, with its output kept in $out.
expect_failure() {
	local status=0
	out=$("$@" 2>&1) || status=$?
	if [ $status -eq 0 ]; then
		printf '%s\n' "$out" >&2
		fail "expected failure: $*"
	fi
	printf '%s\n' "$out"
}

# Every path below $1 with its type, mode, link target and content hash: equal snapshots mean
# nothing was created, removed or changed.
tree_snapshot() {
	(
		cd "$1"
		find . -printf '%y %m %p -> %l\n' | sort
		find . -type f -print0 | sort -z | xargs -0 -r sha256sum
	)
}
