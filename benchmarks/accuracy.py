"""Accuracy of a model on held-out phantoms, beside baselines that cannot see the image.

    .venv/bin/python benchmarks/accuracy.py [--n 60] [--model-dir DIR] [--json PATH]

Every phantom comes from the ``test`` seed range (:data:`tomoscribe.phantom.SPLITS`),
which training never draws from. Rows:

* ``model``: the model as shipped;
* ``image-blind``: the same model with its image tokens zeroed (the language
  model alone): what the text side knows without looking;
* ``majority``: always the most frequent finding set of the training range.

Columns: findings precision / recall / F1 (organ-level: a finding is correct
when the report names an organ that has a lesion), studies whose findings are
exactly right, false findings on normal studies, closed-question accuracy
(yes/no questions about each organ; as answered, from the report's findings,
and as the language model answers them asked alone), lesion Dice per size band (per lesion,
on the source grid, of the lesion segments the report keeps: those of organs
its text names) and Dice of each large organ (model only: the baselines have
no segmentation). The segmentation alone is scored too: per size band, the
share of lesions with any predicted lesion voxel and their Dice against every
predicted lesion voxel (the refiner's labels, else the head's), and the
predicted lesion components that touch no lesion.

A second table (issue #3) scores, for the same rows:

* report text: corpus BLEU-4 (brevity penalty; a zero n-gram match count
  becomes 0.1, Chen & Cherry method 1) and mean ROUGE-L F (beta = 1) of the
  generated report against :func:`tomoscribe.phantom.report_text`, on the
  words of :meth:`~tomoscribe.model.text.WordTokenizer.words` (punctuation
  marks are words); definitions in ``benchmarks/textmetrics.py``;
* closed VQA: accuracy of every yes/no template of
  :data:`~tomoscribe.model.text.QUESTION_TEMPLATES` (each organ template asked
  once per organ, the study-level one once), per template and overall;
* open VQA: exact match and token F1 of the "how many" and "which organ"
  answers against :func:`~tomoscribe.model.text.answer_for`;
* both as answered (the templated questions from the report's findings,
  :meth:`~tomoscribe.model.scribe.Scribe.answer_from_report`) and, in the
  "alone" columns, as the language model answers each question asked alone
  (:attr:`~tomoscribe.report.Answer.model_answer`; EM for the open ones);
* key-slice pointing: for each reported finding in an organ that has a lesion,
  whether its first key slice (source-grid index) holds lesion voxels of that
  organ's lesions in the ground-truth label volume (model and image-blind:
  the key slices come from the segmentation, which both share);
* question pointing: for every question with something to show (an organ's
  lesions, else the organ; all lesions for a study-level question), whether
  the first key image of its answer shows it (what the SR references:
  :meth:`~tomoscribe.model.scribe.Scribe.key_slices_for`, the TG-IS ranking
  among the slices the segmentation supports, or the segmentation alone for
  a 3D-only model); "TG-IS top": the same for the branch's own most relevant
  slice, ungated (the issue's key-slice pointing);
* referring segmentation (models with a ``<seg>`` token): every
  :data:`~tomoscribe.model.text.REFER_TEMPLATES` question (each organ
  template once per organ); whether the model answered with a mask exactly
  when there is something to segment, and the Dice of each mask against
  :func:`~tomoscribe.model.segtoken.refer_target` on the source labels, per
  kind (an organ with its lesions, an organ's lesions, every lesion), as
  the answer carries it (snapped to the refined segmentation) and the
  decoder's own mask;
* the majority row answers each question with its most frequent ground-truth
  answer over the training seeds, and writes the most frequent ground-truth
  report text.

Also printed: peak resident memory of the process (``getrusage``), the
parameter count, and the operations of the image side (encoder,
segmentation head, refiner, ...) on the first study, in GFLOP.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from tomoscribe.model.api import Encoded
from tomoscribe.model.scribe import LESION_LABEL_BASE, Scribe, relevant_source_slices
from tomoscribe.model.segtoken import refer_target
from tomoscribe.model.text import QUESTION_TEMPLATES, REFER_TEMPLATES, WordTokenizer, answer_for
from tomoscribe.phantom import (
    LESION_LABEL,
    ORGAN_LABELS,
    SPLITS,
    Phantom,
    make_phantom,
    muscle_contrast_to_noise,
    render_acquisition,
    report_text,
)
from tomoscribe.report import LESION_KINDS, Answer
from tomoscribe.volume import SliceRef, Volume

try:  # run as a script (benchmarks/ on sys.path) or as benchmarks.accuracy
    from textmetrics import corpus_bleu, rouge_l, token_f1  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    from benchmarks.textmetrics import corpus_bleu, rouge_l, token_f1

ORGANS_SCORED = ("right lung", "left lung", "liver", "spleen", "right kidney", "left kidney")
BANDS = ((10.0, 15.0), (15.0, 25.0), (25.0, 36.0))
#: an organ whose density differs from muscle by less than this many noise
#: standard deviations is "faint" (:func:`tomoscribe.phantom.muscle_contrast_to_noise`)
FAINT_CNR = 0.5


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / s if s else 1.0


class Tally:
    """Counts for one row of the table."""

    def __init__(self) -> None:
        self.tp = self.fp = self.fn = 0
        self.exact = 0
        self.studies = 0
        self.normal = 0
        self.normal_false = 0
        self.qa_right = 0
        self.qa_right_alone = 0  # the language model's answers, asked alone
        self.qa_total = 0

    def add(self, predicted: set[str], truth: set[str]) -> None:
        self.tp += len(predicted & truth)
        self.fp += len(predicted - truth)
        self.fn += len(truth - predicted)
        self.exact += int(predicted == truth)
        self.studies += 1
        if not truth:
            self.normal += 1
            self.normal_false += int(bool(predicted))

    def row(self) -> dict[str, float]:
        p, r, f = _prf(self.tp, self.fp, self.fn)
        return {
            "findings_precision": p,
            "findings_recall": r,
            "findings_f1": f,
            "studies_exact": self.exact / max(self.studies, 1),
            "false_findings_on_normal": self.normal_false / max(self.normal, 1),
            "closed_qa_accuracy": self.qa_right / max(self.qa_total, 1),
            "closed_qa_asked_alone": self.qa_right_alone / max(self.qa_total, 1),
        }


def _yes_no(answer: str) -> str:
    a = answer.lower()
    return "yes" if a.startswith("yes") else "no" if a.startswith("no") else "?"


def _shown(answer: str) -> str:
    """An answer without the note of what the model answered alone (see ``Scribe.generate``)."""
    return answer.split(" (Asked this alone", 1)[0].removesuffix(".")


#: open templates (scored by exact match and token F1); the others are yes/no
OPEN_PREFIXES = ("how many", "which organ")
#: the template of the original closed-QA column, asked through ``generate``
LESION_TEMPLATE = "is there a lesion in the {organ} ?"


def _is_open(template: str) -> bool:
    return template.startswith(OPEN_PREFIXES)


def vqa_items() -> list[tuple[str, str, str]]:
    """Every question asked per study: ``(template, organ, question)``.

    Organ templates are asked once per scored organ, the others once (organ
    ``""``). The :data:`LESION_TEMPLATE` items come first, in
    :data:`ORGANS_SCORED` order: they are the questions of the original
    closed-QA column.
    """
    items: list[tuple[str, str, str]] = []
    templates = [LESION_TEMPLATE] + [t for t in QUESTION_TEMPLATES if t != LESION_TEMPLATE]
    for t in templates:
        if "{organ}" in t:
            items += [(t, o, t.format(organ=o, kind=LESION_KINDS[o])) for o in ORGANS_SCORED]
        else:
            items.append((t, "", t))
    return items


def _lesion_slices(ph: Phantom, comps: np.ndarray, aff: np.ndarray) -> dict[str, set[int]]:
    """Source slices holding ground-truth lesion voxels, per organ with lesions.

    A lesion's voxels are the connected component of :data:`LESION_LABEL`
    voxels at its centre; when the centre voxel is no lesion voxel (a lesion
    cut by the body outline), the slices its sphere spans are used.
    """
    from scipy import ndimage

    boxes = ndimage.find_objects(comps)
    out: dict[str, set[int]] = {}
    for les in ph.lesions:
        centre = np.linalg.solve(aff, np.array([*les.centre, 1.0]))[:3]
        k, r, c = (int(np.clip(round(v), 0, s - 1)) for v, s in zip(centre, comps.shape,
                                                                    strict=True))
        cid = int(comps[k, r, c])
        box = boxes[cid - 1] if cid else None
        if box is not None:
            ks = set(range(box[0].start, box[0].stop))
        else:
            half = les.diameter_mm / 2.0 / abs(aff[2, 0])
            ks = {kk for kk in range(comps.shape[0]) if abs(kk - centre[0]) <= half}
        out.setdefault(les.organ, set()).update(ks)
    return out


def _question_slices(ph: Phantom, labels: np.ndarray, aff: np.ndarray,
                     items: list[tuple[str, str, str]]) -> list[set[int]]:
    """Per question, the source slices that show what it is about (empty: nothing to show).

    A question about an organ: the slices of that organ's lesions when it has
    some, else the slices of the organ; a study-level question: the slices of
    every lesion (none for a normal study).
    """
    from scipy import ndimage

    comps, _n = ndimage.label(labels == LESION_LABEL)
    lesion_slices = _lesion_slices(ph, comps, aff)
    every = set().union(*lesion_slices.values()) if lesion_slices else set()
    out: list[set[int]] = []
    for _t, organ, _q in items:
        if not organ:
            out.append(set(every))
        elif organ in lesion_slices:
            out.append(set(lesion_slices[organ]))
        else:
            present = (labels == ORGAN_LABELS[organ]).any(axis=(1, 2))
            out.append({int(k) for k in np.nonzero(present)[0]})
    return out


class Pointing:
    """Whether each question's key image shows what the question is about.

    ``question_*``: the answer's first key image is one of the target slices;
    ``tgis_*``: the TG-IS branch's own top slice is (ungated; models with a
    slice branch only). Questions with nothing to show (an empty target) are
    not counted.
    """

    def __init__(self) -> None:
        self.question_hit = 0
        self.question_n = 0
        self.tgis_hit = 0
        self.tgis_n = 0

    def add(self, scribe: Scribe, enc: Encoded, answers: Sequence[Answer],
            questions: Sequence[str], targets: Sequence[set[int]], blind: bool) -> None:
        """Score one study's answers to ``questions`` against ``targets`` (source slices)."""
        for ans, q, want in zip(answers, questions, targets, strict=True):
            if not want:
                continue
            self.question_n += 1
            self.question_hit += int(bool(ans.key_slices) and ans.key_slices[0] in want)
            if "slice_keys" in enc.extra:
                _tokens, rel = scribe.prefix(enc, scribe.tok.encode(q), blind=blind)
                top = relevant_source_slices(rel, enc.extra["grid"], 1)
                if top:
                    self.tgis_n += 1
                    self.tgis_hit += int(top[0] in want)

    def row(self) -> dict[str, float | int | None]:
        return {
            "question_hit": (self.question_hit / self.question_n) if self.question_n else None,
            "question_n": self.question_n,
            "tgis_hit": (self.tgis_hit / self.tgis_n) if self.tgis_n else None,
        }


