"""User-facing errors.

Every error a user can cause (bad path, bad checkpoint, unknown method, ...) is raised as
:class:`RfclipError` with a one-line message that names the problem and the fix. The CLI prints
``error: <message>`` and exits with status 2; it never prints a traceback for these.
"""


class RfclipError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class WeightsNotFoundError(RfclipError):
    """Model weights are not in the local cache and cannot be downloaded."""


class ImageError(RfclipError):
    """One image cannot be read or interpreted (the other images of a run can still be segmented)."""
