"""The writers on a head MR study: codes and laterality of the head domain's structures.

The study is head phantom seed 33 (axial; a cerebellar mass, and a mass and a
cyst in the left cerebral hemisphere) written as a real MR series and loaded
by tomoscribe.dicomio. The report is built from the phantom's ground truth on
the loaded grid, one lesion segment per site as ``Scribe.generate`` builds
them: the cerebellum's finding names one kind (a mass), the left hemisphere's
names two, so its segment has no ``lesion_kind``. SEG, text SR, measurement SR
and answer SEG are checked with dciodvfy, dsrdump, dcmqi and highdicom.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from test_writers_dcmqi import TID1500READER, needs_dcmqi, read_nrrd, segimage2itkimage
from test_writers_measurements import needs_dciodvfy, needs_dsrdump
from test_writers_sr import run_dciodvfy

from tomoscribe.dicomio import DEFAULT_RULES, load_series, scan_folder, select_series
from tomoscribe.domain import HEAD_MR
from tomoscribe.errors import ReportError
from tomoscribe.phantom_head import (
    LESION_LABEL,
    STRUCTURE_LABELS,
    make_head_phantom,
    render_head,
    write_head_series,
)
from tomoscribe.report import Answer, Finding, Report, Segment
from tomoscribe.volume import Volume
from tomoscribe.writers import build_answer_seg, build_seg, build_sr
from tomoscribe.writers.codes import (
    STRUCTURE_CODES,
    STRUCTURE_LATERALITY,
    answer_coding,
    named_structure,
    segment_coding,
)
from tomoscribe.writers.measurements import build_measurement_sr
from tomoscribe.writers.seg import segment_numbers

SEED = 33
SHAPE = (12, 64, 64)
LESION_BASE = 10

HEAD, CEREBRAL_HEMISPHERE, CEREBELLUM, LATERAL_VENTRICLE = (
    "69536005", "372073000", "113305005", "66720007")
RIGHT, LEFT, BILATERAL = "24028007", "7771000", "51440002"
MASS, CYST, LESION = "4147007", "367643001", "52988006"
LATERALITY = "272741003"
#: the side each structure's code leaves out
SIDE = {"right cerebral hemisphere": RIGHT, "left cerebral hemisphere": LEFT,
        "lateral ventricles": BILATERAL, "cerebellum": None}


def head_volume(folder: Path) -> Volume:
    """Head phantom ``SEED`` written as an MR series and loaded back."""
    phantom = make_head_phantom(SEED, shape=SHAPE, lesion_probability=1.0)
    write_head_series(phantom, folder)
    return load_series(select_series(scan_folder(folder), DEFAULT_RULES).chosen)


def head_report(volume: Volume) -> Report:
    """A report from the phantom's ground truth on ``volume``'s grid.

    Segments: the structures of labels 2..5 (not the head, the region), then
    one lesion segment per site (label 10 + site index) holding its lesions.
    Findings: one per lesion site (segmented and measured), one on the right
    hemisphere and one on the ventricles (neither segmented).
    """
    phantom = make_head_phantom(SEED, shape=SHAPE, lesion_probability=1.0)
    _, truth = render_head(phantom, volume.affine, volume.shape, noise=False)
    names = {v: k for k, v in STRUCTURE_LABELS.items()}
    label_map = np.where((truth > 1) & (truth != LESION_LABEL), truth, 0).astype(np.uint8)
    segments = [Segment(int(v), names[int(v)], names[int(v)], "organ")
                for v in np.unique(label_map) if v]
    comps, n = ndimage.label(truth == LESION_LABEL)
    by_site: dict[str, np.ndarray] = {}
    for c in range(1, n + 1):
        mask = comps == c
        around = truth[ndimage.binary_dilation(mask, iterations=2) & ~mask]
        site = names[int(np.bincount(around[(around > 1) & (around != LESION_LABEL)]).argmax())]
        by_site[site] = by_site.get(site, np.zeros(volume.shape, bool)) | mask
    kinds = {site: sorted({les.kind for les in phantom.lesions if les.site == site},
                          key=HEAD_MR.kinds[site].index) for site in HEAD_MR.sites}
    findings = []
    _, row_mm, col_mm = volume.spacing
    voxel_ml = float(np.prod(volume.spacing)) / 1e3
    for site in (s for s in HEAD_MR.sites if s in by_site):
        mask = by_site[site]
        label = LESION_BASE + HEAD_MR.sites.index(site)
        label_map[mask] = label
        one_kind = kinds[site][0] if len(kinds[site]) == 1 else None
        segments.append(Segment(label, f"{site} {one_kind}" if one_kind else f"{site} lesions",
                                site, "lesion", one_kind))
        area = mask.sum(axis=(1, 2))
        key = [int(k) for k in np.argsort(-area, kind="stable")[:3] if area[k] > 0]
        what = " and ".join(f"one {k}" for k in kinds[site])
        findings.append(Finding(f"{site[:1].upper()}{site[1:]}: {what}.", site, key,
                                segment=label, size_mm=round(float(np.sqrt(
                                    area[key[0]] * row_mm * col_mm)), 1),
                                volume_ml=round(float(mask.sum() * voxel_ml), 2)))
    middle = volume.shape[0] // 2
    findings.append(Finding("Right cerebral hemisphere: normal.", "right cerebral hemisphere",
                            [middle]))
    findings.append(Finding("Lateral ventricles: normal size.", "lateral ventricles", [middle]))
    return Report(
        findings=findings,
        impression="Cerebellar mass; left hemispheric mass and cyst.",
        text=" ".join(f.text for f in findings),
        answers=[
            Answer("segment the left cerebral hemisphere .", "<seg> .", (middle,),
                   label_map == STRUCTURE_LABELS["left cerebral hemisphere"]),
            Answer("segment the lesions in the cerebellum .", "<seg> .", (),
                   label_map == LESION_BASE + HEAD_MR.sites.index("cerebellum")),
        ],
        slice_scores=np.full(volume.shape[0], 1 / volume.shape[0], np.float32),
        label_map=label_map,
        segments=sorted(segments, key=lambda s: s.label),
        model_name="ground-truth",
        model_version="truth",
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Volume]:
    volume = head_volume(tmp_path_factory.mktemp("head33"))
    return head_report(volume), volume


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _code(seq: pydicom.Sequence) -> str:
    return str(seq[0].CodeValue)


def test_the_case_has_what_the_checks_need(case: tuple[Report, Volume]) -> None:
    report, volume = case
    assert volume.modality == "MR"
    lesions = {s.structure: s for s in report.segments if s.kind == "lesion"}
    assert set(lesions) == {"cerebellum", "left cerebral hemisphere"}
    assert lesions["cerebellum"].lesion_kind == "mass"
    assert lesions["left cerebral hemisphere"].lesion_kind is None  # a mass and a cyst
    organs = {s.structure for s in report.segments if s.kind == "organ"}
    assert organs == set(HEAD_MR.structures[1:])
    for seg in report.segments:
        assert (report.label_map == seg.label).any(), seg.name


def test_every_head_structure_is_coded() -> None:
    for domain_structure in HEAD_MR.structures:
        assert STRUCTURE_CODES[domain_structure].scheme_designator == "SCT"
    assert STRUCTURE_CODES["head"].value == HEAD
    assert STRUCTURE_CODES["cerebellum"].value == CEREBELLUM
    assert STRUCTURE_CODES["lateral ventricles"].value == LATERAL_VENTRICLE
    for side in ("right", "left"):
        assert STRUCTURE_CODES[f"{side} cerebral hemisphere"].value == CEREBRAL_HEMISPHERE
    assert {k: v.value for k, v in STRUCTURE_LATERALITY.items()} == {
        k: v for k, v in SIDE.items() if v is not None}


def test_lesion_coding_follows_the_named_kind() -> None:
    def coded(structure: str, kind: str | None) -> tuple[str, str | None, str | None]:
        c = segment_coding(Segment(10, "x", structure, "lesion", kind))
        assert c.anatomic_region is not None
        return (c.type.value, c.anatomic_region.value,
                c.laterality.value if c.laterality else None)

    assert coded("cerebellum", "mass") == (MASS, CEREBELLUM, None)
    assert coded("cerebellum", "cyst") == (CYST, CEREBELLUM, None)
    assert coded("right cerebral hemisphere", None) == (LESION, CEREBRAL_HEMISPHERE, RIGHT)
    assert coded("left cerebral hemisphere", "cyst") == (CYST, CEREBRAL_HEMISPHERE, LEFT)
    # chest-abdomen: the site's own kind, with or without lesion_kind; no laterality
    assert coded("right lung", None) == ("27925004", "3341006", None)
    assert coded("right lung", "nodule") == ("27925004", "3341006", None)
    assert coded("liver", None) == (LESION, "10200004", None)
    with pytest.raises(ReportError, match="holds no lesion of kind"):
        segment_coding(Segment(10, "x", "cerebellum", "lesion", "nodule"))
    with pytest.raises(ReportError, match="unknown lesion kind"):
        segment_coding(Segment(10, "x", "cerebellum", "lesion", "tumour"))


@pytest.mark.parametrize(
    ("question", "structure", "category", "kind", "region", "side"),
    [
        ("segment the lesions in the cerebellum .", "cerebellum", "49755003", LESION,
         CEREBELLUM, None),
        ("segment the left cerebral hemisphere .", "left cerebral hemisphere", "91723000",
         CEREBRAL_HEMISPHERE, None, LEFT),
        ("segment the right cerebral hemisphere .", "right cerebral hemisphere", "91723000",
         CEREBRAL_HEMISPHERE, None, RIGHT),
        ("Segment the lesions in the left cerebral hemisphere.", "left cerebral hemisphere",
         "49755003", LESION, CEREBRAL_HEMISPHERE, LEFT),
        ("segment the lateral ventricles .", "lateral ventricles", "91723000",
         LATERAL_VENTRICLE, None, BILATERAL),
        ("segment the cerebellum .", "cerebellum", "91723000", CEREBELLUM, None, None),
        ("segment the head .", "head", "91723000", HEAD, None, None),
    ],
)
def test_answer_coding_of_head_questions(question: str, structure: str, category: str,
                                         kind: str, region: str | None,
                                         side: str | None) -> None:
    assert named_structure(question) == structure
    coding = answer_coding(question)
    assert (coding.category.value, coding.type.value) == (category, kind)
    assert (coding.anatomic_region.value if coding.anatomic_region else None) == region
    assert (coding.laterality.value if coding.laterality else None) == side


@needs_dciodvfy
def test_head_seg_codes_laterality(case: tuple[Report, Volume], tmp_path: Path) -> None:
    report, volume = case
    seg = build_seg(report, volume)
    assert seg is not None
    path = _save(seg, tmp_path / "seg.dcm")
    run_dciodvfy(path)
    back = hd.seg.segread(path)
    items = {str(i.SegmentLabel): i for i in back.SegmentSequence}
    assert list(items) == [s.name for s in report.segments]  # labels unchanged

    for side in ("right", "left"):
        item = items[f"{side} cerebral hemisphere"]
        assert _code(item.SegmentedPropertyCategoryCodeSequence) == "91723000"
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert prop.CodeValue == CEREBRAL_HEMISPHERE
        assert _code(prop.SegmentedPropertyTypeModifierCodeSequence) == SIDE[f"{side} "
                                                                             "cerebral hemisphere"]
        assert "AnatomicRegionSequence" not in item
    ventricles = items["lateral ventricles"].SegmentedPropertyTypeCodeSequence[0]
    assert ventricles.CodeValue == LATERAL_VENTRICLE
    assert _code(ventricles.SegmentedPropertyTypeModifierCodeSequence) == BILATERAL
    cerebellum = items["cerebellum"].SegmentedPropertyTypeCodeSequence[0]
    assert cerebellum.CodeValue == CEREBELLUM
    assert "SegmentedPropertyTypeModifierCodeSequence" not in cerebellum

    mass = items["cerebellum mass"]
    assert _code(mass.SegmentedPropertyCategoryCodeSequence) == "49755003"
    assert _code(mass.SegmentedPropertyTypeCodeSequence) == MASS
    assert _code(mass.AnatomicRegionSequence) == CEREBELLUM
    assert "AnatomicRegionModifierSequence" not in mass.AnatomicRegionSequence[0]
    lesions = items["left cerebral hemisphere lesions"]
    assert _code(lesions.SegmentedPropertyTypeCodeSequence) == LESION
    assert "SegmentedPropertyTypeModifierCodeSequence" not in (
        lesions.SegmentedPropertyTypeCodeSequence[0])
    region = lesions.AnatomicRegionSequence[0]
    assert region.CodeValue == CEREBRAL_HEMISPHERE
    assert region.AnatomicRegionModifierSequence[0].CodeValue == LEFT
    assert region.AnatomicRegionModifierSequence[0].CodingSchemeDesignator == "SCT"

    # highdicom reads its own descriptions back, modifiers and all
    desc = back.get_segment_description(segment_numbers(report)[STRUCTURE_LABELS[
        "left cerebral hemisphere"]])
    assert desc.segmented_property_type.value == CEREBRAL_HEMISPHERE
    # and the voxels survive
    uids = [s.sop_instance_uid for s in volume.slices]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False)
    for label, number in segment_numbers(report).items():
        np.testing.assert_array_equal(pixels == number, report.label_map == label)


@needs_dciodvfy
def test_head_answer_seg_codes_laterality(case: tuple[Report, Volume], tmp_path: Path) -> None:
    report, volume = case
    seg = build_answer_seg(report, volume)
    assert seg is not None
    run_dciodvfy(_save(seg, tmp_path / "qseg.dcm"))
    hemisphere, lesions = seg.SegmentSequence
    prop = hemisphere.SegmentedPropertyTypeCodeSequence[0]
    assert prop.CodeValue == CEREBRAL_HEMISPHERE
    assert _code(prop.SegmentedPropertyTypeModifierCodeSequence) == LEFT
    assert _code(lesions.SegmentedPropertyTypeCodeSequence) == LESION
    assert _code(lesions.AnatomicRegionSequence) == CEREBELLUM


@needs_dcmqi
def test_segimage2itkimage_reads_the_head_seg(case: tuple[Report, Volume],
                                              tmp_path: Path) -> None:
    report, volume = case
    seg = build_seg(report, volume)
    assert seg is not None
    out, meta = segimage2itkimage(seg, tmp_path)
    described = {item["SegmentLabel"]: item for group in meta["segmentAttributes"]
                 for item in group}
    numbers = segment_numbers(report)
    assert len(described) == len(numbers)
    left = described["left cerebral hemisphere"]
    assert left["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == CEREBRAL_HEMISPHERE
    assert left["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"] == LEFT
    lesions = described["left cerebral hemisphere lesions"]
    assert lesions["AnatomicRegionSequence"]["CodeValue"] == CEREBRAL_HEMISPHERE
    assert lesions["AnatomicRegionModifierSequence"]["CodeValue"] == LEFT
    inverse = np.linalg.inv(volume.affine)
    for seg_ in report.segments:
        number = numbers[seg_.label]
        assert int(described[seg_.name]["labelID"]) == number
        data, affine = read_nrrd(out / f"{number}.nrrd")
        ours = np.asarray(report.label_map) == seg_.label
        theirs = np.argwhere(data != 0)
        assert len(theirs) == int(ours.sum()), seg_.name
        lps = theirs @ affine[:3, :3].T + affine[:3, 3]
        index = np.rint(lps @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        assert ours[index[:, 0], index[:, 1], index[:, 2]].all(), seg_.name


def _finding_sites(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    items = hd.sr.utils.find_content_items(sr, value_type=hd.sr.ValueTypeValues.CODE,
                                           recursive=True)
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == "363698007"]


def _laterality(site: pydicom.Dataset) -> str | None:
    mods = [i for i in site.get("ContentSequence", [])
            if i.ConceptNameCodeSequence[0].CodeValue == LATERALITY]
    assert len(mods) <= 1
    if not mods:
        return None
    assert mods[0].RelationshipType == "HAS CONCEPT MOD"
    return str(mods[0].ConceptCodeSequence[0].CodeValue)


@needs_dciodvfy
@needs_dsrdump
def test_head_sr_keeps_the_side(case: tuple[Report, Volume], tmp_path: Path) -> None:
    report, volume = case
    seg = build_seg(report, volume)
    answer_seg = build_answer_seg(report, volume)
    assert seg is not None and answer_seg is not None
    path = _save(build_sr(report, volume, seg=seg, answer_seg=answer_seg), tmp_path / "sr.dcm")
    run_dciodvfy(path)
    dump = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    assert "Left cerebral hemisphere: one mass and one cyst." in dump.stdout

    sites = _finding_sites(hd.sr.srread(path))
    assert len(sites) == len(report.findings)
    for site, finding in zip(sites, report.findings, strict=True):
        assert site.ConceptCodeSequence[0].CodeValue == STRUCTURE_CODES[finding.structure].value
        assert _laterality(site) == SIDE[finding.structure], finding.text


@needs_dciodvfy
@needs_dsrdump
def test_head_measurement_sr(case: tuple[Report, Volume], tmp_path: Path) -> None:
    report, volume = case
    seg = build_seg(report, volume)
    assert seg is not None
    sr = build_measurement_sr(report, volume, seg)
    assert sr is not None
    path = _save(sr, tmp_path / "m.dcm")
    run_dciodvfy(path)
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout

    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    measured = [f for f in report.findings if f.segment is not None]
    assert len(groups) == len(measured) == 2
    expected = {"cerebellum": (MASS, CEREBELLUM, None),
                "left cerebral hemisphere": (LESION, CEREBRAL_HEMISPHERE, LEFT)}
    for group, finding in zip(groups, measured, strict=True):
        site = group.finding_sites[0]
        laterality = site.laterality
        assert (group.finding_type.value, site.value.value,
                laterality.value if laterality else None) == expected[finding.structure]


@needs_dcmqi
def test_tid1500reader_reads_the_head_measurements(case: tuple[Report, Volume],
                                                   tmp_path: Path) -> None:
    report, volume = case
    seg = build_seg(report, volume)
    assert seg is not None
    sr = build_measurement_sr(report, volume, seg)
    assert sr is not None
    path = _save(sr, tmp_path / "meas.dcm")
    assert TID1500READER is not None
    proc = subprocess.run([str(TID1500READER), "--inputDICOM", str(path),
                           "--outputMetadata", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = json.loads((tmp_path / "m.json").read_text())["Measurements"]
    measured = [f for f in report.findings if f.segment is not None]
    expected = {"cerebellum": (MASS, CEREBELLUM, None),
                "left cerebral hemisphere": (LESION, CEREBRAL_HEMISPHERE, LEFT)}
    assert [(g["Finding"]["CodeValue"], g["FindingSite"]["CodeValue"],
             g.get("Laterality", {}).get("CodeValue")) for g in groups] == [
        expected[f.structure] for f in measured]


def test_a_head_models_series_say_what_it_reads(case: tuple[Report, Volume]) -> None:
    """Two models in one study write two segmentations: their descriptions tell them apart."""
    import dataclasses

    from tomoscribe.writers import identity
    from tomoscribe.writers.pdf import build_pdf_report

    report, volume = case
    for reads, suffix in (("", ""), ("MR of the head", " (MR of the head)")):
        rep = dataclasses.replace(report, reads=reads)
        seg, answer_seg = build_seg(rep, volume), build_answer_seg(rep, volume)
        assert seg is not None and answer_seg is not None
        built = {identity.SEG_SERIES_DESCRIPTION: seg,
                 identity.ANSWERS_SERIES_DESCRIPTION: answer_seg,
                 identity.SR_SERIES_DESCRIPTION: build_sr(rep, volume, seg=seg,
                                                          answer_seg=answer_seg),
                 identity.MEASUREMENTS_SERIES_DESCRIPTION: build_measurement_sr(rep, volume, seg),
                 identity.PDF_SERIES_DESCRIPTION: build_pdf_report(rep, volume)}
        for base, ds in built.items():
            assert ds is not None
            assert ds.SeriesDescription == base + suffix
            assert identity.is_tomoscribe_output(ds)
