#!/usr/bin/env bash
# Tests of what scripts/build-release.sh produced in $DIST: the SHA256SUMS file matches the
# tarballs, each tarball has the release layout and the binary cargo built, the x86_64 and
# aarch64 binaries are static, and the aarch64 one runs under qemu user-mode emulation.
#
#   DIST=dist bash tests/packaging/release.sh
set -euo pipefail
# shellcheck source=tests/packaging/lib.sh
. "$(dirname "$0")/lib.sh"

DIST=$(cd "${DIST:-$REPO/dist}" && pwd)
VERSION=$(cat "$REPO/VERSION")
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

expected_listing() {
	local name="grapheon-agent-$VERSION-$1" f
	{
		echo "$name/"
		for f in deploy/ deploy/grapheon-agent.env.example deploy/grapheon-agent.service \
			deploy/grapheon-agent.timer grapheon-agent scripts/ scripts/install.sh scripts/rollback.sh \
			scripts/uninstall.sh scripts/upgrade.sh VERSION; do
			echo "$name/$f"
		done
		for f in README.md CHANGELOG.md LICENSE; do
			[ ! -f "$REPO/$f" ] || echo "$name/$f"
		done
	} | sort
}

test_sha256sums_match_the_tarballs() {
	(cd "$DIST" && sha256sum -c SHA256SUMS)
	for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
		grep -qE "^[0-9a-f]{64}  grapheon-agent-$VERSION-$target\.tar\.gz$" "$DIST/SHA256SUMS" ||
			fail "SHA256SUMS lacks the $target tarball"
	done
}

test_tarballs_hold_the_release_layout_and_the_built_binary() {
	for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
		tarball="$DIST/grapheon-agent-$VERSION-$target.tar.gz"
		assert_eq "contents of $(basename "$tarball")" "$(expected_listing "$target")" "$(tar -tzf "$tarball" | sort)"
		mkdir -p "$scratch/$target"
		tar -xzf "$tarball" -C "$scratch/$target"
		dir="$scratch/$target/grapheon-agent-$VERSION-$target"
		assert_same_file "$TARGET_DIR/$target/release/grapheon-agent" "$dir/grapheon-agent"
		assert_mode "$dir/grapheon-agent" 755
		assert_mode "$dir/scripts/install.sh" 755
		assert_eq "VERSION in the tarball" "$VERSION" "$(cat "$dir/VERSION")"
		assert_same_file "$REPO/deploy/grapheon-agent.service" "$dir/deploy/grapheon-agent.service"
		assert_eq "owners" "0/0" "$(tar --numeric-owner -tvzf "$tarball" | awk '{ print $2 }' | sort -u)"
	done
}

test_sha256sums_is_signed_by_the_test_key_the_packed_installers_trust() {
	local pub
	pub=$(public_key_b64 "$TEST_SIGNING_KEY")
	printf '%s\n%s\n%s\n' '-----BEGIN PUBLIC KEY-----' "$pub" '-----END PUBLIC KEY-----' >"$scratch/test-key.pub.pem"
	openssl pkeyutl -verify -pubin -inkey "$scratch/test-key.pub.pem" -rawin -in "$DIST/SHA256SUMS" \
		-sigfile "$DIST/SHA256SUMS.sig"
	stamp_test_key "$REPO/scripts/install.sh" "$scratch/expected-install.sh" "$pub"
	for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
		tar -xzf "$DIST/grapheon-agent-$VERSION-$target.tar.gz" -C "$scratch" "grapheon-agent-$VERSION-$target/scripts/install.sh"
		assert_same_file "$scratch/expected-install.sh" "$scratch/grapheon-agent-$VERSION-$target/scripts/install.sh"
	done
	# Nothing but the key and its kind differ from the committed installer.
	assert_eq "changed lines" "< 	release_public_key='$(pinned_public_key "$REPO/scripts/install.sh")'
< 	release_key_kind=release
---
> 	release_public_key='$pub'
> 	release_key_kind=test" "$(diff "$REPO/scripts/install.sh" "$scratch/expected-install.sh" | sed 1d)"
}

