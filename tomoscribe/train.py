"""Train the default model on synthetic phantoms: ``python -m tomoscribe.train``.

Reproducible (every phantom comes from a seed of the ``train`` split, the
optimiser from ``--seed``) and resumable: a checkpoint is written to
``--checkpoint`` every ``--save-every`` steps and picked up on the next run.

Each step draws a batch of phantoms from a cache of rendered training samples
(rendered once on the acquisition grid and passed through the same
preprocessing as at inference), and minimises

* segmentation: cross-entropy with class weights + soft Dice on every class
  (lesions are a tiny fraction of the voxels: Dice does not care);
* report: next-token loss of the ground-truth report after the image tokens;
* question answering: next-token loss of a templated question's answer.

At the end the weights (float16) and ``config.json`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from tomoscribe import __version__
from tomoscribe.domain import CHEST_ABDOMEN_CT, DOMAINS, HEAD_MR, Domain, get_domain
from tomoscribe.model.lm import LM_FOLDER, LMTokenizer, lm_limits, save_lm
from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.preprocess import labels_to_model_grid, prepare
from tomoscribe.model.refine import STATS_MODES, refined_organs
from tomoscribe.model.text import (
    ANSWER,
    QUESTION,
    QUESTION_TEMPLATES,
    REPORT,
    WordTokenizer,
    answer_for,
    findings_to_text,
)
from tomoscribe.phantom import SPLITS, make_phantom, render_acquisition
from tomoscribe.phantom_head import make_head_phantom, render_head_acquisition
from tomoscribe.scope import DOMAIN_SCOPES

MODEL_NAME = "tomoscribe-tiny"
#: ``--version`` of every training entry point
VERSION_HELP = ("the model version written to config.json; output UIDs and job records derive "
                "from it (default: the package's + local.<hash of the weights>, never the "
                "shipped model's)")
#: the modules a run with a new language model (``--lm``) keeps from ``--init``
VISION_MODULES = ("encoder", "seg", "refine", "align")


def render_study(seed: int, domain: str | Domain = CHEST_ABDOMEN_CT
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Phantom ``seed`` of ``domain`` on its acquisition grid.

    Returns ``(values, labels, affine, lesions)``: values as the scanner would
    store them (HU; MR times the phantom's arbitrary scale), the label map of
    :attr:`Domain.structures` and :attr:`Domain.lesion_label`, and the
    ``(site, kind)`` of every lesion.
    """
    dom = get_domain(domain)
    if dom is HEAD_MR:
        head = make_head_phantom(seed, modality="MR")
        values, labels, aff = render_head_acquisition(head)
        return (values * np.float32(head.scale), labels, aff,
                [(les.site, les.kind) for les in head.lesions])
    ph = make_phantom(seed)
    hu, labels, aff = render_acquisition(ph)
    return hu, labels, aff, [(les.organ, les.kind) for les in ph.lesions]


def study_lesions(seed: int, domain: str | Domain = CHEST_ABDOMEN_CT) -> list[tuple[str, str]]:
    """The ``(site, kind)`` of every lesion of phantom ``seed`` of ``domain`` (nothing rendered)."""
    if get_domain(domain) is HEAD_MR:
        return [(les.site, les.kind) for les in make_head_phantom(seed, modality="MR").lesions]
    return [(les.organ, les.kind) for les in make_phantom(seed).lesions]


def cache_path(folder: Path, samples: int, model_shape: tuple[int, int, int],
               domain: str | Domain = CHEST_ABDOMEN_CT) -> Path:
    """The default cache of rendered training samples in ``folder``.

    ``cache-<samples>-<D>x<H>x<W>.pt`` for chest-abdomen CT (the name every
    earlier cache has), ``cache-<domain>-<samples>-...`` for another domain.
    """
    dom = get_domain(domain)
    tag = "" if dom is CHEST_ABDOMEN_CT else f"{dom.name}-"
    return folder / f"cache-{tag}{samples}-{'x'.join(map(str, model_shape))}.pt"


def make_sample(seed: int, model_shape: tuple[int, int, int],
                domain: str | Domain = CHEST_ABDOMEN_CT) -> dict[str, object]:
    """Render phantom ``seed`` of ``domain`` and preprocess it like an inference input.

    Returns a dict with ``x`` ``(2, D, H, W)`` float16, ``y`` ``(D, H, W)``
    uint8, ``lesions`` (list of (organ, kind)) and ``domain`` (its name).
    """
    dom = get_domain(domain)
    values, labels, aff, lesions = render_study(seed, dom)
    x, grid = prepare(values, aff, model_shape, dom.intensity)
    y = labels_to_model_grid(labels, grid)
    return {
        "x": x[0].numpy().astype(np.float16),
        "y": y.astype(np.uint8),
        "lesions": lesions,
        "seed": seed,
        "domain": dom.name,
    }


def sample_domain(sample: dict[str, object]) -> Domain:
    """The domain of a cached sample (caches written before domains: chest-abdomen CT)."""
    name = sample.get("domain")
    return get_domain(name if isinstance(name, str) else None)


def sample_report(sample: dict[str, object]) -> str:
    """The ground-truth report text of a cached sample, in its domain's grammar."""
    lesions = sample["lesions"]
    assert isinstance(lesions, list)
    return findings_to_text(lesions, sample_domain(sample))


