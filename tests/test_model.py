"""Model modules: shapes, preprocessing round trips, grammar, a training step, Scribe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tomoscribe
from tomoscribe.errors import ModelError
from tomoscribe.model.api import Encoded
from tomoscribe.model.dcformer import DCFormerEncoder, DecomposedConv3d
from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.preprocess import canonical_orientation, labels_to_model_grid, prepare
from tomoscribe.model.scribe import Scribe
from tomoscribe.model.text import (
    WordTokenizer,
    findings_to_text,
    impression_of,
    parse_findings,
    sentence_case,
    with_findings,
    without_sites,
)
from tomoscribe.phantom import Phantom, make_phantom, render_acquisition
from tomoscribe.train import make_sample, save_model, seg_loss
from tomoscribe.volume import SliceRef, Volume

SMALL = NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16))


def test_decomposed_conv_shapes_and_parameter_count() -> None:
    conv = DecomposedConv3d(4, 6, kernel_size=7)
    y = conv(torch.randn(2, 4, 8, 10, 12))
    assert y.shape == (2, 6, 8, 10, 12)
    weights = sum(p.numel() for n, p in conv.named_parameters() if n.endswith("0.weight"))
    assert weights == 3 * 7 * 4 * 6  # three 1D kernels, not 7^3


def test_encoder_stage_shapes() -> None:
    enc = DCFormerEncoder(2, (8, 16, 24, 32), (1, 1, 1, 1), (5, 5, 3, 3))
    feats = enc(torch.randn(1, 2, 32, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (1, 8, 16, 32, 32), (1, 16, 8, 16, 16), (1, 24, 4, 8, 8), (1, 32, 2, 4, 4)]


def test_network_shapes_and_training_step_lowers_loss() -> None:
    torch.manual_seed(0)
    net = ScribeNet(SMALL)
    x = torch.rand(2, 2, *SMALL.model_shape)
    y = torch.randint(0, SMALL.num_classes, (2, *SMALL.model_shape))
    tokens, logits = net.encode(x)
    assert tokens.shape == (2, net.num_image_tokens, SMALL.width)
    assert logits.shape == (2, SMALL.num_classes, *SMALL.model_shape)
    tok = WordTokenizer()
    ids = torch.tensor([tok.encode("<report> liver : one hypodense lesion .") + [tok.eos_id]] * 2)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        tokens, logits = net.encode(x)
        loss = seg_loss(logits, y, torch.ones(SMALL.num_classes)) + net.lm_loss(tokens, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_grammar_round_trip() -> None:
    text = findings_to_text([("liver", "hypodense lesion"), ("liver", "hypodense lesion"),
                             ("left kidney", "cyst")])
    assert text == ("liver : two hypodense lesions . left kidney : one cyst . "
                    "impression : liver lesions , left kidney cyst .")
    parsed = parse_findings(text)
    assert [(p.organ, p.count) for p in parsed] == [("liver", 2), ("left kidney", 1)]
    assert impression_of(text) == "liver lesions , left kidney cyst ."
    assert parse_findings(findings_to_text([])) == []
    assert sentence_case("liver : one cyst . impression : x .") == "Liver: one cyst. Impression: x."
    tok = WordTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("zebra")[0] == tok.unk_id


def test_without_sites_drops_a_finding_and_its_impression_item() -> None:
    text = findings_to_text([("liver", "hypodense lesion"), ("spleen", "hypodense lesion"),
                             ("spleen", "hypodense lesion"), ("right kidney", "cyst")])
    assert without_sites(text, ["spleen"]) == (
        "liver : one hypodense lesion . right kidney : one cyst . "
        "impression : liver lesion , right kidney cyst .")
    assert without_sites(text, ["spleen", "liver", "right kidney"]) == findings_to_text([])
    assert without_sites(text, []) == text
    # an impression that names none of the sites kept names them
    assert without_sites("liver : one hypodense lesion . spleen : one hypodense lesion . "
                         "impression : spleen lesion .", ["spleen"]) == (
        "liver : one hypodense lesion . impression : liver .")


def test_with_findings_adds_a_site_in_report_order() -> None:
    lesions = [("right lung", "nodule"), ("liver", "hypodense lesion"),
               ("left kidney", "cyst"), ("left kidney", "cyst")]
    for k in range(len(lesions)):  # any one site left out comes back where it belongs
        site = lesions[k][0]
        shorter = findings_to_text([les for les in lesions if les[0] != site])
        back = [les for les in lesions if les[0] == site]
        assert with_findings(shorter, back) == findings_to_text(lesions)
    text = findings_to_text(lesions)
    assert with_findings(text, [("liver", "hypodense lesion")]) == text  # named: its own words
    assert with_findings(findings_to_text([]), [("spleen", "hypodense lesion")]) == (
        findings_to_text([("spleen", "hypodense lesion")]))
    assert parse_findings(with_findings(text, [("spleen", "hypodense lesion")]))[2].organ == (
        "spleen")


@pytest.fixture(scope="module")
def lesion_study() -> tuple[Scribe, Phantom, Encoded]:
    """The shipped model and the first test phantom with lesions, encoded once."""
    scribe = Scribe.load(None)
    ph = next(p for p in map(make_phantom, range(2_000_000, 2_000_020)) if p.lesions)
    hu, _labels, aff = render_acquisition(ph)
    enc = scribe.encode(Volume(hu, aff, [SliceRef(f"2.25.{k}", "1.2.840.10008.5.1.4.1.1.2")
                                         for k in range(hu.shape[0])]))
    return scribe, ph, enc


def test_a_finding_the_segmentation_does_not_show_is_withheld(
        lesion_study: tuple[Scribe, Phantom, Encoded], monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped model on a study with a liver lesion, told to write a spleen one too."""
    scribe, ph, enc = lesion_study
    organs = {les.organ for les in ph.lesions}
    plain = scribe.generate(enc)
    assert {f.structure for f in plain.findings} == organs and not plain.withheld
    extra = next(o for o in ("spleen", "liver", "left kidney") if o not in organs)
    invented = findings_to_text([*((les.organ, les.kind) for les in ph.lesions),
                                 (extra, "cyst")])
    monkeypatch.setattr(Scribe, "write_text", lambda self, tokens: invented)
    report = scribe.generate(enc)
    assert {f.structure for f in report.findings} == organs
    assert len(report.withheld) == 1 and report.withheld[0].startswith(extra.capitalize())
    assert extra not in report.text.lower() and extra not in report.impression.lower()
    assert all(f.segment is not None for f in report.findings)
    # the image-blind baseline must not see the image through the segmentation
    blind = scribe.generate(enc, blind=True)
    assert extra in {f.structure for f in blind.findings} and not blind.withheld


