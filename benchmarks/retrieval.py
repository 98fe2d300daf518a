"""Image-to-report retrieval on held-out phantoms (the SigLIP alignment head).

    .venv/bin/python benchmarks/retrieval.py [--n 200] [--model-dir DIR] [--json PATH]

Each of ``--n`` phantoms of the ``test`` seed range (of the model's domain:
chest-abdomen CT, or head MR for a head model) is encoded; its image
embedding ranks the *distinct* ground-truth report texts of those studies
(phantom reports come from a small grammar: every normal study reads the
same, so duplicates are merged). Recall@k: the share of studies whose own
report text is among the k best. Baseline that cannot see the image: rank the
texts by how often they occur in the training range (the same ranking for
every study).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tomoscribe.model.scribe import Scribe
from tomoscribe.model.siglip import recall_at
from tomoscribe.model.text import findings_to_text
from tomoscribe.phantom import SPLITS
from tomoscribe.train import render_study, study_lesions
from tomoscribe.volume import SliceRef, Volume

KS = (1, 5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="test phantoms")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/retrieval.json"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    scribe = Scribe.load(args.model_dir)
    domain = scribe.domain
    # CT Image Storage, or MR Image Storage for an MR domain
    storage = "1.2.840.10008.5.1.4.1.1." + ("4" if domain.intensity == "mr" else "2")
    images, texts = [], []
    for i, seed in enumerate(SPLITS[args.split][: args.n]):
        values, _labels, aff, lesions = render_study(seed, domain)
        vol = Volume(values, aff, [SliceRef(f"2.25.{seed}.{k}", storage)
                                   for k in range(values.shape[0])])
        images.append(scribe.image_embedding(scribe.encode(vol, early_refusal=False)))
        texts.append(findings_to_text(lesions, domain))
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{args.n} studies", file=sys.stderr, flush=True)
    gallery = sorted(set(texts))
    truth = torch.tensor([gallery.index(t) for t in texts])
    image = torch.from_numpy(np.stack(images))
    text = torch.from_numpy(np.stack([scribe.report_embedding(t) for t in gallery]))
    model = recall_at(image, text, truth, KS)
    # image-blind: the texts ranked by their frequency over 2,000 training phantoms
    freq = Counter(findings_to_text(study_lesions(s, domain), domain)
                   for s in SPLITS["train"][:2000])
    rank = sorted(range(len(gallery)), key=lambda j: -freq.get(gallery[j], 0))
    blind = {k: float(np.mean([gallery.index(t) in rank[:k] for t in texts])) for k in KS}
    result = {
        "model": scribe.name, "version": scribe.version, "domain": domain.name,
        "split": args.split,
        "studies": len(texts), "distinct_reports": len(gallery),
        "recall": {"model": model, "frequency baseline": blind},
        "seconds": time.perf_counter() - t0,
    }
    print(f"\n{len(texts)} phantoms of the {args.split} range, {len(gallery)} distinct reports,"
          f" model {scribe.name} {scribe.version}")
    print(f"{'row':<22}" + "".join(f"{f'R@{k}':>8}" for k in KS))
    for name, rec in result["recall"].items():
        print(f"{name:<22}" + "".join(f"{rec[k]:>8.3f}" for k in KS))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
