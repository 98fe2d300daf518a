"""What a model was trained to read, and the check that keeps other studies away from it.

A model trained on CT of the chest and abdomen writes a chest-abdomen report
on whatever it is given: run on a brain MR it would report on a liver that is
not there. So every model folder may declare its scope in ``config.json``::

    "scope": {
      "description": "CT of the chest and abdomen",
      "modalities": ["CT"],
      "body_parts": ["CHEST", "ABDOMEN", "CHESTABDOMEN", ...]
    }

and a series is read only when

- its Modality (0008,0060) is one of ``modalities``, and
- its Body Part Examined (0018,0015), where the header has one and it is a
  DICOM defined term (PS3.16 Annex L, :data:`DEFINED_BODY_PARTS`), is one of
  ``body_parts``. An empty Body Part Examined, or text that is not a defined
  term (sites write "CAP", "THORAX ABD", local words), does not refuse a
  series: the attribute is optional and often site-specific, and a refusal on
  it would keep real chest-abdomen studies from the model. Only a defined term
  that names another region (HEAD, KNEE, PELVIS...) does.

An empty list means "any"; a model folder without ``scope`` (a model brought
from elsewhere before it declared one) reads every CT and MR series, as
before. The series selection (:func:`tomoscribe.dicomio.select_series`), the
Orthanc plugin's event filter and the CLI all use the same check.

Headers can be silent: a head CT without Body Part Examined passes them. So
a scope may also say what the image must show, checked on the model's own
segmentation once it has run::

    "anatomy": {"min_ml": 20,
                "median": {"right lung": [-980, -400], "liver": [-20, 250], ...}}

At least one listed structure must be found (``min_ml`` or more), and each
one found must have a median value in its range (``median``) and a volume
in its range (``volume_ml``). The ranges are physics, not
fitted to phantoms: an aerated lung is between air (-1000 HU) and water, a
liver, spleen or kidney is soft tissue. Run on a head CT, the chest-abdomen
model labels the air around the head "lung" (median -1000 HU) and fat or
bone "liver" or "spleen"; the check turns that into a refusal
(:meth:`ModelScope.anatomy_refusal`) instead of a report.

MR values have no unit, so an MR scope checks sizes instead::

    "anatomy": {"min_ml": 20,
                "volume_ml": {"right cerebral hemisphere": [100, 1100], ...}}

An adult cerebral hemisphere holds about 450-650 ml, a newborn's about 200;
the cerebellum 120-170 ml in an adult, about 30 ml at birth. Run on a torso,
the head model calls 2.6 to 8.2 litres "cerebral hemisphere" (six test
phantoms, values shifted and scaled as an MR's): refused.

Models are named where they are configured (the settings' ``model:``, the
CLI's ``-m``, the plugin's ``ModelDirectory``): ``default`` is the model
shipped in ``tomoscribe/weights/``, and each packaged folder
``tomoscribe/weights-<name>/`` is the model ``<name>`` (:func:`packaged_models`,
:func:`resolve_model`). Several models can serve one installation, each on the
studies in its own scope; :class:`CombinedScope` is what they read together.

This module is light (standard library only): the Orthanc plugin imports it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tomoscribe.domain import Domain, get_domain
from tomoscribe.errors import ModelError

#: the installed package's folder, where packaged models live
PACKAGE_DIR = Path(__file__).resolve().parent
#: the default model's folder, shipped inside the package
DEFAULT_MODEL_DIR = PACKAGE_DIR / "weights"
#: the name of the default model (``model: default``)
DEFAULT_MODEL_NAME = "default"
#: a packaged model ``<name>`` lives in the package folder ``weights-<name>/``
PACKAGED_PREFIX = "weights-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

_DEFINED_TERMS = """
    ABDOMEN ABDOMENPELVIS ADRENAL ANKLE AORTA ARM AXILLA BACK BLADDER BRAIN BREAST
    BRONCHUS BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM CSPINE CTSPINE CERVIX CHEEK
    CHEST CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA
    CORONARYARTERY DUODENUM EAR ELBOW WHOLEBODY ESOPHAGUS EXTREMITY EYE EYELID FACE
    FEMUR FINGER FOOT GALLBLADDER HAND HEAD HEADNECK HEART HIP HUMERUS IAC ILEUM
    ILIUM JAW JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LSPINE LSSPINE LUNG MAXILLA
    MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT
    OVARY PANCREAS PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RECTUM RIB SCALP
    SELLA SCAPULA SHOULDER SKULL SPINE SPLEEN STERNUM STOMACH SUBMANDIBULAR TMJ
    TESTIS THIGH TSPINE TLSPINE THUMB THYMUS THYROID TOE TONGUE TRACHEA URETER
    URETHRA UTERUS VAGINA VULVA WRIST ZYGOMA
