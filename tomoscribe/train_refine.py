"""Train the organ-box refiner: ``python -m tomoscribe.train_refine --init MODEL``.

The cascade's second stage (:mod:`tomoscribe.model.refine`) learns from the
first stage as it is: every training phantom (of the model's domain,
``net.domain``: chest-abdomen CT or head MR) is rendered on its acquisition
grid, passed through the frozen model of ``--init`` exactly as at inference,
and each organ box the coarse segmentation gives becomes one sample (input
``(4, d, h, w)``, target other / organ / lesion on the source voxels). The
boxes are rendered once into ``--checkpoint``/boxes-*.pt; training is
resumable from ``--checkpoint``/refine-last.pt like the other stages.

Training reads patches of the boxes (32 x 48 x 48 by default, a quarter of a
liver box: four times the steps in the same time), inference whole boxes.
The coarse hints invite shortcuts. Given the organ's own coarse
probability, the refiner copied it: it found 15% of the lesions under 60
voxels even in its training boxes, and a 37 HU nodule the coarse head had
missed stayed lung. So the organ hint includes the lesions
(:func:`~tomoscribe.model.refine.box_input`), and half of the patches have
their coarse lesion channel zeroed (``--coarse-dropout``): the lesion must
come from the image.
Loss: cross-entropy (lesion weighted) + soft Dice of the organ and of the
lesion class (an absent lesion scores 1 only when none is predicted). Half
of the patches drawn are centred near a lesion; each is flipped at random
along its three axes (the refiner's task is the same for a left and a right
organ).

The whole model (frozen first stage + refiner) is written to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.preprocess import prepare
from tomoscribe.model.refine import (
    LESION,
    MIN_LESION_ML,
    ORGAN,
    OTHER,
    box_input,
    box_shape,
    canonical_spacing,
    organ_box,
    refine,
    refined_organs,
    to_canonical,
)
from tomoscribe.model.scribe import Scribe
from tomoscribe.phantom import SPLITS
from tomoscribe.train import (
    VERSION_HELP,
    load_overlapping,
    render_study,
    save_model,
    warmup_cosine,
)

#: the training seeds start here, away from the first stage's 1,200
FIRST_SEED = 500_000

Box = dict[str, object]
#: the weights a box depends on
FIRST_STAGE = ("encoder.", "seg.")


def load_net(folder: Path) -> ScribeNet:
    """A model folder's network (float32, eval mode), loaded as inference loads it."""
    return Scribe.load(folder).net


@torch.no_grad()
def boxes_of(net: ScribeNet, seed: int) -> list[Box]:
    """The refiner's training samples of phantom ``seed``: one per coarse organ box.

    The phantom is of the model's domain (``cfg.domain``): chest-abdomen CT or
    head MR, preprocessed with that domain's intensity.
    """
    cfg = net.cfg
    dom = cfg.the_domain
    hu, labels, aff, _lesions = render_study(seed, dom)
    x, grid = prepare(hu, aff, cfg.model_shape, dom.intensity)
    feats = net.encoder(x)
    logits, _dec = net.seg(feats, x)
    prob = logits.softmax(dim=1)
    coarse = to_canonical(grid.to_source_labels(logits.argmax(dim=1)[0].to(torch.uint8).numpy()),
                          grid)
    canon_hu = to_canonical(hu, grid)
    truth = to_canonical(labels, grid)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    sp = canonical_spacing(spacing, grid)
    out: list[Box] = []
    for organ in refined_organs(cfg.organ_classes):
        box = organ_box(coarse == organ, sp)
        if box is None:
            continue
        inp = box_input(canon_hu, prob, grid, box, sp, organ, cfg.lesion_class)
        t = truth[tuple(slice(box[0][a], box[1][a]) for a in range(3))]
        y = np.full(t.shape, OTHER, dtype=np.uint8)
        y[t == organ] = ORGAN
        y[t == cfg.lesion_class] = LESION
        y = box_target(y, box_shape(box, sp))
        out.append({"x": inp[0].numpy().astype(np.float16), "y": y, "seed": seed,
                    "organ": organ, "lesion": bool((y == LESION).any())})
    return out


