"""The NumPy kernel of :func:`isreshape_core.psis` for float64 rows.

It computes what ``psis._psis_rows`` computes (the same algorithm, step for step; see that
module's docstring for the references), organised for eager NumPy on one core, where each
NumPy call has a fixed cost, a pass over a large array is bound by memory, and ``exp`` and
``log`` cost several times an arithmetic operation:

* Tail selection (:func:`_select_tail`), by blocks of rows read once from memory. Short rows
  are sorted; in long rows a lower bound of the ``(M+1)``-th largest draw, from maxima of
  interleaved blocks, leaves a few percent of the draws as candidates, which are sorted. The
  tail is the ``M`` draws above the cutoff, ranked, with their positions. Rows with ties at the
  cutoff, or fewer than ``M + 1`` positive weights, are left to the portable path. The row's
  ``sum(exp(log_w - max))`` is taken in the same pass.
* The Zhang-Stephens grid ``sum_i log1p(-theta_j·x_i)`` (:func:`_grid_log_sums`). With
  ``theta_j = 1/x_M - c_j/(3 x*)``, ``c_j = sqrt(m/(j - 1/2)) - 1 > 0``, each term is
  ``log(p_i + c_j q_i)``, ``p_i = 1 - x_i/x_M`` and ``q_i = x_i/(3 x*)``, two non-negative
  numbers: all the arguments come out of one BLAS product ``[q p] @ [c; 1]`` per block
  (accurate: no cancellation), products of 8 of them are formed by three halvings, and one
  ``log`` per 8 terms is taken. Sums below ``_EXACT_BELOW`` per term in absolute value
  (``theta_j`` near 0, where the products' rounding would be large relative to the sum), and
  any that overflowed, are recomputed as arviz-stats computes them, with ``log1p(-theta_j·x)``
  on the grid's own rounded ``theta_j``, so that the profile ``log(-theta/k)`` divides two
  consistently rounded numbers. Every term is at least ``1/(12 m)`` (``theta_j < 1/x_M``) and
  at most ``1 + 3 sqrt(m)·x_M/x*``: products of 8 overflow only where the tail spans more than
  about 35 orders of magnitude.
* Normalisation (:func:`_normalise`). The sum over the draws left below the cutoff is the
  row's sum less the raw tail's, where that loses no accuracy (else it is summed directly);
  one pass writes ``log_w - max - log(sum)`` and the smoothed tail, a block of rows at a time.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ._array import check_log_weights

__all__ = ["gpd_fit_sorted_tail", "psis_rows"]

#: Terms multiplied together before one ``log`` in the grid (a power of 2).
_GROUP = 8
#: Grid sums with ``|k_j| < _EXACT_BELOW`` are recomputed term by term with ``log1p``. The
#: products leave an absolute error of a few ``eps`` in ``k_j``, so the profile's relative
#: error there stays below ``M·1e-11``; over 8000 rows of normal, Student-t and log-t log
#: weights (S = 256 and 4000) ``k_hat`` stayed within 2e-13 of arviz-stats.
_EXACT_BELOW = 1e-4
#: Elements per block of the grid and of the normalisation (both stay in the cache).
_BLOCK = 65536
#: Elements per block of rows in the tail selection (fewer, larger blocks: fewer NumPy calls).
_SELECT_BLOCK = 524288
#: Elements per block of the grid's terms (1 MiB, the size of this machine's L2 cache).
_GRID_BLOCK = 131072
#: Rows shorter than this many tail lengths are sorted whole to find the cutoff.
_SORT_RATIO = 6
#: Largest width of one ``np.partition`` call on block maxima (NumPy's sorting networks cover
#: up to 256 values per row; wider rows take several times longer per value).
_PARTITION_WIDTH = 256
#: Rows whose draws below the cutoff hold less than this share of their mass sum those draws
#: directly instead of subtracting the tail's sum from the row's (which would lose accuracy).
_DIRECT_BELOW = 1.0 / 16.0
#: Row maxima within this bound let ``sum(exp(row - max))`` be taken as ``exp(-max)·sum(exp(row))``.
_DIRECT_EXP = 600.0
#: Rows whose new max lies this far below the old (in log units) sum directly, shifted by it.
_DIRECT_SHIFT = -600.0
_PRIOR_BS = 3.0
_PRIOR_K = 10.0
_PRIOR_K_MEAN = 0.5


def psis_rows(rows: np.ndarray, tail_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """PSIS on a float64 ``(B, S)`` array, ``5 <= M = tail_len < S/5``.

    Returns ``(smoothed, k_hat, redo)``: ``smoothed`` ``(B, S)``, ``k_hat`` ``(B,)`` and
    ``redo``, ``None`` or a boolean ``(B,)`` marking rows that this kernel did not compute
    (ties at the cutoff, fewer than ``M + 1`` positive weights): the caller computes those with
    the portable path. NaN or ``+inf`` raise ``ValueError``.
    """
    # Every special value is handled explicitly below (NaN and +inf are rejected; -inf is a zero
    # weight; degenerate fits and overflowed products are detected and redone): NumPy's
    # floating-point warnings are off inside the kernel.
    with np.errstate(all="ignore"):
        return _psis_rows(np.ascontiguousarray(rows), tail_len)


def _psis_rows(rows: np.ndarray, tail_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n_rows = rows.shape[0]
    top, cut, total, tail_raw, tail_pos, good = _select_tail(rows, tail_len + 1)
    if not good.all():
        # Ties at the cutoff or zero weights in the tail: compute the other rows here, these
        # on the portable path.
        out = np.empty_like(rows)
        k_hat = np.full(n_rows, np.inf)
        if bool(np.any(good)):
            out[good], k_hat[good], _ = _psis_rows(rows[good], tail_len)
        return out, k_hat, ~good

    tail = tail_raw - top
    exp_tail = np.exp(tail)
    k_hat, sigma, exp_cut, ok = _gpd_fit(exp_tail, cut - top)
    new_tail, exp_new_tail = _gpd_quantiles(k_hat, sigma, exp_cut, tail_len)
    if not ok.all():
        new_tail = np.where(ok, new_tail, tail)
        exp_new_tail = np.where(ok, exp_new_tail, exp_tail)
        k_hat = np.where(ok, k_hat, np.inf)
    out = _normalise(rows, top, cut, total, exp_tail, new_tail, exp_new_tail, tail_pos)
    return out, k_hat[:, 0], None


def _select_tail(
    rows: np.ndarray, k1: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``k1`` largest draws of each row: ``(top, cut, total, tail, tail_pos, good)``.

    ``top``, ``cut`` and ``total`` ``(B, 1)``: the row's max, its ``k1``-th largest value and
    ``sum(exp(row - top))`` (taken here, while the row is in the cache); ``tail``
    ``(B, M)``, ``M = k1 - 1``: the values above the cutoff, ascending; ``tail_pos`` ``(B, M)``:
    their positions in ``rows.ravel()``; ``good`` ``(B,)``: rows with exactly ``M`` finite
    values above the cutoff (no ties at the cutoff); elsewhere ``tail`` and ``tail_pos`` are
    meaningless. NaN or ``+inf`` raise (a row holds one exactly when its max does). Blocks of
    rows of about ``_SELECT_BLOCK`` elements are done one at a time, each read once from
    memory.
    """
    n_rows, n = rows.shape
    step = max(_SELECT_BLOCK // n, 1)
    if n_rows <= step:
        top, cut, total, tail, tail_pos, good = _select_block(rows, k1)
    else:
        parts = [_select_block(rows[r0 : r0 + step], k1) for r0 in range(0, n_rows, step)]
        columns = zip(*parts, strict=True)
        top, cut, total, tail, tail_pos, good = (np.concatenate(a) for a in columns)
        tail_pos += (np.arange(n_rows) // step * (step * n))[:, None]
    return top, cut, total, tail, tail_pos, good


def _select_block(
    rows: np.ndarray, k1: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_select_tail` on one block of rows (positions relative to the block).

    Short rows are sorted whole. In long rows the maxima of ``b`` interleaved blocks
    ``{j, j + nb, ...}`` give a lower bound ``L`` of the ``k1``-th largest draw (the ``k1``
    largest maxima are ``k1`` draws ``>= L``); the draws ``>= L`` (a few percent) are the
    candidates, gathered into a ``-inf``-padded array that is sorted. ``L`` is the smallest
    of the maxima's order statistics over chunks of at most ``_PARTITION_WIDTH`` blocks
    (``ceil(k1·width/nb)`` from each chunk, at least ``k1`` in all: still a bound).
    """
    n_rows, n = rows.shape
    tail_len = k1 - 1
    ratio = n / k1
    if ratio < _SORT_RATIO:
        ranked = np.sort(rows, axis=-1)
        top, cut, tail = ranked[:, -1:], ranked[:, n - k1 : n - k1 + 1], ranked[:, n - tail_len :]
        _check_top(top)  # NaN sorts last: before the tail's shape depends on it
        good = tail[:, 0] > cut[:, 0]
        flat = np.flatnonzero(rows > cut)
        if not good.all():  # keep the positions of the rows without ties
            flat = flat[good[flat // n]]
        values = rows.reshape(-1)[flat].reshape(-1, tail_len)
        order = np.argsort(values, axis=-1)
        order += (np.arange(order.shape[0]) * tail_len)[:, None]
        if good.all():
            pos = flat[order]
        else:
            pos = np.zeros((n_rows, tail_len), dtype=flat.dtype)
            pos[good] = flat[order]
        return top, cut, _sum_exp(rows, top), tail, pos, good
    b = _interleave(ratio)
    nb = n // b
    maxima = np.max(rows[:, : nb * b].reshape(n_rows, b, nb), axis=1)
    top = np.max(maxima, axis=-1, keepdims=True)
    if nb * b < n:
        top = np.maximum(top, np.max(rows[:, nb * b :], axis=-1, keepdims=True))
    _check_top(top)
    n_chunks = math.ceil(nb / _PARTITION_WIDTH) if nb <= 8 * _PARTITION_WIDTH else 1
    bound = None
    for c in range(n_chunks):
        chunk = maxima[:, c * nb // n_chunks : (c + 1) * nb // n_chunks]
        width = chunk.shape[-1]
        kth = width - min(math.ceil(k1 * width / nb), width)
        part = np.partition(chunk, kth, axis=-1)[:, kth : kth + 1]
        bound = part if bound is None else np.minimum(bound, part)
    flat = np.flatnonzero(rows >= bound)
    row_of = flat // n
    counts = np.bincount(row_of, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    width = int(counts.max())
    slot = np.arange(flat.shape[0]) - starts[row_of]
    padded = np.full((n_rows, width), -np.inf)
    padded.reshape(-1)[row_of * width + slot] = rows.reshape(-1)[flat]
    order = np.argsort(padded, axis=-1)[:, width - k1 :]
    order += (np.arange(n_rows) * width)[:, None]
    ranked = padded.reshape(-1)[order]
    cut, tail = ranked[:, :1], ranked[:, 1:]
    good = tail[:, 0] > cut[:, 0]
    # Slot s of row r holds candidate starts[r] + s (slots past counts[r] are padding, -inf,
    # never in the tail of a good row).
    slot = order[:, 1:] - (np.arange(n_rows) * width)[:, None]
    pos = flat[np.minimum(starts[:, None] + slot, flat.shape[0] - 1)]
    return top, cut, _sum_exp(rows, top), tail, pos, good


def _check_top(top: np.ndarray) -> None:
    """NaN or ``+inf`` in a row (its max is then NaN or ``+inf``) raise the core's message."""
    if not np.isfinite(top).all():  # NaN or +inf (or an all -inf row, which is fine)
        check_log_weights(np, top)


def gpd_fit_sorted_tail(
    tail: np.ndarray, cutoff: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``psis._gpd_fit`` for the portable path on NumPy float64 (the tail rule's fits).

    ``tail`` ``(B, M)`` ascending and ``cutoff`` ``(B, 1)``, shifted so that the row max is 0;
    a tail may hold ``-inf`` (it is not fitted). Returns ``(k_hat, sigma, exp_cutoff, ok)`` as
    ``psis._gpd_fit`` does, finite where ``ok`` is False.
    """
    with np.errstate(all="ignore"):
        k_hat, sigma, exp_cut, ok = _gpd_fit(np.exp(tail), cutoff)
    ok &= tail[:, :1] > -np.inf
    return np.where(ok, k_hat, 0.0), np.where(ok, sigma, 1.0), exp_cut, ok


def _interleave(ratio: float) -> int:
    """Number ``b`` of draws per block of the block-max bound, for rows of ``ratio·k1`` draws."""
    return min(int(ratio**0.5) * 2, int(ratio), 64)


def _gpd_fit(
    exp_tail: np.ndarray, cutoff: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``psis._gpd_fit`` on NumPy: ``(k_hat, sigma, exp_cutoff, ok)``, each ``(B, 1)``.

    ``exp_tail`` is ``exp(tail)``, the tail shifted by the row max; ``cutoff`` is shifted too.
    """
    tail_len = exp_tail.shape[-1]
    exp_cut = np.exp(cutoff)
    x = exp_tail - exp_cut
    star = int(tail_len / 4 + 0.5) - 1
    ok = (x[:, -1:] > x[:, :1]) & (x[:, star : star + 1] > x[:, :1])  # loo >= 2.10
    if not ok.all():
        x = np.where(ok, x, np.arange(1, tail_len + 1) / tail_len)
    x_star, x_max = x[:, star : star + 1], x[:, -1:]

    n_grid = 30 + int(tail_len**0.5)
    neg_spread = _grid_coefficients(n_grid)[2]  # -c_j < 0
    theta = neg_spread / (_PRIOR_BS * x_star) + 1.0 / x_max
    k_grid = _grid_log_sums(x, x_star, x_max, theta)
    k_grid /= tail_len
    # The profile log-likelihood is M·(log(-theta/k) - k - 1) where -theta/k > 0, else -inf;
    # the weights are exp(profile - max), computed as exp(M·(r - max r)), r = log(-theta/k) - k
    # (k = 0 or the wrong sign gives +inf or NaN in r).
    ratio = np.log(-(theta / k_grid))
    at_zero = theta == 0
    if at_zero.any():  # the profile's limit at theta = 0 (see psis._gpd_fit): -theta/k -> 1/mean
        ratio = np.where(at_zero, -np.log(np.mean(x, axis=-1, keepdims=True)), ratio)
    ratio -= k_grid
    ratio = np.where(ratio < np.inf, ratio, -np.inf)
    best = ratio.max(axis=-1, keepdims=True)
    ok &= best > -np.inf
    if not ok.all():
        best = np.where(ok, best, 0.0)
        ratio = np.where(ok, ratio, 0.0)
    ratio -= best
    ratio *= tail_len
    weights = np.exp(ratio, out=ratio)
    # Weights below 10 eps of the total are dropped, as arviz-stats does.
    ones = _ones(n_grid)
    total = (weights @ ones)[:, None]
    np.copyto(weights, 0.0, where=weights < (10 * np.finfo(np.float64).eps) * total)
    theta_hat = ((theta * weights) @ ones / (weights @ ones))[:, None]
    k_raw = (np.log1p(x * -theta_hat) @ _ones(tail_len))[:, None]
    k_raw /= tail_len
    sigma = k_raw / -theta_hat
    ok &= (sigma > 0) & (sigma < np.inf)  # also theta_hat = 0 and k_raw not finite
    k_hat = (tail_len * k_raw + _PRIOR_K * _PRIOR_K_MEAN) / (tail_len + _PRIOR_K)
    return k_hat, sigma, exp_cut, ok


@functools.lru_cache(maxsize=64)
def _ones(n: int) -> np.ndarray:
    """A read-only vector of ``n`` ones: ``a @ _ones(n)`` sums the rows of ``a`` (BLAS)."""
    ones = np.ones(n)
    ones.flags.writeable = False
    return ones


@functools.lru_cache(maxsize=64)
def _grid_coefficients(n_grid: int) -> np.ndarray:
    """``[c; 1; -c]``, shape ``(3, m)``: ``c_j = sqrt(m/(j - 1/2)) - 1`` (read-only)."""
    spread = np.sqrt(n_grid / (np.arange(1, n_grid + 1) - 0.5)) - 1.0
    coef = np.stack([spread, np.ones(n_grid), -spread])
    coef.flags.writeable = False
    return coef


def _grid_log_sums(
    x: np.ndarray, x_star: np.ndarray, x_max: np.ndarray, theta: np.ndarray
) -> np.ndarray:
    """``sum_i log1p(-theta[b, j]·x[b, i])``, shape ``(B, m)`` (see the module docstring).

    Products that overflow are recomputed: call it with NumPy's overflow warning off, as
    :func:`psis_rows` does.
    """
    n_rows, tail_len = x.shape
    n_grid = theta.shape[-1]
    padded_len = -(-tail_len // _GROUP) * _GROUP
    # (M', B, 2): q_i and p_i of every row; padding terms are p = 1, q = 0 (log 1 = 0).
    qp = np.empty((padded_len, n_rows, 2))
    x_t = x.T
    np.divide(x_t, _PRIOR_BS * x_star.T, out=qp[:tail_len, :, 0])
    np.divide(x_max.T - x_t, x_max.T, out=qp[:tail_len, :, 1])
    qp[tail_len:] = (0.0, 1.0)
    coef = _grid_coefficients(n_grid)
    sums = np.empty((n_rows, n_grid))
    step = max(_GRID_BLOCK // (padded_len * n_grid), 1)
    buf = np.empty((padded_len * min(step, n_rows), n_grid))
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        terms = buf[: padded_len * (r1 - r0)]
        np.matmul(qp[:, r0:r1].reshape(-1, 2), coef[:2], out=terms)
        terms = terms.reshape(padded_len, r1 - r0, n_grid)
        half = padded_len
        while half > padded_len // _GROUP:  # an overflowed product is recomputed below
            half //= 2
            np.multiply(terms[:half], terms[half : 2 * half], out=terms[:half])
            terms = terms[:half]
        np.sum(np.log(terms, out=terms), axis=0, out=sums[r0:r1])
    size = np.abs(sums)
    redo = (size < _EXACT_BELOW * tail_len) | (size == np.inf)
    if redo.any():
        r, j = np.nonzero(redo)
        sums[r, j] = np.log1p(x[r] * -theta[r, j][:, None]) @ _ones(tail_len)
    return sums


@functools.lru_cache(maxsize=64)
def _log1m_probabilities(tail_len: int) -> np.ndarray:
    """``log(1 - (i - 1/2)/M)`` for ``i = 1..M`` (read-only)."""
    log1m_p = np.log1p(-(np.arange(tail_len) + 0.5) / tail_len)
    log1m_p.flags.writeable = False
    return log1m_p


def _gpd_quantiles(
    k_hat: np.ndarray, sigma: np.ndarray, exp_cut: np.ndarray, tail_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """``log(exp(c) + F^-1((i - 1/2)/M))``, truncated at 0 (``psis._gpd_smoothed_tail``), and
    its exponential, ``min(exp(c) + F^-1(p_i), 1)``; both ``(B, M)``.

    Rows without a fit (``sigma`` not positive and finite) give meaningless values; the
    caller replaces them.
    """
    log1m_p = _log1m_probabilities(tail_len)
    quantile = np.expm1(log1m_p * -k_hat)
    quantile *= sigma / k_hat
    if not k_hat.all():  # k = 0: the exponential distribution
        quantile = np.where(k_hat == 0, -sigma * log1m_p, quantile)
    quantile += exp_cut
    np.minimum(quantile, 1.0, out=quantile)
    return np.log(quantile), quantile


def _sum_exp(rows: np.ndarray, top: np.ndarray) -> np.ndarray:
    """``sum(exp(rows - top), axis=-1)`` ``(B, 1)``, by blocks of ``_BLOCK`` columns at most.

    ``top`` is the row max; an all ``-inf`` row gives 0. Where every max lies within
    ``±_DIRECT_EXP`` the shift is applied after the sum, ``exp(-top)·sum(exp(rows))``
    (no term overflows, and those that underflow are below ``exp(-145)`` of the largest).
    """
    n_rows, n = rows.shape
    if n <= _BLOCK and (np.abs(top) < _DIRECT_EXP).all():
        return np.add.reduce(np.exp(rows), axis=-1, keepdims=True) * np.exp(-top)
    width = min(n, _BLOCK)
    buf = np.empty((n_rows, width))
    total = np.zeros((n_rows, 1))
    shift = None
    if not (np.abs(top) < _DIRECT_EXP).all():
        # Rows whose max is not finite (all -inf, or NaN or +inf, which the caller rejects)
        # are not shifted.
        shift = np.where(np.isfinite(top), top, 0.0)
    for c0 in range(0, n, width):
        part = buf[:, : min(width, n - c0)]
        if shift is None:
            np.exp(rows[:, c0 : c0 + width], out=part)
        else:
            np.exp(np.subtract(rows[:, c0 : c0 + width], shift, out=part), out=part)
        total += np.add.reduce(part, axis=-1, keepdims=True)
    return total if shift is not None else total * np.exp(-top)


def _normalise(
    rows: np.ndarray,
    top: np.ndarray,
    cut: np.ndarray,
    total: np.ndarray,
    exp_tail: np.ndarray,
    new_tail: np.ndarray,
    exp_new_tail: np.ndarray,
    tail_pos: np.ndarray,
) -> np.ndarray:
    """The rows with the tail at ``tail_pos`` replaced by ``new_tail``, normalised.

    ``out = rows - top - log(sum(exp(smoothed row - top)))``. The raw tail (``rows > cut``,
    whose ``exp(tail - top)`` is ``exp_tail``) is replaced by ``new_tail`` (shifted by ``top``,
    with exponentials ``exp_new_tail``). The sum over the draws left is ``total`` (the sum
    over the whole row) less that over the raw tail, where the draws left hold at least
    ``_DIRECT_BELOW`` of the row's mass, so that the difference loses at most a few dozen
    units in the last place. Other rows, and rows whose new max is far below the old (their
    sums could underflow), sum their draws ``<= cut`` directly, shifted by the new max (the
    last value of the ascending new tail, which is at least the cutoff).
    The output is written a block of rows at a time, with the block's tails.
    """
    n_rows, n = rows.shape
    ones = _ones(new_tail.shape[-1])
    new_max = new_tail[:, -1:]
    body = total - (exp_tail @ ones)[:, None]
    direct = ~(body >= _DIRECT_BELOW * total)[:, 0] | (new_max[:, 0] < _DIRECT_SHIFT)
    log_norm = np.log(body + (exp_new_tail @ ones)[:, None])  # the direct rows are redone
    if direct.any():
        shift = top[direct] + new_max[direct]
        terms = np.exp(rows[direct] - shift)  # only tail draws, dropped next, can overflow
        terms[rows[direct] > cut[direct]] = 0.0
        new_sum = np.exp(new_tail[direct] - new_max[direct]) @ ones
        body = np.add.reduce(terms, axis=-1) + new_sum
        log_norm[direct] = new_max[direct] + np.log(body)[:, None]
    out = np.empty_like(rows)
    flat_out = out.reshape(-1)
    step = max(_BLOCK // n, 1)
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        np.subtract(rows[r0:r1], top[r0:r1] + log_norm[r0:r1], out=out[r0:r1])
        flat_out[tail_pos[r0:r1]] = new_tail[r0:r1] - log_norm[r0:r1]
    return out
