"""Inference time and memory per study, with and without trimming the heap.

``.venv/bin/python benchmarks/inference.py [--n 20] [--threads 2]``

Runs the shipped model over ``--n`` test phantoms (render, ``Scribe.encode``,
``Scribe.generate`` with 6 questions) in two fresh processes, one after the
other, each the same way:

* ``tomoscribe``: as shipped (:func:`tomoscribe.model.scribe.trim_heap`
  after each encoding);
* ``glibc default``: the same without trimming.

Prints, per process, the median seconds per study (encode + generate, not
the rendering), the resident memory after the first and the last study and
the peak, and the ratios between the two; writes
``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
import torch
from tomoscribe.model import scribe as sc
if sys.argv[1] == "off":
    sc._LIBC = None  # no trimming of the heap
from tomoscribe.model.scribe import Scribe
from tomoscribe.phantom import SPLITS, make_phantom, render_acquisition
from tomoscribe.volume import SliceRef, Volume

torch.set_num_threads(int(sys.argv[3]))
model = Scribe.load()
questions = ["is there a lesion in the liver ?", "is the right lung normal ?",
             "how many lesions are in the left kidney ?", "which organ has a lesion ?",
             "are there any focal findings ?", "does the spleen contain a hypodense lesion ?"]
seconds, rss = [], []
for seed in SPLITS["test"][: int(sys.argv[2])]:
    hu, _labels, aff = render_acquisition(make_phantom(seed))
    vol = Volume(hu, aff, [SliceRef(f"2.25.{seed}.{k}", "1.2.840.10008.5.1.4.1.1.2")
                           for k in range(hu.shape[0])])
    t0 = time.perf_counter()
    model.generate(model.encode(vol), questions)
    seconds.append(time.perf_counter() - t0)
    del vol, hu
    pages = int(open("/proc/self/statm").read().split()[1])
    rss.append(pages * os.sysconf("SC_PAGE_SIZE") / 2**20)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss, "peak_rss_mib": peak}))
"""


def run(mode: str, n: int, threads: int) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(n), str(threads)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} run failed: {proc.stderr.strip().splitlines()[-1:]}")
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="test phantoms per process")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/inference.json")
    args = ap.parse_args(argv)

    rows = {"tomoscribe": run("on", args.n, args.threads),
            "glibc default": run("off", args.n, args.threads)}
    summary = {}
    print(f"{args.n} test phantoms per process, {args.threads} torch threads")
    print(f"{'allocator':<16}{'s / study (median)':>20}{'RSS after 1st':>16}"
          f"{'RSS after last':>16}{'peak RSS':>12}")
    for name, r in rows.items():
        sec, rss = r["seconds"], r["rss_mib"]
        assert isinstance(sec, list) and isinstance(rss, list)
        summary[name] = {"median_seconds": float(np.median(sec)), "rss_first_mib": rss[0],
                         "rss_last_mib": rss[-1], "peak_rss_mib": r["peak_rss_mib"]}
        s = summary[name]
        print(f"{name:<16}{s['median_seconds']:>20.2f}{s['rss_first_mib']:>12.0f} MiB"
              f"{s['rss_last_mib']:>12.0f} MiB{s['peak_rss_mib']:>8.0f} MiB")
    a, b = summary["tomoscribe"], summary["glibc default"]
    ratios = {"time": a["median_seconds"] / b["median_seconds"],
              "rss_last": a["rss_last_mib"] / b["rss_last_mib"],
              "peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"]}
    print(f"tomoscribe / glibc default: time {ratios['time']:.2f}x, resident memory after the "
          f"last study {ratios['rss_last']:.2f}x, peak {ratios['peak_rss']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n": args.n, "threads": args.threads, "rows": summary,
                                     "raw": rows, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