class Extra:
    """Text, VQA and key-slice counts for one row of the second table."""

    def __init__(self) -> None:
        self.hyps: list[list[str]] = []
        self.refs: list[list[str]] = []
        self.rouge: list[float] = []
        self.closed: dict[str, list[int]] = {}
        self.open_em: dict[str, list[int]] = {}
        self.open_f1: dict[str, list[float]] = {}
        # the language model's own answers (Answer.model_answer, where the
        # answer shown is the report's)
        self.closed_alone: dict[str, list[int]] = {}
        self.open_em_alone: dict[str, list[int]] = {}
        self.open_f1_alone: dict[str, list[float]] = {}
        self.point_hit = 0
        self.point_n = 0
        self.pointing = Pointing()

    def add_text(self, hyp: str, ref: str) -> None:
        h, r = WordTokenizer.words(hyp), WordTokenizer.words(ref)
        self.hyps.append(h)
        self.refs.append(r)
        self.rouge.append(rouge_l(h, r))

    def add_answer(self, template: str, answer: str, gold: str, alone: str | None = None
                   ) -> None:
        """Score ``answer`` (as shown) and ``alone`` (the model asked alone; else ``answer``)."""
        alone = answer if alone is None else alone
        if _is_open(template):
            g = WordTokenizer.words(gold)
            a = WordTokenizer.words(_shown(answer))
            self.open_em.setdefault(template, []).append(int(a == g))
            self.open_f1.setdefault(template, []).append(token_f1(a, g))
            alone_words = WordTokenizer.words(alone)
            self.open_em_alone.setdefault(template, []).append(int(alone_words == g))
            self.open_f1_alone.setdefault(template, []).append(token_f1(alone_words, g))
        else:
            self.closed.setdefault(template, []).append(int(_yes_no(answer) == gold))
            self.closed_alone.setdefault(template, []).append(int(_yes_no(alone) == gold))

    def row(self) -> dict[str, object]:
        def mean(v: list[int] | list[float]) -> float | None:
            return float(np.mean(v)) if v else None

        closed_all = [x for v in self.closed.values() for x in v]
        em_all = [x for v in self.open_em.values() for x in v]
        closed_alone = [x for v in self.closed_alone.values() for x in v]
        em_alone = [x for v in self.open_em_alone.values() for x in v]
        f1_alone = [x for v in self.open_f1_alone.values() for x in v]
        f1_all = [x for v in self.open_f1.values() for x in v]
        pointing = self.pointing.row()
        return {
            "bleu4": corpus_bleu(self.hyps, self.refs),
            "rouge_l_f": mean(self.rouge),
            "closed_vqa_accuracy": mean(closed_all),
            "closed_vqa_by_template": {t: mean(v) for t, v in self.closed.items()},
            "closed_vqa_asked_alone": mean(closed_alone),
            "closed_vqa_asked_alone_by_template": {t: mean(v)
                                                   for t, v in self.closed_alone.items()},
            "open_vqa_exact_match_asked_alone": mean(em_alone),
            "open_vqa_token_f1_asked_alone": mean(f1_alone),
            "open_vqa_em_asked_alone_by_template": {t: mean(v)
                                                    for t, v in self.open_em_alone.items()},
            "open_vqa_exact_match": mean(em_all),
            "open_vqa_token_f1": mean(f1_all),
            "open_vqa_by_template": {t: {"exact_match": mean(self.open_em[t]),
                                         "token_f1": mean(self.open_f1[t])}
                                     for t in self.open_em},
            "key_slice_pointing": (self.point_hit / self.point_n) if self.point_n else None,
            "key_slice_findings": self.point_n,
            "question_pointing": pointing["question_hit"],
            "question_pointing_n": pointing["question_n"],
            "tgis_top_slice_pointing": pointing["tgis_hit"],
        }


