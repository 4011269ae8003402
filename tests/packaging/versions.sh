#!/usr/bin/env bash
# check-version.sh tests on small fixture trees, then the real check on this repository with the
# built x86_64 binary (skipped, saying so, while the tree has no CHANGELOG.md yet).
#
#   bash tests/packaging/versions.sh
set -euo pipefail
# shellcheck source=tests/packaging/lib.sh
. "$(dirname "$0")/lib.sh"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# A tree where everything says 1.2.3; the binary prints $1 (printf format) and exits $2.
fixture() {
	F=$(mktemp -d "$scratch/tree.XXXXXX")
	echo 1.2.3 >"$F/VERSION"
	cat >"$F/Cargo.toml" <<'TOML'
[package]
name = "grapheon-agent"
version = "1.2.3"

[dependencies]
libc = { version = "0.2" }

[dev-dependencies.flate2]
version = "1"
TOML
	cat >"$F/Cargo.lock" <<'LOCK'
version = 4

[[package]]
name = "adler2"
version = "2.0.1"

[[package]]
name = "grapheon-agent"
version = "1.2.3"
LOCK
	cat >"$F/CHANGELOG.md" <<'MD'
# Changelog

## [Unreleased]

### Added
- Something not released yet.

## [1.2.3] - 2026-11-30

### Added
- First release.

## [1.2.2] - 2026-11-01
MD
	cat >"$F/agent" <<SH
#!/bin/sh
[ "\$1" = --version ] || exit 2
printf '${1:-1.2.3\\n}'
exit ${2:-0}
SH
	chmod +x "$F/agent"
}

check() {
	bash "$REPO/scripts/check-version.sh" --repo "$F" --binary "$F/agent"
}

test_agreeing_versions_pass_with_an_unreleased_section_above() {
	fixture
	out=$(check)
	assert_eq output "check-version: ok   VERSION is 1.2.3
check-version: ok   Cargo.toml version is 1.2.3
check-version: ok   Cargo.lock grapheon-agent version is 1.2.3
check-version: ok   CHANGELOG.md newest entry is [1.2.3] of 2026-11-30
check-version: ok   grapheon-agent --version prints 1.2.3
check-version: all versions agree on 1.2.3" "$out"
}

test_changelog_behind_version_fails() {
	fixture
	echo 1.2.4 >"$F/VERSION"
	sed -i 's/1\.2\.3/1.2.4/' "$F/Cargo.toml" "$F/Cargo.lock"
	expect_failure check
	assert_contains_line output "check-version: FAIL CHANGELOG.md newest entry is [1.2.3], VERSION is '1.2.4'" "$out"
	grep -q "^check-version: FAIL grapheon-agent --version printed '1.2.3$" <<<"$out" || fail "binary mismatch not reported"
	assert_eq "summary" "check-version: 2 check(s) failed" "$(tail -n1 <<<"$out")"
}

test_cargo_toml_mismatch_fails_and_dependency_versions_are_ignored() {
	fixture
	sed -i '0,/version = "1.2.3"/s//version = "1.3.0"/' "$F/Cargo.toml"
	expect_failure check
	assert_contains_line output "check-version: FAIL Cargo.toml [package] version is '1.3.0', VERSION is '1.2.3'" "$out"
}

test_cargo_lock_mismatch_fails() {
	fixture
	sed -i 's/^version = "1.2.3"/version = "1.2.0"/' "$F/Cargo.lock"
	expect_failure check
	assert_contains_line output "check-version: FAIL Cargo.lock has grapheon-agent '1.2.0', VERSION is '1.2.3' (run cargo update -p grapheon-agent)" "$out"
}

test_binary_without_trailing_newline_fails() {
	fixture '1.2.3'
	expect_failure check
	grep -q "^check-version: FAIL grapheon-agent --version printed '1.2.3' and exited 0, expected '1.2.3', a newline and 0$" <<<"$out" ||
		fail "a missing newline was not reported"
}

test_binary_exit_status_counts() {
	fixture '1.2.3\n' 1
	expect_failure check
	grep -q "and exited 1, expected" <<<"$out" || fail "a failing --version was not reported"
}

test_only_unreleased_entries_fail() {
	fixture
	sed -i '/^## \[1\.2\./,$d' "$F/CHANGELOG.md"
	expect_failure check
	assert_contains_line output "check-version: FAIL CHANGELOG.md newest entry '' is not '## [X.Y.Z] - YYYY-MM-DD'" "$out"
}

test_entry_without_date_fails() {
	fixture
	sed -i 's/^## \[1\.2\.3\] - 2026-11-30$/## [1.2.3]/' "$F/CHANGELOG.md"
	expect_failure check
	assert_contains_line output "check-version: FAIL CHANGELOG.md newest entry '## [1.2.3]' is not '## [X.Y.Z] - YYYY-MM-DD'" "$out"
}

# With a shared target directory, target/ of the tree may hold a stale binary: the one cargo
# builds is in CARGO_TARGET_DIR, and that is the one asked.
test_binary_is_looked_up_in_cargo_target_dir() {
	fixture
	mkdir -p "$F/target/release" "$scratch/shared-target/release"
	printf '#!/bin/sh\necho 0.9.0\n' >"$F/target/release/grapheon-agent"
	printf '#!/bin/sh\necho 1.2.3\n' >"$scratch/shared-target/release/grapheon-agent"
	chmod 755 "$F/target/release/grapheon-agent" "$scratch/shared-target/release/grapheon-agent"
	out=$(CARGO_TARGET_DIR=$scratch/shared-target bash "$REPO/scripts/check-version.sh" --repo "$F" 2>&1)
	assert_contains_line output "check-version: ok   grapheon-agent --version prints 1.2.3" "$out"
	expect_failure env -u CARGO_TARGET_DIR bash "$REPO/scripts/check-version.sh" --repo "$F"
	# The message quotes the output with its newline.
	assert_contains_line output "check-version: FAIL grapheon-agent --version printed '0.9.0" "$out"
	assert_contains_line output "' and exited 0, expected '1.2.3', a newline and 0" "$out"
}

test_this_repository_agrees_with_its_binary() {
	[ -f "$REPO/CHANGELOG.md" ] || skip "this tree has no CHANGELOG.md yet: the full check runs once it has"
	bash "$REPO/scripts/check-version.sh" --binary "$TARGET_DIR/x86_64-unknown-linux-musl/release/grapheon-agent"
}

for t in $(declare -F | awk '$3 ~ /^test_/ { print $3 }'); do
	run_test "versions/${t#test_}" "$t"
done
