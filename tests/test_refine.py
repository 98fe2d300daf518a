"""The organ-box refiner: shapes, geometry, merging, and a training run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.preprocess import GridMap, prepare
from tomoscribe.model.refine import (
    LESION,
    MIN_LESION_ML,
    ORGAN,
    OTHER,
    OrganRefiner,
    box_input,
    box_labels,
    box_shape,
    canonical_spacing,
    coarse_in_box,
    drop_weak_lesions,
    from_canonical,
    organ_box,
    owned_lesion_stats,
    refine,
    to_canonical,
)
from tomoscribe.model.scribe import DEFAULT_MODEL_DIR, Scribe, _lesion_components
from tomoscribe.phantom import make_phantom, render_acquisition
from tomoscribe.train import local_version, render_study, save_model
from tomoscribe.train import main as train_main
from tomoscribe.train_refine import box_target, boxes_of, main, patch
from tomoscribe.volume import SliceRef, Volume

SMALL = NetConfig(model_shape=(16, 32, 32), channels=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                  width=32, lm_layers=1, lm_heads=2, max_positions=96)


@pytest.mark.parametrize("shape", [(13, 22, 9), (16, 16, 16), (5, 7, 31)])
def test_refiner_keeps_any_box_shape(shape: tuple[int, int, int]) -> None:
    net = OrganRefiner((4, 8, 12)).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 4, *shape))
    assert out.shape == (2, 3, *shape)


def test_refiner_output_does_not_depend_on_train_or_eval_mode() -> None:
    # no running statistics: patches in training, whole boxes at inference
    torch.manual_seed(0)
    net = OrganRefiner((4, 8, 12))
    x = torch.rand(1, 4, 12, 16, 16)
    with torch.no_grad():
        a = net.train()(x)
        b = net.eval()(x)
    assert torch.allclose(a, b, atol=1e-6)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_canonical_round_trip(perm: tuple[int, int, int]) -> None:
    grid = GridMap(perm=perm, flip=(True, False, True), start=(0, 0, 0), stop=(4, 5, 6),
                   model_shape=(2, 2, 2), source_shape=(4, 5, 6))
    a = np.arange(120).reshape(4, 5, 6)
    canon = to_canonical(a, grid)
    assert canon.shape == tuple(a.shape[p] for p in perm)
    assert np.array_equal(from_canonical(canon, grid), a)


def test_organ_box_grows_by_the_margin_in_millimetres() -> None:
    mask = np.zeros((20, 30, 30), dtype=bool)
    mask[8:10, 10:20, 12:15] = True
    assert organ_box(mask, (5.0, 2.0, 2.0), margin_mm=10.0) == ((6, 5, 7), (12, 25, 20))
    assert organ_box(mask, (5.0, 2.0, 2.0), margin_mm=100.0) == ((0, 0, 0), (20, 30, 30))
    assert organ_box(np.zeros((3, 3, 3), dtype=bool), (1.0, 1.0, 1.0)) is None


def test_box_grid_is_the_source_grid_unless_finer_than_the_floor() -> None:
    box = ((0, 0, 0), (40, 100, 100))
    assert box_shape(box, (3.0, 2.5, 4.0)) == (40, 100, 100)
    assert box_shape(box, (1.25, 0.7, 0.7)) == (20, 28, 28)


def test_coarse_maps_are_sampled_at_the_box_voxels() -> None:
    # a model grid that is the source crop itself: sampling is the identity
    grid = GridMap(perm=(0, 1, 2), flip=(False, False, False), start=(2, 0, 0),
                   stop=(10, 6, 6), model_shape=(8, 6, 6), source_shape=(12, 6, 6))
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1).expand(1, 1, 8, 6, 6)
    out = coarse_in_box(ramp, grid, ((4, 0, 0), (8, 6, 6)), (4, 6, 6))
    assert torch.allclose(out[0, 0, :, 3, 3], torch.tensor([2.0, 3.0, 4.0, 5.0]))
    # a box twice as fine as the model grid interpolates between model voxels
    grid2 = GridMap(perm=(0, 1, 2), flip=(False, False, False), start=(0, 0, 0),
                    stop=(16, 6, 6), model_shape=(8, 6, 6), source_shape=(16, 6, 6))
    out2 = coarse_in_box(ramp, grid2, ((4, 0, 0), (8, 6, 6)), (4, 6, 6))
    assert torch.allclose(out2[0, 0, :, 0, 0], torch.tensor([1.75, 2.25, 2.75, 3.25]))


class _Oracle(nn.Module):
    """A stand-in refiner: organ where the coarse organ map says so, lesion where HU is low."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        organ = (x[:, 2] > 0.5).float()
        # soft-tissue window: 0 HU is 0.4; organs are 35-85 HU (0.49-0.61)
        lesion = ((x[:, 1] < 0.45) & (x[:, 1] > 0.2) & (x[:, 2] > 0.2)).float()
        return torch.stack([0.5 * torch.ones_like(organ), organ, 2 * lesion], dim=1)


