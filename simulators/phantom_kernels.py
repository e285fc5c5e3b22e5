"""Numba kernels that turn a phantom's noiseless templates into exact Poisson counts, sparsely.

A frame's expected counts are a sum of *components* (a diffraction disc, the thermal diffuse
background, a halo, a ring), each with a support (pattern pixels) and two non-negative channels
``a`` and ``b`` (a disc's two ramp halves; ``b`` is zero for most components)::

    lambda[pixel] = sum_c  wa[c] * a_c[pixel] + wb[c] * b_c[pixel]

Components are independent Poisson fields, so each may be sampled the cheapest exact way:

* **per pixel** (bright components, mean >= ``dense_threshold`` counts a pixel): one Poisson draw
  a support pixel;
* **by superposition** (dim components): draw the channel's total ``N ~ Poisson(w * sum(channel))``
  and drop the ``N`` counts on pixels chosen from the channel's own distribution with Walker's
  alias method (O(1) a count; an exact inverse-CDF sampler with a cheaper lookup than bisection).

Smooth full-frame templates (diffuse scattering, rings) are constant on b x b pixel blocks
(b = 4): their alias tables are b^2 times smaller and stay in cache, and a count lands on a
uniformly chosen pixel of its block. Both give an exact Poisson field; the cost is the number of bright pixels plus the number of dim
counts, not the 262,144 pixels of a quad frame. The pattern is then shifted by the position's
integer descan offset, the quad's wide central-cross pixels receive their extra counts, dead
pixels read 0 and hot pixels add their own counts. Every addition saturates at the counter's
maximum (``min(a + b, S)`` composes, so clamping each addition is exact).

Each kernel seeds Numba's per-thread generator from a per-position seed, so a frame depends only
on ``(seed, position)``, never on call order or on the thread that renders it. Every kernel has a
NumPy twin (``*_numpy``) drawing from a :class:`numpy.random.Generator`; the twins define the
intended distribution and tests compare the two statistically (their random streams differ).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "splitmix64",
    "poisson",
    "position_seeds",
    "build_alias",
    "build_alias_numpy",
    "render_frame",
    "render_frames",
    "render_frame_numpy",
    "render_spectrum",
    "render_spectra",
    "render_spectrum_numpy",
]

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One SplitMix64 step: a well-mixed 64-bit hash of ``x`` (Steele et al. 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def position_seeds(seed: int, positions: np.ndarray, stream: int) -> np.ndarray:
    """32-bit seeds for Numba's Mersenne Twister, one per position, from (seed, stream, position).

    Vectorised SplitMix64 over ``seed * 2**32 + stream * 2**24 + position`` (positions < 2**24),
    so the frame stream (``stream=1``) and the spectrum stream (``stream=2``) never share seeds.
    """
    pos = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64((int(seed) << 32) & _MASK64) + np.uint64(stream << 24) + pos
        x = x + np.uint64(0x9E3779B97F4A7C15)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(32)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Walker / Vose alias tables
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def build_alias(weights):
    """Vose's alias table for a non-negative weight vector: (prob float64, alias int32).

    Sample: ``j = randint(n)``; keep ``j`` if ``random() < prob[j]`` else take ``alias[j]``.
    """
    n = weights.shape[0]
    prob = np.ones(n, dtype=np.float64)
    alias = np.arange(n).astype(np.int32)
    total = 0.0
    for i in range(n):
        total += weights[i]
    if n == 0 or total <= 0.0:
        return prob, alias
    scaled = np.empty(n, dtype=np.float64)
    small = np.empty(n, dtype=np.int64)
    large = np.empty(n, dtype=np.int64)
    ns = 0
    nl = 0
    for i in range(n):
        scaled[i] = weights[i] * n / total
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        g = large[nl - 1]
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] = (scaled[g] + scaled[s]) - 1.0
        if scaled[g] < 1.0:
            nl -= 1
            small[ns] = g
            ns += 1
    # leftovers are 1 up to rounding
    for i in range(nl):
        prob[large[i]] = 1.0
    for i in range(ns):
        prob[small[i]] = 1.0
    return prob, alias


def build_alias_numpy(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy/Python twin of :func:`build_alias` (same algorithm, same table)."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    prob = np.ones(n, dtype=np.float64)
    alias = np.arange(n, dtype=np.int32)
    total = float(w.sum())
    if n == 0 or total <= 0.0:
        return prob, alias
    scaled = w * n / total
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s = small.pop()
        g = large[-1]
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] = (scaled[g] + scaled[s]) - 1.0
        if scaled[g] < 1.0:
            large.pop()
            small.append(g)
    for i in large + small:
        prob[i] = 1.0
    return prob, alias


# --------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------
_INV_K = 1.0 / np.maximum(np.arange(256, dtype=np.float64), 1.0)


@njit(cache=True, nogil=True)
def poisson(lam):
    """Exact Poisson draw: inversion with one uniform below 12 (cheaper than Numba's product
    method, whose cost grows as lambda), Numba's PTRS rejection sampler above."""
    if lam >= 12.0:
        return np.random.poisson(lam)
    u = np.random.random()
    p = np.exp(-lam)
    cdf = p
    k = 0
    while u > cdf and k < 255:
        k += 1
        p *= lam * _INV_K[k]
        cdf += p
    return k


