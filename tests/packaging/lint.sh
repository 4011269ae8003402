#!/usr/bin/env bash
# Linters over the packaging: shellcheck on every shell script (POSIX sh for the lifecycle
# scripts, which must run under BusyBox sh and dash), actionlint on the workflows (which also
# runs shellcheck on their run: steps), hadolint on the Dockerfile; test-packaging.sh installs them.
#
#   bash tests/packaging/lint.sh
set -euo pipefail
# shellcheck source=tests/packaging/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO"

test_posix_lifecycle_scripts_pass_shellcheck_as_sh() {
	shellcheck --version | sed -n 2p
	shellcheck -x -s sh scripts/install.sh scripts/upgrade.sh scripts/rollback.sh scripts/uninstall.sh \
		tests/packaging/fake-systemctl
}

test_bash_scripts_pass_shellcheck() {
	shellcheck -x -s bash scripts/build-release.sh scripts/check-version.sh scripts/check-self-contained.sh scripts/lib/os-packages.sh scripts/test-packaging.sh scripts/lib/packages.sh \
		scripts/lib/target-dir.sh scripts/lib/signing.sh scripts/sign-release.sh .ci/run tests/packaging/*.sh
}

# A copy of the tracked files, so that the probe lines below never touch the work tree.
repo_copy() {
	local copy=$1
	mkdir -p "$copy"
	git ls-files -z | xargs -0 cp -P --parents -t "$copy"
}

test_nothing_reads_outside_the_repository() {
	bash scripts/check-self-contained.sh
}

test_self_contained_check_catches_reads_outside_the_repository() {
	local copy line out status
	copy=$(mktemp -d)
	repo_copy "$copy"
	# One probe per pattern the check knows; each must be reported with its file and line.
	while IFS= read -r line; do
		printf 'fn probe() {}\n%s\n' "$line" >"$copy/tests/probe.rs"
		status=0
		out=$(bash "$copy/scripts/check-self-contained.sh" --repo "$copy" 2>&1) || status=$?
		[ $status -eq 1 ] || fail "exit $status for: $line"
		assert_contains_line "report for: $line" "check-self-contained: tests/probe.rs:2:$line" "$out"
	done < <(
		# Written in pieces, so that this file itself passes the check.
		up=.. root=/work
		printf '%s\n' "let dir = concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/$up/shared/contract/samples\");" \
			"let dir = concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/$up/elsewhere\");" \
			"cp \"\$REPO/$up/notes\" ." \
			"cat $root/shared/contract/README.md"
	)
	rm -rf "$copy"
}

test_workflows_pass_actionlint() {
	actionlint -version | head -n1
	actionlint -no-color .github/workflows/*.yml
}

test_dockerfile_passes_hadolint() {
	hadolint --version
	hadolint --failure-threshold info Dockerfile
}

for t in $(declare -F | awk '$3 ~ /^test_/ { print $3 }'); do
	run_test "lint/${t#test_}" "$t"
done
