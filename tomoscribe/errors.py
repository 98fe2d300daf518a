"""Exceptions that carry a one-line reason for the user.

Every failure caused by the input (unreadable files, no qualifying series,
odd geometry) or by the environment (a full disk) is raised as a subclass of
:class:`TomoscribeError`. The CLI and the job record print ``str(error)``: it
must be a single line that a PACS administrator can act on.
"""


class TomoscribeError(Exception):
    """Base class: ``str(err)`` is a one-line, user-facing reason."""

    def __str__(self) -> str:
        text = super().__str__()
        return " ".join(text.split())  # never more than one line


class InputError(TomoscribeError):
    """The input folder holds nothing we can read as DICOM."""


class NoSeriesError(TomoscribeError):
    """No series of the study qualifies under the selection rules."""


class OutOfScopeError(NoSeriesError):
    """Series qualify, but none is of a kind the model was trained to read."""


class GeometryError(TomoscribeError):
    """The chosen series cannot be turned into a consistent volume."""


class ModelError(TomoscribeError):
    """The model folder is missing, incomplete or incompatible."""


class ReportError(TomoscribeError):
    """A report is malformed (empty finding, slice index out of range...)."""


class OutputError(TomoscribeError):
    """Writing the outputs failed (disk full, permission denied...)."""
