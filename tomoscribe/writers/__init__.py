"""DICOM out: a :class:`~tomoscribe.report.Report` becomes an SR and a SEG.

Writers never run the model. Each builder checks its input and returns a valid
highdicom object or raises :class:`~tomoscribe.errors.ReportError` with a
one-line reason; :func:`write_outputs` puts both on disk atomically.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from tomoscribe.errors import OutputError
from tomoscribe.report import Report
from tomoscribe.volume import Volume
from tomoscribe.writers.identity import (
    SEG_SERIES_DESCRIPTION,
    SEG_SERIES_NUMBER,
    SERIES_DESCRIPTION_PREFIX,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    is_tomoscribe_output,
    output_uids,
)
from tomoscribe.writers.seg import build_seg
from tomoscribe.writers.sr import build_sr

__all__ = [
    "SEG_SERIES_DESCRIPTION",
    "SEG_SERIES_NUMBER",
    "SERIES_DESCRIPTION_PREFIX",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "build_outputs",
    "build_seg",
    "build_sr",
    "is_tomoscribe_output",
    "output_uids",
    "write_outputs",
]


def build_outputs(report: Report, volume: Volume) -> list[tuple[str, Dataset]]:
    """Build the SEG (if any segment has voxels) and the SR that references it.

    Returns:
        ``[(file name, dataset), ...]``: SR first, then SEG if there is one.
        File names are ``SR_<SOPInstanceUID>.dcm`` / ``SEG_<SOPInstanceUID>.dcm``,
        hence deterministic per job.

    Raises:
        ReportError: the report or volume cannot be written (one line).
    """
    seg = build_seg(report, volume)
    sr = build_sr(report, volume, seg=seg)
    outputs: list[tuple[str, Dataset]] = [(f"SR_{sr.SOPInstanceUID}.dcm", sr)]
    if seg is not None:
        outputs.append((f"SEG_{seg.SOPInstanceUID}.dcm", seg))
    return outputs


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_outputs(report: Report, volume: Volume, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Build the SR and SEG of ``report`` and write them into ``out_dir``.

    Everything is built (and checked) before the first byte is written. Each
    file is written under a hidden temporary name in ``out_dir``, fsynced, and
    renamed into place; on any failure every file of this call is removed, so
    ``out_dir`` never holds a half-written output. Rewriting the same job
    replaces the files with identical UIDs.

    Args:
        report: the model's report.
        volume: the volume it was made from.
        out_dir: folder for the ``.dcm`` files (created if missing).

    Returns:
        Paths of the written files, SR first.

    Raises:
        ReportError: a malformed report (nothing written).
        OutputError: the files could not be written (disk full, no permission...).
    """
    outputs = build_outputs(report, volume)
    out = Path(out_dir)
    temps: list[Path] = []
    finals: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, ds in outputs:
            tmp = out / f".{name}.{os.getpid()}.tmp"
            temps.append(tmp)
            with open(tmp, "wb") as fh:
                dcmwrite(fh, ds, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, (name, _) in zip(temps, outputs, strict=True):
            final = out / name
            os.replace(tmp, final)
            finals.append(final)
        _fsync_dir(out)
    except OSError as exc:
        for path in temps + finals:
            with contextlib.suppress(OSError):
                path.unlink()
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write outputs to {out}: {reason}") from exc
    except (ValueError, TypeError) as exc:  # pydicom could not encode a value
        for path in temps + finals:
            with contextlib.suppress(OSError):
                path.unlink()
        raise OutputError(f"cannot encode outputs for {out}: {exc}") from exc
    except BaseException:
        for path in temps + finals:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return finals