"""
#: Body Part Examined defined terms (DICOM PS3.16 Annex L), normalised
#: (upper case, letters and digits only).
DEFINED_BODY_PARTS: frozenset[str] = frozenset(_DEFINED_TERMS.split())


def normalize_body_part(text: str) -> str:
    """``text`` upper case, letters and digits only (``"Chest/Abdomen "`` -> ``"CHESTABDOMEN"``)."""
    return re.sub(r"[^A-Z0-9]", "", str(text).upper())


@dataclass(frozen=True)
class ModelScope:
    """The studies a model reads.

    Attributes:
        description: what it reads, for people ("CT of the chest and abdomen").
        modalities: Modality values, upper case; empty: any.
        body_parts: Body Part Examined values it reads, normalised; empty: any.
        anatomy: ``(structure, low, high)``: the range of the median value of
            each structure the model segments, where it finds one.
        volumes: ``(structure, low ml, high ml)``: the range of the volume of
            each structure, where it finds one. Both empty: no image check.
        min_ml: structures smaller than this (ml) are not checked.
    """

    description: str = ""
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    anatomy: tuple[tuple[str, float, float], ...] = ()
    volumes: tuple[tuple[str, float, float], ...] = ()
    min_ml: float = 20.0

    @property
    def declared(self) -> bool:
        """Whether the model restricts anything."""
        return bool(self.modalities or self.body_parts)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ModelScope:
        """Parse ``config.json``'s ``scope`` (``None``: no scope declared).

        Raises:
            ValueError: the entry is not a mapping of the documented shape.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError("'scope' must be a mapping")

        def words(key: str) -> tuple[str, ...]:
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"'scope.{key}' must be a list of strings")
            return tuple(v for v in value if v.strip())

        anatomy = data.get("anatomy") or {}
        if not isinstance(anatomy, Mapping) or not all(
                isinstance(anatomy.get(k, {}), Mapping) for k in ("median", "volume_ml")):
            raise ValueError("'scope.anatomy' must be a mapping with 'median' and 'volume_ml' "
                             "mappings")

        def ranges(key: str) -> tuple[tuple[str, float, float], ...]:
            out = []
            for name, bounds in (anatomy.get(key) or {}).items():
                numbers = isinstance(bounds, list) and all(
                    isinstance(b, int | float) for b in bounds)
                if not numbers or len(bounds) != 2 or bounds[0] > bounds[1]:
                    raise ValueError(f"'scope.anatomy.{key}.{name}' must be [low, high]")
                out.append((str(name), float(bounds[0]), float(bounds[1])))
            return tuple(out)

        min_ml = anatomy.get("min_ml", 20.0)
        if not isinstance(min_ml, int | float) or min_ml < 0:
            raise ValueError("'scope.anatomy.min_ml' must be a number >= 0")
        return cls(
            description=str(data.get("description", "") or ""),
            modalities=tuple(m.strip().upper() for m in words("modalities")),
            body_parts=tuple(normalize_body_part(b) for b in words("body_parts")),
            anatomy=ranges("median"),
            volumes=ranges("volume_ml"),
            min_ml=float(min_ml),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` form."""
        out: dict[str, Any] = {
            "description": self.description,
            "modalities": list(self.modalities),
            "body_parts": list(self.body_parts),
        }
        if self.anatomy or self.volumes:
            out["anatomy"] = {"min_ml": self.min_ml}
            if self.anatomy:
                out["anatomy"]["median"] = {n: [lo, hi] for n, lo, hi in self.anatomy}
            if self.volumes:
                out["anatomy"]["volume_ml"] = {n: [lo, hi] for n, lo, hi in self.volumes}
        return out

    def what(self) -> str:
        """One phrase: the description, else the modalities."""
        return self.description or "/".join(self.modalities) or "any CT or MR"

    def refusal(self, modality: str, body_part: str = "") -> str | None:
        """Why a series of ``modality`` / ``body_part`` is outside the scope, or ``None``.

        Args:
            modality: the series' Modality.
            body_part: its Body Part Examined ("" when absent).
        """
        mod = str(modality or "").strip().upper()
        if self.modalities and mod not in self.modalities:
            return f"the model reads {self.what()}, not {mod or 'a series without Modality'}"
        part = normalize_body_part(body_part)
        if self.body_parts and part in DEFINED_BODY_PARTS and part not in self.body_parts:
            return f"the model reads {self.what()}, not Body Part Examined {part}"
        return None

    def anatomy_refusal(self, found: Mapping[str, tuple[float, float]]) -> str | None:
        """Why the image is not what the model reads, judged by what it segmented (or ``None``).

        Args:
            found: structure -> ``(volume in ml, median voxel value)`` of each
                structure the model segmented.
        """
        if not (self.anatomy or self.volumes):
            return None
        unit = " HU" if self.modalities == ("CT",) else ""
        present = {name: v for name, v in found.items() if v[0] >= self.min_ml}
        names = list(dict.fromkeys(name for name, _lo, _hi in (*self.anatomy, *self.volumes)))
        if not any(name in present for name in names):
            return (f"the image does not look like {self.what()}: the model found none of "
                    f"{', '.join(names)}")
        for name, lo, hi in self.volumes:
            if name in present and not lo <= present[name][0] <= hi:
                return (f"the image does not look like {self.what()}: what the model took "
                        f"for the {name} is {present[name][0]:.0f} ml, not {lo:g} to {hi:g} ml")
        for name, lo, hi in self.anatomy:
            if name in present:
                ml, median = present[name]
                if not lo <= median <= hi:
                    return (f"the image does not look like {self.what()}: what the model took "
                            f"for the {name} ({ml:.0f} ml) has a median of {median:.0f}{unit}, "
                            f"not {lo:g} to {hi:g}{unit}")
        return None


def read_scope(model_dir: Path | str | None = None) -> ModelScope:
    """The scope declared in a model folder's ``config.json`` (``None``: the default model).

    A folder without ``config.json``, or whose ``config.json`` has no
    ``scope``, gives an empty scope (reads anything); loading the model
    itself reports a missing or broken folder.

    Raises:
        ModelError: ``config.json`` is not JSON, or its ``scope`` is malformed.
    """
    folder = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    path = folder / "config.json"
    if not path.is_file():
        return ModelScope()
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(conf, dict):
        raise ModelError(f"{path}: not a JSON object")
    try:
        return ModelScope.from_dict(conf.get("scope"))
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def packaged_models() -> dict[str, Path]:
    """The models shipped inside the installed package, by name.

    ``"default"`` is ``weights/`` (:data:`DEFAULT_MODEL_DIR`); each folder
    ``weights-<name>/`` beside it is the model ``<name>`` (``weights-head-mr/``
    is ``"head-mr"``). Only folders that exist are listed, so a name can be
    used once its folder is installed.

    Returns:
        name -> folder, ``"default"`` first, then the others sorted by name.
    """
    found = {DEFAULT_MODEL_NAME: DEFAULT_MODEL_DIR}
    for folder in sorted(PACKAGE_DIR.glob(f"{PACKAGED_PREFIX}*")):
        name = folder.name[len(PACKAGED_PREFIX):]
        if folder.is_dir() and _NAME.fullmatch(name) and name != DEFAULT_MODEL_NAME:
            found[name] = folder
    return found


def is_model_name(text: str) -> bool:
    """Whether ``text`` has the form of a model name: one word of letters, digits, ``-_.``.

    A name has no ``/`` and does not start with ``.`` or ``~``; anything else
    is a folder path.
    """
    return bool(_NAME.fullmatch(text))


def resolve_model(value: str | Path | None, base: Path | None = None) -> Path | None:
    """The folder of a model given by name or by folder; ``None`` is the default model.

    - ``None`` and ``"default"``: ``None`` (the default model, as everywhere).
    - A :class:`~pathlib.Path`: that folder, unchanged and unchecked (loading
      the model reports a missing or broken folder).
    - Another string that is a packaged model's name (:func:`packaged_models`):
      its folder. Names come first: write ``./head-mr`` for a folder of that name.
    - Any other string: a folder, ``~`` expanded, relative to ``base`` (else
      to the working directory). A single word (:func:`is_model_name`) must
      then be an existing folder: anything else is taken for a mistyped name.

    Args:
        value: a name, a folder, or ``None``.
        base: the folder relative paths are relative to (the settings file's);
            ``None``: the working directory (left relative).

    Raises:
        ModelError: a single word that is neither a packaged model nor a
            folder; the one-line message lists the names that exist.
    """
    if value is None or isinstance(value, Path):
        return value
    text = value.strip()
    if text == DEFAULT_MODEL_NAME:
        return None
    names = packaged_models()
    if text in names:
        return names[text]
    path = Path(text).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if is_model_name(text) and not path.is_dir():
        raise ModelError(f"no model named {text!r}: the packaged models are "
                         f"{', '.join(names)}, and there is no folder {path.absolute()}")
    return path


#: a model, or several, as the CLI and ``run_app`` take them: names or folders
#: (``None``: the settings' models)
ModelArg = str | Path | Sequence[str | Path | None] | None


def first_repeat(models: Sequence[Path | None]) -> tuple[int, int] | None:
    """Indices ``(i, j)``, ``i < j``, of the first model listed twice, or ``None``.

    Two entries are the same model when they resolve to the same folder
    (``None`` is the default model's).
    """
    seen: dict[Path, int] = {}
    for j, folder in enumerate(models):
        key = (folder if folder is not None else DEFAULT_MODEL_DIR).resolve()
        if key in seen:
            return seen[key], j
        seen[key] = j
    return None


def model_label(model_dir: Path | None) -> str:
    """A short name of a model for people: its packaged name, else its folder's name.

    Args:
        model_dir: the folder as :func:`resolve_model` gives it (``None``: the default).
    """
    if model_dir is None:
        return DEFAULT_MODEL_NAME
    with contextlib.suppress(OSError):
        here = model_dir.resolve()
        for name, folder in packaged_models().items():
            if folder.resolve() == here:
                return name
    return model_dir.name or str(model_dir)


def model_labels(models: Sequence[Path | None]) -> list[str]:
    """:func:`model_label` of each model, or its whole folder path where two labels collide."""
    labels = [model_label(m) for m in models]
    return [str(m) if m is not None and labels.count(label) > 1 else label
            for m, label in zip(models, labels, strict=True)]


def read_model_version(model_dir: Path | None) -> str | None:
    """The version a model folder's ``config.json`` declares, as the model takes it.

    Output UIDs derive from (study, model version); a folder without a
    ``version`` is version ``"0"``, as :meth:`tomoscribe.model.scribe.Scribe.load`
    reads it.

    Returns:
        The version, or ``None`` when ``config.json`` is missing or unreadable
        (loading the model reports that).
    """
    conf = _read_config(model_dir)
    return str(conf.get("version", "0")) if conf is not None else None


def read_model_domain(model_dir: Path | None) -> Domain | None:
    """The domain a model folder's ``config.json`` declares (``net.domain``).

    Returns:
        The domain (a folder without ``net.domain`` is chest-abdomen CT, as
        :class:`~tomoscribe.model.network.NetConfig` reads it), or ``None`` when
        ``config.json`` is missing or unreadable or names an unknown domain
        (loading the model reports that).
    """
    conf = _read_config(model_dir)
    net = conf.get("net") if conf is not None else None
    if not isinstance(net, dict):
        return None
    try:
        return get_domain(net.get("domain"))
    except ValueError:
        return None


def _read_config(model_dir: Path | None) -> dict[str, object] | None:
    """A model folder's ``config.json`` as a dict, or ``None`` when missing or not a JSON object."""
    folder = model_dir if model_dir is not None else DEFAULT_MODEL_DIR
    try:
        conf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return conf if isinstance(conf, dict) else None


@dataclass(frozen=True)
class CombinedScope:
    """What several models read together: a series is read when any one of them reads it.

    It answers like a :class:`ModelScope` (``declared``, ``modalities``,
    ``what()``, ``refusal()``), so the Orthanc plugin's event filter and the
    worker's fetch take it in place of one model's scope.

    Attributes:
        members: ``(model label, scope)`` of each model, in the order listed.
    """

    members: tuple[tuple[str, ModelScope], ...]

    @property
    def declared(self) -> bool:
        """Whether the models restrict anything (a model without a scope reads any series)."""
        return all(scope.declared for _label, scope in self.members)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities any of the models reads; empty: any."""
        if any(not scope.modalities for _label, scope in self.members):
            return ()
        return tuple(dict.fromkeys(m for _label, s in self.members for m in s.modalities))

    def what(self) -> str:
        """One phrase: each model's, with its label."""
        return " or ".join(f"{scope.what()} ({label})" for label, scope in self.members)

    def refusal(self, modality: str, body_part: str = "") -> str | None:
        """``None`` when any model reads such a series; else each model's reason, on one line.

        Args:
            modality: the series' Modality.
            body_part: its Body Part Examined ("" when absent).
        """
        reasons = []
        for label, scope in self.members:
            why = scope.refusal(modality, body_part)
            if why is None:
                return None
            reasons.append(f"{label}: {why}")
        return "; ".join(reasons)


#: the default model's scope (written into its config.json by training)
CHEST_ABDOMEN_CT = ModelScope(
    description="CT of the chest and abdomen",
    modalities=("CT",),
    body_parts=(
        "CHEST",
        "ABDOMEN",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "ABDOMENPELVIS",
        "NECKCHESTABDOMEN",
        "NECKCHESTABDPELV",
        "WHOLEBODY",
        "LUNG",
        "LIVER",
        "KIDNEY",
        "SPLEEN",
        "MEDIASTINUM",
    ),
    anatomy=(
        ("right lung", -980.0, -400.0),  # aerated: between air and water
        ("left lung", -980.0, -400.0),
        ("liver", -20.0, 250.0),  # soft tissue, fatty to contrast-enhanced
        ("spleen", -10.0, 250.0),
        ("right kidney", -10.0, 300.0),
        ("left kidney", -10.0, 300.0),
    ),
)

#: a head model's scope: MR of the head. MR values have no unit, so the image
#: check is on sizes: a cerebral hemisphere from a newborn's (about 200 ml) to
#: a large adult's (about 950), a cerebellum from about 30 to 170 ml, each
#: with room to spare (a segmentation is not exact)
HEAD_MR = ModelScope(
    description="MR of the head",
    modalities=("MR",),
    body_parts=("HEAD", "BRAIN", "SKULL", "CEREBELLUM", "HEADNECK"),
    volumes=(
        ("right cerebral hemisphere", 100.0, 1100.0),
        ("left cerebral hemisphere", 100.0, 1100.0),
        ("cerebellum", 15.0, 300.0),
    ),
)

#: the scope training writes for each domain (:mod:`tomoscribe.domain`, by name)
DOMAIN_SCOPES: dict[str, ModelScope] = {"ct-chest-abdomen": CHEST_ABDOMEN_CT, "mr-head": HEAD_MR}
