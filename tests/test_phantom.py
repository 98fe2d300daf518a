"""Phantoms: determinism, anatomy, ground truth, DICOM series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tomoscribe.phantom import (
    LESION_LABEL,
    ORGAN_LABELS,
    SPLITS,
    make_phantom,
    render_acquisition,
    report_text,
    write_dicom_series,
)


def test_splits_are_disjoint() -> None:
    names = list(SPLITS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(SPLITS[a]) & set(SPLITS[b][:1000])
            assert max(SPLITS[a]) < min(SPLITS[b]) or max(SPLITS[b]) < min(SPLITS[a])


def test_same_seed_same_phantom() -> None:
    a, b = make_phantom(123), make_phantom(123)
    assert a == b
    assert make_phantom(124) != a


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_render_has_organs_with_realistic_hu(seed: int) -> None:
    ph = make_phantom(seed, lesion_probability=1.0)
    hu, labels, _aff = render_acquisition(ph)
    assert hu.shape == labels.shape == ph.shape
    for organ, lo, hi in [("liver", 20, 110), ("right lung", -950, -700), ("spleen", 10, 100)]:
        vals = hu[labels == ORGAN_LABELS[organ]]
        assert vals.size > 100, organ
        assert lo < float(np.median(vals)) < hi, organ
    assert ph.lesions, "lesion_probability=1 must give at least one lesion"
    assert (labels == LESION_LABEL).sum() > 0


def test_lesions_lie_inside_their_organ() -> None:
    for seed in range(20):
        ph = make_phantom(seed, lesion_probability=1.0)
        for les in ph.lesions:
            ell = ph.organs[les.organ]
            rel = np.subtract(les.centre, ell.centre) / np.array(ell.radii)
            assert float(np.sum(rel**2)) < 1.0
            assert 10.0 <= les.diameter_mm <= 35.0


def test_normal_phantom_report() -> None:
    ph = make_phantom(3, lesion_probability=0.0)
    assert ph.lesions == []
    assert report_text(ph).startswith("no focal abnormality")


def test_dicom_series_round_trip(tmp_path: Path) -> None:
    ph = make_phantom(11, lesion_probability=1.0, shape=(12, 48, 48))
    paths = write_dicom_series(ph, tmp_path)
    assert len(paths) == 12
    hu, _labels, aff = render_acquisition(ph)
    ds = pydicom.dcmread(paths[5])
    assert ds.Modality == "CT" and ds.Rows == 48
    pix = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.abs(pix - hu[5]).max() <= 0.51
    assert np.allclose([float(v) for v in ds.ImagePositionPatient], aff[:3, 3] + 5 * aff[:3, 0],
                       atol=1e-3)
    # deterministic UIDs: a re-send of the same phantom is the same study
    again = write_dicom_series(ph, tmp_path / "again")
    assert pydicom.dcmread(again[5]).SOPInstanceUID == ds.SOPInstanceUID
