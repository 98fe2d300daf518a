"""Head phantoms (MR and CT): determinism, anatomy, contrast per weighting, DICOM series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tomoscribe.dicomio import load_series, scan_folder, select_series
from tomoscribe.phantom_head import (
    LESION_LABEL,
    STRUCTURE_LABELS,
    head_report_text,
    make_head_phantom,
    render_head,
    render_head_acquisition,
    write_head_series,
)

SMALL = (20, 64, 64)


def test_same_seed_same_phantom() -> None:
    assert make_head_phantom(5) == make_head_phantom(5)
    assert make_head_phantom(6) != make_head_phantom(5)


@pytest.mark.parametrize("seed", range(12))
def test_lesions_lie_in_their_site_clear_of_the_ventricles(seed: int) -> None:
    ph = make_head_phantom(seed, lesion_probability=1.0, plane="axial")
    assert ph.lesions
    aff = ph.acquisition_affine()
    _values, labels = render_head(ph, aff, ph.shape, noise=False)
    inv = np.linalg.inv(aff)
    for les in ph.lesions:
        assert 10.0 <= les.diameter_mm <= 35.0
        k, r, c = np.rint(inv @ np.array([*les.centre, 1.0]))[:3].astype(int)
        assert labels[k, r, c] == LESION_LABEL
        if les.site != "cerebellum":  # on its own side of the falx
            assert les.centre[0] * (-1 if les.site.startswith("right") else 1) > les.diameter_mm / 2
    lesion = labels == LESION_LABEL
    assert lesion.any()
    # ventricles never overwritten by a lesion: they keep a healthy volume
    assert (labels == STRUCTURE_LABELS["lateral ventricles"]).sum() > 100


@pytest.mark.parametrize(
    ("sequence", "brighter", "darker"),
    [
        ("T1", "white matter", "csf"),  # CSF dark on T1
        ("T2", "csf", "white matter"),  # bright on T2
        ("FLAIR", "white matter", "csf"),  # nulled on FLAIR
    ],
)
def test_contrast_follows_the_weighting(sequence: str, brighter: str, darker: str) -> None:
    ph = make_head_phantom(3, sequence=sequence, plane="axial", lesion_probability=0.0)
    values, labels, _aff = render_head_acquisition(ph)
    hemispheres = np.isin(labels, [STRUCTURE_LABELS["right cerebral hemisphere"],
                                   STRUCTURE_LABELS["left cerebral hemisphere"]])
    tissue = {"white matter": float(np.median(values[hemispheres])),
              "csf": float(np.median(values[labels == STRUCTURE_LABELS["lateral ventricles"]]))}
    assert tissue[brighter] > 1.5 * tissue[darker], tissue


def test_head_ct_is_in_hounsfield_units() -> None:
    ph = make_head_phantom(4, modality="CT", lesion_probability=0.0)
    assert ph.plane == "axial" and ph.sequence == "CT"
    values, labels, _aff = render_head_acquisition(ph)
    brain = values[labels == STRUCTURE_LABELS["left cerebral hemisphere"]]
    assert 15.0 < float(np.median(brain)) < 45.0
    assert float(values.max()) > 700.0  # the skull
    assert float(np.median(values[labels == 0])) < -900.0  # air around the head


def test_report_text() -> None:
    assert head_report_text(make_head_phantom(3, lesion_probability=0.0)) == (
        "no focal abnormality . impression : normal study ."
    )
    ph = make_head_phantom(0, lesion_probability=1.0)
    text = head_report_text(ph)
    for les in ph.lesions:
        assert les.site in text and les.kind in text
    assert text.endswith(" .") and "impression :" in text


@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal"])
def test_series_loads_back_on_its_own_geometry(plane: str, tmp_path: Path) -> None:
    """Written as MR, read by the loader: the voxels are the rendering, at the right LPS points."""
    ph = make_head_phantom(2, plane=plane, sequence="T2", lesion_probability=1.0)
    paths = write_head_series(ph, tmp_path)
    ds = pydicom.dcmread(paths[0])
    assert ds.Modality == "MR" and ds.BodyPartExamined == "HEAD"
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    series = select_series(scan_folder(tmp_path)).chosen
    assert series.orientation == plane.capitalize()
    volume = load_series(series)
    assert volume.modality == "MR"
    # re-render the noise-free phantom on the loaded volume's grid: the lesion is where it should be
    _values, labels = render_head(ph, volume.affine, volume.shape, noise=False)
    lesion = labels == LESION_LABEL
    assert lesion.sum() > 50
    values = volume.voxels
    csf = labels == STRUCTURE_LABELS["lateral ventricles"]
    hemi = labels == STRUCTURE_LABELS["left cerebral hemisphere"]
    assert float(np.median(values[csf])) > 1.5 * float(np.median(values[hemi]))  # T2: CSF bright
    # same series written twice: same UIDs (a re-send is the same study)
    again = write_head_series(ph, tmp_path / "again")
    assert pydicom.dcmread(again[0]).SOPInstanceUID == ds.SOPInstanceUID


def test_body_part_can_be_left_out(tmp_path: Path) -> None:
    ph = make_head_phantom(1, modality="CT", shape=SMALL)
    paths = write_head_series(ph, tmp_path, body_part="")
    assert "BodyPartExamined" not in pydicom.dcmread(paths[0])
    assert pydicom.dcmread(paths[0]).RescaleIntercept == -1024


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools")
@pytest.mark.parametrize(("modality", "sequence"), [("MR", "FLAIR"), ("MR", "T1"), ("CT", None)])
def test_dciodvfy_accepts_the_series(modality: str, sequence: str | None, tmp_path: Path) -> None:
    ph = make_head_phantom(0, modality=modality, sequence=sequence, shape=SMALL)
    path = write_head_series(ph, tmp_path)[0]
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    problems = [ln for ln in (check.stdout + check.stderr).splitlines()
                if ln.startswith(("Error", "Warning"))]
    assert problems == [], problems
