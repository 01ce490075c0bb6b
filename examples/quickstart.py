#!/usr/bin/env python3
"""nsdf-hpc from a research script: see what this machine offers, prepare an image once,
run commands in it, and read their output and exit code.

    python3 examples/quickstart.py [IMAGE] [--runtime NAME] [--dry-run]

IMAGE defaults to NSDF's naming, nsdf/busybox:v1.0.0 (on the testbed: the local registry).
"""
from __future__ import annotations

import argparse
import sys

import nsdf_hpc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", nargs="?", default="nsdf/busybox:v1.0.0")
    ap.add_argument("--runtime", help="force a runtime (default: NSDF's choice)")
    ap.add_argument("--dry-run", action="store_true", help="show the plan, run nothing")
    args = ap.parse_args()

    client = nsdf_hpc.Client()
    for info in client.detect():
        state = "usable" if info.usable else ("found, unusable" if info.found else "not found")
        print(f"{info.name:<13} {info.version or '-':<8} {state}")
    try:
        choice = client.choose(args.runtime)
    except nsdf_hpc.NsdfError as err:
        print(f"no runtime: {err}", file=sys.stderr)
        return 1
    print(f"using {choice.explain()}")

    spec = client.spec(args.image, ["sh", "-c", 'echo "hello from $(cat /etc/hostname 2>/dev/null || echo a container)"; echo "task=$TASK"'],
                       env={"TASK": "quickstart"})
    if args.dry_run:
        inv, native, rt = client.plan(spec, choice.name)
        print("would run:", " ".join(inv.argv))
        return 0
    try:
        native = client.pull(args.image, choice.name)          # once; cached by digest
        print(f"image: {native.location} ({native.digest})")
        result = client.run(args.image, spec.command, runtime=choice.name, env=spec.env)
    except nsdf_hpc.NsdfError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.stdout, end="")
    print(f"exit code {result.returncode}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