def test_refined_labels_merge_organs_and_lesions() -> None:
    ph = make_phantom(3, lesion_probability=1.0)
    hu, labels, aff = render_acquisition(ph)
    shape = (24, 48, 48)
    _x, grid = prepare(hu, aff, shape)
    # coarse logits from the truth on the model grid: one-hot, lesion class 8
    from tomoscribe.model.preprocess import labels_to_model_grid

    y = torch.from_numpy(labels_to_model_grid(labels, grid)).long()
    logits = torch.nn.functional.one_hot(y, 9).permute(3, 0, 1, 2)[None].float() * 10
    spacing = tuple(np.linalg.norm(aff[:3, :3], axis=0))
    res = refine(_Oracle(), hu, spacing, grid, logits, [2, 3, 4, 5, 6, 7], 8)  # type: ignore[arg-type]
    out = res.labels
    assert set(res.stats) == {2, 3, 4, 5, 6, 7}
    assert all(ml >= 0.0 and 0.0 <= peak <= 1.0 for ml, peak in res.stats.values())
    regions = torch.zeros(1, 7, 5)
    merged = res.region_stats(regions, (1, 2, 3, 4, 5, 6, 7))
    assert torch.equal(merged[0, 0], regions[0, 0])  # the body keeps the coarse statistics
    assert torch.allclose(merged[0, 2, -2:], torch.tensor(res.stats[3]))
    assert out.shape == hu.shape and out.dtype == np.uint8
    coarse = grid.to_source_labels(y.numpy().astype(np.uint8))
    for organ in (3, 4):  # liver and spleen: the refined organ is at least as good
        d_ref = _dice(out == organ, labels == organ)
        d_coarse = _dice(coarse == organ, labels == organ)
        assert d_ref >= d_coarse - 0.02, (organ, d_ref, d_coarse)
    # no lesion voxel outside the boxes of the refined organs; the body class survives
    assert (out == 1).any()
    # what the coarse pass put inside the body stays inside it (the body, not air)
    assert not (out[coarse > 0] == 0).any()
    assert set(np.unique(out)) <= set(range(9))
    # "owned": the same labels; each organ's statistics count the lesion components the
    # report gives it (ml, count), computed on the merged labels
    owned = refine(_Oracle(), hu, spacing, grid, logits, [2, 3, 4, 5, 6, 7], 8,  # type: ignore[arg-type]
                   stats_mode="owned")
    assert np.array_equal(owned.labels, out)
    voxel_ml = float(np.prod(canonical_spacing(spacing, grid))) / 1000.0
    want = owned_lesion_stats(to_canonical(out, grid), 8, [2, 3, 4, 5, 6, 7], voxel_ml)
    assert owned.stats == want and sum(n for _ml, n in want.values()) >= 1
    with pytest.raises(ValueError, match="not one of"):
        refine(_Oracle(), hu, spacing, grid, logits, [2], 8, stats_mode="peak")  # type: ignore[arg-type]


def test_weak_lesion_components_take_their_next_likeliest_class() -> None:
    # a box refined at half the source resolution along H and W: two lesion
    # components, one sure (p 0.9) and one weak (p 0.6), on a background whose
    # organ/other split differs left and right
    prob = torch.zeros(3, 2, 4, 4)
    prob[OTHER] = 0.7
    prob[ORGAN, :, :, 2:] = 0.7
    prob[OTHER, :, :, 2:] = 0.1
    prob[:, 0, 0, 0] = torch.tensor([0.05, 0.05, 0.9])  # sure lesion (other side)
    prob[:, 1, 3, 3] = torch.tensor([0.1, 0.3, 0.6])  # weak lesion (organ side)
    pred = np.zeros((2, 8, 8), np.uint8)
    pred[0, 0:2, 0:2] = LESION
    pred[1, 6:8, 6:8] = LESION
    kept = drop_weak_lesions(prob, pred.copy(), 0.0)
    assert np.array_equal(kept, pred)  # 0: every component stays
    out = drop_weak_lesions(prob, pred.copy(), 0.7)
    assert (out[0, 0:2, 0:2] == LESION).all()
    assert (out[1, 6:8, 6:8] == ORGAN).all()  # the organ is likelier than other there
    assert (out == LESION).sum() == 4
    # the threshold compares with the component's mean, not its peak
    prob[:, 1, 3, 2] = torch.tensor([0.0, 0.0, 1.0])
    pred[1, 6:8, 4:6] = LESION  # the weak component grows into a sure half: mean 0.8
    assert (drop_weak_lesions(prob, pred.copy(), 0.7)[1] == LESION).sum() == 8
    assert (drop_weak_lesions(prob, pred.copy(), 0.85)[1] == LESION).sum() == 0


