"""The model's declared scope: what it reads, and the series selection that enforces it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tomoscribe.dicomio import scan_folder, select_series
from tomoscribe.dicomio.synth import write_series
from tomoscribe.errors import ModelError, NoSeriesError, OutOfScopeError
from tomoscribe.scope import (
    CHEST_ABDOMEN_CT,
    DEFAULT_MODEL_DIR,
    DEFINED_BODY_PARTS,
    HEAD_MR,
    CombinedScope,
    ModelScope,
    model_label,
    model_labels,
    normalize_body_part,
    packaged_models,
    read_model_version,
    read_scope,
    resolve_model,
)


def test_the_shipped_model_declares_chest_abdomen_ct() -> None:
    scope = read_scope(None)
    assert scope == read_scope(DEFAULT_MODEL_DIR) == CHEST_ABDOMEN_CT
    assert scope.declared and scope.modalities == ("CT",)
    assert set(scope.body_parts) <= DEFINED_BODY_PARTS  # every accepted value is a real term


@pytest.mark.parametrize(
    ("modality", "body_part", "refused"),
    [
        ("CT", "", None),  # optional attribute absent: read
        ("CT", "CHEST", None),
        ("ct", "Chest/Abdomen", None),  # normalised to CHESTABDOMEN
        ("CT", "CAP", None),  # site text, not a defined term: read
        ("CT", "HEAD", "not Body Part Examined HEAD"),
        ("CT", "knee", "not Body Part Examined KNEE"),
        ("MR", "ABDOMEN", "not MR"),
        ("", "CHEST", "not a series without Modality"),
    ],
)
def test_refusal(modality: str, body_part: str, refused: str | None) -> None:
    why = CHEST_ABDOMEN_CT.refusal(modality, body_part)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why
        assert why.startswith("the model reads CT of the chest and abdomen, ")


def test_an_undeclared_scope_reads_anything() -> None:
    scope = ModelScope.from_dict(None)
    assert not scope.declared
    assert scope.refusal("MR", "HEAD") is None


def test_round_trip_and_normalisation() -> None:
    scope = ModelScope.from_dict(
        {"description": "MR of the head", "modalities": ["mr"], "body_parts": ["Head", "brain"]}
    )
    assert scope.modalities == ("MR",) and scope.body_parts == ("HEAD", "BRAIN")
    assert ModelScope.from_dict(scope.to_dict()) == scope
    assert normalize_body_part(" chest-abdomen ") == "CHESTABDOMEN"


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ("{oops", "not readable JSON"),
        ('["a list"]', "not a JSON object"),
        ('{"scope": "CT"}', "'scope' must be a mapping"),
        ('{"scope": {"modalities": "CT"}}', "'scope.modalities' must be a list of strings"),
    ],
)
def test_malformed_scope_is_a_model_error(tmp_path: Path, conf: str, message: str) -> None:
    (tmp_path / "config.json").write_text(conf)
    with pytest.raises(ModelError, match=message) as err:
        read_scope(tmp_path)
    assert "\n" not in str(err.value)


def test_a_folder_without_config_declares_nothing(tmp_path: Path) -> None:
    assert read_scope(tmp_path) == ModelScope()


def _study(root: Path, body_part: str = "") -> Path:
    """A study with an MR series (8 slices) and a CT series (10 slices), one UID."""
    mr = write_series(root / "mr", n=8, modality="MR", slope=1.0, intercept=0.0, spacing=1.0,
                      study_uid="1.2.826.0.1.3680043.10.54321.1", description="MR T1")
    ct = write_series(root / "ct", n=10, study_uid="1.2.826.0.1.3680043.10.54321.1",
                      series_number=3, description="CT AX")
    assert mr and ct
    if body_part:
        for path in ct:
            ds = pydicom.dcmread(path)
            ds.BodyPartExamined = body_part
            ds.save_as(path)
    return root


def test_selection_skips_series_outside_the_scope(tmp_path: Path) -> None:
    """Without a scope the MR (preferred: thinner) wins; with it the CT is read."""
    index = scan_folder(_study(tmp_path))
    assert select_series(index, None).chosen.modality == "MR"
    selection = select_series(index, None, CHEST_ABDOMEN_CT)
    assert selection.chosen.description == "CT AX"
    mr_line = next(line for line in selection.explanation if "MR T1" in line)
    assert "outside the model's scope: the model reads CT of the chest and abdomen, not MR" in (
        mr_line
    )


def test_selection_refuses_a_study_with_nothing_in_scope(tmp_path: Path) -> None:
    index = scan_folder(_study(tmp_path, body_part="HEAD"))
    with pytest.raises(OutOfScopeError) as err:
        select_series(index, None, CHEST_ABDOMEN_CT)
    message = str(err.value)
    assert isinstance(err.value, NoSeriesError)  # callers that catch "no series" still do
    assert message.startswith("no series the model can read: the model reads CT of the chest")
    assert "2 series seen" in message and "\n" not in message


def test_a_study_with_no_image_series_is_not_called_out_of_scope(tmp_path: Path) -> None:
    write_series(tmp_path, n=3, modality="MR", slope=1.0, intercept=0.0)  # too few slices
    with pytest.raises(NoSeriesError) as err:
        select_series(scan_folder(tmp_path), None, CHEST_ABDOMEN_CT)
    assert not isinstance(err.value, OutOfScopeError)


def test_training_writes_the_scope_and_keeps_a_prior_one(tmp_path: Path) -> None:
    from tomoscribe.model.network import NetConfig, ScribeNet
    from tomoscribe.train import save_model

    net = ScribeNet(NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16)))
    save_model(net, tmp_path / "a", {"version": "t"})
    assert read_scope(tmp_path / "a") == CHEST_ABDOMEN_CT
    mine = {"description": "MR of the head", "modalities": ["MR"], "body_parts": ["HEAD"]}
    save_model(net, tmp_path / "b", {"version": "t", "scope": mine})
    assert json.loads((tmp_path / "b" / "config.json").read_text())["scope"] == mine


# -- the image check --------------------------------------------------------------------


CHEST_FOUND = {"right lung": (1500.0, -850.0), "left lung": (1400.0, -850.0),
               "liver": (1500.0, 60.0), "spleen": (250.0, 50.0),
               "right kidney": (150.0, 35.0), "left kidney": (150.0, 35.0)}


def test_anatomy_of_a_chest_abdomen_ct_passes() -> None:
    assert CHEST_ABDOMEN_CT.anatomy_refusal(CHEST_FOUND) is None
    only_liver = {"liver": (1500.0, 60.0)}  # an abdomen below the lungs
    assert CHEST_ABDOMEN_CT.anatomy_refusal(only_liver) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"right lung": (280.0, -1000.0)}, "right lung (280 ml) has a median of -1000 HU, not "
                                           "-980 to -400 HU"),
        ({"liver": (300.0, -93.0)}, "liver (300 ml) has a median of -93 HU, not -20 to 250 HU"),
        ({"left kidney": (340.0, 892.0)}, "left kidney (340 ml) has a median of 892 HU"),
    ],
)
def test_anatomy_out_of_range_is_refused(change: dict[str, tuple[float, float]],
                                         message: str) -> None:
    why = CHEST_ABDOMEN_CT.anatomy_refusal({**CHEST_FOUND, **change})
    assert why is not None and message in why
    assert why.startswith("the image does not look like CT of the chest and abdomen: ")


def test_small_structures_are_not_judged_and_nothing_found_is_refused() -> None:
    assert CHEST_ABDOMEN_CT.anatomy_refusal({**CHEST_FOUND, "spleen": (5.0, 900.0)}) is None
    why = CHEST_ABDOMEN_CT.anatomy_refusal({"liver": (5.0, 60.0)})
    assert why is not None and "the model found none of right lung, left lung, liver" in why
    assert ModelScope(modalities=("CT",)).anatomy_refusal({}) is None  # no check declared


@pytest.mark.parametrize(
    ("anatomy", "message"),
    [
        ([1, 2], "'scope.anatomy' must be a mapping"),
        ({"median": {"liver": [250, -20]}}, "'scope.anatomy.median.liver' must be"),
        ({"median": {"liver": ["a", 1]}}, "'scope.anatomy.median.liver' must be"),
        ({"min_ml": -1, "median": {}}, "'scope.anatomy.min_ml'"),
        ({"volume_ml": [1]}, "'scope.anatomy' must be a mapping with 'median' and 'volume_ml'"),
        ({"volume_ml": {"cerebellum": [300, 15]}}, "'scope.anatomy.volume_ml.cerebellum' must"),
    ],
)
def test_malformed_anatomy(anatomy: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelScope.from_dict({"modalities": ["CT"], "anatomy": anatomy})


def test_the_shipped_model_refuses_a_head_ct_without_body_part(tmp_path: Path) -> None:
    """The headers let it through; the model's own segmentation shows it is no chest.

    The product path refuses it from the coarse segmentation, before the
    refiner; read to the end, the full check on the report refuses it too.
    """
    from tomoscribe.dicomio import load_series
    from tomoscribe.model.scribe import Scribe
    from tomoscribe.phantom import make_phantom, write_dicom_series
    from tomoscribe.phantom_head import make_head_phantom, write_head_series

    scribe = Scribe.load(None)
    assert scribe.scope == CHEST_ABDOMEN_CT
    write_head_series(make_head_phantom(2_000_000, modality="CT"), tmp_path / "head",
                      body_part="")
    write_dicom_series(make_phantom(2_000_000), tmp_path / "chest")
    early, full = {}, {}
    for name in ("head", "chest"):
        volume = load_series(select_series(scan_folder(tmp_path / name), None, scribe.scope).chosen)
        try:
            scribe.encode(volume)
            early[name] = "read"
        except OutOfScopeError as err:
            early[name] = str(err)
        report = scribe.generate(scribe.encode(volume, early_refusal=False), [])
        try:
            scribe.check_anatomy(report, volume)
            full[name] = "read"
        except OutOfScopeError as err:
            full[name] = str(err)
    assert early["chest"] == full["chest"] == "read"
    for why in (early["head"], full["head"]):
        assert why.startswith("the image does not look like CT of the chest and abdomen: "), why


def test_the_early_value_check_leaves_room_for_the_refiner(tmp_path: Path) -> None:
    """Medians a little outside the declared ranges wait for the refined check."""
    from tomoscribe.dicomio import load_series
    from tomoscribe.model.preprocess import labels_to_model_grid
    from tomoscribe.model.scribe import EARLY_MEDIAN_MARGIN, Scribe
    from tomoscribe.phantom import make_phantom, write_dicom_series

    scribe = Scribe.load(None)
    write_dicom_series(make_phantom(2_000_001), tmp_path / "chest")
    volume = load_series(select_series(scan_folder(tmp_path / "chest"), None, None).chosen)
    enc = scribe.encode(volume)  # a chest: not refused early
    grid, logits = enc.extra["grid"], enc.seg_logits
    assert scribe.coarse_refusal(logits, grid, volume.spacing, volume.voxels) is None
    labels = logits.argmax(dim=1)[0].numpy()
    values = labels_to_model_grid(volume.voxels, grid)
    label_of = {n: k for k, n in scribe.organ_names.items()}
    # how far each organ's median sits below the top of its range, in range widths
    room = {name: (hi - float(np.median(values[labels == label_of[name]]))) / (hi - lo)
            for name, lo, hi in CHEST_ABDOMEN_CT.anatomy}
    first = min(room, key=lambda n: room[n])  # the first to leave its range as values rise
    _name, lo, hi = next(r for r in CHEST_ABDOMEN_CT.anatomy if r[0] == first)
    for beyond, refused in ((0.5, False), (2.0, True)):
        # every value raised so that the first organ's median is `beyond` margins past the top
        shift = (room[first] + beyond * EARLY_MEDIAN_MARGIN) * (hi - lo)
        why = scribe.coarse_refusal(logits, grid, volume.spacing, volume.voxels + shift)
        assert (why is not None) == refused, (beyond, why)
    assert why is not None and why.endswith(f"not {lo:g} to {hi:g} HU"), why


#: what the head model segmented on head MR test phantom 2000000 (ml, median signal)
HEAD_FOUND = {"right cerebral hemisphere": (454.0, 310.0),
              "left cerebral hemisphere": (449.0, 300.0),
              "cerebellum": (79.0, 280.0), "lateral ventricles": (18.0, 900.0)}


def test_a_head_mr_scope_checks_sizes_not_values() -> None:
    assert HEAD_MR.anatomy_refusal(HEAD_FOUND) is None
    # the head model on a torso (test chest-abdomen phantom 2000000 scaled as an MR)
    torso = {"right cerebral hemisphere": (3216.0, 900.0),
             "left cerebral hemisphere": (5314.0, 800.0),
             "cerebellum": (28.0, 500.0), "lateral ventricles": (17.0, 100.0)}
    why = HEAD_MR.anatomy_refusal(torso)
    assert why == ("the image does not look like MR of the head: what the model took for the "
                   "right cerebral hemisphere is 3216 ml, not 100 to 1100 ml")
    # a slab that misses the posterior fossa: what is not found is not judged
    slab = {k: v for k, v in HEAD_FOUND.items() if k != "cerebellum"}
    assert HEAD_MR.anatomy_refusal(slab) is None
    assert HEAD_MR.anatomy_refusal({**HEAD_FOUND, "cerebellum": (400.0, 1.0)}) is not None
    why = HEAD_MR.anatomy_refusal({"lateral ventricles": (30.0, 1.0)})
    assert why is not None and "found none of right cerebral hemisphere, left cerebral" in why


def test_volume_ranges_round_trip_through_config() -> None:
    conf = HEAD_MR.to_dict()
    assert conf["anatomy"] == {"min_ml": 20.0, "volume_ml": {
        "right cerebral hemisphere": [100.0, 1100.0], "left cerebral hemisphere": [100.0, 1100.0],
        "cerebellum": [15.0, 300.0]}}
    assert ModelScope.from_dict(json.loads(json.dumps(conf))) == HEAD_MR
    assert "volume_ml" not in CHEST_ABDOMEN_CT.to_dict()["anatomy"]
    assert ModelScope.from_dict(CHEST_ABDOMEN_CT.to_dict()) == CHEST_ABDOMEN_CT


# ---------------------------------------------------------------- models by name


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in package folder with a packaged model ``head-mr`` (and a stray file)."""
    folder = tmp_path / "package"
    (folder / "weights-head-mr").mkdir(parents=True)
    (folder / "weights-notes.txt").write_text("not a folder: no model")
    monkeypatch.setattr("tomoscribe.scope.PACKAGE_DIR", folder)
    return folder


