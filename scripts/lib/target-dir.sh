# shellcheck shell=bash
# cargo_target_dir [REPO]: prints the directory cargo builds into for the repository, as cargo
# itself resolves it (CARGO_TARGET_DIR, build.target-dir in .cargo/config.toml, else
# REPO/target). Scripts must never assume target/: with a shared target directory, target/ may
# hold a stale binary of another version.
cargo_target_dir() {
	local repo=${1:-.} meta dir
	meta=$(cd "$repo" && cargo metadata --format-version 1 --no-deps) || return 1
	dir=$(sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' <<<"$meta")
	[ -n "$dir" ] || return 1
	printf '%s\n' "$dir"
}