def test_refine_drops_weak_components_only_when_asked() -> None:
    ph = make_phantom(3, lesion_probability=1.0)
    hu, _labels, aff = render_acquisition(ph)
    _x, grid = prepare(hu, aff, (24, 48, 48))
    logits = torch.zeros(1, 9, 24, 48, 48)
    logits[:, 3] = 5.0  # the liver everywhere: one box holding the whole volume
    spacing = tuple(np.linalg.norm(aff[:3, :3], axis=0))
    plain = refine(_Oracle(), hu, spacing, grid, logits, [3], 8)  # type: ignore[arg-type]
    # the oracle's logits (0.5, 1 or 0, 2) give its lesions a probability of 0.63-0.74
    assert (plain.labels == 8).any()
    kept = refine(_Oracle(), hu, spacing, grid, logits, [3], 8,  # type: ignore[arg-type]
                  min_lesion_prob=0.6)
    assert np.array_equal(kept.labels, plain.labels)
    dropped = refine(_Oracle(), hu, spacing, grid, logits, [3], 8,  # type: ignore[arg-type]
                     min_lesion_prob=0.8)
    assert not (dropped.labels == 8).any()
    assert ((dropped.labels == 3) | (plain.labels != 8)).all()  # the lesion became liver


def test_owned_statistics_give_each_lesion_to_one_organ() -> None:
    lab = np.zeros((12, 30, 30), dtype=np.uint8)
    lab[2:10, 2:15, 2:28] = 4  # the liver
    lab[2:10, 15:28, 2:28] = 6  # a kidney under it, sharing a face
    lab[4:7, 15:19, 10:13] = 8  # a cyst at the kidney's top: its shell is mostly kidney
    lab[3:5, 5:7, 5:7] = 8  # a liver lesion (8 voxels)
    lab[7:9, 5:7, 20:22] = 8  # a second one
    lab[5, 24, 24] = 8  # a one-voxel speck in the kidney: noise
    lab[3, 24, 5:8] = 8  # three voxels: a lesion at 0.5 ml a voxel, noise at 0.01 (0.03 ml)
    stats = owned_lesion_stats(lab, 8, [4, 5, 6], voxel_ml=0.5)
    assert stats[5] == (0.0, 0.0)  # no spleen here
    assert stats[6] == pytest.approx((np.log1p(39 * 0.5), 2.0))  # the cyst and the three voxels
    assert stats[4] == pytest.approx((np.log1p(16 * 0.5), 2.0))  # not the kidney's cyst
    # the report's minimum lesion (MIN_LESION_ML): under it, a component is noise here too
    fine = owned_lesion_stats(lab, 8, [4, 5, 6], voxel_ml=0.01)
    assert fine[6] == pytest.approx((np.log1p(36 * 0.01), 1.0))


