"""The TG-IS slice branch: shapes, scoring, training signal and key-slice mapping."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.preprocess import GridMap
from tomoscribe.model.scribe import Scribe, relevant_source_slices, source_slice_relevance
from tomoscribe.model.text import REPORT, WordTokenizer
from tomoscribe.model.tgis import SliceBranch, SliceEncoder2D, owned_lesion_area
from tomoscribe.phantom import make_phantom, render_acquisition
from tomoscribe.train import (
    lm_step_loss,
    pad_rows,
    pointing_loss,
    relevance_target,
    save_model,
    slice_targets,
)
from tomoscribe.volume import SliceRef, Volume

SMALL = NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16), slice_tokens=2)


def test_slice_encoder_reads_each_slice_on_its_own() -> None:
    torch.manual_seed(0)
    enc = SliceEncoder2D(2).eval()
    x = torch.rand(2, 2, 5, 32, 32)
    out = enc(x)
    assert out.shape == (2, 5, 64)
    y = x.clone()
    y[:, :, 3] = torch.rand(2, 2, 32, 32)  # change slice 3 only
    with torch.no_grad():
        diff = (enc(y) - enc(x)).abs().sum(dim=(0, 2))
    assert diff[3] > 0 and torch.all(diff[[0, 1, 2, 4]] == 0)


def test_branch_shapes_and_relevance_is_a_distribution() -> None:
    torch.manual_seed(0)
    branch = SliceBranch(2, band_channels=8, num_classes=9, depth=16, width=32, tokens=3)
    band = torch.rand(2, 8, 4)
    mass = torch.rand(2, 9, 16)
    keys = branch.slice_keys(torch.rand(2, 2, 16, 32, 32), band, mass)
    assert keys.shape == (2, 16, 32)
    tokens, rel = branch.select(keys, torch.rand(2, 32))
    assert tokens.shape == (2, 3, 32)
    assert rel.shape == (2, 16)
    assert torch.allclose(rel.sum(dim=1), torch.ones(2))


def test_different_instructions_look_at_different_slices() -> None:
    torch.manual_seed(0)
    net = ScribeNet(SMALL).eval()
    x = torch.rand(1, 2, *SMALL.model_shape)
    tok = WordTokenizer()
    with torch.no_grad():
        _pooled, _logits, (band, mass) = net.encode_full(x)
        assert net.slices is not None
        keys = net.slices.slice_keys(x, band, mass)
        _t1, r1 = net.slice_tokens_for(keys, torch.tensor([tok.encode("is the liver normal ?")]))
        _t2, r2 = net.slice_tokens_for(keys, torch.tensor([tok.encode("is the spleen normal ?")]))
    assert not torch.allclose(r1, r2)
    assert net.num_image_tokens == 24 + len(SMALL.organ_classes) + 2


def test_slice_targets_and_relevance_target() -> None:
    y = np.zeros((6, 8, 8), np.uint8)
    y[1:4, 2:6, 2:6] = 4  # liver (class 4) on slices 1-3
    y[2, 3:5, 3:5] = 8  # a lesion inside it on slice 2
    y[5, 0:2, 0:2] = 5  # spleen on slice 5
    t = slice_targets(y)
    assert t.shape == (2, 8, 6)
    assert list(t[0, 4]) == [0, 16, 12, 16, 0, 0]
    assert list(t[1, 4]) == [0, 0, 4, 0, 0, 0] and list(t[1, 0]) == list(t[1, 4])
    lung = relevance_target(t, "is the {organ} normal ?", "left lung", [("left lung", "nodule")])
    assert lung is None  # no left lung voxels: nothing to point at
    les = relevance_target(t, "is the {organ} normal ?", "liver", [("liver", "x")])
    assert les is not None and les.argmax() == 2 and abs(les.sum() - 1) < 1e-6
    organ = relevance_target(t, "is the {organ} normal ?", "spleen", [("liver", "x")])
    assert organ is not None and organ.argmax() == 5
    assert relevance_target(t, None, None, [("liver", "x")]).argmax() == 2  # type: ignore[union-attr]
    empty = np.zeros_like(t)
    assert relevance_target(empty, None, None, []) is None


def test_pointing_loss_prefers_the_target_slice() -> None:
    target = np.array([0.0, 1.0, 0.0], np.float32)
    good = torch.tensor([[0.1, 0.8, 0.1]])
    bad = torch.tensor([[0.8, 0.1, 0.1]])
    assert pointing_loss(good, [target]) < pointing_loss(bad, [target])
    assert float(pointing_loss(good, [None])) == 0.0


def test_language_step_with_slice_branch_learns_to_point() -> None:
    """A few steps of the stage-2 loss (LM + pointing) move the relevance to the target."""
    torch.manual_seed(0)
    net = ScribeNet(SMALL)
    assert net.slices is not None
    tok = WordTokenizer()
    x = torch.rand(2, 2, *SMALL.model_shape)
    with torch.no_grad():
        pooled, _logits, (band, mass) = net.encode_full(x)
    reports = pad_rows([tok.encode("<report> no focal abnormality .") + [tok.eos_id]] * 2)
    qas = pad_rows([tok.encode("<question> is the liver normal ? <answer> yes") + [tok.eos_id]] * 2)
    q_ids = pad_rows([tok.encode("is the liver normal ?")] * 2)
    want = np.zeros(SMALL.model_shape[0], np.float32)
    want[11] = 1.0
    trainable = [*net.slices.parameters(), *net.lm.parameters(), *net.projector.parameters()]
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    rel_at = []
    for _ in range(15):
        keys = net.slices.slice_keys(x, band, mass)
        tokens = net.tokens_from_pooled(pooled)
        rep_tok, _ = net.slice_tokens_for(keys, torch.full((2, 1), tok.index[REPORT]))
        qa_tok, rel = net.slice_tokens_for(keys, q_ids)
        loss = lm_step_loss(net, torch.cat([tokens, rep_tok], 1), reports, qas,
                            tok.index["<answer>"], torch.cat([tokens, qa_tok], 1))
        loss = loss + pointing_loss(rel, [want, want])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rel_at.append(float(rel[0, 11].detach()))
    assert rel_at[-1] > 3 * rel_at[0]


def _grid(flip: bool, perm: tuple[int, int, int] = (0, 1, 2)) -> GridMap:
    # 10 source slices, cropped to 2..8 and resampled to 3 model slices
    return GridMap(perm, (flip, False, False), (2, 0, 0), (8, 4, 4), (3, 4, 4), (10, 4, 4))


def test_relevance_maps_back_to_source_slices() -> None:
    rel = np.array([0.1, 0.7, 0.2], np.float32)
    src = source_slice_relevance(rel, _grid(False))
    assert src is not None
    assert list(np.round(src, 2)) == [0, 0, 0.1, 0.1, 0.7, 0.7, 0.2, 0.2, 0, 0]
    assert relevant_source_slices(rel, _grid(False)) == [5, 7, 3]  # centres of 4-5, 6-7, 2-3
    flipped = source_slice_relevance(rel, _grid(True))
    assert flipped is not None and list(flipped) == list(src[::-1])
    assert relevant_source_slices(rel, _grid(True)) == [4, 2, 6]
    # a sagittal source: model slices are no source slices
    assert source_slice_relevance(rel, _grid(False, (2, 1, 0))) is None
    assert relevant_source_slices(rel, _grid(False, (2, 1, 0))) == []


def test_scribe_answers_carry_tgis_key_slices(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_model(ScribeNet(SMALL), tmp_path, {"version": "9.9"})
    scribe = Scribe.load(tmp_path)
    ph = make_phantom(1, lesion_probability=1.0, shape=(24, 48, 48))
    hu, _labels, aff = render_acquisition(ph)
    vol = Volume(hu, aff, [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2")
                           for k in range(24)])
    enc = scribe.encode(vol)
    assert enc.extra["slice_keys"].shape == (1, SMALL.model_shape[0], SMALL.width)
    report = scribe.generate(enc, ["is the liver normal ?", "is the spleen normal ?"])
    for ans in report.answers:
        assert 1 <= len(ans.key_slices) <= 3 and all(0 <= k < 24 for k in ans.key_slices)
    assert abs(float(report.slice_scores.sum()) - 1.0) < 1e-4
    blind = scribe.generate(enc, ["is the liver normal ?"], blind=True)
    assert blind.answers[0].key_slices  # the blind branch still points (at fixed slices)


def test_key_images_rank_by_relevance_within_the_segmented_structure() -> None:
    from tomoscribe.report import Finding

    scribe = Scribe(ScribeNet(SMALL), "t", "0", Path("."))
    grid = GridMap((0, 1, 2), (False, False, False), (0, 0, 0), (6, 4, 4), (6, 4, 4),
                   (6, 4, 4))
    label_map = np.zeros((6, 4, 4), np.uint8)
    label_map[1:4] = 4  # liver on slices 1-3
    label_map[3, 0, 0] = 10  # the liver finding's lesion segment, on slice 3 only
    relevance = np.array([0.5, 0.1, 0.3, 0.05, 0.05, 0.0], np.float32)
    liver_finding = Finding("Liver: one lesion.", "liver", [3], segment=10)
    # no finding: the most relevant liver slices, not slice 0 (no liver there)
    assert scribe.key_slices_for("is the liver normal ?", [], label_map, relevance,
                                 grid) == (2, 1, 3)
    # a finding with a segment: only its slices compete
    assert scribe.key_slices_for("is the liver normal ?", [liver_finding], label_map,
                                 relevance, grid) == (3,)
    # nothing segmented (spleen): the branch's own ranking
    assert scribe.key_slices_for("is the spleen normal ?", [], label_map, relevance,
                                 grid) == (0, 2, 1)
    # a 3D-only model: where the structure's segment is largest
    assert scribe.key_slices_for("is the liver normal ?", [], label_map, None, grid)[0] in (1, 2)
    assert scribe.key_slices_for("is the spleen normal ?", [], label_map, None, grid) == ()


def test_owned_lesion_area_gives_each_lesion_to_the_organ_around_it() -> None:
    y = np.ones((8, 12, 12), np.int64)  # body
    y[1:5, 2:10, 2:10] = 4  # liver
    y[2:4, 4:6, 4:6] = 8  # a liver lesion on slices 2-3 (8 voxels)
    y[6:8, 2:10, 2:10] = 2  # a lung
    y[6, 5:7, 5:7] = 8  # a nodule on slice 6 (4 voxels)
    y[0, 0, 0] = 8  # one voxel in the body: noise, and the body owns nothing
    logits = torch.nn.functional.one_hot(torch.from_numpy(y), 9).permute(3, 0, 1, 2)[None] * 5.0
    area = owned_lesion_area(logits, 8, tuple(range(1, 8)))
    assert area.shape == (1, 9, 8)
    assert area[0, 4].tolist() == [0, 0, 4, 4, 0, 0, 0, 0]
    assert area[0, 2].tolist() == [0, 0, 0, 0, 0, 0, 4, 0]
    assert torch.equal(area[0, 0], area[0, 2] + area[0, 4])
    assert area[0, [1, 3, 5, 6, 7, 8]].sum() == 0
    assert owned_lesion_area(torch.zeros(2, 9, 3, 4, 4), 8, tuple(range(1, 8))).sum() == 0


def test_an_owned_branch_reads_the_owned_area_under_the_class_mass() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 2, *SMALL.model_shape)
    plain = ScribeNet(SMALL).eval()
    owned = ScribeNet(replace(SMALL, slice_owned=True)).eval()
    with torch.no_grad():
        _p, _logits, (_b, mass) = plain.encode_full(x)
        _p2, _l2, (band2, mass2) = owned.encode_full(x)
        assert mass.shape == (2, 9, SMALL.model_shape[0])
        assert mass2.shape == (2, 18, SMALL.model_shape[0])
        assert owned.slices is not None
        keys = owned.slices.keys_from(owned.slices.encoder2d(x), band2, mass2)
    assert keys.shape == (2, SMALL.model_shape[0], SMALL.width)
    # a config written before the option loads as it was: the class mass only
    assert not NetConfig.from_dict({k: v for k, v in SMALL.to_dict().items()
                                    if k != "slice_owned"}).slice_owned


def test_a_new_branch_trains_with_the_owned_area_and_the_seg_stage_keeps_it(
        tmp_path: Path) -> None:
    """language stage adds TG-IS + PSAT (owned area on); the <seg> stage trains on the same
    prefix as inference (3D tokens, PSAT-fused, then each question's slice tokens) and leaves
    the slice branch and PSAT as they were."""
    from tomoscribe.train import main as train_main
    from tomoscribe.train_segtoken import main as seg_main

    torch.manual_seed(0)
    base = replace(SMALL, slice_tokens=0)
    save_model(ScribeNet(base), tmp_path / "base", {"version": "0.0.1"})
    common = ["--samples", "2", "--workers", "1", "--checkpoint", str(tmp_path / "ck")]
    assert train_main(["--stage", "language", "--init", str(tmp_path / "base"), "--out",
                       str(tmp_path / "lang"), "--steps", "2", "--batch", "2",
                       "--slice-tokens", "2", "--psat-slices", "4", *common]) == 0
    conf = json.loads((tmp_path / "lang" / "config.json").read_text())
    assert conf["net"]["slice_owned"] and conf["net"]["slice_tokens"] == 2
    assert conf["history"][-1]["slice_owned"] is True
    assert seg_main(["--init", str(tmp_path / "lang"), "--out", str(tmp_path / "seg"),
                     "--steps", "2", "--batch", "2", "--refer", "2", *common]) == 0
    before = torch.load(tmp_path / "lang" / "model.pt", weights_only=True)
    after = torch.load(tmp_path / "seg" / "model.pt", weights_only=True)
    kept = [k for k in before if k.startswith(("slices.", "psat."))]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("lm."))
    scribe = Scribe.load(tmp_path / "seg")
    assert scribe.net.segtoken is not None and scribe.net.slices is not None
    ph = make_phantom(1, lesion_probability=1.0, shape=(24, 48, 48))
    hu, _labels, aff = render_acquisition(ph)
    vol = Volume(hu, aff, [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2")
                           for k in range(24)])
    report = scribe.generate(scribe.encode(vol), ["segment the liver ."])
    assert len(report.answers) == 1
