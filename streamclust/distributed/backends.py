"""Where the replay's tasks run: a Dask client, or this process (the same tasks, for a one-machine
run and as the tests' yardstick), and how their partial states are merged: folded per group of
chunks, then in a tree ``fan_in`` at a time, on the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from streamclust.distributed.mergeable import merge_all, merge_into

__all__ = ["LocalBackend", "DaskBackend", "fold_chunks", "grouped", "tree_reduce"]


class LocalBackend:
    """Runs every task at once in this process; handles are the values."""

    n_workers = 1

    def map(self, fn, *iterables, **kwargs):
        return [fn(*args, **kwargs) for args in zip(*iterables)]

    def submit(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def share(self, obj):
        return obj

    def gather(self, handles):
        return list(handles)


class DaskBackend:
    def __init__(self, client) -> None:
        self.client = client
        self.n_workers = len(client.scheduler_info().get("workers", {})) or 1

    def map(self, fn, *iterables, **kwargs):
        return self.client.map(fn, *iterables, pure=False, **kwargs)

    def submit(self, fn, *args, **kwargs):
        return self.client.submit(fn, *args, pure=False, **kwargs)

    def share(self, obj):
        # sent to every worker once instead of once per task
        # (wrapped in a list: scatter would split a dict into one future per value)
        return self.client.scatter([obj], broadcast=True, hash=False)[0]

    def gather(self, handles):
        return self.client.gather(list(handles))


def fold_chunks(fn: Callable, sources: Sequence, *args) -> Any:
    """Apply ``fn(source, *args)`` to each chunk in turn, merging each partial state into one
    accumulator as soon as it exists: a task holds one large state (histograms, scatter), not one
    per chunk."""
    acc = None
    for src in sources:
        acc = merge_into(acc, fn(src, *args))
    return acc


def grouped(backend, fn: Callable, sources: Sequence, *args) -> list:
    """One task per group of consecutive chunks (twice as many groups as workers, for balance):
    the number of large partial states alive at once is bounded by the groups, not the chunks."""
    n_groups = min(len(sources), max(1, 2 * int(backend.n_workers)))
    groups = [list(g) for g in np.array_split(np.arange(len(sources)), n_groups)]
    return [backend.submit(fold_chunks, fn, [sources[i] for i in g], *args) for g in groups]


def tree_reduce(backend, handles: Sequence, fan_in: int):
    """Merge partial states ``fan_in`` at a time until one is left (on the workers)."""
    handles = list(handles)
    if not handles:
        raise ValueError("nothing to merge")
    while len(handles) > 1:
        handles = [backend.submit(merge_all, handles[i:i + fan_in]) for i in range(0, len(handles), fan_in)]
    return handles[0]
