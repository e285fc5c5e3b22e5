"""streamclust: live correlated 4D-STEM + EDS clustering for scanning transmission electron microscopes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamclust")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
