"""load_series: slice order, affine, rescale, and every refusal's message."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tomoscribe.dicomio import load_series, scan_folder
from tomoscribe.dicomio.scan import SeriesInfo
from tomoscribe.dicomio.synth import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    expected_stored,
    slice_positions,
    write_enhanced,
    write_series,
)
from tomoscribe.errors import GeometryError
from tomoscribe.volume import Volume

# 30 degrees about the S axis, then tilted 10 degrees: a doubly oblique plane
_a, _b = np.deg2rad(30), np.deg2rad(10)
_row = np.array([np.cos(_a), np.sin(_a), 0.0])
_col = np.array([-np.sin(_a) * np.cos(_b), np.cos(_a) * np.cos(_b), np.sin(_b)])
OBLIQUE = tuple(float(v) for v in (*_row, *_col))


def _only_series(folder: Path) -> SeriesInfo:
    index = scan_folder(folder)
    assert len(index.series) == 1
    return index.series[0]


def _header_by_uid(volume: Volume) -> dict[str, pydicom.Dataset]:
    return {str(h.SOPInstanceUID): h for h in volume.headers}


def _assert_geometry(volume: Volume) -> None:
    """index (k, r, c) -> LPS agrees with DICOM's own formula for every slice."""
    by_uid = _header_by_uid(volume)
    _, h, w = volume.shape
    for k, ref in enumerate(volume.slices):
        ds = by_uid[ref.sop_instance_uid]
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        ps = np.asarray(ds.PixelSpacing, dtype=float)
        np.testing.assert_allclose(volume.index_to_lps(np.array([[k, 0, 0]]))[0], ipp, atol=1e-3)
        # DICOM C.7.6.2.1.1: P = S + c * PS[1] * row_cosine + r * PS[0] * col_cosine
        r, c = h - 1, w - 1
        expected = ipp + c * ps[1] * iop[:3] + r * ps[0] * iop[3:]
        np.testing.assert_allclose(
            volume.index_to_lps(np.array([[k, r, c]]))[0], expected, atol=1e-3
        )


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, SAGITTAL, CORONAL, OBLIQUE],
    ids=["axial", "sagittal", "coronal", "oblique"],
)
def test_sorting_affine_rescale(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    paths = write_series(
        tmp_path,
        n=10,
        rows=32,
        columns=24,
        orientation=orientation,
        spacing=2.5,
        pixel_spacing=(0.8, 0.7),
        slope=2.0,
        intercept=-1024.0,
    )
    series = _only_series(tmp_path)
    volume = load_series(series)
    assert volume.shape == (10, 32, 24)
    assert volume.voxels.dtype == np.float32
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.7), abs=1e-4)
    # slice k holds the stored values written for slice k, rescaled
    for k in range(10):
        np.testing.assert_array_equal(volume.voxels[k], expected_stored(k, 32, 24) * 2.0 - 1024.0)
    # slice references follow position order (files were written in that order)
    written = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    assert [s.sop_instance_uid for s in volume.slices] == written
    assert all(s.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2" for s in volume.slices)
    assert all(s.frame_number is None for s in volume.slices)
    _assert_geometry(volume)
    assert volume.modality == "CT"
    assert volume.series_instance_uid == series.uid
    assert volume.study_instance_uid == series.study_uid
    assert volume.frame_of_reference_uid == str(series.headers[0].FrameOfReferenceUID)
    assert len(volume.headers) == 10
    assert all("PixelData" not in h for h in volume.headers)
    assert volume.notes == []


def test_sorted_by_position_not_instance_number_or_name(tmp_path: Path) -> None:
    # positions written in scrambled order: the loader must sort by position
    pos = slice_positions(8, AXIAL, 3.0)
    scrambled = [pos[i] for i in (3, 0, 7, 1, 6, 2, 5, 4)]
    write_series(tmp_path, positions=scrambled, intercept=0.0)
    volume = load_series(_only_series(tmp_path))
    order = [int(volume.voxels[k, 0, 0]) // 10 for k in range(8)]
    assert order == [1, 3, 5, 0, 7, 6, 4, 2]  # written index k of the slice at each position
    z = volume.index_to_lps(np.array([[k, 0, 0] for k in range(8)]))[:, 2]
    assert np.all(np.diff(z) > 0)
    _assert_geometry(volume)


def test_mr_without_rescale(tmp_path: Path) -> None:
    write_series(tmp_path, n=5, modality="MR", slope=1.0, intercept=0.0)
    volume = load_series(_only_series(tmp_path))
    assert volume.modality == "MR"
    np.testing.assert_array_equal(volume.voxels[4], expected_stored(4, 32, 32))


def test_identical_duplicate_dropped_with_note(tmp_path: Path) -> None:
    write_series(tmp_path, n=6)
    series = _only_series(tmp_path)
    # a second instance (new SOP UID) carrying the same slice
    src = series.files[0]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "zz_dup")
    volume = load_series(_only_series(tmp_path))
    assert volume.shape[0] == 6
    assert any("duplicate" in n for n in volume.notes)


def test_conflicting_duplicate_refused(tmp_path: Path) -> None:
    write_series(tmp_path, n=6)
    ds = pydicom.dcmread(_only_series(tmp_path).files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = (ds.pixel_array + 1).astype(np.int16).tobytes()
    ds.save_as(tmp_path / "zz_other_phase")
    with pytest.raises(GeometryError, match="hold different images"):
        load_series(_only_series(tmp_path))


def test_missing_slice_names_the_gap(tmp_path: Path) -> None:
    pos = slice_positions(10, AXIAL, 2.5)
    del pos[4]
    write_series(tmp_path, positions=pos)
    with pytest.raises(GeometryError) as err:
        load_series(_only_series(tmp_path))
    msg = str(err.value)
    assert "gap of 5 mm" in msg and "median spacing 2.5 mm" in msg
    assert "about 1 slice(s) missing" in msg and "\n" not in msg


def test_uneven_spacing_refused(tmp_path: Path) -> None:
    z = [0.0, 2.0, 4.0, 6.0, 8.6, 10.6, 12.6, 14.6]
    write_series(tmp_path, positions=[(0.0, 0.0, v) for v in z])
    with pytest.raises(GeometryError, match="uneven slice spacing"):
        load_series(_only_series(tmp_path))


def test_small_jitter_accepted(tmp_path: Path) -> None:
    z = [0.0, 2.001, 3.999, 6.0, 8.002, 10.0]
    write_series(tmp_path, positions=[(0.0, 0.0, v) for v in z])
    volume = load_series(_only_series(tmp_path))
    assert volume.spacing[0] == pytest.approx(2.0)
    assert volume.notes == []
    z = [0.0, 2.1, 4.0, 6.0, 8.0, 10.0]  # 5% off: accepted, noted
    write_series(tmp_path / "b", positions=[(0.0, 0.0, v) for v in z])
    volume = load_series(_only_series(tmp_path / "b"))
    assert volume.spacing[0] == pytest.approx(2.0)
    assert any("slice spacing varies" in n for n in volume.notes)


def test_sheared_stack_refused(tmp_path: Path) -> None:
    # gantry tilt: origins drift in y while the plane stays axial
    write_series(tmp_path, positions=[(0.0, 0.3 * k, 2.0 * k) for k in range(8)])
    with pytest.raises(GeometryError, match="gantry tilt"):
        load_series(_only_series(tmp_path))


def test_mixed_orientation_refused(tmp_path: Path) -> None:
    uid, study = generate_uid(), generate_uid()
    write_series(tmp_path / "a", n=5, series_uid=uid, study_uid=study)
    write_series(tmp_path / "b", n=5, series_uid=uid, study_uid=study, orientation=SAGITTAL)
    series = scan_folder(tmp_path).series
    assert len(series) == 1 and series[0].orientation == "Mixed"
    with pytest.raises(GeometryError, match="mixes slice orientations"):
        load_series(series[0])


def test_mixed_size_refused(tmp_path: Path) -> None:
    uid, study = generate_uid(), generate_uid()
    pos = slice_positions(8, AXIAL, 2.0)
    write_series(tmp_path / "a", positions=pos[:4], series_uid=uid, study_uid=study)
    write_series(tmp_path / "b", positions=pos[4:], series_uid=uid, study_uid=study, rows=16)
    with pytest.raises(GeometryError, match=r"mixes image sizes \(16x32, 32x32\)"):
        load_series(_only_series(tmp_path))


def test_mixed_frame_of_reference_refused(tmp_path: Path) -> None:
    uid, study = generate_uid(), generate_uid()
    pos = slice_positions(8, AXIAL, 2.0)
    write_series(tmp_path / "a", positions=pos[:4], series_uid=uid, study_uid=study)
    write_series(tmp_path / "b", positions=pos[4:], series_uid=uid, study_uid=study)  # new FoR
    with pytest.raises(GeometryError, match="frames of reference"):
        load_series(_only_series(tmp_path))


def test_single_slice_refused() -> None:
    index = scan_folder(Path(get_testdata_file("CT_small.dcm")))  # type: ignore[arg-type]
    with pytest.raises(GeometryError, match="at least 2 slices"):
        load_series(index.series[0])


def test_undecodable_pixels_name_the_file(tmp_path: Path) -> None:
    paths = write_series(tmp_path, n=5)
    raw = paths[2].read_bytes()
    paths[2].write_bytes(raw[: len(raw) - 1000])  # pixel data cut short
    with pytest.raises(GeometryError) as err:
        load_series(_only_series(tmp_path))
    assert f"cannot decode pixel data of {paths[2].name}" in str(err.value)


def test_enhanced_multiframe(tmp_path: Path) -> None:
    write_enhanced(
        tmp_path / "mf.dcm", n=6, frame_order=[2, 0, 5, 1, 4, 3], slope=2.0, intercept=5.0
    )
    volume = load_series(_only_series(tmp_path))
    assert volume.shape == (6, 16, 16)
    for k in range(6):
        np.testing.assert_array_equal(volume.voxels[k], expected_stored(k, 16, 16) * 2.0 + 5.0)
    # slice k came from the frame that stored it (frame numbers are 1-based)
    assert [s.frame_number for s in volume.slices] == [2, 4, 1, 6, 5, 3]
    assert len({s.sop_instance_uid for s in volume.slices}) == 1
    assert volume.spacing == pytest.approx((3.0, 0.9, 0.9))
    ipp0 = slice_positions(6, AXIAL, 3.0)[0]
    np.testing.assert_allclose(volume.affine[:3, 3], ipp0)
    np.testing.assert_allclose(
        volume.index_to_lps(np.array([[5, 0, 0]]))[0], slice_positions(6, AXIAL, 3.0)[5]
    )
    assert len(volume.headers) == 1


def test_legacy_multiframe_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(tmp_path / "legacy.dcm")
    with pytest.raises(GeometryError, match="without per-frame positions"):
        load_series(_only_series(tmp_path))


def _series_from_real_file(folder: Path, name: str, n: int = 3) -> list[Path]:
    """``n`` slices made of one real pydicom file, pixel data kept as stored."""
    src = get_testdata_file(name)
    assert src is not None
    series_uid = generate_uid()
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
        normal = np.cross(*np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(2, 3))
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp + 4.0 * k * normal]
        path = folder / f"{name}.{k}"
        ds.save_as(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_real_transfer_syntaxes(tmp_path: Path, name: str) -> None:
    _series_from_real_file(tmp_path, name)
    volume = load_series(_only_series(tmp_path))
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array  # type: ignore[arg-type]
    assert volume.shape == (3, 64, 64)
    for k in range(3):
        np.testing.assert_array_equal(volume.voxels[k], reference)
    _assert_geometry(volume)


def test_real_ct_hounsfield(tmp_path: Path) -> None:
    _series_from_real_file(tmp_path, "CT_small.dcm", n=2)
    volume = load_series(_only_series(tmp_path))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(volume.voxels[1], hu)
    assert volume.voxels.min() < -500  # air around the phantom


def test_real_truncated_file(tmp_path: Path) -> None:
    _series_from_real_file(tmp_path, "MR_truncated.dcm", n=2)
    with pytest.raises(GeometryError, match=r"cannot decode pixel data of MR_truncated\.dcm\.0"):
        load_series(_only_series(tmp_path))


def test_real_pydicom_ct_series() -> None:
    root = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"  # type: ignore[arg-type]
    series = next(s for s in scan_folder(root).series if s.description.startswith("SmartScore"))
    volume = load_series(series)
    assert volume.shape == (5, 16, 16)
    _assert_geometry(volume)
    assert volume.spacing[0] == pytest.approx(2.5)


def test_threads_match_serial(tmp_path: Path) -> None:
    write_series(tmp_path, n=20, rows=16, columns=16)
    series = _only_series(tmp_path)
    serial = load_series(series, workers=1)
    threaded = load_series(series, workers=3)
    np.testing.assert_array_equal(serial.voxels, threaded.voxels)
    assert serial.slices == threaded.slices


def test_copy_of_folder_loads_identically(tmp_path: Path) -> None:
    write_series(tmp_path / "a", n=6)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = load_series(_only_series(tmp_path / "a"))
    b = load_series(_only_series(tmp_path / "b"))
    np.testing.assert_array_equal(a.affine, b.affine)


def test_modality_lut_applied(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    for path in write_series(tmp_path, n=3, rows=8, columns=8):
        ds = pydicom.dcmread(path)
        del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
        item = Dataset()
        item.LUTDescriptor = [256, 0, 16]
        item.ModalityLUTType = "HU"
        item.LUTData = list(range(1000, 1256))
        item["LUTData"].VR = "US"
        ds.ModalityLUTSequence = Sequence([item])
        ds.save_as(path)
    volume = load_series(_only_series(tmp_path))
    np.testing.assert_array_equal(volume.voxels[2], expected_stored(2, 8, 8) + 1000)


def test_gantry_tilt_refused_with_the_angle(tmp_path: Path) -> None:
    # a 15 degree tilt: each 2.5 mm step along z moves the origin 2.5 * tan(15) mm in y
    shift = 2.5 * np.tan(np.deg2rad(15.0))
    positions = [(-40.0, -40.0 + k * shift, 10.0 + 2.5 * k) for k in range(6)]
    write_series(tmp_path, n=6, positions=positions, gantry_tilt=15.0)
    with pytest.raises(GeometryError, match="gantry tilt of 15 degrees") as info:
        load_series(_only_series(tmp_path))
    assert "\n" not in str(info.value)
    assert "resample" in str(info.value)


def test_monochrome1_mr_inverted_within_its_range(tmp_path: Path) -> None:
    write_series(
        tmp_path, n=4, rows=8, columns=8, modality="MR", photometric="MONOCHROME1",
        slope=2.0, intercept=5.0,
    )  # fmt: skip
    volume = load_series(_only_series(tmp_path))
    # int16 stored range [-32768, 32767] rescaled: lo + hi = 2 * (-1) + 2 * 5 = 8
    for k in range(4):
        np.testing.assert_array_equal(volume.voxels[k], 8.0 - (expected_stored(k, 8, 8) * 2 + 5))
    # higher stored values (later slices here) now come out darker: the order reversed
    assert volume.voxels[3].mean() < volume.voxels[0].mean()
    assert any("MONOCHROME1" in n and "inverted" in n for n in volume.notes)


def test_monochrome1_unsigned_keeps_its_range(tmp_path: Path) -> None:
    paths = write_series(tmp_path, n=3, rows=8, columns=8, modality="MR", photometric="MONOCHROME1")
    for p in paths:  # 12-bit unsigned, no rescale: v' = 4095 - v
        ds = pydicom.dcmread(p)
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(p)
    volume = load_series(_only_series(tmp_path))
    np.testing.assert_array_equal(volume.voxels[1], 4095.0 - expected_stored(1, 8, 8))
    assert volume.voxels.min() >= 0


def test_monochrome1_ct_keeps_hounsfield_units(tmp_path: Path) -> None:
    write_series(tmp_path, n=4, rows=8, columns=8, photometric="MONOCHROME1")
    volume = load_series(_only_series(tmp_path))
    np.testing.assert_array_equal(volume.voxels[2], expected_stored(2, 8, 8) - 1024.0)
    assert any("MONOCHROME1" in n and "Hounsfield" in n for n in volume.notes)


def test_native_pixels_read_at_the_scanned_offset(tmp_path: Path) -> None:
    write_series(tmp_path, n=3, rows=8, columns=8)
    series = _only_series(tmp_path)
    assert all(loc is not None for loc in series.pixel_locations)
    for fi, path in enumerate(series.files):
        loc = series.pixel_locations[fi]
        assert loc is not None
        ds = pydicom.dcmread(path)
        assert loc.length == len(ds.PixelData)
        assert path.read_bytes()[loc.offset : loc.offset + loc.length] == ds.PixelData
    volume = load_series(series)
    for k in range(3):
        np.testing.assert_array_equal(volume.voxels[k], expected_stored(k, 8, 8) - 1024.0)


@pytest.mark.parametrize("signed", [0, 1])
def test_unused_high_bits_cleared_as_pydicom_does(tmp_path: Path, signed: int) -> None:
    from pydicom.pixels import pixel_array

    paths = write_series(tmp_path, n=3, rows=8, columns=8)
    rng = np.random.default_rng(signed)
    for p in paths:  # 12 bits stored in 16, garbage in the 4 unused high bits
        ds = pydicom.dcmread(p)
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, 12, 11
        dtype = np.int16 if signed else np.uint16
        values = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, (8, 8))
        noise = rng.integers(0, 16, (8, 8)) << 12
        ds.PixelData = ((values.astype(np.int64) & 0x0FFF) | noise).astype(np.uint16).tobytes()
        ds.save_as(p)
        assert pixel_array(p).dtype == dtype
    series = _only_series(tmp_path)
    assert all(loc is not None for loc in series.pixel_locations)  # the fast path is taken
    volume = load_series(series)
    for k, ref in enumerate(volume.slices):
        path = next(p for p in paths if pydicom.dcmread(p).SOPInstanceUID == ref.sop_instance_uid)
        np.testing.assert_array_equal(volume.voxels[k], pixel_array(path) - 1024.0)
