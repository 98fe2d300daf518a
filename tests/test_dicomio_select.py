"""select_series: MONAI Deploy rule grammar plus our keys, with reasons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from tomoscribe.dicomio import DEFAULT_RULES, RulesError, scan_folder, select_series
from tomoscribe.dicomio.scan import StudyIndex
from tomoscribe.dicomio.synth import CORONAL, SAGITTAL, write_series, write_sr
from tomoscribe.errors import NoSeriesError


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyIndex:
    """A CT study: localizer, thick axial (5 mm), thin axial (1 mm), coronal MPR, an SR."""
    root = tmp_path_factory.mktemp("study")
    uid = generate_uid()
    write_series(
        root / "loc",
        n=3,
        study_uid=uid,
        series_number=1,
        description="Scout",
        orientation=SAGITTAL,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    write_series(
        root / "thick", n=10, spacing=5.0, study_uid=uid, series_number=2, description="AX 5mm"
    )
    write_series(
        root / "thin",
        n=40,
        spacing=1.0,
        rows=16,
        columns=16,
        study_uid=uid,
        series_number=3,
        description="AX 1mm",
    )
    write_series(
        root / "cor",
        n=30,
        spacing=2.0,
        orientation=CORONAL,
        study_uid=uid,
        series_number=4,
        description="COR MPR",
        image_type=("DERIVED", "SECONDARY", "REFORMATTED"),
    )
    write_sr(root / "sr.dcm", study_uid=uid)
    return scan_folder(root)


def _by_desc(index: StudyIndex, desc: str) -> str:
    return next(s.uid for s in index.series if s.description == desc)


def test_default_rules_pick_thin_axial(study: StudyIndex) -> None:
    sel = select_series(study)
    assert sel.chosen.description == "AX 1mm"
    assert len(sel.explanation) == len(study.series) == 5
    text = "\n".join(sel.explanation)
    assert "LOCALIZER" in text
    assert "DERIVED" in text
    assert "Comprehensive SR not an image" in text
    assert "thinnest" in text  # why the 5 mm series lost
    chosen_line = next(line for line in sel.explanation if line.startswith(sel.chosen.uid))
    assert "chosen" in chosen_line and "not chosen" not in chosen_line


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [
        (["thinnest"], "AX 1mm"),
        (["thickest"], "AX 5mm"),
        (["most_slices"], "AX 1mm"),
        (["fewest_slices"], "AX 5mm"),
        (["lowest_series_number"], "AX 5mm"),
        (["highest_series_number"], "AX 1mm"),
    ],
)
def test_prefer_keys(study: StudyIndex, prefer: list[str], expected: str) -> None:
    rules = {"selections": [{"name": "ct", "conditions": {"Modality": "CT"}, "prefer": prefer}]}
    assert select_series(study, rules).chosen.description == expected


def test_own_keys_can_admit_derived_and_prefer_coronal(study: StudyIndex) -> None:
    rules = {
        "selections": [
            {
                "name": "any",
                "conditions": {},
                "exclude_image_types": ["LOCALIZER"],
                "prefer": ["coronal"],
            }
        ]
    }
    assert select_series(study, rules).chosen.description == "COR MPR"


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"Modality": "(?i)ct", "SliceThickness": [0.5, 2]}, "AX 1mm"),
        ({"SliceThickness": [2, ">"]}, "AX 5mm"),
        ({"SliceThickness": [5, "<"]}, "AX 1mm"),
        ({"SliceThickness": 5}, "AX 5mm"),
        ({"SliceThickness": "5(\\.0*)?"}, "AX 5mm"),
        ({"SeriesDescription": "5mm"}, "AX 5mm"),
        ({"SeriesDescription": "!5mm"}, "AX 1mm"),
        ({"SeriesDescription": ["nothing", "(?i)^ax 5"]}, "AX 5mm"),
        ({"ImageType": ["PRIMARY", "ORIGINAL"], "Rows": 32}, "AX 5mm"),
        ({"ImageType": ["primary", "!AXIAL"]}, None),
        ({"ImageOrientationPatient": "Axial", "StudyDescription": "(?i)SYNTHETIC"}, "AX 1mm"),
        ({"PixelSpacing": [0.6, 0.9]}, "AX 1mm"),
        ({"PixelSpacing": [0.75, 0.9]}, None),  # column spacing 0.7 is out of range
        ({"Modality": "MR"}, None),
        ({"BodyPartExamined": "CHEST"}, None),  # missing attribute never matches
        ({"SliceThickness": None, "Modality": ""}, "AX 1mm"),  # empty conditions ignored
    ],
)
def test_monai_condition_grammar(
    study: StudyIndex, conditions: dict[str, Any], expected: str | None
) -> None:
    rules = {"selections": [{"name": "r", "conditions": conditions}]}
    if expected is None:
        with pytest.raises(NoSeriesError):
            select_series(study, rules)
    else:
        assert select_series(study, rules).chosen.description == expected


def test_first_matching_selection_wins(study: StudyIndex) -> None:
    rules = {
        "selections": [
            {"name": "MR first", "conditions": {"Modality": "MR"}},
            {"name": "thick CT", "conditions": {"SliceThickness": [4, 6]}},
            {"name": "any CT", "conditions": {"Modality": "CT"}},
        ]
    }
    sel = select_series(study, rules)
    assert sel.selection_name == "thick CT"
    assert sel.chosen.description == "AX 5mm"


def test_top_level_defaults(study: StudyIndex) -> None:
    rules = {"prefer": ["thickest"], "selections": [{"name": "ct", "conditions": {}}]}
    assert select_series(study, rules).chosen.description == "AX 5mm"
    rules = {"min_slices": 20, "selections": [{"name": "ct", "conditions": {}}]}
    assert select_series(study, rules).chosen.description == "AX 1mm"


def test_only_sr_is_no_series_error(tmp_path: Path) -> None:
    write_sr(tmp_path / "report.dcm")
    index = scan_folder(tmp_path)
    with pytest.raises(NoSeriesError) as err:
        select_series(index, DEFAULT_RULES)
    msg = str(err.value)
    assert msg.startswith("no series qualifies: 1 series seen;")
    assert "(SR): SOP class Comprehensive SR not an image" in msg
    assert "\n" not in msg


def test_geometry_problem_is_a_reason(tmp_path: Path) -> None:
    # 12 slices with one missing: not loadable, so not selectable
    positions = [(0.0, 0.0, 2.0 * k) for k in range(13) if k != 6]
    write_series(tmp_path, positions=positions)
    with pytest.raises(NoSeriesError, match="gap of 4 mm"):
        select_series(scan_folder(tmp_path))
    rules = {"selections": [{"name": "x", "conditions": {}, "check_geometry": False}]}
    assert select_series(scan_folder(tmp_path), rules).chosen.slice_count == 12


def test_real_pydicom_series(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    root = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"  # type: ignore[arg-type]
    index = scan_folder(root)
    with pytest.raises(NoSeriesError) as err:
        select_series(index)
    msg = str(err.value)
    assert "LOCALIZER" in msg and "fewer than 8" in msg and "Computed Radiography" in msg
    sel = select_series(
        index, {"selections": [{"conditions": {"Modality": "CT"}, "min_slices": 2}]}
    )
    # the 4-image brain CT has a 202 mm gap, the scout is a localizer: the 5-slice one wins
    assert sel.chosen.description.startswith("SmartScore")
    assert any("gap of 202 mm" in line for line in sel.explanation)


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ({}, "non-empty 'selections'"),
        ({"selections": [{"conditions": {}, "prefer": ["shiniest"]}]}, "unknown 'prefer'"),
        ({"selections": [{"conditions": {}, "min_slice": 3}]}, "unknown key"),
        ({"selections": [{"conditions": {"SliceThickness": [1, "~"]}}]}, "unknown operator"),
        ({"selections": [{"conditions": {"ImageOrientationPatient": "Up"}}]}, "not Axial"),
        ({"selections": [{"conditions": {"SeriesDescription": "(["}}]}, "bad regular"),
    ],
)
def test_malformed_rules(study: StudyIndex, rules: dict[str, Any], match: str) -> None:
    with pytest.raises(RulesError, match=match):
        select_series(study, rules)