@njit(cache=True, nogil=True)
def _add_sat(out, k, n, sat):
    v = out[k] + n
    out[k] = sat if v > sat else v


@njit(cache=True, nogil=True)
def _scatter(out, n_counts, base, n_sup, prob, alias, py, px, b, dy, dx, ny, nx, sat):
    bb = b * b
    for _ in range(n_counts):
        # one uniform: its integer part picks the column, its fraction decides column vs alias,
        # and (blocks only) the rescaled remainder, uniform again, picks the pixel in the block
        u = np.random.random() * n_sup
        j = int(u)
        if j >= n_sup:
            j = n_sup - 1
        f = u - j
        pr = prob[base + j]
        if f >= pr:
            if bb > 1:
                f = (f - pr) / (1.0 - pr)
            j = alias[base + j]
        elif bb > 1:
            f = f / pr
        y = py[base + j] + dy
        x = px[base + j] + dx
        if bb > 1:
            s = int(f * bb)
            if s >= bb:
                s = bb - 1
            y += s // b
            x += s % b
        if 0 <= y < ny and 0 <= x < nx:
            k = y * nx + x
            v = out[k] + 1
            out[k] = sat if v > sat else v


@njit(cache=True, nogil=True)
def _render_one(
    seed, out, wa, wb, ptr, blk, py, px, va, vb, suma, sumb, proba, aliasa, probb, aliasb,
    dy, dx, ny, nx, cross_pix, cross_gain_m1, band_of, band_ptr, band_comp, band_va, band_vb,
    dead, hot, hot_lambda, sat, dense_threshold,
):
    np.random.seed(seed)
    out[:] = 0
    n_comp = wa.shape[0]
    for c in range(n_comp):
        a = wa[c]
        b = wb[c]
        if a <= 0.0 and b <= 0.0:
            continue
        lo = ptr[c]
        hi = ptr[c + 1]
        n_sup = hi - lo
        if n_sup <= 0:
            continue
        bs = blk[c]
        mean = (a * suma[c] + b * sumb[c]) / (n_sup * bs * bs)
        if mean >= dense_threshold:
            for j in range(lo, hi):
                lam = a * va[j] + b * vb[j]
                if lam <= 0.0:
                    continue
                for sy in range(bs):
                    y = py[j] + dy + sy
                    if y < 0 or y >= ny:
                        continue
                    for sx in range(bs):
                        x = px[j] + dx + sx
                        if 0 <= x < nx:
                            n = poisson(lam)
                            if n > 0:
                                _add_sat(out, y * nx + x, n, sat)
        else:
            if a > 0.0 and suma[c] > 0.0:
                na = poisson(a * suma[c])
                _scatter(out, na, lo, n_sup, proba, aliasa, py, px, bs, dy, dx, ny, nx, sat)
            if b > 0.0 and sumb[c] > 0.0:
                nb = poisson(b * sumb[c])
                _scatter(out, nb, lo, n_sup, probb, aliasb, py, px, bs, dy, dx, ny, nx, sat)
    # the quad's central-cross pixels are wider: extra Poisson((gain - 1) * lambda) each
    for i in range(cross_pix.shape[0]):
        k = cross_pix[i]
        y = k // nx - dy
        x = k % nx - dx
        if y < 0 or y >= ny or x < 0 or x >= nx:
            continue
        r = band_of[y * nx + x]
        if r < 0:
            continue
        lam = 0.0
        for e in range(band_ptr[r], band_ptr[r + 1]):
            c = band_comp[e]
            lam += wa[c] * band_va[e] + wb[c] * band_vb[e]
        lam *= cross_gain_m1[i]
        if lam > 0.0:
            n = poisson(lam)
            if n > 0:
                _add_sat(out, k, n, sat)
    for i in range(hot.shape[0]):
        n = poisson(hot_lambda)
        _add_sat(out, hot[i], n, sat)
    for i in range(dead.shape[0]):
        out[dead[i]] = 0


