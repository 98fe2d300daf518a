"""Teach a model referring segmentation: ``python -m tomoscribe.train_segtoken --init MODEL``.

Adds the ``<seg>`` token and its mask decoder (:mod:`tomoscribe.model.segtoken`)
to the model of ``--init``. The vocabulary grows by the words appended since
that model (:data:`~tomoscribe.model.text.ADDED_WORDS`): the other word ids
stay, their embeddings are kept, the new ones start as built.

Each step is a language-stage step (reports and one templated question per
sample, on the frozen vision side's cached features, as
``python -m tomoscribe.train --stage language``, so the model keeps what it
knew) plus ``--refer`` referring questions
(:data:`~tomoscribe.model.text.REFER_TEMPLATES`): the answer (``<seg> .`` or
``none .``) is scored like any answer, and where it is ``<seg>`` the mask
decoder, prompted by the language model's hidden state at that token, is
scored against the mask on the model grid (binary cross-entropy + soft
Dice). The mask decoder reads the frozen segmentation's features, which are
too large to cache (25 x 48 x 96 x 96 per sample), so the encoder runs for
those samples in each step: most of a step's time.

The phantoms and the structures asked about are those of the model's domain
(``net.domain``: chest-abdomen CT or head MR).

Trained: projectors, region tokens, language model and mask decoder; the
encoder, segmentation head and refiner stay as they are. A model with a
brought language model (:mod:`tomoscribe.model.lm`) keeps its own tokenizer,
in which ``<seg>`` is already a special token. Three of four
referring questions are drawn with a ``<seg>`` answer (a mask to learn from).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tomoscribe.domain import CHEST_ABDOMEN_CT, Domain
from tomoscribe.model.lm import LMTokenizer
from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.segtoken import SEG, mask_loss, refer_target
from tomoscribe.model.text import (
    ANSWER,
    QUESTION,
    REFER_TEMPLATES,
    WordTokenizer,
    refer_answer,
    vocabulary,
)
from tomoscribe.phantom import SPLITS
from tomoscribe.train import (
    VERSION_HELP,
    build_cache,
    cache_path,
    load_overlapping,
    pad_rows,
    qa_loss_mask,
    save_model,
    stage_features,
    text_step,
    warmup_cosine,
)


def refer_organs(domain: Domain = CHEST_ABDOMEN_CT) -> tuple[str, ...]:
    """The structures a referring question names: all but the first (the body, the head)."""
    return domain.structures[1:]


def draw_refer(sample: dict[str, object], organ_labels: dict[str, int],
               rng: np.random.Generator, positive: float = 0.75
               ) -> tuple[str, str | None, str, str]:
    """A referring question about a sample: ``(template, organ or None, question, answer)``.

    With probability ``positive`` the question is one whose answer is
    ``<seg>`` (an organ present, an organ with lesions, or any lesion). The
    structures named are the keys of ``organ_labels`` (the model's domain).
    """
    names = tuple(organ_labels)
    lesions = sample["lesions"]
    y = sample["y"]
    assert isinstance(lesions, list) and isinstance(y, np.ndarray)
    counts = Counter(o for o, _k in lesions)
    present = {o for o in names if bool((y == organ_labels[o]).any())}
    want_seg = rng.random() < positive
    for _ in range(20):
        template = REFER_TEMPLATES[int(rng.integers(len(REFER_TEMPLATES)))]
        organ = str(rng.choice(names)) if "{organ}" in template else None
        if organ is not None and template.startswith("segment the lesions") and counts \
                and want_seg:
            organ = str(rng.choice(sorted(counts)))
        answer = refer_answer(template, organ or "", counts, organ in present)
        q = template.format(organ=organ) if organ else template
        if (answer.startswith(SEG)) == want_seg:
            break
    return template, organ, q, answer


def refer_step_loss(net: ScribeNet, tok: WordTokenizer | LMTokenizer, tokens: torch.Tensor,
                    chosen: list[dict[str, object]], rng: np.random.Generator,
                    keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer loss and mask loss of one referring question per sample of ``chosen``.

    ``tokens`` ``(R, T, width)`` is their 3D image prefix, ``keys`` ``(R, D,
    width)`` their TG-IS slice keys when the model has a slice branch (each
    question's slice tokens then follow the 3D tokens, as at inference).
    Returns ``(answer loss, mask loss)`` (the mask loss is 0 when no answer is
    ``<seg>``).
    """
    assert net.segtoken is not None
    cfg = net.cfg
    # structure i + 1 of the domain is class organ_classes[i + 1] (0 is the body)
    organ_labels = {o: cfg.organ_classes[i + 1]
                    for i, o in enumerate(refer_organs(cfg.the_domain))}
    seg_id = tok.index[SEG]
    drawn = [draw_refer(s, organ_labels, rng) for s in chosen]
    if keys is not None:
        slice_tokens, _rel = net.slice_tokens_for(keys, pad_rows([tok.encode(q)
                                                                  for _t, _o, q, _a in drawn]))
        tokens = torch.cat([tokens, slice_tokens], dim=1)
    ids = pad_rows([tok.encode(f"{QUESTION} {q} {ANSWER} {a}") + [tok.eos_id]
                    for _t, _o, q, a in drawn])
    emb = torch.cat([tokens, net.embed_text(ids)], dim=1)
    out = net.lm(inputs_embeds=emb, output_hidden_states=True)
    t = tokens.shape[1]
    pred = out.logits[:, t - 1 : -1]
    target = qa_loss_mask(ids, tok.index[ANSWER])
    answer = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                             ignore_index=0)
    rows = [i for i, (_t, _o, _q, a) in enumerate(drawn) if a.startswith(SEG)]
    if not rows:
        return answer, answer.new_zeros(())
    hidden = out.hidden_states[-1][:, t:]
    pos = [int((ids[i] == seg_id).nonzero()[0]) for i in rows]
    h = torch.stack([hidden[i, p] for i, p in zip(rows, pos, strict=True)])
    x = torch.from_numpy(np.stack([chosen[i]["x"] for i in rows])).float()  # type: ignore[misc]
    with torch.no_grad():
        logits, dec = net.seg(net.encoder(x), x)
        feats = net.segtoken.voxel_features(dec, logits)
    masks = []
    for i in rows:
        tmpl, organ, _q, _a = drawn[i]
        y = chosen[i]["y"]
        assert isinstance(y, np.ndarray)
        masks.append(refer_target(y, tmpl, organ_labels[organ] if organ else None,
                                  cfg.lesion_class, cfg.organ_classes))
    goal = torch.from_numpy(np.stack(masks)).float()
    return answer, mask_loss(net.segtoken(h, feats), goal)


