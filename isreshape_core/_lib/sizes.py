"""When an array counts as large for the eager code paths.

Up to :data:`LARGE_SIZE` elements an eager pass costs about one operator launch whatever it
reads, so the small-array code stacks its arrays and takes few operators. Beyond it the passes
over memory are the cost, so the code takes more operators to read and write less (no stacked
copies, products with a 0/1 mask instead of ``where``, integer counts). Traced code keeps the
stacked forms, which a compiler fuses.
"""

from __future__ import annotations

import math

from .namespace import Array

__all__ = ["LARGE_SIZE", "is_large"]

#: Beyond this many elements an array is large (:func:`is_large`).
LARGE_SIZE = 2**12


def is_large(x: Array) -> bool:
    """Whether ``x`` holds more than :data:`LARGE_SIZE` elements (static: read from the shape)."""
    return math.prod(tuple(x.shape)) > LARGE_SIZE