@njit(cache=True, nogil=True)
def render_frame(
    seed, out, wa, wb, ptr, blk, py, px, va, vb, suma, sumb, proba, aliasa, probb, aliasb,
    dy, dx, ny, nx, cross_pix, cross_gain_m1, band_of, band_ptr, band_comp, band_va, band_vb,
    dead, hot, hot_lambda, sat, dense_threshold,
):
    """Render one frame into the flat counter array ``out`` (see the module docstring).

    Component ``c`` owns support entries ``ptr[c]:ptr[c+1]``: block origins ``(py, px)`` of
    ``blk[c] x blk[c]`` pixel blocks (1 for discs) with per-pixel template values ``va``/``vb``
    (channel sums ``suma``/``sumb`` include the block area) and an alias table per channel.
    """
    _render_one(
        seed, out, wa, wb, ptr, blk, py, px, va, vb, suma, sumb, proba, aliasa, probb, aliasb,
        dy, dx, ny, nx, cross_pix, cross_gain_m1, band_of, band_ptr, band_comp, band_va,
        band_vb, dead, hot, hot_lambda, sat, dense_threshold,
    )


@njit(cache=True, nogil=True)
def render_frames(
    seeds, out, wa, wb, ptr, blk, py, px, va, vb, suma, sumb, proba, aliasa, probb, aliasb,
    dys, dxs, ny, nx, cross_pix, cross_gain_m1, band_of, band_ptr, band_comp, band_va, band_vb,
    dead, hot, hot_lambda, sat, dense_threshold,
):
    """Render ``len(seeds)`` frames into ``out`` (n, ny*nx); row i uses ``wa[i]``, ``wb[i]``."""
    for i in range(seeds.shape[0]):
        _render_one(
            seeds[i], out[i], wa[i], wb[i], ptr, blk, py, px, va, vb, suma, sumb, proba, aliasa,
            probb, aliasb, dys[i], dxs[i], ny, nx, cross_pix, cross_gain_m1, band_of, band_ptr,
            band_comp, band_va, band_vb, dead, hot, hot_lambda, sat, dense_threshold,
        )


