# SPDX-License-Identifier: AGPL-3.0-or-later  (tomoscribe Orthanc plugin, see plugin/LICENSE)
"""Which studies get a job: the event filter, shared by the plugin and the worker.

Works on the JSON Orthanc returns for ``GET /studies/{id}/series`` (a list of
series, each with ``MainDicomTags`` and ``Instances``). Standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

try:  # the core package's identity constants (a light import); fall back to the same text
    from tomoscribe import MANUFACTURER as OWN_MANUFACTURER
    from tomoscribe import SOFTWARE_NAME as OWN_DESCRIPTION_PREFIX
except Exception:  # pragma: no cover - only when tomoscribe is not installed
    OWN_MANUFACTURER = OWN_DESCRIPTION_PREFIX = "tomoscribe"


def is_own_output(series: Mapping[str, Any]) -> bool:
    """True if the series was written by tomoscribe (our SR / SEG).

    The same rule as ``tomoscribe.writers.identity.is_tomoscribe_output`` (which
    is not imported here: it pulls in highdicom): Manufacturer equals ours, or
    SeriesDescription starts with our software name, ignoring case and spaces.

    Args:
        series: One element of Orthanc's ``/studies/{id}/series`` answer.
    """
    tags = series.get("MainDicomTags", {}) or {}
    if str(tags.get("Manufacturer", "")).strip().lower() == OWN_MANUFACTURER.lower():
        return True
    description = str(tags.get("SeriesDescription", "")).strip().lower()
    return description.startswith(OWN_DESCRIPTION_PREFIX.lower())


def _candidates(series_list: Iterable[Mapping[str, Any]],
                modalities: Sequence[str]) -> list[Mapping[str, Any]]:
    wanted = {m.upper() for m in modalities}
    out = []
    for series in series_list:
        modality = str((series.get("MainDicomTags", {}) or {}).get("Modality", "")).upper()
        if modality in wanted and not is_own_output(series) and series.get("Instances"):
            out.append(series)
    return out


def scope_refusal(series: Mapping[str, Any], scope: Any) -> str | None:
    """Why the model's scope turns ``series`` away (``None``: it does not, or no scope).

    Args:
        series: One element of Orthanc's ``/studies/{id}/series`` answer.
        scope: A ``tomoscribe.scope.ModelScope``, or several models'
            ``tomoscribe.scope.CombinedScope`` (anything with a ``refusal``), or ``None``.
    """
    if scope is None:
        return None
    tags = series.get("MainDicomTags", {}) or {}
    refusal: str | None = scope.refusal(str(tags.get("Modality", "")),
                                        str(tags.get("BodyPartExamined", "")))
    return refusal


def input_series(series_list: Iterable[Mapping[str, Any]],
                 modalities: Sequence[str], scope: Any = None) -> list[Mapping[str, Any]]:
    """The series a job reads: image series of an enabled modality, not our own output.

    Args:
        series_list: Orthanc's ``/studies/{id}/series`` answer.
        modalities: Enabled modalities (upper case, e.g. ``("CT", "MR")``).
        scope: The model's ``tomoscribe.scope.ModelScope`` (several models:
            their ``CombinedScope``): series outside it (another modality, a
            Body Part Examined no model was trained on) are left out. ``None``:
            no such filter.

    Returns:
        The qualifying series, in Orthanc's order.
    """
    return [s for s in _candidates(series_list, modalities) if scope_refusal(s, scope) is None]


def study_qualifies(series_list: Sequence[Mapping[str, Any]],
                    modalities: Sequence[str], scope: Any = None) -> tuple[bool, str]:
    """Decide whether a study gets a job.

    Args:
        series_list: Orthanc's ``/studies/{id}/series`` answer.
        modalities: Enabled modalities.
        scope: The model's ``tomoscribe.scope.ModelScope``, several models'
            ``CombinedScope`` (the study qualifies when any model reads one of
            its series), or ``None``.

    Returns:
        ``(True, "")`` or ``(False, one-line reason)``.
    """
    if not series_list:
        return False, "the study has no series"
    refusals = [scope_refusal(s, scope) for s in _candidates(series_list, modalities)]
    if any(why is None for why in refusals):
        return True, ""
    if refusals:  # image series there are, but the model was not trained on them
        whose = "every model's scope" if len(getattr(scope, "members", ())) > 1 else \
            "the model's scope"
        return False, f"outside {whose}: {refusals[0]}"
    found = sorted({str((s.get("MainDicomTags", {}) or {}).get("Modality", "?"))
                    for s in series_list})
    return False, (f"no {'/'.join(modalities)} image series that is not tomoscribe's own"
                   f" output (modalities present: {', '.join(found)})")
