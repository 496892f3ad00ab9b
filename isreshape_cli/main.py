"""The ``isreshape`` console script: an argparse entry point with one sub-command per tool.

Each sub-command lives in its own module, which provides ``add_parser(subparsers)``: it registers
its parser and sets ``func``, a callable ``(args) -> int`` (the exit status). To add one (for
example ``isreshape diagnose``), write the module and append it to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

#: Modules (relative to this package) that register a sub-command, in the order of ``--help``.
SUBCOMMANDS: tuple[str, ...] = (".demo", ".diagnose")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="isreshape",
        description="IS Reshape: one loss between reward-weighted SFT (gamma 0) and importance-"
        "sampled policy gradient (gamma 1), with gamma chosen per batch from the ESS.",
    )
    from isreshape_core import __version__

    parser.add_argument("--version", action="version", version=f"isreshape {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name, __package__).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the sub-command, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
