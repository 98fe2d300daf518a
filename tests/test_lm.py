"""A brought language model: any local ``transformers`` causal LM in place of the GPT-2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from brought_lm import make_brought_lm

import tomoscribe
from tomoscribe.errors import ModelError
from tomoscribe.model.lm import LM_FOLDER, LMTokenizer, lm_limits, load_lm
from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.scribe import Scribe
from tomoscribe.model.text import ANSWER, QUESTION, REPORT, VOCAB, findings_to_text
from tomoscribe.phantom import make_phantom, render_acquisition
from tomoscribe.scope import DEFAULT_MODEL_DIR
from tomoscribe.train import local_version, pad_rows, qa_loss_mask
from tomoscribe.train import main as train_main
from tomoscribe.volume import SliceRef, Volume

WIDTH = 32


@pytest.fixture(scope="module")
def brought(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new-weights Llama (width 32, one layer) with a 400-token generic BPE tokenizer."""
    return make_brought_lm(tmp_path_factory.mktemp("llama"), width=WIDTH, layers=1, heads=2,
                           vocab=400)


def test_the_brought_tokenizer_round_trips_the_grammar(brought: Path) -> None:
    lm, tok = load_lm(brought)
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert lm_limits(brought) == (WIDTH, 256)
    # the markers are single new tokens; the LM's embeddings grew to match
    assert {REPORT, QUESTION, ANSWER, "<seg>"} <= set(tok.index)
    assert lm.get_input_embeddings().weight.shape[0] == len(tok)
    report = findings_to_text([("liver", "hypodense lesion"), ("right kidney", "cyst"),
                               ("right kidney", "cyst")])
    ids = tok.encode(f"{REPORT} {report}")
    assert ids[0] == tok.index[REPORT] and 0 not in ids
    assert len(ids) > len(report.split()) + 1  # subwords: more tokens than words
    assert tok.decode([*ids[1:], tok.eos_id, 7, 8]) == report  # stops at the end marker
    qa = tok.encode(f"{QUESTION} is there a lesion in the liver ? {ANSWER} yes")
    assert qa.count(tok.index[ANSWER]) == 1
    assert tok.decode(qa[qa.index(tok.index[ANSWER]) + 1:]) == "yes"
    # upper case and stray symbols do not reach the padding id
    assert 0 not in tok.encode("Is there a LESION in the liver?!")


def test_a_tokenizer_that_pads_a_grammar_word_is_refused() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["liver", "<|end|>", *(w for w in VOCAB if w not in ("liver",))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")
    with pytest.raises(ModelError, match=r"id 0.*'liver'"):
        LMTokenizer(hf)


def test_a_tokenizer_without_an_end_token_gets_one() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<nothing>", *(w for w in VOCAB if w != "<eos>")]  # the markers are there
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert hf.eos_token_id is None
    tok = LMTokenizer(hf)
    assert tok.eos_id == len(words) and len(tok) == len(words) + 1
    ids = tok.encode("liver : one cyst .")
    assert tok.decode([*ids, tok.eos_id, *ids]) == "liver : one cyst ."


def test_a_brought_lm_trains_through_inputs_embeds(brought: Path) -> None:
    torch.manual_seed(0)
    cfg = NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16), width=WIDTH,
                    lm=str(brought), max_positions=256)
    net = ScribeNet(cfg)
    tok = net.lm_tokenizer
    assert tok is not None
    x = torch.randn(2, 2, 16, 32, 32)
    texts = [f"{REPORT} {findings_to_text([])}",
             f"{REPORT} {findings_to_text([('spleen', 'hypodense lesion')])}"]
    ids = pad_rows([tok.encode(t) + [tok.eos_id] for t in texts])
    qa = pad_rows([tok.encode(f"{QUESTION} is the spleen normal ? {ANSWER} no") + [tok.eos_id]])
    assert qa_loss_mask(qa, tok.index[ANSWER]).gt(0).sum() == len(tok.encode(" no")) + 1
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        tokens, _logits = net.encode(x)
        loss = net.lm_loss(tokens, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # a width that does not match the LM is refused in one line
    with pytest.raises(ModelError, match="32 wide"):
        ScribeNet(NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16), width=64,
                            lm=str(brought)))


