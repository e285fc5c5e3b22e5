"""Neighbourhood means of the live level-2 pooling, against a direct loop."""

import numpy as np
import pytest

from streamclust.cluster.spatial_pool import neighbourhood_mean, neighbours, spatial_mixing


def _direct(values, pool, shape, positions):
    ny, nx = shape
    out = []
    for p in positions:
        y, x = divmod(int(p), nx)
        acc, cnt = values[p].astype(np.float64).copy(), 1
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if (dy or dx) and 0 <= yy < ny and 0 <= xx < nx and pool[yy * nx + xx]:
                    acc += values[yy * nx + xx]
                    cnt += 1
        out.append(acc / cnt)
    return np.array(out)


def test_matches_a_direct_loop_with_edges_and_a_partial_pool():
    rng = np.random.default_rng(0)
    shape = (7, 9)
    v = rng.normal(size=(63, 4)).astype(np.float32)
    pool = rng.random(63) < 0.6
    pos = np.arange(63)
    np.testing.assert_allclose(neighbourhood_mean(v, pool, shape, pos), _direct(v, pool, shape, pos), rtol=1e-5, atol=1e-6)
    # a position outside the pool still pools its pooled neighbours (and keeps its own vector)
    np.testing.assert_allclose(neighbourhood_mean(v, np.zeros(63, bool), shape, pos), v)


def test_pooling_lifts_a_small_blob_out_of_the_noise():
    """Why the engine pools: a 5 x 5 blob one noise sigma away is hard to call per position and
    clear after 3 x 3 pooling (noise / 3, the blob's interior keeps its mean)."""
    rng = np.random.default_rng(1)
    ny, nx = 30, 30
    yy, xx = np.mgrid[:ny, :nx]
    blob = ((abs(yy - 15) <= 2) & (abs(xx - 15) <= 2)).ravel()
    v = rng.normal(size=(ny * nx, 1)).astype(np.float32)
    v[blob] += 1.0
    pooled = neighbourhood_mean(v, np.ones(ny * nx, bool), (ny, nx), np.arange(ny * nx))
    core = ((abs(yy - 15) <= 1) & (abs(xx - 15) <= 1)).ravel()
    raw_err = np.mean((v[:, 0] > 0.5) != blob)
    pooled_err = np.mean((pooled[:, 0] > 0.5) != blob)
    assert pooled_err < raw_err / 2
    assert pooled[core, 0].mean() == pytest.approx(v[blob, 0].mean(), abs=0.35)


def test_neighbours_are_clipped_to_the_scan_and_unique():
    got = neighbours(np.array([0, 1]), (3, 3))
    assert got.tolist() == [0, 1, 2, 3, 4, 5]


def test_bad_shape_is_named():
    with pytest.raises(ValueError, match="scan_shape"):
        neighbourhood_mean(np.zeros((10, 2)), np.ones(10, bool), (3, 3), np.arange(3))


def _mixing_direct(labels, shape, k):
    ny, nx = shape
    lab = np.asarray(labels).reshape(ny, nx)
    out = np.zeros((k, k))
    for i in range(k):
        cells = np.argwhere(lab == i)
        for j in range(k):
            hit = 0
            for y, x in cells:
                hit += any(0 <= y + dy < ny and 0 <= x + dx < nx and lab[y + dy, x + dx] == j
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
            out[i, j] = hit / len(cells) if len(cells) else 0.0
    return out


def test_spatial_mixing_matches_a_direct_loop_with_unscanned_positions():
    rng = np.random.default_rng(3)
    lab = rng.integers(-1, 4, size=(6, 11))
    np.testing.assert_allclose(spatial_mixing(lab.ravel(), (6, 11), 4), _mixing_direct(lab, (6, 11), 4))


def test_spatial_mixing_tells_a_noise_split_from_layers_and_inclusions():
    """One layer split at random position by position: both halves touch each other almost
    everywhere. Two layers, or an inclusion and its matrix: at least one side barely touches."""
    rng = np.random.default_rng(0)
    ny, nx = 40, 40
    yy, xx = np.mgrid[:ny, :nx]
    lab = np.where(yy < 15, 0, np.where(rng.random((ny, nx)) < 0.6, 1, 2))  # layer 0 over film 1|2
    lab[(yy - 28) ** 2 + (xx - 20) ** 2 <= 9] = 3                              # an inclusion
    m = spatial_mixing(lab.ravel(), (ny, nx), 4)
    both = np.minimum(m, m.T)
    assert both[1, 2] > 0.9
    assert both[0, 1] < 0.1 and both[0, 2] < 0.1
    assert both[1, 3] < 0.05 and m[3, 1] > 0.5  # the inclusion touches the film, not the reverse