def test_a_lesion_the_text_leaves_out_is_added_where_it_stands_out(
        lesion_study: tuple[Scribe, Phantom, Encoded], monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped model, told to leave out an organ with a plain lesion, gets it back."""
    scribe, ph, enc = lesion_study
    organs = {les.organ for les in ph.lesions}
    plain = scribe.generate(enc)
    assert {f.structure for f in plain.findings} == organs and not plain.added
    left_out = ph.lesions[0].organ
    shorter = findings_to_text([(les.organ, les.kind) for les in ph.lesions
                                if les.organ != left_out])
    monkeypatch.setattr(Scribe, "write_text", lambda self, tokens: shorter)
    question = f"is there a lesion in the {left_out} ?"
    report = scribe.generate(enc, [question])
    assert {f.structure for f in report.findings} == organs
    assert len(report.added) == 1 and report.added[0].startswith(left_out.capitalize())
    assert left_out in report.impression.lower()
    mine = next(f for f in report.findings if f.structure == left_out)
    assert mine.segment is not None and mine.size_mm is not None
    assert report.answers[0].answer.startswith("Yes")  # the answers follow the report
    # the image-blind baseline must not see the image through the second look
    blind = scribe.generate(enc, blind=True)
    assert left_out not in {f.structure for f in blind.findings} and not blind.added


def test_the_second_look_adds_a_lesion_only_where_it_differs_from_its_organ() -> None:
    """A kidney component as dark as a cyst is added; one as dense as the kidney is not."""
    from tomoscribe.model.api import Encoded
    from tomoscribe.model.scribe import lesion_contrast

    scribe = Scribe.load(None)
    rng = np.random.default_rng(0)
    y = np.ones((24, 48, 48), np.uint8)  # body
    y[2:22, 2:22, 2:22] = 6  # right kidney
    y[2:22, 26:46, 26:46] = 7  # left kidney
    image = rng.normal(30.0, 8.0, y.shape).astype(np.float32)  # kidneys and body alike
    y[9:13, 9:13, 9:13] = 8  # a cyst in the right kidney: water
    image[9:13, 9:13, 9:13] = rng.normal(0.0, 8.0, (4, 4, 4))
    y[9:13, 33:37, 33:37] = 8  # a false component in the left kidney: kidney
    vol = Volume(image, np.diag([2.0, 2.0, 2.0, 1.0]), [
        SliceRef(f"2.25.{k}", "1.2.840.10008.5.1.4.1.1.2") for k in range(y.shape[0])])
    enc = Encoded(vol, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1),
                  extra={"refined": y})
    comps, grounded = scribe.grounded_components(enc)
    cyst, fake = int(comps[10, 10, 10]), int(comps[10, 34, 34])
    assert grounded[cyst] == "right kidney" and grounded[fake] == "left kidney"
    assert lesion_contrast(image, comps == cyst, y == 6) < -2.5
    assert abs(lesion_contrast(image, comps == fake, y == 7)) < 1.0
    assert scribe.second_look(enc, set()) == [("right kidney", "cyst", cyst)]
    assert scribe.second_look(enc, {"right kidney"}) == []  # the text named it: nothing to add


def test_a_seg_answer_whose_coarse_mask_misses_the_lesions_gets_the_organs_lesions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for an organ's lesions, a <seg> answer falls back to the report's lesions there."""
    import tomoscribe.model.scribe as scribe_module

    scribe = Scribe.load(None)
    ph = next(p for p in map(make_phantom, range(2_000_000, 2_000_020)) if p.lesions)
    organ = ph.lesions[0].organ
    hu, _labels, aff = render_acquisition(ph)
    enc = scribe.encode(Volume(hu, aff, [SliceRef(f"2.25.{k}", "1.2.840.10008.5.1.4.1.1.2")
                                         for k in range(hu.shape[0])]))
    question = f"segment the lesions in the {organ} ."
    assert scribe.refer(enc, question, snap=False)[1] is not None  # the model answers <seg>
    comps, owner = scribe._refined_components(enc)
    expect = np.isin(comps, [c for c, o in owner.items() if o == organ])
    assert expect.any()
    # the decoder's coarse mask covering none of the refined regions
    monkeypatch.setattr(scribe_module, "snap_to_segmentation",
                        lambda mask, *a, **k: np.zeros_like(mask))
    _text, mask = scribe.refer(enc, question)
    assert mask is not None and np.array_equal(mask, expect)
    # an organ the segmentation shows no lesion in still gets none
    clean = next(o for o in scribe.organ_names.values()
                 if o != "body" and o not in set(owner.values()))
    assert scribe.refer(enc, f"segment the lesions in the {clean} .") == ("none .", None)
    # and a question for the organ itself has no such fallback
    assert scribe.refer(enc, f"segment the {organ} .") == ("none .", None)


def test_a_lesion_in_the_body_beside_an_organ_is_not_the_organs() -> None:
    """Grounding counts the body outline as a structure; the segments do not."""
    from tomoscribe.model.api import Encoded

    scribe = Scribe.load(None)
    y = np.ones((20, 40, 40), np.uint8)  # body
    y[2:18, 2:18, 2:18] = 4  # liver
    y[2:18, 22:38, 22:30] = 5  # spleen
    y[8:12, 8:12, 8:12] = 8  # a lesion inside the liver
    y[8:12, 26:30, 30:34] = 8  # a lesion in the body, touching the spleen on one face
    vol = Volume(np.zeros(y.shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), [
        SliceRef(f"2.25.{k}", "1.2.840.10008.5.1.4.1.1.2") for k in range(y.shape[0])])
    enc = Encoded(vol, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1),
                  extra={"refined": y})
    assert scribe.lesioned_organs(enc) == {"liver"}
    comps, owners = scribe._refined_components(enc)
    assert sorted(owners.values()) == ["liver", "spleen"]
    # each component's grounding, the body named, on the segments' own labelling
    same, grounded = scribe.grounded_components(enc)
    assert same is comps
    assert {grounded[int(comps[9, 9, 9])], grounded[int(comps[9, 27, 31])]} == {"liver", "body"}
    assert grounded[int(comps[9, 27, 31])] == "body"