def test_packaged_models_are_default_and_each_weights_folder(package: Path) -> None:
    assert packaged_models() == {"default": DEFAULT_MODEL_DIR,
                                 "head-mr": package / "weights-head-mr"}


def test_the_installed_package_names_its_default_model() -> None:
    assert next(iter(packaged_models().items())) == ("default", DEFAULT_MODEL_DIR)


def test_names_and_folders_resolve(package: Path, tmp_path: Path) -> None:
    assert resolve_model(None) is None and resolve_model("default") is None
    assert resolve_model(" head-mr ") == package / "weights-head-mr"
    assert resolve_model("sub/model", tmp_path) == tmp_path / "sub" / "model"  # unchecked
    assert resolve_model(Path("head-mr")) == Path("head-mr")  # a Path is always a folder
    (tmp_path / "mine").mkdir()
    assert resolve_model("mine", tmp_path) == tmp_path / "mine"  # a folder given as one word
    with pytest.raises(ModelError) as info:
        resolve_model("head-ct", tmp_path)
    assert str(info.value) == (f"no model named 'head-ct': the packaged models are default, "
                               f"head-mr, and there is no folder {tmp_path / 'head-ct'}")


def test_labels_and_versions(package: Path, tmp_path: Path) -> None:
    assert model_label(None) == "default" and model_label(DEFAULT_MODEL_DIR) == "default"
    assert model_label(package / "weights-head-mr") == "head-mr"
    assert model_label(tmp_path / "a" / "model") == "model"
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    assert model_labels([None, a, b]) == ["default", str(a), str(b)]
    assert read_model_version(None) == json.loads(
        (DEFAULT_MODEL_DIR / "config.json").read_text())["version"]
    assert read_model_version(a) is None  # no config.json
    a.mkdir(parents=True)
    (a / "config.json").write_text("{}")
    assert read_model_version(a) == "0"  # as Scribe.load reads it


def test_a_combined_scope_reads_what_any_model_reads() -> None:
    both = CombinedScope((("default", CHEST_ABDOMEN_CT), ("head-mr", HEAD_MR)))
    assert both.declared and both.modalities == ("CT", "MR")
    assert both.refusal("CT", "CHEST") is None and both.refusal("MR", "HEAD") is None
    assert both.refusal("MR", "") is None  # the head model reads an MR without Body Part
    assert both.refusal("CT", "HEAD") == (
        "default: the model reads CT of the chest and abdomen, not Body Part Examined HEAD; "
        "head-mr: the model reads MR of the head, not CT")
    assert both.what() == "CT of the chest and abdomen (default) or MR of the head (head-mr)"
    anything = CombinedScope((("default", CHEST_ABDOMEN_CT), ("theirs", ModelScope())))
    assert not anything.declared and anything.modalities == ()
    assert anything.refusal("US") is None