def render_frame_numpy(
    rng, out, wa, wb, ptr, blk, py, px, va, vb, suma, sumb, proba, aliasa, probb, aliasb,
    dy, dx, ny, nx, cross_pix, cross_gain_m1, band_of, band_ptr, band_comp, band_va, band_vb,
    dead, hot, hot_lambda, sat, dense_threshold,
):
    """NumPy twin of :func:`render_frame`, drawing from the Generator ``rng``."""
    acc = np.zeros(ny * nx, dtype=np.int64)

    def put(y, x, n):
        y = y + dy
        x = x + dx
        ok = (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
        np.add.at(acc, (y * nx + x)[ok], n[ok])

    for c in range(wa.shape[0]):
        a, b = float(wa[c]), float(wb[c])
        lo, hi = int(ptr[c]), int(ptr[c + 1])
        n_sup = hi - lo
        bs = int(blk[c])
        if (a <= 0.0 and b <= 0.0) or n_sup <= 0:
            continue
        y0 = py[lo:hi].astype(np.int64)
        x0 = px[lo:hi].astype(np.int64)
        if (a * suma[c] + b * sumb[c]) / (n_sup * bs * bs) >= dense_threshold:
            lam = np.maximum(a * va[lo:hi] + b * vb[lo:hi], 0.0)
            for sy in range(bs):
                for sx in range(bs):
                    put(y0 + sy, x0 + sx, rng.poisson(lam))
            continue
        for w, s, prob, alias in ((a, suma[c], proba, aliasa), (b, sumb[c], probb, aliasb)):
            if w <= 0.0 or s <= 0.0:
                continue
            n = rng.poisson(w * s)
            j = rng.integers(0, n_sup, size=n)
            keep = rng.random(n) < prob[lo + j]
            j = np.where(keep, j, alias[lo + j])
            sub = rng.integers(0, bs * bs, size=n)
            put(y0[j] + sub // bs, x0[j] + sub % bs, np.ones(n, dtype=np.int64))
    k = cross_pix.astype(np.int64)
    y = k // nx - dy
    x = k % nx - dx
    ok = (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
    lam = np.zeros(k.shape[0])
    for i in np.nonzero(ok)[0]:
        r = band_of[y[i] * nx + x[i]]
        if r < 0:
            continue
        e = slice(band_ptr[r], band_ptr[r + 1])
        cc = band_comp[e]
        lam[i] = np.sum(wa[cc] * band_va[e] + wb[cc] * band_vb[e]) * cross_gain_m1[i]
    acc[k] += rng.poisson(np.maximum(lam, 0.0))
    acc[hot] += rng.poisson(hot_lambda, size=hot.shape[0])
    acc[dead] = 0
    out[:] = np.minimum(acc, sat)


# --------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _spectrum_one(seed, out, w, totals, prob, alias, sat):
    np.random.seed(seed)
    out[:] = 0
    n_ch = out.shape[0]
    for c in range(w.shape[0]):
        lam = w[c] * totals[c]
        if lam <= 0.0:
            continue
        n = poisson(lam)
        for _ in range(n):
            u = np.random.random() * n_ch
            j = int(u)
            if j >= n_ch:
                j = n_ch - 1
            if u - j >= prob[c, j]:
                j = alias[c, j]
            v = out[j] + 1
            out[j] = sat if v > sat else v


@njit(cache=True, nogil=True)
def render_spectrum(seed, out, w, totals, prob, alias, sat):
    """One spectrum: component ``c`` adds ``Poisson(w[c] * totals[c])`` counts spread by its
    alias table ``(prob[c], alias[c])`` over the channels."""
    _spectrum_one(seed, out, w, totals, prob, alias, sat)


@njit(cache=True, nogil=True)
def render_spectra(seeds, out, w, totals, prob, alias, sat):
    """``len(seeds)`` spectra into ``out`` (n, n_channels); row i uses weights ``w[i]``."""
    for i in range(seeds.shape[0]):
        _spectrum_one(seeds[i], out[i], w[i], totals, prob, alias, sat)


def render_spectrum_numpy(rng, out, w, totals, prob, alias, sat):
    """NumPy twin of :func:`render_spectrum`."""
    n_ch = out.shape[0]
    acc = np.zeros(n_ch, dtype=np.int64)
    for c in range(w.shape[0]):
        lam = float(w[c] * totals[c])
        if lam <= 0.0:
            continue
        n = rng.poisson(lam)
        j = rng.integers(0, n_ch, size=n)
        keep = rng.random(n) < prob[c, j]
        j = np.where(keep, j, alias[c, j])
        np.add.at(acc, j, 1)
    out[:] = np.minimum(acc, sat)
