"""Bring your own language model: any local ``transformers`` causal LM.

The default model's language model is a 2-layer GPT-2 built from
:class:`~tomoscribe.model.network.NetConfig`, with the word vocabulary of
:mod:`tomoscribe.model.text`. Any causal LM of the ``transformers`` library
can take its place without code changes: the network only ever calls the
LM's input embeddings and ``forward(inputs_embeds=...)`` (with
``past_key_values`` when decoding), which every ``transformers`` causal LM
has. An ML engineer points the language stage at a local checkpoint::

    python -m tomoscribe.train --stage language --init tomoscribe/weights \\
        --lm /models/my-causal-lm --out my-model --steps 1500 --batch 32

``--lm`` is a folder as ``save_pretrained`` writes it (``config.json``, the
weights, the tokenizer's files). Nothing is downloaded: the folder is read
with ``local_files_only``. The run:

* loads the LM and its tokenizer (:func:`load_lm`); tomoscribe's task markers
  (``<report>``, ``<question>``, ``<answer>``, ``<seg>``) are added to the
  tokenizer as special tokens and the LM's embeddings grow to match;
* sets the network's width to the LM's hidden size, so the projectors and the
  region tokens are new; the vision side (encoder, segmentation head,
  refiner) comes from ``--init``;
* trains the projectors and the LM (``--freeze-lm``: only the LM's input
  embeddings, for a model too large to fine-tune here);
* writes the LM and its tokenizer to ``<out>/lm/`` (``save_pretrained``) and
  ``"lm": "lm"`` into ``config.json``; ``model.pt`` holds everything else.

:class:`~tomoscribe.model.scribe.Scribe` loads such a folder like any other.

Two things are checked rather than assumed: token id 0 is the padding of
tomoscribe's batches (:func:`tomoscribe.train.pad_rows`), so a tokenizer that
gives id 0 to any word of the report grammar is refused; and a tokenizer
without an end-of-sequence token gets ``<eos>``.

:class:`LMTokenizer` gives the tokenizer the interface of
:class:`~tomoscribe.model.text.WordTokenizer` that training and decoding use
(``encode``, ``decode``, ``index`` of the markers, ``eos_id``, ``unk_id``).
Prompts are encoded as one string (``"<question> is ... ? <answer>"``), never
as pieces put together, because a subword tokenizer encodes a word after a
space differently from the same word at the start of a string.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from tomoscribe.errors import ModelError
from tomoscribe.model.segtoken import SEG
from tomoscribe.model.text import (
    ANSWER,
    BOS,
    EOS,
    PAD,
    QUESTION,
    REPORT,
    UNK,
    VOCAB,
)

#: the folder inside a model folder where a brought LM and its tokenizer are saved
LM_FOLDER = "lm"
#: tomoscribe's task markers, added to a brought tokenizer as special tokens
MARKERS = (REPORT, QUESTION, ANSWER, SEG)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _quiet_transformers() -> None:
    """No progress bars or resize notices from ``transformers`` in a worker's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


class LMTokenizer:
    """A ``transformers`` tokenizer with the interface of :class:`WordTokenizer`.

    Args:
        backend: the tokenizer read from the LM's folder. The task markers and,
            where it has none, an end-of-sequence token are added to it.

    Raises:
        ModelError: the tokenizer gives id 0 (tomoscribe's padding) to a word
            of the report grammar.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        missing = [m for m in MARKERS if m not in backend.get_vocab()]
        if missing:
            backend.add_tokens(missing, special_tokens=True)
        if backend.eos_token_id is None:
            backend.add_tokens([EOS], special_tokens=True)
            backend.eos_token = EOS
        self.eos_id = int(backend.eos_token_id)
        self.pad_id = 0
        self.index: dict[str, int] = {m: int(backend.convert_tokens_to_ids(m)) for m in MARKERS}
        self.index[PAD] = 0
        self.index[EOS] = self.eos_id
        if backend.bos_token_id is not None:
            self.index[BOS] = int(backend.bos_token_id)
        if backend.unk_token_id is not None:
            self.index[UNK] = int(backend.unk_token_id)
        #: stands in for an empty instruction (the word tokenizer's ``<unk>``)
        self.unk_id = self.index.get(UNK, self.index[QUESTION])
        clash = [w for w in VOCAB if w not in (PAD, BOS, EOS, UNK)
                 and 0 in self._raw(f"{QUESTION} {w}")]
        if clash:
            raise ModelError(f"the language model's tokenizer gives id 0, tomoscribe's padding, "
                             f"to {clash[0]!r}")

    @classmethod
    def from_folder(cls, path: Path) -> LMTokenizer:
        """Read the tokenizer saved in an LM's folder (local files only)."""
        from transformers import AutoTokenizer

        _quiet_transformers()
        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))

    def save(self, path: Path) -> None:
        """Write the tokenizer, markers included, into the folder ``path``."""
        self.backend.save_pretrained(str(path))

    def __len__(self) -> int:
        return len(self.backend)

    def _raw(self, text: str) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=False)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the tokenizer's own BOS/EOS.

        Lower-cased, as the report grammar is. An id 0 (a character the
        tokenizer maps to its padding or unknown token at id 0) is dropped:
        it would read as padding.
        """
        return [i for i in self._raw(text.lower()) if i != 0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first end-of-sequence, padding and BOS left out."""
        keep: list[int] = []
        bos = self.index.get(BOS)
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i == 0 or i == bos:
                continue
            keep.append(i)
        text: str = self.backend.decode(keep, skip_special_tokens=False)
        return " ".join(text.split())


def load_lm(path: Path) -> tuple[nn.Module, LMTokenizer]:
    """The causal LM in the folder ``path`` and its tokenizer, markers added.

    The LM's input (and tied output) embeddings are grown to the tokenizer's
    length where the markers are new; loading a folder tomoscribe saved
    changes nothing.

    Raises:
        ModelError: the folder holds no ``transformers`` causal LM or tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    lm: Any
    try:
        tok = LMTokenizer.from_folder(path)
        lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                  dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a transformers causal LM from {path}: "
                         f"{_first_line(exc)}") from exc
    rows = int(lm.get_input_embeddings().weight.shape[0])
    if rows < len(tok):
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
    return lm, tok


def save_lm(lm: nn.Module, tok: LMTokenizer, model_dir: Path) -> None:
    """Write ``lm`` and ``tok`` to ``model_dir / LM_FOLDER`` (``save_pretrained``).

    Written beside the old folder first and swapped in, so an interrupted save
    leaves the previous LM whole.
    """
    final = model_dir / LM_FOLDER
    tmp = model_dir / (LM_FOLDER + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(str(tmp))  # type: ignore[operator]
    tok.save(tmp)
    old = model_dir / (LM_FOLDER + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def lm_limits(path: Path) -> tuple[int, int]:
    """``(hidden size, longest sequence)`` of the causal LM in the folder ``path``.

    The longest sequence is the config's ``max_position_embeddings`` (or
    ``n_positions``), capped at 2,048; 2,048 where the config states none
    (rotary models without a limit).

    Raises:
        ModelError: the folder holds no ``transformers`` model config.
    """
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        conf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read a transformers model from {path}: "
                         f"{_first_line(exc)}") from exc
    longest = getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None)
    return int(conf.hidden_size), min(int(longest or 2048), 2048)
