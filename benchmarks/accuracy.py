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
(yes/no questions about each organ), lesion Dice per size band (per lesion,
on the source grid) and Dice of each large organ (model only: the baselines
have no segmentation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tomoscribe.model.scribe import LESION_LABEL_BASE, Scribe
from tomoscribe.phantom import (
    LESION_LABEL,
    ORGAN_LABELS,
    SPLITS,
    make_phantom,
    render_acquisition,
)
from tomoscribe.report import LESION_KINDS
from tomoscribe.volume import SliceRef, Volume

ORGANS_SCORED = ("right lung", "left lung", "liver", "spleen", "right kidney", "left kidney")
BANDS = ((10.0, 15.0), (15.0, 25.0), (25.0, 36.0))


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
        }


def _yes_no(answer: str) -> str:
    a = answer.lower()
    return "yes" if a.startswith("yes") else "no" if a.startswith("no") else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60, help="test phantoms")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/accuracy.json"))
    args = ap.parse_args(argv)

    scribe = Scribe.load(args.model_dir)
    seeds = list(SPLITS["test"][: args.n])
    # majority baseline: the most frequent finding set over 2000 training seeds
    train_sets = Counter(
        frozenset(les.organ for les in make_phantom(s).lesions) for s in SPLITS["train"][:2000]
    )
    majority = set(train_sets.most_common(1)[0][0])

    rows = {"model": Tally(), "image-blind": Tally(), "majority": Tally()}
    organ_dice: dict[str, list[float]] = {o: [] for o in ORGANS_SCORED}
    band_dice: dict[str, list[float]] = {f"{lo:.0f}-{hi:.0f} mm": [] for lo, hi in BANDS}
    seconds: list[float] = []
    for i, seed in enumerate(seeds):
        ph = make_phantom(seed)
        hu, labels, aff = render_acquisition(ph)
        vol = Volume(hu, aff, [SliceRef(f"2.25.{seed}.{k}", "1.2.840.10008.5.1.4.1.1.2")
                               for k in range(hu.shape[0])])
        truth = {les.organ for les in ph.lesions}
        counts = Counter(les.organ for les in ph.lesions)
        questions = [f"is there a lesion in the {o} ?" for o in ORGANS_SCORED]

        t0 = time.perf_counter()
        enc = scribe.encode(vol)
        report = scribe.generate(enc, questions)
        seconds.append(time.perf_counter() - t0)
        blind = scribe.generate(enc, questions, blind=True)

        for name, rep in (("model", report), ("image-blind", blind)):
            rows[name].add({f.structure for f in rep.findings}, truth)
            for ans, organ in zip(rep.answers, ORGANS_SCORED, strict=True):
                rows[name].qa_total += 1
                rows[name].qa_right += int(
                    _yes_no(ans.answer) == ("yes" if counts.get(organ) else "no"))
        rows["majority"].add(majority, truth)
        for organ in ORGANS_SCORED:
            rows["majority"].qa_total += 1
            rows["majority"].qa_right += int((organ in majority) == bool(counts.get(organ)))

        for organ in ORGANS_SCORED:
            lab = ORGAN_LABELS[organ]
            organ_dice[organ].append(_dice(report.label_map == lab, labels == lab))
        # per-lesion Dice: truth component vs predicted lesion voxels near it
        from scipy import ndimage

        pred_les = report.label_map >= LESION_LABEL_BASE
        comps, _n = ndimage.label(labels == LESION_LABEL)
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
                    band_dice[f"{lo:.0f}-{hi:.0f} mm"].append(d)
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{len(seeds)} studies", file=sys.stderr, flush=True)

    table = {name: t.row() for name, t in rows.items()}
    result = {
        "model": scribe.name,
        "version": scribe.version,
        "test_studies": len(seeds),
        "normal_studies": rows["model"].normal,
        "rows": table,
        "organ_dice": {o: float(np.mean(v)) for o, v in organ_dice.items()},
        "lesion_dice_by_size": {b: (float(np.mean(v)) if v else None, len(v))
                                for b, v in band_dice.items()},
        "seconds_per_study_cpu": float(np.median(seconds)),
        "lesion_kinds": LESION_KINDS,
    }
    cols = ["findings_precision", "findings_recall", "findings_f1", "studies_exact",
            "false_findings_on_normal", "closed_qa_accuracy"]
    print(f"\n{len(seeds)} held-out phantoms ({rows['model'].normal} normal), "
          f"model {scribe.name} {scribe.version}")
    print(f"{'row':<12}" + "".join(f"{c:>26}" for c in cols))
    for name, r in table.items():
        print(f"{name:<12}" + "".join(f"{r[c]:>26.3f}" for c in cols))
    print("organ Dice (model): " + ", ".join(f"{o} {d:.3f}"
                                            for o, d in result["organ_dice"].items()))
    print("lesion Dice by size (model): " + ", ".join(
        f"{b}: {'n/a' if v[0] is None else f'{v[0]:.3f}'} (n={v[1]})"
        for b, v in result["lesion_dice_by_size"].items()))
    print(f"inference: {result['seconds_per_study_cpu']:.2f} s per study (median, CPU)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