@pytest.mark.parametrize("perm", [(1, 0, 2), (2, 1, 0)])
def test_refinement_follows_the_source_orientation(perm: tuple[int, int, int]) -> None:
    # the same study stored as a coronal or sagittal series, slices reversed:
    # the refined labels are the axial ones, permuted and flipped the same way
    ph = make_phantom(6, lesion_probability=1.0, shape=(40, 64, 64))
    hu, labels, aff = render_acquisition(ph)
    src_hu = np.ascontiguousarray(np.transpose(hu, perm)[::-1])
    src_aff = np.eye(4)
    src_aff[:3, :3] = aff[:3, :3][:, list(perm)]
    src_aff[:3, 3] = aff[:3, 3] + (src_hu.shape[0] - 1) * src_aff[:3, 0]
    src_aff[:3, 0] = -src_aff[:3, 0]
    from tomoscribe.model.preprocess import labels_to_model_grid

    results = []
    for vox, a, lab in ((hu, aff, labels),
                        (src_hu, src_aff, np.ascontiguousarray(np.transpose(labels, perm)[::-1]))):
        _x, grid = prepare(vox, a, (24, 48, 48))
        y = torch.from_numpy(labels_to_model_grid(lab, grid)).long()
        logits = torch.nn.functional.one_hot(y, 9).permute(3, 0, 1, 2)[None].float() * 10
        spacing = tuple(np.linalg.norm(a[:3, :3], axis=0))
        results.append(refine(_Oracle(), vox, spacing, grid, logits, [2, 3, 4, 5, 6, 7], 8))  # type: ignore[arg-type]
    axial, other = results
    assert np.array_equal(np.ascontiguousarray(np.transpose(axial.labels, perm)[::-1]),
                          other.labels)
    for organ in axial.stats:
        assert np.allclose(axial.stats[organ], other.stats[organ], atol=1e-5)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_lesion_components_drop_specks_and_orphans() -> None:
    lab = np.zeros((10, 20, 20), dtype=np.uint8)
    lab[2:8, 2:18, 2:18] = 4  # an organ
    lab[4:6, 5:8, 5:8] = 8  # a lesion inside it (18 voxels)
    lab[5, 14, 14] = 8  # a speck inside it
    lab[0, 0, 0] = 8  # outside any organ
    comps, organ_of = _lesion_components(lab, 8, {4: "spleen"}, min_voxels=4)
    assert list(organ_of.values()) == ["spleen"]
    assert int((comps > 0).sum()) == 18


def test_patches_are_centred_near_lesions() -> None:
    y = np.zeros((40, 60, 60), dtype=np.uint8)
    y[30:33, 50:53, 5:8] = LESION
    y[10:30, 10:50, 10:50] = ORGAN
    box = {"x": np.zeros((4, 40, 60, 60), dtype=np.float16), "y": y, "lesion": True}
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, py = patch(box, (16, 24, 24), rng)
        assert x.shape == (4, 16, 24, 24) and py.shape == (16, 24, 24)
        assert (py == LESION).any()
    small = {"x": np.zeros((4, 8, 60, 60), dtype=np.float16), "y": y[:8], "lesion": False}
    assert patch(small, (16, 24, 24), rng)[1].shape == (8, 24, 24)


def test_training_boxes_match_the_inference_input() -> None:
    torch.manual_seed(0)
    net = ScribeNet(SMALL).eval()
    boxes = boxes_of(net, 11)
    ph = make_phantom(11)
    hu, _labels, aff = render_acquisition(ph)
    x, grid = prepare(hu, aff, SMALL.model_shape)
    with torch.no_grad():
        logits, _ = net.seg(net.encoder(x), x)
    sp = tuple(np.linalg.norm(aff[:3, :3], axis=0)[list(grid.perm)])
    coarse = to_canonical(grid.to_source_labels(logits.argmax(1)[0].to(torch.uint8).numpy()), grid)
    for b in boxes:
        organ = int(b["organ"])  # type: ignore[call-overload]
        box = organ_box(coarse == organ, sp)
        assert box is not None
        want = box_input(to_canonical(hu, grid), logits.softmax(1), grid, box, sp, organ, 8)
        assert np.allclose(b["x"], want[0].numpy(), atol=2e-3)  # type: ignore[arg-type]


