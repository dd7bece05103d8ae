"""The ``sparktorch-ps`` command: standalone parameter server, loopback benchmark, checkpoint
inspector.

The command is the Rust CLI (``crates/sparktorch-cli``) compiled into ``sparktorch._native``, so
``pip install .`` ships it with the package (``[project.scripts]``) and it needs no separate
binary on the PATH. ``sparktorch-ps --help`` lists the subcommands.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sparktorch-ps`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    from sparktorch import _native

    args = list(sys.argv[1:] if argv is None else argv)
    return int(_native.cli_main(["sparktorch-ps", *args]))


if __name__ == "__main__":
    sys.exit(main())