def _render_chunk(args: tuple[list[int], tuple[int, int, int], str]) -> list[dict[str, object]]:
    torch.set_num_threads(1)
    seeds, shape, domain = args
    return [make_sample(s, shape, domain) for s in seeds]


def build_cache(seeds: list[int], shape: tuple[int, int, int], path: Path,
                workers: int, domain: str | Domain = CHEST_ABDOMEN_CT
                ) -> list[dict[str, object]]:
    """Render (or load) the training samples of ``domain`` for ``seeds``."""
    dom = get_domain(domain)
    if path.exists():
        data = torch.load(path, weights_only=False)
        if (data["seeds"] == seeds and tuple(data["shape"]) == shape
                and data.get("domain", CHEST_ABDOMEN_CT.name) == dom.name):
            return list(data["samples"])
    chunks = [seeds[i : i + 16] for i in range(0, len(seeds), 16)]
    samples: list[dict[str, object]] = []
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for out in pool.map(_render_chunk, [(c, shape, dom.name) for c in chunks]):
            samples.extend(out)
            print(f"rendered {len(samples)}/{len(seeds)} ({time.time() - t0:.0f}s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"seeds": seeds, "shape": shape, "domain": dom.name, "samples": samples}, path)
    return samples


def add_phantom_arguments(ap: argparse.ArgumentParser) -> None:
    """``--samples --seed --workers --shape --cache``, as :func:`phantom_caches` takes them."""
    ap.add_argument("--samples", type=int, default=1200, help="training phantoms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=list(NetConfig.model_shape),
                    help="model grid (D H W)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="rendered training samples (default: the Makefile's "
                    "checkpoints/cache-<samples>-<shape>.pt)")


def phantom_caches(args: argparse.Namespace, val: int
                   ) -> tuple[tuple[int, int, int], list[dict[str, object]],
                              list[dict[str, object]]]:
    """The model grid, the first ``args.samples`` training and ``val`` validation samples.

    Rendered once and cached (:func:`build_cache`): training in ``args.cache``
    (default ``checkpoints/cache-<samples>-<D>x<H>x<W>.pt``), validation next to it.
    """
    shape = (int(args.shape[0]), int(args.shape[1]), int(args.shape[2]))
    tag = "x".join(map(str, shape))
    cache = args.cache or cache_path(Path("checkpoints"), args.samples, shape)
    train = build_cache(list(SPLITS["train"][: args.samples]), shape, cache, args.workers)
    held = build_cache(list(SPLITS["val"][:val]), shape, cache.parent / f"val-{val}-{tag}.pt",
                       args.workers)
    return shape, train, held


def warmup_cosine(base: float, frac: float) -> float:
    """Learning rate at progress ``frac`` (0-1): 3% linear warm-up, then a cosine to zero."""
    return float(base * min(1.0, frac / 0.03) * 0.5 * (1 + np.cos(np.pi * frac)))


def draw_question(lesions: list[tuple[str, str]], rng: np.random.Generator,
                  domain: Domain = CHEST_ABDOMEN_CT) -> tuple[str, str, str, str]:
    """A templated question about a sample: ``(template, organ, question, answer)``.

    The chest-abdomen draws are the ones the shipped model was trained with
    (one kind per organ, nothing more drawn); where a site holds several kinds,
    the kind asked about is drawn too.
    """
    counts = Counter(o for o, _k in lesions)
    template = QUESTION_TEMPLATES[int(rng.integers(len(QUESTION_TEMPLATES)))]
    # ask about a lesion organ half of the time when there is one
    if counts and rng.random() < 0.5:
        organ = str(rng.choice(sorted(counts)))
    else:
        organ = str(rng.choice(sorted(domain.kinds)))
    single = domain.single_kind(organ)
    kind = single if single is not None else str(rng.choice(domain.kinds[organ]))
    q = template.format(organ=organ, kind=kind)
    return template, organ, q, answer_for(template, organ, counts, domain, kind,
                                          Counter((o, k) for o, k in lesions))


def pad_rows(rows: list[list[int]]) -> torch.Tensor:
    """Token id rows padded with 0 into ``(len(rows), longest)``."""
    n = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (n - len(r)) for r in rows], dtype=torch.long)


