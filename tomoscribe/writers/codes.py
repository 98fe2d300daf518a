"""Coded concepts for what tomoscribe segments and reports.

SNOMED CT concept ids (scheme designator ``SCT``) for the structures in
:data:`tomoscribe.report.ORGANS` and the lesion kinds in
:data:`tomoscribe.report.LESION_KINDS`, with the segmentation property
category each belongs to (DICOM CID 7150). Where pydicom's code dictionary
has the concept, its entry is used; the lateral organs (right/left lung,
right/left kidney) are not in it and are written with their SNOMED CT body
structure ids (e.g. 3341006 "Right lung structure").

Notes on choices:
    * "hypodense lesion" is coded as Lesion (52988006, CID 7159): density on CT
      says nothing about whether it is a mass.
    * "cyst" uses 367643001 Cyst (morphologic abnormality), the concept CID
      7159 lists, not 441457006 Cyst (finding).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from tomoscribe.errors import ReportError
from tomoscribe.report import LESION_KINDS, ORGANS, Segment, named_organ

#: Segmentation property categories (CID 7150).
ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure  # 91723000
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("49755003", "SCT", "Morphologically Altered Structure")

#: One code per organ key of :data:`tomoscribe.report.ORGANS`.
STRUCTURE_CODES: dict[str, Code] = {
    "body": codes.SCT.EntireBody,  # 38266002
    "right lung": Code("3341006", "SCT", "Right lung"),
    "left lung": Code("44029006", "SCT", "Left lung"),
    "liver": codes.SCT.Liver,  # 10200004
    "spleen": codes.SCT.Spleen,  # 78961009
    "right kidney": Code("9846003", "SCT", "Right kidney"),
    "left kidney": Code("18639004", "SCT", "Left kidney"),
}

#: One code per lesion kind of :data:`tomoscribe.report.LESION_KINDS`.
LESION_CODES: dict[str, Code] = {
    "hypodense lesion": codes.SCT.Lesion,  # 52988006
    "nodule": codes.SCT.Nodule,  # 27925004
    "cyst": codes.SCT.Cyst,  # 367643001
    "mass": codes.SCT.Mass,  # 4147007
}

#: Lesion kind used for a lesion in a structure without a kind of its own.
DEFAULT_LESION_KIND = "hypodense lesion"

assert set(STRUCTURE_CODES) == set(ORGANS), "every organ needs a code"
assert set(LESION_KINDS.values()) <= set(LESION_CODES), "every lesion kind needs a code"


@dataclass(frozen=True)
class SegmentCoding:
    """How one segment is described in a SEG.

    Attributes:
        category: segmented property category (CID 7150).
        type: segmented property type (CID 7151 for organs, CID 7159 for lesions).
        anatomic_region: where a lesion lies (``None`` for an organ).
    """

    category: Code
    type: Code
    anatomic_region: Code | None


def structure_code(structure: str) -> Code:
    """SNOMED CT code of an organ key (``ReportError`` if unknown)."""
    try:
        return STRUCTURE_CODES[structure]
    except KeyError:
        raise ReportError(
            f"unknown structure {structure!r}; expected one of {', '.join(ORGANS)}"
        ) from None


def lesion_code(structure: str) -> Code:
    """SNOMED CT code of the kind of lesion found in ``structure``."""
    structure_code(structure)  # validates the key
    return LESION_CODES[LESION_KINDS.get(structure, DEFAULT_LESION_KIND)]


def named_structure(text: str) -> str | None:
    """The coded organ a free-text question names (:func:`tomoscribe.report.named_organ`)."""
    return named_organ(text, STRUCTURE_CODES)


def answer_coding(question: str) -> SegmentCoding:
    """Category, type and region of the mask that answers a referring ``question``.

    "segment the lesions in the liver ." is a liver lesion (region liver);
    "segment the lesions ." a lesion without a region; "segment the spleen ."
    the spleen. A question that names neither is coded as the generic
    Anatomical structure (SCT 91723000), so the mask is still written.
    """
    organ = named_structure(question)
    if "lesion" in question.lower():
        if organ is None:
            return SegmentCoding(MORPHOLOGICALLY_ALTERED_STRUCTURE,
                                 LESION_CODES[DEFAULT_LESION_KIND], None)
        return SegmentCoding(MORPHOLOGICALLY_ALTERED_STRUCTURE, lesion_code(organ),
                             structure_code(organ))
    if organ is None:
        return SegmentCoding(ANATOMICAL_STRUCTURE, ANATOMICAL_STRUCTURE, None)
    return SegmentCoding(ANATOMICAL_STRUCTURE, structure_code(organ), None)


def segment_coding(segment: Segment) -> SegmentCoding:
    """Category, type and region of a :class:`~tomoscribe.report.Segment`.

    Raises:
        ReportError: unknown structure or a kind other than organ / lesion.
    """
    if segment.kind == "organ":
        return SegmentCoding(ANATOMICAL_STRUCTURE, structure_code(segment.structure), None)
    if segment.kind == "lesion":
        return SegmentCoding(
            MORPHOLOGICALLY_ALTERED_STRUCTURE,
            lesion_code(segment.structure),
            structure_code(segment.structure),
        )
    raise ReportError(
        f"segment {segment.name!r} has kind {segment.kind!r}; expected 'organ' or 'lesion'"
    )
