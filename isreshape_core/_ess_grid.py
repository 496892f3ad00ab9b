"""The largest gamma whose ESS meets its target, by a few passes over a grid of candidates.

:func:`isreshape_core.gamma_ess` needs the right end of ``{gamma : ESS(gamma) >= needed}``.
Newton steps are sequential: each one costs a round of small kernels (and a collective when the
samples are sharded), and a dozen of them dominate the cost of a sequence-level loss, where the
statistics are only a few dozen numbers. Here each pass tests ``k`` candidates spread over the
current bracket at once, in one exponential over a ``(..., k, n)`` array, and keeps the interval
between the largest feasible candidate and the next one: ``passes`` passes shrink the bracket by
about ``k**passes``, with no data-dependent control flow, so the search traces under ``jax.jit``
and ``torch.compile``. The result is always a candidate that passed the test, so it meets the
constraint exactly as the Newton search's feasible end does (:ref:`theory-gamma-ess`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._lib.namespace import Array, Namespace, is_array
from ._lib.reduce import Reducer, reduce_max
from ._lib.tracing import eager_all

__all__ = [
    "GRID_ELEMENTS",
    "TRACED_GRID_ELEMENTS",
    "exponent_floor",
    "feasible_candidates",
    "grid_plan",
    "largest_feasible_gamma",
    "polish_factors",
    "polish_feasible_end",
    "weight_matrix",
    "weight_sums",
]

#: Candidates times samples evaluated per pass at most (at the fewest candidates, 16, this is where
#: the grid applies); beyond it (token-level gamma over a large batch) the Newton search, with one
#: candidate per step, does less arithmetic.
GRID_ELEMENTS = 2**15
#: The same bound on traced inputs, for the candidates of a pass: a compiled graph fuses each
#: pass into a few loops, so that what a pass costs is its exponentials (candidates times
#: samples), not its operators as eagerly: more passes of fewer candidates do less work (at 64
#: samples in float32, 5 passes of 32 candidates, 10,240 exponentials, against 3 of 512, 98,304).
TRACED_GRID_ELEMENTS = 2**11
_MAX_CANDIDATES = 512
_MIN_CANDIDATES = 16


def grid_plan(size: int, dtype_bits: int, traced: bool = False) -> tuple[int, int] | None:
    """``(candidates, passes)`` for ``size`` samples in all rows, or ``None`` where the grid
    would need fewer than 16 candidates a pass (then Newton is cheaper).

    Eagerly a pass costs about the same number of operators (kernel launches) whatever its
    width, so the candidates fill :data:`GRID_ELEMENTS`; ``traced`` (a compiled graph) they fill
    :data:`TRACED_GRID_ELEMENTS`. The passes bring the bracket below ``2**-48`` (float64: 4e-15)
    or ``2**-24`` (float32 and narrower: under the dtype's rounding).
    """
    if _MIN_CANDIDATES * size > GRID_ELEMENTS:
        return None
    budget = TRACED_GRID_ELEMENTS if traced else GRID_ELEMENTS
    k = _MAX_CANDIDATES
    while k > _MIN_CANDIDATES and k * size > budget:
        k //= 2
    bits = 48 if dtype_bits >= 64 else 24
    return k, math.ceil(bits * math.log(2.0) / math.log(k - 1))


def feasible_candidates(
    xp: Namespace,
    g: Array,
    d: Array,
    offset: Array | None,
    needed: Array,
    reducer: Reducer | None,
    shift: bool,
    floor: bool = False,
) -> Array:
    """Whether each candidate ``g`` (..., k, 1) meets ``s1^2 >= needed s2`` for the weights
    ``e = exp(g d + offset - max)`` (no offset: ``None``), floored (:func:`exponent_floor`) with
    ``floor``; without ``shift`` the max is known to be 0 and not taken."""
    z = g * d if offset is None else g * d + offset
    if shift:
        m = reduce_max(xp, z, -1, reducer, keepdims=True)
        z = z - xp.where(xp.isfinite(m), m, 0.0)
    e = xp.exp(xp.maximum(z, exponent_floor(xp, z.dtype)) if floor else z)
    s1 = xp.sum(e, axis=-1, keepdims=True)
    s2 = xp.sum(e * e, axis=-1, keepdims=True)
    if reducer is not None:
        sums = reducer.sum(xp.stack([s1, s2]))
        s1, s2 = sums[0, ...], sums[1, ...]
    return s1 * s1 >= needed * s2


def largest_feasible_gamma(
    xp: Namespace,
    d: Array,
    offset: Array | None,
    needed: Array,
    lo: Array | float,
    hi: Array | float,
    *,
    candidates: int,
    passes: int,
    reducer: Reducer | None = None,
    top_is_zero: bool = True,
) -> Array:
    """The largest ``g`` in ``[lo, hi]`` with ``ESS(g) >= needed`` (``lo`` where none is), for
    samples along the last axis of ``d``.

    ``d`` (..., n) is the log weight relative to its row maximum (0 for a zero weight),
    ``offset`` (..., n) is ``-inf`` for a zero weight and ``log|r|`` (or 0) otherwise, or
    ``None`` where ``d`` holds every zero weight as a value whose ``exp(g d)`` is 0 for every
    positive candidate;
    ``top_is_zero`` says that ``offset`` is 0 or ``-inf`` (Kish's ESS), so that the largest
    exponent is ``g max(d) = 0`` and no max is taken, as in the Newton search.
    ``needed`` has the batch shape ``(...)``, ``lo`` and ``hi`` too or are Python numbers (then
    the bracket's widths are Python numbers, and no array holds them). The result is ``hi``
    where ``hi`` is feasible, else the largest tested candidate found feasible, within ``(hi -
    lo) / ((candidates - 1) candidates**(passes - 1))`` of the right end of the feasible set
    where the ESS is monotone in gamma.
    """
    dtype = d.dtype
    device = getattr(d, "device", None)
    batch = tuple(needed.shape)
    d = xp.expand_dims(d, axis=-2)
    offset = None if offset is None else xp.expand_dims(offset, axis=-2)
    shift = not top_is_zero
    needed = xp.reshape(needed, (*batch, 1, 1))
    # The first pass includes both ends, each exactly: (1 - t) lo + t hi.
    t = xp.reshape(xp.linspace(0.0, 1.0, candidates, dtype=dtype, device=device), (-1, 1))
    gamma_min, gamma_max = lo, hi
    numbers = not is_array(lo)
    if not numbers:
        lo = xp.reshape(lo, (*lo.shape, 1, 1))
        hi = xp.reshape(hi, (*hi.shape, 1, 1))
    g = t if numbers and (lo, hi) == (0.0, 1.0) else (1.0 - t) * lo + t * hi
    none = xp.asarray(-1.0, dtype=dtype, device=device)  # below every candidate
    feasible = feasible_candidates(xp, g, d, offset, needed, reducer, shift)
    first = xp.max(xp.where(feasible, g, none), axis=-2, keepdims=True)
    width = (hi - lo) / (candidates - 1)
    # Where no candidate is feasible the later passes keep gamma_min (then replaced).
    lo = xp.maximum(first, lo)  # not clip: it reads a bound as a Python number (traced: symbolic)
    # Later passes test [lo, lo + width): lo is known feasible, lo + width is not; the largest
    # feasible candidate is the next lo (lo itself is the candidate t = 0, and passes again;
    # where it does not, lo stays, so that no candidate is ever negative).
    t = t * ((candidates - 1) / candidates)
    # Eager: where every row passed at hi or failed everywhere, the later passes change nothing.
    decided = eager_all(xp, (first >= hi) | (first < 0.0))
    for _ in range(0 if decided else passes - 1):
        g = lo + width * t
        feasible = feasible_candidates(xp, g, d, offset, needed, reducer, shift)
        lo = xp.max(xp.where(feasible, g, lo), axis=-2, keepdims=True)
        width = width / candidates
    first, lo = xp.reshape(first, batch), xp.reshape(lo, batch)
    # Where gamma_max passed (the candidate t = 1), every later candidate is at least gamma_max.
    gamma = xp.minimum(lo, gamma_max)
    return xp.where(first < 0.0, gamma_min, gamma)  # even gamma_min misses the target


def exponent_floor(xp: Namespace, dtype: object) -> float:
    """``log(smallest_normal) / 2 + 1``: exponentials at or above it and their squares are normal
    numbers. A weight below ``exp`` of it counts as that (a change below rounding next to the
    weight 1 of the row's maximum), which keeps ``exp`` off its slow paths (``-inf`` for a zero
    weight, subnormal results)."""
    return 0.5 * math.log(float(xp.finfo(dtype).smallest_normal)) + 1.0


def weight_sums(
    xp: Namespace,
    g: Array,
    d: Array,
    offset: Array,
    d_slope: Array,
    axis: int,
    reducer: Reducer | None,
    shift: bool,
    slopes: bool = True,
) -> tuple[Array, Array | None]:
    """``([sum e, sum e^2], [sum e d', sum e^2 d'])`` along ``axis`` (keepdims; ``axis``
    negative) for the weights ``e = exp(max(g d + offset - max, floor))``, two arrays with a
    new leading axis of 2 (:func:`exponent_floor`; the max is taken only with ``shift``, else
    it is known to be 0); ``None`` for the second without ``slopes``.

    ``g`` may carry leading axes (several gammas in one pass); ``d'`` is ``d_slope``. With a
    ``reducer`` the four sums travel in one collective.
    """
    z = g * d + offset
    if shift:
        m = reduce_max(xp, z, axis, reducer, keepdims=True)
        z = z - xp.where(m > -xp.inf, m, 0.0)
    e = xp.exp(xp.maximum(z, exponent_floor(xp, z.dtype)))
    p = xp.stack([e, e * e])
    s = xp.sum(p, axis=axis, keepdims=True)
    if not slopes:
        return (s if reducer is None else reducer.sum(s)), None
    t = xp.sum(p * d_slope, axis=axis, keepdims=True)  # broadcast: d_slope has no axis of 2
    if reducer is None:
        return s, t
    sums = reducer.sum(xp.stack([s, t]))
    return sums[0, ...], sums[1, ...]


def weight_matrix(
    xp: Namespace,
    d: Array,
    d_slope: Array,
    offset: Array | None,
    reducer: Reducer | None,
    shift: bool,
    floored: bool = True,
) -> Callable[[Array | float], Array]:
    """``g -> [[sum e, sum e d'], [sum e^2, sum e^2 d']]`` (``(..., 2, 2)``), with samples along
    the last axis of ``d`` and the weights ``e = exp(max(g d + offset - max, floor))``
    (:func:`exponent_floor`; no ``offset``: none; the max is taken only with ``shift``, else it
    is known to be 0) and ``d' = d_slope``: the four sums of :func:`weight_sums` in a few
    operators whatever the number of samples (the eager Newton search of ``gamma_ess``), from
    one exponential.

    The sums of the weights, which decide the test ``ESS >= needed``, are reductions (pairwise,
    as in :func:`weight_sums`); the slope's sums, which only aim the next Newton point, are a
    matrix-vector product (a BLAS product accumulates along its long axis with a few times the
    rounding of a pairwise sum). ``g`` is a number or has the batch shape followed by
    ``(1, 1)``, after any leading axes of candidates. ``e^2`` is the product ``e e`` (within an
    ulp of the exponential of the doubled exponent, at half the exponentials), so a weight
    below the floor counts as ``exp(floor)`` in ``e`` and its square in ``e^2``, both normal
    numbers and below the rounding of the sums next to the max's weight 1.
    ``floored=False``: the caller knows that no exponent of any candidate is below the floor,
    and no max with it is taken. With a ``reducer`` the sums travel in one collective.
    """
    row = xp.expand_dims(d, axis=-2)  # (..., 1, n)
    offsets = None if offset is None else xp.expand_dims(offset, axis=-2)
    column = xp.expand_dims(d_slope, axis=-1)  # (..., n, 1)
    floor = exponent_floor(xp, d.dtype)

    def at(g: Array | float) -> Array:
        z = g * row
        if offsets is not None:
            z = z + offsets
        if shift:
            m = reduce_max(xp, z, -1, reducer, keepdims=True)
            z = z - xp.where(m > -xp.inf, m, 0.0)
        e = xp.exp(xp.maximum(z, floor) if floored else z)
        e = xp.concat([e, e * e], axis=-2)  # (..., 2, n)
        sums = xp.concat([xp.sum(e, axis=-1, keepdims=True), xp.matmul(e, column)], axis=-1)
        return sums if reducer is None else reducer.sum(sums)

    return at


def polish_factors(xp: Namespace, dtype: object) -> list[float]:
    """``1`` and ``1 - 2^-j``, ``j`` in 20, 24, ..., 48: the points just below an iterate that
    :func:`polish_feasible_end` tests, less those that round to 1 in ``dtype`` (they would
    repeat it)."""
    half_eps = 0.5 * float(xp.finfo(dtype).eps)
    return [1.0] + [1.0 - 2.0**-j for j in range(20, 52, 4) if 2.0**-j >= half_eps]


def polish_feasible_end(
    xp: Namespace,
    x: Array,
    lo: Array,
    d: Array,
    offset: Array,
    needed: Array,
    *,
    reducer: Reducer | None = None,
    top_is_zero: bool = True,
) -> Array:
    """The largest feasible of ``lo`` and ``x (1 - 2^-j)``, ``j`` in 0, 20, 24, ..., 48.

    A converged Newton iterate ``x`` lies within rounding of the root, on either side, while the
    feasible end ``lo`` of its bracket may lag behind; one pass over points just below ``x``
    brings the feasible end to the root as closely as the grid search does, so that both
    searches (a sharded batch takes this one) agree far below ``1e-10``. Shapes as in
    :func:`largest_feasible_gamma`; ``x`` and ``lo`` have the batch shape.
    """
    dtype = d.dtype
    device = getattr(d, "device", None)
    shrink = polish_factors(xp, dtype)
    t = xp.reshape(xp.asarray(shrink, dtype=dtype, device=device), (-1, 1))
    x = xp.reshape(x, (*x.shape, 1, 1))
    candidates = x * t
    feasible = feasible_candidates(
        xp,
        candidates,
        xp.expand_dims(d, axis=-2),
        xp.expand_dims(offset, axis=-2),
        xp.reshape(needed, (*needed.shape, 1, 1)),
        reducer,
        not top_is_zero,
        floor=True,
    )
    best = xp.max(xp.where(feasible, candidates, -1.0), axis=(-2, -1))
    return xp.maximum(best, lo)
