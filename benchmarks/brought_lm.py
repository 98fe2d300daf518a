"""A stand-in for a causal LM someone brings: a small Llama with a generic BPE tokenizer.

No checkpoint can be downloaded here, so the "brought" language model of the
README's comparison and of the tests is made locally, and saved with
``save_pretrained`` as any checkpoint is:

* a ``transformers`` ``LlamaForCausalLM`` with new weights: another
  architecture than the built-in GPT-2 (rotary positions, RMSNorm, a gated
  MLP, no learned position table);
* a byte-level BPE tokenizer trained on generic English (the docstrings of
  Python's standard library) that has never seen the report grammar: "hypodense"
  is several tokens, and a word after a space is another token than the same
  word at the start of a string.

``--arch gpt2-words`` writes the control instead: the built-in language model
(a GPT-2 with the report grammar's word tokenizer, new weights) as a
``transformers`` folder, so that the two go through the same ``--lm`` path
and differ only in the architecture and the tokenizer.

::

    .venv/bin/python benchmarks/brought_lm.py --out checkpoints/brought-llama
    .venv/bin/python -m tomoscribe.train --stage language --init tomoscribe/weights \\
        --lm checkpoints/brought-llama --out checkpoints/with-llama ...
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

#: standard-library modules whose docstrings are the tokenizer's corpus
CORPUS_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email", "json",
                  "logging", "os", "pathlib", "random", "re", "string", "subprocess",
                  "tempfile", "textwrap", "threading", "unittest", "urllib.parse")


def corpus() -> list[str]:
    """Docstrings of :data:`CORPUS_MODULES` and of their public functions and classes."""
    texts: list[object] = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        texts.append(module.__doc__)
        texts += [getattr(getattr(module, attr), "__doc__", None) for attr in dir(module)
                  if not attr.startswith("_")]
    return [t for t in texts if isinstance(t, str) and t]


def make_brought_lm(out: Path, width: int = 128, layers: int = 2, heads: int = 4,
                    vocab: int = 2000) -> Path:
    """Write a new-weights Llama and its BPE tokenizer into ``out``; returns ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab,
                                  special_tokens=["<|pad|>", "<|bos|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>",
                                  bos_token="<|bos|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(conf).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def make_word_gpt2(out: Path) -> Path:
    """Write the built-in GPT-2 (new weights) and the word tokenizer as a transformers folder."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from tomoscribe.model.network import NetConfig, build_lm
    from tomoscribe.model.text import BOS, EOS, PAD, UNK, VOCAB, build_word_level

    cfg = NetConfig()
    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast(tokenizer_object=build_word_level(VOCAB), pad_token=PAD,
                                  bos_token=BOS, eos_token=EOS, unk_token=UNK)
    out.mkdir(parents=True, exist_ok=True)
    build_lm(cfg).save_pretrained(str(out))  # type: ignore[operator]
    tok.save_pretrained(str(out))
    return out


def time_generate(model_dirs: list[Path], n: int, questions: int = 6) -> dict[str, float]:
    """Median seconds of ``generate`` per study for each model, side by side in one process.

    The models must share the vision side (``--init`` of their language
    stage): each test phantom is encoded once and every model writes its
    report and answers ``questions`` lesion questions on it, in turn, so the
    figures differ by the language model alone (its decoding).
    """
    import time

    import numpy as np
    import torch

    from tomoscribe.model.scribe import Scribe
    from tomoscribe.model.text import QUESTION_TEMPLATES
    from tomoscribe.phantom import SPLITS, make_phantom, render_acquisition
    from tomoscribe.report import LESION_KINDS
    from tomoscribe.volume import SliceRef, Volume

    scribes = [Scribe.load(d) for d in model_dirs]
    vision = scribes[0].net.encoder.state_dict()
    for d, scribe in zip(model_dirs[1:], scribes[1:], strict=True):
        theirs = scribe.net.encoder.state_dict()
        if any(not torch.equal(vision[k], theirs[k]) for k in vision):
            raise SystemExit(f"{d} does not share the vision side of {model_dirs[0]}")
    asked = [QUESTION_TEMPLATES[0].format(organ=o) for o in LESION_KINDS][:questions]
    seconds: dict[str, list[float]] = {str(d): [] for d in model_dirs}
    for seed in SPLITS["test"][:n]:
        hu, _labels, aff = render_acquisition(make_phantom(int(seed)))
        vol = Volume(hu, aff, [SliceRef(f"2.25.{seed}.{k}", "1.2.840.10008.5.1.4.1.1.2")
                               for k in range(hu.shape[0])])
        enc = scribes[0].encode(vol, early_refusal=False)
        for d, scribe in zip(model_dirs, scribes, strict=True):
            # its own image tokens
            own = enc if scribe is scribes[0] else scribe.encode(vol, early_refusal=False)
            t0 = time.perf_counter()
            scribe.generate(own, asked)
            seconds[str(d)].append(time.perf_counter() - t0)
    return {d: float(np.median(v)) for d, v in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary size")
    ap.add_argument("--arch", choices=("llama", "gpt2-words"), default="llama",
                    help="llama: the stand-in; gpt2-words: the built-in LM as a folder (control)")
    ap.add_argument("--time", type=Path, nargs="+", default=None, metavar="MODEL_DIR",
                    help="instead: time generate() of these models side by side (--out unused)")
    ap.add_argument("--n", type=int, default=20, help="test phantoms for --time")
    args = ap.parse_args(argv)
    if args.time:
        for d, sec in time_generate(args.time, args.n).items():
            print(f"{d}: {sec:.3f} s per study to write the report and answer 6 questions")
        return 0
    if args.out is None:
        ap.error("--out is required")
    if args.arch == "gpt2-words":
        make_word_gpt2(args.out)
    else:
        make_brought_lm(args.out, args.width, args.layers, args.heads, args.vocab)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