def _volume(seed: int) -> Volume:
    hu, _labels, aff = render_acquisition(make_phantom(seed, lesion_probability=1.0))
    return Volume(hu, aff, [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2")
                            for k in range(hu.shape[0])])


def test_language_stage_with_a_brought_lm_saves_a_model_scribe_loads(
        brought: Path, tmp_path: Path) -> None:
    out = tmp_path / "with-llama"
    assert train_main(["--stage", "language", "--init", str(DEFAULT_MODEL_DIR), "--lm",
                       str(brought), "--out", str(out), "--checkpoint", str(tmp_path / "ck"),
                       "--samples", "3", "--steps", "3", "--batch", "2", "--workers", "1",
                       "--freeze-lm"]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["net"]["lm"] == LM_FOLDER and conf["net"]["width"] == WIDTH
    # not the shipped model's version: its outputs must not take the shipped model's UIDs
    assert conf["version"] == local_version(out)
    assert conf["version"].startswith(f"{tomoscribe.__version__}+local.")
    assert not conf["net"]["seg_token"]  # its decoder read the old LM's hidden states
    assert conf["history"][-1]["freeze_lm"] is True
    assert (out / LM_FOLDER / "config.json").is_file()
    # model.pt: the vision side of --init unchanged, no LM weights (they are in lm/)
    before = torch.load(DEFAULT_MODEL_DIR / "model.pt", weights_only=True)
    after = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.startswith("lm.") for k in after)
    for k in after:
        if k.split(".")[0] in ("encoder", "seg", "refine"):
            assert torch.equal(before[k], after[k]), k
    # --freeze-lm: the LM's layers are as brought; its input embeddings trained
    original, _tok = load_lm(brought)
    scribe = Scribe.load(out)
    saved = scribe.net.lm.state_dict()
    layers = [k for k in original.state_dict() if ".layers." in k]
    assert layers and all(torch.equal(original.state_dict()[k], saved[k]) for k in layers)

    assert isinstance(scribe.tok, LMTokenizer)
    assert scribe.report_max_new > 60 and scribe.answer_max_new > 8
    vol = _volume(4)
    enc = scribe.encode(vol)
    report = scribe.generate(enc, ["is there a lesion in the liver ?"])
    assert report.label_map.shape == vol.shape and len(report.answers) == 1
    assert isinstance(report.text, str)
    again = Scribe.load(out).generate(Scribe.load(out).encode(vol),
                                      ["is there a lesion in the liver ?"])
    assert again.text == report.text and again.answers[0].answer == report.answers[0].answer
    assert np.array_equal(again.label_map, report.label_map)

    # referring segmentation on top: <seg> is already one of the brought tokenizer's tokens
    from tomoscribe.train_segtoken import main as segtoken_main

    refer = tmp_path / "refer"
    assert segtoken_main(["--init", str(out), "--out", str(refer), "--checkpoint",
                          str(tmp_path / "ck"), "--samples", "3", "--steps", "2", "--batch", "2",
                          "--refer", "2", "--workers", "1"]) == 0
    conf = json.loads((refer / "config.json").read_text())
    assert conf["net"]["seg_token"] and conf["net"]["lm"] == LM_FOLDER
    assert conf["version"] == local_version(refer)
    assert conf["version"] != json.loads((out / "config.json").read_text())["version"]
    referring = Scribe.load(refer)
    assert referring.net.segtoken is not None
    text, mask = referring.refer(referring.encode(vol), "segment the liver .")
    assert isinstance(text, str) and (mask is None or mask.shape == vol.shape)


def test_a_model_folder_whose_lm_is_missing_is_refused_in_one_line(
        brought: Path, tmp_path: Path) -> None:
    from tomoscribe.train import save_model

    cfg = NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16), width=WIDTH,
                    lm=str(brought), max_positions=256)
    save_model(ScribeNet(cfg), tmp_path, {"version": "0.0.1"})
    assert Scribe.load(tmp_path).tok.index[REPORT] >= 400
    import shutil

    shutil.rmtree(tmp_path / LM_FOLDER)
    with pytest.raises(ModelError, match="cannot load") as err:
        Scribe.load(tmp_path)
    assert "\n" not in str(err.value)
