"""dcmqi (QIICR's reference DICOM converters) reads our SEG and measurement SR.

``segimage2itkimage`` turns the SEG of the phantom study back into one NRRD
label volume per segment: each must hold exactly our voxels, at the same
patient positions. ``tid1500reader`` must read the measurement SR with our
groups, codes, values and segment references.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from test_writers_measurements import case  # noqa: F401

from tomoscribe.report import Answer, Report
from tomoscribe.volume import Volume
from tomoscribe.writers import build_answer_seg, build_seg
from tomoscribe.writers.measurements import build_measurement_sr
from tomoscribe.writers.seg import segment_numbers


def _dcmqi_bin(name: str) -> Path | None:
    """Path of a dcmqi tool from the dcmqi wheel, if it runs here."""
    try:
        import dcmqi
    except ImportError:
        return None
    path = Path(dcmqi.__file__).parent / "bin" / name
    try:
        ok = subprocess.run([str(path), "--version"], capture_output=True, timeout=30)
    except OSError:
        return None
    return path if ok.returncode == 0 else None


SEGIMAGE2ITKIMAGE = _dcmqi_bin("segimage2itkimage")
TID1500READER = _dcmqi_bin("tid1500reader")
needs_dcmqi = pytest.mark.skipif(
    SEGIMAGE2ITKIMAGE is None or TID1500READER is None,
    reason="dcmqi's binaries are not installed or cannot run here (pip install dcmqi)",
)


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A minimal NRRD reader for dcmqi's output (raw or gzip, little endian, 3D).

    Returns:
        ``(data, affine)``: ``data`` ``(K, J, I)`` (slowest axis first) and the
        ``(4, 4)`` map from ``(k, j, i)`` to LPS mm.
    """
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    fields: dict[str, str] = {}
    for line in head.decode("ascii").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.lstrip("=").strip()
    assert fields["space"] == "left-posterior-superior" and fields["dimension"] == "3"
    assert fields.get("endian", "little") == "little"
    dtype = {"short": np.int16, "unsigned char": np.uint8, "uchar": np.uint8,
             "unsigned short": np.uint16, "ushort": np.uint16, "int": np.int32}[fields["type"]]
    sizes = [int(s) for s in fields["sizes"].split()]
    payload = gzip.decompress(body) if fields["encoding"] == "gzip" else body
    assert fields["encoding"] in ("gzip", "raw")
    data = np.frombuffer(payload, dtype=dtype).reshape(sizes[::-1])
    dirs = [np.array([float(v) for v in d.split(",")])
            for d in re.findall(r"\(([^)]*)\)", fields["space directions"])]
    origin = np.array([float(v) for v in re.findall(r"\(([^)]*)\)",
                                                    fields["space origin"])[0].split(",")])
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = dirs[2], dirs[1], dirs[0]  # (k, j, i)
    affine[:3, 3] = origin
    return data, affine


def segimage2itkimage(seg: pydicom.Dataset, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """Convert ``seg`` with dcmqi's segimage2itkimage: ``(output folder, meta.json)``."""
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    out.mkdir()
    assert SEGIMAGE2ITKIMAGE is not None
    proc = subprocess.run([str(SEGIMAGE2ITKIMAGE), "--inputDICOM", str(tmp_path / "seg.dcm"),
                           "--outputDirectory", str(out), "-t", "nrrd"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta: dict[str, Any] = json.loads((out / "meta.json").read_text())
    return out, meta


@needs_dcmqi
def test_segimage2itkimage_gives_back_our_labels(case: tuple[Report, Volume],  # noqa: F811
                                                 tmp_path: Path) -> None:
    report, volume = case
    seg = build_seg(report, volume)
    assert seg is not None
    out, meta = segimage2itkimage(seg, tmp_path)
    labels_by_name = {s.name: s.label for s in report.segments}
    numbers = segment_numbers(report)
    described = [item for group in meta["segmentAttributes"] for item in group]
    assert len(described) == len(numbers)
    inverse = np.linalg.inv(volume.affine)
    for item in described:
        number = int(item["labelID"])
        label = labels_by_name[item["SegmentLabel"]]
        assert numbers[label] == number
        data, affine = read_nrrd(out / f"{number}.nrrd")
        ours = np.asarray(report.label_map) == label
        theirs = np.argwhere(data != 0)  # (N, 3) (k, j, i)
        assert len(theirs) == int(ours.sum()), item["SegmentLabel"]
        lps = theirs @ affine[:3, :3].T + affine[:3, 3]
        index = np.rint(lps @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        assert ours[index[:, 0], index[:, 1], index[:, 2]].all(), item["SegmentLabel"]


@needs_dcmqi
def test_tid1500reader_reads_our_measurements(case: tuple[Report, Volume],  # noqa: F811
                                              tmp_path: Path) -> None:
    report, volume = case
    seg = build_seg(report, volume)
    sr = build_measurement_sr(report, volume, seg)
    assert seg is not None and sr is not None
    sr.save_as(tmp_path / "meas.dcm", enforce_file_format=True)
    assert TID1500READER is not None
    proc = subprocess.run([str(TID1500READER), "--inputDICOM", str(tmp_path / "meas.dcm"),
                           "--outputMetadata", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((tmp_path / "m.json").read_text())
    measured = [f for f in report.findings if f.segment is not None]
    groups = meta["Measurements"]
    assert len(groups) == len(measured)
    numbers = segment_numbers(report)
    for group, finding in zip(groups, measured, strict=True):
        assert finding.segment is not None
        assert group["ReferencedSegment"] == numbers[finding.segment]
        assert group["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
        values = {m["quantity"]["CodeValue"]: float(m["value"]) for m in group["measurementItems"]}
        assert values["103339001"] == pytest.approx(finding.size_mm, abs=0.05)
        assert values["42798000"] > 0


@needs_dcmqi
def test_segimage2itkimage_reads_overlapping_answer_masks(case: tuple[Report, Volume],  # noqa: F811
                                                          tmp_path: Path) -> None:
    """The answer SEG (overlapping masks, only the slices they touch) read back by dcmqi."""
    report, volume = case
    organs = np.asarray(report.label_map) > 0
    lesion = np.asarray(report.label_map) == max(s.label for s in report.segments)
    assert lesion.any() and (organs & lesion).any()  # they overlap
    asked = dataclasses.replace(report, answers=[
        Answer("segment the liver .", "Segmented.", (), organs),
        Answer("segment the lesions .", "Segmented.", (), lesion)])
    seg = build_answer_seg(asked, volume)
    assert seg is not None
    out, meta = segimage2itkimage(seg, tmp_path)
    described = {item["SegmentLabel"]: int(item["labelID"])
                 for group in meta["segmentAttributes"] for item in group}
    assert set(described) == {"Q1: segment the liver", "Q2: segment the lesions"}
    inverse = np.linalg.inv(volume.affine)
    files = sorted(out.glob("*.nrrd"))
    for label, mask in (("Q1: segment the liver", organs), ("Q2: segment the lesions", lesion)):
        number = described[label]
        found = []
        for path in files:  # dcmqi writes one file per group of non-overlapping segments
            data, affine = read_nrrd(path)
            theirs = np.argwhere(data == number)
            if len(theirs) and len(theirs) == int(mask.sum()):
                lps = theirs @ affine[:3, :3].T + affine[:3, 3]
                index = np.rint(lps @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
                found.append(bool(mask[index[:, 0], index[:, 1], index[:, 2]].all()))
        assert found == [True], (label, [p.name for p in files])
