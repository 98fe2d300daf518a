"""tomoscribe's settings: the ``tomoscribe:`` section of ``app.yaml``.

``app.yaml`` is a MONAI Deploy application manifest (``application:``,
``resources:``) with one more section::

    tomoscribe:
      selection: {selections: [...]}     # rules for tomoscribe.dicomio.select_series
      model: default                     # a name, a folder (relative to this file), or a list
      questions: []                      # standing questions, answered in every report
      outputs: {sr: true, seg: true, measurements: true, pdf: true}

:func:`load_settings` reads and checks such a file; with no file it returns
:func:`default_settings`, which equal the ``app.yaml`` at the top of the
repository (a test keeps the two in step), so an installed package needs no
data file.

``model:`` names the model: ``default`` (shipped in ``tomoscribe/weights/``),
the name of another packaged model (``head-mr``: the head MR model in
``tomoscribe/weights-head-mr/``), or a folder. A list names
several models, each run on the series in its own scope
(:func:`operators.app.run_app`)::

    model: [default, head-mr]            # CT of the chest-abdomen, MR of the head
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tomoscribe.errors import TomoscribeError

#: keys of the ``tomoscribe:`` section
SECTION_KEYS = ("selection", "model", "questions", "outputs")
OUTPUT_KEYS = ("sr", "seg", "measurements", "pdf")


class ConfigError(TomoscribeError):
    """The settings file is unreadable or holds a bad setting."""


@dataclass(frozen=True)
class Outputs:
    """Which DICOM objects to write.

    Attributes:
        sr: the draft report (Comprehensive SR).
        seg: the segmentation.
        measurements: the TID 1500 measurement SR (only when a finding has a
            segment).
        pdf: the Encapsulated PDF report.
    """

    sr: bool = True
    seg: bool = True
    measurements: bool = True
    pdf: bool = True


@dataclass(frozen=True)
class Settings:
    """Checked settings of one application.

    Attributes:
        selection: series selection rules (the dict :func:`select_series` takes).
        models: the model folders, in the order they run (at least one, no
            folder twice); ``None`` means the default model.
        questions: standing questions answered in every report.
        outputs: which objects to write.
        source: the file they came from (``None``: built-in defaults).
    """

    selection: dict[str, Any]
    models: tuple[Path | None, ...] = (None,)
    questions: tuple[str, ...] = ()
    outputs: Outputs = field(default_factory=Outputs)
    source: Path | None = None

    @property
    def model(self) -> Path | None:
        """The first model's folder (the only one, with one model); ``None``: the default."""
        return self.models[0]


def default_settings() -> Settings:
    """The built-in settings (equal to the shipped ``app.yaml``)."""
    from tomoscribe.dicomio import DEFAULT_RULES

    return Settings(selection=copy.deepcopy(DEFAULT_RULES))


def _where(source: Path | None) -> str:
    return f"{source}: " if source is not None else ""


def _check_selection(value: Any, where: str) -> dict[str, Any]:
    from tomoscribe.dicomio import StudyIndex, select_series
    from tomoscribe.dicomio.select import RulesError
    from tomoscribe.errors import NoSeriesError

    if not isinstance(value, dict):
        raise ConfigError(f"{where}tomoscribe.selection must be a mapping with a 'selections' list")
    try:  # the rules are checked before the (empty) index is looked at
        select_series(StudyIndex(root=Path(".")), value)
    except RulesError as exc:
        raise ConfigError(f"{where}tomoscribe.selection: {exc}") from exc
    except NoSeriesError:
        pass
    return copy.deepcopy(value)


def _check_model(value: Any, source: Path | None, where: str) -> tuple[Path | None, ...]:
    """``model:``: a name, a folder, or a non-empty list of them (no model twice)."""
    from tomoscribe.errors import ModelError
    from tomoscribe.scope import first_repeat, resolve_model

    if value is None:
        return (None,)
    shape = "a model name ('default'), a folder path, or a list of them"
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}tomoscribe.model: the list names no model")
        items, labels = value, [f"tomoscribe.model item {i}" for i in range(1, len(value) + 1)]
    else:
        items, labels = [value], ["tomoscribe.model"]
    out: list[Path | None] = []
    for item, label in zip(items, labels, strict=True):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{where}{label} must be {shape}")
        try:
            out.append(resolve_model(item, source.parent if source is not None else None))
        except ModelError as exc:
            raise ConfigError(f"{where}{label}: {exc}") from exc
    if (repeat := first_repeat(out)) is not None:
        i, j = repeat
        raise ConfigError(f"{where}{labels[j]}: {items[j].strip()!r} is the same model as "
                          f"{items[i].strip()!r}; list each model once")
    return tuple(out)


def _check_questions(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where}tomoscribe.questions must be a list of strings")
    out = []
    for i, q in enumerate(value, start=1):
        if not isinstance(q, str) or not q.strip():
            raise ConfigError(f"{where}tomoscribe.questions item {i} must be a non-empty string")
        out.append(" ".join(q.split()))
    return tuple(out)


def _check_outputs(value: Any, where: str) -> Outputs:
    if value is None:
        return Outputs()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}tomoscribe.outputs must be a mapping (sr: true, seg: true)")
    unknown = sorted(str(k) for k in value if k not in OUTPUT_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}tomoscribe.outputs: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(OUTPUT_KEYS)}"
        )
    flags = {}
    for key in OUTPUT_KEYS:
        flag = value.get(key, True)
        if not isinstance(flag, bool):
            raise ConfigError(f"{where}tomoscribe.outputs.{key} must be true or false")
        flags[key] = flag
    if not (flags["sr"] or flags["seg"]):  # measurements and PDF accompany them
        raise ConfigError(f"{where}tomoscribe.outputs: at least one of sr, seg must be true")
    return Outputs(**flags)


def parse_settings(data: Any, source: Path | None = None) -> Settings:
    """Check a loaded manifest (the whole ``app.yaml`` mapping).

    A manifest without a ``tomoscribe:`` section gets the default settings;
    keys missing from the section get their defaults.

    Raises:
        ConfigError: a one-line reason naming the bad setting.
    """
    where = _where(source)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}the settings file must hold a mapping at the top level")
    section = data.get("tomoscribe")
    defaults = default_settings()
    if section is None:
        return Settings(defaults.selection, source=source)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}the 'tomoscribe' section must be a mapping")
    unknown = sorted(str(k) for k in section if k not in SECTION_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}tomoscribe: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(SECTION_KEYS)}"
        )
    selection = (
        _check_selection(section["selection"], where)
        if section.get("selection") is not None
        else defaults.selection
    )
    return Settings(
        selection=selection,
        models=_check_model(section.get("model"), source, where),
        questions=_check_questions(section.get("questions"), where),
        outputs=_check_outputs(section.get("outputs"), where),
        source=source,
    )


def load_settings(path: Path | str | None = None) -> Settings:
    """Read and check a settings file (``None``: the built-in defaults).

    Raises:
        ConfigError: the file is missing, not YAML, or holds a bad setting.
    """
    if path is None:
        return default_settings()
    import yaml

    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"settings file {source} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {source}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: not valid YAML{at}: {problem}") from exc
    return parse_settings(data, source.resolve())
