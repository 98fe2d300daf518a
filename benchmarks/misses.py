"""Why a finding was missed or false: the report's errors traced through the pipeline.

    .venv/bin/python benchmarks/misses.py [--n 120] [--split val] [--model-dir DIR] [--json PATH]

``benchmarks/accuracy.py`` counts the findings a report gets wrong; this says
where each went wrong, so that the next change goes to the stage that lost
it. On each held-out phantom of the model's domain (chest-abdomen CT, or
head MR for a head model such as ``tomoscribe/weights-head-mr``) the model
writes its report (``Scribe.encode``, ``Scribe.generate``), and each error
at organ level is put in the first of these stages that explains it:

A **missed finding** (an organ with lesions the report does not name), from
the earliest stage to the last, by the furthest stage any of its lesions
reached:

* ``not segmented``: no refined lesion voxel on any of its lesions;
* ``under the minimum``: lesion voxels, but no component of
  :data:`~tomoscribe.model.refine.MIN_LESION_ML` or more there;
* ``grounded elsewhere``: a component there, but grounded in another
  structure (:meth:`~tomoscribe.model.scribe.Scribe.grounded_components`: the
  body outline, or another organ);
* ``left out by the text``: a component grounded in the organ, but the
  language model's text does not name the organ, and no component there
  stood out enough for the second look to name it.

A **false finding** (an organ the report names that has no lesion):

* ``another organ's lesion``: a component grounded in the organ covers a
  lesion the phantom gave to another organ;
* ``false component``: the components grounded in it touch no lesion.

Both are also flagged where the phantom put the lesion mostly outside its
organ (most of the lesion's two-voxel shell is another structure: a "right
lung nodule" inside the liver where the two overlap, a liver lesion mostly
in the body wall). There the label, not the model, is arguably wrong.

Where the report itself changed the text, both ways are counted, true and
false: findings the text names that the segmentation does not ground
(withheld, ``Report.withheld``), and findings the text left out that the
report adds because the lesion stands out on the image (the second look,
``Report.added``). For each organ still grounded by a component but left
out, the language model is asked "is there a lesion in the {organ} ?"
alone: how often it says yes where the organ has a lesion and where it has
none (what taking its own answer as the second look would do).

Last, the **contrast** of every component grounded in a site
(:func:`~tomoscribe.model.scribe.lesion_contrast`), per kind of lesion, for
the components that touch a lesion and for the others, against the
domain's threshold (:attr:`~tomoscribe.domain.Domain.lesion_contrast`): the
figures the second look's thresholds were chosen from, on the validation
range.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from tomoscribe import phantom, phantom_head
from tomoscribe.domain import CHEST_ABDOMEN_CT, HEAD_MR, Domain
from tomoscribe.model.scribe import Scribe
from tomoscribe.phantom import SPLITS
from tomoscribe.volume import SliceRef, Volume

#: miss causes, earliest stage first; a missed organ takes the furthest its lesions reached
MISS_CAUSES = ("not segmented", "under the minimum", "grounded elsewhere",
               "left out by the text")
FALSE_CAUSES = ("another organ's lesion", "false component")
BANDS = ((10.0, 15.0), (15.0, 25.0), (25.0, 36.0))


@dataclass
class Truth:
    """One rendered phantom: what the model reads and what it should find.

    ``lesions`` are ``(site, centre (LPS mm), diameter mm)``; ``labels`` the
    ground-truth label map on the image's grid, whose structures are
    ``names`` (label: name) and whose lesions are ``lesion_label``.
    """

    volume: Volume
    labels: np.ndarray
    lesions: list[tuple[str, tuple[float, float, float], float]]
    names: dict[int, str]
    lesion_label: int


def render_truth(domain: Domain, seed: int) -> Truth:
    """The phantom of ``seed`` for ``domain`` (chest-abdomen CT or head MR), rendered."""
    if domain == HEAD_MR:
        hp = phantom_head.make_head_phantom(seed, modality="MR")
        values, labels, aff = phantom_head.render_head_acquisition(hp)
        vol = Volume(values * np.float32(hp.scale), aff, [
            SliceRef(f"2.25.{seed}.{k}", "1.2.840.10008.5.1.4.1.1.4")
            for k in range(values.shape[0])])
        return Truth(vol, labels, [(les.site, les.centre, les.diameter_mm) for les in hp.lesions],
                     {v: k for k, v in phantom_head.STRUCTURE_LABELS.items()},
                     phantom_head.LESION_LABEL)
    ph = phantom.make_phantom(seed)
    hu, labels, aff = phantom.render_acquisition(ph)
    vol = Volume(hu, aff, [SliceRef(f"2.25.{seed}.{k}", "1.2.840.10008.5.1.4.1.1.2")
                           for k in range(hu.shape[0])])
    return Truth(vol, labels, [(les.organ, les.centre, les.diameter_mm) for les in ph.lesions],
                 {v: k for k, v in phantom.ORGAN_LABELS.items()}, phantom.LESION_LABEL)


def lesion_masks(truth: Truth) -> list[np.ndarray]:
    """Each lesion's voxels ``(D, H, W)`` bool: its sphere, where the labels say lesion."""
    labels, aff = truth.labels, truth.volume.affine
    idx = np.indices(labels.shape, dtype=np.float32).reshape(3, -1)
    world = (aff[:3, :3].astype(np.float32) @ idx + aff[:3, 3:4].astype(np.float32))
    is_lesion = labels == truth.lesion_label
    out = []
    for _site, centre, diameter in truth.lesions:
        d2 = ((world - np.asarray(centre, np.float32)[:, None]) ** 2).sum(axis=0)
        sphere = (d2 <= (diameter / 2.0) ** 2).reshape(labels.shape)
        out.append(sphere & is_lesion)
    return out


