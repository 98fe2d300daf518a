"""Questions in the templates' words and in other words: asked as typed, and as answered.

    .venv/bin/python benchmarks/questions.py [--n 40] [--split test] [--model-dir DIR] [--json PATH]

Every phrasing tomoscribe recognises (:data:`~tomoscribe.model.text.QUESTION_TEMPLATES`,
``PARAPHRASES`` and ``NEGATIONS``; the "segment ..." requests of
``REFER_TEMPLATES`` and ``REFER_PARAPHRASES``), filled in with each lesion
site (and the site's kind where it names one), is put to the model two ways
on each held-out chest-abdomen phantom:

Each template is also asked "loosely" (capitalised, without "the" or its
closing mark: "Is there a lesion in {organ}").

* **as typed**: the words as written (a closing mark added) straight to the
  language model (``Scribe.ask``, ``Scribe.refer``): what the model makes of
  the wording;
* **as answered**: through ``Scribe.generate``, as the CLI and the plugin
  ask: matched to its template, put to the model in the template's words,
  and answered from the report's findings where they settle it.

Scored against the phantom's lesions (:func:`~tomoscribe.model.text.answer_for`;
the opposite for a negation): yes/no questions by their first word, counts
and "which organ" by exact match of the words, "segment" requests by whether
a mask came exactly when there is something to segment
(:func:`~tomoscribe.model.text.refer_answer`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from tomoscribe.domain import CHEST_ABDOMEN_CT, Domain
from tomoscribe.model.scribe import Scribe
from tomoscribe.model.text import (
    QuestionMatch,
    WordTokenizer,
    answer_for,
    flip_yes_no,
    phrasings,
    refer_answer,
)
from tomoscribe.phantom import SPLITS, make_phantom, render_acquisition
from tomoscribe.volume import SliceRef, Volume

#: ``(row: the wording with its placeholders, question, what it asks, referring)``
Item = tuple[str, str, QuestionMatch, bool]


def loosely(text: str) -> str:
    """A question as people type it: capitalised, without "the" and the closing mark."""
    words = [w for w in text.split() if w != "the"]
    text = " ".join(words).removesuffix(" ?").removesuffix(" .")
    return text[:1].upper() + text[1:]


def items(domain: Domain, referring_too: bool = True) -> list[Item]:
    """Every recognised wording filled in (:func:`~tomoscribe.model.text.phrasings`).

    Per kind of question: the templates, each template typed loosely, then the
    other wordings.
    """
    out: list[Item] = []
    for referring in (False, True) if referring_too else (False,):
        filled = list(phrasings(domain, referring))
        templates = [(p, q, m, referring) for p, q, m in filled if p == m.template]
        out += templates
        out += [(loosely(p), loosely(q), m, referring) for p, q, m, _r in templates]
        out += [(p, q, m, referring) for p, q, m in filled if p != m.template]
    return out


def _words(text: str) -> list[str]:
    """An answer's words, without the note of what the model said alone, or marks."""
    text = text.split(" (Asked this alone", 1)[0]
    return [w for w in WordTokenizer.words(text) if w not in (".", ",", "?")]


def right(answer: str, gold: str) -> bool:
    """Whether ``answer`` says ``gold``: the first word of a yes/no answer, else every word."""
    got, want = _words(answer), _words(gold)
    if want in (["yes"], ["no"]):
        return got[:1] == want
    return got == want


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="phantoms")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/questions.json"))
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()
    scribe = Scribe.load(args.model_dir)
    domain = scribe.domain
    if domain is not CHEST_ABDOMEN_CT:
        print(f"questions: the model reads {domain.description}; this benchmark renders "
              f"{CHEST_ABDOMEN_CT.description} phantoms", file=sys.stderr)
        return 2
    asked = items(domain, referring_too=scribe.net.segtoken is not None)
    rows_of = list(dict.fromkeys(row for row, *_rest in asked))  # in order, each once
    typed: dict[str, list[bool]] = {row: [] for row in rows_of}
    answered: dict[str, list[bool]] = {row: [] for row in rows_of}
    for i, seed in enumerate(SPLITS[args.split][: args.n]):
        ph = make_phantom(seed)
        hu, _labels, aff = render_acquisition(ph)
        vol = Volume(hu, aff, [SliceRef(f"2.25.{seed}.{k}", "1.2.840.10008.5.1.4.1.1.2")
                               for k in range(hu.shape[0])])
        enc = scribe.encode(vol, early_refusal=False)
        counts = Counter(les.organ for les in ph.lesions)
        report = scribe.generate(enc, [q for _row, q, _m, _r in asked])
        for (row, question, m, referring), ans in zip(asked, report.answers, strict=True):
            if referring:
                want_mask = refer_answer(m.template, m.organ, counts).startswith("<seg>")
                answered[row].append((ans.mask is not None) == want_mask)
                typed[row].append((scribe.refer(enc, question)[1] is not None) == want_mask)
            else:
                gold = answer_for(m.template, m.organ, counts, domain)
                gold = flip_yes_no(gold) if m.negated else gold
                answered[row].append(right(ans.answer, gold))
                typed[row].append(right(scribe.ask(enc, question)[0], gold))
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{args.n} studies", file=sys.stderr, flush=True)

    def mean(v: list[bool]) -> float:
        return sum(v) / len(v) if v else float("nan")

    template_of = {row: m.template for row, _q, m, _r in asked}
    rows = {row: {"template": template_of[row], "as_typed": mean(typed[row]),
                  "as_answered": mean(answered[row]), "n": len(typed[row])} for row in rows_of}
    print(f"\n{args.n} phantoms of the {args.split} range, model {scribe.name} {scribe.version}: "
          "each phrasing asked as typed (the language model alone) and as answered "
          "(Scribe.generate)")
    print(f"{'phrasing':<44}{'as typed':>10}{'as answered':>13}{'n':>6}")
    for row, r in rows.items():
        print(f"{row:<44}{r['as_typed']:>10.3f}{r['as_answered']:>13.3f}{r['n']:>6}")
    groups = {"templates": [r for r in rows_of if r == template_of[r]],
              "templates, loosely": [r for r in rows_of if r == loosely(template_of[r])],
              "other words": [r for r in rows_of
                              if r not in (template_of[r], loosely(template_of[r]))]}
    summary = {}
    for name, members in groups.items():
        t = [x for r in members for x in typed[r]]
        a = [x for r in members for x in answered[r]]
        summary[name] = {"as_typed": mean(t), "as_answered": mean(a), "n": len(t)}
        print(f"{'all ' + name:<44}{mean(t):>10.3f}{mean(a):>13.3f}{len(t):>6}")
    result = {"model": scribe.name, "version": scribe.version, "split": args.split,
              "studies": args.n, "phrasings": rows, "summary": summary,
              "benchmark_wall_seconds": time.perf_counter() - wall0}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
