"""The flagger's parameters (``[flags]`` of the configuration): :class:`FlagParams`.

Meanings in :class:`~streamclust.flags.flagger.SecondPhaseFlagger`'s docstring and docs/events.md.

>>> FlagParams().replace(min_positions=5).min_positions
5
"""

from __future__ import annotations

from dataclasses import dataclass

from streamclust.params import Params, boolean, choice, integer, number, opt, symbols

__all__ = ["FlagParams", "element_symbols"]


def _line_energies():
    # imported when an element list is checked, not with this module: streamclust.flags.stats pulls
    # in scipy, which reading the configuration (`streamclust --help`, `config --show`) does not need
    from streamclust.flags.stats import LINES_KEV

    return LINES_KEV


#: check of a list of element symbols whose K-alpha lines are known (streamclust.flags.stats.LINES_KEV)
element_symbols = symbols(_line_energies)


@dataclass(frozen=True)
class FlagParams(Params):
    """``[flags]``: :class:`~streamclust.flags.flagger.SecondPhaseFlagger` parameters (docs/events.md)."""

    _section = "flags"

    min_fraction: float = opt(0.002, number(0.0, 1.0), "smallest cluster fraction of the scanned positions")
    max_fraction: float = opt(0.25, number(0.0, 1.0, lo_open=True), "largest cluster fraction")
    min_positions: int = opt(8, integer(1), "smallest cluster (positions)")
    membership_threshold: float = opt(0.5, number(0.0, 1.0, hi_open=True), "membership counted as inside")
    min_component_size: int = opt(4, integer(1), "smallest connected component counted")
    coherence: float = opt(0.5, number(0.0, 1.0), "fraction of the cluster inside counted components")
    max_extent: float = opt(0.5, number(0.0, 1.0, lo_open=True), "largest component span (scan fraction)")
    max_open: float = opt(0.2, number(0.0, 1.0), "largest unscanned fraction of a component's ring")
    min_block_distance: float = opt(0.6, number(0.0), "cross-fitted separation needed in the CBED block")
    min_eds_distance: float = opt(1.0, number(0.0), "cross-fitted separation needed in the EDS block", none=True)
    eds_shape_only: bool = opt(False, boolean, "EDS separation ignores overall intensity (thickness)")
    raise_after: int = opt(2, integer(1), "consecutive passing updates before a flag is raised")
    retract_after: int = opt(2, integer(1), "consecutive failing updates before it is retracted")
    hysteresis: float = opt(0.8, number(0.0, 1.0, lo_open=True), "relaxation of an active flag's criteria")
    match_overlap: float = opt(0.3, number(0.0, 1.0), "position overlap that keeps a flag id")
    max_listed_positions: int = opt(4096, integer(0), "positions listed in one event")
    neighbour_size_ratio: float = opt(2.0, number(0.0), "the neighbouring cluster must be this many times larger")
    embedded_only: bool = opt(True, boolean, "count only components that do not touch the scan frame")
    max_band_rows: int = opt(3, integer(0), "components within this many rows spanning max_extent of the width "
                                            "are one band (an interface), not inclusions; 0: off")
    min_contiguity: float = opt(0.5, number(0.0, 1.0), "fraction of the flagged positions' scanned "
                                                       "8-neighbours in the same cluster")
    # above 1: no other cluster is checked (a share cannot reach it; tests/test_flags.py uses 1.01)
    min_ring_share: float = opt(0.25, number(0.0), "a cluster holding this share of the ring "
                                                   "(and at least the candidate's size) must be distinct too")
    min_matrix_share: float = opt(0.95, number(0.0, 1.0), "share of the ring in the matrix (the host's "
                                                          "sub-clusters) an inclusion needs")
    distances_for_all: bool = opt(False, boolean, "measure every cluster's block distances, not only those "
                                                  "passing the other tests (diagnostics; slower)")
    method: str = opt("rules", choice("rules", "test"), "rules: block distances and raise_after; test: "
                                                        "composition and pattern hypothesis tests at alpha")
    alpha: float = opt(0.01, number(0.0, 1.0, lo_open=True, hi_open=True),
                       "method = test: false-alarm probability per scan (spent over the looks)")
    min_effect: float = opt(0.05, number(0.0, 1.0), "method = test: least change of an element line's share "
                                                    "of the line counts")
    matrix_radius: int = opt(3, integer(1), "method = test: the matrix a candidate is tested against lies "
                                            "within this many positions")
    elements: tuple = opt(("Fe", "Co"), element_symbols, "method = test: elements whose K-alpha line proportions "
                                                  "are tested (dilution by another layer leaves them unchanged)")
