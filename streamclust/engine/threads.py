"""How many threads the Numba kernels launched from the calling thread may use.

Why this exists: on the 2-core acquisition PC the receiver's threads (Merlin reader, EDS receiver,
joiner) and, in the demo, the simulated microscope's render threads always hold a core. A Numba
``parallel=True`` kernel forks an OpenMP team and waits at its barrier for every worker; a worker
that the OS has descheduled makes the whole region wait for a scheduler time slice. Measured on
this machine (2 cores, load about 2, Numba's ``omp`` layer): one fuzzy C-means pass over 4,096 x 14
scores with 6 centres took 45.8 ms with 2 threads and 0.21 ms with one. A refresh makes hundreds
of such passes: in a 256 x 256 scan the FCM passes took 134 s of the live path's 265 s.

Numba's thread count is per calling thread (``numba.set_num_threads``), so limiting the analysis
thread leaves other threads, and other processes, alone.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numba

logger = logging.getLogger(__name__)

__all__ = ["kernel_threads"]


@contextmanager
def kernel_threads(n: int | None):
    """Within the block, Numba kernels launched from this thread use at most ``n`` threads
    (None or 0: Numba's own setting, ``NUMBA_NUM_THREADS``, usually one per core).

    >>> import numba
    >>> with kernel_threads(1):
    ...     numba.get_num_threads()
    1
    """
    if not n:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)