def test_a_lesion_ringed_by_body_inside_an_organ_is_the_organs() -> None:
    """The refiner's partial-volume rim of "body" around a liver lesion does not hide it."""
    from tomoscribe.model.api import Encoded

    scribe = Scribe.load(None)
    y = np.ones((30, 40, 40), np.uint8)  # body
    y[2:28, 2:38, 2:38] = 4  # liver
    y[10:20, 13:27, 13:27] = 1  # a rim of body, one voxel thick (as on seed 2000006) ...
    y[11:19, 14:26, 14:26] = 8  # ... around a lesion well inside the liver
    vol = Volume(np.zeros(y.shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), [
        SliceRef(f"2.25.{k}", "1.2.840.10008.5.1.4.1.1.2") for k in range(y.shape[0])])
    enc = Encoded(vol, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1),
                  extra={"refined": y})
    assert scribe.lesioned_organs(enc) == {"liver"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_labelling_gives_both_ownership_rules(seed: int) -> None:
    """The cached single labelling equals two separate ones (2 voxels, no body / 4, body)."""
    from tomoscribe.model.api import Encoded
    from tomoscribe.model.refine import BODY_CLASS, _min_lesion_voxels, report_lesions
    from tomoscribe.model.scribe import GROUND_RING
    from tomoscribe.model.segtoken import lesion_owners

    scribe = Scribe.load(None)
    rng = np.random.default_rng(seed)
    y = np.zeros((24, 48, 48), np.uint8)
    y[2:22, 2:46, 2:46] = BODY_CLASS
    organs = [c for c in scribe.organ_names if c != BODY_CLASS]
    for organ in organs[:4]:  # organs as boxes, lesions as blobs scattered over them all
        z, r, c = rng.integers(2, 14), rng.integers(2, 30), rng.integers(2, 30)
        y[z:z + 8, r:r + 14, c:c + 14] = organ
    blobs = rng.random(y.shape) > 0.997  # specks, under the size floor
    for _ in range(60):  # and lesions of 1-4 voxels a side, inside organs, at edges, in the body
        z, r, c = rng.integers(2, 20), rng.integers(2, 44), rng.integers(2, 44)
        n = int(rng.integers(1, 5))
        blobs[z:z + n, r:r + n, c:c + n] = True
    y[blobs & (y > 0)] = scribe.cfg.lesion_class
    vol = Volume(np.zeros(y.shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), [
        SliceRef(f"2.25.{k}", "1.2.840.10008.5.1.4.1.1.2") for k in range(y.shape[0])])
    enc = Encoded(vol, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1),
                  extra={"refined": y})
    voxel_ml = 0.008
    ref_comps, ref_owner = report_lesions(y, scribe.cfg.lesion_class, organs, voxel_ml)
    _c, ref_body = lesion_owners(y, scribe.cfg.lesion_class, list(scribe.organ_names),
                                 ring=GROUND_RING, min_voxels=_min_lesion_voxels(voxel_ml))
    comps, owners = scribe._refined_components(enc)
    assert owners == {c: scribe.organ_names[o] for c, o in ref_owner.items()}
    assert len(owners) >= 5  # the case exercises something
    assert any(ref_body[c] == BODY_CLASS for c in ref_owner)  # the two rules disagree somewhere
    for c in owners:
        assert np.array_equal(comps == c, ref_comps == c)
    expect = {scribe.organ_names[o] for o in ref_body.values() if o != BODY_CLASS}
    assert scribe.lesioned_organs(enc) == expect


