#!/usr/bin/env bash
# Build the static release binaries and pack them.
#
#   scripts/build-release.sh [--targets "T1 T2"] [--out DIR] [--strict] [--no-smoke] [--no-pack]
#                            [--no-install]
#
# For each target: add it with rustup, build `cargo build --release --locked` (into cargo's target
# directory: CARGO_TARGET_DIR and .cargo/config.toml are honoured), check the binary is
# static (no ELF interpreter, no NEEDED entry), run it (natively or under qemu user-mode
# emulation) with --version, --help and --dry-run, and pack
# DIR/grapheon-agent-<version>-<target>.tar.gz (binary, VERSION, deploy/, lifecycle scripts,
# README.md, CHANGELOG.md), a .deb and an .rpm of the same binary (scripts/lib/os-packages.sh),
# a CycloneDX SBOM DIR/grapheon-agent-<version>-<target>.cdx.json (scripts/sbom.py), plus
# DIR/SHA256SUMS over this version's files (signed with --signing-key).
#
# Missing build tools (musl-tools, Debian's cross gcc, qemu-user, file, binutils, rpm) are installed
# with apt-get. A target rustup cannot install here (armv7 on some machines) is skipped with a
# plain message, unless --strict (the release workflow) makes that an error.
#
# Options:
#   --targets LIST   default: x86_64-unknown-linux-musl aarch64-unknown-linux-musl
#                    armv7-unknown-linux-musleabihf
#   --out DIR        default: dist
#   --strict         every target, README.md and CHANGELOG.md are required
#   --no-smoke       run no emulator and no --dry-run (image builds); a binary that runs
#                    natively is still asked its --version, which must be VERSION
#   --no-pack        only build; leaves DIR/<target>/grapheon-agent (no tarball, .deb or .rpm)
#   --no-install     never run apt-get; fail if a tool is missing
#   --signing-key F  sign SHA256SUMS into SHA256SUMS.sig with this ed25519 key (scripts/sign-release.sh;
#                    its public half must be the one pinned in scripts/install.sh)
#   --auditable      build with `cargo auditable` (required then): the binary carries its
#                    dependency list in a .dep-v0 section that cargo audit / trivy / syft read
#   --test-key       tests only: the signing key is a test key; the installers packed in the
#                    tarballs trust it instead of the release key and warn so on every run
set -euo pipefail

ALL_TARGETS="x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf"
targets=$ALL_TARGETS
out=dist
strict=no
smoke=yes
pack=yes
install_tools=yes
signing_key=''
test_key=no
auditable=no

say() { printf 'build-release: %s\n' "$*"; }
die() {
	printf 'build-release: error: %s\n' "$*" >&2
	exit 1
}

while [ $# -gt 0 ]; do
	case $1 in
	--targets) targets=${2:?--targets needs a value}; shift ;;
	--out) out=${2:?--out needs a value}; shift ;;
	--strict) strict=yes ;;
	--no-smoke) smoke=no ;;
	--no-pack) pack=no ;;
	--no-install) install_tools=no ;;
	--signing-key) signing_key=${2:?--signing-key needs a value}; shift ;;
	--test-key) test_key=yes ;;
	--auditable) auditable=yes ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown option $1" ;;
	esac
	shift
done

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
version=$(cat VERSION)
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.+-]+)?$ ]] || die "VERSION '$version' is not a version"
mkdir -p "$out"
out=$(cd "$out" && pwd)

# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/target-dir.sh
. "$repo/scripts/lib/target-dir.sh"
# shellcheck source=scripts/lib/signing.sh
. "$repo/scripts/lib/signing.sh"
# shellcheck source=scripts/lib/os-packages.sh
. "$repo/scripts/lib/os-packages.sh"
[ "$test_key" = no ] || [ -n "$signing_key" ] || die "--test-key needs --signing-key"
if [ -n "$signing_key" ]; then
	[ -f "$signing_key" ] || die "no signing key $signing_key"
	signing_key=$(cd "$(dirname "$signing_key")" && pwd)/$(basename "$signing_key")
	test_public_key=$(public_key_b64 "$signing_key") || die "cannot read the signing key $signing_key"
fi

host_arch=$(uname -m)

# The Debian packages, C compiler, linker and emulator for a target, as "packages|cc|linker|qemu".
toolchain_for() {
	case $1 in
	x86_64-unknown-linux-musl)
		if [ "$host_arch" = x86_64 ]; then
			echo "musl-tools|musl-gcc||"
		else
			echo "gcc-x86-64-linux-gnu libc6-dev-amd64-cross|x86_64-linux-gnu-gcc|x86_64-linux-gnu-gcc|qemu-x86_64"
		fi
		;;
	aarch64-unknown-linux-musl)
		if [ "$host_arch" = aarch64 ]; then
			echo "musl-tools|musl-gcc||"
		else
			echo "gcc-aarch64-linux-gnu libc6-dev-arm64-cross|aarch64-linux-gnu-gcc|aarch64-linux-gnu-gcc|qemu-aarch64"
		fi
		;;
	armv7-unknown-linux-musleabihf)
		echo "gcc-arm-linux-gnueabihf libc6-dev-armhf-cross|arm-linux-gnueabihf-gcc|arm-linux-gnueabihf-gcc|qemu-arm"
		;;
	*) die "unknown target $1 (known: $ALL_TARGETS)" ;;
	esac
}

