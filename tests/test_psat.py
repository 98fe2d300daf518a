"""PSAT: plane-slice views, identity start, shared axial features, training signal."""

from __future__ import annotations

from pathlib import Path

import torch

from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.psat import PlaneSliceFusion, evenly_spaced
from tomoscribe.model.scribe import Scribe
from tomoscribe.model.tgis import SliceEncoder2D
from tomoscribe.train import save_model


def test_evenly_spaced_covers_the_axis() -> None:
    assert evenly_spaced(48, 4).tolist() == [6, 18, 30, 42]
    assert evenly_spaced(3, 3).tolist() == [0, 1, 2]


def test_views_tag_plane_and_position() -> None:
    torch.manual_seed(0)
    fusion = PlaneSliceFusion(width=32, slices=4).eval()
    x = torch.rand(2, 2, 16, 24, 32)
    with torch.no_grad():
        views = fusion.views(x)
        assert views.shape == (2, 12, 32)
        # the same image content in another plane or position gives another token
        fusion.plane.data[1] += 1.0
        moved = fusion.views(x)
    assert torch.allclose(views[:, :4], moved[:, :4]) and torch.allclose(views[:, 8:], moved[:, 8:])
    assert not torch.allclose(views[:, 4:8], moved[:, 4:8])


def test_psat_starts_as_the_identity_and_then_learns() -> None:
    torch.manual_seed(0)
    fusion = PlaneSliceFusion(width=32, slices=4)
    tokens = torch.randn(2, 5, 32)
    x = torch.rand(2, 2, 16, 24, 32)
    assert torch.equal(fusion(tokens, x), tokens)
    target = torch.randn(2, 5, 32)
    opt = torch.optim.AdamW(fusion.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = ((fusion(tokens, x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_axial_features_are_reused() -> None:
    torch.manual_seed(0)
    enc = SliceEncoder2D(2).eval()
    fusion = PlaneSliceFusion(width=32, slices=4, encoder2d=enc).eval()
    x = torch.rand(1, 2, 16, 24, 32)
    with torch.no_grad():
        assert torch.allclose(fusion.views(x), fusion.views(x, enc(x)), atol=1e-5)


def test_network_with_tgis_and_psat_saves_loads_and_reports(tmp_path: Path) -> None:
    from tomoscribe.phantom import make_phantom, render_acquisition
    from tomoscribe.volume import SliceRef, Volume

    torch.manual_seed(0)
    cfg = NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16), slice_tokens=2,
                    psat_slices=4)
    net = ScribeNet(cfg)
    assert net.psat is not None and net.slices is not None
    assert net.psat.encoder2d is net.slices.encoder2d  # one 2D encoder for both
    save_model(net, tmp_path, {"version": "9.9"})
    scribe = Scribe.load(tmp_path)
    assert scribe.cfg.psat_slices == 4
    ph = make_phantom(3, lesion_probability=1.0, shape=(20, 40, 40))
    hu, _labels, aff = render_acquisition(ph)
    vol = Volume(hu, aff, [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2")
                           for k in range(20)])
    report = scribe.generate(scribe.encode(vol), ["is the liver normal ?"])
    assert report.answers and len(report.answers[0].key_slices) == 3
