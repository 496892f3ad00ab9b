"""Checks of the command line's output paths and streams, made before any work is done.

A bad ``--out`` or ``--plot`` path is refused in one line (exit status 2) before the run, not
with a traceback after it; a directory stands for a file of the default name inside it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "OutputError", "check_image_path", "flush_stdout", "silence_stdout"]

#: Formats matplotlib writes without extra packages.
IMAGE_SUFFIXES = (".png", ".pdf", ".svg")


class OutputError(Exception):
    """An output path or stream that cannot be written: one line, exit status 2."""


def check_image_path(path: Path, flag: str, default_name: str) -> Path:
    """``path`` as the image file to write, or :class:`OutputError` naming ``flag``.

    An existing directory means ``path / default_name``. The suffix must be one of
    :data:`IMAGE_SUFFIXES`; a missing folder is created, and the folder must be a writable
    folder.
    """
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise OutputError(
            f"{flag} {str(path)!r} must end in one of {', '.join(IMAGE_SUFFIXES)} (it is where "
            "the image is written)"
        )
    folder = path.parent
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OutputError(
                f"{flag} {str(path)!r}: the folder {str(folder)!r} does not exist and cannot be "
                f"created ({reason})"
            ) from None
    if not folder.is_dir():
        raise OutputError(f"{flag} {str(path)!r}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {str(path)!r}: the folder {str(folder)!r} is not writable")
    if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
        raise OutputError(f"{flag} {str(path)!r} exists and cannot be overwritten")
    return path


def flush_stdout() -> None:
    """Flush standard output; :class:`OutputError` if it cannot be written (a full device, a
    closed pipe). Standard output is then pointed at ``os.devnull``, so that the interpreter's
    own flush at exit does not print a second error."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        silence_stdout()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutputError(f"cannot write to standard output: {reason}") from None


def silence_stdout() -> None:
    """Point standard output at ``os.devnull`` (after a write to it failed)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