def box_target(y: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A box's target ``(d, h, w)`` on the refinement grid ``shape``.

    Unchanged where the source is the grid (every chest-abdomen phantom);
    where the source is finer than the floor (a head MR's 0.9 mm pixels),
    the class covering most of each refinement voxel, the area average the
    input went through (:func:`~tomoscribe.model.refine.box_input`) taken
    per class.
    """
    if y.shape == shape:
        return y
    onehot = F.one_hot(torch.from_numpy(y.astype(np.int64)), 3).permute(3, 0, 1, 2)
    share = F.adaptive_avg_pool3d(onehot[None].float(), shape)[0]
    return share.argmax(dim=0).to(torch.uint8).numpy()


def _render(args: tuple[Path, list[int]]) -> list[Box]:
    torch.set_num_threads(1)
    folder, seeds = args
    net = load_net(folder)
    return [b for s in seeds for b in boxes_of(net, s)]


def build_boxes(init: Path, seeds: list[int], path: Path, workers: int) -> list[Box]:
    """Render (or load) the boxes of ``seeds`` through the first stage of ``init``."""
    key = {"seeds": seeds, "first_stage": vision_hash(init, FIRST_STAGE)}
    if path.exists():
        data = torch.load(path, weights_only=False)
        if data["key"] == key:
            return list(data["boxes"])
    chunks = [(init, seeds[i : i + 8]) for i in range(0, len(seeds), 8)]
    boxes: list[Box] = []
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done, part in enumerate(pool.map(_render, chunks), start=1):
            boxes.extend(part)
            print(f"boxes of {min(done * 8, len(seeds))}/{len(seeds)} phantoms: {len(boxes)} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "boxes": boxes}, path)
    return boxes


def vision_hash(folder: Path, parts: tuple[str, ...] = ("encoder.", "seg.", "refine.")) -> str:
    """SHA-256 of a model folder's weights under ``parts`` (default: encoder, head, refiner).

    The boxes depend on the first stage only (``("encoder.", "seg.")``), so
    retraining a refiner reuses them; the refined statistics also depend on
    the refiner.
    """
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(k for k in state if k.startswith(parts)):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    return digest.hexdigest()


def _stats_chunk(args: tuple[Path, list[int], str]) -> list[list[tuple[float, float]]]:
    torch.set_num_threads(1)
    folder, seeds, mode = args
    net = load_net(folder)
    assert net.refine is not None
    organs = refined_organs(net.cfg.organ_classes)
    rows = []
    with torch.no_grad():
        for seed in seeds:
            hu, _labels, aff, _lesions = render_study(seed, net.cfg.the_domain)
            x, grid = prepare(hu, aff, net.cfg.model_shape, net.cfg.the_domain.intensity)
            logits, _dec = net.seg(net.encoder(x), x)
            res = refine(net.refine, hu, tuple(np.linalg.norm(aff[:3, :3], axis=0)), grid,
                         logits, organs, net.cfg.lesion_class, net.cfg.refine_flips, mode,
                         net.cfg.refine_min_lesion_prob)
            rows.append([res.stats[c] for c in organs])
    return rows


def refined_region_stats(init: Path, seeds: list[int], checkpoint: Path,
                         workers: int = 2, mode: str = "rim") -> torch.Tensor:
    """The refiner's lesion statistics of training phantoms, ``(N, refined organs, 2)``.

    What a language stage with ``refine_stats`` feeds the region tokens in
    place of the coarse columns; rendered with the model of ``init`` (which
    must have a refiner) and cached in ``checkpoint``/refine-stats.pt, keyed
    by the seeds, the weights they depend on (:func:`vision_hash`) and the
    statistics mode (``NetConfig.refine_stats_mode``), so the language and
    align stages of one recipe share them.
    """
    key: dict[str, object] = {"seeds": seeds, "vision": vision_hash(init)}
    net_conf = json.loads((init / "config.json").read_text())["net"]
    min_prob = NetConfig.from_dict(net_conf).refine_min_lesion_prob
    if min_prob:  # caches written before the setting existed kept every component
        key["min_lesion_prob"] = min_prob
    if mode != "rim":  # caches written before the modes existed are "rim"
        key["mode"] = mode
        key["min_lesion_ml"] = MIN_LESION_ML  # "owned" leaves out smaller components
    path = checkpoint / "refine-stats.pt"
    if path.exists() and (data := torch.load(path, weights_only=False))["key"] == key:
        cached: torch.Tensor = data["stats"]
        return cached
    chunks = [(init, seeds[i : i + 16], mode) for i in range(0, len(seeds), 16)]
    rows: list[list[tuple[float, float]]] = []
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(_stats_chunk, chunks):
            rows.extend(part)
            print(f"refined statistics {len(rows)}/{len(seeds)} ({time.time() - t0:.0f}s)",
                  flush=True)
    stats = torch.tensor(rows, dtype=torch.float32)
    checkpoint.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "stats": stats}, path)
    return stats


def refine_loss(logits: torch.Tensor, y: torch.Tensor, lesion_weight: float,
                recall_weight: float = 0.0) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice of organ and lesion (+ a lesion recall term).

    With ``recall_weight``, adds that much of the mean cross-entropy over the
    lesion voxels alone: a 10 mm lesion is a dozen voxels of a 70,000-voxel
    patch, and weighted cross-entropy and Dice left such lesions undetected
    after 1,300 steps (the mean over the lesion voxels gives each lesion the
    weight of a large one).

    Shapes: logits ``(B, 3, d, h, w)``, y ``(B, d, h, w)`` long.
    """
    weight = torch.tensor([1.0, 1.0, lesion_weight], device=logits.device)
    ce = F.cross_entropy(logits, y, weight=weight)
    prob = logits.softmax(dim=1)
    loss = ce
    lesion = y == LESION
    if recall_weight > 0 and bool(lesion.any()):
        per_voxel = F.cross_entropy(logits, y, reduction="none")
        loss = loss + recall_weight * per_voxel[lesion].mean()
    for cls in (ORGAN, LESION):
        p, t = prob[:, cls], (y == cls).float()
        dice = (2 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
        loss = loss + (1 - dice)
    return loss


def lesion_sizes(box: Box) -> list[int]:
    """Voxels of each lesion component of a box's target, in :func:`ndimage.label` order."""
    from scipy import ndimage

    y = box["y"]
    assert isinstance(y, np.ndarray)
    comps, n = ndimage.label(y == LESION)
    return [int(v) for v in np.bincount(comps.ravel(), minlength=n + 1)[1:]]


def patch(box: Box, size: tuple[int, int, int], rng: np.random.Generator,
          component: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A training patch of a box (the whole box along axes shorter than ``size``).

    Centred (jittered by a quarter patch) on a voxel of one of the box's
    lesions, each lesion as likely as the next whatever its size, when the
    box has one (lesion ``component``, numbered as :func:`lesion_sizes`
    numbers them, when given); anywhere otherwise.
    """
    from scipy import ndimage

    x, y = box["x"], box["y"]
    assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
    shape = y.shape
    if box["lesion"]:
        comps, n = ndimage.label(y == LESION)
        pick = component if component is not None else int(rng.integers(1, n + 1))
        pts = np.argwhere(comps == pick)
        centre = pts[int(rng.integers(len(pts)))]
    else:
        centre = np.array([int(rng.integers(n)) for n in shape])
    lo = []
    for a in range(3):
        n = min(size[a], shape[a])
        c = int(centre[a]) + int(rng.integers(-(n // 4), n // 4 + 1))
        lo.append(int(np.clip(c - n // 2, 0, shape[a] - n)))
    sl = tuple(slice(lo[a], lo[a] + min(size[a], shape[a])) for a in range(3))
    return x[(slice(None), *sl)], y[sl]


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips along each axis: ``(1, 4, d, h, w)`` float, ``(1, d, h, w)`` long."""
    for a in range(3):
        if rng.random() < 0.5:
            x = np.flip(x, axis=a + 1)
            y = np.flip(y, axis=a)
    return (torch.from_numpy(np.ascontiguousarray(x)).float()[None],
            torch.from_numpy(np.ascontiguousarray(y)).long()[None])


def jitter_hint(x: torch.Tensor, rng: np.random.Generator, max_radius: int = 2,
                max_shift: int = 2) -> torch.Tensor:
    """Perturb the coarse organ hint (channel 2) of a patch, in place.

    A refiner trained on the coarse head's own hints copied their borders: fed
    the hint dilated by two voxels, it grew the liver by 36% and a kidney by
    150%, though the organ's edge is plain in the image. So the hint's border
    is moved in training: grown or shrunk (a max or min filter of radius 0 to
    ``max_radius`` voxels per axis), then shifted by up to ``max_shift`` voxels
    per axis; where the organ is stays in the hint, where its edge is must
    come from the image.

    Shapes: x ``(1, 4, d, h, w)``.
    """
    hint = x[:, 2:3]
    radius = [int(rng.integers(0, max_radius + 1)) for _ in range(3)]
    if any(radius):
        k = tuple(2 * r + 1 for r in radius)
        pad = tuple(radius)
        sign = 1.0 if rng.random() < 0.5 else -1.0  # grow or shrink
        hint = sign * F.max_pool3d(sign * hint, k, stride=1, padding=pad)
    shift = [int(rng.integers(-max_shift, max_shift + 1)) for _ in range(3)]
    if any(shift):  # shift with the edge voxels repeated (no wrap-around)
        p = [abs(v) for v in shift]
        padded = F.pad(hint, (p[2], p[2], p[1], p[1], p[0], p[0]), mode="replicate")
        d, h, w = hint.shape[2:]
        s0, s1, s2 = (p[a] - shift[a] for a in range(3))
        hint = padded[:, :, s0 : s0 + d, s1 : s1 + h, s2 : s2 + w]
    x[:, 2:3] = hint
    return x


class PatchStream(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """An endless stream of augmented training patches ``((1, 4, d, h, w), (1, d, h, w))``.

    With ``shares`` (organ class -> fraction), that fraction of the patches
    comes from that organ's boxes, the rest from every box. With
    ``small_share``, that fraction of all patches is centred on a lesion of
    fewer than ``small_voxels`` voxels (any box's, each such lesion as likely
    as the next). Half of the
    other patches come from boxes with a lesion (centred on one); each
    is flipped at random, has its coarse lesion channel zeroed with
    probability ``coarse_dropout`` and its organ hint jittered with
    probability ``hint_jitter``. Run in DataLoader workers (``--loaders``),
    patch cutting keeps up with a GPU; each worker draws from its own
    generator (``seed`` and the worker's id).
    """

    def __init__(self, boxes: list[Box], size: tuple[int, int, int], coarse_dropout: float,
                 hint_jitter: float, seed: int, shares: dict[int, float] | None = None,
                 small_share: float = 0.0, small_voxels: int = 40) -> None:
        self.boxes, self.size, self.seed = boxes, size, seed
        #: (box, lesion component) of every lesion under ``small_voxels`` voxels
        self.small = [(i, k + 1) for i, b in enumerate(boxes) if b["lesion"]
                      for k, v in enumerate(lesion_sizes(b)) if v < small_voxels]
        self.small_share = small_share if self.small else 0.0
        self.coarse_dropout, self.hint_jitter = coarse_dropout, hint_jitter
        self.shares = {c: p for c, p in (shares or {}).items()
                       if any(b["organ"] == c for b in boxes)}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id + 1])
        groups = [(p, [i for i, b in enumerate(self.boxes) if b["organ"] == c])
                  for c, p in self.shares.items()]
        groups.append((1.0 - sum(p for p, _ in groups), list(range(len(self.boxes)))))
        pools = [([i for i in ids if self.boxes[i]["lesion"]],
                  [i for i in ids if not self.boxes[i]["lesion"]]) for _p, ids in groups]
        chance = np.array([max(p, 0.0) for p, _ in groups])
        chance /= chance.sum()
        while True:
            if self.small_share and rng.random() < self.small_share:
                i, component = self.small[int(rng.integers(len(self.small)))]
                x, y = augment(*patch(self.boxes[i], self.size, rng, component), rng)
                yield self._perturbed(x, rng), y
                continue
            with_lesion, without = pools[int(rng.choice(len(pools), p=chance))]
            pool = with_lesion if (with_lesion and rng.random() < 0.5) or not without else without
            b = self.boxes[int(pool[int(rng.integers(len(pool)))])]
            x, y = augment(*patch(b, self.size, rng), rng)
            yield self._perturbed(x, rng), y

    def _perturbed(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The coarse hints of a patch ``(1, 4, d, h, w)`` dropped or jittered, in place."""
        if rng.random() < self.coarse_dropout:
            x[:, 3] = 0.0  # no coarse lesion hint: the lesion must come from the image
        if rng.random() < self.hint_jitter:
            jitter_hint(x, rng)  # the organ's edge must come from the image
        return x


def main(argv: list[str] | None = None) -> int:
    """Train the refiner; see ``--help``."""
    p = argparse.ArgumentParser(prog="python -m tomoscribe.train_refine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, required=True,
                   help="the trained first stage (model folder)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--version", default=None, help=VERSION_HELP)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/refine"))
    p.add_argument("--phantoms", type=int, default=400, help="training phantoms")
    p.add_argument("--width", type=int, default=None,
                   help="full-resolution channels (default: as in --init, else 12)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this long (0: no limit)")
    p.add_argument("--batch", type=int, default=4, help="patches per step (accumulated)")
    p.add_argument("--patch", type=int, nargs=3, default=(32, 48, 48),
                   help="training patch (slices, rows, columns); inference reads whole boxes")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lesion-weight", type=float, default=5.0)
    p.add_argument("--recall-weight", type=float, default=0.0,
                   help="weight of the mean cross-entropy over lesion voxels (small lesions)")
    p.add_argument("--coarse-dropout", type=float, default=0.5,
                   help="share of patches whose coarse lesion channel is zeroed")
    p.add_argument("--hint-jitter", type=float, default=0.0,
                   help="share of patches whose coarse organ hint is grown, shrunk and shifted")
    p.add_argument("--organ-share", nargs=2, action="append", default=[],
                   metavar=("STRUCTURE", "FRACTION"),
                   help="draw this fraction of the patches from one structure's boxes "
                        "(repeatable; e.g. --organ-share 'right kidney' 0.3)")
    p.add_argument("--small-share", type=float, default=0.0,
                   help="share of patches centred on a lesion under --small-voxels voxels")
    p.add_argument("--small-voxels", type=int, default=40,
                   help="what --small-share counts as small (40: a 15 mm lesion at 3 x 3 x 5 mm)")
    p.add_argument("--fresh", action="store_true",
                   help="start the refiner from new weights, not from --init's refiner")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="processes rendering the boxes")
    p.add_argument("--loaders", type=int, default=0,
                   help="processes cutting training patches (0: in the training process)")
    p.add_argument("--device", default="cpu",
                   help="torch device of the refiner's training (cpu, cuda, auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--min-lesion-prob", type=float, default=None,
                   help="the model's refine_min_lesion_prob: lesion components whose mean "
                   "lesion probability is under it are dropped at inference "
                   "(refine.drop_weak_lesions; default: --init's, 0 keeps every one)")
    args = p.parse_args(argv)
    if args.min_lesion_prob is not None and not 0.0 <= args.min_lesion_prob < 1.0:
        p.error("--min-lesion-prob must be in [0, 1)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prior = json.loads((args.init / "config.json").read_text())
    cfg = NetConfig.from_dict(prior["net"])
    names = {name: k + 1 for k, name in enumerate(cfg.the_domain.structures)}
    shares: dict[int, float] = {}
    for name, fraction in args.organ_share:
        try:
            share = float(fraction)
        except ValueError:
            share = -1.0
        if name not in names or not 0.0 < share < 1.0:
            print(f"error: --organ-share {name!r} {fraction}: a structure of "
                  f"{', '.join(names)} and a fraction between 0 and 1", flush=True)
            return 2
        shares[names[name]] = share
    if not 0.0 <= args.small_share < 1.0:
        print(f"error: --small-share {args.small_share}: a fraction from 0 up to 1", flush=True)
        return 2
    if sum(shares.values()) >= 1.0:
        print("error: the --organ-share fractions must add up to less than 1", flush=True)
        return 2
    seeds = list(SPLITS["train"][FIRST_SEED : FIRST_SEED + args.phantoms])
    boxes = build_boxes(args.init, seeds, args.checkpoint / f"boxes-{args.phantoms}.pt",
                        args.workers)
    if not boxes:
        print(f"error: the first stage of {args.init} finds no organ in {len(seeds)} phantoms; "
              "train it before its refiner", flush=True)
        return 1
    print(f"{len(boxes)} boxes, {sum(bool(b['lesion']) for b in boxes)} with a lesion",
          flush=True)

    cfg.refine_width = args.width or cfg.refine_width or 12
    if args.min_lesion_prob is not None:
        cfg.refine_min_lesion_prob = args.min_lesion_prob
    net = ScribeNet(cfg)
    init = torch.load(args.init / "model.pt", map_location="cpu", weights_only=True)
    if args.fresh:
        init = {k: v for k, v in init.items() if not k.startswith("refine.")}
    load_overlapping(net, init)
    refiner = net.refine
    assert refiner is not None
    refiner.to(device)
    opt = torch.optim.AdamW(refiner.parameters(), lr=args.lr, weight_decay=1e-4)
    step, spent = 0, 0.0
    ckpt = args.checkpoint / "refine-last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        refiner.load_state_dict(state["refine"])
        opt.load_state_dict(state["opt"])
        step, spent = int(state["step"]), float(state["seconds"])
        print(f"resumed from {ckpt} at step {step}", flush=True)
    stream = PatchStream(boxes, tuple(args.patch), args.coarse_dropout, args.hint_jitter,
                         args.seed * 1000 + step, shares, args.small_share, args.small_voxels)
    if args.small_share:
        print(f"{len(stream.small)} lesions under {args.small_voxels} voxels, "
              f"{args.small_share:.0%} of the patches centred on one", flush=True)
    patches = iter(torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=args.loaders,
        prefetch_factor=4 if args.loaders else None, persistent_workers=bool(args.loaders)))
    n_params = sum(q.numel() for q in refiner.parameters())
    print(f"refiner: {n_params / 1e3:.0f} k parameters, width {cfg.refine_width}, "
          f"on {device}", flush=True)

    def save(final: bool) -> None:
        args.checkpoint.mkdir(parents=True, exist_ok=True)
        torch.save({"refine": refiner.state_dict(), "opt": opt.state_dict(), "step": step,
                    "seconds": time.time() - t0}, ckpt.with_suffix(".tmp"))
        os.replace(ckpt.with_suffix(".tmp"), ckpt)
        if final:
            refiner.cpu()
            history = [*prior.get("history", []),
                       {"stage": "refine", "steps": step, "batch": args.batch, "lr": args.lr,
                        "phantoms": args.phantoms, "width": cfg.refine_width,
                        "lesion_weight": args.lesion_weight,
                        "coarse_dropout": args.coarse_dropout,
                        "hint_jitter": args.hint_jitter,
                        "recall_weight": args.recall_weight, "patch": list(args.patch),
                        "fresh": args.fresh, "device": device.type,
                        "organ_share": {n: float(f) for n, f in args.organ_share},
                        "small_share": args.small_share, "small_voxels": args.small_voxels,
                        "min_lesion_prob": cfg.refine_min_lesion_prob}]
            meta = {k: v for k, v in prior.items()
                    if k not in ("name", "net", "history", "version")}
            save_model(net, args.out, {**meta, "version": args.version, "refine_steps": step,
                                       "history": history})

    t0 = time.time() - spent
    refiner.train()
    running = 0.0
    while step < args.steps:
        frac = step / args.steps
        if args.minutes:
            frac = max(frac, (time.time() - t0) / (args.minutes * 60))
        if frac >= 1.0:
            print("budget reached", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(args.lr, frac)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for _ in range(args.batch):
            x, y = next(patches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = refine_loss(refiner(x), y, args.lesion_weight, args.recall_weight) / args.batch
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(refiner.parameters(), 2.0)
        opt.step()
        step += 1
        if step % 20 == 0 or step == 1:  # reading the loss waits for the device
            value = float(total)
            running = value if step == 1 else 0.5 * running + 0.5 * value
        if step % 20 == 0:
            print(f"step {step} loss {running:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if step % args.save_every == 0:
            save(final=False)
    refiner.eval()
    save(final=True)
    print(f"saved {args.out} after {step} refiner steps", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
