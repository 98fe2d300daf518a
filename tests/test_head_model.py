"""The packaged head MR model (``tomoscribe/weights-head-mr``, the model named ``head-mr``).

What a PACS administrator turning it on relies on: it is installed with the
package under its name, declares MR of the head with an image check, reads
head MR phantoms it never trained on (test seeds) and writes head-coded SR
and SEG, refuses a torso, and serves beside the chest-abdomen model in one
run (``-m default -m head-mr``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tomoscribe.cli import EXIT_SKIPPED, main
from tomoscribe.domain import HEAD_MR as HEAD_DOMAIN
from tomoscribe.errors import OutOfScopeError
from tomoscribe.model.scribe import Scribe
from tomoscribe.phantom import SPLITS, make_phantom, render_acquisition, write_dicom_series
from tomoscribe.phantom_head import make_head_phantom, render_head_acquisition, write_head_series
from tomoscribe.scope import HEAD_MR, packaged_models
from tomoscribe.volume import SliceRef, Volume

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: the head's SNOMED CT codes in SEG (cerebral hemisphere, cerebellum, lateral ventricle, head)
HEAD_CODES = {"372073000", "113305005", "66720007", "69536005"}


@pytest.fixture(scope="module")
def head() -> Scribe:
    return Scribe.load(packaged_models()["head-mr"])


def _volume(values: np.ndarray, aff: np.ndarray) -> Volume:
    return Volume(values.astype(np.float32), aff,
                  [SliceRef(f"1.2.3.{k}", MR_STORAGE) for k in range(values.shape[0])])


def _head_volume(seed: int) -> Volume:
    ph = make_head_phantom(seed, modality="MR")
    values, _labels, aff = render_head_acquisition(ph)
    return _volume(values * np.float32(ph.scale), aff)


def head_model_version() -> str:
    return str(json.loads((packaged_models()["head-mr"] / "config.json").read_text())["version"])


def test_the_head_model_is_packaged_under_its_name() -> None:
    folder = packaged_models()["head-mr"]
    assert folder.name == "weights-head-mr"
    conf = json.loads((folder / "config.json").read_text())
    assert conf["net"]["domain"] == HEAD_DOMAIN.name
    assert conf["scope"] == HEAD_MR.to_dict()  # with the image check on sizes
    assert conf["version"] != json.loads(
        (packaged_models()["default"] / "config.json").read_text())["version"]
    assert conf["net"]["refine_width"] and conf["net"]["seg_token"]
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 25 * 2**20


@pytest.mark.parametrize(("seed", "sites"), [
    (SPLITS["test"][0], set()),  # normal, T1 coronal
    (SPLITS["test"][1], {"left cerebral hemisphere"}),  # a 30 mm mass, T2 axial
    (SPLITS["test"][5], {"cerebellum", "left cerebral hemisphere"}),  # 25 and 26 mm, T2 sagittal
])
def test_the_head_model_reads_held_out_head_mr(head: Scribe, seed: int, sites: set[str]) -> None:
    vol = _head_volume(seed)
    report = head.generate(head.encode(vol), ["is there a lesion in the cerebellum ?",
                                              "segment the lesions ."])
    head.check_anatomy(report, vol)  # a head: not refused
    assert {f.structure for f in report.findings} == sites
    assert report.label_map.shape == vol.shape
    cerebellum, lesions = report.answers
    assert cerebellum.answer.lower().startswith("yes" if "cerebellum" in sites else "no")
    assert (lesions.mask is not None) == bool(sites)
    for f in report.findings:  # each finding points at a slice showing its lesion
        assert f.key_slices


def test_the_head_model_refuses_a_torso(head: Scribe) -> None:
    ct = make_phantom(SPLITS["test"][0])
    hu, _labels, aff = render_acquisition(ct)
    vol = _volume(np.clip(hu + 1024.0, 0.0, None), aff)  # a body, stored as an MR would be
    # the product path refuses it from the coarse segmentation, before the refiner
    with pytest.raises(OutOfScopeError, match=r"does not look like MR of the head: .* not 100 to"):
        head.encode(vol)
    # read to the end, the full check refuses it as well
    report = head.generate(head.encode(vol, early_refusal=False), [])
    with pytest.raises(OutOfScopeError, match="does not look like MR of the head"):
        head.check_anatomy(report, vol)


def test_the_early_refusal_leaves_room_for_the_refiner(head: Scribe) -> None:
    """Sizes a little outside the declared ranges wait for the refined check."""
    vol = _head_volume(SPLITS["test"][0])
    enc = head.encode(vol)  # a head: not refused early
    grid, logits = enc.extra["grid"], enc.seg_logits
    assert head.coarse_refusal(logits, grid, vol.spacing, vol.voxels) is None
    right = next(k for k, n in head.organ_names.items() if n == "right cerebral hemisphere")
    labels = logits.argmax(dim=1)
    ml = float((labels == right).sum()) * head.coarse_voxel_ml(grid, vol.spacing)
    for factor, refused in ((1.3, False), (1.8, True)):  # the range ends at 1,100 ml
        # spacing scaled so that the right hemisphere measures factor x 1,100 ml
        scale = (factor * 1100.0 / ml) ** (1 / 3)
        spacing = tuple(s * scale for s in vol.spacing)
        why = head.coarse_refusal(logits, grid, spacing, vol.voxels)
        assert (why is not None) == refused, (factor, why)


def test_a_study_with_a_chest_ct_and_a_head_mr_gets_a_report_from_each(tmp_path: Path) -> None:
    study = tmp_path / "study"
    uid = "1.2.826.0.1.3680043.8.498.777"
    write_dicom_series(make_phantom(SPLITS["test"][2], shape=(24, 64, 64)), study / "ct",
                       study_instance_uid=uid, patient_id="TWO")
    write_head_series(make_head_phantom(SPLITS["test"][1], modality="MR"), study / "mr",
                      study_instance_uid=uid, patient_id="TWO")
    out = tmp_path / "out"
    assert main(["run", "-i", str(study), "-o", str(out), "-m", "default", "-m", "head-mr"]) == 0
    head_version = head_model_version()
    read = {}  # model version -> the series its SR read
    for path in out.glob("SR_*.dcm"):
        ds = pydicom.dcmread(path)
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        read[str(ds.SoftwareVersions[1])] = str(evidence.SeriesInstanceUID)
    mr_series = str(pydicom.dcmread(next((study / "mr").iterdir())).SeriesInstanceUID)
    ct_series = str(pydicom.dcmread(next((study / "ct").iterdir())).SeriesInstanceUID)
    assert read == {head_version: mr_series, Scribe.load(None).version: ct_series}
    segs = [pydicom.dcmread(p) for p in out.glob("SEG_*.dcm")]
    types = [{str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence}
             for seg in segs]
    assert any(t <= HEAD_CODES | {"4147007", "367643001", "52988006"} for t in types)
    # the head model alone on the chest CT: skipped, nothing written
    assert main(["run", "-i", str(study / "ct"), "-o", str(tmp_path / "none"), "-m",
                 "head-mr"]) == EXIT_SKIPPED
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