def test_refine_stage_needs_a_first_stage_that_finds_organs(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    torch.manual_seed(0)
    save_model(ScribeNet(SMALL), tmp_path / "untrained", {"version": "9.9"})
    assert main(["--init", str(tmp_path / "untrained"), "--out", str(tmp_path / "out"),
                 "--checkpoint", str(tmp_path / "ck"), "--phantoms", "1", "--workers", "1"]) == 1
    assert "finds no organ" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_refine_stage_trains_and_the_model_uses_it(tmp_path: Path) -> None:
    out = tmp_path / "refined"
    assert main(["--init", str(DEFAULT_MODEL_DIR), "--out", str(out), "--checkpoint",
                 str(tmp_path / "ck"), "--phantoms", "2", "--steps", "3", "--width", "4",
                 "--workers", "1", "--patch", "8", "16", "16"]) == 0
    conf = json.loads((out / "config.json").read_text())
    prior = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert conf["net"]["refine_width"] == 4 and conf["history"][-1]["stage"] == "refine"
    # new weights, a new version: the refined model's outputs must not take the UIDs of
    # the shipped model's (they derive from the study and the model version)
    assert conf["version"] != prior["version"] and conf["version"] == local_version(out)
    # the first stage is unchanged by the refine stage (the refiner is new: width 4)
    before = torch.load(DEFAULT_MODEL_DIR / "model.pt", weights_only=True)
    after = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("refine."))
    assert any(k.startswith("refine.") for k in after)
    scribe = Scribe.load(out)
    ph = make_phantom(5, lesion_probability=1.0)
    hu, _labels, aff = render_acquisition(ph)
    vol = Volume(hu, aff, [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2")
                           for k in range(hu.shape[0])])
    enc = scribe.encode(vol)
    assert enc.extra["refined"].shape == vol.shape
    report = scribe.generate(enc, ["is there a lesion in the liver ?"])
    assert report.label_map.shape == vol.shape
    assert set(np.unique(report.label_map)) - {0} <= {s.label for s in report.segments}

    # a language stage on the refined statistics, fed as at inference
    lang = tmp_path / "lang"
    assert train_main(["--stage", "language", "--init", str(out), "--out", str(lang),
                       "--checkpoint", str(tmp_path / "ck2"), "--samples", "3", "--steps", "2",
                       "--batch", "2", "--workers", "1", "--refine-stats"]) == 0
    stats = torch.load(tmp_path / "ck2" / "refine-stats.pt", weights_only=False)["stats"]
    assert stats.shape == (3, 6, 2)
    seed = 1  # the second training phantom: its statistics as the encoder computes them
    hu, _labels, aff = render_acquisition(make_phantom(seed))
    tuned = Scribe.load(lang)
    assert tuned.cfg.refine_stats
    enc2 = tuned.encode(Volume(hu, aff, [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2")
                                         for k in range(hu.shape[0])]))
    want = torch.tensor([enc2.extra["refined_stats"][c] for c in range(2, 8)])
    assert torch.allclose(stats[seed], want, atol=1e-4)
    # and only the organs' region tokens change when the statistics are switched off
    tuned.cfg.refine_stats = False
    plain = tuned.encode(Volume(hu, aff, enc2.volume.slices)).image_tokens
    changed = (plain - enc2.image_tokens).abs().amax(dim=2)[0] > 1e-6
    assert not changed[:25].any() and changed[25:31].any()

    # the "owned" statistics: cached apart from the "rim" ones, and fed as at inference
    owned = tmp_path / "owned"
    assert train_main(["--stage", "language", "--init", str(lang), "--out", str(owned),
                       "--checkpoint", str(tmp_path / "ck2"), "--samples", "3", "--steps", "1",
                       "--batch", "2", "--workers", "1", "--refine-stats-mode", "owned"]) == 0
    data = torch.load(tmp_path / "ck2" / "refine-stats.pt", weights_only=False)
    assert data["key"]["mode"] == "owned" and data["key"]["min_lesion_ml"] == MIN_LESION_ML
    tuned = Scribe.load(owned)
    assert tuned.cfg.refine_stats and tuned.cfg.refine_stats_mode == "owned"
    enc3 = tuned.encode(Volume(hu, aff, enc2.volume.slices))
    want = torch.tensor([enc3.extra["refined_stats"][c] for c in range(2, 8)])
    assert torch.allclose(data["stats"][seed], want, atol=1e-4)
    assert torch.all(want[:, 1] == want[:, 1].round())  # a count of components

    # with weak components dropped: cached apart, and fed as at inference
    conf = json.loads((owned / "config.json").read_text())
    conf["net"]["refine_min_lesion_prob"] = 0.9
    (owned / "config.json").write_text(json.dumps(conf))
    strict = tmp_path / "strict"
    assert train_main(["--stage", "language", "--init", str(owned), "--out", str(strict),
                       "--checkpoint", str(tmp_path / "ck2"), "--samples", "3", "--steps", "1",
                       "--batch", "2", "--workers", "1"]) == 0
    data = torch.load(tmp_path / "ck2" / "refine-stats.pt", weights_only=False)
    assert data["key"]["min_lesion_prob"] == 0.9
    enc4 = Scribe.load(strict).encode(Volume(hu, aff, enc2.volume.slices))
    want = torch.tensor([enc4.extra["refined_stats"][c] for c in range(2, 8)])
    assert torch.allclose(data["stats"][seed], want, atol=1e-4)


def test_recall_term_weighs_a_small_lesion_like_a_large_one() -> None:
    from tomoscribe.train_refine import refine_loss

    y = torch.zeros(1, 8, 16, 16, dtype=torch.long)
    y[0, 4, 8, 8] = LESION  # one lesion voxel, predicted as background
    logits = torch.zeros(1, 3, 8, 16, 16)
    logits[:, 0] = 5.0
    plain = refine_loss(logits, y, 5.0)
    with_recall = refine_loss(logits, y, 5.0, recall_weight=1.0)
    # the mean over the lesion's single voxel is its full cross-entropy (about 5)
    assert float(with_recall - plain) > 4.0
    no_lesion = torch.zeros_like(y)
    assert torch.equal(refine_loss(logits, no_lesion, 5.0, 1.0),
                       refine_loss(logits, no_lesion, 5.0))


