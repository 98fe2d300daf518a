"""Who wrote an object: tomoscribe's identity in every SR and SEG it creates.

Every object carries Manufacturer = :data:`tomoscribe.MANUFACTURER`, the model's
name and version, a stable series number and description, and a
ContributingEquipmentSequence item. The Orthanc plugin calls
:func:`is_tomoscribe_output` on the tags of each new instance so that it never
processes its own output again.

UIDs are derived from the job key ``(StudyInstanceUID, model version)`` and the
kind of object, so a job that runs twice writes the same SOP Instance UIDs and
the PACS keeps one copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from tomoscribe import MANUFACTURER, SOFTWARE_NAME, __version__
from tomoscribe.errors import ReportError
from tomoscribe.report import Report

#: Series numbers of our outputs: stable, so a viewer lists them in one place.
SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9902
MEASUREMENTS_SERIES_NUMBER = 9903
PDF_SERIES_NUMBER = 9904
ANSWERS_SERIES_NUMBER = 9905

#: Every series description we write starts with this prefix.
SERIES_DESCRIPTION_PREFIX = SOFTWARE_NAME
SR_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} draft report"
SEG_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} segmentation"
MEASUREMENTS_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} measurements"
PDF_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} draft report (PDF)"
ANSWERS_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} answer masks"

#: Kinds of object we write, as used in :func:`output_uids`.
OUTPUT_KINDS: tuple[str, ...] = ("sr", "seg", "measurements", "pdf", "answers")

#: Manufacturer attributes of the tags Orthanc hands the plugin, by keyword and
#: by ``gggg,eeee`` key (Orthanc's "simplified" and "full" tag JSON).
_MANUFACTURER_KEYS = ("Manufacturer", "0008,0070", "00080070")
_SERIES_DESCRIPTION_KEYS = ("SeriesDescription", "0008,103e", "0008,103E", "0008103E")


def output_uids(study_uid: str, model_version: str, kind: str) -> tuple[str, str]:
    """Derive the series and SOP Instance UID of one output deterministically.

    Args:
        study_uid: StudyInstanceUID of the source study (the job key).
        model_version: version of the model that wrote the report (the job key).
        kind: one of :data:`OUTPUT_KINDS` (``"sr"``, ``"seg"``, ``"measurements"``,
            ``"pdf"``, ``"answers"``).

    Returns:
        ``(series_instance_uid, sop_instance_uid)``; the same arguments always
        give the same UIDs, different arguments give different ones.

    Raises:
        ReportError: an empty study UID or model version, or an unknown kind.
    """
    if not study_uid.strip():
        raise ReportError("cannot derive output UIDs: the source study has no StudyInstanceUID")
    if not model_version.strip():
        raise ReportError("cannot derive output UIDs: the report has no model version")
    if kind not in OUTPUT_KINDS:
        raise ReportError(f"unknown output kind {kind!r}; expected one of {OUTPUT_KINDS}")
    key = [SOFTWARE_NAME, study_uid.strip(), model_version.strip(), kind]
    series_uid = generate_uid(entropy_srcs=[*key, "series"])
    sop_uid = generate_uid(entropy_srcs=[*key, "instance"])
    return str(series_uid), str(sop_uid)


def device_uid(model_name: str, model_version: str) -> str:
    """Deterministic Device Observer UID of one model version."""
    return str(generate_uid(entropy_srcs=[SOFTWARE_NAME, "device", model_name, model_version]))


def software_versions(report: Report) -> Any:
    """SoftwareVersions: ``[tomoscribe version, model version]``.

    A list (pydicom warns on a tuple for a multi-valued LO); typed ``Any``
    because highdicom's annotation says ``str | tuple[str]``.
    """
    return [__version__, report.model_version]


def device_serial_number(report: Report) -> str:
    """DeviceSerialNumber (LO, at most 64 characters): the model's name and version.

    There is no hardware serial: the "device" is one version of one model.
    """
    return f"{report.model_name} {report.model_version}"[:64]


def check_identity(report: Report) -> None:
    """Refuse a report whose model identity cannot be written into DICOM.

    Raises:
        ReportError: empty model name or version, or longer than LO allows.
    """
    for what, value in (("model name", report.model_name), ("model version", report.model_version)):
        if not value or not value.strip():
            raise ReportError(f"the report has no {what}")
        if len(value) > 64 or "\\" in value:
            raise ReportError(f"the report's {what} {value[:70]!r} is longer than 64 characters "
                              "or contains a backslash")


def algorithm_identification(report: Report) -> hd.AlgorithmIdentificationSequence:
    """AlgorithmIdentificationSequence of a SEG segment: name, version, AI family."""
    return hd.AlgorithmIdentificationSequence(
        name=report.model_name,
        family=codes.DCM.ArtificialIntelligence,
        version=report.model_version,
        source=MANUFACTURER,
    )


def contributing_equipment(report: Report) -> hd.ContributingEquipment:
    """ContributingEquipmentSequence item naming tomoscribe as processing equipment."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=report.model_name,
        software_versions=software_versions(report),
        device_serial_number=device_serial_number(report),
        contribution_description=f"Draft generated by {SOFTWARE_NAME} {__version__}",
    )


