"""The :class:`Report`: what the model says about one volume.

A report is produced by :meth:`tomoscribe.model.scribe.Scribe.generate` and
consumed by the writers in :mod:`tomoscribe.writers`; writers never run the
model. Slice indices refer to ``Volume.slices``; the label map lies on the
source volume's own grid, so every voxel maps back to a source slice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from tomoscribe.domain import CHEST_ABDOMEN_CT

#: Anatomical structures the default model knows (:data:`tomoscribe.domain.CHEST_ABDOMEN_CT`).
#: The key is used in label names, findings and the writers' code tables
#: (tomoscribe.writers.codes).
ORGANS: tuple[str, ...] = CHEST_ABDOMEN_CT.structures

#: Kinds of focal finding, keyed by the organ they lie in (one kind per organ).
LESION_KINDS: dict[str, str] = {site: kinds[0] for site, kinds in CHEST_ABDOMEN_CT.kinds.items()}


def named_organ(text: str, names: Iterable[str] = ORGANS) -> str | None:
    """The organ a free-text question names (the longest of ``names`` in it), or ``None``.

    ``"body"`` is never matched: it is the default region, not what is asked.
    """
    q = " ".join(text.lower().split())
    named = sorted((n for n in names if n != "body" and n in q), key=len, reverse=True)
    return named[0] if named else None


@dataclass(frozen=True)
class Segment:
    """One segment of the label map.

    Attributes:
        label: value of its voxels in :attr:`Report.label_map` (1..255).
        name: human-readable label, e.g. ``"liver"`` or ``"liver lesion 1"``.
        structure: the organ key (one of :data:`ORGANS`, or of the model's
            domain, :mod:`tomoscribe.domain`) it is or lies in.
        kind: ``"organ"`` or ``"lesion"``.
        lesion_kind: for a lesion, the kind its finding names ("mass",
            "cyst"...) where it names exactly one; ``None``: the kind of its
            structure, where that has one, else a lesion of no stated kind.
    """

    label: int
    name: str
    structure: str
    kind: str
    lesion_kind: str | None = None


@dataclass
class Finding:
    """One finding of the report.

    Attributes:
        text: the sentence as the model wrote it.
        structure: the organ key it concerns.
        key_slices: indices into ``Volume.slices`` that show it best, most
            relevant first (at least one).
        segment: label of its segment in the label map, or ``None``.
        size_mm: longest in-plane diameter measured on the label map, if any.
        volume_ml: volume of its segment in millilitres, if any.
    """

    text: str
    structure: str
    key_slices: list[int]
    segment: int | None = None
    size_mm: float | None = None
    volume_ml: float | None = None


@dataclass(frozen=True)
class Answer:
    """A question put to the model and its answer."""

    question: str
    answer: str
    key_slices: tuple[int, ...] = ()
    #: what a referring question asked to segment, ``(D, H, W)`` bool on the
    #: source grid (``None``: no mask; see :mod:`tomoscribe.model.segtoken`)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: where :attr:`answer` is taken from the report's findings (a templated
    #: question about lesions), what the language model answered when asked
    #: the question alone; ``None`` where :attr:`answer` is the model's own
    model_answer: str | None = None


@dataclass
class Report:
    """The model's draft report for one volume.

    Attributes:
        findings: positive findings; empty for a normal study.
        impression: one or a few sentences.
        text: the full generated report text (findings then impression).
        answers: one :class:`Answer` per question asked.
        slice_scores: ``(D,)`` float32 relevance of each slice, sums to 1.
        label_map: ``(D, H, W)`` uint8 on the source volume's grid; 0 is
            background, other values are :attr:`Segment.label`.
        segments: the segments present in ``label_map``.
        model_name, model_version: identity of the model that wrote it.
        reads: what a model of another domain than the default's reads, for
            people ("MR of the head"); empty for the chest-abdomen CT models.
            The writers add it to their series descriptions, so that a study
            read by two models lists two segmentations a radiologist can
            tell apart.
        withheld: finding sentences the language model wrote for an organ in
            which the segmentation shows no lesion; they are not in
            ``findings``, ``text`` or ``impression`` (every finding reported
            has a lesion segment).
        added: finding sentences the report names that the language model's
            text left out: a lesion the segmentation shows in that organ that
            stands out plainly from it on the image
            (:meth:`tomoscribe.model.scribe.Scribe.second_look`); they are in
            ``findings``, ``text`` and ``impression`` like the others.
    """

    findings: list[Finding]
    impression: str
    text: str
    answers: list[Answer] = field(default_factory=list)
    slice_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    label_map: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.uint8))
    segments: list[Segment] = field(default_factory=list)
    model_name: str = "tomoscribe-tiny"
    model_version: str = "0.1.0"
    reads: str = ""
    withheld: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)

    def segment(self, label: int) -> Segment:
        """Return the segment with this label (``KeyError`` if absent)."""
        for seg in self.segments:
            if seg.label == label:
                return seg
        raise KeyError(label)
