"""Frozen, validated parameter objects: one per component, each default written once.

A component (the engine, the thresholded centres, the flagger) declares its parameters as a frozen
dataclass deriving :class:`Params`, next to its code, each field made by :func:`opt` with its
default, a check and a one-line doc. The object checks (and normalises: ints to floats where a
number is asked for, lists to tuples) every field when it is made, so a component receives values
it can trust; the TOML configuration (:mod:`streamclust.app.config`) is assembled from these same
classes, so a table of the file *is* the component's parameter object and its defaults are the
component's. This module depends on nothing but the standard library (the configuration is read
before anything heavy is imported).

A check is a callable that returns the normalised value or raises ``ValueError("must be ...")``;
the message completes ``"[section] key = value: "``.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo(Params):
...     _section = "demo"
...     n: int = opt(3, integer(1), "how many")
...     w: float = opt(0.5, number(0.0, 1.0), "a weight", none=True)
>>> Demo(n=2, w=1).w, Demo(w=None).w
(1.0, None)
>>> Demo(n=0)
Traceback (most recent call last):
...
streamclust.params.ParameterError: [demo] n = 0: must be an integer >= 1
>>> Demo().replace(nn=1)
Traceback (most recent call last):
...
TypeError: Demo has no parameter 'nn' (did you mean 'n'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["AUTO", "ParameterError", "Params", "opt", "did_you_mean", "integer", "number", "choice", "boolean",
           "text", "optional_text", "endpoint", "pair", "window", "thresholds", "positive_or_auto", "mapping",
           "symbols"]

#: a value resolved from the scan when it starts (where a field allows it)
AUTO = "auto"


class ParameterError(ValueError):
    """A parameter value its component does not accept; the message names the section, key and value."""


def opt(default: Any, check: Callable, doc: str, *, toml: bool = True, none: bool = False) -> Any:
    """A parameter field: ``default``, ``check`` (returns the normalised value or raises
    ``ValueError``), a one-line ``doc`` (the TOML comment). ``toml=False``: a parameter of the
    Python API only, not a key of the configuration file. ``none=True``: None is accepted as well
    (the Python API's "off" or "not set"; TOML has no null)."""
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc, "toml": toml, "none": none})


def did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Params:
    """Base of the frozen parameter dataclasses; subclasses set ``_section`` (the TOML table name)."""

    _section = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("none"):
                continue
            try:
                checked = f.metadata["check"](value)
            except ValueError as exc:
                raise ParameterError(f"[{self._section}] {f.name} = {value!r}: {exc}") from None
            if checked is not value:
                object.__setattr__(self, f.name, checked)  # frozen: normalised once, here

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied and checked; an unknown name is a TypeError, as an unknown
        keyword argument is."""
        known = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in known:
                raise TypeError(f"{type(self).__name__} has no parameter {key!r}{did_you_mean(key, known)}")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def toml_fields(cls) -> tuple[dataclasses.Field, ...]:
        """The fields that are keys of the configuration file, in declaration order."""
        return tuple(f for f in dataclasses.fields(cls) if f.metadata.get("toml", True))


# -------------------------------------------------------------------------------------------------
# checks: each returns the normalised value or raises ValueError("must be ...")
# -------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None, auto: bool = False) -> Callable:
    def check(v):
        if auto and v == AUTO:
            return v
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = (f" >= {lo}" if hi is None else f" in {lo}..{hi}") if lo is not None else ""
            raise ValueError(f"must be an integer{rng}" + (' or "auto"' if auto else ""))
        return v
    return check


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable:
    def check(v):
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            parts = []
            if lo is not None:
                parts.append(f"{'>' if lo_open else '>='} {lo}")
            if hi is not None:
                parts.append(f"{'<' if hi_open else '<='} {hi}")
            raise ValueError("must be a number" + (" " + " and ".join(parts) if parts else ""))
        return float(v)
    return check


def choice(*choices: str) -> Callable:
    def check(v):
        if v not in choices:
            raise ValueError("must be one of " + ", ".join(f'"{c}"' for c in choices))
        return v
    return check


def boolean(v):
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def text(v):
    if not isinstance(v, str) or not v:
        raise ValueError("must be a non-empty string")
    return v


def optional_text(v):
    # an empty string means "not set" (TOML has no null)
    if not isinstance(v, str):
        raise ValueError("must be a string (empty: not set)")
    return v


def endpoint(v):
    if not isinstance(v, str) or not v.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError('must be a ZeroMQ endpoint such as "tcp://127.0.0.1:6343"')
    return v


def pair(item: Callable) -> Callable:
    def check(v):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError("must be a list of two values")
        try:
            return tuple(item(x) for x in v)
        except ValueError as exc:
            raise ValueError(f"must be a list of two values, each {exc}") from None
    return check


def window(v):
    lo, hi = pair(number(0.0))(v)
    if not lo < hi:
        raise ValueError("must be [low, high] keV with low < high")
    return (lo, hi)


def thresholds(v):
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError("must be a non-empty list of membership thresholds in [0, 1)")
    try:
        out = tuple(number(0.0, 1.0, hi_open=True)(x) for x in v)
    except ValueError:
        raise ValueError("must be a non-empty list of membership thresholds in [0, 1)") from None
    return out


def positive_or_auto(v):
    if v == AUTO:
        return v
    try:
        return number(0.0, lo_open=True)(v)
    except ValueError:
        raise ValueError('must be a number > 0 or "auto"') from None


def mapping(v):
    if not isinstance(v, Mapping):
        raise ValueError("must be a mapping of keyword arguments")
    return v


def symbols(known: Callable[[], Mapping]) -> Callable:
    """A list of at least two element symbols, each a key of ``known()`` (called at check time)."""
    def check(v):
        if isinstance(v, str) or not isinstance(v, (list, tuple)) or len(v) < 2:
            raise ValueError("must be a list of at least two element symbols, e.g. [\"Fe\", \"Co\"]")
        table = known()
        unknown = [e for e in v if e not in table]
        if unknown:
            raise ValueError(f"unknown element(s) {unknown}; known: {sorted(table)}")
        return tuple(v)
    return check
