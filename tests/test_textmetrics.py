"""BLEU-4, ROUGE-L and token F1 of the accuracy benchmark, on hand-computed examples."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _load() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "textmetrics.py"
    spec = importlib.util.spec_from_file_location("bench_textmetrics", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


tm = _load()


def w(text: str) -> list[str]:
    return text.split()


def test_bleu_identical_is_one() -> None:
    s = w("liver : one hypodense lesion . impression : liver lesion .")
    assert tm.corpus_bleu([s], [s]) == pytest.approx(1.0)


def test_bleu_brevity_penalty() -> None:
    # every n-gram of the hypothesis matches; c = 4, r = 8 -> BP = exp(1 - 8/4)
    got = tm.corpus_bleu([w("a b c d")], [w("a b c d e f g h")])
    assert got == pytest.approx(math.exp(-1.0))


def test_bleu_no_penalty_for_longer_hypothesis() -> None:
    # hypothesis longer than the reference: BP = 1; p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2
    got = tm.corpus_bleu([w("a b c d x")], [w("a b c d")])
    assert got == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_bleu_clipping_and_smoothing() -> None:
    # "the" x4 against one "the": clipped unigram 1/4; no higher-order match, so
    # each zero match count becomes epsilon = 0.1 over 3, 2, 1 n-grams
    got = tm.corpus_bleu([w("the the the the")], [w("the cat")])
    assert got == pytest.approx((1 / 4 * 0.1 / 3 * 0.1 / 2 * 0.1 / 1) ** 0.25)


def test_bleu_is_corpus_level_not_a_mean() -> None:
    # matches summed over both segments: p1 = 7/8, p2 = 5/6, p3 = 3/4, p4 = 1/2
    hyps = [w("a b c d"), w("a b c d")]
    refs = [w("a b c d"), w("a b c e")]
    corpus = (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25
    assert tm.corpus_bleu(hyps, refs) == pytest.approx(corpus)
    per_segment = [tm.corpus_bleu([h], [r]) for h, r in zip(hyps, refs, strict=True)]
    assert sum(per_segment) / 2 != pytest.approx(corpus)


def test_bleu_degenerate_inputs() -> None:
    assert tm.corpus_bleu([], []) == 0.0
    assert tm.corpus_bleu([w("a b c")], [w("a b c")]) == 0.0  # no 4-gram at all
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        tm.corpus_bleu([w("a"), w("b")], [w("a")])


def test_lcs_classic_example() -> None:
    assert tm.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert tm.lcs_length([], list("abc")) == 0


def test_rouge_l() -> None:
    # LCS "a c d" = 3: P = R = 3/4
    assert tm.rouge_l(w("a b c d"), w("a c e d")) == pytest.approx(0.75)
    # LCS 2: P = 1, R = 1/2, F = 2/3
    assert tm.rouge_l(w("a b"), w("a b c d")) == pytest.approx(2 / 3)
    assert tm.rouge_l(w("x y"), w("a b")) == 0.0
    assert tm.rouge_l([], []) == 1.0
    assert tm.rouge_l([], w("a")) == 0.0


def test_token_f1() -> None:
    # one common token: P = 1/3, R = 1, F = 1/2
    assert tm.token_f1(w("liver , spleen"), w("liver")) == pytest.approx(0.5)
    assert tm.token_f1(w("none"), w("none")) == 1.0
    assert tm.token_f1(w("two"), w("one")) == 0.0
    assert tm.token_f1([], []) == 1.0
    assert tm.token_f1([], w("no")) == 0.0
