# shellcheck shell=bash
# Release signing helpers, sourced by build-release.sh and sign-release.sh (which define die()).
# The release key is ed25519; install.sh pins its public half as base64 DER on one line,
# `release_public_key='...'`, next to `release_key_kind=release`.

# public_key_b64 KEYFILE: the base64 DER of the public half of a private key, as install.sh pins it.
public_key_b64() {
	openssl pkey -in "$1" -pubout | sed -e '/^-----/d' | tr -d '\n'
}

# pinned_public_key INSTALL_SH: the key an installer trusts.
pinned_public_key() {
	sed -n "s/^[[:space:]]*release_public_key='\\([^']*\\)'.*/\\1/p" "$1"
}

# stamp_test_key SRC DEST PUBLIC_B64: a copy of installer SRC that trusts a test key instead of the
# release key and says so on every run (release_key_kind=test); for test releases only.
stamp_test_key() {
	sed -e "s|^\\([[:space:]]*\\)release_public_key='[^']*'|\\1release_public_key='$3'|" \
		-e "s|^\\([[:space:]]*\\)release_key_kind=release\$|\\1release_key_kind=test|" "$1" >"$2"
	if ! grep -q "release_public_key='$3'" "$2" || ! grep -q 'release_key_kind=test$' "$2"; then
		die "could not stamp the test key into $2"
	fi
}
