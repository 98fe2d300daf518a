"""Accuracy of a head MR model on held-out head phantoms, beside baselines that cannot see.

``python benchmarks/head_accuracy.py --model-dir checkpoints/head-weights [--n 60] [--json F]``

The head counterpart of ``benchmarks/accuracy.py`` (same rows, same
definitions where the two domains share them). Each test phantom
(:mod:`tomoscribe.phantom_head`, MR: T1, T2 or FLAIR, axial, sagittal or
coronal) is rendered on its own acquisition grid and read as a study is:
``Scribe.encode`` then ``Scribe.generate``. Rows:

* **model**;
* **image-blind**: the same model with its image tokens zeroed (what the
  language model guesses from the question alone);
* **majority**: the most frequent ground-truth answer to each question, and
  the most frequent report, over the first 1,200 training phantoms.

Scored:

* findings: a site is found when the report has a finding sentence for it;
  precision / recall / F1 over (study, site), the share of studies whose set
  of sites is exactly right, and the share of normal studies with a finding;
* kinds: of the sites found rightly, the share whose named kinds (mass,
  cyst, both) are the truth's;
* closed VQA (yes/no), per site: "is there a lesion in the {site} ?",
  "is the {site} normal ?", "does the {site} contain a mass ?" and "... a
  cyst ?"; per study: "are there any focal findings ?";
* open VQA: "how many lesions are in the {site} ?" and "which organ has a
  lesion ?" (exact match and token F1);
* both as answered (these templated questions from the report's findings)
  and as the language model answers each asked alone (the "asked alone"
  columns; exact match for the open ones);
* report text: BLEU-4 and ROUGE-L against the ground-truth report;
* Dice of each structure on the source grid (the report's label map), and of
  the lesions by size band, with the share of lesions the segmentation
  touches at all (detection), from the segmentation alone (the refiner's
  labels where the model has a refiner, the head's otherwise), before the
  report decides which lesions to keep;
* key images: whether a finding's first key image holds a lesion of its
  site; for every question with something to show (a site's lesions, else
  the site; every lesion for a study-level question), whether the answer's
  first key image shows it, and whether the TG-IS branch's own top slice
  does (models with a slice branch), as ``benchmarks/accuracy.py`` scores them;
* findings F1 per MR weighting; CPU seconds per study (median) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from tomoscribe.domain import HEAD_MR
from tomoscribe.model.scribe import Scribe
from tomoscribe.model.text import (
    WordTokenizer,
    answer_for,
    findings_to_text,
    parse_findings,
)
from tomoscribe.phantom import SPLITS
from tomoscribe.phantom_head import (
    LESION_LABEL,
    STRUCTURE_LABELS,
    HeadPhantom,
    head_report_text,
    make_head_phantom,
    render_head_acquisition,
)
from tomoscribe.train import study_lesions
from tomoscribe.volume import SliceRef, Volume

try:  # run as a script (benchmarks/ on sys.path) or as benchmarks.head_accuracy
    import accuracy  # type: ignore[import-not-found]
    import textmetrics  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    from benchmarks import accuracy, textmetrics

BANDS, Refer, Tally = accuracy.BANDS, accuracy.Refer, accuracy.Tally
_dice, _prf, _yes_no, _shown = accuracy._dice, accuracy._prf, accuracy._yes_no, accuracy._shown
Pointing = accuracy.Pointing
refer_items, score_referring = accuracy.refer_items, accuracy.score_referring
corpus_bleu, rouge_l, token_f1 = textmetrics.corpus_bleu, textmetrics.rouge_l, textmetrics.token_f1

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
STRUCTURES_SCORED = HEAD_MR.structures[1:]
CLOSED = ("is there a lesion in the {organ} ?", "is the {organ} normal ?",
          "does the {organ} contain a {kind} ?", "are there any focal findings ?")
OPEN = ("how many lesions are in the {organ} ?", "which organ has a lesion ?")


def questions() -> list[tuple[str, str, str, str]]:
    """Every question asked per study: ``(template, site, kind, question)``."""
    items: list[tuple[str, str, str, str]] = []
    for t in (*CLOSED, *OPEN):
        if "{kind}" in t:
            items += [(t, s, k, t.format(organ=s, kind=k)) for s in HEAD_MR.sites
                      for k in HEAD_MR.kinds[s]]
        elif "{organ}" in t:
            items += [(t, s, "", t.format(organ=s)) for s in HEAD_MR.sites]
        else:
            items.append((t, "", "", t))
    return items


def gold_answer(template: str, site: str, kind: str, lesions: list[tuple[str, str]]) -> str:
    """The right answer, from the phantom's lesions."""
    counts = Counter(s for s, _k in lesions)
    if template.startswith("are there"):
        return "yes" if lesions else "no"
    return answer_for(template, site, counts, HEAD_MR, kind or None, Counter(lesions))


