"""Settings: the shipped app.yaml, the built-in defaults, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import tomoscribe
from tomoscribe.config import (
    ConfigError,
    Outputs,
    default_settings,
    load_settings,
    parse_settings,
)
from tomoscribe.dicomio import DEFAULT_RULES

APP_YAML = Path(__file__).resolve().parent.parent / "app.yaml"


def test_shipped_app_yaml_equals_builtin_defaults() -> None:
    shipped = load_settings(APP_YAML)
    builtin = default_settings()
    assert shipped.selection == builtin.selection == DEFAULT_RULES
    assert shipped.model == builtin.model is None
    assert shipped.models == builtin.models == (None,)
    assert shipped.questions == builtin.questions
    assert shipped.outputs == builtin.outputs == Outputs(sr=True, seg=True)
    assert shipped.source == APP_YAML and builtin.source is None


def test_app_yaml_is_a_monai_deploy_manifest() -> None:
    data = yaml.safe_load(APP_YAML.read_text())
    app = data["application"]
    assert app["title"] and str(app["version"]) == tomoscribe.__version__
    assert app["inputFormats"] == ["file"] and app["outputFormats"] == ["file"]
    assert {"cpu", "gpu", "memory"} <= set(data["resources"])


def test_defaults_are_copies() -> None:
    a = default_settings()
    a.selection["selections"][0]["min_slices"] = 1
    assert default_settings().selection == DEFAULT_RULES
    assert DEFAULT_RULES["selections"][0]["min_slices"] != 1


def test_settings_from_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        "tomoscribe:\n"
        "  selection:\n"
        "    selections:\n"
        "      - name: thin MR\n"
        "        conditions: {Modality: MR, SliceThickness: [0, 3]}\n"
        "        min_slices: 20\n"
        "  model: weights/v2\n"
        "  questions: ['is there a lesion in the liver ?', '  any  nodule ? ']\n"
        "  outputs: {seg: false}\n"
    )
    s = load_settings(path)
    assert s.selection["selections"][0]["conditions"]["Modality"] == "MR"
    assert s.model == tmp_path.resolve() / "weights" / "v2"  # relative to the file
    assert s.models == (s.model,)
    assert s.questions == ("is there a lesion in the liver ?", "any nodule ?")
    assert s.outputs == Outputs(sr=True, seg=False)


def test_manifest_without_tomoscribe_section_gets_defaults(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text("application: {title: x}\n")
    s = load_settings(path)
    assert s.selection == DEFAULT_RULES and s.outputs == Outputs()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"modell": "x"}, r"unknown key\(s\) modell"),
        ({"selection": ["CT"]}, r"tomoscribe\.selection must be a mapping"),
        ({"selection": {"selections": []}}, r"non-empty 'selections' list"),
        ({"selection": {"selections": [{"name": "a", "prefered": ["axial"]}]}},
         r"unknown key\(s\) prefered"),
        ({"selection": {"selections": [{"prefer": ["biggest"]}]}}, r"biggest"),
        ({"model": 3}, r"tomoscribe\.model must be"),
        ({"model": []}, r"tomoscribe\.model: the list names no model"),
        ({"model": ["default", 3]}, r"tomoscribe\.model item 2 must be a model name"),
        ({"model": ["default", "/opt/m", "default"]},
         r"item 3: 'default' is the same model as 'default'; list each model once"),
        ({"questions": "why?"}, r"questions must be a list"),
        ({"questions": ["ok", ""]}, r"questions item 2"),
        ({"outputs": {"sr": "yes"}}, r"outputs\.sr must be true or false"),
        ({"outputs": {"kos": True}}, r"unknown key\(s\) kos"),
        ({"outputs": {"sr": False, "seg": False}}, r"at least one of sr, seg"),
    ],
)
def test_bad_settings_give_one_line(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_settings({"tomoscribe": section}, Path("/etc/site.yaml"))
    text = str(info.value)
    assert "\n" not in text and text.startswith("/etc/site.yaml: ")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tomoscribe:\n  outputs: {sr: true\n  model: x\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+") as info:
        load_settings(bad)
    assert "\n" not in str(info.value)
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_settings(top)


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in package folder holding a packaged model ``head-mr``."""
    folder = tmp_path / "package"
    (folder / "weights-head-mr").mkdir(parents=True)
    monkeypatch.setattr("tomoscribe.scope.PACKAGE_DIR", folder)
    return folder


def _model(value: object, source: Path) -> tuple[Path | None, ...]:
    return parse_settings({"tomoscribe": {"model": value}}, source).models


def test_model_by_name_folder_or_list(package: Path, tmp_path: Path) -> None:
    source = tmp_path / "site" / "app.yaml"
    head = package / "weights-head-mr"
    assert _model("default", source) == (None,)
    assert _model("head-mr", source) == (head,)
    assert _model("models/ct", source) == (tmp_path / "site" / "models" / "ct",)
    assert _model("/abs/ct", source) == (Path("/abs/ct"),)
    assert _model(["default", "head-mr"], source) == (None, head)
    assert _model(["head-mr", "default", "./head-mr"], source) == (  # order kept
        head, None, tmp_path / "site" / "head-mr")
    (tmp_path / "site" / "mine").mkdir(parents=True)  # a folder named by one word, as before
    assert _model(["mine"], source) == (tmp_path / "site" / "mine",)
    s = parse_settings({"tomoscribe": {"model": ["head-mr", "default"]}}, source)
    assert s.model == head  # the first one, for code that reads one model


def test_an_unknown_model_name_is_one_line_listing_the_names(package: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"tomoscribe": {"model": ["default", "head-ct"]}}, Path("/etc/site.yaml"))
    assert str(info.value) == (
        "/etc/site.yaml: tomoscribe.model item 2: no model named 'head-ct': the packaged "
        "models are default, head-mr, and there is no folder /etc/head-ct")


def test_a_model_named_twice_is_refused(package: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'head-mr' is the same model as 'weights-head-mr'"):
        parse_settings({"tomoscribe": {"model": ["weights-head-mr", "head-mr"]}},
                       package / "app.yaml")


def test_model_list_in_a_file(package: Path, tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text("tomoscribe:\n  model:\n    - default\n    - head-mr\n")
    assert load_settings(path).models == (None, package / "weights-head-mr")
