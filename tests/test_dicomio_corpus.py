"""Every file of pydicom's test corpus through scan, selection and loading.

The corpus is pydicom's bundled test files plus, when installed, the
``pydicom-data`` wheel (enhanced CT/MR, every compressed transfer syntax,
truncated and malformed files). Each file alone must give a defined outcome:
a result, or a :class:`TomoscribeError` with a one-line message; never any
other exception. The real multi-slice series of the corpus must load with the
geometry their headers state.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from tomoscribe.dicomio import load_series, scan_folder, select_series
from tomoscribe.errors import GeometryError, TomoscribeError

#: files larger than this are skipped (time budget)
MAX_BYTES = 20_000_000

_FILES = sorted(Path(f) for f in get_testdata_files() if os.path.isfile(f))
_BASE = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]


def _id(path: Path) -> str:
    try:
        return str(path.relative_to(_BASE))
    except ValueError:
        return f"pydicom-data/{path.name}"


def _one_line(err: TomoscribeError) -> None:
    text = str(err)
    assert text.strip(), f"{type(err).__name__} with an empty message"
    assert "\n" not in text and "\r" not in text


def test_corpus_is_there() -> None:
    """The corpus is big enough to mean something (pydicom's own files at least)."""
    assert len(_FILES) >= 80
    names = {p.name for p in _FILES}
    assert {"CT_small.dcm", "MR_small.dcm", "emri_small.dcm"} <= names


@pytest.mark.parametrize("path", _FILES, ids=[_id(p) for p in _FILES])
def test_file_has_a_defined_outcome(path: Path) -> None:
    if path.stat().st_size > MAX_BYTES:
        pytest.skip(
            f"{path.stat().st_size / 1e6:.0f} MB is over the {MAX_BYTES / 1e6:.0f} MB budget"
        )
    try:
        index = scan_folder(path)
    except TomoscribeError as err:
        _one_line(err)
        return
    assert index.files_seen == 1
    for note in index.notes:
        assert "\n" not in note
    try:
        chosen = select_series(index).chosen
    except TomoscribeError as err:
        _one_line(err)
        chosen = None
    for series in index.series:
        if not series.slice_count:
            continue
        try:
            volume = load_series(series)
        except TomoscribeError as err:
            _one_line(err)
            assert series is not chosen, "the selected series must be loadable"
            continue
        d, h, w = volume.voxels.shape
        assert volume.voxels.dtype == np.float32
        assert d == len(volume.slices) >= 2 and h > 0 and w > 0
        assert np.isfinite(volume.affine).all()
        assert abs(np.linalg.det(volume.affine[:3, :3])) > 0


# --------------------------------------------------------------------------- real series


def _series_dir(*parts: str) -> Path:
    return _BASE.joinpath("dicomdirtests", *parts)


def test_ge_ct_series_loads_with_header_geometry() -> None:
    """98892001/CT5N: 5 axial CT slices; order, spacing, affine and values from the headers."""
    folder = _series_dir("98892001", "CT5N")
    index = scan_folder(folder)
    assert len(index.series) == 1
    series = index.series[0]
    volume = load_series(series)
    dss = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    dss.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert volume.voxels.shape == (5, int(dss[0].Rows), int(dss[0].Columns))
    iop = np.asarray(dss[0].ImageOrientationPatient, dtype=float)
    row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)
    np.testing.assert_allclose(volume.affine[:3, 2], iop[:3] * col_sp, atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 1], iop[3:] * row_sp, atol=1e-6)
    for k, ds in enumerate(dss):
        pos = volume.affine @ np.array([k, 0, 0, 1.0])
        np.testing.assert_allclose(pos[:3], np.asarray(ds.ImagePositionPatient, float), atol=1e-3)
        assert volume.slices[k].sop_instance_uid == ds.SOPInstanceUID
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.voxels[k], expected.astype(np.float32))
    assert abs(np.linalg.norm(volume.affine[:3, 0]) - 2.5) < 1e-6


def test_ge_ct_study_selects_the_axial_series() -> None:
    """98892001: a two-plane scout and the 5-slice axial series; the axial one is chosen."""
    index = scan_folder(_series_dir("98892001"))
    scout = next(s for s in index.series if s.description == "Scout")
    assert scout.orientation == "Mixed"
    with pytest.raises(GeometryError, match="mixes slice orientations"):
        load_series(scout)
    chosen = select_series(index, {"selections": [{"conditions": {}, "min_slices": 3}]}).chosen
    assert chosen.slice_count == 5 and chosen.orientation == "Axial"


