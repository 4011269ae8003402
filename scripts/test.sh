#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need when it is
# missing (as root), then runs formatting, lints and every test. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cc >/dev/null || missing+=(gcc)
command -v musl-gcc >/dev/null || missing+=(musl-tools)
command -v ip >/dev/null || missing+=(iproute2)
command -v ss >/dev/null || missing+=(iproute2)
command -v netstat >/dev/null || missing+=(net-tools)
command -v busybox >/dev/null || missing+=(busybox)
command -v gzip >/dev/null || missing+=(gzip)
command -v python3 >/dev/null || missing+=(python3)
# The root tests enter and make namespaces with util-linux's unshare and nsenter.
{ command -v unshare && command -v nsenter; } >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
    exit 2
  fi
  echo "test.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

scripts/check-self-contained.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