def study(seed: int) -> tuple[HeadPhantom, Volume, np.ndarray, np.ndarray]:
    """A head MR test study: the phantom, its volume (as stored), labels and affine."""
    ph = make_head_phantom(seed, modality="MR")
    values, labels, aff = render_head_acquisition(ph)
    vol = Volume(values * np.float32(ph.scale), aff,
                 [SliceRef(f"2.25.{seed}.{k}", MR_STORAGE) for k in range(values.shape[0])])
    return ph, vol, labels, aff


def majority(items: list[tuple[str, str, str, str]], n: int = 1200
             ) -> tuple[list[str], str]:
    """Most frequent answer per question and most frequent report over training phantoms."""
    answers: list[Counter[str]] = [Counter() for _ in items]
    reports: Counter[str] = Counter()
    for seed in SPLITS["train"][:n]:
        lesions = study_lesions(seed, HEAD_MR)
        reports[findings_to_text(lesions, HEAD_MR)] += 1
        for i, (t, s, k, _q) in enumerate(items):
            answers[i][gold_answer(t, s, k, lesions)] += 1
    return [c.most_common(1)[0][0] for c in answers], reports.most_common(1)[0][0]


class Text:
    """Report text and VQA scores of one row."""

    def __init__(self) -> None:
        self.hyps: list[list[str]] = []
        self.refs: list[list[str]] = []
        self.rouge: list[float] = []
        self.closed: list[int] = []
        self.em: list[int] = []
        self.f1: list[float] = []
        self.closed_alone: list[int] = []  # the language model asked each question alone
        self.em_alone: list[int] = []
        self.kind_right = 0
        self.kind_n = 0
        self.point_hit = 0
        self.point_n = 0
        self.pointing = Pointing()  # each question's key image and the TG-IS top slice

    def add(self, text: str, ref: str, items: list[tuple[str, str, str, str]],
            answers: list[str], golds: list[str], alone: list[str | None] | None = None
            ) -> None:
        """Score a row's report and answers; ``alone``: the model's own where they differ."""
        h, r = WordTokenizer.words(text), WordTokenizer.words(ref)
        self.hyps.append(h)
        self.refs.append(r)
        self.rouge.append(rouge_l(h, r))
        for j, ((t, _s, _k, _q), a, g) in enumerate(zip(items, answers, golds, strict=True)):
            by_itself = a if alone is None or alone[j] is None else alone[j]
            assert by_itself is not None
            if t in OPEN:
                aw, gw = WordTokenizer.words(_shown(a)), WordTokenizer.words(g)
                self.em.append(int(aw == gw))
                self.f1.append(token_f1(aw, gw))
                self.em_alone.append(int(WordTokenizer.words(by_itself) == gw))
            else:
                self.closed.append(int(_yes_no(a) == g))
                self.closed_alone.append(int(_yes_no(by_itself) == g))

    def row(self) -> dict[str, float | int | None]:
        pointing = self.pointing.row()
        return {
            "bleu4": corpus_bleu(self.hyps, self.refs),
            "rouge_l_f": float(np.mean(self.rouge)),
            "closed_vqa_accuracy": float(np.mean(self.closed)),
            "open_vqa_exact_match": float(np.mean(self.em)),
            "open_vqa_token_f1": float(np.mean(self.f1)),
            "closed_vqa_asked_alone": float(np.mean(self.closed_alone)),
            "open_vqa_exact_match_asked_alone": float(np.mean(self.em_alone)),
            "kinds_right_of_sites_found": (self.kind_right / self.kind_n) if self.kind_n
            else None,
            "key_slice_pointing": (self.point_hit / self.point_n) if self.point_n else None,
            "key_slice_findings": self.point_n,
            "question_key_image_hit": pointing["question_hit"],
            "questions_with_something_to_show": pointing["question_n"],
            "tgis_top_slice_hit": pointing["tgis_hit"],
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True, help="a head MR model folder")
    ap.add_argument("--n", type=int, default=60, help="test phantoms")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()

    scribe = Scribe.load(args.model_dir)
    if scribe.domain is not HEAD_MR:
        print(f"head_accuracy: {args.model_dir} reads {scribe.domain.description}, not "
              f"{HEAD_MR.description}", file=sys.stderr)
        return 2
    items = questions()
    asked = [q for _t, _s, _k, q in items]
    majority_answers, majority_text = majority(items)
    rows = {name: Tally() for name in ("model", "image-blind", "majority")}
    text = {name: Text() for name in rows}
    by_sequence: dict[str, Tally] = {}
    dice: dict[str, list[float]] = {s: [] for s in STRUCTURES_SCORED}
    band_dice: dict[str, list[float]] = {f"{lo:.0f}-{hi:.0f} mm": [] for lo, hi in BANDS}
    band_found: dict[str, list[bool]] = {b: [] for b in band_dice}
    band_coarse: dict[str, list[float]] = {b: [] for b in band_dice}  # before the refiner
    seconds: list[float] = []
    small_by_look: dict[str, list[tuple[float, bool, float]]] = {}
    refer = ({"model": Refer(), "image-blind": Refer()} if scribe.net.segtoken is not None
             else {})
    seeds = list(SPLITS[args.split][: args.n])
    for i, seed in enumerate(seeds):
        ph, vol, labels, aff = study(seed)
        lesions = [(les.site, les.kind) for les in ph.lesions]
        truth = {s for s, _k in lesions}
        golds = [gold_answer(t, s, k, lesions) for t, s, k, _q in items]
        t0 = time.perf_counter()
        enc = scribe.encode(vol, early_refusal=False)
        report = scribe.generate(enc, asked)
        seconds.append(time.perf_counter() - t0)
        blind = scribe.generate(enc, asked, blind=True)
        ref = head_report_text(ph)
        for name, rep in (("model", report), ("image-blind", blind)):
            found = {f.structure for f in rep.findings}
            rows[name].add(found, truth)
            text[name].add(rep.text, ref, items, [a.answer for a in rep.answers], golds,
                           [a.model_answer for a in rep.answers])
            # the report's text is sentence-cased prose: back to the grammar's words
            for pf in parse_findings(" ".join(WordTokenizer.words(rep.text)), HEAD_MR):
                if pf.organ in truth:
                    text[name].kind_n += 1
                    want = {k for s, k in lesions if s == pf.organ}
                    text[name].kind_right += int(set(pf.kinds) == want)
        by_sequence.setdefault(ph.sequence, Tally()).add({f.structure for f in report.findings},
                                                       truth)
        rows["majority"].add({f.organ for f in parse_findings(majority_text, HEAD_MR)}, truth)
        text["majority"].add(majority_text, ref, items, majority_answers, golds)
        for s in STRUCTURES_SCORED:
            lab = STRUCTURE_LABELS[s]
            if (labels == lab).any():
                dice[s].append(_dice(report.label_map == lab, labels == lab))
        # lesions, segmentation alone: the refiner's labels, or the head's on the source grid
        coarse = enc.extra["grid"].to_source_labels(
            enc.seg_logits.argmax(dim=1)[0].to(torch.uint8).numpy())
        seg = enc.extra.get("refined")
        if seg is None:  # a model without a refiner
            seg = coarse
        seg_les = seg == scribe.cfg.lesion_class
        coarse_les = coarse == scribe.cfg.lesion_class
        comps, _n = ndimage.label(labels == LESION_LABEL)
        site_slices: dict[str, set[int]] = {}  # source slices holding each site's lesions
        for les in ph.lesions:
            centre = np.linalg.solve(aff, np.array([*les.centre, 1.0]))[:3]
            k, r, c = (int(np.clip(round(v), 0, n - 1)) for v, n in zip(centre, labels.shape,
                                                                        strict=True))
            cid = comps[k, r, c]
            if cid == 0:
                continue
            t_mask = comps == cid
            site_slices.setdefault(les.site, set()).update(
                int(z) for z in np.nonzero(t_mask.any(axis=(1, 2)))[0])
            near = ndimage.binary_dilation(t_mask, iterations=3)
            for lo, hi in BANDS:
                if lo <= les.diameter_mm < hi:
                    band = f"{lo:.0f}-{hi:.0f} mm"
                    band_dice[band].append(_dice(seg_les & near, t_mask))
                    band_found[band].append(bool((seg_les & t_mask).any()))
                    band_coarse[band].append(_dice(coarse_les & near, t_mask))
                    if lo == BANDS[0][0]:  # the smallest band, by what the lesion looks like
                        look = f"{ph.sequence} {les.kind}{' in oedema' if les.oedema_mm else ''}"
                        small_by_look.setdefault(look, []).append(
                            (band_dice[band][-1], band_found[band][-1], band_coarse[band][-1]))
        # key-slice pointing: a finding's first key image holds a lesion of its site
        for name, rep in (("model", report), ("image-blind", blind)):
            for f in rep.findings:
                if f.structure in site_slices and f.key_slices:
                    text[name].point_n += 1
                    text[name].point_hit += int(f.key_slices[0] in site_slices[f.structure])
        # each question's key images: what it is about (a site's lesions, else the site;
        # every lesion for a study-level question), as accuracy.py scores them
        every = set().union(*site_slices.values()) if site_slices else set()
        targets = [every if not s else site_slices.get(s) or {
            int(z) for z in np.nonzero((labels == STRUCTURE_LABELS[s]).any(axis=(1, 2)))[0]}
            for _t, s, _k, _q in items]
        for name, rep in (("model", report), ("image-blind", blind)):
            text[name].pointing.add(scribe, enc, rep.answers, [q for _t, _s, _k, q in items],
                                    targets, blind=name == "image-blind")
        if refer:  # referring segmentation: the <seg> answers and their masks
            score_referring(scribe, enc, labels, refer, refer_items(STRUCTURES_SCORED),
                            STRUCTURE_LABELS, LESION_LABEL)
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{len(seeds)} studies", file=sys.stderr, flush=True)

    table = {name: {**t.row(), **text[name].row()} for name, t in rows.items()}
    result = {
        "model": scribe.name,
        "version": scribe.version,
        "domain": scribe.domain.name,
        "split": args.split,
        "studies": len(seeds),
        "normal_studies": rows["model"].normal,
        "rows": table,
        "findings_f1_by_weighting": {k: {"f1": _prf(t.tp, t.fp, t.fn)[2], "studies": t.studies}
                                     for k, t in sorted(by_sequence.items())},
        "structure_dice": {s: float(np.mean(v)) for s, v in dice.items() if v},
        "lesion_dice_by_size": {b: {"dice": float(np.mean(v)) if v else None,
                                    "detected": float(np.mean(band_found[b])) if v else None,
                                    "coarse_dice": float(np.mean(band_coarse[b])) if v else None,
                                    "n": len(v)} for b, v in band_dice.items()},
        "referring_segmentation": {name: r.row() for name, r in refer.items()},
        "smallest_band_by_look": {k: {"dice": float(np.mean([d for d, _f, _c in v])),
                                      "detected": float(np.mean([f for _d, f, _c in v])),
                                      "coarse_dice": float(np.mean([c for _d, _f, c in v])),
                                      "n": len(v)} for k, v in sorted(small_by_look.items())},
        "questions_per_study": len(items),
        "majority_report_text": majority_text,
        "seconds_per_study_cpu": float(np.median(seconds)),
        "parameters": sum(p.numel() for p in scribe.net.parameters()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "benchmark_wall_seconds": time.perf_counter() - wall0,
    }
    cols = ("findings_precision", "findings_recall", "findings_f1", "studies_exact",
            "false_findings_on_normal", "kinds_right_of_sites_found", "closed_vqa_accuracy",
            "open_vqa_exact_match", "open_vqa_token_f1", "closed_vqa_asked_alone",
            "open_vqa_exact_match_asked_alone", "bleu4", "rouge_l_f")
    print(f"\n{len(seeds)} head MR phantoms of the {args.split} range "
          f"({rows['model'].normal} normal), model {scribe.name} {scribe.version}, "
          f"{len(items)} questions per study")
    print(f"{'row':<12}" + "".join(f"{c[:22]:>24}" for c in cols))
    for name, r in table.items():
        print(f"{name:<12}" + "".join(
            f"{'n/a' if r[c] is None else f'{r[c]:.3f}':>24}" for c in cols))
    print("findings F1 by weighting (model): " + ", ".join(
        f"{k} {v['f1']:.3f} (n={v['studies']})"
        for k, v in result["findings_f1_by_weighting"].items()))
    print("structure Dice (model): " + ", ".join(
        f"{s} {d:.3f}" for s, d in result["structure_dice"].items()))
    print("lesions, segmentation alone (detected / Dice / Dice of the head before the "
          "refiner): " + ", ".join(
              f"{b}: n/a" if not v["n"] else
              f"{b}: {v['detected']:.3f} / {v['dice']:.3f} / {v['coarse_dice']:.3f} (n={v['n']})"
              for b, v in result["lesion_dice_by_size"].items()))
    print(f"lesions of {BANDS[0][0]:.0f}-{BANDS[0][1]:.0f} mm by weighting and kind "
          "(detected / Dice / before the refiner): " + ", ".join(
              f"{k} {v['detected']:.2f} / {v['dice']:.3f} / {v['coarse_dice']:.3f} (n={v['n']})"
              for k, v in result["smallest_band_by_look"].items()))
    pointing = {name: ("n/a" if r["key_slice_pointing"] is None
                       else f"{r['key_slice_pointing']:.3f}", r["key_slice_findings"])
                for name, r in table.items() if name != "majority"}
    print("key-slice pointing (a finding's first key image holds a lesion of its site): "
          + ", ".join(f"{name} {v} (n={n})" for name, (v, n) in pointing.items()))
    for name, r in table.items():
        if name == "majority" or not r["questions_with_something_to_show"]:
            continue
        tgis = r["tgis_top_slice_hit"]
        print(f"questions ({name}, {r['questions_with_something_to_show']} with something to "
              f"show): the answer's first key image shows it {r['question_key_image_hit']:.3f}; "
              f"the TG-IS top slice {'n/a (no slice branch)' if tgis is None else f'{tgis:.3f}'}")
    for name, r in result["referring_segmentation"].items():
        dice = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'} (n={r['masks'][k]})"
                         for k, v in r["dice"].items())
        print(f"referring segmentation ({name}): <seg>/none right {r['answer_accuracy']:.3f} "
              f"of {r['questions']}; mask Dice {dice}; missing masks {r['no_mask_given']}")
    print(f"inference: {result['seconds_per_study_cpu']:.2f} s per study (median, CPU); "
          f"{result['parameters'] / 1e6:.2f} M parameters; peak RSS "
          f"{result['peak_rss_mib']:.0f} MiB; whole benchmark "
          f"{result['benchmark_wall_seconds']:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