def lies_in(mask: np.ndarray, truth: Truth) -> str | None:
    """The structure most of a lesion's two-voxel shell is (the region included), or ``None``."""
    if not mask.any():
        return None
    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask
    counts = np.bincount(truth.labels[shell].ravel(), minlength=truth.lesion_label + 1)
    counts[[0, truth.lesion_label]] = 0
    return truth.names.get(int(counts.argmax())) if counts.any() else None


def _band(diameter: float) -> str:
    for lo, hi in BANDS:
        if diameter < hi or hi == BANDS[-1][1]:
            return f"{lo:.0f}-{hi:.0f} mm"
    return "larger"  # pragma: no cover


@dataclass
class StudyErrors:
    """One phantom's finding errors (see the module docstring)."""

    errors: list[dict[str, object]] = field(default_factory=list)
    looks: list[dict[str, object]] = field(default_factory=list)
    withheld_true: list[str] = field(default_factory=list)
    withheld_false: list[str] = field(default_factory=list)
    added_true: list[str] = field(default_factory=list)
    added_false: list[str] = field(default_factory=list)
    organs_with_lesions: int = 0
    contrasts: list[dict[str, object]] = field(default_factory=list)


def study_errors(scribe: Scribe, seed: int) -> StudyErrors:
    """Every finding error of one phantom's report, with its cause (see the module docstring)."""
    study = render_truth(scribe.domain, seed)
    vol = study.volume
    enc = scribe.encode(vol, early_refusal=False)
    report = scribe.generate(enc)
    named = {f.structure for f in report.findings}
    withheld = {s.split(":", 1)[0].strip().lower() for s in report.withheld}
    added = {s.split(":", 1)[0].strip().lower() for s in report.added}
    refined_lesion = enc.extra["refined"] == scribe.cfg.lesion_class
    comps, grounded = scribe.grounded_components(enc)
    voxel_ml = float(np.prod(vol.spacing)) / 1000.0
    masks = lesion_masks(study)
    truth = {site for site, _c, _d in study.lesions}
    errors: list[dict[str, object]] = []

    for organ in sorted(truth - named):
        stage, diameters, outside, where = 0, [], False, set()
        for (site, _centre, diameter), mask in zip(study.lesions, masks, strict=True):
            if site != organ:
                continue
            diameters.append(round(diameter, 1))
            placed = lies_in(mask, study)
            outside |= placed is not None and placed != organ
            if not (refined_lesion & mask).any():
                continue
            ids = [int(c) for c in np.unique(comps[mask]) if c]
            if not ids:
                stage = max(stage, 1)
                continue
            if any(grounded.get(c) == organ for c in ids):
                stage = 3
            else:
                stage = max(stage, 2)
                where |= {grounded.get(c) or "nothing" for c in ids}
        case: dict[str, object] = {
            "seed": seed, "error": "missed", "organ": organ, "cause": MISS_CAUSES[stage],
            "largest_mm": max(diameters), "lesion_outside_its_organ": outside,
            "withheld": organ in withheld}
        if stage == 2:
            case["grounded_in"] = sorted(where)
        errors.append(case)

    for organ in sorted(named - truth):
        mine = [c for c, s in grounded.items() if s == organ]
        others = set()
        outside = False
        for (site, _centre, _diameter), mask in zip(study.lesions, masks, strict=True):
            if mask.any() and np.isin(comps[mask], mine).any():
                others.add(site)
                outside |= lies_in(mask, study) == organ
        ml = float(np.isin(comps, mine).sum()) * voxel_ml
        errors.append({
            "seed": seed, "error": "false", "organ": organ,
            "cause": FALSE_CAUSES[0] if others else FALSE_CAUSES[1],
            "lesion_of": sorted(others), "component_ml": round(ml, 3),
            "lesion_outside_its_organ": outside})

    # organs a component grounds that the report still leaves out: the model asked alone
    looks = []
    for organ in sorted(scribe.lesioned_organs(enc) - named):
        answer, _relevance = scribe.ask(enc, f"is there a lesion in the {organ} ?")
        ml = float(np.isin(comps, [c for c, s in grounded.items() if s == organ]).sum())
        looks.append({"seed": seed, "organ": organ, "has_lesion": organ in truth,
                      "asked_alone": answer.split()[0] if answer.split() else "",
                      "component_ml": round(ml * voxel_ml, 3)})
    # every component grounded in a site: how far it stands out, and whether it is a lesion
    lesion_voxels = np.any(masks, axis=0) if masks else np.zeros(comps.shape, bool)
    contrasts = []
    for c, site in sorted(grounded.items()):
        if site not in scribe.domain.kinds:
            continue
        contrasts.append({"seed": seed, "site": site,
                          "kind": scribe.domain.single_kind(site) or "several",
                          "lesion": bool(lesion_voxels[comps == c].any()),
                          "contrast": round(scribe.component_contrast(enc, c, site), 2)})
    return StudyErrors(errors, looks, sorted(withheld & truth), sorted(withheld - truth),
                       sorted(added & truth), sorted(added - truth), len(truth), contrasts)


