"""DCFormer against a 3D ViT of the same size: segmentation from scratch on one budget.

    .venv/bin/python benchmarks/encoders.py [--steps 300] [--n 40] [--json PATH]
        [--rows dcformer vit dcformer-siglip --siglip checkpoints/siglip/encoder.pt]
    .venv/bin/python benchmarks/encoders.py --score MODEL_DIR [MODEL_DIR ...] [--n 40]

The ablation's encoder row. Each encoder (``NetConfig.encoder`` "dcformer",
the shipped model's, and "vit", :mod:`tomoscribe.model.vit3d`, 147 k
parameters against 152 k) gets the same segmentation head and is trained from
new weights on the same training phantoms, in the same order, for the same
number of steps (batch, learning rate and loss as the joint stage of
``python -m tomoscribe.train``; no language loss). Each is then scored on the
first ``--n`` phantoms of the validation range: Dice per class on the model
grid (48 x 96 x 96), the head's argmax against the phantom's labels resampled
to that grid. The table gives parameters, GFLOP of one encoder pass and
seconds per training step, measured in this run.

The row ``dcformer-siglip`` is DCFormer started from the encoder weights of
a SigLIP pretraining run (``python -m tomoscribe.train_siglip``, file
``--siglip``) instead of new ones, with the same head, data and steps: what
the contrastive stage buys the segmentation.

``--score DIR [DIR ...]`` trains nothing: it scores trained model folders'
coarse segmentation (their encoder and head, before the organ-box refiner)
on the same validation phantoms, e.g. the two models of ``make
encoder-swap``, which continue the shipped model with a new encoder each.

This compares the encoders where they differ (what the segmentation sees)
on a budget a CPU affords, from new weights throughout. The full pipeline
row (each encoder under the refiner, the language model and the alignment
head, all continued from the shipped model) is ``make encoder-swap``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tomoscribe.model.network import NetConfig, ScribeNet, build_encoder
from tomoscribe.model.scribe import Scribe
from tomoscribe.model.seghead import SegHead
from tomoscribe.phantom import SPLITS
from tomoscribe.report import ORGANS
from tomoscribe.train import (
    add_phantom_arguments,
    build_cache,
    phantom_caches,
    seg_loss,
    warmup_cosine,
)

ENCODERS = ("dcformer", "vit")
#: benchmark rows: an encoder kind, and whether it starts from SigLIP-pretrained weights
ROWS = {"dcformer": ("dcformer", False), "vit": ("vit", False),
        "dcformer-siglip": ("dcformer", True)}
#: class index -> name, as the phantoms label them (0 background, 8 lesion)
CLASS_NAMES = {**{i + 1: o for i, o in enumerate(ORGANS)}, 8: "lesion"}


class SegNet(torch.nn.Module):
    """An encoder and a segmentation head: new ones for ``cfg``, or a trained model's.

    Shapes: ``(B, C, D, H, W) -> (B, K, D, H, W)`` logits.
    """

    def __init__(self, cfg: NetConfig, trained: ScribeNet | None = None) -> None:
        super().__init__()
        if trained is not None:  # its encoder and head, before the refiner
            self.encoder, self.seg = trained.encoder, trained.seg
        else:
            self.encoder = build_encoder(cfg)
            self.seg = SegHead(cfg.channels, cfg.num_classes, cfg.in_channels, cfg.head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _dec = self.seg(self.encoder(x), x)
        return logits  # type: ignore[no-any-return]


def score_models(dirs: list[Path], n: int, workers: int, cache_dir: Path, out: Path) -> int:
    """Coarse-segmentation Dice of trained model folders on ``n`` validation phantoms.

    The validation samples are cached in ``cache_dir`` (as the training run's are).
    """
    dice: dict[str, dict[str, float]] = {}
    params: dict[str, int] = {}
    vals: dict[str, list[dict[str, object]]] = {}  # by model grid: loaded once
    for folder in dirs:
        net = Scribe.load(folder).net
        tag = "x".join(map(str, net.cfg.model_shape))
        if tag not in vals:
            vals[tag] = build_cache(list(SPLITS["val"][:n]), net.cfg.model_shape,
                                    cache_dir / f"val-{n}-{tag}.pt", workers)
        dice[str(folder)] = dice_per_class(SegNet(net.cfg, net), vals[tag], net.cfg.num_classes)
        params[str(folder)] = sum(p.numel() for p in net.encoder.parameters())
    classes = [c for c in CLASS_NAMES.values() if c != "body"]
    print(f"\ncoarse segmentation (encoder and head, before the refiner), Dice on {n} "
          f"validation phantoms (model grid {', '.join(vals)})")
    print(f"{'model':40} {'encoder':>8} " + " ".join(f"{c[:12]:>12}" for c in classes))
    for name, row in dice.items():
        print(f"{name[-40:]:40} {params[name]:>8} " + " ".join(f"{row[c]:>12.3f}" for c in classes))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"val_phantoms": n, "scored": {
        name: {"encoder_parameters": params[name], "dice": dice[name]} for name in dice}},
        indent=2))
    return 0


def _batch(samples: list[dict[str, object]], idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([samples[int(i)]["x"] for i in idx])).float()  # type: ignore[misc]
    y = torch.from_numpy(np.stack([samples[int(i)]["y"] for i in idx])).long()  # type: ignore[misc]
    return x, y


def train(cfg: NetConfig, samples: list[dict[str, object]], steps: int, batch: int, lr: float,
          seed: int, init: Path | None = None) -> tuple[SegNet, float]:
    """Train one encoder + head; returns it and the seconds per step.

    The head starts from new weights; so does the encoder unless ``init``
    names an encoder state dict (a SigLIP pretraining run's ``encoder.pt``).
    """
    torch.manual_seed(seed)
    net = SegNet(cfg)
    if init is not None:
        net.encoder.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    weights = torch.ones(cfg.num_classes)
    weights[cfg.lesion_class] = 5.0  # the joint stage's --lesion-weight
    order = np.random.default_rng(seed).integers(len(samples), size=(steps, batch))
    net.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(lr, step / steps)
        x, y = _batch(samples, order[step])
        loss = seg_loss(net(x), y, weights, cfg.lesion_class)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"  {cfg.encoder} step {step + 1}/{steps} loss {loss.item():.3f} "
                  f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return net, (time.perf_counter() - t0) / max(steps, 1)


@torch.no_grad()
def dice_per_class(net: torch.nn.Module, samples: list[dict[str, object]],
                   num_classes: int) -> dict[str, float]:
    """Mean Dice of each class over the samples that hold it, on the model grid."""
    net.eval()
    scores: dict[int, list[float]] = {k: [] for k in range(1, num_classes)}
    for i in range(len(samples)):
        x, y = _batch(samples, np.array([i]))
        pred = net(x).argmax(dim=1)[0]
        truth = y[0]
        for k in scores:
            t = truth == k
            if not bool(t.any()):
                continue
            p = pred == k
            scores[k].append(float(2 * (p & t).sum()) / float(p.sum() + t.sum()))
    return {CLASS_NAMES.get(k, str(k)): float(np.mean(v)) if v else float("nan")
            for k, v in scores.items()}


def encoder_cost(cfg: NetConfig) -> tuple[int, float]:
    """Parameters and GFLOP of one encoder pass over a ``cfg.model_shape`` volume.

    Counted in training mode with the plain ("math") attention kernel: in
    evaluation mode ``nn.TransformerEncoderLayer`` runs a fused kernel, and
    on a CPU the fused attention kernels too, that the FLOP counter does not
    see (it then reported the ViT at 0.14 GFLOP, its convolutions only).
    """
    enc = build_encoder(cfg).train()
    with (torch.no_grad(), sdpa_kernel(SDPBackend.MATH),
          FlopCounterMode(display=False) as counter):
        enc(torch.zeros(1, cfg.in_channels, *cfg.model_shape))
    return sum(p.numel() for p in enc.parameters()), counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps per encoder")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n", type=int, default=40, help="validation phantoms scored")
    add_phantom_arguments(ap)
    ap.add_argument("--json", type=Path, default=None,
                    help="default benchmarks/results/encoders.json (encoders-scored.json "
                    "with --score)")
    ap.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ENCODERS),
                    help="rows to train and score (dcformer-siglip needs --siglip)")
    ap.add_argument("--siglip", type=Path, default=Path("checkpoints/siglip/encoder.pt"),
                    help="encoder weights of a SigLIP pretraining run, for dcformer-siglip")
    ap.add_argument("--score", type=Path, nargs="+", default=None, metavar="MODEL_DIR",
                    help="score these trained models' coarse segmentation, train nothing")
    ap.add_argument("--costs-only", action="store_true",
                    help="print parameters and GFLOP of each encoder, train nothing")
    args = ap.parse_args(argv)

    shape = (int(args.shape[0]), int(args.shape[1]), int(args.shape[2]))
    if args.costs_only:
        costs = {name: encoder_cost(NetConfig(model_shape=shape, encoder=name))
                 for name in ENCODERS}
        for name, (params, gflop) in costs.items():
            print(f"{name:10} {params:>8} parameters {gflop:>6.3f} GFLOP per pass")
        print(f"ViT / DCFormer: parameters {costs['vit'][0] / costs['dcformer'][0]:.2f}x, "
              f"GFLOP {costs['vit'][1] / costs['dcformer'][1]:.2f}x")
        return 0
    if args.score:
        return score_models(args.score, args.n, args.workers,
                            args.cache.parent if args.cache else Path("checkpoints"),
                            args.json or Path("benchmarks/results/encoders-scored.json"))
    if "dcformer-siglip" in args.rows and not args.siglip.is_file():
        ap.error(f"row dcformer-siglip needs --siglip: no file {args.siglip}")
    _, samples, val = phantom_caches(args, args.n)
    tag = "x".join(map(str, shape))
    cost: dict[str, tuple[int, float, float]] = {}  # parameters, GFLOP, s per step
    dice: dict[str, dict[str, float]] = {}
    for name in args.rows:
        kind, pretrained = ROWS[name]
        cfg = NetConfig(model_shape=shape, encoder=kind)
        params, gflop = encoder_cost(cfg)
        net, per_step = train(cfg, samples, args.steps, args.batch, args.lr, args.seed,
                              args.siglip if pretrained else None)
        cost[name] = (params, gflop, per_step)
        dice[name] = dice_per_class(net, val, cfg.num_classes)

    classes = [c for c in CLASS_NAMES.values() if c != "body"]
    print(f"\nencoders from new weights, {args.steps} steps of {args.batch} "
          f"({args.samples} training phantoms), Dice on {args.n} validation phantoms "
          f"(model grid {tag})")
    print(f"{'encoder':16} {'params':>8} {'GFLOP':>6} {'s/step':>7} "
          + " ".join(f"{c[:12]:>12}" for c in classes))
    for name in args.rows:
        params, gflop, per_step = cost[name]
        print(f"{name:16} {params:>8} {gflop:>6.2f} {per_step:>7.2f} "
              + " ".join(f"{dice[name][c]:>12.3f}" for c in classes))
    if "vit" in cost and "dcformer" in cost:
        ratios = [v / d for v, d in zip(cost["vit"], cost["dcformer"], strict=True)]
        print(f"ViT / DCFormer: parameters {ratios[0]:.2f}x, GFLOP {ratios[1]:.2f}x, "
              f"time per step {ratios[2]:.2f}x")
    rows = {name: {"encoder_parameters": cost[name][0], "encoder_gflop": cost[name][1],
                   "seconds_per_step": cost[name][2], "dice": dice[name]} for name in args.rows}
    out = args.json or Path("benchmarks/results/encoders.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "samples": args.samples,
        "val_phantoms": args.n, "model_shape": shape, "seed": args.seed, "rows": rows,
        "siglip": str(args.siglip) if "dcformer-siglip" in args.rows else None,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
