"""SigLIP pretraining of the 3D encoder against report text, from new weights (Med3DVLM).

    python -m tomoscribe.train_siglip --out checkpoints/siglip [--steps 200] [--batch 32]

Med3DVLM trains its DCFormer contrastively before anything else: every
image-report pair of a batch is one binary decision scored by
``sigmoid(t <img, txt> + b)`` (the pairwise sigmoid loss of
:mod:`tomoscribe.model.siglip`). Here the whole encoder learns, not a head
on frozen features as in ``python -m tomoscribe.train --stage align``::

    volume (B, 2, D, H, W) -> encoder -> stage 3 mean (B, C3) and
        stage 4 pooled to 2 x 2 x 2 (B, 8 C4)      (left and right stay apart)
        -> LayerNorm -> MLP -> (B, dim), unit length
    report ids (B, L) -> word embeddings, mean -> MLP -> (B, dim), unit length

Phantom reports come from a small grammar, so many studies share one text
(every normal study reads the same): pairs with the same text count as
positives. The training phantoms and their preprocessing are those of
``python -m tomoscribe.train`` (the same cache file).

``--out`` receives ``encoder.pt`` (the encoder's state dict, which
``benchmarks/encoders.py --siglip`` starts a segmentation run from),
``siglip.pt`` (the whole pretraining model) and ``siglip.json`` (the recipe
and image-report retrieval on validation phantoms, next to the
text-frequency baseline that cannot see the image).
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
import torch.nn.functional as F

from tomoscribe.model.network import NetConfig, build_encoder
from tomoscribe.model.siglip import AlignmentHead, recall_at
from tomoscribe.model.text import WordTokenizer, findings_to_text
from tomoscribe.train import add_phantom_arguments, pad_rows, phantom_caches, warmup_cosine


class EncoderAlignment(AlignmentHead):
    """A 3D encoder under the alignment head, trained together with the SigLIP loss.

    The head (report side, image MLP, temperature and bias, loss) is
    :class:`~tomoscribe.model.siglip.AlignmentHead`'s; its image MLP reads the
    encoder's stage-3 mean and stage-4 pooled to 2 x 2 x 2 instead of cached
    features.

    Args:
        cfg: the network settings (encoder kind, channels, model grid).
        vocab: report vocabulary size.
        dim: embedding width.
    """

    def __init__(self, cfg: NetConfig, vocab: int, dim: int = 64) -> None:
        c3, c4 = cfg.channels[-2], cfg.channels[-1]
        super().__init__(c3, 8 * c4, 0, 0, vocab, dim)
        self.encoder = build_encoder(cfg)

    def embed_volume(self, x: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``(B, dim)`` of volumes ``(B, C, D, H, W)``."""
        feats = self.encoder(x)
        low = feats[-2].flatten(2).transpose(1, 2)  # (B, tokens, C3): the head takes the mean
        high = F.adaptive_avg_pool3d(feats[-1], 2).flatten(1)[:, None]  # (B, 1, 8 C4)
        return self.embed_image(low, high, x.new_zeros(x.shape[0], 0, 0))


def _volumes(samples: list[dict[str, object]], idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([samples[int(i)]["x"] for i in idx])).float()  # type: ignore[misc]


def pretrain(model: EncoderAlignment, samples: list[dict[str, object]], texts: list[str],
             ids: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """Train ``model`` for ``steps`` steps; returns seconds per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(lr, step / steps)
        idx = rng.choice(len(samples), size=min(batch, len(samples)), replace=False)
        image = model.embed_volume(_volumes(samples, idx))
        text = model.embed_text(ids[torch.from_numpy(idx)])
        chosen = [texts[int(i)] for i in idx]
        same = torch.tensor([[a == b for b in chosen] for a in chosen])
        loss = model.loss(image, text, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        if (step + 1) % 20 == 0:
            print(f"siglip step {step + 1}/{steps} loss {loss.item():.3f} "
                  f"t {model.log_t.exp().item():.1f} b {model.bias.item():.2f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    return (time.perf_counter() - t0) / max(steps, 1)


@torch.no_grad()
def retrieval(model: EncoderAlignment, samples: list[dict[str, object]], tok: WordTokenizer,
              train_texts: list[str]) -> dict[str, dict[int, float]]:
    """Image-to-report R@1 / R@5 over the distinct report texts of ``samples``.

    Next to the baseline that cannot see the image: the texts ranked by how
    often they occur among the training phantoms, the same ranking for all.
    """
    model.eval()
    texts = [findings_to_text(s["lesions"]) for s in samples]  # type: ignore[arg-type]
    gallery = sorted(set(texts))
    truth = torch.tensor([gallery.index(t) for t in texts])
    image = torch.cat([model.embed_volume(_volumes(samples, np.arange(i, min(i + 8, len(samples)))))
                       for i in range(0, len(samples), 8)])
    text = model.embed_text(pad_rows([tok.encode(t) for t in gallery]))
    freq = Counter(train_texts)
    rank = sorted(range(len(gallery)), key=lambda j: -freq.get(gallery[j], 0))
    blind = {k: float(np.mean([gallery.index(t) in rank[:k] for t in texts])) for k in (1, 5)}
    return {"model": recall_at(image, text, truth, (1, 5)), "frequency baseline": blind}


def main(argv: list[str] | None = None) -> int:
    """Pretrain; see ``--help``."""
    ap = argparse.ArgumentParser(prog="python -m tomoscribe.train_siglip", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--val", type=int, default=100, help="validation phantoms for retrieval")
    ap.add_argument("--encoder", choices=("dcformer", "vit"), default="dcformer")
    add_phantom_arguments(ap)
    args = ap.parse_args(argv)

    shape, samples, val = phantom_caches(args, args.val)
    cfg = NetConfig(model_shape=shape, encoder=args.encoder)
    tok = WordTokenizer(cfg.vocab)
    texts = [findings_to_text(s["lesions"]) for s in samples]  # type: ignore[arg-type]
    ids = pad_rows([tok.encode(t) for t in texts])
    print(f"{len(samples)} training phantoms, {len(set(texts))} distinct reports; "
          f"{args.steps} steps of {args.batch}", flush=True)

    torch.manual_seed(args.seed)
    model = EncoderAlignment(cfg, len(cfg.vocab), args.dim)
    before = retrieval(model, val, tok, texts)
    per_step = pretrain(model, samples, texts, ids, args.steps, args.batch, args.lr, args.seed)
    after = retrieval(model, val, tok, texts)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.encoder.state_dict(), args.out / "encoder.pt")
    torch.save(model.state_dict(), args.out / "siglip.pt")
    result = {
        "encoder": args.encoder, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "dim": args.dim, "samples": args.samples, "seconds_per_step": per_step,
        "val_phantoms": args.val, "distinct_val_reports": len({findings_to_text(s["lesions"])  # type: ignore[arg-type]
                                                               for s in val}),
        "retrieval": {"new weights": before["model"], "pretrained": after["model"],
                      "frequency baseline": after["frequency baseline"]},
    }
    (args.out / "siglip.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nimage-report retrieval on {args.val} validation phantoms "
          f"({result['distinct_val_reports']} distinct reports), {per_step:.2f} s per step")
    for name, rec in result["retrieval"].items():
        print(f"  {name:<20} R@1 {rec[1]:.3f}  R@5 {rec[5]:.3f}")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
