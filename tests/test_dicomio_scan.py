"""scan_folder: headers only, any layout, skipped files noted, never a crash."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tomoscribe.dicomio import SeriesInfo, scan_folder
from tomoscribe.dicomio.synth import CORONAL, SAGITTAL, write_enhanced, write_series, write_sr
from tomoscribe.errors import InputError

PYDICOM_DIR = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]


def test_groups_series_in_nested_folders_with_odd_names(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    write_series(tmp_path / "a" / "b", n=10, study_uid=study, series_number=3)
    write_series(
        tmp_path / "c",
        n=9,
        study_uid=study,
        orientation=SAGITTAL,
        series_number=4,
        description="SAG",
    )
    (tmp_path / "c" / "notes.txt").write_text("not dicom")
    (tmp_path / "empty.dcm").write_bytes(b"")
    index = scan_folder(tmp_path)
    assert index.files_seen == 21
    assert index.files_dicom == 19
    assert [s.slice_count for s in index.series] == [10, 9]
    assert [s.orientation for s in index.series] == ["Axial", "Sagittal"]
    assert index.study_uids == [study]
    ax = index.series[0]
    assert isinstance(ax, SeriesInfo)
    assert ax.series_number == 3 and ax.modality == "CT"
    assert ax.sop_class_name == "CT Image"
    assert ax.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert ax.pixel_spacing == pytest.approx((0.8, 0.7))
    assert ax.slice_thickness == pytest.approx(2.5)
    assert ax.slice_spacing == pytest.approx(2.5)
    assert len(ax.files) == len(ax.headers) == 10
    assert all("PixelData" not in h for h in ax.headers)
    assert any("notes.txt" in n and "not DICOM" in n for n in index.notes)
    assert any("empty.dcm" in n for n in index.notes)


def test_orientation_labels(tmp_path: Path) -> None:
    oblique = (0.866025, 0.5, 0.0, 0.0, 0.0, -1.0)  # 30 degrees off sagittal
    write_series(tmp_path / "cor", n=3, orientation=CORONAL, description="cor")
    write_series(tmp_path / "obl", n=4, orientation=oblique, description="obl")
    labels = {s.description: s.orientation for s in scan_folder(tmp_path).series}
    assert labels == {"cor": "Coronal", "obl": "Oblique"}


def test_real_pydicom_folder_with_dicomdir(tmp_path: Path) -> None:
    index = scan_folder(PYDICOM_DIR / "dicomdirtests")
    assert any("DICOMDIR" in n for n in index.notes)
    modalities = {s.modality for s in index.series}
    assert {"CT", "MR", "CR"} <= modalities
    scout = next(s for s in index.series if s.description == "Scout")
    assert "LOCALIZER" in scout.image_type
    assert scout.orientation == "Mixed"  # one sagittal and one coronal scout image
    mra = next(s for s in index.series if s.series_number == 700)
    assert mra.slice_count == 7


def test_repeated_instance_counted_once(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", n=4)
    shutil.copy(paths[0], tmp_path / "copy_of_first")
    index = scan_folder(tmp_path)
    assert index.series[0].slice_count == 4
    assert any("repeating an instance" in n for n in index.notes)


def test_enhanced_and_sr_and_single_file(tmp_path: Path) -> None:
    write_enhanced(tmp_path / "mf.dcm", n=6)
    write_sr(tmp_path / "sr.dcm")
    index = scan_folder(tmp_path)
    by_mod = {s.modality: s for s in index.series}
    assert by_mod["MR"].slice_count == 6
    assert by_mod["MR"].orientation == "Axial"
    assert by_mod["MR"].pixel_spacing == pytest.approx((0.9, 0.9))
    assert by_mod["MR"].slice_spacing == pytest.approx(3.0)
    assert by_mod["SR"].slice_count == 0
    assert by_mod["SR"].sop_class_name == "Comprehensive SR"
    single = scan_folder(tmp_path / "mf.dcm")
    assert single.files_seen == 1 and len(single.series) == 1


def test_random_bytes_is_input_error(tmp_path: Path) -> None:
    rng = __import__("numpy").random.default_rng(1)
    for i in range(5):
        (tmp_path / f"file{i}.dcm").write_bytes(rng.bytes(2000))
    with pytest.raises(InputError) as err:
        scan_folder(tmp_path)
    msg = str(err.value)
    assert "no DICOM files found" in msg and "5 files read" in msg and "\n" not in msg


def test_missing_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    with pytest.raises(InputError, match="0 files read"):
        scan_folder(tmp_path)


def test_truncated_and_preamble_less_files(tmp_path: Path) -> None:
    # a file cut inside its header is unreadable and noted; a file without the
    # 128-byte preamble and DICM prefix is still read
    src = write_series(tmp_path / "src", n=3)
    raw = src[0].read_bytes()
    (tmp_path / "src" / "cut").write_bytes(raw[:300])
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    assert buf.getvalue()[128:132] != b"DICM"
    (tmp_path / "nopreamble").write_bytes(buf.getvalue())
    index = scan_folder(tmp_path)
    assert any("cut" in n for n in index.notes)
    assert sorted(s.slice_count for s in index.series) == [1, 3]
    assert index.files_dicom == 4


def _pydicom_header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None


@pytest.mark.filterwarnings("ignore")
def test_fast_header_reader_equals_pydicom_on_every_test_file() -> None:
    from tomoscribe.dicomio.header import read_header

    compared = 0
    for path in sorted(PYDICOM_DIR.rglob("*")):
        if not path.is_file() or path.stat().st_size > 2_000_000:  # keeps the test to a few seconds
            continue
        ref = _pydicom_header(path)
        if ref is None:
            continue
        got, location = read_header(path)
        assert got == ref, path.name
        assert got.file_meta == ref.file_meta, path.name
        assert (got.preamble, got.is_implicit_VR, got.original_character_set) == (
            ref.preamble, ref.is_implicit_VR, ref.original_character_set,
        ), path.name  # fmt: skip
        if location is not None:  # the recorded offset is where pydicom finds Pixel Data
            full = pydicom.dcmread(path)
            raw = path.read_bytes()[location.offset : location.offset + location.length]
            assert raw == full.PixelData, path.name
        compared += 1
    assert compared > 80
