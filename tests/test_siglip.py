"""SigLIP image-report alignment: loss, recall, the training stage, the Scribe API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tomoscribe.errors import ModelError
from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.scribe import Scribe
from tomoscribe.model.siglip import AlignmentHead, recall_at
from tomoscribe.model.text import WordTokenizer
from tomoscribe.train import save_model

SMALL = NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16), align_dim=16)


def test_loss_prefers_matching_pairs_and_counts_equal_texts_as_positives() -> None:
    torch.manual_seed(0)
    head = AlignmentHead(8, 8, 5, 2, 20, dim=4)
    img = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    same = torch.eye(3, dtype=torch.bool)
    assert head.loss(img, img, same) < head.loss(img, img.roll(1, 0), same)
    both = same.clone()
    both[0, 1] = both[1, 0] = True  # studies 0 and 1 share a report text
    twin = img.clone()
    twin[1] = img[0]
    assert head.loss(twin, twin, both) < head.loss(twin, twin, same)


def test_recall_at_k_over_a_gallery() -> None:
    gallery = torch.eye(3)
    image = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8]])
    truth = torch.tensor([0, 0, 2])
    r = recall_at(image, gallery, truth, (1, 2))
    assert r[1] == pytest.approx(2 / 3) and r[2] == pytest.approx(1.0)


def test_align_stage_trains_the_head_only(tmp_path: Path) -> None:
    """A few steps of the stage's loss on fixed features separate two report texts."""
    torch.manual_seed(0)
    net = ScribeNet(SMALL)
    assert net.align is not None
    tok = WordTokenizer()
    low, high = torch.randn(8, 4, 16), torch.randn(8, 2, 16)
    regions = torch.randn(8, 7, 2 * 8 + 3)
    texts = ["liver : one hypodense lesion .", "no focal abnormality ."] * 4
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(tok.encode(t)) for t in texts],
                                          batch_first=True)
    regions[::2] += 2.0  # the "lesion" studies look different
    same = torch.tensor([[a == b for b in texts] for a in texts])
    opt = torch.optim.AdamW(net.align.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = net.align.loss(net.align.embed_image(low, high, regions), net.align.embed_text(ids),
                              same)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    gallery = net.align.embed_text(ids[:2]).detach()
    r = recall_at(net.align.embed_image(low, high, regions).detach(), gallery,
                  torch.tensor([0, 1] * 4), (1,))
    assert r[1] == 1.0


def test_scribe_embeddings(tmp_path: Path) -> None:
    from tomoscribe.phantom import make_phantom, render_acquisition
    from tomoscribe.volume import SliceRef, Volume

    torch.manual_seed(0)
    save_model(ScribeNet(SMALL), tmp_path / "m", {"version": "9.9"})
    scribe = Scribe.load(tmp_path / "m")
    hu, _l, aff = render_acquisition(make_phantom(2, shape=(16, 32, 32)))
    vol = Volume(hu, aff, [SliceRef(f"1.2.{k}", "1.2.840.10008.5.1.4.1.1.2") for k in range(16)])
    img = scribe.image_embedding(scribe.encode(vol))
    txt = scribe.report_embedding("no focal abnormality .")
    assert img.shape == txt.shape == (16,)
    assert abs(float((img**2).sum()) - 1) < 1e-5
    save_model(ScribeNet(NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16))),
               tmp_path / "plain", {"version": "9.9"})
    plain = Scribe.load(tmp_path / "plain")
    with pytest.raises(ModelError, match="no image-report alignment head"):
        plain.report_embedding("x")


def test_vocabulary_does_not_depend_on_the_hash_seed() -> None:
    """Word ids must be the same in every process (a set's order is not)."""
    code = "from tomoscribe.model.text import VOCAB; print(' '.join(VOCAB))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin"},
                           cwd=Path(__file__).resolve().parent.parent, check=True).stdout
            for seed in range(1, 6)}
    assert len(outs) == 1


def test_shipped_model_uses_the_builtin_vocabulary() -> None:
    """Its word ids are the built-in ones (words added since it was trained come last)."""
    from tomoscribe.model.scribe import DEFAULT_MODEL_DIR
    from tomoscribe.model.text import ADDED_WORDS, VOCAB

    vocab = Scribe.load(DEFAULT_MODEL_DIR).cfg.vocab
    assert vocab in (VOCAB, VOCAB[: -len(ADDED_WORDS)])


# -- SigLIP pretraining of the encoder (tomoscribe.train_siglip) ------------------------


def test_encoder_alignment_shapes_and_learning() -> None:
    """Shapes, and the loss falls on a fixed batch whose reports differ by the image."""
    from tomoscribe.model.network import NetConfig
    from tomoscribe.train_siglip import EncoderAlignment

    torch.manual_seed(0)
    cfg = NetConfig(model_shape=(16, 32, 32))
    model = EncoderAlignment(cfg, vocab=20, dim=16)
    x = torch.randn(4, 2, 16, 32, 32)
    x[2:, :, 4:12, 8:24, 8:24] += 3.0  # two "lesion" volumes
    ids = torch.tensor([[4, 5, 0], [4, 5, 0], [6, 7, 8], [6, 7, 8]])
    same = torch.tensor([[i // 2 == j // 2 for j in range(4)] for i in range(4)])
    image, text = model.embed_volume(x), model.embed_text(ids)
    assert image.shape == text.shape == (4, 16)
    assert torch.allclose(image.norm(dim=-1), torch.ones(4), atol=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = last = 0.0
    for step in range(30):
        loss = model.loss(model.embed_volume(x), model.embed_text(ids), same)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first, last = (loss.item(), last) if step == 0 else (first, loss.item())
    assert last < 0.5 * first
    # matched pairs now score above mismatched ones
    with torch.no_grad():
        sim = model.embed_volume(x) @ model.embed_text(ids).T
    assert bool((sim[same].min() > sim[~same].max()).item())


def test_pretraining_runs_small_and_feeds_the_encoder_benchmark(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """train_siglip end to end on 6 phantoms; its encoder.pt starts a segmentation row."""
    import json

    import encoders  # benchmarks/encoders.py

    from tomoscribe.train_siglip import main as pretrain_main

    out = tmp_path / "siglip"
    shape = ["16", "32", "32"]
    assert pretrain_main(["--out", str(out), "--steps", "2", "--batch", "4", "--samples", "6",
                          "--val", "4", "--workers", "1", "--shape", *shape,
                          "--cache", str(tmp_path / "train.pt")]) == 0
    result = json.loads((out / "siglip.json").read_text())
    assert set(result["retrieval"]) == {"new weights", "pretrained", "frequency baseline"}
    assert all(0.0 <= r["1"] <= r["5"] <= 1.0 for r in result["retrieval"].values())
    assert "R@1" in capsys.readouterr().out
    bench = tmp_path / "enc.json"
    assert encoders.main(["--steps", "1", "--batch", "2", "--samples", "6", "--n", "2",
                          "--workers", "1", "--shape", *shape, "--rows", "dcformer",
                          "dcformer-siglip", "--siglip", str(out / "encoder.pt"),
                          "--cache", str(tmp_path / "train.pt"), "--json", str(bench)]) == 0
    rows = json.loads(bench.read_text())["rows"]
    assert set(rows) == {"dcformer", "dcformer-siglip"}