@pytest.mark.parametrize("perm", [(0, 1, 2), (1, 0, 2), (2, 1, 0)])
@pytest.mark.parametrize("flip", [False, True])
def test_reorientation_is_exactly_undone(perm: tuple[int, int, int], flip: bool) -> None:
    ph = make_phantom(4, shape=(20, 40, 40))
    hu, labels, aff = render_acquisition(ph)
    # present the same data as if acquired in another orientation
    src_hu = np.transpose(hu, perm)
    src_lab = np.transpose(labels, perm)
    src_aff = np.eye(4)
    src_aff[:3, :3] = aff[:3, :3][:, list(perm)]
    src_aff[:3, 3] = aff[:3, 3]
    if flip:
        src_hu, src_lab = src_hu[::-1], src_lab[::-1]
        n = src_hu.shape[0] - 1
        src_aff[:3, 3] = src_aff[:3, 3] + n * src_aff[:3, 0]
        src_aff[:3, 0] = -src_aff[:3, 0]
    p, f = canonical_orientation(src_aff)
    x, grid = prepare(np.ascontiguousarray(src_hu), src_aff, (20, 40, 40))
    x0, _grid0 = prepare(hu, aff, (20, 40, 40))
    assert torch.allclose(x, x0, atol=1e-5), (p, f)
    on_model = labels_to_model_grid(np.ascontiguousarray(src_lab), grid)
    back = grid.to_source_labels(on_model)
    assert back.shape == src_lab.shape
    assert (back == src_lab).mean() > 0.97


