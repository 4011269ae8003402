#!/usr/bin/env bash
# Fails when code, tests or scripts read outside the repository: a user's clone has nothing
# beside it (no shared/ next to it), and /work is only the machine this project was first built on.
#
#   scripts/check-self-contained.sh [--repo DIR]
#
# Looks in src/, tests/, scripts/, .ci/, .github/, build.rs and the Dockerfile for a parent of the
# repository (shared/ one level up, `CARGO_MANIFEST_DIR` followed by `/..`, `$REPO/..`) or an absolute
# path under /work. Prints each offending line as FILE:LINE: TEXT; exit 1 when there is one.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
	case $1 in
	--repo) repo=${2:?--repo needs a value}; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "check-self-contained: unknown option $1" >&2; exit 2 ;;
	esac
	shift
done
cd "$repo"

# Assembled from pieces so that this file does not match itself.
dotdot='\.\.'
patterns=(
	"$dotdot/shared"
	"CARGO_MANIFEST_DIR[\"')]*[[:space:],]*\"?/$dotdot"
	"\\\$\\{?(REPO|repo)\\}?/$dotdot"
	"(^|[^A-Za-z0-9_.])/work/"
)
paths=()
for p in src tests scripts .ci .github build.rs Dockerfile; do
	[ -e "$p" ] && paths+=("$p")
done
args=()
for p in "${patterns[@]}"; do
	args+=(-e "$p")
done
# Binary files are not code; the captured command outputs mention no paths we read.
if hits=$(grep -rnIE "${args[@]}" "${paths[@]}" | grep -v '^scripts/check-self-contained\.sh:'); then
	printf '%s\n' "$hits" | sed 's/^/check-self-contained: /' >&2
	echo "check-self-contained: the lines above read outside the repository; copy what they need into it (tests/fixtures/)" >&2
	exit 1
fi
echo "check-self-contained: nothing under ${paths[*]} reads outside the repository"
