"""Keep deployment.yaml's `checksum/config` annotation equal to the sha256 of configmap.yaml's
data, so that a config change changes the pod template and `kubectl apply` rolls the pods.

    python deploy/kubernetes/config_checksum.py          # rewrite the annotation if stale
    python deploy/kubernetes/config_checksum.py --check  # exit 1 if stale (the tests run this)

The checksum is sha256 over the data as JSON with sorted keys: any key or byte changed counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
# The annotation's line, rewritten in place so the file's comments stay.
_ANNOTATION = re.compile(r"^(?P<key>\s*checksum/config:\s*)(?P<value>\S+)[ \t]*$", re.MULTILINE)


def config_checksum(configmap: Path) -> str:
    data = yaml.safe_load(configmap.read_text())["data"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if stale, change nothing")
    parser.add_argument("--dir", type=Path, default=HERE, help="the manifests' directory")
    args = parser.parse_args(argv)
    deployment = args.dir / "deployment.yaml"
    text = deployment.read_text()
    (match,) = _ANNOTATION.finditer(text)  # exactly one annotation
    current = match["value"]
    wanted = config_checksum(args.dir / "configmap.yaml")
    if current == wanted:
        return 0
    if args.check:
        print(f"{deployment}: checksum/config is stale; run {sys.argv[0]}", file=sys.stderr)  # noqa: T201
        return 1
    deployment.write_text(text[: match.start("value")] + wanted + text[match.end("value") :])
    print(f"{deployment}: checksum/config {wanted}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
