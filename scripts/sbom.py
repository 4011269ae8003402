#!/usr/bin/env python3
"""CycloneDX 1.5 SBOM (JSON) of the grapheon-agent binary built for one target.

    python3 scripts/sbom.py --target x86_64-unknown-linux-musl [--out FILE]

The components are the crates `cargo metadata` resolves for that target, reached from
grapheon-agent through normal dependencies (dev-dependencies are for tests and build-dependencies
run at build time only; neither is listed). Crates linked into the binary have scope "required";
procedural macros and what only they use run inside the compiler, and have scope "excluded". Versions and
licences come from cargo metadata, SHA-256 checksums from Cargo.lock. The output is the same for
the same Cargo.lock and SOURCE_DATE_EPOCH, so that it can be listed in the signed SHA256SUMS.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tomllib
import uuid


def purl(name, version):
    return f"pkg:cargo/{name}@{version}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="Rust target triple of the binary")
    parser.add_argument("--out", help="file to write (default: standard output)")
    parser.add_argument("--manifest-dir", default=".", help="directory holding Cargo.toml")
    args = parser.parse_args()

    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", args.target],
            cwd=args.manifest_dir,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    with open(os.path.join(args.manifest_dir, "Cargo.lock"), "rb") as f:
        lock = tomllib.load(f)
    checksums = {(p["name"], p["version"]): p.get("checksum") for p in lock.get("package", [])}

    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    if root is None or packages[root]["name"] != "grapheon-agent":
        sys.exit("sbom: cargo metadata names no grapheon-agent root package")

    # Crates in the binary: reachable from the root through normal (not dev, not build) edges.
    def linked_deps(node_id):
        for dep in nodes[node_id]["deps"]:
            if any(k["kind"] is None for k in dep["dep_kinds"]):
                yield dep["pkg"]

    def is_proc_macro(pkg_id):
        return any("proc-macro" in t["kind"] for t in packages[pkg_id]["targets"])

    def reach(through_proc_macros):
        seen, todo = {root}, [root]
        while todo:
            for dep in linked_deps(todo.pop()):
                if dep in seen or (not through_proc_macros and is_proc_macro(dep)):
                    continue
                seen.add(dep)
                todo.append(dep)
        return seen

    reached, linked = reach(True), reach(False)

    def component(pkg, kind):
        c = {
            "type": kind,
            "bom-ref": purl(pkg["name"], pkg["version"]),
            "name": pkg["name"],
            "version": pkg["version"],
            "purl": purl(pkg["name"], pkg["version"]),
        }
        if pkg.get("license"):
            c["licenses"] = [{"expression": pkg["license"]}]
        checksum = checksums.get((pkg["name"], pkg["version"]))
        if checksum:
            c["hashes"] = [{"alg": "SHA-256", "content": checksum}]
        return c

    me = packages[root]
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    timestamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    deps = sorted(reached - {root}, key=lambda i: (packages[i]["name"], packages[i]["version"]))
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        # Stable for the same binary inputs: a name-based UUID over what the SBOM describes.
        "serialNumber": "urn:uuid:"
        + str(
            uuid.uuid5(
                uuid.NAMESPACE_URL,
                purl(me["name"], me["version"])
                + "?target="
                + args.target
                + "&deps="
                + ",".join(purl(packages[i]["name"], packages[i]["version"]) for i in deps),
            )
        ),
        "version": 1,
        "metadata": {
            "timestamp": timestamp,
            "tools": {"components": [{"type": "application", "name": "grapheon-agent scripts/sbom.py"}]},
            "component": dict(component(me, "application"), properties=[{"name": "rust:target", "value": args.target}]),
        },
        "components": [
            dict(component(packages[i], "library"), scope="required" if i in linked else "excluded") for i in deps
        ],
        "dependencies": [
            {
                "ref": purl(packages[i]["name"], packages[i]["version"]),
                "dependsOn": sorted(
                    purl(packages[d]["name"], packages[d]["version"]) for d in set(linked_deps(i)) if d in reached
                ),
            }
            for i in [root] + deps
        ],
    }
    text = json.dumps(bom, indent=2, ensure_ascii=False) + "\n"
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