def test_hint_jitter_moves_only_the_organ_hint_border() -> None:
    from tomoscribe.train_refine import jitter_hint

    x = torch.zeros(1, 4, 16, 20, 20)
    x[:, 2, 2:14, 5:15, 5:15] = 1.0
    x[:, 0] = torch.rand(16, 20, 20)
    x[:, 3] = torch.rand(16, 20, 20)
    sizes = set()
    for seed in range(30):
        y = jitter_hint(x.clone(), np.random.default_rng(seed))
        assert y.shape == x.shape
        assert torch.equal(y[:, [0, 1, 3]], x[:, [0, 1, 3]])  # the image and lesion hint stay
        hint = y[0, 2]
        assert set(hint.unique().tolist()) <= {0.0, 1.0}
        sizes.add(int(hint.sum()))
        # still where the organ is: the box's centre stays inside the hint
        assert hint[7:9, 9:11, 9:11].all()
    assert min(sizes) < 1200 < max(sizes)  # both shrunk and grown (the hint is 1200 voxels)


def test_fresh_refiner_and_patch_loaders(tmp_path: Path) -> None:
    """``--fresh`` drops the refiner of ``--init``; loader processes feed the same stream."""
    from tomoscribe.train_refine import PatchStream

    shipped = torch.load(DEFAULT_MODEL_DIR / "model.pt", weights_only=True)
    for flags, same in (([], True), (["--fresh"], False)):
        out = tmp_path / f"out{len(flags)}"
        assert main(["--init", str(DEFAULT_MODEL_DIR), "--out", str(out), "--checkpoint",
                     str(tmp_path / f"ck{len(flags)}"), "--phantoms", "1", "--steps", "0",
                     "--workers", "1", "--device", "auto", *flags]) == 0
        after = torch.load(out / "model.pt", weights_only=True)
        refine_keys = [k for k in shipped if k.startswith("refine.")]
        assert refine_keys
        assert all(torch.equal(shipped[k], after[k]) for k in refine_keys) is same
    # --min-lesion-prob sets the model's threshold for dropping weak lesion components
    strict = tmp_path / "strict"
    assert main(["--init", str(DEFAULT_MODEL_DIR), "--out", str(strict), "--checkpoint",
                 str(tmp_path / "ck-strict"), "--phantoms", "1", "--steps", "0",
                 "--workers", "1", "--min-lesion-prob", "0.8"]) == 0
    conf = json.loads((strict / "config.json").read_text())
    assert conf["net"]["refine_min_lesion_prob"] == 0.8
    assert conf["history"][-1]["min_lesion_prob"] == 0.8
    assert Scribe.load(strict).cfg.refine_min_lesion_prob == 0.8
    with pytest.raises(SystemExit):
        main(["--init", str(DEFAULT_MODEL_DIR), "--out", str(tmp_path / "x"),
              "--min-lesion-prob", "1.5"])

    rng = np.random.default_rng(0)
    y = np.zeros((12, 20, 20), dtype=np.uint8)
    y[2:10, 4:16, 4:16] = 1
    y[5:7, 8:10, 8:10] = 2
    x = rng.normal(size=(4, 12, 20, 20)).astype(np.float16)
    boxes = [{"x": x, "y": y, "lesion": True}, {"x": x, "y": (y == 1).astype(np.uint8),
                                                  "lesion": False}]
    stream = PatchStream(boxes, (8, 16, 16), coarse_dropout=1.0, hint_jitter=0.5, seed=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
    got = [item for item, _ in zip(loader, range(40), strict=False)]
    assert all(px.shape == (1, 4, 8, 16, 16) and py.shape == (1, 8, 16, 16) for px, py in got)
    assert all(not px[:, 3].any() for px, _ in got)  # coarse lesion channel always dropped
    with_lesion = sum(bool((py == 2).any()) for _, py in got)
    assert 8 <= with_lesion <= 32  # half of the draws come from the box with a lesion


def test_organ_share_draws_that_fraction_from_an_organs_boxes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tomoscribe.train_refine import PatchStream

    y = np.ones((8, 16, 16), dtype=np.uint8)
    boxes = [{"x": np.full((4, 8, 16, 16), organ, dtype=np.float16), "y": y, "lesion": False,
              "organ": organ} for organ in (3, 4, 5, 6, 7)]
    # 500 draws: without shares one box in five; with 0.6 for organ 6, 0.6 + 0.4 / 5 = 0.68
    for shares, low, high in ((None, 60, 140), ({6: 0.6}, 300, 400)):
        stream = PatchStream(boxes, (8, 16, 16), coarse_dropout=0.0, hint_jitter=0.0, seed=1,
                             shares=shares)
        from_six = sum(int(px[0, 0, 0, 0, 0]) == 6
                       for (px, _py), _ in zip(stream, range(500), strict=False))
        assert low <= from_six <= high, shares
    for bad in (["liver", "1.5"], ["kidney", "0.3"], ["liver", "half"]):
        assert main(["--init", str(DEFAULT_MODEL_DIR), "--out", str(tmp_path / "out"),
                     "--organ-share", *bad, "--steps", "0"]) == 2
        assert "--organ-share" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_small_share_centres_that_fraction_of_patches_on_small_lesions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tomoscribe.train_refine import PatchStream, lesion_sizes

    # one box with a large lesion (125 voxels) and a small one (8), one without a lesion
    y = np.ones((24, 40, 40), dtype=np.uint8)
    y[2:7, 2:7, 2:7] = LESION
    y[18:20, 33:35, 33:35] = LESION
    boxes = [{"x": np.zeros((4, 24, 40, 40), dtype=np.float16), "y": y, "lesion": True,
              "organ": 3},
             {"x": np.zeros((4, 24, 40, 40), dtype=np.float16),
              "y": np.ones((24, 40, 40), dtype=np.uint8), "lesion": False, "organ": 4}]
    assert sorted(lesion_sizes(boxes[0])) == [8, 125]

    def small_centred(share: float) -> int:
        stream = PatchStream(boxes, (8, 8, 8), coarse_dropout=0.0, hint_jitter=0.0, seed=2,
                             small_share=share, small_voxels=40)
        assert len(stream.small) == 1
        # an 8-voxel patch centred (within a quarter) on the small lesion holds all of it
        return sum(int((py == LESION).sum()) == 8
                   for (_px, py), _ in zip(stream, range(400), strict=False))

    # without the share a quarter of the patches find the small lesion (half centred on a
    # lesion, half of those on this one); with 0.6, 0.6 + 0.4 / 4 = 0.7
    assert 60 <= small_centred(0.0) <= 140
    assert 240 <= small_centred(0.6) <= 320
    assert main(["--init", str(DEFAULT_MODEL_DIR), "--out", str(tmp_path / "out"),
                 "--small-share", "1.0", "--steps", "0"]) == 2
    assert "--small-share" in capsys.readouterr().out


def test_flipped_passes_are_flipped_back_and_averaged() -> None:
    from tomoscribe.model.refine import FLIP_SETS, OrganRefiner, box_softmax

    torch.manual_seed(0)
    net = OrganRefiner((4, 8, 12)).eval()
    x = torch.rand(1, 4, 9, 13, 11)
    with torch.no_grad():
        plain = net(x)[0].softmax(dim=0)
        assert torch.allclose(box_softmax(net, x, 0), plain, atol=1e-6)
        mirrored = net(x.flip(4))[0].softmax(dim=0).flip(3)  # (3, d, h, w): W is dim 3
        assert torch.allclose(box_softmax(net, x, 1), (plain + mirrored) / 2, atol=1e-6)
        assert not torch.allclose(mirrored, plain, atol=1e-3)  # the copies do differ
        for n, sets in FLIP_SETS.items():
            assert len(sets) == n + 1
            p = box_softmax(net, x, n)
            assert p.shape == (3, 9, 13, 11)
            assert torch.allclose(p.sum(dim=0), torch.ones(9, 13, 11), atol=1e-5)


# ------------------------------------------------- sources finer than the floor (head MR)
def _ball(shape: tuple[int, int, int], centre: tuple[float, ...], radius: tuple[float, ...]
          ) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius, strict=True)) <= 1.0


