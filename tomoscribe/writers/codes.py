"""Coded concepts for what tomoscribe segments and reports.

SNOMED CT concept ids (scheme designator ``SCT``) for the structures and the
lesion kinds of every domain in :data:`tomoscribe.domain.DOMAINS`, with the
segmentation property category each belongs to (DICOM CID 7150). Where
pydicom's code dictionary has the concept, its entry is used.

Two ways of saying the side of a paired structure:
    * chest-abdomen: the lateral organs (right/left lung, right/left kidney)
      are written with their own SNOMED CT body structure ids (e.g. 3341006
      "Right lung structure"), as they always have been; they carry no
      laterality modifier.
    * head: a cerebral hemisphere is "Cerebral hemisphere" (372073000, CID
      7151) plus a laterality modifier from CID 244 (24028007 Right, 7771000
      Left), the DICOM way (pydicom's dictionary has no sided hemisphere
      concept). The writers put the modifier where each object has a place
      for it: SEG Segmented Property Type Modifier / Anatomic Region Modifier,
      SR Laterality of the Finding Site. The "lateral ventricles" segment
      holds both ventricles: Lateral ventricle (66720007) with the modifier
      51440002 Bilateral ("Right and left", CID 244).

Notes on choices:
    * "hypodense lesion" is coded as Lesion (52988006, CID 7159): density on CT
      says nothing about whether it is a mass.
    * "cyst" uses 367643001 Cyst (morphologic abnormality), the concept CID
      7159 lists, not 441457006 Cyst (finding).
    * A lesion whose finding names no single kind where its site holds several
      (a head finding naming a mass and a cyst) is coded as the generic Lesion
      (52988006).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from tomoscribe.domain import DOMAINS
from tomoscribe.errors import ReportError
from tomoscribe.report import Segment, named_organ

#: Segmentation property categories (CID 7150).
ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure  # 91723000
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("49755003", "SCT", "Morphologically Altered Structure")

#: Laterality (CID 244).
RIGHT: Code = codes.SCT.Right  # 24028007
LEFT: Code = codes.SCT.Left  # 7771000
BILATERAL: Code = codes.SCT.Bilateral  # 51440002 "Right and left"

#: One code per structure key of every domain (:data:`tomoscribe.domain.DOMAINS`);
#: a structure of :data:`STRUCTURE_LATERALITY` is this code plus that side.
STRUCTURE_CODES: dict[str, Code] = {
    # chest-abdomen CT (:data:`tomoscribe.report.ORGANS`)
    "body": codes.SCT.EntireBody,  # 38266002
    "right lung": Code("3341006", "SCT", "Right lung"),
    "left lung": Code("44029006", "SCT", "Left lung"),
    "liver": codes.SCT.Liver,  # 10200004
    "spleen": codes.SCT.Spleen,  # 78961009
    "right kidney": Code("9846003", "SCT", "Right kidney"),
    "left kidney": Code("18639004", "SCT", "Left kidney"),
    # head MR
    "head": codes.SCT.Head,  # 69536005
    "right cerebral hemisphere": codes.SCT.CerebralHemisphere,  # 372073000 + Right
    "left cerebral hemisphere": codes.SCT.CerebralHemisphere,  # 372073000 + Left
    "cerebellum": codes.SCT.Cerebellum,  # 113305005
    "lateral ventricles": codes.SCT.LateralVentricle,  # 66720007 + Bilateral
}

#: The side of the structures whose code does not say it (CID 244); every other
#: structure has none (the chest-abdomen lateral organs have sided codes).
STRUCTURE_LATERALITY: dict[str, Code] = {
    "right cerebral hemisphere": RIGHT,
    "left cerebral hemisphere": LEFT,
    "lateral ventricles": BILATERAL,
}

#: One code per lesion kind of every domain (:attr:`tomoscribe.domain.Domain.lesion_kinds`).
LESION_CODES: dict[str, Code] = {
    "hypodense lesion": codes.SCT.Lesion,  # 52988006
    "nodule": codes.SCT.Nodule,  # 27925004
    "cyst": codes.SCT.Cyst,  # 367643001
    "mass": codes.SCT.Mass,  # 4147007
}

#: Lesion kind used for a lesion in a structure without a kind of its own.
DEFAULT_LESION_KIND = "hypodense lesion"

#: A lesion of no stated kind (a finding naming several kinds at a site that
#: holds several).
GENERIC_LESION: Code = codes.SCT.Lesion  # 52988006

#: The kinds of lesion each lesion site of every domain can hold.
SITE_KINDS: dict[str, tuple[str, ...]] = {
    site: kinds for domain in DOMAINS.values() for site, kinds in domain.kinds.items()
}

assert set(STRUCTURE_CODES) == {s for d in DOMAINS.values() for s in d.structures}, (
    "every structure of every domain needs a code, and only those have one")
assert all(set(d.lesion_kinds) <= set(LESION_CODES) for d in DOMAINS.values()), (
    "every lesion kind of every domain needs a code")
assert all(SITE_KINDS[site] == kinds for d in DOMAINS.values()
           for site, kinds in d.kinds.items()), "a site holds the same kinds in every domain"
assert set(STRUCTURE_LATERALITY) <= set(STRUCTURE_CODES)


@dataclass(frozen=True)
class SegmentCoding:
    """How one segment is described in a SEG.

    Attributes:
        category: segmented property category (CID 7150).
        type: segmented property type (CID 7151 for organs, CID 7159 for lesions).
        anatomic_region: where a lesion lies (``None`` for an organ).
        laterality: the side of the structure (CID 244), where its code does
            not say it: a modifier of :attr:`anatomic_region` where there is
            one (a lesion), else of :attr:`type` (an organ). ``None`` for
            every chest-abdomen structure.
    """

    category: Code
    type: Code
    anatomic_region: Code | None
    laterality: Code | None = None


def structure_code(structure: str) -> Code:
    """SNOMED CT code of a structure key (``ReportError`` if unknown).

    The code of a cerebral hemisphere does not say which: see
    :func:`structure_laterality`.
    """
    try:
        return STRUCTURE_CODES[structure]
    except KeyError:
        raise ReportError(
            f"unknown structure {structure!r}; expected one of {', '.join(STRUCTURE_CODES)}"
        ) from None


def structure_laterality(structure: str) -> Code | None:
    """The laterality (CID 244) that goes with :func:`structure_code`, or ``None``."""
    structure_code(structure)  # validates the key
    return STRUCTURE_LATERALITY.get(structure)


def lesion_code(structure: str, kind: str | None = None) -> Code:
    """SNOMED CT code of a lesion found in ``structure``.

    Args:
        structure: the structure key it lies in.
        kind: the kind its finding names (:attr:`Segment.lesion_kind`), if
            exactly one. ``None``: the one kind ``structure`` can hold where it
            holds one (a liver lesion is a "hypodense lesion"), the generic
            Lesion where it holds several (a cerebellar mass or cyst), and
            :data:`DEFAULT_LESION_KIND` in a structure that is no lesion site.

    Raises:
        ReportError: unknown structure, unknown kind, or a kind the site
            cannot hold.
    """
    structure_code(structure)  # validates the key
    site_kinds = SITE_KINDS.get(structure)
    if kind is not None:
        if kind not in LESION_CODES:
            raise ReportError(f"unknown lesion kind {kind!r}; expected one of "
                              f"{', '.join(LESION_CODES)}")
        if site_kinds is not None and kind not in site_kinds:
            raise ReportError(f"the {structure} holds no lesion of kind {kind!r}; expected "
                              f"one of {', '.join(site_kinds)}")
        return LESION_CODES[kind]
    if site_kinds is None:
        return LESION_CODES[DEFAULT_LESION_KIND]
    return LESION_CODES[site_kinds[0]] if len(site_kinds) == 1 else GENERIC_LESION


def named_structure(text: str) -> str | None:
    """The coded structure a free-text question names (:func:`tomoscribe.report.named_organ`).

    The longest structure key in the text wins: "left cerebral hemisphere",
    not any shorter key it might contain.
    """
    return named_organ(text, STRUCTURE_CODES)


def answer_coding(question: str) -> SegmentCoding:
    """Category, type and region of the mask that answers a referring ``question``.

    "segment the lesions in the liver ." is a liver lesion (region liver);
    "segment the lesions ." a lesion without a region; "segment the spleen ."
    the spleen. A question that names neither is coded as the generic
    Anatomical structure (SCT 91723000), so the mask is still written.
    "segment the lesions in the cerebellum ." is a Lesion (the cerebellum can
    hold masses and cysts) in the cerebellum; "segment the left cerebral
    hemisphere ." the cerebral hemisphere with laterality Left.
    """
    organ = named_structure(question)
    if "lesion" in question.lower():
        if organ is None:
            return SegmentCoding(MORPHOLOGICALLY_ALTERED_STRUCTURE,
                                 LESION_CODES[DEFAULT_LESION_KIND], None)
        return SegmentCoding(MORPHOLOGICALLY_ALTERED_STRUCTURE, lesion_code(organ),
                             structure_code(organ), structure_laterality(organ))
    if organ is None:
        return SegmentCoding(ANATOMICAL_STRUCTURE, ANATOMICAL_STRUCTURE, None)
    return SegmentCoding(ANATOMICAL_STRUCTURE, structure_code(organ), None,
                         structure_laterality(organ))


def segment_coding(segment: Segment) -> SegmentCoding:
    """Category, type and region of a :class:`~tomoscribe.report.Segment`.

    Raises:
        ReportError: unknown structure, a kind other than organ / lesion, or
            a lesion kind the structure cannot hold.
    """
    if segment.kind == "organ":
        return SegmentCoding(ANATOMICAL_STRUCTURE, structure_code(segment.structure), None,
                             structure_laterality(segment.structure))
    if segment.kind == "lesion":
        return SegmentCoding(
            MORPHOLOGICALLY_ALTERED_STRUCTURE,
            lesion_code(segment.structure, segment.lesion_kind),
            structure_code(segment.structure),
            structure_laterality(segment.structure),
        )
    raise ReportError(
        f"segment {segment.name!r} has kind {segment.kind!r}; expected 'organ' or 'lesion'"
    )
