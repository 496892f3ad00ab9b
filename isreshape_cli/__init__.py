"""Command-line tools of isreshape: ``isreshape demo`` (and later ``isreshape diagnose``).

Unlike the backend-neutral core, this package uses NumPy directly; matplotlib (the ``plot`` extra)
is needed only for figures.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``isreshape`` command line (see :mod:`isreshape_cli.main`)."""
    from .main import main as _main

    return _main(argv)
