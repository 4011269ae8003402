#!/usr/bin/env bash
# Sign a release directory's SHA256SUMS with the ed25519 release key.
#
#   scripts/sign-release.sh --key FILE [--test-key] DIR
#
# Writes DIR/SHA256SUMS.sig (the raw 64-byte ed25519 signature of DIR/SHA256SUMS, which
# `openssl pkeyutl -verify -rawin` checks) and verifies it. The key's public half must be the one
# pinned in scripts/install.sh, so that a release can never be signed with a key the installers
# do not trust; --test-key (tests only) skips that check, and build-release.sh --test-key stamps
# the test key into the installers it packs instead. Needs OpenSSL 3.
set -euo pipefail

key='' test_key=no dir=''
die() {
	printf 'sign-release: error: %s\n' "$*" >&2
	exit 1
}
while [ $# -gt 0 ]; do
	case $1 in
	--key) key=${2:?--key needs a value}; shift ;;
	--test-key) test_key=yes ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
	-*) die "unknown option $1" ;;
	*) [ -z "$dir" ] || die "one directory only"; dir=$1 ;;
	esac
	shift
done
[ -n "$key" ] || die "--key FILE is required"
[ -n "$dir" ] || die "name the release directory"
[ -f "$dir/SHA256SUMS" ] || die "no SHA256SUMS in $dir"
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/signing.sh
. "$repo/scripts/lib/signing.sh"

public=$(public_key_b64 "$key") || die "cannot read the private key $key"
if [ "$test_key" = no ] && [ "$public" != "$(pinned_public_key "$repo/scripts/install.sh")" ]; then
	die "the key's public half ($public) is not the one pinned in scripts/install.sh: the installers would refuse this release"
fi
openssl pkeyutl -sign -inkey "$key" -rawin -in "$dir/SHA256SUMS" -out "$dir/SHA256SUMS.sig.tmp" ||
	die "signing failed (an ed25519 key and OpenSSL 3 are needed)"
printf '%s\n%s\n%s\n' '-----BEGIN PUBLIC KEY-----' "$public" '-----END PUBLIC KEY-----' >"$dir/.release-key.pem"
openssl pkeyutl -verify -pubin -inkey "$dir/.release-key.pem" -rawin -in "$dir/SHA256SUMS" \
	-sigfile "$dir/SHA256SUMS.sig.tmp" >/dev/null || die "the signature just made does not verify"
rm -f "$dir/.release-key.pem"
mv "$dir/SHA256SUMS.sig.tmp" "$dir/SHA256SUMS.sig"
echo "sign-release: signed $dir/SHA256SUMS with the ed25519 key $public$([ "$test_key" = no ] || echo " (a TEST key)")"