def test_make_sample_shapes() -> None:
    s = make_sample(2, (16, 32, 32))
    assert s["x"].shape == (2, 16, 32, 32)  # type: ignore[union-attr]
    assert s["y"].shape == (16, 32, 32)  # type: ignore[union-attr]


def _volume(seed: int, shape: tuple[int, int, int]) -> Volume:
    ph = make_phantom(seed, lesion_probability=1.0, shape=shape)
    hu, _labels, aff = render_acquisition(ph)
    slices = [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2") for k in range(shape[0])]
    return Volume(hu, aff, slices)


def test_scribe_save_load_encode_generate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ScribeNet(SMALL)
    save_model(net, tmp_path, {"version": "9.9"})
    scribe = Scribe.load(tmp_path)
    assert scribe.version == "9.9"
    vol = _volume(1, (24, 48, 48))
    enc = scribe.encode(vol)
    assert enc.seg_logits.shape[2:] == SMALL.model_shape
    report = scribe.generate(enc, ["is there a lesion in the liver ?"])
    assert report.label_map.shape == vol.shape
    assert report.slice_scores.shape == (24,)
    assert abs(float(report.slice_scores.sum()) - 1.0) < 1e-4
    assert len(report.answers) == 1
    for f in report.findings:
        assert f.key_slices and all(0 <= k < 24 for k in f.key_slices)
    labels = {s.label for s in report.segments}
    assert set(np.unique(report.label_map)) - {0} <= labels


def test_a_model_trained_here_gets_a_version_of_its_own(tmp_path: Path) -> None:
    """Without ``--version``: the package's version + a hash of the weights, never the
    shipped model's (output UIDs and job records derive from the version)."""
    torch.manual_seed(0)
    net = ScribeNet(SMALL)
    save_model(net, tmp_path / "a", {"version": None})
    save_model(net, tmp_path / "b", {})
    version = Scribe.load(tmp_path / "a").version
    assert version.startswith(f"{tomoscribe.__version__}+local.") and len(version) == len(
        tomoscribe.__version__) + len("+local.") + 10
    assert Scribe.load(tmp_path / "b").version == version  # same weights, same version
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    save_model(net, tmp_path / "c", {})
    assert Scribe.load(tmp_path / "c").version != version
    save_model(net, tmp_path / "d", {"version": "0.6.0"})  # a release names its version
    assert Scribe.load(tmp_path / "d").version == "0.6.0"


def test_the_seg_stage_trains_the_segmentation_head_alone(tmp_path: Path) -> None:
    """``--stage seg --init M``: the segmentation head learns; every other tensor of M (the
    encoder's batch-norm statistics included: it runs as at inference) is what was saved,
    and ``config.json`` keeps M's record with the run added to its history."""
    import json

    from tomoscribe.train import main as train_main

    init = Path(tomoscribe.__file__).parent / "weights-head-mr"
    out = tmp_path / "seg"
    assert train_main(["--stage", "seg", "--init", str(init), "--out", str(out),
                       "--checkpoint", str(tmp_path / "ck"), "--samples", "2", "--steps", "2",
                       "--batch", "1", "--workers", "1", "--lr", "1e-2",
                       "--cache", str(tmp_path / "samples.pt")]) == 0
    old = torch.load(init / "model.pt", map_location="cpu", weights_only=True)
    new = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert new.keys() == old.keys()
    others = [k for k in old if not k.startswith("seg.")]
    assert any(k.startswith("encoder.") and k.endswith("running_mean") for k in others)
    assert all(torch.equal(old[k], new[k]) for k in others)
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("seg."))
    before = json.loads((init / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert after["scope"] == before["scope"]
    assert all(after["net"][k] == v for k, v in before["net"].items())  # newer keys added
    assert after["history"][:-1] == before["history"]
    assert after["history"][-1]["stage"] == "seg" and after["seg_steps"] == 2
    assert after["version"] != before["version"]  # a local version of its own
    with pytest.raises(SystemExit):  # nothing to start from
        train_main(["--stage", "seg", "--out", str(tmp_path / "x")])


def test_scribe_load_refuses_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"lacks config\.json"):
        Scribe.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.pt").write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot load model"):
        Scribe.load(tmp_path)


