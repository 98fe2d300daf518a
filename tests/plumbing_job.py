"""PLUMBING TEST ONLY: a stand-in job function for testing the Orthanc plugin's mechanics.

It has the signature of ``operators.app.run_app`` but runs no model: it reads
the CT series the worker fetched, writes a tiny Comprehensive SR (text only)
and a one-segment SEG (voxels above 0 HU) with highdicom, with SOP Instance
UIDs derived from the StudyInstanceUID (like the real writers), so the
plugin's enqueue / fetch / store / idempotence / restart paths are exercised
with real DICOM. The real end-to-end test uses ``operators.app:run_app``.

Control from the environment (inherited Orthanc -> worker):
``TOMOSCRIBE_PLUMBING_DIR``: if it holds a file ``slow``, the first attempt
writes ``started`` there (with the worker's pid) and sleeps, so a test can
kill the worker mid-job; later attempts run normally. If it holds ``fail``,
the job raises an ``InputError`` with the file's text.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from tomoscribe.errors import InputError

MANUFACTURER = "tomoscribe"


def _control() -> None:
    folder = os.environ.get("TOMOSCRIBE_PLUMBING_DIR")
    if not folder:
        return
    d = Path(folder)
    if (d / "fail").exists():
        raise InputError((d / "fail").read_text())
    if (d / "slow").exists() and not (d / "started").exists():
        (d / "started").write_text(str(os.getpid()))
        time.sleep(float((d / "slow").read_text() or "120"))


def run_app(input_dir: Path, output_dir: Path, model_dir: Path | None = None,
            questions: Sequence[str] = (), config_path: Path | None = None) -> list[Path]:
    """Write ``plumbing_sr.dcm`` and ``plumbing_seg.dcm`` for the CT series in ``input_dir``."""
    _control()
    datasets = [pydicom.dcmread(p) for p in sorted(input_dir.rglob("*.dcm"))]
    datasets = [d for d in datasets if d.Modality == "CT"]
    if not datasets:
        raise InputError(f"no CT instances under {input_dir}")
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    study_uid = str(datasets[0].StudyInstanceUID)
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                   for d in datasets])  # (D, H, W)

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=["plumbing", study_uid, kind]))

    text = (f"PLUMBING TEST: {len(datasets)} slices, mean {hu.mean():.1f} HU;"
            f" questions: {'; '.join(questions) or 'none'}")
    content = hd.sr.ContainerContentItem(
        name=codes.DCM.Findings,
        template_id=None,
    )
    content.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
        name=codes.DCM.Finding, value=text,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    sr = hd.sr.ComprehensiveSR(
        evidence=datasets, content=content,
        series_instance_uid=uid("sr-series"), series_number=901,
        sop_instance_uid=uid("sr"), instance_number=1,
        manufacturer=MANUFACTURER, series_description="tomoscribe plumbing SR",
        is_complete=False, is_final=False, is_verified=False)
    out = []
    path = output_dir / "plumbing_sr.dcm"
    sr.save_as(path)
    out.append(path)

    mask = (hu > 0).astype(np.uint8)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="above 0 HU",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="tomoscribe-plumbing", version="0", family=codes.DCM.ArtificialIntelligence))
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=uid("seg-series"), series_number=902,
        sop_instance_uid=uid("seg"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="plumbing",
        software_versions="0", device_serial_number="0",
        series_description="tomoscribe plumbing SEG", omit_empty_frames=True)
    path = output_dir / "plumbing_seg.dcm"
    seg.save_as(path)
    out.append(path)
    return out
