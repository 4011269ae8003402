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
	shellcheck -x -s bash scripts/build-release.sh scripts/check-version.sh scripts/test-packaging.sh scripts/lib/packages.sh \
		tests/packaging/*.sh
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
