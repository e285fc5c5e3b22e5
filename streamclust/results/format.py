"""The results file's names, versions and statuses, and how values are encoded into it.

Shared by the writer (:mod:`streamclust.results.writer`) and the readers
(:mod:`streamclust.results.read`): the file names an output folder holds, the layout and HyperSpy
format versions, the statuses, and the encoding of values that HDF5 cannot hold as they are
(JSON with NaN as null, nested counters flattened to ``.``-joined attribute names).
:func:`json_default` is the one ``json.dumps`` fallback of the package.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["RESULTS_FORMAT_VERSION", "RESULTS_NAME", "LEGACY_RESULTS_NAME", "HSPY_FORMAT_VERSION",
           "PATTERN_ORIENTATION", "STATUSES", "json_default", "to_json", "flatten_counters", "attr_value"]

#: version of the layout described in :mod:`streamclust.results.writer` (bumped on incompatible changes)
RESULTS_FORMAT_VERSION = 2
#: the results file in an output folder; ``.hspy`` because HyperSpy chooses its reader by the
#: extension and ``.h5`` is claimed by four readers (Tofwerk, Delmic, Arina, USID)
RESULTS_NAME = "results.hspy"
#: the name used before format version 2; :func:`find_results` still finds files of that name
LEGACY_RESULTS_NAME = "results.h5"
#: where the centre patterns' row 0 is: rosettasciio's MIB reader (and so pyxem) flips the Merlin
#: file's rows (np.flip(data, axis=-2)); our reader keeps the file order (adapters/mib.py)
PATTERN_ORIENTATION = ("rosettasciio/pyxem: row 0 is the last row of the Merlin frame as stored in the "
                       ".mib file (np.flip(frame, axis=-2) of streamclust's read_mib)")
#: HyperSpy's hspy format version whose attribute names the ``/Experiments`` group follows
HSPY_FORMAT_VERSION = "3.1"
#: what the root attribute ``status`` may say
STATUSES = ("partial", "complete", "aborted")


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback for NumPy scalars and arrays and sets (one for every JSON we write)."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def to_json(obj: Any) -> str:
    # NaN is not JSON; write null so any JSON reader can parse the documents
    return json.dumps(_nan_to_none(obj), default=json_default, sort_keys=True)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def flatten_counters(counters: Mapping, prefix: str = "", *, numeric_lists: bool = False) -> dict[str, Any]:
    """Nested counter dicts -> one flat dict with ``.``-joined names.

    Scalars (numbers, bools, strings, None) stay as they are; anything else (lists of errors,
    arrays) becomes a JSON string, so every value fits in an HDF5 attribute. With
    ``numeric_lists``, flat lists of numbers are kept as lists (stored as attribute arrays).
    """
    out: dict[str, Any] = {}
    for key, value in counters.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten_counters(value, name + ".", numeric_lists=numeric_lists))
            else:
                out[name] = "{}"
        elif value is None or isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)):
            out[name] = value.item() if isinstance(value, np.generic) else value
        elif (numeric_lists and isinstance(value, (list, tuple, np.ndarray)) and len(value)
              and np.asarray(value).dtype.kind in "biuf" and np.asarray(value).ndim == 1):
            out[name] = np.asarray(value).tolist()
        else:
            out[name] = to_json(value)
    return out


def attr_value(value: Any) -> Any:
    """A value h5py can store as an attribute (None -> "None", nested -> JSON)."""
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float, str, np.generic)):
        return value
    arr = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if arr is not None and arr.dtype.kind in "biuf" and arr.ndim <= 2:
        return arr
    return to_json(value)