def main(argv: list[str] | None = None) -> int:
    """Train the ``<seg>`` token and its decoder; see ``--help``."""
    p = argparse.ArgumentParser(prog="python -m tomoscribe.train_segtoken", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, required=True, help="the trained model (folder)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--version", default=None, help=VERSION_HELP)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/segtoken"),
                   help="where the cached vision features (and refined statistics) live")
    p.add_argument("--cache", type=Path, default=None, help="rendered training samples")
    p.add_argument("--samples", type=int, default=1200)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32, help="samples per step (language part)")
    p.add_argument("--refer", type=int, default=4,
                   help="referring questions per step (each runs the encoder once)")
    p.add_argument("--mask-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prior = json.loads((args.init / "config.json").read_text())
    cfg = NetConfig.from_dict(prior["net"])
    if cfg.lm:  # a brought language model: its tokenizer already has <seg>
        if not Path(cfg.lm).is_absolute():
            cfg.lm = str((args.init / cfg.lm).resolve())
    elif (vocab := vocabulary(cfg.the_domain))[: len(cfg.vocab)] != cfg.vocab:
        print(f"error: the vocabulary of {args.init} is not a prefix of this version's; "
              "word ids would change", flush=True)
        return 1
    else:
        cfg.vocab = vocab
    cfg.seg_token = True
    seeds = list(SPLITS["train"][: args.samples])
    cache = args.cache or cache_path(args.checkpoint, args.samples, cfg.model_shape, cfg.domain)
    samples = build_cache(seeds, cfg.model_shape, cache, args.workers, cfg.the_domain)
    net = ScribeNet(cfg)
    tok: WordTokenizer | LMTokenizer = (net.lm_tokenizer if net.lm_tokenizer is not None
                                        else WordTokenizer(cfg.vocab))
    load_overlapping(net, torch.load(args.init / "model.pt", map_location="cpu",
                                     weights_only=True))
    args.refine_stats = cfg.refine_stats  # stage_features reads it from the network
    feats = stage_features(net, samples, args)
    assert net.segtoken is not None
    # the slice branch and PSAT keep what the language stage taught them
    for module in (net.encoder, net.seg, net.refine, net.align, net.slices, net.psat):
        if module is not None:
            for param in module.parameters():
                param.requires_grad_(False)
    text_params = [q for m in (net.projector, net.regions, net.lm) for q in m.parameters()]
    opt = torch.optim.AdamW([{"params": text_params, "scale": 1.0},
                             {"params": list(net.segtoken.parameters()), "scale": 2.0}],
                            lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    net.train()
    for module in (net.encoder, net.seg):
        module.eval()
    t0 = time.time()
    step = 0
    for step in range(1, args.steps + 1):
        lr = warmup_cosine(args.lr, step / args.steps)
        for group in opt.param_groups:
            group["lr"] = lr * float(group["scale"])
        idx = rng.integers(len(samples), size=args.batch)
        chosen = [samples[int(i)] for i in idx]
        batch = text_step(net, feats, samples, idx, tok, rng)
        lang = batch.loss
        n = min(args.refer, len(chosen))
        refer, mask = refer_step_loss(net, tok, batch.tokens[:n], chosen[:n], rng,
                                      None if batch.keys is None else batch.keys[:n])
        loss = lang + refer + args.mask_weight * mask
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(text_params + list(net.segtoken.parameters()), 2.0)
        opt.step()
        if step % 25 == 0:
            print(f"segtoken step {step} language {lang.item():.3f} refer {refer.item():.3f} "
                  f"mask {mask.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    net.eval()
    history = [*prior.get("history", []),
               {"stage": "segtoken", "steps": step, "batch": args.batch, "refer": args.refer,
                "lr": args.lr, "mask_weight": args.mask_weight}]
    meta = {k: v for k, v in prior.items() if k not in ("name", "net", "history", "version")}
    save_model(net, args.out, {**meta, "version": args.version, "history": history})
    print(f"saved {args.out} after {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
