"""Text metrics for the accuracy benchmark: corpus BLEU-4, ROUGE-L and token F1.

Implemented here (no dependency) so that the definitions are exactly the ones
stated in the README. Every function takes already tokenized text (lists of
words; the benchmark uses :meth:`tomoscribe.model.text.WordTokenizer.words`,
where punctuation marks are tokens of their own).

* :func:`corpus_bleu`: BLEU (Papineni et al. 2002) at corpus level, one
  reference per hypothesis: clipped n-gram matches and hypothesis n-gram counts
  are summed over the corpus before the precisions are taken; uniform weights
  over orders 1..4; brevity penalty ``exp(1 - r / c)`` when the total
  hypothesis length ``c`` is below the total reference length ``r``.
  Smoothing: only a zero match count is changed, to ``epsilon`` (0.1; Chen &
  Cherry 2014, method 1), so the score is plain corpus BLEU whenever every
  order has at least one match.
* :func:`rouge_l`: ROUGE-L (Lin 2004) of one pair: longest common subsequence
  ``L``; precision ``L / len(hyp)``, recall ``L / len(ref)``, F with beta = 1.
* :func:`token_f1`: bag-of-words overlap F1 of one pair (SQuAD style).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

Tokens = Sequence[str]


def ngrams(tokens: Tokens, n: int) -> Counter[tuple[str, ...]]:
    """Counts of the ``n``-grams of ``tokens``."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[Tokens], references: Sequence[Tokens], *,
                max_n: int = 4, epsilon: float = 0.1) -> float:
    """Corpus-level BLEU-``max_n`` with brevity penalty (see the module docstring).

    Args:
        hypotheses: one token list per segment.
        references: the matching reference token lists (one reference each).
        max_n: highest n-gram order (4: BLEU-4).
        epsilon: the match count that replaces a zero match count.

    Returns:
        BLEU in ``[0, 1]``; ``0.0`` for an empty corpus or empty hypotheses.

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matched = [0] * max_n
    total = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_len += len(hyp)
        ref_len += len(ref)
        for n in range(1, max_n + 1):
            h, r = ngrams(hyp, n), ngrams(ref, n)
            matched[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            total[n - 1] += sum(h.values())
    if hyp_len == 0 or any(t == 0 for t in total):
        return 0.0
    log_p = sum(math.log((m if m else epsilon) / t) for m, t in zip(matched, total, strict=True))
    bp = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p / max_n)


def lcs_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence of ``a`` and ``b``."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: Tokens, reference: Tokens) -> float:
    """ROUGE-L F (beta = 1) of one pair; ``1.0`` when both are empty."""
    if not hypothesis and not reference:
        return 1.0
    lcs = lcs_length(hypothesis, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hypothesis), lcs / len(reference)
    return 2 * p * r / (p + r)


def token_f1(prediction: Tokens, gold: Tokens) -> float:
    """Bag-of-words overlap F1 of one pair; ``1.0`` when both are empty."""
    if not prediction and not gold:
        return 1.0
    common = sum((Counter(prediction) & Counter(gold)).values())
    if common == 0:
        return 0.0
    p, r = common / len(prediction), common / len(gold)
    return 2 * p * r / (p + r)
