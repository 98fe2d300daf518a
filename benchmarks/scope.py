"""Which studies the model refuses: its declared scope, checked on held-out phantoms.

    .venv/bin/python benchmarks/scope.py [--n 60] [--split test] [--model-dir DIR] [--json PATH]

Six sets of ``--n`` studies each (``--sets`` picks some), written as DICOM
and run the way a job runs them (scan, select under the model's scope, load,
encode, generate, the anatomy check):

- chest-abdomen CT phantoms (what the shipped model reads);
- chest-abdomen CT phantoms without Body Part Examined: the image check alone;
- head CT phantoms without Body Part Examined: only the image check can
  refuse them (for the chest-abdomen model);
- head MR phantoms (Body Part Examined HEAD): what a head MR model reads;
- head MR phantoms without Body Part Examined: a head model's image check alone;
- a torso "MR" without Body Part Examined: the chest-abdomen phantoms
  written as MR (stored value = HU + 1024, so air is dark and every tissue
  bright; not an MR contrast, but a body that is not a head, which is what
  a head model's check must refuse when the headers are silent).

For the chest-abdomen model every refusal of the first two sets is a false
one; for a head model (``--model-dir``), of the head MR sets.

A study is *refused by the headers* when the series selection finds nothing
in scope (no model run), *refused by the image* when the anatomy check turns
the model's segmentation down, *reported* otherwise. For a refusal by the
image the table also counts which structure gave it away. Every study the
headers let through is read to the end (what it would have reported); for a
model with an image check and a refiner, the benchmark also times the product
path, which refuses such a study from the coarse segmentation before the
refiner runs (:meth:`tomoscribe.model.scribe.Scribe.coarse_refusal`), and
counts any study refused there that the full check would have passed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import MRImageStorage

from tomoscribe.dicomio import load_series, scan_folder, select_series
from tomoscribe.errors import OutOfScopeError
from tomoscribe.model.scribe import Scribe
from tomoscribe.phantom import SPLITS, make_phantom, write_dicom_series
from tomoscribe.phantom_head import make_head_phantom, write_head_series

SETS = ("chest-abdomen CT", "chest-abdomen CT, no body part", "head CT, no body part",
        "head MR", "head MR, no body part", "torso as MR, no body part")


def _write(kind: str, seed: int, folder: Path) -> None:
    if kind.startswith(("chest", "torso")):
        paths = write_dicom_series(make_phantom(seed), folder)
        if "no body part" in kind:
            for path in paths:
                ds = pydicom.dcmread(path)
                del ds.BodyPartExamined
                if kind.startswith("torso"):  # the same voxels, stored as an MR's
                    ds.Modality = "MR"
                    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
                    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
                ds.save_as(path)
    elif kind.startswith("head CT"):
        write_head_series(make_head_phantom(seed, modality="CT"), folder, body_part="")
    elif "no body part" in kind:
        write_head_series(make_head_phantom(seed, modality="MR"), folder, body_part="")
    else:
        write_head_series(make_head_phantom(seed, modality="MR"), folder)


def median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 2) if values else None


def _fmt_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def run_one(scribe: Scribe, folder: Path) -> tuple[str, str, int, int, float | None, float]:
    """One study: ``(outcome, reason, findings, structures out of range, early s, full s)``.

    The outcome is "refused by the headers", "refused by the image" or
    "reported". The study is read to the end (``early_refusal=False``) to
    count what it would have reported; ``early s`` is the time the product
    path (encode with the early refusal) took to refuse it before the
    refiner (``None``: not refused there), ``full s`` that of encode and
    generate read to the end.
    """
    try:
        series = select_series(scan_folder(folder), None, scribe.scope).chosen
    except OutOfScopeError as err:
        return "refused by the headers", str(err), 0, 0, None, 0.0
    volume = load_series(series)
    t0 = time.perf_counter()
    enc = scribe.encode(volume, early_refusal=False)
    report = scribe.generate(enc, [])
    full = time.perf_counter() - t0
    early_s: float | None = None
    early = (scribe.coarse_refusal(enc.seg_logits, enc.extra["grid"], volume.spacing,
                                  volume.voxels)
             if scribe.net.refine is not None else None)
    if early is not None:
        t0 = time.perf_counter()
        try:
            scribe.encode(volume)
        except OutOfScopeError:
            early_s = time.perf_counter() - t0
    found = scribe.anatomy_found(report, volume)
    scope = scribe.scope
    present = {name: v for name, v in found.items() if v[0] >= scope.min_ml}
    wrong = (sum(1 for name, lo, hi in scope.anatomy
                 if name in present and not lo <= present[name][1] <= hi)
             + sum(1 for name, lo, hi in scope.volumes
                   if name in present and not lo <= present[name][0] <= hi))
    try:
        scribe.check_anatomy(report, volume)
    except OutOfScopeError as err:
        return ("refused by the image", early or str(err), len(report.findings), wrong, early_s,
                full)
    if early is not None:  # the early check must never refuse what the full one passes
        return "reported", f"refused early, passed in full: {early}", len(report.findings), \
            wrong, early_s, full
    return "reported", "", len(report.findings), wrong, None, full


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60, help="studies per set")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), metavar="SET",
                    help=f"which sets (default: all): {'; '.join(SETS)}")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/scope.json"))
    args = ap.parse_args(argv)

    scribe = Scribe.load(args.model_dir)
    print(f"model {scribe.name} {scribe.version}: reads {scribe.scope.what()}; "
          f"{args.n} {args.split} studies per set", flush=True)
    seeds = list(SPLITS[args.split][: args.n])
    rows: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    for kind in args.sets:
        outcomes: Counter[str] = Counter()
        giveaways: Counter[str] = Counter()
        wrongs: Counter[int] = Counter()
        examples: list[str] = []
        hallucinated = 0
        early_s: list[float] = []
        full_s: list[float] = []
        early_wrong = 0
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                _write(kind, seed, Path(tmp))
                outcome, reason, findings, wrong, early, full = run_one(scribe, Path(tmp))
            outcomes[outcome] += 1
            if early is not None:
                early_s.append(early)
                early_wrong += outcome == "reported"
            if outcome != "refused by the headers":
                full_s.append(full)
                wrongs[wrong] += 1
            if outcome == "refused by the image":
                hallucinated += findings > 0
                cue = re.split(r" \(| is ", reason.split("took for the ", 1)[-1], maxsplit=1)[0]
                giveaways["none found" if "found none" in reason else cue] += 1
            if reason and len(examples) < 2:
                examples.append(reason)
        rows[kind] = {"studies": len(seeds), **{k: outcomes[k] for k in (
            "refused by the headers", "refused by the image", "reported")},
            "image refusals by structure": dict(giveaways),
            "refused reports that had findings": hallucinated,
            "studies by structures out of range": {str(k): wrongs[k] for k in sorted(wrongs)},
            "refused before the refiner": len(early_s),
            "refused before the refiner but passed in full": early_wrong,
            "median s, refused before the refiner": median(early_s),
            "median s, read to the end": median(full_s),
            "examples": examples}
        print(f"  {kind}: {dict(outcomes)} ({time.time() - t0:.0f} s)", flush=True)

    print()
    print("| studies | n | refused by the headers | refused by the image | reported |")
    print("| --- | --- | --- | --- | --- |")
    for kind, row in rows.items():
        print(f"| {kind} | {row['studies']} | {row['refused by the headers']} | "
              f"{row['refused by the image']} | {row['reported']} |")
    print()
    for kind, row in rows.items():
        if row["image refusals by structure"]:
            had = row["refused reports that had findings"]
            print(f"{kind}: image refusals by structure {row['image refusals by structure']}, "
                  f"{had} of them would have reported findings; studies by structures out of "
                  f"range {row['studies by structures out of range']}")
        if row["refused before the refiner"] or row["median s, read to the end"] is not None:
            print(f"{kind}: refused before the refiner {row['refused before the refiner']} "
                  f"(of which passed in full: "
                  f"{row['refused before the refiner but passed in full']}), median "
                  f"{_fmt_s(row['median s, refused before the refiner'])} against "
                  f"{_fmt_s(row['median s, read to the end'])} read to the end")
        for example in row["examples"][:1]:
            print(f"  e.g. {example[:220]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": f"{scribe.name} {scribe.version}",
                                     "split": args.split, "n": args.n,
                                     "seconds": round(time.time() - t0), "sets": rows},
                                    indent=2) + "\n")
    print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