def device_observer(report: Report) -> hd.sr.ObserverContext:
    """The model as the SR's observing device (name, manufacturer, version)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(report.model_name, report.model_version),
            name=report.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{report.model_name} {report.model_version}"[:64],
            serial_number=device_serial_number(report),
        ),
    )


def describe_series(base: str, report: Report) -> str:
    """One of our series descriptions for ``report``'s outputs.

    ``base`` (e.g. :data:`SEG_SERIES_DESCRIPTION`) as it is for the
    chest-abdomen CT models, so viewers' hanging protocols and filters keyed
    on it keep working; followed by what the model reads for any other
    (``"tomoscribe segmentation (MR of the head)"``), within the 64
    characters of a Long String.
    """
    if not report.reads:
        return base
    return f"{base} ({report.reads})"[:64]


def draft_sr_attributes(
    report: Report, *, series_number: int, series_description: str
) -> dict[str, Any]:
    """Keyword arguments every SR we write passes to highdicom's SR classes.

    Our identity, the draft flags (PARTIAL, UNVERIFIED, not final) and UTF-8
    (the model's text is free Unicode).
    """
    return {
        "series_number": series_number,
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "is_complete": False,
        "is_final": False,
        "is_verified": False,
        "series_description": describe_series(series_description, report),
        "manufacturer_model_name": report.model_name,
        "software_versions": software_versions(report),
        "device_serial_number": device_serial_number(report),
        "contributing_equipment": [contributing_equipment(report)],
        "specific_character_set": "ISO_IR 192",
    }


def _tag_value(tags: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """First value found under any of ``keys`` as a string ('' if none)."""
    for key in keys:
        if key not in tags:
            continue
        value = tags[key]
        if isinstance(value, Mapping):  # Orthanc "full" JSON: {"Name":..., "Value":...}
            value = value.get("Value", "")
        if isinstance(value, list | tuple):
            value = value[0] if value else ""
        return "" if value is None else str(value)
    return ""


def is_tomoscribe_output(ds_or_tags: Mapping[str, Any] | Dataset) -> bool:
    """Tell whether an instance was written by tomoscribe.

    True when Manufacturer equals :data:`tomoscribe.MANUFACTURER` or the
    SeriesDescription starts with :data:`SERIES_DESCRIPTION_PREFIX` (both
    compared without case and surrounding spaces).

    Args:
        ds_or_tags: a pydicom Dataset, or a plain mapping of DICOM keyword (or
            ``gggg,eeee``) to string as Orthanc's tag JSON gives it.
    """
    if isinstance(ds_or_tags, Dataset):
        manufacturer = str(ds_or_tags.get("Manufacturer", "") or "")
        description = str(ds_or_tags.get("SeriesDescription", "") or "")
    else:
        manufacturer = _tag_value(ds_or_tags, _MANUFACTURER_KEYS)
        description = _tag_value(ds_or_tags, _SERIES_DESCRIPTION_KEYS)
    if manufacturer.strip().lower() == MANUFACTURER.lower():
        return True
    return description.strip().lower().startswith(SERIES_DESCRIPTION_PREFIX.lower())
