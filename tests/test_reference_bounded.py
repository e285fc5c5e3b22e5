"""The offline yardstick in bounded memory (issue 16): ``run_reference(rows=..., sample_size=...)``.

The demo keeps the reduced features of a scan in memory-mapped files and runs the paper's pipeline on
them with its statistics fitted on a bounded sample; these tests pin that (a) with a sample as large as
the scan it is the in-memory pipeline exactly, (b) rows of a memory-mapped file give the same as
the same rows in memory, (c) a smaller sample finds the same partition, and (d) memory does not grow
with the scan by more than the per-row scores.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.reference import run_reference


def _data(n: int, seed: int = 0, f_c: int = 64, f_e: int = 32):
    """Three well separated groups of Poisson counts (a problem the pipeline solves: the tests are
    about bounded memory giving the same answer, not about a hard problem)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(3, n, p=[0.7, 0.15, 0.15])  # group 0 is the host of level 2
    cbed = rng.poisson(20.0, (n, f_c)).astype(np.float32)
    eds = rng.poisson(5.0, (n, f_e)).astype(np.float32)
    cbed[truth == 1, :16] += 30
    eds[truth == 2, :8] += 16
    # a minor phase inside group 0, fainter than the groups' separation: what level 2 is for
    sub = (truth == 0) & (rng.random(n) < 0.2)
    cbed[sub, 16:24] += 14
    eds[sub, 8:12] += 8
    truth[sub] = 3
    return cbed, eds, truth


def test_sample_as_large_as_the_scan_is_the_exact_pipeline():
    cbed, eds, _ = _data(900)
    kw = dict(n_clusters=3, random_state=0, clusterer=FuzzyCMeans(3, n_init=3, random_state=0))
    a = run_reference(cbed, eds, **kw)
    b = run_reference(cbed, eds, sample_size=900, chunk_rows=128, **kw)
    assert np.array_equal(a.labels, b.labels)
    assert a.n_components == b.n_components


def test_rows_of_a_memory_mapped_file_equal_the_rows_in_memory(tmp_path):
    cbed, eds, _ = _data(1200, seed=1)
    mc = np.lib.format.open_memmap(tmp_path / "c.npy", mode="w+", dtype=np.float32, shape=cbed.shape)
    me = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float32, shape=eds.shape)
    mc[:] = cbed
    me[:] = eds
    rows = np.flatnonzero(np.arange(1200) % 5 != 0)  # a partial scan: every fifth position missing
    kw = dict(n_clusters=3, random_state=0, clusterer=FuzzyCMeans(3, n_init=3, random_state=0))
    a = run_reference(cbed[rows], eds[rows], **kw)
    b = run_reference(mc, me, rows=rows, **kw)
    assert np.array_equal(a.labels, b.labels)
    c = run_reference(mc, me, rows=rows, sample_size=400, chunk_rows=256, **kw)
    assert adjusted_rand_score(a.labels, c.labels) > 0.95


@pytest.mark.parametrize("refine_host", [0, 2])
def test_a_bounded_sample_finds_the_same_partition(refine_host):
    cbed, eds, truth = _data(6000, seed=2)
    kw = dict(n_clusters=3, random_state=0, clusterer=FuzzyCMeans(3, n_init=3, random_state=0),
              refine_host=refine_host)
    exact = run_reference(cbed, eds, **kw)
    sampled = run_reference(cbed, eds, sample_size=1500, chunk_rows=1000, **kw)
    assert adjusted_rand_score(exact.labels, sampled.labels) > 0.95
    if refine_host:  # level 2 finds the minor phase in the host
        assert adjusted_rand_score(truth, sampled.labels) > 0.9


def test_memory_grows_with_the_scan_only_by_the_scores(tmp_path):
    """Peak traced memory for 4x the rows at the same sample: the growth must be far below one
    float32 copy of the extra rows' features (what an unbounded pipeline would hold, several times)."""
    f = 512
    peaks = {}
    for n in (4000, 16000):
        rng = np.random.default_rng(n)
        mc = np.lib.format.open_memmap(tmp_path / f"c{n}.npy", mode="w+", dtype=np.float32, shape=(n, f))
        me = np.lib.format.open_memmap(tmp_path / f"e{n}.npy", mode="w+", dtype=np.float32, shape=(n, 64))
        for s in range(0, n, 2000):
            mc[s:s + 2000] = rng.poisson(3.0, (min(2000, n - s), f))
            me[s:s + 2000] = rng.poisson(1.0, (min(2000, n - s), 64))
        mc.flush()
        me.flush()
        tracemalloc.start()
        run_reference(mc, me, n_clusters=3, random_state=0, sample_size=2000, chunk_rows=1000,
                      clusterer=FuzzyCMeans(3, n_init=1, max_iter=20, random_state=0))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    one_copy_of_the_extra_rows = 12000 * (f + 64) * 4
    assert peaks[16000] - peaks[4000] < one_copy_of_the_extra_rows / 4