def test_widened_head_starts_from_the_narrow_model() -> None:
    from tomoscribe.train import load_overlapping

    torch.manual_seed(0)
    narrow = ScribeNet(NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16),
                                 head_channels=8))
    wide = ScribeNet(NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16),
                               head_channels=12))
    load_overlapping(wide, narrow.state_dict())
    w_n, w_w = narrow.seg.out.weight, wide.seg.out.weight
    assert w_w.shape[1] == 12
    assert torch.equal(w_w[:, :8], w_n)
    assert torch.equal(wide.encoder.stem[0].weight, narrow.encoder.stem[0].weight)


def test_old_model_folders_keep_their_head_width() -> None:
    cfg = NetConfig.from_dict({"model_shape": [16, 32, 32]})
    assert cfg.head_channels == 8
    assert NetConfig().head_channels > NetConfig().num_classes


def test_pooled_path_equals_the_direct_encoding() -> None:
    """Stage-2 training caches the pooled features: the tokens must be the same."""
    torch.manual_seed(0)
    net = ScribeNet(SMALL).eval()
    x = torch.rand(2, 2, *SMALL.model_shape)
    with torch.no_grad():
        tokens, logits = net.encode(x)
        pooled, logits2 = net.encode_pooled(x)
        again = net.tokens_from_pooled(pooled)
    assert torch.allclose(tokens, again, atol=1e-6)
    assert torch.equal(logits, logits2)
    assert pooled[2].shape == (2, len(SMALL.organ_classes), 2 * SMALL.channels[0] + 3)


def test_tokenizer_is_a_tokenizers_word_level_that_round_trips(tmp_path: Path) -> None:
    import re

    from tokenizers import Tokenizer

    tok = WordTokenizer()
    assert isinstance(tok.backend, Tokenizer)
    texts = ["<report> liver : one hypodense lesion . impression : liver lesion .",
             "Is there a LESION in the liver?", "how many lesions, in 3 organs?!",
             "what's the largest-lesion", "unknown words here", "café ünïcode"]
    for text in texts:  # the same ids as the plain word rule
        words = re.findall(r"<[a-z]+>|[a-z]+|[.,:?]", text.lower())
        assert tok.encode(text) == [tok.index.get(w, tok.unk_id) for w in words]
    assert tok.encode("unknown")[0] == tok.unk_id
    tok.save(tmp_path / "tokenizer.json")
    again = WordTokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.vocab == tok.vocab
    assert all(again.encode(t) == tok.encode(t) for t in texts)


def test_scribe_reads_its_tokenizer_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    net = ScribeNet(SMALL)
    save_model(net, tmp_path, {"version": "1"})
    assert (tmp_path / "tokenizer.json").is_file()
    assert Scribe.load(tmp_path).tok.vocab == SMALL.vocab
    WordTokenizer(("<pad>", "<bos>", "<eos>", "<unk>", "other")).save(tmp_path / "tokenizer.json")
    with pytest.raises(ModelError, match=r"tokenizer\.json does not match"):
        Scribe.load(tmp_path)