def test_ct_with_missing_slices_names_the_gap() -> None:
    """77654033/CT2: 4 slices with a 200 mm jump: a gap, reported with its size."""
    series = next(
        s for s in scan_folder(_series_dir("77654033", "CT2")).series if s.modality == "CT"
    )
    with pytest.raises(GeometryError, match=r"gap of .* missing"):
        load_series(series)


def test_mr_pilot_with_three_planes_is_refused() -> None:
    """98892003/MR2: a tri-plane MR pilot is one series but not one volume."""
    index = scan_folder(_series_dir("98892003", "MR2"))
    pilots = [s for s in index.series if s.slice_count == 3]
    assert pilots and all(s.orientation == "Mixed" for s in pilots)
    for s in pilots:
        with pytest.raises(GeometryError, match="mixes slice orientations"):
            load_series(s)


def test_enhanced_ct_frames_follow_their_positions() -> None:
    """pydicom-data's eCT_Supplemental.dcm: enhanced CT, per-frame positions."""
    path = get_testdata_file("eCT_Supplemental.dcm")
    if not isinstance(path, str):
        pytest.skip("pydicom-data is not installed")
    ds = pydicom.dcmread(path)
    volume = load_series(scan_folder(path).series[0])
    positions = [
        np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert volume.voxels.shape[0] == len(positions)
    got = [tuple(np.round(volume.affine @ [k, 0, 0, 1.0], 3)[:3]) for k in range(len(positions))]
    assert sorted(got) == sorted(tuple(np.round(p, 3)) for p in positions)
    arr = ds.pixel_array
    for k in range(len(positions)):
        frame = next(
            i for i, p in enumerate(positions) if np.allclose(p, volume.affine[:3] @ [k, 0, 0, 1])
        )
        assert volume.slices[k].frame_number == frame + 1
        fg = ds.PerFrameFunctionalGroupsSequence[frame]
        pvt = (
            fg.get("PixelValueTransformationSequence")
            or ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
        )[0]
        expected = arr[frame] * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
        np.testing.assert_array_equal(volume.voxels[k], expected.astype(np.float32))


# --------------------------------------------------------------------------- pixel decoding


_NEEDED = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
)


def _single_images() -> list[Path]:
    """Single-frame corpus images with full plane geometry (any transfer syntax)."""
    out = []
    for p in _FILES:
        if p.stat().st_size > MAX_BYTES:
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            single = int(ds.get("NumberOfFrames", 1) or 1) == 1
        except Exception:  # malformed files are covered by the test above
            continue
        if single and all(k in ds for k in _NEEDED):
            out.append(p)
    return out


_SINGLE = _single_images()


@pytest.mark.parametrize("path", _SINGLE, ids=[_id(p) for p in _SINGLE])
def test_image_decodes_in_a_two_slice_stack(path: Path, tmp_path: Path) -> None:
    """Each single image, stacked with a copy 1 mm further along its normal, decodes
    (any transfer syntax) to the values pydicom gives, or fails with a one-line reason."""
    ds = pydicom.dcmread(path)
    ds.save_as(tmp_path / "a.dcm")
    iop = np.asarray(ds.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    if ds.get("file_meta") is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImagePositionPatient = [
        f"{v:.6f}" for v in np.asarray(ds.ImagePositionPatient, float) + normal
    ]
    ds.save_as(tmp_path / "b.dcm")
    try:
        expected = pydicom.pixels.apply_rescale(ds.pixel_array, ds)
    except Exception:
        expected = None
    try:
        index = scan_folder(tmp_path)
        assert len(index.series) == 1
        volume = load_series(index.series[0])
    except TomoscribeError as err:
        _one_line(err)
        if expected is not None and expected.ndim == 2 and int(ds.SamplesPerPixel) == 1:
            assert not isinstance(err, GeometryError) or "decode" not in str(err), (
                f"pydicom decodes it, tomoscribe says: {err}"
            )
        return
    assert expected is not None, "tomoscribe decoded what pydicom cannot"
    assert volume.voxels.shape == (2, *expected.shape)
    np.testing.assert_allclose(volume.voxels[0], expected.astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(volume.voxels[0], volume.voxels[1])
