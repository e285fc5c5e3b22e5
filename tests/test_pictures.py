"""Pictures: the right colours for known memberships, the lines and ratios on the centre figures, and
non-blank files from a real results file."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread
from matplotlib.patches import Rectangle

from streamclust.adapters.join import Batch
from streamclust.engine.centres import CO_KA_KEV, FE_KA_KEV, CentreSet, fe_co_ratio
from streamclust.app.live import LiveAnalysis
from streamclust.app.liveview_render import cluster_palette
from streamclust.results.pictures import centre_figures, membership_map_figure, membership_rgba, write_pictures
from streamclust.results.writer import ResultsWriter
from streamclust.simulators.phantom import LamellaPhantom


def synthetic_memberships():
    """3 x 3 scan, 3 clusters: (1, 1) is pure cluster 2, (0, 2) is 0.6 cluster 2, (2, 0) unknown."""
    u = np.full((9, 3), 1 / 3, np.float32)
    u[0] = [1.0, 0.0, 0.0]
    u[2] = [0.2, 0.2, 0.6]
    u[4] = [0.0, 0.0, 1.0]
    u[5] = [0.1, 0.8, 0.1]
    u[6] = np.nan
    return u


def test_rgba_colours_follow_cluster_and_membership():
    u = synthetic_memberships()
    pal = cluster_palette(3)
    rgba = membership_rgba(u, (3, 3))
    assert rgba[1, 1].tolist() == [*pal[2].tolist(), 255]  # membership 1: the full colour
    assert rgba[0, 2].tolist() == [*np.rint(pal[2] * 0.6).astype(int).tolist(), 255]
    assert rgba[2, 0, 3] == 0  # unknown: transparent, never black
    # among cluster 2's positions, the pure one is the brightest
    lab = np.nanargmax(np.nan_to_num(u, nan=-1), axis=1).reshape(3, 3)
    lum = rgba[..., :3].astype(int).sum(axis=2)
    mine = (lab == 2) & (rgba[..., 3] == 255)
    assert lum[1, 1] == lum[mine].max() and (lum[mine] < lum[1, 1]).sum() == mine.sum() - 1


def test_membership_map_figure_pixels_and_flags(tmp_path):
    u = synthetic_memberships()
    pal = cluster_palette(3)
    flags = [{"flag_id": 1, "cluster": 2, "score": 0.9, "bbox": (0, 1, 2, 3), "last_kind": "raised"}]
    fig = membership_map_figure(u, (3, 3), flags=flags, title="synthetic")
    ax = fig.axes[0]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), membership_rgba(u, (3, 3)))
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 2 and boxes[0].get_xy() == (0.5, -0.5) and boxes[0].get_width() == 2
    assert any(t.get_text() == "flag 1: cl. 2, 0.90" for t in ax.texts)
    path = tmp_path / "map.png"
    fig.savefig(path, dpi=80)
    img = (imread(path)[..., :3] * 255).round().astype(int)
    # the pure cluster-2 cell is drawn in exactly cluster 2's colour (nearest-neighbour rendering)
    assert (np.abs(img - pal[2].astype(int)).sum(axis=2) == 0).sum() > 50
    assert img.std() > 10


def test_legend_counts_arg_max_clusters():
    u = synthetic_memberships()
    fig = membership_map_figure(u, (3, 3))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # rows 1, 3, 7, 8 are ties (1/3 each): arg-max picks cluster 0
    assert labels == ["cluster 0 (5)", "cluster 1 (1)", "cluster 2 (2)", "not yet (1)"]


def gaussian_spectrum(e, fe, co, background=0.5):
    s = np.full(e.size, background)
    for centre, height in ((FE_KA_KEV, fe), (CO_KA_KEV, co)):
        s += height * np.exp(-0.5 * ((e - centre) / 0.055) ** 2)
    return s


def test_centre_figures_mark_the_lines_and_give_the_ratio():
    e = (np.arange(1024) + 0.5) * 0.01
    eds = np.zeros((2, 2, e.size))
    eds[0, 0] = gaussian_spectrum(e, 10, 20)
    eds[1, 0] = gaussian_spectrum(e, 20, 20)
    eds[:, 1] = np.nan  # cluster 1 empty
    cs = CentreSet(thresholds=(0.5, 0.75), cbed=np.random.default_rng(0).gamma(2, 10, (2, 2, 8, 8)),
                   eds=eds, weight=np.array([[5.0, 0.0], [3.0, 0.0]]), count=np.array([[6, 0], [4, 0]]))
    figs = centre_figures(cs, e)
    assert list(figs) == [0]  # the empty cluster gets no figure
    fig = figs[0]
    assert len(fig.axes) == 2 * 3 + 2  # three panels a threshold, plus the two pattern colour bars
    zooms = [ax for ax in fig.axes if ax.get_title().startswith("Fe/Co")]
    assert len(zooms) == 2
    for ax, t in zip(zooms, range(2)):
        expected = float(fe_co_ratio(eds[t, 0], e))
        assert ax.get_title().endswith(f"{expected:.3f}")
        vlines = sorted(round(line.get_xdata()[0], 4) for line in ax.lines[1:])
        assert vlines == [round(FE_KA_KEV, 4), round(CO_KA_KEV, 4)]
    assert zooms[1].get_title() != zooms[0].get_title()  # the 0.75 row has the Fe-richer centre
    all_titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "u > 0.5: 6 positions" in all_titles and "u > 0.75: 4 positions" in all_titles
    # one threshold row with nothing above it says so instead of plotting NaN
    cs2 = CentreSet(thresholds=(0.5, 0.75), cbed=cs.cbed, eds=np.where(np.arange(2)[:, None, None] == 1, np.nan, eds),
                    weight=cs.weight, count=np.array([[6, 0], [0, 0]]))
    texts = [t.get_text() for ax in centre_figures(cs2, e)[0].axes for t in ax.texts]
    assert "no position above the threshold" in texts


def test_write_pictures_from_a_results_file(tmp_path):
    ph = LamellaPhantom(scan_shape=(16, 16), seed=3)
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, n_clusters=4, random_state=0,
                        assess_every=32,
                        engine_params={"warmup_positions": 32, "refresh_every": 64})
    for i in range(0, 192, 32):  # three quarters of the scan: a partial map with unseen rows
        p = np.arange(i, i + 32)
        ones = np.ones(p.size, bool)
        live.process(Batch(p, ph.frames(p), ph.spectra(p), ones, ones))
    w = ResultsWriter(tmp_path / "r.h5", scan_shape=ph.scan_shape, frame_shape=ph.frame_shape,
                      energy_axis_kev=ph.energy_axis_kev, n_clusters=4, thresholds=(0.5, 0.75),
                      config={}, scan_id="pictures")
    w.checkpoint(live.scan_result({"batches": 6}))
    files = write_pictures(tmp_path / "r.h5", tmp_path / "pics", dpi=60)
    names = [f.name for f in files]
    assert names[:2] == ["membership_map.png", "membership_per_cluster.png"]
    n_centres = int((live.centres.centres().count.max(axis=0) > 0).sum())
    assert n_centres >= 2 and len([n for n in names if n.startswith("centres_cluster_")]) == n_centres
    for f in files:
        img = imread(f)
        assert img.ndim == 3 and img.shape[0] > 100
        assert img[..., :3].std() > 0.05, f"{f.name} looks blank"
    # the map shows the unseen quarter in the "not yet" grey, and real cluster colours elsewhere
    img = (imread(tmp_path / "pics" / "membership_map.png")[..., :3] * 255).round().astype(int)
    grey = np.array([0x9A, 0x9A, 0x9A])
    assert (np.abs(img - grey).sum(axis=2) <= 3).sum() > 100


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="scan_shape"):
        membership_rgba(np.zeros((3, 3, 2)), (3, 4))
    with pytest.raises(ValueError, match="channels"):
        centre_figures(CentreSet((0.5,), np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 5)), np.ones((1, 1)),
                                 np.ones((1, 1), int)), np.arange(6.0))
