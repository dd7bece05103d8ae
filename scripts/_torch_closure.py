"""Print the top-level site-packages entries of an installed distribution and everything it
requires (extras followed, markers evaluated), one path per line: what scripts/wheel_smoke.sh
links into its fresh venv so that torch need not be installed again (CUDA builds are gigabytes).

    python scripts/_torch_closure.py torch
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def closure(root: str) -> list[metadata.Distribution]:
    """``root`` and its requirements, transitively (with the extras each edge asks for)."""
    seen: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if (key, extras) in done:
            continue
        done.add((key, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return list(seen.values())


def main() -> None:
    tops: set[Path] = set()
    for dist in closure(sys.argv[1]):
        base = Path(str(dist.locate_file("")))
        for f in dist.files or []:
            parts = Path(f).parts
            if parts and parts[0] != ".." and not parts[0].endswith(".pth") and parts[0] not in ("bin", "__pycache__"):
                tops.add(base / parts[0])
    for p in sorted(tops):
        if p.exists():
            print(p)


if __name__ == "__main__":
    main()
