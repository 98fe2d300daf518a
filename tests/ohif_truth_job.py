"""Job function for the viewer test: the real app, or the phantom's ground truth for one study.

It has the signature of ``operators.app.run_app``. Studies whose PatientID
starts with ``TRUTH`` (``TRUTH<seed>``) get a report built from the phantom's
ground-truth labels (one finding per lesion, segmented and measured), written
by the real writers with the TID 1500 measurement SR: so the browser test can
check that OHIF draws our measurement SR whatever the shipped model's training
state. Every other study goes to the real app, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TRUTH_PREFIX = "TRUTH"


def truth_report(volume: Any, seed: int) -> Any:
    """The phantom's ground truth on ``volume``'s grid as a report with measured findings."""
    import numpy as np
    from scipy import ndimage

    from tomoscribe.phantom import LESION_LABEL, ORGAN_LABELS, make_phantom, render
    from tomoscribe.report import Finding, Report, Segment

    _, truth = render(make_phantom(seed), volume.affine, volume.shape, noise=False)
    names = {v: k for k, v in ORGAN_LABELS.items()}
    label_map = np.where((truth > 1) & (truth != LESION_LABEL), truth, 0).astype(np.uint8)
    segments = [Segment(int(v), names[int(v)], names[int(v)], "organ")
                for v in np.unique(label_map) if v]
    lesions, n = ndimage.label(truth == LESION_LABEL)
    findings = []
    for c in range(1, n + 1):
        mask = lesions == c
        around = truth[ndimage.binary_dilation(mask, iterations=2) & ~mask]
        organ = names[int(np.bincount(around[(around > 1) & (around != LESION_LABEL)]).argmax())]
        label = 20 + c
        label_map[mask] = label
        segments.append(Segment(label, f"{organ} lesion {c}", organ, "lesion"))
        area = mask.sum(axis=(1, 2))
        key = [int(k) for k in np.argsort(-area, kind="stable")[:3] if area[k] > 0]
        findings.append(Finding(f"Ground-truth lesion {c} in the {organ}.", organ, key,
                                segment=label))
    if not findings:
        raise ValueError(f"phantom {seed} has no lesion: pick another seed")
    return Report(
        findings=findings,
        impression=f"{len(findings)} ground-truth lesion(s).",
        text=" ".join(f.text for f in findings),
        answers=[],
        slice_scores=np.full(volume.shape[0], 1 / volume.shape[0], np.float32),
        label_map=label_map,
        segments=sorted(segments, key=lambda s: s.label),
        model_name="ground-truth",
        model_version="truth",
    )


def run_app(input_dir: Path, output_dir: Path, model_dir: Path | None = None,
            questions: Sequence[str] = (), config_path: Path | None = None) -> Any:
    """The ground-truth outputs for a ``TRUTH<seed>`` patient, else the real app's."""
    import pydicom

    first = next(p for p in sorted(Path(input_dir).rglob("*")) if p.is_file())
    patient = str(pydicom.dcmread(first, stop_before_pixels=True).PatientID)
    if not patient.startswith(TRUTH_PREFIX):
        from operators.app import run_app as real_run_app

        return real_run_app(input_dir, output_dir, model_dir, questions, config_path)

    from tomoscribe.dicomio import DEFAULT_RULES, load_series, scan_folder, select_series
    from tomoscribe.writers import write_outputs

    volume = load_series(select_series(scan_folder(Path(input_dir)), DEFAULT_RULES).chosen)
    report = truth_report(volume, int(patient[len(TRUTH_PREFIX):]))
    return write_outputs(report, volume, output_dir, measurements=True)