# Fails unless the ELF file has no interpreter and needs no shared library.
check_static() {
	local bin=$1 headers dynamic
	headers=$(readelf -lW "$bin")
	dynamic=$(readelf -dW "$bin")
	if grep -q 'INTERP' <<<"$headers"; then
		die "$bin has an ELF interpreter: it is not static"
	fi
	if grep -q '(NEEDED)' <<<"$dynamic"; then
		die "$bin needs shared libraries: $(grep '(NEEDED)' <<<"$dynamic" | tr -s ' ')"
	fi
	say "static: $(file -b "$bin" | cut -d, -f1-2,4-5)"
}

# Runs the binary with --version, --help and --dry-run (under qemu for a foreign target).
# --dry-run collects from this machine and prints the report; it needs no server and no network.
smoke_test() {
	local bin=$1 runner=$2 scratch output status args
	local -a run=()
	[ -n "$runner" ] && run=("$runner")
	scratch=$(mktemp -d)
	: >"$scratch/empty.env"
	for args in --version --help "--config $scratch/empty.env --dry-run"; do
		status=0
		# shellcheck disable=SC2086 # args is a list of words
		output=$(env GRAPHEON_AGENT_STATE_DIR="$scratch/state" timeout 300 \
			"${run[@]}" "$bin" $args 2>"$scratch/stderr") || status=$?
		if [ $status -ne 0 ]; then
			cat "$scratch/stderr" >&2
			rm -rf "$scratch"
			die "${run[*]:+${run[*]} }$bin $args exited with $status"
		fi
		case $args in
		--version)
			if [ "$output" != "$version" ]; then
				rm -rf "$scratch"
				die "$bin --version printed '$output', VERSION is '$version'"
			fi
			;;
		*--dry-run)
			if [ -n "$output" ] && [ "${output:0:1}" != "{" ]; then
				rm -rf "$scratch"
				die "$bin --dry-run did not print a JSON object: ${output:0:200}"
			fi
			;;
		esac
		say "ran ${run[*]:+${run[*]} }grapheon-agent ${args/$scratch\//}: exit 0, ${#output} bytes of output"
	done
	rm -rf "$scratch"
}

# Packs one target's release directory into a reproducible tarball.
pack_target() {
	local target=$1 bin=$2 name stage f
	name="grapheon-agent-$version-$target"
	stage=$(mktemp -d)
	mkdir -p "$stage/$name/deploy" "$stage/$name/scripts"
	install -m 0755 "$bin" "$stage/$name/grapheon-agent"
	install -m 0644 VERSION "$stage/$name/VERSION"
	install -m 0644 deploy/grapheon-agent.service deploy/grapheon-agent.timer \
		deploy/grapheon-agent.env.example "$stage/$name/deploy/"
	install -m 0755 scripts/install.sh scripts/upgrade.sh scripts/rollback.sh scripts/uninstall.sh \
		"$stage/$name/scripts/"
	if [ "$test_key" = yes ]; then
		# upgrade.sh, rollback.sh and uninstall.sh source install.sh: one stamp covers them.
		stamp_test_key scripts/install.sh "$stage/$name/scripts/install.sh" "$test_public_key"
	fi
	for f in README.md CHANGELOG.md LICENSE; do
		if [ -f "$f" ]; then
			install -m 0644 "$f" "$stage/$name/$f"
		elif [ "$strict" = yes ] && [ "$f" != LICENSE ]; then
			die "$f is missing: a release tarball must carry it"
		elif [ "$f" != LICENSE ]; then
			say "warning: $f is missing, not packed"
		fi
	done
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$source_date_epoch" \
		--format=ustar -C "$stage" -cf - "$name" | gzip -n -9 >"$out/$name.tar.gz.tmp"
	mv "$out/$name.tar.gz.tmp" "$out/$name.tar.gz"
	rm -rf "$stage"
	say "packed $out/$name.tar.gz ($(stat -c %s "$out/$name.tar.gz") bytes)"
}

# A binary that runs here must print exactly this release's version: a stale binary of another
# version is never packed (even with --no-smoke, which only skips the emulator and --dry-run).
check_binary_version() {
	local printed
	printed=$("$1" --version 2>/dev/null) || die "$1 --version failed"
	[ "$printed" = "$version" ] || die "$1 --version printed '$printed', VERSION is '$version'"
	say "$1 --version: $printed"
}

