"""Exceptions raised for bad input. Each message names the file or argument and what is wrong with it.

The command line turns any `CrossSiteError` into a one-line message and exit status 1, never a traceback.
"""

from __future__ import annotations


class CrossSiteError(Exception):
    """Base class of every error crosssite raises on purpose for bad input or bad state."""


class ImageReadError(CrossSiteError):
    """An image file that cannot be decoded (corrupt, truncated, unsupported, not an image)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class SiteError(CrossSiteError):
    """A site that cannot be loaded: missing path, unknown layout, empty, wrong class folders, bad split file."""


class ConfigError(CrossSiteError):
    """An invalid configuration key or value."""


class CheckpointError(CrossSiteError):
    """A model or checkpoint file that is corrupt, truncated, or from an incompatible version."""


class NonFiniteModelError(CheckpointError):
    """A model whose weights or buffers hold a NaN or an infinity: refused by `crosssite.models.save`, so no
    writer (training, add-site, adaptation) can leave a broken model file behind."""


class OutputError(CrossSiteError):
    """An output that cannot be written: not a directory, permission, read-only file system, full disk, quota.

    Raised by `crosssite.ioutil.guard_output` from the `OSError` of the failed write; the message names the path,
    what was being written, the cause, and what to do.
    """

    def __init__(self, path: object | None, what: str, reason: str, hint: str) -> None:
        self.path, self.what, self.reason, self.hint = path, what, reason, hint
        where = "" if path is None else f"{path}: "
        super().__init__(f"{where}cannot write {what}: {reason}; {hint}")


class TrainingError(CrossSiteError):
    """A run that cannot start or continue (run directory in use, mismatching resume, ...)."""


class TrainingDiverged(TrainingError):
    """The loss, the gradient norm, a parameter or a buffer became NaN or infinite; the last good (finite)
    checkpoint is kept."""


class InferenceError(CrossSiteError):
    """A prediction request that cannot be served: unknown site, too few images to adapt, no input..."""