def contrast_table(contrasts: list[dict[str, object]], rule: dict[str, float]
                   ) -> dict[str, dict[str, object]]:
    """Print, per kind of lesion, how the grounded components' contrast meets the threshold.

    ``contrasts`` are :class:`StudyErrors` ``contrasts`` rows; ``rule`` the
    domain's thresholds (:attr:`~tomoscribe.domain.Domain.lesion_contrast`).
    Returns the table, kind by kind, as the JSON holds it.
    """
    print("\ncontrast of the components grounded in a site, in SD of the organ next to them "
          "(Scribe.second_look's test):")
    print(f"{'kind':<18}{'threshold':>10}{'lesions':>9}{'passing':>9}{'false':>7}{'passing':>9}"
          f"{'false, most lesion-like':>25}")
    summary: dict[str, dict[str, object]] = {}
    for kind in sorted({str(x["kind"]) for x in contrasts}):
        rows = [x for x in contrasts if x["kind"] == kind]
        wanted = rule.get(kind)
        sign = 1.0 if wanted is None or wanted > 0 else -1.0

        def passes(x: dict[str, object], wanted: float | None = wanted, sign: float = sign
                   ) -> bool:
            return wanted is not None and sign * float(str(x["contrast"])) >= abs(wanted)

        true = [x for x in rows if x["lesion"]]
        spurious = [x for x in rows if not x["lesion"]]
        worst = max((sign * float(str(x["contrast"])) for x in spurious), default=None)
        summary[kind] = {"threshold": wanted, "lesions": len(true),
                         "lesions_passing": sum(map(passes, true)), "false": len(spurious),
                         "false_passing": sum(map(passes, spurious)),
                         "false_most_lesion_like": None if worst is None else sign * worst}
        shown = "n/a" if wanted is None else f"{wanted:+.1f}"
        most = "" if worst is None else f"{sign * worst:+.2f}"
        passing_true = "n/a" if wanted is None else str(summary[kind]["lesions_passing"])
        passing_false = "n/a" if wanted is None else str(summary[kind]["false_passing"])
        print(f"{kind:<18}{shown:>10}{len(true):>9}{passing_true:>9}{len(spurious):>7}"
              f"{passing_false:>9}{most:>25}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=120, help="phantoms")
    ap.add_argument("--split", choices=("test", "val"), default="val")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/misses.json"))
    args = ap.parse_args(argv)

    wall0 = time.perf_counter()
    scribe = Scribe.load(args.model_dir)
    if scribe.domain not in (CHEST_ABDOMEN_CT, HEAD_MR):
        print(f"misses: the model reads {scribe.domain.description}; this benchmark renders "
              f"phantoms of chest-abdomen CT and head MR only", file=sys.stderr)
        return 2
    studies = []
    for i, seed in enumerate(SPLITS[args.split][: args.n]):
        studies.append(study_errors(scribe, seed))
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{args.n} studies", file=sys.stderr, flush=True)

    errors = [e for s in studies for e in s.errors]
    looks = [x for s in studies for x in s.looks]
    missed = [e for e in errors if e["error"] == "missed"]
    false = [e for e in errors if e["error"] == "false"]
    bands = [f"{lo:.0f}-{hi:.0f} mm" for lo, hi in BANDS]
    by_cause = {c: Counter(_band(float(str(e["largest_mm"]))) for e in missed if e["cause"] == c)
                for c in MISS_CAUSES}
    organs = sum(s.organs_with_lesions for s in studies)
    print(f"\n{args.n} phantoms of the {args.split} range, model {scribe.name} {scribe.version}: "
          f"{organs} organs with lesions, {len(missed)} missed, {len(false)} false findings")
    print(f"\n{'missed, by stage':<26}" + "".join(f"{b:>11}" for b in bands)
          + f"{'all':>6}{'outside':>9}")
    for cause in MISS_CAUSES:
        rows = [e for e in missed if e["cause"] == cause]
        print(f"{cause:<26}" + "".join(f"{by_cause[cause].get(b, 0):>11}" for b in bands)
              + f"{len(rows):>6}{sum(bool(e['lesion_outside_its_organ']) for e in rows):>9}")
    print(f"\n{'false, by cause':<26}{'all':>6}{'outside':>9}")
    for cause in FALSE_CAUSES:
        rows = [e for e in false if e["cause"] == cause]
        outside = sum(bool(e["lesion_outside_its_organ"]) for e in rows)
        print(f"{cause:<26}{len(rows):>6}{outside:>9}")
    withheld_true = sum(len(s.withheld_true) for s in studies)
    withheld_false = sum(len(s.withheld_false) for s in studies)
    added_true = sum(len(s.added_true) for s in studies)
    added_false = sum(len(s.added_false) for s in studies)
    print(f"\nwithheld (named by the text, not grounded): {withheld_true} true, "
          f"{withheld_false} false")
    print(f"added (left out by the text, standing out on the image): {added_true} true, "
          f"{added_false} false")
    yes_true = sum(bool(x["has_lesion"]) and x["asked_alone"] == "yes" for x in looks)
    yes_false = sum(not x["has_lesion"] and x["asked_alone"] == "yes" for x in looks)
    n_true = sum(bool(x["has_lesion"]) for x in looks)
    print(f"still left out (grounded organs the report leaves out): {len(looks)}, {n_true} with a "
          f"lesion; asked alone, the model says yes to {yes_true} of them and to "
          f"{yes_false} of the {len(looks) - n_true} without")
    contrasts = [x for s in studies for x in s.contrasts]
    summary = contrast_table(contrasts, scribe.domain.lesion_contrast)
    print("\ncases:")
    for e in errors:
        extra = {k: v for k, v in e.items() if k not in ("seed", "error", "organ", "cause")}
        print(f"  {e['seed']} {e['error']:<7}{e['organ']:<26}{e['cause']:<24}{extra}")
    result = {
        "split": args.split, "n": args.n, "model": scribe.version,
        "organs_with_lesions": organs,
        "missed": {c: len([e for e in missed if e["cause"] == c]) for c in MISS_CAUSES},
        "missed_by_band": {c: dict(by_cause[c]) for c in MISS_CAUSES},
        "false": {c: len([e for e in false if e["cause"] == c]) for c in FALSE_CAUSES},
        "withheld": {"true": withheld_true, "false": withheld_false},
        "added": {"true": added_true, "false": added_false},
        "still_left_out": {"organs": len(looks), "with_lesion": n_true,
                        "yes_with_lesion": yes_true, "yes_without": yes_false},
        "contrast_by_kind": summary,
        "cases": errors, "looks": looks, "contrasts": contrasts,
        "wall_seconds": round(time.perf_counter() - wall0, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
