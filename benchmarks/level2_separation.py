"""Separation of level-2 clusters, own labels against neighbour labels (issue 17, the merge criterion).

The reference pipeline's level 2 on the phantom (64 x 64 unless given): for every pair of level-2
clusters, the cross-fitted separation ``d`` (streamclust.flags.flagger.block_distance: direction from one
checkerboard fold, standardised gap on the other) of the level-2 scores, first with each position
labelled by its own cluster, then labelled by the majority (>= 3 of 4) of its 4-neighbours, which
are all of the other fold. Own labels were selected on the position's own data, so noise clusters
look as distinct as a phase; neighbour labels do not carry that selection.

    .venv/bin/python benchmarks/level2_separation.py SEED [SIZE]
"""

from __future__ import annotations

import sys

import numpy as np

from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.cluster.merge import merge_columns, merge_same_composition, neighbour_labels
from streamclust.flags.stats import composition_test, line_windows, window_counts
from streamclust.cluster.separation import block_distance
from streamclust.cluster.host_refine import HostRefinement, host_group
from streamclust.reference import best_f1, eds_window, phantom_features, run_reference
from streamclust.simulators.phantom import LamellaPhantom
from streamclust.cluster.spatial_pool import membership_mixing, spatial_memberships

seed = int(sys.argv[1]); size = int(sys.argv[2]) if len(sys.argv) > 2 else 64
k2 = int(sys.argv[3]) if len(sys.argv) > 3 else 6
ph = LamellaPhantom((size, size), seed=seed)
cbed, spec = phantom_features(ph)
eds = eds_window(spec, ph.energy_axis_kev, (0.2, 10.0), rebin=2)
n = ph.n_positions
truth = ph.truth.second_phase.ravel()
lab_t = ph.truth.labels.ravel()
res = run_reference(cbed, eds, n_clusters=6, random_state=seed, clusterer=FuzzyCMeans(6, n_init=10, random_state=seed))
u1 = res.clusterer.memberships_
mixing = membership_mixing(u1, (size, size), None)
host, group = host_group(u1, overlap=0.1, mixing=mixing, min_mixing=0.5)
inside = u1[:, list(group)].sum(axis=1) > 0.9
x = np.hstack([cbed, eds]).astype(np.float32)
ref = HostRefinement(cbed.shape[1], k2, random_state=seed).fit_space(x[inside])
z2 = ref.project(x)
fcm = FuzzyCMeans(k2, n_init=10, random_state=seed).fit(z2[inside])
l2 = np.full(n, -1); l2[inside] = fcm.labels_
yy, xx = np.divmod(np.arange(n), size); fold = (yy + xx) % 2 == 0
print("seed", seed, "host group", group, "inside", inside.sum(), "k2 comps", ref.n_components_)
for c in range(k2):
    m = l2 == c
    print(f"sub {c}: n={m.sum()} second-phase frac={truth[m].mean() if m.any() else 0:.2f} matrix frac={(lab_t[m]==1).mean() if m.any() else 0:.2f}")
print("pairwise cross-fitted d on level-2 scores (per position):")
D = np.zeros((k2, k2))
for i in range(k2):
    for j in range(i + 1, k2):
        D[i, j] = D[j, i] = block_distance(z2.astype(np.float32), l2 == i, l2 == j, fold)
print(np.round(D, 2))
# labels from the 4-neighbours (the other checkerboard fold), not from the position itself
nb = neighbour_labels(l2.reshape(size, size)).ravel()
nb[~inside] = -1
print("neighbour-labelled sizes", [int((nb == c).sum()) for c in range(k2)])
D = np.zeros((k2, k2))
for i in range(k2):
    for j in range(i + 1, k2):
        D[i, j] = D[j, i] = block_distance(z2.astype(np.float32), nb == i, nb == j, fold)
print(np.round(D, 2))
# the element-line shares under neighbour labels: the merge rule's statistic (streamclust.cluster.merge)
axis = eds_window(ph.energy_axis_kev[None, :].astype(np.float64), ph.energy_axis_kev, (0.2, 10.0), rebin=2)[0] / 2
cnt = window_counts(eds, line_windows(axis, ("Fe", "Co")))
E = np.zeros((k2, k2))
for i in range(k2):
    for j in range(i + 1, k2):
        if (nb == i).sum() >= 10 and (nb == j).sum() >= 10:
            E[i, j] = E[j, i] = composition_test(cnt[nb == i], cnt[nb == j]).effect
print("Fe / Co line-share difference under neighbour labels:")
print(np.round(E, 3))
# the merge rule and the spatial step, and what they do to the map
pin = np.flatnonzero(inside)
rep = merge_same_composition(cnt[inside], pin, l2[inside], (size, size), k2)
matrix = lab_t == list(ph.truth.label_names).index("cfs_matrix")
for name, r, spatial in (("as fitted", np.arange(k2), False), ("spatial step", np.arange(k2), True),
                         ("merged + spatial step", rep, True)):
    u = merge_columns(fcm.memberships_, r)
    if spatial:
        u = spatial_memberships(u, pin, np.ones(pin.size, bool), (size, size))
    lab = np.full(n, -1)
    lab[inside] = np.argmax(u, axis=1)
    known = matrix & (lab >= 0)
    print(f"{name}: largest cluster holds {np.bincount(lab[known]).max() / matrix.sum():.3f} of the matrix, "
          f"second-phase F1 {best_f1(lab, truth).single:.3f}")
print("merged into", rep.tolist())
