"""The pictures a microscopist reads after (or during) a scan, in the style of the paper's figures.

* :func:`membership_map_figure` (Fig. 4): every scan position coloured by its arg-max cluster, with
  brightness = that membership, so a confident position is bright and a mixed one dark; positions
  not yet clustered are left grey (never confused with "dark = uncertain"); flags' bounding boxes
  drawn on top. The colours are the live view's (:func:`streamclust.app.liveview_render.cluster_palette`),
  so a cluster has the same colour on screen and on paper.
* :func:`membership_grid_figure`: one grey-scale membership map per cluster.
* :func:`centre_figures` (Figs. 5 and 6): per cluster, one row per membership threshold with the
  thresholded centre CBED pattern (log scale) and EDS spectrum (whole range and a zoom on the Fe and
  Co K-alpha lines, both marked), the Fe/Co K-alpha ratio and the position count in the row title.
* :func:`write_pictures`: all of them, from a results file (:mod:`streamclust.results.writer`).

matplotlib runs on the Agg backend through its object API (no pyplot state), so pictures can be
drawn from any thread of a headless acquisition PC.

Examples
--------
>>> import numpy as np
>>> u = np.array([[1.0, 0.0], [0.2, 0.8], [np.nan, np.nan], [0.5, 0.5]])
>>> membership_rgba(u, (2, 2))[0, 0].tolist()   # cluster 0 at full membership: its colour, opaque
[230, 159, 0, 255]
>>> int(membership_rgba(u, (2, 2))[1, 0, 3])    # not yet clustered: transparent
0
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from streamclust.engine.centres import CO_KA_KEV, FE_KA_KEV, CentreSet, fe_co_ratio
from streamclust.app.liveview_render import cluster_palette, render_rgba

logger = logging.getLogger(__name__)

__all__ = ["membership_rgba", "membership_map_figure", "membership_grid_figure", "centre_figures",
           "write_pictures"]

#: the lines the paper's Figs. 5 and 6 are read by
LINES_KEV = (("Fe K$\\alpha$", FE_KA_KEV), ("Co K$\\alpha$", CO_KA_KEV))
#: zoom window around them
ZOOM_KEV = (5.9, 7.4)
_UNSEEN_GREY = "#9a9a9a"


def _as_positions(memberships, scan_shape) -> np.ndarray:
    u = np.asarray(memberships, dtype=np.float32)
    ny, nx = (int(v) for v in scan_shape)
    if u.ndim == 3:
        if u.shape[:2] != (ny, nx):
            raise ValueError(f"memberships of shape {u.shape} do not match scan_shape {(ny, nx)}")
        u = u.reshape(ny * nx, -1)
    if u.ndim != 2 or u.shape[0] != ny * nx:
        raise ValueError(f"memberships must be (ny * nx, k) or (ny, nx, k), got {u.shape} for {(ny, nx)}")
    return u


def membership_rgba(memberships, scan_shape, palette: np.ndarray | None = None) -> np.ndarray:
    """Fig. 4's colouring as ``(ny, nx, 4)`` uint8: arg-max cluster's colour times its membership.

    ``memberships`` is ``(ny * nx, k)`` or ``(ny, nx, k)``; rows of NaN (not yet clustered) come out
    transparent. ``palette`` defaults to :func:`~streamclust.app.liveview_render.cluster_palette`.
    """
    u = _as_positions(memberships, scan_shape)
    pal = cluster_palette(u.shape[1]) if palette is None else np.asarray(palette, np.uint8)
    if pal.shape[0] < u.shape[1]:
        raise ValueError(f"palette has {pal.shape[0]} colours for {u.shape[1]} clusters")
    return render_rgba(None, u, tuple(int(v) for v in scan_shape), pal)


def _figure(figsize) -> Figure:
    # Figure() without pyplot: no global state, no GUI backend, thread-safe enough for Agg
    return Figure(figsize=figsize, layout="constrained")


def membership_map_figure(memberships, scan_shape, *, flags: Sequence[dict] | None = None,
                          palette: np.ndarray | None = None, title: str | None = None,
                          cluster_names: Sequence[str] | None = None) -> Figure:
    """The membership map (paper's Fig. 4) as a matplotlib Figure.

    Parameters
    ----------
    memberships : (ny * nx, k) or (ny, nx, k) float
        NaN rows = not yet clustered (drawn grey).
    scan_shape : (ny, nx)
    flags : list of dict, optional
        Each with ``bbox`` ``(y0, x0, y1, x1)`` half-open in positions, and optionally
        ``flag_id``, ``cluster``, ``score`` and ``last_kind`` (retracted flags are drawn dashed).
    palette : (k, 3) uint8, optional
    title : str, optional
    cluster_names : list of str, optional
        Legend labels (default ``cluster i``).
    """
    ny, nx = (int(v) for v in scan_shape)
    u = _as_positions(memberships, (ny, nx))
    k = u.shape[1]
    pal = cluster_palette(k) if palette is None else np.asarray(palette, np.uint8)
    rgba = membership_rgba(u, (ny, nx), pal)
    aspect = nx / max(ny, 1)
    fig = _figure((min(4.5 * aspect, 12) + 2.6, 4.5))
    ax = fig.add_subplot()
    ax.set_facecolor(_UNSEEN_GREY)
    ax.imshow(rgba, interpolation="nearest", origin="upper", extent=(-0.5, nx - 0.5, ny - 0.5, -0.5))
    known = np.isfinite(u).all(axis=1)
    lab = np.full(u.shape[0], -1)
    lab[known] = np.argmax(u[known], axis=1)
    handles = []
    for c in range(k):
        n = int(np.count_nonzero(lab == c))
        name = cluster_names[c] if cluster_names is not None and c < len(cluster_names) else f"cluster {c}"
        handles.append(Patch(facecolor=pal[c] / 255.0, edgecolor="k", label=f"{name} ({n})"))
    if (~known).any():
        handles.append(Patch(facecolor=_UNSEEN_GREY, edgecolor="k", label=f"not yet ({int((~known).sum())})"))
    for fl in flags or ():
        bbox = fl.get("bbox")
        if bbox is None or len(bbox) != 4:
            continue
        y0, x0, y1, x1 = (float(v) for v in bbox)
        retracted = fl.get("last_kind") == "retracted" or fl.get("active") is False
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.8,
                               ec="white", ls="--" if retracted else "-"))
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=0.8,
                               ec="red", ls="--" if retracted else "-"))
        text = f"flag {fl.get('flag_id', '?')}"
        if fl.get("cluster") is not None:
            text += f": cl. {fl['cluster']}"
        if fl.get("score") is not None:
            text += f", {float(fl['score']):.2f}"
        # the label goes outside the box (above it, or below near the top edge) to keep it visible
        above = y0 >= 2
        ax.text(x0 - 0.5, y0 - 0.6 if above else y1 - 0.4, text, color="red", fontsize=7,
                va="bottom" if above else "top",
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "lw": 0})
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(ny - 0.5, -0.5)
    ax.set_xlabel("scan x (positions)")
    ax.set_ylabel("scan y (positions)")
    ax.set_title(title or "Membership map: hue = cluster, brightness = membership")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def membership_grid_figure(memberships, scan_shape, *, palette: np.ndarray | None = None) -> Figure:
    """One membership map per cluster (0 = black, 1 = white), titled in the cluster's colour."""
    ny, nx = (int(v) for v in scan_shape)
    u = _as_positions(memberships, (ny, nx))
    k = u.shape[1]
    pal = cluster_palette(k) if palette is None else np.asarray(palette, np.uint8)
    cols = min(k, 4)
    rows = -(-k // cols)
    fig = _figure((3.0 * cols, 3.0 * rows * ny / max(nx, 1) + 0.4))
    for c in range(k):
        ax = fig.add_subplot(rows, cols, c + 1)
        ax.set_facecolor(_UNSEEN_GREY)
        img = np.ma.masked_invalid(u[:, c].reshape(ny, nx))
        im = ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"cluster {c}", color=pal[c] / 255.0 * 0.8, fontsize=9, fontweight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="membership")
    return fig


def _line_marks(ax, with_labels: bool) -> None:
    for name, kev in LINES_KEV:
        ax.axvline(kev, color="k", ls=":", lw=0.8)
        if with_labels:
            ax.text(kev, 0.97, name, rotation=90, va="top", ha="right", fontsize=7,
                    transform=ax.get_xaxis_transform())


def centre_figures(centre_set: CentreSet, energy_axis_kev, *, clusters: Sequence[int] | None = None,
                   palette: np.ndarray | None = None, emax_kev: float = 10.0,
                   display_rebin: int = 4) -> dict[int, Figure]:
    """Figs. 5 and 6: per cluster, a Figure with one row per threshold.

    Each row: the thresholded centre CBED pattern (log scale), the centre EDS spectrum over
    ``0 .. emax_kev`` and a zoom on 5.9-7.4 keV, Fe K-alpha (6.404 keV) and Co K-alpha (6.930 keV)
    marked; the row title gives the threshold, the positions above it and the Fe/Co K-alpha net
    intensity ratio (:func:`streamclust.engine.centres.fe_co_ratio`).

    Parameters
    ----------
    centre_set : CentreSet
    energy_axis_kev : (channels,) array
    clusters : list of int, optional
        Default: every cluster with at least one position above the lowest threshold.
    display_rebin : int
        Channels summed in the whole-range spectrum plot (display only; the ratio uses every
        channel).

    Returns
    -------
    dict {cluster: Figure}
    """
    e = np.asarray(energy_axis_kev, dtype=np.float64)
    eds = np.asarray(centre_set.eds, dtype=np.float64)
    cbed = np.asarray(centre_set.cbed, dtype=np.float64)
    count = np.asarray(centre_set.count)
    n_t, k = eds.shape[:2]
    if eds.shape[2] != e.size:
        raise ValueError(f"centre spectra have {eds.shape[2]} channels, the energy axis {e.size}")
    pal = cluster_palette(k) if palette is None else np.asarray(palette, np.uint8)
    if clusters is None:
        clusters = [c for c in range(k) if count[:, c].max(initial=0) > 0]
    figs: dict[int, Figure] = {}
    for c in clusters:
        fig = _figure((13.0, 3.3 * n_t + 0.5))
        colour = pal[c] / 255.0 * 0.85
        for t in range(n_t):
            thr = centre_set.thresholds[t]
            n = int(count[t, c])
            spec = eds[t, c]
            ok = n > 0 and np.isfinite(spec).all()
            ratio = float(fe_co_ratio(spec, e)) if ok else float("nan")
            ax_p = fig.add_subplot(n_t, 3, 3 * t + 1)
            ax_s = fig.add_subplot(n_t, 3, 3 * t + 2)
            ax_z = fig.add_subplot(n_t, 3, 3 * t + 3)
            head = f"u > {thr:g}: {n} positions"
            if not ok:
                for ax in (ax_p, ax_s, ax_z):
                    ax.text(0.5, 0.5, "no position above the threshold", ha="center", va="center",
                            transform=ax.transAxes, fontsize=8)
                    ax.set_xticks([])
                    ax.set_yticks([])
                ax_p.set_title(head, fontsize=9)
                continue
            pattern = cbed[t, c]
            positive = pattern[pattern > 0]
            floor = float(positive.min()) if positive.size else 1.0
            im = ax_p.imshow(np.log10(np.maximum(pattern, floor)), cmap="inferno", interpolation="nearest")
            fig.colorbar(im, ax=ax_p, shrink=0.8, label="log10 counts")
            ax_p.set_xticks([])
            ax_p.set_yticks([])
            ax_p.set_title(f"CBED centre, {head}", fontsize=9)
            # a centre of few, short-dwell positions is sparse: sum channels for display only
            ew, sw = _rebin(e, spec, display_rebin)
            sel = ew <= emax_kev
            ax_s.plot(ew[sel], sw[sel], color=colour, lw=0.8, drawstyle="steps-mid")
            ax_s.set_xlim(float(e[0]), emax_kev)
            ax_s.set_ylim(bottom=0)
            ax_s.set_xlabel("energy (keV)")
            ax_s.set_ylabel(f"mean counts / position / {display_rebin} ch.")
            _line_marks(ax_s, with_labels=False)
            ax_s.set_title(f"EDS centre, {head}", fontsize=9)
            z = (e >= ZOOM_KEV[0]) & (e <= ZOOM_KEV[1])
            ax_z.plot(e[z], spec[z], color=colour, lw=1.0, drawstyle="steps-mid")
            ax_z.set_xlim(*ZOOM_KEV)
            ax_z.set_xlabel("energy (keV)")
            _line_marks(ax_z, with_labels=True)
            ax_z.set_title(f"Fe/Co K$\\alpha$ ratio = {ratio:.3f}", fontsize=9)
        fig.suptitle(f"cluster {c}: thresholded centre (membership-weighted mean) signals",
                     color=colour, fontweight="bold")
        figs[c] = fig
    return figs


def _rebin(e: np.ndarray, s: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    f = max(1, int(factor))
    m = e.size // f * f
    return e[:m].reshape(-1, f).mean(axis=1), s[:m].reshape(-1, f).sum(axis=1)


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    return path


def write_pictures(results_path, out_dir, *, dpi: int = 110) -> list[Path]:
    """Draw every picture of a results file into ``out_dir``; returns the files written.

    ``membership_map.png`` (with the flags' boxes), ``membership_per_cluster.png`` and, when the
    file holds centres, ``centres_cluster_<k>.png`` for each cluster with positions above a
    threshold (patterns in rosettasciio's orientation, as HyperSpy shows the file's).
    ``results_path``: a file or an output folder (:func:`streamclust.results.writer.find_results`).
    """
    from streamclust.results.writer import read_results

    res = read_results(results_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    u = np.asarray(res["clustering"]["memberships"])
    ny, nx = u.shape[:2]
    status = res["attrs"].get("status", "?")
    seen, total = res["attrs"].get("positions_seen", 0), res["attrs"].get("n_positions", ny * nx)
    flags = [dict(f, active=bool(a)) for f, a in zip(res["flags"]["summary_parsed"],
                                                     np.asarray(res["flags"]["active"]).tolist())]
    written = []
    title = (f"{res['attrs'].get('scan_id', '')}: memberships ({status}, {seen}/{total} positions)")
    attrs = res["clustering"].get("attrs", {})
    host, n_sub = int(attrs.get("host_cluster", -1)), int(attrs.get("host_clusters", 0))
    group = [int(h) for h in np.atleast_1d(attrs.get("host_group", [host] if host >= 0 else []))]
    names = None
    if group and n_sub:
        # the host's own columns are empty: their positions are in the sub-clusters
        k1 = u.shape[2] - n_sub
        names = [f"cluster {c}" for c in range(u.shape[2])]
        for h in group:
            names[h] = f"cluster {h}: host, refined into {k1}-{u.shape[2] - 1}"
    written.append(_save(membership_map_figure(u, (ny, nx), flags=flags, title=title, cluster_names=names),
                         out / "membership_map.png", dpi))
    written.append(_save(membership_grid_figure(u, (ny, nx)), out / "membership_per_cluster.png", dpi))
    cg = res.get("centres", {})
    if cg.get("attrs", {}).get("available") and "eds" in cg:
        # the patterns as HyperSpy shows the file's centre_patterns (rosettasciio's orientation,
        # streamclust.results.writer.PATTERN_ORIENTATION): the picture and pyxem agree
        cs = CentreSet(thresholds=tuple(float(t) for t in np.asarray(cg["thresholds_used"]).tolist()),
                       cbed=np.flip(np.asarray(cg["cbed"]), axis=-2), eds=np.asarray(cg["eds"]),
                       weight=np.asarray(cg["weight"]), count=np.asarray(cg["count"]))
        pal = cluster_palette(max(u.shape[2], cs.eds.shape[1]))
        for c, fig in centre_figures(cs, res["scan"]["energy_axis_kev"], palette=pal).items():
            written.append(_save(fig, out / f"centres_cluster_{c}.png", dpi))
    logger.info("wrote %d pictures into %s", len(written), out)
    return written
