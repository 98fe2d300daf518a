"""The 3D ViT baseline encoder: DCFormer's contract, its size, and the encoder benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tomoscribe.model.dcformer import DCFormerEncoder
from tomoscribe.model.network import NetConfig, ScribeNet, build_encoder
from tomoscribe.model.vit3d import ViT3DEncoder, sincos_position_codes


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_vit_gives_dcformers_stage_shapes_at_about_its_size() -> None:
    cfg = NetConfig()
    vit, dcf = build_encoder(NetConfig(encoder="vit")), build_encoder(cfg)
    assert isinstance(vit, ViT3DEncoder) and isinstance(dcf, DCFormerEncoder)
    x = torch.randn(2, cfg.in_channels, 16, 32, 32)
    small = ViT3DEncoder(cfg.in_channels, cfg.channels, (16, 32, 32))
    assert [f.shape for f in small(x)] == [f.shape for f in dcf(x)]
    # "a 3D ViT of equal parameter count": within 5% of the default DCFormer
    assert abs(_params(vit) / _params(dcf) - 1) < 0.05


def test_vit_every_stage_learns_and_the_grid_is_checked() -> None:
    enc = ViT3DEncoder(2, (4, 8, 8, 8), (16, 32, 32), width=24, depth=4, heads=2)
    assert enc.read_after == (1, 2, 3, 4)
    feats = enc(torch.randn(1, 2, 16, 32, 32))
    sum(f.mean() for f in feats).backward()  # type: ignore[union-attr]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    with pytest.raises(ValueError, match="input grid"):
        enc(torch.randn(1, 2, 16, 32, 48))
    with pytest.raises(ValueError, match="must divide by 16"):
        ViT3DEncoder(2, (4, 8, 8, 8), (20, 32, 32))


def test_position_codes_tell_every_token_apart() -> None:
    codes = sincos_position_codes((3, 4, 5), 32)
    assert codes.shape == (1, 60, 32)
    assert torch.cdist(codes[0], codes[0]).add(torch.eye(60)).min() > 0


def test_a_vit_model_saves_loads_and_runs(tmp_path: Path) -> None:
    from tomoscribe.train import save_model

    cfg = NetConfig(model_shape=(16, 32, 32), encoder="vit")
    net = ScribeNet(cfg)
    save_model(net, tmp_path, {"version": "0.0.1-test"})
    back = NetConfig.from_dict(json.loads((tmp_path / "config.json").read_text())["net"])
    assert back.encoder == "vit" and back.vit_width == cfg.vit_width
    tokens, logits = ScribeNet(back).encode(torch.randn(1, 2, 16, 32, 32))
    assert logits.shape == (1, cfg.num_classes, 16, 32, 32) and tokens.ndim == 3
    # a folder written before the setting existed is DCFormer's
    old = json.loads((tmp_path / "config.json").read_text())["net"]
    del old["encoder"]
    assert NetConfig.from_dict(old).encoder == "dcformer"
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder(NetConfig(encoder="resnet"))


def test_encoder_benchmark_runs_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import encoders  # benchmarks/encoders.py

    out = tmp_path / "enc.json"
    assert encoders.main(["--steps", "2", "--batch", "2", "--samples", "3", "--n", "2",
                          "--workers", "1", "--shape", "16", "32", "32",
                          "--cache", str(tmp_path / "train.pt"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"dcformer", "vit"}
    for row in result["rows"].values():
        assert row["encoder_parameters"] > 0 and row["encoder_gflop"] > 0
        assert set(row["dice"]) >= {"liver", "spleen", "lesion"}
        assert all(0.0 <= v <= 1.0 for v in row["dice"].values() if v == v)
    printed = capsys.readouterr().out
    assert "ViT / DCFormer: parameters" in printed
    # --score: a trained model folder's coarse segmentation, nothing trained
    from tomoscribe.train import save_model

    model = tmp_path / "model"
    save_model(ScribeNet(NetConfig(model_shape=(16, 32, 32), encoder="vit")), model,
               {"version": "0.0.1-test"})
    scored = tmp_path / "scored.json"
    assert encoders.main(["--score", str(model), "--n", "2", "--workers", "1",
                          "--cache", str(tmp_path / "train.pt"), "--json", str(scored)]) == 0
    row = json.loads(scored.read_text())["scored"][str(model)]
    assert row["encoder_parameters"] > 0 and set(row["dice"]) >= {"liver", "lesion"}
    assert (tmp_path / "val-2-16x32x32.pt").is_file()
    assert "before the refiner" in capsys.readouterr().out


def test_encoder_cost_counts_the_vits_attention() -> None:
    import encoders  # benchmarks/encoders.py

    cfg = NetConfig(encoder="vit")
    _params_n, gflop = encoders.encoder_cost(cfg)
    tokens = 6 * 12 * 12
    attention = cfg.vit_depth * 2 * 2 * tokens * tokens * cfg.vit_width / 1e9  # QK^T and AV
    assert gflop > attention  # the fused kernels' work is counted too


@pytest.mark.parametrize("encoder", ["vit", "dcformer"])
def test_an_encoder_swap_keeps_everything_but_the_encoder(tmp_path: Path, encoder: str) -> None:
    """``--init M --encoder E --fresh-encoder``: the encoder starts from new weights, the
    segmentation head, refiner and language side continue M (at learning rate 0 nothing
    moves but batch-norm statistics, so what was loaded is what was saved)."""
    from tomoscribe.scope import DEFAULT_MODEL_DIR
    from tomoscribe.train import main as train_main

    out = tmp_path / "swap"
    small = ["--samples", "2", "--steps", "1", "--batch", "1", "--workers", "1",
             "--cache", str(tmp_path / "samples.pt"), "--lm-start", "1000"]
    assert train_main(["--init", str(DEFAULT_MODEL_DIR), "--encoder", encoder, "--fresh-encoder",
                       "--out", str(out), "--checkpoint", str(tmp_path / "ck"), "--lr", "0",
                       *small]) == 0
    assert json.loads((out / "config.json").read_text())["net"]["encoder"] == encoder
    old = torch.load(DEFAULT_MODEL_DIR / "model.pt", map_location="cpu", weights_only=True)
    new = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    kept = [k for k in old if not k.startswith("encoder.") and not k.endswith(stats)]
    assert any(k.startswith("seg.") for k in kept) and any(k.startswith("refine.") for k in kept)
    assert all(torch.equal(old[k].float(), new[k].float()) for k in kept)
    enc_old = {k: v for k, v in old.items() if k.startswith("encoder.")}
    enc_new = {k: v for k, v in new.items() if k.startswith("encoder.")}
    if encoder == "dcformer":  # same names and shapes, new values
        assert enc_new.keys() == enc_old.keys()
    assert not any(k in enc_old and enc_old[k].shape == v.shape and torch.equal(enc_old[k], v)
                   for k, v in enc_new.items() if v.numel() > 1)
    # without --init, --encoder picks the encoder of a model from new weights, as before
    scratch = tmp_path / "scratch"
    assert train_main(["--encoder", encoder, "--out", str(scratch), "--checkpoint",
                       str(tmp_path / "ck2"), *small]) == 0
    assert json.loads((scratch / "config.json").read_text())["net"]["encoder"] == encoder
    with pytest.raises(SystemExit):  # nothing to keep
        train_main(["--fresh-encoder", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):  # the other stages freeze the encoder
        train_main(["--init", str(DEFAULT_MODEL_DIR), "--fresh-encoder", "--stage", "language",
                    "--out", str(tmp_path / "x")])


def test_the_accuracy_benchmark_counts_a_vit_encoders_attention(tmp_path: Path) -> None:
    """``accuracy.py``'s per-module GFLOP of a ViT model's encoder is ``encoders.py``'s
    (the fused inference kernels, which the counter cannot see into, are turned off)."""
    import accuracy  # benchmarks/accuracy.py
    import encoders

    from tomoscribe.model.scribe import Scribe
    from tomoscribe.train import save_model
    from tomoscribe.volume import SliceRef, Volume

    torch.manual_seed(0)
    cfg = NetConfig(encoder="vit")
    save_model(ScribeNet(cfg), tmp_path, {"version": "0.0.1-test"})
    hu = np.full((40, 64, 64), -1000.0, dtype=np.float32)
    hu[8:32, 12:52, 12:52] = 40.0
    aff = np.diag([2.5, 5.0, 5.0, 1.0])
    vol = Volume(hu, aff, [SliceRef(f"2.25.1.{k}", "1.2.840.10008.5.1.4.1.1.2")
                           for k in range(40)])
    fastpath = torch.backends.mha.get_fastpath_enabled()
    flops = accuracy._encode_flops(Scribe.load(tmp_path), vol)
    assert flops["encoder"] == pytest.approx(encoders.encoder_cost(cfg)[1], rel=1e-6)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # put back
