"""What a model reads and writes about: its anatomy, its lesions and its images.

A tomoscribe model is trained for one *domain*: CT of the chest and abdomen
(the shipped default) or MR of the head. The architecture is the same; what
differs is written down here, once, and every part that depends on it reads
it from the model's ``config.json`` (``net.domain``):

- the structures it segments, in label order (label = index + 1; the first
  is the region the others lie in: ``"body"``, ``"head"``);
- where lesions are reported, in report order, and the kinds of lesion each
  site can hold (the chest-abdomen sites hold one kind each: a liver lesion
  is a "hypodense lesion", a lung lesion a "nodule"; a cerebral hemisphere
  can hold a mass and a cyst);
- the words of the report grammar (:mod:`tomoscribe.model.text`);
- how image values become the model's two input channels
  (:mod:`tomoscribe.model.preprocess`): CT in Hounsfield units through two
  fixed windows; MR, whose values have no unit, scaled by percentiles of the
  head's own signal.

The chest-abdomen domain is exactly what the models up to 0.6.0 were trained
on: a model folder without ``net.domain`` is read as that domain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["CHEST_ABDOMEN_CT", "DOMAINS", "HEAD_MR", "Domain", "about_other_domain",
           "get_domain"]


@dataclass(frozen=True)
class Domain:
    """One anatomy and modality a model can be trained for.

    Attributes:
        name: the key written to ``config.json`` (``net.domain``).
        description: for people ("CT of the chest and abdomen").
        structures: what the segmentation labels, in label order (label =
            index + 1); ``structures[0]`` is the region everything lies in.
        sites: the structures a lesion is reported in, in report order.
        kinds: for each site, the kinds of lesion it can hold, in report order;
            the order of the sites here fixes the order of the kinds' words in
            the vocabulary (so the chest-abdomen keys stay in the order the
            shipped model's word ids were built in).
        plural, short, short_plural: a kind's words in the findings ("two
            hypodense lesions") and in the impression ("liver lesions").
        intensity: ``"ct"`` (Hounsfield units, fixed windows) or ``"mr"``
            (no unit: scaled by percentiles of the study's own signal).
        series_label: added to the descriptions of the series a model of this
            domain writes (:attr:`tomoscribe.report.Report.reads`); empty for
            the chest-abdomen CT, whose descriptions stay as viewers' hanging
            protocols know them.
        lesion_contrast: for each kind of lesion, how far a segmented lesion
            must stand out from the organ around it, in standard deviations
            of that organ's voxels next to it (positive: brighter, negative:
            darker), for the report to name a lesion its text left out
            (:meth:`tomoscribe.model.scribe.Scribe.second_look`); a kind not
            here is never added.
    """

    name: str
    description: str
    structures: tuple[str, ...]
    sites: tuple[str, ...]
    kinds: dict[str, tuple[str, ...]]
    plural: dict[str, str]
    short: dict[str, str]
    short_plural: dict[str, str]
    intensity: str
    series_label: str = ""
    lesion_contrast: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.intensity not in ("ct", "mr"):
            raise ValueError(f"intensity must be 'ct' or 'mr', not {self.intensity!r}")
        if set(self.sites) - set(self.structures[1:]):
            raise ValueError("every lesion site must be a structure other than the region")
        if set(self.kinds) != set(self.sites):
            raise ValueError("every lesion site needs its kinds, and only sites have kinds")
        words = {k for ks in self.kinds.values() for k in ks}
        for table in (self.plural, self.short, self.short_plural):
            if set(table) != words:
                raise ValueError("every lesion kind needs its plural and short forms")

    @property
    def lesion_kinds(self) -> tuple[str, ...]:
        """Every kind of lesion, each once, in :attr:`kinds` order (the vocabulary's)."""
        return tuple(dict.fromkeys(k for ks in self.kinds.values() for k in ks))

    @property
    def lesion_label(self) -> int:
        """The label of every lesion in a ground-truth label map (after the structures)."""
        return len(self.structures) + 1

    @property
    def num_classes(self) -> int:
        """Segmentation classes: background, the structures, lesion."""
        return self.lesion_label + 1

    def asks_for_lesions(self, text: str) -> bool:
        """Whether a free-text question asks about lesions: it says "lesion" or a kind's words.

        Whole words only: "segment the nodules in the right lung" does, "segment
        the liver" does not, nor would a word that merely starts like a kind.
        """
        words = {"lesion", "lesions"}
        for kind in self.lesion_kinds:
            words |= {kind, self.plural[kind], self.short[kind], self.short_plural[kind]}
        q = " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "
        return any(f" {w} " in q for w in words)

    def single_kind(self, site: str) -> str | None:
        """The one kind of lesion ``site`` can hold, or ``None`` where it can hold several."""
        kinds = self.kinds.get(site, ())
        return kinds[0] if len(kinds) == 1 else None


#: CT of the chest and abdomen: the shipped model's domain (the phantoms of
#: :mod:`tomoscribe.phantom`)
CHEST_ABDOMEN_CT = Domain(
    name="ct-chest-abdomen",
    description="CT of the chest and abdomen",
    structures=("body", "right lung", "left lung", "liver", "spleen", "right kidney",
                "left kidney"),
    sites=("right lung", "left lung", "liver", "spleen", "right kidney", "left kidney"),
    kinds={"liver": ("hypodense lesion",), "right lung": ("nodule",),
           "left lung": ("nodule",), "spleen": ("hypodense lesion",),
           "right kidney": ("cyst",), "left kidney": ("cyst",)},
    plural={"hypodense lesion": "hypodense lesions", "nodule": "nodules", "cyst": "cysts"},
    short={"hypodense lesion": "lesion", "nodule": "nodule", "cyst": "cyst"},
    short_plural={"hypodense lesion": "lesions", "nodule": "nodules", "cyst": "cysts"},
    intensity="ct",
    # chosen on 120 validation phantoms (0.8.0, the contrast table of
    # benchmarks/misses.py, 2026-11-25): the refiner's false components in
    # the liver, spleen and kidneys were at most 1.17 SD darker than their
    # organ, the false ones in a lung at most 2.91 SD brighter, true nodules
    # at least 6.44 brighter
    lesion_contrast={"nodule": 4.0, "hypodense lesion": -1.5, "cyst": -1.5},
)

#: MR of the head (the phantoms of :mod:`tomoscribe.phantom_head`): no model is
#: shipped for it yet
HEAD_MR = Domain(
    name="mr-head",
    description="MR of the head",
    structures=("head", "right cerebral hemisphere", "left cerebral hemisphere", "cerebellum",
                "lateral ventricles"),
    sites=("right cerebral hemisphere", "left cerebral hemisphere", "cerebellum"),
    kinds={"right cerebral hemisphere": ("mass", "cyst"),
           "left cerebral hemisphere": ("mass", "cyst"), "cerebellum": ("mass", "cyst")},
    plural={"mass": "masses", "cyst": "cysts"},
    short={"mass": "mass", "cyst": "cyst"},
    short_plural={"mass": "masses", "cyst": "cysts"},
    intensity="mr",
    series_label="MR of the head",
)

DOMAINS: dict[str, Domain] = {d.name: d for d in (CHEST_ABDOMEN_CT, HEAD_MR)}


def get_domain(name: str | Domain | None) -> Domain:
    """The domain called ``name`` (``None``: the chest-abdomen CT of older model folders).

    Raises:
        ValueError: no such domain (the message lists the known ones).
    """
    if isinstance(name, Domain):
        return name
    if name is None or name == "":
        return CHEST_ABDOMEN_CT
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}") from None


#: words of a structure's name that name no structure by themselves
_SIDE_WORDS = frozenset({"left", "right", "lateral"})


def _structure_words(domain: Domain) -> frozenset[str]:
    """Words that name one of ``domain``'s structures (the region excluded), singular and plural."""
    words = {w for name in domain.structures[1:] for w in name.split()} - _SIDE_WORDS
    return frozenset(words | {w + "s" for w in words} | {w.removesuffix("s") for w in words})


def about_other_domain(question: str, domain: Domain) -> Domain | None:
    """The domain a question is about when that is not ``domain``, else ``None``.

    A question that names a structure of another domain (``"is there a lesion
    in the liver ?"``: chest-abdomen CT) and none of ``domain``'s is about that
    domain. A question that names no structure (``"are there any focal
    findings ?"``), or one of ``domain``'s, is for ``domain`` too. Used to
    route standing questions when one installation runs several models.
    """
    words = set("".join(c if c.isalnum() else " " for c in question.lower()).split())
    if words & _structure_words(domain):
        return None
    for other in DOMAINS.values():
        if other.name != domain.name and words & _structure_words(other):
            return other
    return None
