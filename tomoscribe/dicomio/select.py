"""Choose the one series of a study to read, and say why.

Rules are a dict as loaded from ``app.yaml``. Their grammar is a superset of
MONAI Deploy's ``DICOMSeriesSelectorOperator`` JSON rules::

    {"selections": [
        {"name": "thin CT",
         "conditions": {"Modality": "(?i)CT",
                        "ImageType": ["PRIMARY", "!SECONDARY"],
                        "SliceThickness": [0.5, 5],
                        "ImageOrientationPatient": "Axial"},
         # tomoscribe's own keys, all optional:
         "sop_classes": ["1.2.840.10008.5.1.4.1.1.2", ...],
         "min_slices": 8,
         "exclude_image_types": ["LOCALIZER", "DERIVED", "SECONDARY"],
         "prefer": ["axial", "thinnest", "most_slices"],
         "check_geometry": true}]}

Conditions, keyed by DICOM keyword and matched against the series' first
header (a condition whose value is empty is ignored, a missing attribute fails):

- numeric attribute: ``[lo, hi]`` inclusive range (``null`` for an open end),
  ``[value, op]`` with op one of ``> >= < <= !=``, a number (equality), or a
  string (regular expression, full match on the value's text). For a
  multi-valued numeric attribute (PixelSpacing) every value must match.
- text attribute: case-insensitive equality, else a case-insensitive regular
  expression search (MONAI's rule); a leading ``!`` negates; a list matches
  when any of its patterns does.
- multi-valued text attribute (ImageType): a list of values that must all be
  present (case-insensitive), those written ``!VALUE`` must all be absent; a
  single string is one such value.
- ``ImageOrientationPatient``: "Axial", "Coronal" or "Sagittal" (the plane
  nearest the slice normal, MONAI's rule) or "Oblique" (more than ~25 degrees
  off every axis).

Unless ``check_geometry`` is false, a series must also pass the loader's
header-only geometry checks (one orientation, no missing slice...), so the
chosen series is one :func:`load_series` can read.

Selections are tried in order (as in MONAI); the first under which any series
qualifies wins, and among the series that qualify under it the ``prefer``
keys pick one. Keys of our own may also sit at the top level of the rules,
as defaults for every selection.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tomoscribe.dicomio.frames import dominant_plane, frames_of, orientation_label
from tomoscribe.dicomio.load import plan_geometry
from tomoscribe.dicomio.scan import SeriesInfo, StudyIndex
from tomoscribe.errors import GeometryError, NoSeriesError, OutOfScopeError, TomoscribeError
from tomoscribe.scope import ModelScope

#: SOP classes read as volumes unless a selection says otherwise.
IMAGE_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
)

DEFAULT_MIN_SLICES = 8
DEFAULT_EXCLUDE_IMAGE_TYPES: tuple[str, ...] = ("LOCALIZER", "DERIVED", "SECONDARY")
DEFAULT_PREFER: tuple[str, ...] = ("axial", "thinnest", "most_slices")

#: the rules used when the caller gives none: any CT or MR image series.
DEFAULT_RULES: dict[str, Any] = {
    "selections": [
        {
            "name": "CT or MR volume",
            "conditions": {"Modality": "(?i)^(CT|MR)$"},
            "sop_classes": list(IMAGE_SOP_CLASSES),
            "min_slices": DEFAULT_MIN_SLICES,
            "exclude_image_types": list(DEFAULT_EXCLUDE_IMAGE_TYPES),
            "prefer": list(DEFAULT_PREFER),
        }
    ]
}

_OWN_KEYS = ("sop_classes", "min_slices", "exclude_image_types", "prefer", "check_geometry")

#: words in a SOP class name that mark an object that is never an image volume
_NON_IMAGE_WORDS = (
    "SR",
    "Segmentation",
    "Key Object",
    "Presentation State",
    "RT ",
    "Secondary Capture",
    "Waveform",
    "Encapsulated",
    "Raw Data",
    "Spectroscopy",
    "Registration",
    "Surface",
    "Parametric Map",
)


class RulesError(TomoscribeError):
    """The selection rules themselves are malformed (a configuration error)."""


@dataclass
class Selection:
    """The chosen series and the reasoning.

    Attributes:
        chosen: the series to load.
        selection_name: name of the selection (rule) it qualified under.
        explanation: one line per series of the index: why chosen, or why not.
    """

    chosen: SeriesInfo
    selection_name: str = ""
    explanation: list[str] = field(default_factory=list)


# --------------------------------------------------------------------- helpers


def _series_label(series: SeriesInfo) -> str:
    return f"{series.uid} ({series.summary()})"


def _thickness(series: SeriesInfo) -> float:
    value = series.slice_thickness or series.slice_spacing
    return float(value) if value else math.inf


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _attribute(series: SeriesInfo, keyword: str) -> Any:
    """The value of ``keyword`` in the series' first header, made plain.

    Returns ``None`` when absent or empty; a list for multi-valued elements;
    ``float``/``int``/``str`` otherwise. Enhanced objects are also searched in
    their shared functional groups.
    """
    ds: Dataset = series.headers[0]
    elem: DataElement | None = ds.get(keyword) if keyword in ds else None
    if elem is None and "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        for item in shared:
            if item.VR == "SQ" and item.value:
                inner = item.value[0]
                if keyword in inner:
                    elem = inner[keyword]
                    break
    if elem is None:
        return None
    value = elem.value if isinstance(elem, DataElement) else elem
    if value is None or value == "" or (isinstance(value, bytes)):
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = [v if _is_number(v) else str(v) for v in value]
        return items or None
    if _is_number(value):
        return value
    return str(value)


def _match_numeric(cond: Any, value: float, key: str) -> bool:
    if isinstance(cond, list | tuple):
        if len(cond) == 2 and isinstance(cond[1], str):
            ref = float(cond[0])
            ops: dict[str, Callable[[float, float], bool]] = {
                ">": lambda a, b: a > b,
                ">=": lambda a, b: a >= b,
                "<": lambda a, b: a < b,
                "<=": lambda a, b: a <= b,
                "!=": lambda a, b: not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9),
            }
            if cond[1] not in ops:
                raise RulesError(f"condition {key}: unknown operator {cond[1]!r}")
            return ops[cond[1]](float(value), ref)
        if len(cond) == 2 and all(c is None or _is_number(c) for c in cond):
            lo = -math.inf if cond[0] is None else float(cond[0])
            hi = math.inf if cond[1] is None else float(cond[1])
            return lo <= float(value) <= hi
        raise RulesError(f"condition {key}: numeric condition {cond!r} not understood")
    if isinstance(cond, str):
        return re.fullmatch(cond, str(value)) is not None
    if _is_number(cond):
        return math.isclose(float(value), float(cond), rel_tol=1e-9, abs_tol=1e-9)
    raise RulesError(f"condition {key}: numeric condition {cond!r} not understood")


def _match_text(cond: Any, value: str, key: str) -> bool:
    if isinstance(cond, list | tuple):
        positive = [c for c in cond if not str(c).startswith("!")]
        negative = [str(c)[1:] for c in cond if str(c).startswith("!")]
        ok = any(_match_text(c, value, key) for c in positive) if positive else True
        return ok and not any(_match_text(c, value, key) for c in negative)
    pattern = str(cond)
    if pattern.startswith("!"):
        return not _match_text(pattern[1:], value, key)
    if value.casefold() == pattern.casefold():
        return True
    try:
        return re.search(pattern, value, re.IGNORECASE) is not None
    except re.error as err:
        raise RulesError(f"condition {key}: bad regular expression {pattern!r}: {err}") from err


def _match_set(cond: Any, values: list[Any]) -> bool:
    have = {str(v).strip().casefold() for v in values}
    terms = [
        str(c).strip().casefold() for c in (cond if isinstance(cond, list | tuple) else [cond])
    ]
    include = [t for t in terms if not t.startswith("!")]
    exclude = [t[1:] for t in terms if t.startswith("!")]
    return all(t in have for t in include) and not any(t in have for t in exclude)


def _match_condition(series: SeriesInfo, key: str, cond: Any) -> str | None:
    """``None`` if ``series`` meets condition ``key: cond``, else the reason."""
    if key == "ImageOrientationPatient":
        want = str(cond).strip().capitalize()
        if want not in ("Axial", "Coronal", "Sagittal", "Oblique"):
            raise RulesError(
                f"condition ImageOrientationPatient: {cond!r} is not Axial, Coronal, Sagittal "
                "or Oblique"
            )
        frames = frames_of(series.headers[0], 0)
        ori = frames[0].orientation if frames else None
        if ori is None:
            return "ImageOrientationPatient missing"
        have = orientation_label(ori) if want == "Oblique" else dominant_plane(ori)
        return None if have == want else f"orientation {series.orientation} is not {want}"

    value = _attribute(series, key)
    if value is None:
        return f"{key} missing"
    if isinstance(value, list):
        if all(_is_number(v) for v in value) and not (
            isinstance(cond, list | tuple)
            and any(isinstance(c, str) and c.startswith("!") for c in cond)
        ):
            ok = all(_match_numeric(cond, float(v), key) for v in value)
        else:
            ok = _match_set(cond, value)
    elif _is_number(value):
        ok = _match_numeric(cond, float(value), key)
    else:
        ok = _match_text(cond, value, key)
    if ok:
        return None
    shown = "\\".join(str(v) for v in value) if isinstance(value, list) else value
    return f"{key} {shown!r} does not match {cond!r}"


def _non_image_reason(series: SeriesInfo) -> str | None:
    name = series.sop_class_name
    if series.slice_count == 0 or any(w in name for w in _NON_IMAGE_WORDS):
        return f"SOP class {name} not an image volume"
    return None


def _rule(selection: dict[str, Any], rules: dict[str, Any], key: str, default: Any) -> Any:
    if key in selection:
        return selection[key]
    if key in rules:
        return rules[key]
    return default


def _qualify(series: SeriesInfo, selection: dict[str, Any], rules: dict[str, Any]) -> str | None:
    """``None`` if ``series`` qualifies under ``selection``, else the first reason why not."""
    sop_classes = [str(c) for c in _rule(selection, rules, "sop_classes", IMAGE_SOP_CLASSES)]
    if series.sop_class_uid not in sop_classes:
        why = _non_image_reason(series)
        return why or f"SOP class {series.sop_class_name} not in the allowed SOP classes"
    excluded = {
        str(t).upper()
        for t in _rule(selection, rules, "exclude_image_types", DEFAULT_EXCLUDE_IMAGE_TYPES)
    }
    hit = [t for t in series.image_type if t in excluded]
    if hit:
        return f"image type {'/'.join(series.image_type)} is {hit[0]}"
    min_slices = int(_rule(selection, rules, "min_slices", DEFAULT_MIN_SLICES))
    if series.slice_count < min_slices:
        return f"{series.slice_count} images, fewer than {min_slices}"
    conditions = selection.get("conditions") or {}
    if not isinstance(conditions, dict):
        raise RulesError("'conditions' of a selection must be a mapping")
    for key, cond in conditions.items():
        if cond is None or cond == "" or cond == []:
            continue  # MONAI ignores empty conditions
        why = _match_condition(series, str(key), cond)
        if why:
            return why
    if _rule(selection, rules, "check_geometry", True):
        try:
            plan_geometry(series)
        except GeometryError as err:
            return f"not one regular volume: {err}"
    return None


#: preference key -> (sort key: smaller is better, words for the explanation)
_PREFERENCES: dict[str, tuple[Callable[[SeriesInfo], float], str]] = {
    "most_slices": (lambda s: -s.slice_count, "most images"),
    "fewest_slices": (lambda s: s.slice_count, "fewest images"),
    "thinnest": (_thickness, "thinnest slices"),
    "thickest": (
        lambda s: -_thickness(s) if math.isfinite(_thickness(s)) else math.inf,
        "thickest slices",
    ),
    "axial": (lambda s: 0 if s.orientation == "Axial" else 1, "axial"),
    "coronal": (lambda s: 0 if s.orientation == "Coronal" else 1, "coronal"),
    "sagittal": (lambda s: 0 if s.orientation == "Sagittal" else 1, "sagittal"),
    "lowest_series_number": (
        lambda s: s.series_number if s.series_number is not None else math.inf,
        "lowest series number",
    ),
    "highest_series_number": (
        lambda s: -s.series_number if s.series_number is not None else math.inf,
        "highest series number",
    ),
}


def _preference_keys(prefer: Sequence[Any]) -> list[str]:
    keys = [str(p).strip().lower() for p in prefer]
    unknown = [k for k in keys if k not in _PREFERENCES]
    if unknown:
        raise RulesError(
            f"unknown 'prefer' key(s) {', '.join(unknown)}; known: {', '.join(_PREFERENCES)}"
        )
    return keys


def _why_preferred(best: SeriesInfo, other: SeriesInfo, keys: list[str]) -> str:
    for k in keys:
        fn, words = _PREFERENCES[k]
        if fn(best) != fn(other):
            return words
    return "tie broken by series number and UID"


def _validate(rules: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(rules, dict):
        raise RulesError(f"selection rules must be a mapping, got {type(rules).__name__}")
    selections = rules.get("selections")
    if not selections or not isinstance(selections, list):
        raise RulesError("selection rules need a non-empty 'selections' list")
    for i, sel in enumerate(selections):
        if not isinstance(sel, dict):
            raise RulesError(f"selection {i + 1} must be a mapping")
        unknown = [str(k) for k in sel if k not in ("name", "conditions", *_OWN_KEYS)]
        if unknown:
            raise RulesError(
                f"selection {i + 1}: unknown key(s) {', '.join(unknown)}; known: name, "
                f"conditions, {', '.join(_OWN_KEYS)}"
            )
        _preference_keys(_rule(sel, rules, "prefer", DEFAULT_PREFER))
    return selections


def select_series(
    index: StudyIndex, rules: dict[str, Any] | None = None, scope: ModelScope | None = None
) -> Selection:
    """Pick the series to read from ``index`` under ``rules``.

    Args:
        index: what :func:`scan_folder` found.
        rules: selection rules (see the module docstring); ``None`` means
            :data:`DEFAULT_RULES`.
        scope: what the model reads (:mod:`tomoscribe.scope`); a series
            outside it does not qualify. ``None``: any series.

    Returns:
        The chosen series, the name of the selection it met, and one line of
        explanation per series.

    Raises:
        OutOfScopeError: series qualify under the rules, but none is in ``scope``.
        NoSeriesError: no series qualifies; the message says why for each.
        RulesError: the rules are malformed.
    """
    rules = DEFAULT_RULES if rules is None else rules
    selections = _validate(rules)
    if not index.series:
        raise NoSeriesError(f"no series qualifies: no series found in {index.root}")

    refused = {
        s.uid: scope.refusal(s.modality, s.body_part) if scope is not None else None
        for s in index.series
    }
    out_of_scope: list[str] = []  # why the scope turned away series the rules admit
    reasons: dict[str, list[str]] = {s.uid: [] for s in index.series}
    for number, sel in enumerate(selections, start=1):
        name = str(sel.get("name") or f"selection {number}").strip()
        qualified = []
        for s in index.series:
            why = _qualify(s, sel, rules)
            if why is None and refused[s.uid]:
                why = f"outside the model's scope: {refused[s.uid]}"
                out_of_scope.append(str(refused[s.uid]))
            if why is None:
                qualified.append(s)
            else:
                reasons[s.uid].append(why if len(selections) == 1 else f"{name}: {why}")
        if not qualified:
            continue
        keys = _preference_keys(_rule(sel, rules, "prefer", DEFAULT_PREFER))

        def rank(s: SeriesInfo, keys: list[str] = keys) -> tuple[Any, ...]:
            tie = s.series_number if s.series_number is not None else math.inf
            return (*(_PREFERENCES[k][0](s) for k in keys), tie, s.uid)

        qualified.sort(key=rank)
        best = qualified[0]
        prefs = ", ".join(_PREFERENCES[k][1] for k in keys) or "first found"
        explanation = []
        for s in index.series:
            if s is best:
                line = f"chosen: qualifies under '{name}'"
                if len(qualified) > 1:
                    line += f", best of {len(qualified)} by preference ({prefs})"
            elif s in qualified:
                line = (
                    f"not chosen: qualifies under '{name}' but the chosen series is preferred "
                    f"({_why_preferred(best, s, keys)})"
                )
            else:
                line = "not chosen: " + "; ".join(reasons[s.uid])
            explanation.append(f"{_series_label(s)}: {line}")
        return Selection(chosen=best, selection_name=name, explanation=explanation)

    summary = "; ".join(
        f"{s.uid} ({s.modality or '?'}): {' / '.join(reasons[s.uid])}" for s in index.series
    )
    if out_of_scope:
        raise OutOfScopeError(
            f"no series the model can read: {out_of_scope[0]}; "
            f"{len(index.series)} series seen; {summary}"
        )
    raise NoSeriesError(f"no series qualifies: {len(index.series)} series seen; {summary}")
