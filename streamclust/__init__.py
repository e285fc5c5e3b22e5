"""streamclust: live correlated 4D-STEM + EDS clustering for scanning transmission electron microscopes.

The package is laid out in data-flow order (docs/architecture.md):

* ``streamclust.adapters``: ingest (Merlin TCP, MIB files, ZeroMQ EDS spectra and frames, the scan joiner)
* ``streamclust.features``: frame and spectrum reduction, streaming robust scaling, block balance
* ``streamclust.decomposition``: incremental PCA, sample PCA, the per-position store
* ``streamclust.cluster``: fuzzy C-means, validity, drift, the host phase's second level, merges
* ``streamclust.engine``: the streaming engine and the thresholded cluster centres
* ``streamclust.flags``: second-phase flags, their tests, events and follow-ups
* ``streamclust.results``: the scan's result value, the results file and the pictures
* ``streamclust.distributed``: mergeable states and the Dask replay
* ``streamclust.app``: configuration, CLI, live analysis, demo, replays, live view
* ``streamclust.reference``: the paper's offline pipeline, the yardstick
* ``streamclust.simulators``: hardware stand-ins

The names a user needs most are importable from here; they load on first use, so ``import streamclust``
stays cheap and no subpackage is imported that the caller does not use.

>>> from streamclust import FuzzyCMeans, StreamingEngine
>>> FuzzyCMeans.__module__
'streamclust.cluster.fcm'
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamclust")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

#: public name -> the module that defines it
_PUBLIC = {
    "acquire_scan": "streamclust.app.acquisition",
    "LiveAnalysis": "streamclust.app.live",
    "load_config": "streamclust.app.config",
    "StreamingEngine": "streamclust.engine.streaming",
    "ThresholdedCentres": "streamclust.engine.centres",
    "FrameReducer": "streamclust.features.reducers",
    "SpectrumReducer": "streamclust.features.reducers",
    "StreamingRobustScaler": "streamclust.features.robust_scaling",
    "BlockBalancer": "streamclust.features.block_balance",
    "StreamingPCA": "streamclust.decomposition.incremental_pca",
    "FuzzyCMeans": "streamclust.cluster.fcm",
    "MiniBatchFuzzyCMeans": "streamclust.cluster.fcm",
    "SecondPhaseFlagger": "streamclust.flags.flagger",
    "ScanResult": "streamclust.results.scan_result",
    "ResultsWriter": "streamclust.results.writer",
    "read_results": "streamclust.results.read",
    "run_reference": "streamclust.reference",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    # PEP 562 lazy attributes: importing the engine pulls in Numba, which a CLI --help should not wait for
    try:
        module = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'streamclust' has no attribute {name!r}") from None
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
