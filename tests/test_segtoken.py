"""The <seg> token and its mask decoder: shapes, targets, the training stage, inference."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tomoscribe.model.scribe import DEFAULT_MODEL_DIR, Scribe
from tomoscribe.model.segtoken import (
    SEG,
    SegTokenDecoder,
    lesion_component_index,
    lesion_owners,
    mask_loss,
    refer_target,
    snap_to_segmentation,
)
from tomoscribe.model.text import (
    ADDED_WORDS,
    REFER_TEMPLATES,
    VOCAB,
    is_referring,
    refer_answer,
)
from tomoscribe.phantom import LESION_LABEL, ORGAN_LABELS, make_phantom, render_acquisition
from tomoscribe.train_segtoken import main
from tomoscribe.volume import SliceRef, Volume

ORGAN_CLASSES = tuple(ORGAN_LABELS.values())


def test_decoder_shapes_and_features_carry_no_gradient() -> None:
    dec = SegTokenDecoder(width=32, feat_channels=6, num_classes=9)
    half = torch.randn(2, 6, 4, 8, 8, requires_grad=True)
    logits = torch.randn(2, 9, 8, 16, 16, requires_grad=True)
    feats = dec.voxel_features(half, logits)
    assert feats.shape == (2, 15, 8, 16, 16) and not feats.requires_grad
    assert feats[:, 6:].min() >= -8.0  # clamped log probabilities
    out = dec(torch.randn(2, 32), feats)
    assert out.shape == (2, 8, 16, 16)


def test_decoder_learns_to_pick_the_structure_the_prompt_names() -> None:
    torch.manual_seed(0)
    dec = SegTokenDecoder(width=8, feat_channels=2, num_classes=3, hidden=16)
    labels = torch.randint(0, 3, (4, 6, 6, 6))
    logits = torch.nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float() * 6
    feats = dec.voxel_features(torch.randn(4, 2, 3, 3, 3), logits)
    prompts = torch.eye(8)[[1, 2, 1, 2]]  # two "words", one per class asked for
    goal = torch.stack([labels[i] == c for i, c in enumerate([1, 2, 1, 2])]).float()
    opt = torch.optim.Adam(dec.parameters(), lr=0.05)
    first = float(mask_loss(dec(prompts, feats), goal).detach())
    for _ in range(150):
        loss = mask_loss(dec(prompts, feats), goal)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    pred = dec(prompts, feats) > 0
    assert (pred == goal.bool()).float().mean() > 0.98


def test_referring_targets_follow_the_phantom_lesions() -> None:
    ph = make_phantom(11, lesion_probability=1.0)
    _hu, labels, _aff = render_acquisition(ph)
    _comps, owners = lesion_owners(labels, LESION_LABEL, [c for c in ORGAN_CLASSES if c != 1])
    names = {v: k for k, v in ORGAN_LABELS.items()}
    assert sorted(names[o] for o in owners.values()) == sorted(les.organ for les in ph.lesions)
    every = refer_target(labels, "segment the lesions .", None, LESION_LABEL, ORGAN_CLASSES)
    assert np.array_equal(every, labels == LESION_LABEL)
    for les in ph.lesions:
        organ = ORGAN_LABELS[les.organ]
        mine = refer_target(labels, "segment the lesions in the {organ} .", organ, LESION_LABEL,
                            ORGAN_CLASSES)
        whole = refer_target(labels, "segment the {organ} .", organ, LESION_LABEL,
                             ORGAN_CLASSES)
        assert mine.any() and (labels[mine] == LESION_LABEL).all()
        assert np.array_equal(whole, (labels == organ) | mine)  # the organ with its lesions
    counts = Counter(les.organ for les in ph.lesions)
    free = next(o for o in ("spleen", "left kidney", "right kidney", "liver") if o not in counts)
    assert not refer_target(labels, "segment the lesions in the {organ} .", ORGAN_LABELS[free],
                            LESION_LABEL, ORGAN_CLASSES).any()


def test_snap_keeps_the_regions_a_coarse_mask_mostly_covers() -> None:
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:10, 2:18, 2:18] = 3  # an organ
    labels[12:18, 2:18, 2:18] = 5  # another
    labels[4:6, 4:6, 4:6] = 8  # a lesion in the first
    labels[14:16, 4:6, 4:6] = 8  # and one in the second
    coarse = np.zeros(labels.shape, dtype=bool)
    coarse[1:9, 1:19, 1:19] = True  # the first organ, blurred and a slice short
    coarse[14:16, 4:5, 4:6] = True  # half of the second lesion
    snapped = snap_to_segmentation(coarse, labels, [3, 5], 8)
    want = (labels == 3)
    want[4:6, 4:6, 4:6] = True
    want[14:16, 4:6, 4:6] = True
    assert np.array_equal(snapped, want)
    assert not snap_to_segmentation(np.zeros_like(coarse), labels, [3, 5], 8).any()
    # a lesion the coarse mask only touches is kept (one voxel of eight); an organ is not
    touch = np.zeros(labels.shape, dtype=bool)
    touch[14, 4, 4] = True
    touch[12:14, 2:18, 2:18] = True  # a third of the second organ
    want = np.zeros(labels.shape, dtype=bool)
    want[14:16, 4:6, 4:6] = True
    assert np.array_equal(snap_to_segmentation(touch, labels, [3, 5], 8), want)
    assert not snap_to_segmentation(touch, labels, [3, 5], 8, lesion_share=0.5).any()
    # an index computed once per volume gives the same answers
    index = lesion_component_index(labels, 8)
    assert np.array_equal(snap_to_segmentation(touch, labels, [3, 5], 8, components=index), want)
    assert np.array_equal(snap_to_segmentation(coarse, labels, [3, 5], 8, components=index),
                          snap_to_segmentation(coarse, labels, [3, 5], 8))
    assert int(index.sizes[8]) == int((labels == 8).sum()) and len(index.objects) == 2


def test_referring_answers_and_vocabulary() -> None:
    counts = Counter({"liver": 2})
    assert refer_answer(REFER_TEMPLATES[1], "liver", counts) == f"{SEG} ."
    assert refer_answer(REFER_TEMPLATES[1], "spleen", counts) == "none ."
    assert refer_answer(REFER_TEMPLATES[2], "", Counter()) == "none ."
    assert refer_answer(REFER_TEMPLATES[0], "spleen", Counter()) == f"{SEG} ."
    assert refer_answer(REFER_TEMPLATES[0], "spleen", Counter(), organ_present=False) == "none ."
    assert is_referring(" Segment the liver .") and not is_referring("is the liver normal ?")
    # words added since a shipped model go last: the older ids stay
    assert VOCAB[-len(ADDED_WORDS):] == ADDED_WORDS


def _volume(seed: int) -> Volume:
    hu, _labels, aff = render_acquisition(make_phantom(seed, lesion_probability=1.0))
    return Volume(hu, aff, [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2")
                            for k in range(hu.shape[0])])


def test_segtoken_stage_trains_and_a_seg_answer_gives_a_source_grid_mask(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "seg"
    assert main(["--init", str(DEFAULT_MODEL_DIR), "--out", str(out), "--checkpoint",
                 str(tmp_path / "ck"), "--samples", "3", "--steps", "2", "--batch", "2",
                 "--refer", "2", "--workers", "1"]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["net"]["seg_token"] and conf["history"][-1]["stage"] == "segtoken"
    assert tuple(conf["net"]["vocab"]) == VOCAB
    before = torch.load(DEFAULT_MODEL_DIR / "model.pt", weights_only=True)
    after = torch.load(out / "model.pt", weights_only=True)
    frozen = ("encoder.", "seg.", "refine.", "align.")
    # (the alignment head's word table grows by the added words' rows, the rest stays)
    for k in (k for k in before if k.startswith(frozen)):
        kept = after[k] if after[k].shape == before[k].shape else after[k][: len(before[k])]
        assert torch.equal(before[k], kept), k
    wte = "lm.transformer.wte.weight"
    old = before[wte].shape[0]
    if old < len(VOCAB):  # a model from before the added words: their rows are new
        assert after[wte].shape[0] == len(VOCAB)

    scribe = Scribe.load(out)
    assert scribe.net.segtoken is not None
    vol = _volume(4)
    enc = scribe.encode(vol)
    seg_id = scribe.tok.index[SEG]
    # whatever two steps taught it, force the answer "<seg> ." to test the mask path
    monkeypatch.setattr(scribe.net, "generate",
                        lambda *a, **k: [seg_id, scribe.tok.index["."], scribe.tok.eos_id])
    # and a decoder that marks everything: the answer keeps what the question names
    decoder = scribe.net.segtoken
    monkeypatch.setattr(decoder, "forward",
                        lambda h, f: torch.full((1, *f.shape[2:]), 5.0))
    report = scribe.generate(enc, ["segment the liver .", "is there a lesion in the liver ?"])
    liver, plain = report.answers
    assert liver.mask is not None and liver.mask.shape == vol.shape
    assert liver.mask.dtype == np.bool_
    assert liver.answer.startswith("Segmented")
    refined = enc.extra["refined"]
    assert liver.mask[refined == 4].all()  # the whole liver (class 4)
    assert not liver.mask[(refined != 4) & (refined != 8)].any()  # nothing but it and lesions
    assert plain.mask is None and SEG not in plain.answer  # not a referring question
    assert "snap_components" in enc.extra  # labelled once for every later question


def test_a_head_model_learns_to_refer_to_head_structures(tmp_path: Path) -> None:
    """The <seg> stage reads the model's domain: head phantoms, head structures, head words."""
    from tomoscribe.domain import HEAD_MR
    from tomoscribe.model.network import NetConfig, ScribeNet
    from tomoscribe.model.text import vocabulary
    from tomoscribe.train import save_model
    from tomoscribe.train_segtoken import draw_refer, refer_organs

    assert refer_organs(HEAD_MR) == HEAD_MR.structures[1:]
    labels = {o: i + 2 for i, o in enumerate(refer_organs(HEAD_MR))}
    sample = {"y": np.full((4, 4, 4), 2, dtype=np.uint8), "lesions": [("cerebellum", "cyst")]}
    rng = np.random.default_rng(0)
    named = {draw_refer(sample, labels, rng)[1] for _ in range(60)}
    assert named - {None} and named - {None} <= set(HEAD_MR.structures[1:])

    cfg = NetConfig.for_domain(HEAD_MR)
    cfg.model_shape, cfg.channels = (16, 32, 32), (8, 8, 16, 16)
    torch.manual_seed(0)
    save_model(ScribeNet(cfg), tmp_path / "head", {"version": "0.0.1-head"})
    out = tmp_path / "seg"
    assert main(["--init", str(tmp_path / "head"), "--out", str(out), "--checkpoint",
                 str(tmp_path / "ck"), "--samples", "2", "--steps", "2", "--batch", "2",
                 "--refer", "1", "--workers", "1"]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["net"]["seg_token"] and conf["net"]["domain"] == "mr-head"
    assert tuple(conf["net"]["vocab"]) == vocabulary(HEAD_MR)
    assert (tmp_path / "ck" / "cache-mr-head-2-16x32x32.pt").is_file()