def _closed_truth(template: str, organ: str, counts: Counter[str]) -> str:
    """The right yes/no answer, from the lesion counts (not from ``answer_for``)."""
    if template.startswith("are there"):
        return "yes" if sum(counts.values()) else "no"
    has = bool(counts.get(organ, 0))
    if template.startswith("is the {organ} normal"):
        return "no" if has else "yes"
    return "yes" if has else "no"  # "is there a lesion in", "does the ... contain"


def _gold_answers(ph: Phantom, items: list[tuple[str, str, str]],
                  disagree: set[str] | None = None) -> list[str]:
    """Ground-truth answers: yes/no from the lesion counts, open ones from ``answer_for``.

    Templates where ``answer_for`` gives another yes/no answer are added to
    ``disagree``.
    """
    counts = Counter(les.organ for les in ph.lesions)
    out = []
    for t, o, _q in items:
        ref = answer_for(t, o, counts)
        if _is_open(t):
            out.append(ref)
            continue
        truth = _closed_truth(t, o, counts)
        if disagree is not None and ref != truth:
            disagree.add(t)
        out.append(truth)
    return out


def _encode_flops(scribe: Scribe, vol: Volume) -> dict[str, float]:
    """GFLOP of :meth:`Scribe.encode` on one volume, by top-level module (and in total).

    Counted by ``torch.utils.flop_counter`` (convolutions and matrix products;
    element-wise work is not counted), with the plain ("math") attention and
    without the transformer layers' fused inference path: the counter does
    not see inside those kernels (it gave a ViT encoder's convolutions only,
    0.14 GFLOP of its 0.63; see ``encoders.encoder_cost``).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            scribe.encode(vol, early_refusal=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    counts = counter.get_flop_counts()
    out = {"total": counter.get_total_flops() / 1e9}
    for name, child in scribe.net.named_children():
        key = type(child).__name__
        if key in counts:
            out[name] = sum(counts[key].values()) / 1e9
    return out


def _fmt_mean(v: tuple[float | None, int]) -> str:
    """``"0.912 (n=12)"`` of a ``(mean, n)`` pair."""
    return f"{'n/a' if v[0] is None else f'{v[0]:.3f}'} (n={v[1]})"


def _fmt(v: object, width: int) -> str:
    return f"{v:>{width}.3f}" if isinstance(v, float) else f"{'n/a':>{width}}"


def _print_second_table(table: dict[str, dict[str, object]], n_questions: int) -> None:
    """Text, VQA and key-slice pointing per row, then VQA per template."""
    cols = [("bleu4", "BLEU-4"), ("rouge_l_f", "ROUGE-L F"),
            ("closed_vqa_accuracy", "closed VQA"), ("open_vqa_exact_match", "open EM"),
            ("open_vqa_token_f1", "open F1"), ("closed_vqa_asked_alone", "closed alone"),
            ("open_vqa_exact_match_asked_alone", "open EM alone"),
            ("key_slice_pointing", "key-slice hit"),
            ("question_pointing", "question hit"), ("tgis_top_slice_pointing", "TG-IS top")]
    print(f"\nreport text, VQA ({n_questions} questions per study), key-slice pointing "
          "(findings; questions)")
    print(f"{'row':<12}" + "".join(f"{h:>14}" for _c, h in cols) + f"{'(n)':>12}")
    for name, r in table.items():
        n = (f"{r['key_slice_findings']}; {r['question_pointing_n']}" if name != "majority"
             else "-")
        print(f"{name:<12}" + "".join(_fmt(r[c], 14) for c, _h in cols) + f"{n!s:>12}")
    templates: list[str] = []
    for r in table.values():
        for key in ("closed_vqa_by_template", "open_vqa_by_template"):
            by = r[key]
            assert isinstance(by, dict)
            templates += [t for t in by if t not in templates]
    print(f"{'template (closed: accuracy; open: EM / F1)':<44}"
          + "".join(f"{name:>18}" for name in table) + f"{'model asked alone':>20}")
    model = table.get("model", {})
    alone_closed = model.get("closed_vqa_asked_alone_by_template", {})
    alone_open = model.get("open_vqa_em_asked_alone_by_template", {})
    assert isinstance(alone_closed, dict) and isinstance(alone_open, dict)
    for t in templates:
        cells = []
        for r in table.values():
            closed, opened = r["closed_vqa_by_template"], r["open_vqa_by_template"]
            assert isinstance(closed, dict) and isinstance(opened, dict)
            if t in closed:
                cells.append(_fmt(closed[t], 18))
            else:
                em, f1 = opened[t]["exact_match"], opened[t]["token_f1"]
                cells.append(f"{_fmt(em, 0).strip()} / {_fmt(f1, 0).strip()}".rjust(18))
        cells.append(_fmt(alone_closed.get(t, alone_open.get(t)), 20))
        print(f"{t:<44}" + "".join(cells))


class Refer:
    """Referring segmentation (``<seg>``) for one row: answers and mask Dice per kind."""

    KINDS = ("organ", "organ lesions", "every lesion")

    def __init__(self) -> None:
        self.right = 0
        self.asked = 0
        self.dice: dict[str, list[float]] = {k: [] for k in self.KINDS}
        self.raw: dict[str, list[float]] = {k: [] for k in self.KINDS}  # before snapping
        self.missing: dict[str, int] = dict.fromkeys(self.KINDS, 0)

    def add(self, kind: str, answer: Answer, truth: np.ndarray) -> None:
        """Score one answer against the true mask (empty: the answer should be none)."""
        self.asked += 1
        has_mask = answer.mask is not None
        self.right += int(has_mask == bool(truth.any()))
        if truth.any():
            if has_mask:
                self.dice[kind].append(_dice(answer.mask, truth))  # type: ignore[arg-type]
            else:
                self.missing[kind] += 1

    def row(self) -> dict[str, object]:
        return {"answer_accuracy": self.right / self.asked if self.asked else None,
                "questions": self.asked,
                "dice": {k: float(np.mean(v)) if v else None for k, v in self.dice.items()},
                "dice_decoder_alone": {k: float(np.mean(v)) if v else None
                                       for k, v in self.raw.items()},
                "masks": {k: len(v) for k, v in self.dice.items()},
                # every question with something to segment, a missing mask as 0
                "dice_missing_as_zero": {
                    k: (float(np.sum(v)) / (len(v) + self.missing[k])
                        if len(v) + self.missing[k] else None) for k, v in self.dice.items()},
                "no_mask_given": self.missing}


def refer_items(organs_scored: Sequence[str] = ORGANS_SCORED
                ) -> list[tuple[str, str, str | None]]:
    """Every referring question asked per study: ``(template, kind, organ or None)``."""
    out: list[tuple[str, str, str | None]] = []
    for t in REFER_TEMPLATES:
        kind = ("every lesion" if "{organ}" not in t else
                "organ lesions" if t.startswith("segment the lesions") else "organ")
        organs: list[str | None] = list(organs_scored) if "{organ}" in t else [None]
        out += [(t, kind, o) for o in organs]
    return out


def score_referring(scribe: Scribe, enc: Encoded, labels: np.ndarray, refer: dict[str, Refer],
                    asks: list[tuple[str, str, str | None]], organ_labels: Mapping[str, int],
                    lesion_label: int) -> None:
    """Ask every referring question of ``asks`` (model and image-blind rows) and score it.

    The truth is :func:`~tomoscribe.model.segtoken.refer_target` on the source
    ``labels``; for the model row, the decoder's own mask (before snapping) is
    scored too.
    """
    qs = [t.format(organ=o) if o else t for t, _k, o in asks]
    truths = [refer_target(labels, t, organ_labels[o] if o else None, lesion_label,
                           tuple(organ_labels.values())) for t, _k, o in asks]
    for name, blind_row in (("model", False), ("image-blind", True)):
        got = scribe.generate(enc, qs, blind=blind_row).answers
        for (_t, kind, _o), q, ans, truth in zip(asks, qs, got, truths, strict=True):
            refer[name].add(kind, ans, truth)
            if ans.mask is not None and truth.any() and not blind_row:
                _a, raw = scribe.refer(enc, q, snap=False)
                if raw is not None:
                    refer[name].raw[kind].append(_dice(raw, truth))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60, help="phantoms")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="seed range: choose between models on val, report on test")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/accuracy.json"))
    args = ap.parse_args(argv)

    wall0 = time.perf_counter()
    scribe = Scribe.load(args.model_dir)
    seeds = list(SPLITS[args.split][: args.n])
    items = vqa_items()
    n_lesion_q = len(ORGANS_SCORED)  # items[:n_lesion_q]: the original closed-QA questions
    # majority baseline over 2000 training seeds: the most frequent finding set,
    # report text, and answer to each question
    train = [make_phantom(s) for s in SPLITS["train"][:2000]]
    train_sets = Counter(frozenset(les.organ for les in ph.lesions) for ph in train)
    majority = set(train_sets.most_common(1)[0][0])
    majority_text = Counter(report_text(ph) for ph in train).most_common(1)[0][0]
    train_answers = [_gold_answers(ph, items) for ph in train]
    majority_answers = [Counter(a[j] for a in train_answers).most_common(1)[0][0]
                        for j in range(len(items))]
    del train, train_answers

    rows = {"model": Tally(), "image-blind": Tally(), "majority": Tally()}
    organ_dice: dict[str, list[float]] = {o: [] for o in ORGANS_SCORED}
    organ_dice_cnr: dict[str, dict[str, list[float]]] = {
        o: {"faint": [], "visible": []} for o in ORGANS_SCORED}
    band_dice: dict[str, list[float]] = {f"{lo:.0f}-{hi:.0f} mm": [] for lo, hi in BANDS}
    # the segmentation alone, before the report decides which lesions to keep
    seg_dice: dict[str, list[float]] = {f"{lo:.0f}-{hi:.0f} mm": [] for lo, hi in BANDS}
    seg_found: dict[str, list[bool]] = {f"{lo:.0f}-{hi:.0f} mm": [] for lo, hi in BANDS}
    seg_false = 0
    refer = ({"model": Refer(), "image-blind": Refer()} if scribe.net.segtoken is not None
             else {})
    seconds: list[float] = []
    extra = {name: Extra() for name in rows}
    disagree: set[str] = set()
    for i, seed in enumerate(seeds):
        ph = make_phantom(seed)
        hu, labels, aff = render_acquisition(ph)
        vol = Volume(hu, aff, [SliceRef(f"2.25.{seed}.{k}", "1.2.840.10008.5.1.4.1.1.2")
                               for k in range(hu.shape[0])])
        truth = {les.organ for les in ph.lesions}
        counts = Counter(les.organ for les in ph.lesions)
        questions = [q for _t, _o, q in items[:n_lesion_q]]

        if i == 0:
            first = vol  # its operations are counted after the loop (and the peak memory)
        t0 = time.perf_counter()
        enc = scribe.encode(vol, early_refusal=False)
        report = scribe.generate(enc, questions)
        seconds.append(time.perf_counter() - t0)
        blind = scribe.generate(enc, questions, blind=True)

        for name, rep in (("model", report), ("image-blind", blind)):
            rows[name].add({f.structure for f in rep.findings}, truth)
            for ans, organ in zip(rep.answers, ORGANS_SCORED, strict=True):
                want = "yes" if counts.get(organ) else "no"
                rows[name].qa_total += 1
                rows[name].qa_right += int(_yes_no(ans.answer) == want)
                rows[name].qa_right_alone += int(
                    _yes_no(ans.model_answer or ans.answer) == want)
        # every question, outside the timed part: answers and their key slices
        gold = _gold_answers(ph, items, disagree)
        ref_text = report_text(ph)
        asked = {"model": scribe.generate(enc, [q for _t, _o, q in items]),
                 "image-blind": scribe.generate(enc, [q for _t, _o, q in items], blind=True)}
        targets = _question_slices(ph, labels, aff, items)
        for name, rep in (("model", report), ("image-blind", blind)):
            for (t, _o, _q), ans, g in zip(items, asked[name].answers, gold, strict=True):
                extra[name].add_answer(t, ans.answer, g, ans.model_answer)
            extra[name].add_text(rep.text, ref_text)
            extra[name].pointing.add(scribe, enc, asked[name].answers, [q for _t, _o, q in items],
                                     targets, blind=name == "image-blind")
        extra["majority"].add_text(majority_text, ref_text)
        for (t, _o, _q), ans, g in zip(items, majority_answers, gold, strict=True):
            extra["majority"].add_answer(t, ans, g)
        rows["majority"].add(majority, truth)
        for organ in ORGANS_SCORED:
            rows["majority"].qa_total += 1
            right = int((organ in majority) == bool(counts.get(organ)))
            rows["majority"].qa_right += right
            rows["majority"].qa_right_alone += right

        for organ in ORGANS_SCORED:
            lab = ORGAN_LABELS[organ]
            organ_dice[organ].append(_dice(report.label_map == lab, labels == lab))
            faint = muscle_contrast_to_noise(ph, organ) < FAINT_CNR
            organ_dice_cnr[organ]["faint" if faint else "visible"].append(organ_dice[organ][-1])
        # per-lesion Dice: truth component vs predicted lesion voxels near it
        from scipy import ndimage

        pred_les = report.label_map >= LESION_LABEL_BASE
        seg_labels = enc.extra.get("refined")
        if seg_labels is None:  # a model without a refiner: the head's labels on the source grid
            seg_labels = enc.extra["grid"].to_source_labels(
                enc.seg_logits.argmax(dim=1)[0].to(torch.uint8).numpy())
        seg_les = seg_labels == scribe.cfg.lesion_class
        found, n_found = ndimage.label(seg_les)
        seg_false += sum(1 for c in range(1, n_found + 1)
                         if not (labels[found == c] == LESION_LABEL).any())
        comps, _n = ndimage.label(labels == LESION_LABEL)
        truth_slices = _lesion_slices(ph, comps, aff)
        for name, rep in (("model", report), ("image-blind", blind)):
            for f in rep.findings:
                if f.structure in truth_slices and f.key_slices:
                    extra[name].point_n += 1
                    extra[name].point_hit += int(f.key_slices[0] in truth_slices[f.structure])
        for les in ph.lesions:
            centre = np.linalg.solve(aff, np.array([*les.centre, 1.0]))[:3]
            k, r, c = (int(np.clip(round(v), 0, s - 1)) for v, s in zip(centre, hu.shape,
                                                                        strict=True))
            cid = comps[k, r, c]
            if cid == 0:
                continue
            t_mask = comps == cid
            near = ndimage.binary_dilation(t_mask, iterations=3)
            d = _dice(pred_les & near, t_mask)
            for lo, hi in BANDS:
                if lo <= les.diameter_mm < hi:
                    band = f"{lo:.0f}-{hi:.0f} mm"
                    band_dice[band].append(d)
                    seg_dice[band].append(_dice(seg_les & near, t_mask))
                    seg_found[band].append(bool((seg_les & t_mask).any()))
        if refer:  # referring segmentation: the <seg> answers and their masks
            score_referring(scribe, enc, labels, refer, refer_items(), ORGAN_LABELS,
                            LESION_LABEL)
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{len(seeds)} studies", file=sys.stderr, flush=True)

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    # counting under torch's dispatch mode takes more memory than running
    flops = _encode_flops(scribe, first)
    table = {name: t.row() for name, t in rows.items()}
    result = {
        "model": scribe.name,
        "version": scribe.version,
        "split": args.split,
        "test_studies": len(seeds),
        "normal_studies": rows["model"].normal,
        "rows": table,
        "organ_dice": {o: float(np.mean(v)) for o, v in organ_dice.items()},
        "organ_dice_by_muscle_contrast": {
            o: {k: (float(np.mean(v)) if v else None, len(v)) for k, v in parts.items()}
            for o, parts in organ_dice_cnr.items()},
        "lesion_dice_by_size": {b: (float(np.mean(v)) if v else None, len(v))
                                for b, v in band_dice.items()},
        "segmentation_lesions_by_size": {
            b: {"dice": float(np.mean(seg_dice[b])) if seg_dice[b] else None,
                "detected": float(np.mean(seg_found[b])) if seg_found[b] else None,
                "n": len(seg_dice[b])} for b in seg_dice},
        "segmentation_false_lesion_components": seg_false,
        "seconds_per_study_cpu": float(np.median(seconds)),
        "parameters": sum(p.numel() for p in scribe.net.parameters()),
        "encode_gflops_first_study": flops,
        "lesion_kinds": LESION_KINDS,
        "text_vqa_pointing": {name: e.row() for name, e in extra.items()},
        "questions_per_study": len(items),
        "majority_report_text": majority_text,
        "answer_for_disagrees_on": sorted(disagree),
        "referring_segmentation": {name: r.row() for name, r in refer.items()},
        "peak_rss_mib": peak_rss,
        "benchmark_wall_seconds": time.perf_counter() - wall0,
    }
    cols = ["findings_precision", "findings_recall", "findings_f1", "studies_exact",
            "false_findings_on_normal", "closed_qa_accuracy", "closed_qa_asked_alone"]
    print(f"\n{len(seeds)} held-out phantoms of the {args.split} range "
          f"({rows['model'].normal} normal), model {scribe.name} {scribe.version}")
    print(f"{'row':<12}" + "".join(f"{c:>26}" for c in cols))
    for name, r in table.items():
        print(f"{name:<12}" + "".join(f"{r[c]:>26.3f}" for c in cols))
    print("organ Dice (model): " + ", ".join(f"{o} {d:.3f}"
                                            for o, d in result["organ_dice"].items()))
    print(f"organ Dice where the organ is faint against muscle (|HU difference| < {FAINT_CNR} x "
          "noise) / visible: " + ", ".join(
              f"{o} {_fmt_mean(v['faint'])} / {_fmt_mean(v['visible'])}"
              for o, v in result["organ_dice_by_muscle_contrast"].items()
              if v["faint"][1]))
    print("lesion Dice by size (model): " + ", ".join(
        f"{b}: {'n/a' if v[0] is None else f'{v[0]:.3f}'} (n={v[1]})"
        for b, v in result["lesion_dice_by_size"].items()))
    seg_parts = []
    for band, v in result["segmentation_lesions_by_size"].items():
        seg_parts.append(f"{band}: n/a" if not v["n"] else
                         f"{band}: {v['detected']:.3f} / {v['dice']:.3f} (n={v['n']})")
    print("segmentation alone, every lesion voxel (detected / Dice): " + ", ".join(seg_parts)
          + f"; {seg_false} predicted lesion components with no lesion voxel")
    print(f"inference: {result['seconds_per_study_cpu']:.2f} s per study (median, CPU); "
          f"{result['parameters'] / 1e6:.2f} M parameters; image side of the first study "
          + ", ".join(f"{k} {v:.2f}" for k, v in flops.items()) + " GFLOP")
    _print_second_table(result["text_vqa_pointing"], len(items))
    for name, r in result["referring_segmentation"].items():
        dice = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'} (n={r['masks'][k]})"
                         for k, v in r["dice"].items())
        raw = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}"
                        for k, v in r["dice_decoder_alone"].items())
        zero = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'} "
                         f"(missing {r['no_mask_given'][k]})"
                         for k, v in r["dice_missing_as_zero"].items())
        print(f"referring segmentation ({name}): <seg>/none right {r['answer_accuracy']:.3f} "
              f"of {r['questions']}; mask Dice {dice}; decoder's own mask: {raw}; "
              f"a missing mask as 0: {zero}")
    for t in sorted(disagree):
        print(f"note: answer_for() gives the wrong yes/no answer to {t!r} (the training "
              "target); scored here against the lesion counts")
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB; whole benchmark "
          f"{result['benchmark_wall_seconds']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