def test_box_labels_draw_a_fine_sources_edge_between_refinement_voxels() -> None:
    # a 10 mm lesion in 0.9 mm pixels and 4 mm slices, refined at 2.5 mm in-plane
    fine = _ball((10, 44, 44), (5.0, 22.3, 21.7), (1.25, 5.55, 5.55))
    y = np.where(fine, LESION, ORGAN).astype(np.uint8)
    coarse_shape = (10, 16, 16)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y.astype(np.int64)), 3)
    prob = torch.nn.functional.adaptive_avg_pool3d(
        onehot.permute(3, 0, 1, 2)[None].float(), coarse_shape)[0]
    box = ((3, 5, 7), (13, 49, 51))
    got = box_labels(prob, box) == LESION
    assert got.shape == fine.shape
    nearest_idx = [np.minimum((np.arange(n) * c) // n, c - 1)
                   for n, c in zip(fine.shape, coarse_shape, strict=True)]
    nearest = prob.argmax(0).numpy()[np.ix_(*nearest_idx)] == LESION
    assert _dice(got, fine) > 0.9
    assert _dice(got, fine) > _dice(nearest, fine) + 0.03
    # where the box grid is the source: the argmax itself, in chunks or not
    same = torch.rand(3, 7, 9, 11)
    box2 = ((0, 0, 0), (7, 9, 11))
    assert np.array_equal(box_labels(same, box2), same.argmax(0).numpy())


def test_box_labels_resample_only_edges_and_match_resampling_everything(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    box = ((0, 0, 0), (13, 17, 19))
    zs, ys, xs = ((torch.arange(n, dtype=torch.float32) + 0.5) * 2.0 / n - 1.0
                  for n in (13, 17, 19))
    gz, gy, gx = torch.meshgrid(zs, ys, xs, indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None]
    blob = torch.zeros(3, 5, 6, 7)
    blob[1, 1:4, 1:5, 2:6] = 4.0  # an organ with a lesion: large uniform regions
    blob[2, 2, 2:4, 3:5] = 8.0
    for prob in (torch.rand(3, 5, 6, 7).softmax(0), blob.softmax(0)):
        every = torch.nn.functional.grid_sample(prob[None], grid, mode="bilinear",
                                                padding_mode="border", align_corners=False)
        whole = box_labels(prob, box)
        assert np.array_equal(whole, every[0].argmax(0).numpy())
        monkeypatch.setattr("tomoscribe.model.refine.CHUNK_VOXELS", 37)  # many chunks
        assert np.array_equal(box_labels(prob, box), whole)
        monkeypatch.undo()


def test_box_target_takes_the_class_covering_most_of_each_voxel() -> None:
    y = np.zeros((2, 6, 6), dtype=np.uint8)
    y[:, :4, :4] = ORGAN  # refinement voxel (0, 0) is all organ, (0, 1) 3/9 organ
    y[:, 3:6, 3:6] = LESION  # (1, 1) is all lesion
    got = box_target(y, (2, 2, 2))
    assert got.dtype == np.uint8 and got.shape == (2, 2, 2)
    assert (got[:, 0, 0] == ORGAN).all() and (got[:, 1, 1] == LESION).all()
    assert (got[:, 0, 1] == OTHER).all()
    assert box_target(y, y.shape) is y


HEAD_SMALL = NetConfig.for_domain("mr-head")
HEAD_SMALL.model_shape, HEAD_SMALL.channels = (16, 32, 32), (8, 8, 16, 16)


def test_head_boxes_are_read_at_the_studys_own_mr_levels() -> None:
    torch.manual_seed(0)
    net = ScribeNet(HEAD_SMALL).eval()
    values, labels, aff, _lesions = render_study(6, "mr-head")
    boxes = boxes_of(net, 6)
    for b in boxes:  # 0.9 mm pixels: the target is on the refinement grid too
        assert b["x"].shape[1:] == b["y"].shape  # type: ignore[union-attr]
    sp = canonical_spacing(np.linalg.norm(aff[:3, :3], axis=0), prepare(values, aff, (16, 32, 32),
                                                                        "mr")[1])
    inputs = []
    for scale in (1.0, 7.5):  # an MR's values have no unit: the input must not depend on it
        _x, grid = prepare(values * np.float32(scale), aff, HEAD_SMALL.model_shape, "mr")
        assert grid.windows != prepare(values, aff, HEAD_SMALL.model_shape)[1].windows
        prob = torch.rand(1, 7, *HEAD_SMALL.model_shape, generator=torch.Generator().manual_seed(3))
        box = organ_box(to_canonical(labels, grid) == 2, sp)
        assert box is not None
        inputs.append(box_input(to_canonical(values * np.float32(scale), grid), prob, grid, box,
                                sp, 2, 6))
    assert inputs[0].shape[2:] == box_shape(box, sp)
    assert torch.allclose(inputs[0], inputs[1], atol=1e-5)
    assert 0.1 < float(inputs[0][:, :2].mean()) < 0.9  # scaled into range, not saturated