source_date_epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
command -v cargo >/dev/null || die "cargo is not installed (install Rust with rustup)"
command -v rustup >/dev/null || die "rustup is not installed: it provides the musl targets"
need_packages file binutils
cargo_build=(cargo build)
if [ "$auditable" = yes ]; then
	cargo auditable --version >/dev/null 2>&1 ||
		die "--auditable needs cargo-auditable: cargo install cargo-auditable --locked"
	cargo_build=(cargo auditable build)
fi
[ "$pack" = no ] || command -v python3 >/dev/null || need_packages python3
[ "$pack" = no ] || need_packages rpm
target_dir=$(cargo_target_dir "$repo") || die "cargo metadata failed: cannot tell where cargo builds"

built=()
skipped=()
for target in $targets; do
	IFS='|' read -r packages cc linker qemu <<<"$(toolchain_for "$target")"
	if ! rustup target list --installed | grep -qx "$target"; then
		say "adding the Rust target $target"
		if ! rustup_out=$(rustup target add "$target" 2>&1); then
			reason=$(grep -m1 -E 'error' <<<"$rustup_out" || tail -n1 <<<"$rustup_out")
			if [ "$strict" = yes ] || [ "$target" != armv7-unknown-linux-musleabihf ]; then
				die "rustup cannot install $target: $reason"
			fi
			say "SKIPPED $target: rustup cannot install this target on this machine ($reason);"
			say "        the release workflow builds it"
			skipped+=("$target")
			continue
		fi
	fi
	# shellcheck disable=SC2086 # a list of package names
	need_packages $packages
	[ "$smoke" = no ] || [ -z "$qemu" ] || need_packages qemu-user

	env_name=${target//-/_}
	cargo_env=("CC_$env_name=$cc")
	if [ -n "$linker" ]; then
		cargo_env+=("CARGO_TARGET_${env_name^^}_LINKER=$linker")
	fi
	say "building $target (${cargo_env[*]})"
	# The binary cargo reports having built, wherever its target directory is.
	bin=$(env "${cargo_env[@]}" "${cargo_build[@]}" --release --locked --target "$target" \
		--message-format=json-render-diagnostics |
		sed -n 's/.*"executable":"\([^"]*\/grapheon-agent\)".*/\1/p' | tail -n1)
	if [ -z "$bin" ] || [ ! -x "$bin" ]; then
		die "cargo did not report a grapheon-agent binary for $target"
	fi
	[ "$bin" = "$target_dir/$target/release/grapheon-agent" ] ||
		die "cargo built $bin, expected $target_dir/$target/release/grapheon-agent"
	check_static "$bin"
	if [ "$smoke" = yes ]; then
		smoke_test "$bin" "$qemu"
	elif [ -z "$qemu" ]; then
		check_binary_version "$bin"
	else
		say "not run: $target binaries need an emulator here, and --no-smoke runs none"
	fi
	if [ "$pack" = yes ]; then
		pack_target "$target" "$bin"
		package=$(build_deb "$target" "$bin" "$out")
		say "packed $package"
		package=$(build_rpm "$target" "$bin" "$out")
		say "packed $package"
		SOURCE_DATE_EPOCH=$source_date_epoch python3 scripts/sbom.py --target "$target" \
			--out "$out/grapheon-agent-$version-$target.cdx.json"
		say "wrote the SBOM $out/grapheon-agent-$version-$target.cdx.json"
	else
		mkdir -p "$out/$target"
		install -m 0755 "$bin" "$out/$target/grapheon-agent"
	fi
	built+=("$target")
done

[ ${#built[@]} -gt 0 ] || die "no target was built"
if [ "$pack" = yes ]; then
	(cd "$out" && sha256sum grapheon-agent-"$version"-*.tar.gz grapheon-agent-"$version"-*.cdx.json "grapheon-agent_${version//-/\~}-1_"*.deb \
		"grapheon-agent-${version//-/\~}-1."*.rpm >SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
	say "wrote $out/SHA256SUMS:"
	sed 's/^/    /' "$out/SHA256SUMS"
	rm -f "$out/SHA256SUMS.sig"
	if [ -n "$signing_key" ]; then
		sign_args=(--key "$signing_key")
		[ "$test_key" = no ] || sign_args+=(--test-key)
		bash "$repo/scripts/sign-release.sh" "${sign_args[@]}" "$out"
	else
		say "SHA256SUMS is not signed (no --signing-key): installers refuse it without --allow-unsigned"
	fi
fi
say "binary sizes:"
for target in "${built[@]}"; do
	size=$(stat -c %s "$target_dir/$target/release/grapheon-agent")
	printf '    %-34s %9d bytes (%d KiB)\n' "$target" "$size" $(((size + 1023) / 1024))
done
for target in "${skipped[@]}"; do
	printf '    %-34s not built here (rustup cannot install the target)\n' "$target"
done
