"""The ``isreshape`` console script: an argparse entry point with one sub-command per tool.

Each sub-command lives in its own module, which provides ``add_parser(subparsers)``: it registers
its parser and sets ``func``, a callable ``(args) -> int`` (the exit status). To add one (for
example ``isreshape diagnose``), write the module and append it to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
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
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the sub-command, return its exit status.

    Output that cannot be written (``> /dev/full``) ends the run with one line on standard error
    and exit status 2, not a traceback; a reader that closed the pipe (``| head``) ends it
    silently with status 1.
    """
    from ._output import OutputError, flush_stdout, silence_stdout

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        try:
            status = int(args.func(args) or 0)
        except OSError as exc:
            if not _is_stdout_error(exc):
                raise
            silence_stdout()  # the interpreter's flush at exit would fail again
            if isinstance(exc, BrokenPipeError):  # the reader left (`| head`): no message
                return 1
            raise OutputError(f"cannot write the output: {exc.strerror or exc}") from None
        flush_stdout()
    except OutputError as exc:
        print(f"isreshape {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return status


def _is_stdout_error(exc: OSError) -> bool:
    """Whether ``exc`` came from writing standard output (a full device, a closed pipe)."""
    return isinstance(exc, BrokenPipeError) or exc.errno in (errno.ENOSPC, errno.EPIPE, errno.EIO)


if __name__ == "__main__":
    raise SystemExit(main())