def text_batch(samples: list[dict[str, object]], tok: WordTokenizer | LMTokenizer,
               rng: np.random.Generator, asked: list[tuple[str, str, str]] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Report ids and question/answer ids for a batch, padded with 0.

    ``asked``, when given, receives ``(template, organ, question)`` per sample.
    """
    reports, qas = [], []
    for s in samples:
        lesions = s["lesions"]
        assert isinstance(lesions, list)
        reports.append(tok.encode(f"{REPORT} {sample_report(s)}") + [tok.eos_id])
        template, organ, q, a = draw_question(lesions, rng, sample_domain(s))
        if asked is not None:
            asked.append((template, organ, q))
        qas.append(tok.encode(f"{QUESTION} {q} {ANSWER} {a}") + [tok.eos_id])
    return pad_rows(reports), pad_rows(qas)


def qa_loss_mask(ids: torch.Tensor, answer_id: int) -> torch.Tensor:
    """Zero out (pad) the question tokens so only the answer is scored."""
    out = ids.clone()
    for row in range(ids.shape[0]):
        pos = (ids[row] == answer_id).nonzero()
        if len(pos):
            out[row, : int(pos[0]) + 1] = 0
    return out


def seg_loss(logits: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor,
             lesion_class: int | None = None, lesion_dice: float = 0.0) -> torch.Tensor:
    """Weighted cross-entropy + mean soft Dice over foreground classes.

    With ``lesion_dice > 0``, adds that many times a soft Dice loss of the
    lesion class computed over the whole batch: lesions are ~0.05% of the
    voxels, and a per-sample Dice averaged with eight organ classes hardly
    moves them.

    Shapes: logits ``(B, K, D, H, W)``, y ``(B, D, H, W)`` long.
    """
    ce = F.cross_entropy(logits, y, weight=class_weights)
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(y, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    dims = (2, 3, 4)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1.0) / (denom + 1.0)  # (B, K)
    # an absent class scores 1 only when nothing is predicted: false positives cost
    dice_loss = (1 - dice[:, 1:]).mean()
    if lesion_class is not None and lesion_dice > 0:
        p, t = prob[:, lesion_class], onehot[:, lesion_class]
        batch_dice = (2 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
        dice_loss = dice_loss + lesion_dice * (1 - batch_dice)
    return ce + dice_loss


def lm_step_loss(
    net: ScribeNet, tokens: torch.Tensor, reports: torch.Tensor, qas: torch.Tensor, answer_id: int,
    qa_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Report loss + answer-only QA loss.

    The QA sequence is fed whole; only answer tokens are scored. ``qas`` may
    hold several questions per image, ``(k B, L)`` ordered question-major:
    the image tokens ``(B, T, width)`` are repeated for them. ``qa_tokens``,
    when given, is the questions' own prefix (TG-IS tokens depend on the
    instruction).
    """
    rep = net.lm_loss(tokens, reports)
    if qa_tokens is not None:
        tokens = qa_tokens
    if qas.shape[0] != tokens.shape[0]:
        tokens = tokens.repeat(qas.shape[0] // tokens.shape[0], 1, 1)
    emb = torch.cat([tokens, net.embed_text(qas)], dim=1)
    logits = net.lm(inputs_embeds=emb).logits
    t = tokens.shape[1]
    pred = logits[:, t - 1 : -1]
    target = qa_loss_mask(qas, answer_id)
    qa = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=0)
    return rep + qa


def load_overlapping(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``net``; where a shape grew, copy the overlapping block.

    Lets a model be widened (e.g. ``head_channels``) and fine-tuned from the
    narrower one: old weights keep their function, new units start as built.
    """
    own = net.state_dict()
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        value = value.to(target.dtype)
        if value.shape == target.shape:
            target.copy_(value)
        elif value.dim() == target.dim():
            block = tuple(slice(0, min(a, b)) for a, b in zip(value.shape, target.shape,
                                                              strict=True))
            target[block] = value[block]
    net.load_state_dict(own)


VisionCache = dict[str, torch.Tensor]


@torch.no_grad()
def vision_features(net: ScribeNet, samples: list[dict[str, object]],
                    batch: int = 4) -> VisionCache:
    """Frozen vision outputs for ``samples``, in order: everything a language stage needs.

    Keys ``low``, ``high``, ``regions`` (:meth:`ScribeNet.encode_pooled`),
    ``band`` ``(N, C1, d)`` and ``mass`` ``(N, K, D)``, ``(N, 2 K, D)`` with
    ``slice_owned`` (the slice branch's 3D inputs) and ``targets`` ``(N, 2, L,
    D)`` (:func:`slice_targets`, ``L`` the lesion class).
    """
    net.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("low", "high", "regions", "band",
                                                             "mass")}
    t0 = time.time()
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        x = torch.from_numpy(np.stack([b["x"] for b in chunk])).float()  # type: ignore[misc]
        (low, high, regions), _logits, (band, mass) = net.encode_full(x)
        for k, v in zip(parts, (low, high, regions, band, mass), strict=True):
            parts[k].append(v)
        if (i // batch) % 25 == 0:
            print(f"vision {i + len(chunk)}/{len(samples)} ({time.time() - t0:.0f}s)", flush=True)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["targets"] = torch.from_numpy(np.stack([slice_targets(s["y"], net.cfg.lesion_class)  # type: ignore[arg-type]
                                                for s in samples]))
    return out


def slice_targets(y: np.ndarray, lesion_class: int = 8) -> np.ndarray:
    """Per-slice areas the pointing loss aims at, from a model-grid label map.

    Returns ``(2, L, D)`` float32 (``L`` = ``lesion_class``, the structures
    being 1..L-1): ``[0, c]`` the area of class ``c`` per slice, ``[1, c]`` the
    area of lesion voxels within two voxels of class ``c``, ``[1, 0]`` the area
    of all lesion voxels.
    """
    from scipy import ndimage

    out = np.zeros((2, lesion_class, y.shape[0]), dtype=np.float32)
    lesion = y == lesion_class
    out[1, 0] = lesion.sum(axis=(1, 2))
    for c in range(1, lesion_class):
        organ = y == c
        out[0, c] = organ.sum(axis=(1, 2))
        if lesion.any() and organ.any():
            near = ndimage.binary_dilation(organ, iterations=2)
            out[1, c] = (lesion & near).sum(axis=(1, 2))
    return out


def relevance_target(targets: np.ndarray, template: str | None, organ: str | None,
                     lesions: list[tuple[str, str]],
                     structures: tuple[str, ...] = CHEST_ABDOMEN_CT.structures
                     ) -> np.ndarray | None:
    """The slice distribution a question should point at, or ``None`` (nothing to see).

    A report (``template`` None) and the whole-study questions point at the
    lesions; a question about an organ at that organ's lesions when it has
    some, else at the organ.
    """
    if template is None or organ is None or template.startswith(("which organ", "are there")):
        v = targets[1, 0]
    else:
        c = structures.index(organ) + 1
        has = any(o == organ for o, _k in lesions)
        v = targets[1, c] if has and targets[1, c].sum() > 0 else targets[0, c]
    total = float(v.sum())
    return v / total if total > 0 else None


def pointing_loss(relevance: torch.Tensor, wanted: list[np.ndarray | None]) -> torch.Tensor:
    """Cross-entropy of the relevance ``(B, D)`` against target distributions (rows with one)."""
    rows = [i for i, t in enumerate(wanted) if t is not None]
    if not rows:
        return relevance.new_zeros(())
    target = torch.from_numpy(np.stack([wanted[i] for i in rows])).to(relevance.dtype)  # type: ignore[misc]
    return -(target * torch.log(relevance[rows] + 1e-8)).sum(dim=1).mean()


def cached_vision(net: ScribeNet, samples: list[dict[str, object]],
                  checkpoint: Path) -> VisionCache:
    """Freeze the vision side and return its features for ``samples``, cached.

    The cache (``checkpoint / "vision.pt"``) is keyed by the samples' seeds and
    a hash of the encoder and segmentation weights (and whether the slice
    branch's mass holds the owned-lesion area).
    """
    for module in (net.encoder, net.seg):
        for param in module.parameters():
            param.requires_grad_(False)
    vision = hashlib.sha256()
    for module in (net.encoder, net.seg):
        for name, tensor in sorted(module.state_dict().items()):
            vision.update(name.encode())
            vision.update(tensor.detach().cpu().numpy().tobytes())
    # the features depend on the samples and the frozen vision side only
    key: dict[str, object] = {"seeds": [s["seed"] for s in samples],
                              "vision": vision.hexdigest()}
    if net.cfg.slice_owned:  # the mass rows grow by the owned-lesion area
        key["slice_owned"] = True
    cache = checkpoint / "vision.pt"
    if cache.exists() and (data := torch.load(cache, weights_only=False))["key"] == key:
        feats: VisionCache = data["feats"]
        return feats
    feats = vision_features(net, samples)
    checkpoint.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "feats": feats}, cache)
    return feats


def stage_features(net: ScribeNet, samples: list[dict[str, object]],
                   args: argparse.Namespace) -> VisionCache:
    """:func:`cached_vision`, with the refiner's lesion columns where the model reads them.

    With ``refine_stats``, the region statistics' last two columns of every
    refined organ are the refiner's (:func:`tomoscribe.train_refine.refined_region_stats`),
    as :meth:`tomoscribe.model.scribe.Scribe.encode` feeds them at inference.
    """
    feats = cached_vision(net, samples, args.checkpoint)
    if not net.cfg.refine_stats:
        return feats
    from tomoscribe.train_refine import refined_region_stats

    if net.refine is None or args.init is None:
        raise SystemExit("--refine-stats needs an --init model with a refiner")
    stats = refined_region_stats(args.init, [int(s["seed"]) for s in samples],  # type: ignore[call-overload]
                                 args.checkpoint, args.workers, net.cfg.refine_stats_mode)
    organ_rows = [i for i, c in enumerate(net.cfg.organ_classes)
                  if c in refined_organs(net.cfg.organ_classes)]
    feats = {**feats, "regions": feats["regions"].clone()}
    feats["regions"][:, organ_rows, -2:] = stats  # the body row keeps its coarse columns
    return feats


def train_align_stage(net: ScribeNet, samples: list[dict[str, object]], tok: WordTokenizer,
                      args: argparse.Namespace) -> int:
    """The SigLIP alignment head on the frozen vision side's cached features.

    Each step draws ``--batch`` samples and scores every image against every
    report of the batch (pairs with the same report text are positives).
    Returns the number of steps taken.
    """
    head = net.align
    if head is None:
        raise SystemExit("--stage align needs --align-dim > 0")
    feats = stage_features(net, samples, args)
    texts = [sample_report(s) for s in samples]
    ids = pad_rows([tok.encode(t) for t in texts])
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    head.train()
    t0 = time.time()
    step = 0
    for step in range(1, args.steps + 1):
        frac = step / args.steps
        lr = warmup_cosine(args.lr, frac)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = rng.choice(len(samples), size=min(args.batch, len(samples)), replace=False)
        rows = torch.from_numpy(idx)
        image = head.embed_image(feats["low"][rows], feats["high"][rows],
                                 feats["regions"][rows])
        text = head.embed_text(ids[rows])
        chosen = [texts[int(i)] for i in idx]
        same = torch.tensor([[a == b for b in chosen] for a in chosen])
        loss = head.loss(image, text, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"align step {step} loss {loss.item():.3f} lr {lr:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
    return step


class TextStep(NamedTuple):
    """One text-side step's losses and the image prefix it used."""

    #: report + answer loss (language model)
    loss: torch.Tensor
    #: TG-IS pointing loss (0 without a slice branch)
    point: torch.Tensor
    #: 3D image tokens ``(B, T, width)`` (PSAT-fused where the model has PSAT)
    tokens: torch.Tensor
    #: TG-IS slice keys ``(B, D, width)``, or None without a slice branch
    keys: torch.Tensor | None


def text_step(net: ScribeNet, feats: VisionCache, samples: list[dict[str, object]],
              idx: np.ndarray, tok: WordTokenizer | LMTokenizer, rng: np.random.Generator,
              questions: int = 1) -> TextStep:
    """Losses of a report and ``questions`` templated questions for each sample ``idx``.

    The prefix is built as :meth:`~tomoscribe.model.scribe.Scribe.prefix`
    builds it: the 3D tokens from the cached pooled features, fused with the
    samples' plane views by PSAT, and each instruction's TG-IS tokens (the
    report's own query, each question's). With a slice branch the pointing
    loss is scored too, and ``questions`` must be 1.
    """
    answer_id = tok.index[ANSWER]
    rows = torch.from_numpy(idx)
    pooled = (feats["low"][rows], feats["high"][rows], feats["regions"][rows])
    chosen = [samples[int(i)] for i in idx]
    keys = None
    if net.slices is None and net.psat is None:
        tokens = net.tokens_from_pooled(pooled)
    else:  # the 2D side reads the samples' slices
        x = torch.from_numpy(np.stack([s["x"] for s in chosen])).float()  # type: ignore[misc]
        tokens, keys = net.text_side_inputs(x, pooled, feats["band"][rows], feats["mass"][rows])
    if keys is None:
        reports, qas = text_batch(chosen, tok, rng)
        # several questions per image: the answers are short, the image is the same
        more = [text_batch(chosen, tok, rng)[1] for _ in range(questions - 1)]
        if more:
            width = max(q.shape[1] for q in (qas, *more))
            qas = torch.cat([F.pad(q, (0, width - q.shape[1])) for q in (qas, *more)])
        loss = lm_step_loss(net, tokens, reports, qas, answer_id)
        return TextStep(loss, torch.zeros(()), tokens, None)
    if questions != 1:
        raise ValueError("a model with a slice branch takes one question per sample")
    asked: list[tuple[str, str, str]] = []
    reports, qas = text_batch(chosen, tok, rng, asked)
    rep_tok, rep_rel = net.slice_tokens_for(
        keys, torch.full((len(idx), 1), tok.index[REPORT], dtype=torch.long))
    qa_tok, qa_rel = net.slice_tokens_for(keys, pad_rows([tok.encode(q) for _t, _o, q in asked]))
    loss = lm_step_loss(net, torch.cat([tokens, rep_tok], 1), reports, qas, answer_id,
                        torch.cat([tokens, qa_tok], 1))
    tg = feats["targets"][rows].numpy()
    les = [s["lesions"] for s in chosen]
    names = net.cfg.the_domain.structures
    point = (pointing_loss(rep_rel, [relevance_target(t, None, None, le, names)  # type: ignore[arg-type]
                                     for t, le in zip(tg, les, strict=True)])
             + pointing_loss(qa_rel, [relevance_target(t, a[0], a[1], le, names)  # type: ignore[arg-type]
                                      for t, a, le in zip(tg, asked, les, strict=True)]))
    return TextStep(loss, point, tokens, keys)


def train_language_stage(net: ScribeNet, samples: list[dict[str, object]],
                         tok: WordTokenizer | LMTokenizer, args: argparse.Namespace) -> int:
    """Stage 2: projectors, slice branch and language model on a frozen encoder and head.

    The encoder's forward and backward passes are almost all of a joint
    step's cost, and the language model needs many more steps than the
    segmentation to learn its grammar: here the vision side runs once per
    sample, its pooled features are cached, and the text side trains on them
    at a few milliseconds a step (M3D and LLaVA train their projector the same
    way, on a frozen vision encoder). A TG-IS slice branch, when the network
    has one, trains here too: its 2D encoder reads the cached samples' slices
    each step, and ``--point-weight`` scales its pointing loss.

    Returns the number of steps taken.
    """
    feats = stage_features(net, samples, args)
    branch = net.slices
    lm_params = list(net.lm.parameters())
    if getattr(args, "freeze_lm", False):  # a brought LM too large to fine-tune here
        for param in lm_params:
            param.requires_grad_(False)
        embedding = net.lm.get_input_embeddings()  # type: ignore[operator]
        embedding.weight.requires_grad_(True)  # the task markers' rows are new
        lm_params = [embedding.weight]
    trainable = [p for m in (net.projector, net.regions) for p in m.parameters()] + lm_params
    groups: list[dict[str, object]] = [{"params": trainable, "scale": args.lm_lr_scale}]
    if branch is not None and args.questions != 1:
        raise SystemExit("--questions must be 1 with a slice branch")
    # the 2D side (TG-IS, PSAT; parameters shared between them counted once)
    # starts from scratch next to a trained LM: a larger step
    fresh = {id(p): p for m in (branch, net.psat) if m is not None for p in m.parameters()}
    if fresh:
        groups.append({"params": list(fresh.values()), "scale": 2.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    net.train()
    net.encoder.eval()
    net.seg.eval()
    t0 = time.time()
    step = 0
    for step in range(1, args.steps + 1):
        frac = step / args.steps
        lr = warmup_cosine(args.lr, frac)
        for group in opt.param_groups:
            group["lr"] = lr * float(group["scale"])
        idx = rng.integers(len(samples), size=args.batch)
        batch = text_step(net, feats, samples, idx, tok, rng, args.questions)
        point = batch.point
        loss = batch.loss + args.point_weight * point
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 2.0)  # type: ignore[attr-defined]
        opt.step()
        if step % 50 == 0:
            print(f"lm step {step} loss {loss.item():.3f} point {point.item():.3f} "
                  f"lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    return step


def save_model(net: ScribeNet, out: Path, meta: dict[str, object]) -> None:
    """Write ``model.pt`` (float16 state dict) and ``config.json`` into ``out``.

    ``config.json`` declares the model's scope (:mod:`tomoscribe.scope`): that
    of its domain (the phantoms it trains on). A ``scope`` in ``meta`` (carried
    over from ``--init``) wins. A brought language model (:mod:`tomoscribe.model.lm`)
    and its tokenizer go to ``out / "lm"`` instead of ``model.pt``. Without a
    ``version`` in ``meta``, the model gets :func:`local_version`.
    """
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.saved_state().items()}
    tmp = out / "model.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "model.pt")
    WordTokenizer(net.cfg.vocab).save(out / "tokenizer.json")
    net_conf = net.cfg.to_dict()
    if net.lm_tokenizer is not None:  # a brought LM: its own folder, full precision
        save_lm(net.lm, net.lm_tokenizer, out)
        net_conf["lm"] = LM_FOLDER
    conf = {"name": MODEL_NAME, "scope": DOMAIN_SCOPES[net.cfg.domain].to_dict(), "net": net_conf,
            **meta}
    if not conf.get("version"):
        conf["version"] = local_version(out)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")


def local_version(out: Path) -> str:
    """The version of a model trained here: ``<package version>+local.<10 hex>``.

    The hex digits are the SHA-256 of the weights as saved (``model.pt``, and
    every file of a brought language model's ``lm/`` folder). Output UIDs and
    the plugin's job records derive from (study, model version), so a model
    that is not the shipped one must not carry the shipped model's version:
    its SR and SEG would take the UIDs of the shipped model's objects in a
    PACS that holds those, and studies the shipped model has read would count
    as done. The hash gives each trained model its own version and the same
    weights the same one, so sending a study again replaces its outputs.
    """
    digest = hashlib.sha256((out / "model.pt").read_bytes())
    lm_dir = out / LM_FOLDER
    if lm_dir.is_dir():
        for path in sorted(p for p in lm_dir.rglob("*") if p.is_file()):
            digest.update(path.relative_to(out).as_posix().encode())
            digest.update(path.read_bytes())
    return f"{__version__}+local.{digest.hexdigest()[:10]}"


def main(argv: list[str] | None = None) -> int:
    """Train; see ``--help``."""
    p = argparse.ArgumentParser(prog="python -m tomoscribe.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("tomoscribe/weights"))
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--samples", type=int, default=800, help="training phantoms")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this long (0: no limit)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--lm-start", type=int, default=300,
                   help="step from which the language-model losses are added")
    p.add_argument("--lesion-weight", type=float, default=5.0,
                   help="cross-entropy weight of the lesion class")
    p.add_argument("--lesion-dice", type=float, default=0.0,
                   help="weight of a batch-wide lesion Dice loss")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this model folder's weights (fine-tuning)")
    p.add_argument("--questions", type=int, default=1,
                   help="questions asked per image and step (language stage)")
    p.add_argument("--cache", type=Path, default=None,
                   help="rendered training samples (default: in --checkpoint); "
                   "stages of one recipe share it")
    # architecture: unset means "as in --init" (or the built-in default without one)
    p.add_argument("--slice-tokens", type=int, default=None,
                   help="tokens of the TG-IS slice branch (0: 3D-only model)")
    p.add_argument("--psat-slices", type=int, default=None,
                   help="slices per plane of the PSAT fusion (0: no PSAT)")
    p.add_argument("--lm-lr-scale", type=float, default=1.0,
                   help="language stage: learning-rate factor of the projectors and LM "
                   "(below 1: add a slice branch to a trained LM without retraining it much)")
    p.add_argument("--slice-owned", action=argparse.BooleanOptionalAction, default=None,
                   help="the slice branch reads the area per slice of the lesions each organ "
                   "owns (tomoscribe.model.tgis.owned_lesion_area; default: on for a branch "
                   "this run adds, as --init's otherwise)")
    p.add_argument("--point-weight", type=float, default=1.0,
                   help="weight of the TG-IS pointing loss (language stage)")
    p.add_argument("--encoder", choices=("dcformer", "vit"), default=None,
                   help="3D encoder of a model trained from new weights (default dcformer; "
                   "vit: the ablation's ViT of the same size, see tomoscribe/model/vit3d.py)")
    p.add_argument("--fresh-encoder", action="store_true",
                   help="with --init: start the 3D encoder from new weights and keep the rest "
                   "(the encoder-swap ablation, README; implied when --encoder changes it)")
    p.add_argument("--head-channels", type=int, default=None,
                   help="channels of the full-resolution segmentation head "
                   f"(default {NetConfig.head_channels})")
    p.add_argument("--stage", choices=("joint", "seg", "language", "align"), default="joint",
                   help="joint: everything end to end; seg: the segmentation head alone "
                   "(segmentation loss only), on the frozen encoder of --init, every other "
                   "module kept; language: projectors and LM only, on the frozen encoder of "
                   "--init (fast: features are cached); align: the SigLIP image-report head "
                   "only, on the same cached features")
    p.add_argument("--refine-stats", action=argparse.BooleanOptionalAction, default=None,
                   help="language stage: region tokens read the refiner's lesion statistics "
                   "(--init must have a refiner, see python -m tomoscribe.train_refine)")
    p.add_argument("--refine-stats-mode", choices=STATS_MODES, default=None,
                   help="which lesions those statistics count for an organ: every one within "
                   "two voxels (rim) or the ones the report assigns to it (owned); see "
                   "tomoscribe.model.refine")
    p.add_argument("--align-dim", type=int, default=None,
                   help="width of the SigLIP alignment head (0: none; --stage align)")
    p.add_argument("--lm", type=Path, default=None,
                   help="a local transformers causal LM folder to use in place of the built-in "
                        "GPT-2 (--stage language; see tomoscribe.model.lm)")
    p.add_argument("--version", default=None, help=VERSION_HELP)
    p.add_argument("--domain", choices=sorted(DOMAINS), default=None,
                   help="what the model reads (tomoscribe/domain.py): its phantoms, classes, "
                   "words and intensities (default: --init's, else ct-chest-abdomen)")
    p.add_argument("--freeze-lm", action="store_true",
                   help="with --lm: train the projectors and the LM's input embeddings only")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # a run from --init continues that model: its settings (word ids included),
    # changed only where an architecture option is given
    cfg = (NetConfig.from_dict(json.loads((args.init / "config.json").read_text())["net"])
           if args.init is not None else NetConfig.for_domain(args.domain or CHEST_ABDOMEN_CT))
    if args.domain is not None and args.domain != cfg.domain:
        p.error(f"--domain {args.domain}: --init {args.init} is a {cfg.domain} model")
    fresh_encoder = args.fresh_encoder or (args.init is not None and args.encoder is not None
                                           and args.encoder != cfg.encoder)
    if fresh_encoder and (args.init is None or args.stage != "joint"):
        p.error("a new encoder needs --init and --stage joint (the other stages freeze it)")
    if args.slice_owned is None and args.slice_tokens and not cfg.slice_tokens:
        args.slice_owned = True  # a new branch reads the owned-lesion area
    for name in ("encoder", "head_channels", "slice_tokens", "slice_owned", "psat_slices",
                 "align_dim", "refine_stats", "refine_stats_mode"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
        setattr(args, name, getattr(cfg, name))  # recorded in the history as used
    if args.lm is not None:
        if args.stage != "language":
            p.error("--lm is for --stage language (the vision side comes from --init)")
        # a new language model: its width; the projectors, region tokens and
        # slice branch start from new weights, and the <seg> mask decoder
        # (which reads the old LM's hidden states) is left out
        cfg.lm = str(args.lm.resolve())
        cfg.width, cfg.max_positions = lm_limits(args.lm)
        cfg.seg_token = False
    elif cfg.lm and args.init is not None and not Path(cfg.lm).is_absolute():
        cfg.lm = str((args.init / cfg.lm).resolve())  # continuing a model with a brought LM
    seeds = list(SPLITS["train"][: args.samples])
    cache = args.cache or cache_path(args.checkpoint, args.samples, cfg.model_shape, cfg.domain)
    samples = build_cache(seeds, cfg.model_shape, cache, args.workers, cfg.domain)

    net = ScribeNet(cfg)
    tok: WordTokenizer | LMTokenizer = (net.lm_tokenizer if net.lm_tokenizer is not None
                                        else WordTokenizer(cfg.vocab))
    answer_id = tok.index[ANSWER]
    if args.init is not None:
        init = torch.load(args.init / "model.pt", map_location="cpu", weights_only=True)
        if args.lm is not None:  # only the vision side fits a new LM
            init = {k: v for k, v in init.items() if k.split(".")[0] in VISION_MODULES}
        if fresh_encoder:  # the encoder starts as built; the rest continues --init
            init = {k: v for k, v in init.items() if k.split(".")[0] != "encoder"}
        load_overlapping(net, init)
        print(f"initialised from {args.init}", flush=True)
    if args.stage in ("language", "align"):
        if args.init is None:
            p.error(f"--stage {args.stage} needs --init (the trained encoder)")
        prior = json.loads((args.init / "config.json").read_text())
        if args.stage == "align":
            steps = train_align_stage(net, samples, WordTokenizer(cfg.vocab), args)
            history = [*prior.get("history", []), {"stage": "align", "steps": steps,
                                                   "batch": args.batch, "lr": args.lr,
                                                   "align_dim": args.align_dim}]
            save_model(net, args.out, {**{k: v for k, v in prior.items()
                                          if k not in ("name", "net", "history")},
                                       "version": args.version, "history": history})
            print(f"saved {args.out} after {steps} alignment steps", flush=True)
            return 0
        steps = train_language_stage(net, samples, tok, args)
        history = [*prior.get("history", []), {"stage": "language", "steps": steps,
                                               "batch": args.batch, "lr": args.lr,
                                               "questions": args.questions,
                                               "slice_tokens": args.slice_tokens,
                                               "slice_owned": args.slice_owned,
                                               "psat_slices": args.psat_slices,
                                               "point_weight": args.point_weight,
                                               "refine_stats": args.refine_stats,
                                               "refine_stats_mode": args.refine_stats_mode,
                                               "lm_lr_scale": args.lm_lr_scale,
                                               **({"lm": str(args.lm),
                                                   "freeze_lm": args.freeze_lm}
                                                  if args.lm is not None else {})}]
        save_model(net, args.out, {"version": args.version,
                                   "trained_steps": prior.get("trained_steps"),
                                   "language_steps": steps,
                                   "train_samples": len(samples), "history": history})
        print(f"saved {args.out} after {steps} language steps", flush=True)
        return 0
    seg_only = args.stage == "seg"
    if seg_only:  # the segmentation head alone learns; the encoder runs as at inference
        if args.init is None:
            p.error("--stage seg needs --init (the trained encoder)")
        prior = json.loads((args.init / "config.json").read_text())
        for name, module in net.named_children():
            module.requires_grad_(name == "seg")
    trained = [param for param in net.parameters() if param.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=1e-4)
    step = 0
    spent = 0.0  # training seconds in earlier runs (for --minutes across resumes)
    ckpt = args.checkpoint / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        spent = float(state.get("seconds", 0.0))
        print(f"resumed from {ckpt} at step {step}", flush=True)
    rng = np.random.default_rng(args.seed * 1000 + step)
    weights = torch.ones(cfg.num_classes)
    weights[cfg.lesion_class] = args.lesion_weight
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{n_params / 1e6:.2f} M parameters, {len(samples)} samples", flush=True)

    def joint_meta(steps: int) -> dict[str, object]:
        """``config.json``'s record: a seg run keeps --init's and adds itself to the history."""
        if not seg_only:
            return {"version": args.version, "trained_steps": steps,
                    "train_samples": len(samples)}
        history = [*prior.get("history", []), {"stage": "seg", "steps": steps,
                                               "batch": args.batch, "lr": args.lr,
                                               "lesion_weight": args.lesion_weight,
                                               "lesion_dice": args.lesion_dice}]
        return {**{k: v for k, v in prior.items() if k not in ("name", "net", "history")},
                "version": args.version, "seg_steps": steps, "history": history}

    t0 = time.time() - spent
    net.train()
    if seg_only:  # the frozen encoder's batch norms keep their running statistics
        net.encoder.eval()
    while step < args.steps:
        elapsed = time.time() - t0
        # progress: by steps or by the time budget, whichever is further along;
        # the learning rate warms up for 3% then follows a cosine to zero
        frac = step / args.steps
        if args.minutes:
            frac = max(frac, elapsed / (args.minutes * 60))
        if frac >= 1.0:
            print("budget reached", flush=True)
            break
        lr = warmup_cosine(args.lr, frac)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = rng.integers(len(samples), size=args.batch)
        batch = [samples[int(i)] for i in idx]
        x = torch.from_numpy(np.stack([b["x"] for b in batch])).float()  # type: ignore[misc]
        y = torch.from_numpy(np.stack([b["y"] for b in batch])).long()  # type: ignore[misc]
        if seg_only:
            with torch.no_grad():
                feats = net.encoder(x)
            logits, _dec = net.seg(feats, x)
        else:
            tokens, logits = net.encode(x)
        loss_seg = seg_loss(logits, y, weights, cfg.lesion_class, args.lesion_dice)
        loss = loss_seg
        loss_lm = torch.zeros(())
        if not seg_only and step >= args.lm_start:
            reports, qas = text_batch(batch, tok, rng)
            loss_lm = lm_step_loss(net, tokens, reports, qas, answer_id)
            loss = loss + loss_lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 2.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            el = time.time() - t0
            print(f"step {step} seg {loss_seg.item():.3f} lm {loss_lm.item():.3f} "
                  f"lr {lr:.2e} {el:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            args.checkpoint.mkdir(parents=True, exist_ok=True)
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step,
                        "seconds": time.time() - t0}, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
            save_model(net, args.out, joint_meta(step))
    save_model(net, args.out, joint_meta(step))
    print(f"saved {args.out} at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