def test_every_template_answer_follows_the_lesion_counts() -> None:
    """Ground-truth answers: 'is there a lesion' was once answered like 'is it normal'."""
    from collections import Counter

    from tomoscribe.model.text import QUESTION_TEMPLATES, answer_for

    expected = {  # (template, lesions in the liver) -> answer
        ("is there a lesion in the {organ} ?", 0): "no",
        ("is there a lesion in the {organ} ?", 2): "yes",
        ("does the {organ} contain a {kind} ?", 0): "no",
        ("does the {organ} contain a {kind} ?", 1): "yes",
        ("how many lesions are in the {organ} ?", 2): "two",
        ("is the {organ} normal ?", 0): "yes",
        ("is the {organ} normal ?", 1): "no",
        ("which organ has a lesion ?", 0): "none",
        ("which organ has a lesion ?", 1): "liver",
        ("are there any focal findings ?", 0): "no",
        ("are there any focal findings ?", 1): "yes",
    }
    assert {t for t, _n in expected} == set(QUESTION_TEMPLATES)
    for (template, n), answer in expected.items():
        counts = Counter({"liver": n}) if n else Counter()
        assert answer_for(template, "liver", counts) == answer, (template, n)


def test_templated_questions_are_answered_as_the_report_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The answers never contradict the report; where the model asked alone did, it is said."""
    scribe = Scribe.load(None)
    ph = next(p for p in map(make_phantom, range(2_000_000, 2_000_020))
              if {les.organ for les in p.lesions} == {"liver"})
    hu, _labels, aff = render_acquisition(ph)
    enc = scribe.encode(Volume(hu, aff, [SliceRef(f"2.25.{k}", "1.2.840.10008.5.1.4.1.1.2")
                                         for k in range(hu.shape[0])]))
    assert "liver" in scribe.lesioned_organs(enc)  # the report's liver finding is kept
    # typed without its closing mark, a question is the one the model was trained on
    for q in ("is the spleen normal", "is there a lesion in the liver"):
        assert scribe.ask(enc, q)[0] == scribe.ask(enc, q + " ?")[0]
    report_text = "liver : one hypodense lesion . impression : liver lesion ."
    monkeypatch.setattr(Scribe, "write_text", lambda self, tokens: report_text)
    monkeypatch.setattr(Scribe, "answer", lambda self, tokens, question: "yes .")
    questions = ["Is there a lesion in the liver?", "is there a lesion in the spleen ?",
                 "how many lesions are in the liver ?", "which organ has a lesion ?",
                 "what is in the liver ?"]
    got = {a.question: a for a in scribe.generate(enc, questions).answers}
    agree = got["Is there a lesion in the liver?"]
    assert (agree.answer, agree.model_answer) == ("Yes", "Yes.")
    assert agree.key_slices  # still the liver lesion's slices
    contradicted = got["is there a lesion in the spleen ?"]
    assert contradicted.answer.startswith("No. (Asked this alone, the model answered: yes;")
    assert contradicted.model_answer == "Yes."
    assert got["how many lesions are in the liver ?"].answer.startswith("One. (")
    assert got["which organ has a lesion ?"].answer.startswith("Liver. (")
    free = got["what is in the liver ?"]  # no template: the model's own answer
    assert (free.answer, free.model_answer) == ("Yes.", None)

    # in other words, the same question: the model is asked it in the templates' words
    asked: list[str] = []

    def answer(self: Scribe, tokens: torch.Tensor, question: str) -> str:
        asked.append(question)
        return "yes ."

    monkeypatch.setattr(Scribe, "answer", answer)
    other, normal = scribe.generate(enc, ["Does the spleen have a lesion?",
                                          "Is the study normal?"]).answers
    assert asked == ["is there a lesion in the spleen ?", "are there any focal findings ?"]
    assert other.answer.startswith("No. (Asked this alone, the model answered: yes;")
    # the opposite of "are there any focal findings ?", for the report and the model alike
    assert (normal.answer, normal.model_answer) == ("No", "No.")
    # and a "segment" request, in the referring templates' words
    requests: list[str] = []

    def refer(self: Scribe, encoded: object, question: str, **kw: object
              ) -> tuple[str, np.ndarray | None]:
        requests.append(question)
        return "none .", None

    monkeypatch.setattr(Scribe, "refer", refer)
    answers = scribe.generate(enc, ["Segment liver", "segment the liver lesions"]).answers
    assert requests == ["segment the liver .", "segment the lesions in the liver ."]
    assert [a.question for a in answers] == ["Segment liver", "segment the liver lesions"]

    # a text that is no report in the grammar settles nothing: the model answers
    monkeypatch.setattr(Scribe, "write_text", lambda self, tokens: "liver liver")
    for a in scribe.generate(enc, questions).answers:
        assert (a.answer, a.model_answer) == ("Yes.", None)