# docs/operating.md's check by hand, as written there, beside a tarball's install.sh.
test_signature_check_by_hand_from_the_docs_passes() {
	mkdir -p "$scratch/by-hand"
	cp "$DIST"/SHA256SUMS "$DIST"/SHA256SUMS.sig "$DIST"/*.tar.gz "$scratch/by-hand/"
	tar -xzf "$DIST/grapheon-agent-$VERSION-x86_64-unknown-linux-musl.tar.gz" -O \
		"grapheon-agent-$VERSION-x86_64-unknown-linux-musl/scripts/install.sh" >"$scratch/by-hand/install.sh"
	(cd "$scratch/by-hand" && bash -euo pipefail -c "$(doc_block "$REPO/docs/operating.md" 'pkeyutl -verify')")
	# A SHA256SUMS changed after signing fails the same commands.
	echo "0000000000000000000000000000000000000000000000000000000000000000  extra" >>"$scratch/by-hand/SHA256SUMS"
	! (cd "$scratch/by-hand" && bash -euo pipefail -c "$(doc_block "$REPO/docs/operating.md" 'pkeyutl -verify')") ||
		fail "a changed SHA256SUMS passed the check by hand"
}

# docs/operating.md's key commands make a key sign-release.sh accepts once it is pinned.
test_release_key_commands_from_the_docs_make_a_pinnable_key() {
	local block pub
	block=$(doc_block "$REPO/docs/operating.md" 'genpkey -algorithm ed25519')
	mkdir -p "$scratch/newkey"
	pub=$(cd "$scratch/newkey" && bash -euo pipefail -c "$block")
	[[ $pub =~ ^MCowBQYDK2VwAyEA[A-Za-z0-9+/]{43}=$ ]] || fail "not an ed25519 public key: $pub"
	assert_eq "public half" "$(public_key_b64 "$scratch/newkey/release-signing-key.pem")" "$pub"
}

test_sign_release_refuses_a_key_the_installers_do_not_pin() {
	mkdir -p "$scratch/to-sign"
	cp "$DIST/SHA256SUMS" "$scratch/to-sign/"
	expect_failure bash "$REPO/scripts/sign-release.sh" --key "$TEST_SIGNING_KEY" "$scratch/to-sign"
	assert_eq "output" "sign-release: error: the key's public half ($(public_key_b64 "$TEST_SIGNING_KEY")) is not the one pinned in scripts/install.sh: the installers would refuse this release" "$out"
	assert_absent "$scratch/to-sign/SHA256SUMS.sig"
}

# cargo auditable's .dep-v0 section (zlib-compressed JSON, what cargo audit, trivy and syft read)
# names the crates linked in; the SBOM beside the release must list exactly those as required.
test_binary_carries_its_dependency_list_and_the_sbom_lists_the_same_crates() {
	local bin="$TARGET_DIR/x86_64-unknown-linux-musl/release/grapheon-agent"
	local sbom="$DIST/grapheon-agent-$VERSION-x86_64-unknown-linux-musl.cdx.json"
	objcopy --dump-section .dep-v0="$scratch/dep-v0" "$bin" "$scratch/unused-copy"
	embedded=$(python3 -c '
import json, sys, zlib
d = json.loads(zlib.decompress(open(sys.argv[1], "rb").read()))
print("\n".join(sorted(p["name"] + "@" + p["version"] for p in d["packages"]
                        if p.get("kind", "runtime") == "runtime" and not p.get("root"))))' "$scratch/dep-v0")
	listed=$(python3 -c '
import json, sys
b = json.load(open(sys.argv[1]))
assert b["bomFormat"] == "CycloneDX" and b["specVersion"] == "1.5", "not a CycloneDX 1.5 document"
assert b["metadata"]["component"]["purl"] == "pkg:cargo/grapheon-agent@" + sys.argv[2], b["metadata"]["component"]
print("\n".join(sorted(c["name"] + "@" + c["version"] for c in b["components"] if c["scope"] == "required")))' "$sbom" "$VERSION")
	[ -n "$embedded" ] || fail "the .dep-v0 section lists no crates"
	assert_eq "crates linked in (.dep-v0) and required in the SBOM" "$embedded" "$listed"
	# The runtime dependencies the project allows are among them, checksums from Cargo.lock.
	for crate in pico-args miniserde ureq miniz_oxide getrandom libc; do
		grep -q "^$crate@" <<<"$listed" || fail "the SBOM lacks $crate"
	done
	assert_eq "same SBOM when made again" "$(cat "$sbom")" \
		"$(cd "$REPO" && SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) python3 scripts/sbom.py --target x86_64-unknown-linux-musl)"
}

test_binaries_are_static() {
	for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
		bin="$TARGET_DIR/$target/release/grapheon-agent"
		file -b "$bin"
		! readelf -lW "$bin" | grep -q INTERP || fail "$target binary has an ELF interpreter"
		! readelf -dW "$bin" | grep -q '(NEEDED)' || fail "$target binary needs shared libraries"
	done
	file -b "$TARGET_DIR/aarch64-unknown-linux-musl/release/grapheon-agent" | grep -q 'ARM aarch64' ||
		fail "the aarch64 binary is not an aarch64 ELF"
}

test_aarch64_binary_runs_under_qemu() {
	bin="$TARGET_DIR/aarch64-unknown-linux-musl/release/grapheon-agent"
	version_out=$(qemu-aarch64 "$bin" --version)
	if [ -n "$version_out" ]; then
		assert_eq "qemu-aarch64 grapheon-agent --version" "$VERSION" "$version_out"
	fi
	qemu-aarch64 "$bin" --help >/dev/null
	state=$(mktemp -d "$scratch/state.XXXXXX")
	: >"$scratch/empty.env"
	GRAPHEON_AGENT_STATE_DIR=$state timeout 300 qemu-aarch64 "$bin" --config "$scratch/empty.env" --dry-run >"$scratch/dry-run.json"
	echo "qemu-aarch64 grapheon-agent --dry-run: exit 0, $(stat -c %s "$scratch/dry-run.json") bytes"
}

test_tarballs_are_reproducible() {
	for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
		tarball="$DIST/grapheon-agent-$VERSION-$target.tar.gz"
		# Same bytes again: fixed order, owners, mtimes and no gzip timestamp.
		assert_eq "gzip header mtime" "00000000" "$(od -An -tx1 -j4 -N4 "$tarball" | tr -d ' \n')"
		[ "$(tar --full-time -tvzf "$tarball" | awk '{ print $4 $5 }' | sort -u | wc -l)" -eq 1 ] ||
			fail "entries carry different mtimes"
	done
}

# The image's build stage sees only what its COPY lines bring (and .dockerignore lets through):
# build from exactly that set, as `docker build` would, so a file the build needs (build.rs,
# scripts/lib) cannot be forgotten. No Docker engine runs here; the release workflow builds the
# image itself.
test_image_build_context_is_complete() {
	local ctx="$scratch/image-context" f
	mkdir -p "$ctx"
	while read -r f; do
		grep -qxF -e "!$f" -e "!$f/" "$REPO/.dockerignore" || fail ".dockerignore keeps $f out of the build context"
		mkdir -p "$ctx/$(dirname "$f")"
		cp -r "$REPO/$f" "$ctx/$f"
	done < <(awk '/^FROM scratch/ { exit } /^COPY / && !/--from/ { for (i = 2; i < NF; i++) print $i }' "$REPO/Dockerfile")
	# A stale binary of another version where a script assuming target/ would look; cargo builds
	# into CARGO_TARGET_DIR, and that binary is the one packed.
	mkdir -p "$ctx/target/x86_64-unknown-linux-musl/release"
	printf '#!/bin/sh\necho 0.0.1\n' >"$ctx/target/x86_64-unknown-linux-musl/release/grapheon-agent"
	chmod 755 "$ctx/target/x86_64-unknown-linux-musl/release/grapheon-agent"
	(cd "$ctx" && CARGO_TARGET_DIR="$scratch/image-target" scripts/build-release.sh --targets x86_64-unknown-linux-musl \
		--strict --no-smoke --no-pack --out "$scratch/image-out") >"$scratch/image-build.log" 2>&1 || {
		cat "$scratch/image-build.log"
		fail "build-release.sh failed in the image context"
	}
	assert_contains_line "build log" "build-release: $scratch/image-target/x86_64-unknown-linux-musl/release/grapheon-agent --version: $VERSION" \
		"$(cat "$scratch/image-build.log")"
	assert_same_file "$scratch/image-target/x86_64-unknown-linux-musl/release/grapheon-agent" \
		"$scratch/image-out/x86_64-unknown-linux-musl/grapheon-agent"
}

for t in $(declare -F | awk '$3 ~ /^test_/ { print $3 }'); do
	run_test "release/${t#test_}" "$t"
done
