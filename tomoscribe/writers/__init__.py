"""DICOM out: a :class:`~tomoscribe.report.Report` becomes an SR and a SEG.

Optionally also a TID 1500 measurement SR (:func:`build_measurement_sr`) and
an Encapsulated PDF of the report (:func:`build_pdf_report`).

Writers never run the model. Each builder checks its input and returns a valid
DICOM object or raises :class:`~tomoscribe.errors.ReportError` with a
one-line reason; :func:`write_outputs` puts them all on disk atomically.
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
    MEASUREMENTS_SERIES_NUMBER,
    PDF_SERIES_NUMBER,
    SEG_SERIES_DESCRIPTION,
    SEG_SERIES_NUMBER,
    SERIES_DESCRIPTION_PREFIX,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    is_tomoscribe_output,
    output_uids,
)
from tomoscribe.writers.measurements import build_measurement_sr
from tomoscribe.writers.pdf import build_pdf_report
from tomoscribe.writers.seg import build_answer_seg, build_seg
from tomoscribe.writers.sr import build_sr

__all__ = [
    "MEASUREMENTS_SERIES_NUMBER",
    "PDF_SERIES_NUMBER",
    "SEG_SERIES_DESCRIPTION",
    "SEG_SERIES_NUMBER",
    "SERIES_DESCRIPTION_PREFIX",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "build_answer_seg",
    "build_measurement_sr",
    "build_outputs",
    "build_pdf_report",
    "build_seg",
    "build_sr",
    "is_tomoscribe_output",
    "output_uids",
    "write_outputs",
]


def build_outputs(
    report: Report, volume: Volume, *, measurements: bool = False, pdf: bool = False
) -> list[tuple[str, Dataset]]:
    """Build the SEG (if any segment has voxels) and the SR that references it.

    Args:
        report: the model's report.
        volume: the volume it was made from.
        measurements: also build the TID 1500 measurement SR (when some
            finding has a segment).
        pdf: also build the Encapsulated PDF report.

    Returns:
        ``[(file name, dataset), ...]``: SR first, then SEG if there is one,
        then ``QSEG_`` (the referring answers' masks) if any answer has one,
        then ``MEAS_`` and ``PDF_`` when asked for. File names are
        ``<KIND>_<SOPInstanceUID>.dcm``, hence deterministic per job.

    Raises:
        ReportError: the report or volume cannot be written (one line).
    """
    seg = build_seg(report, volume)
    answer_seg = build_answer_seg(report, volume)
    sr = build_sr(report, volume, seg=seg, answer_seg=answer_seg)
    outputs: list[tuple[str, Dataset]] = [(f"SR_{sr.SOPInstanceUID}.dcm", sr)]
    if seg is not None:
        outputs.append((f"SEG_{seg.SOPInstanceUID}.dcm", seg))
    if answer_seg is not None:
        outputs.append((f"QSEG_{answer_seg.SOPInstanceUID}.dcm", answer_seg))
    if measurements:
        meas = build_measurement_sr(report, volume, seg)
        if meas is not None:
            outputs.append((f"MEAS_{meas.SOPInstanceUID}.dcm", meas))
    if pdf:
        doc = build_pdf_report(report, volume)
        outputs.append((f"PDF_{doc.SOPInstanceUID}.dcm", doc))
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


def write_outputs(
    report: Report,
    volume: Volume,
    out_dir: str | os.PathLike[str],
    *,
    measurements: bool = False,
    pdf: bool = False,
) -> list[Path]:
    """Build the SR and SEG of ``report`` and write them into ``out_dir``.

    With ``measurements`` / ``pdf`` the measurement SR and the PDF object are
    built and written in the same all-or-nothing way (see :func:`build_outputs`).

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
    outputs = build_outputs(report, volume, measurements=measurements, pdf=pdf)
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
