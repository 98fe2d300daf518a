"""Report grammar, vocabulary and the word-level tokenizer of the default model.

The default model writes reports in a small, regular grammar, one finding per
organ with lesions, in the order of its domain's lesion sites
(:class:`tomoscribe.domain.Domain`; the chest-abdomen CT unless said)::

    liver : one hypodense lesion . right lung : two nodules .
    impression : liver lesion , right lung nodules .

and for a normal study::

    no focal abnormality . impression : normal study .

A site that can hold several kinds of lesion (the head's) names each kind
present, joined by "and"::

    cerebellum : one mass and one cyst . impression : cerebellum mass and cyst .

The same grammar is parsed back into structured findings
(:func:`parse_findings`), which is how the benchmark scores a generated report
against the ground truth and how :class:`~tomoscribe.model.scribe.Scribe`
attaches segments and key slices to each sentence.

Questions and answers use the same vocabulary; words outside it map to
``<unk>``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from tomoscribe.domain import CHEST_ABDOMEN_CT, Domain

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
REPORT, QUESTION, ANSWER = "<report>", "<question>", "<answer>"
SPECIAL = (PAD, BOS, EOS, UNK, REPORT, QUESTION, ANSWER)

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")

_BASE_WORDS = (
    ". , : ? no focal abnormality impression normal study yes "
    "is there a an any in the how many lesions are which organ has have lesion "
    "does contain show abnormal findings none of and what kind type largest"
)


#: appended to the vocabulary, in this order, after 0.3.0 (referring segmentation)
ADDED_WORDS = ("segment", "<seg>")


def vocabulary(domain: Domain = CHEST_ABDOMEN_CT) -> tuple[str, ...]:
    """The word vocabulary of ``domain``'s report grammar (ids = positions).

    The order is fixed by the domain (its structures, then its lesion kinds in
    :attr:`~tomoscribe.domain.Domain.kinds` order): the chest-abdomen
    vocabulary is, word for word, the one the shipped model was trained with.
    """
    words: list[str] = list(SPECIAL)
    seen = set(words)

    def add(text: str) -> None:
        for w in text.split():
            if w not in seen:
                seen.add(w)
                words.append(w)

    add(_BASE_WORDS)
    for organ in domain.structures:
        add(organ)
    # in the domain's order: a set's order changes with the interpreter's hash
    # seed, which gave every training run its own word ids
    for kind in domain.lesion_kinds:
        add(kind)
        add(domain.plural[kind])
        add(domain.short[kind])
        add(domain.short_plural[kind])
    add(" ".join(NUMBER_WORDS))
    # words added after a model was shipped go last: the ids of the others stay
    add(" ".join(ADDED_WORDS))
    return tuple(words)


#: the chest-abdomen CT vocabulary (the default model's)
VOCAB: tuple[str, ...] = vocabulary()


#: what a word is: a task marker, a run of letters, or a punctuation mark
WORD_PATTERN = r"<[a-z]+>|[a-z]+|[.,:?]"


def build_word_level(vocab: Sequence[str]) -> Tokenizer:
    """A ``tokenizers`` word-level tokenizer over ``vocab`` (ids = positions).

    Normalisation lower-cases; pre-tokenisation splits on white space, then
    isolates every :data:`WORD_PATTERN` match; anything else (digits, other
    symbols) is dropped. Out-of-vocabulary words map to ``<unk>``.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([
        normalizers.Lowercase(),
        # keep only what can be part of a word; the rest becomes a separator
        normalizers.Replace(Regex(r"[^a-z<>.,:?\s]"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
    ])
    return tok


class WordTokenizer:
    """Word-level tokenizer of the default model, built with the ``tokenizers`` library.

    Lower-cases, splits punctuation off words and maps words to ids (the
    position in ``vocab``). :meth:`save` writes the standard ``tokenizer.json``
    that :meth:`from_file` (or any ``tokenizers`` / ``transformers`` user)
    reads back.
    """

    def __init__(self, vocab: Sequence[str] = VOCAB, backend: Tokenizer | None = None) -> None:
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.backend = backend if backend is not None else build_word_level(self.vocab)
        self.pad_id = self.index[PAD]
        self.bos_id = self.index[BOS]
        self.eos_id = self.index[EOS]
        self.unk_id = self.index[UNK]

    @classmethod
    def from_file(cls, path: str | Path) -> WordTokenizer:
        """Read a ``tokenizer.json`` written by :meth:`save`."""
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(path))
        vocab = backend.get_vocab()
        return cls([w for w, _i in sorted(vocab.items(), key=lambda kv: kv[1])], backend)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``."""
        self.backend.save(str(path))

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(WORD_PATTERN, text.lower())

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            w = self.vocab[int(i)]
            if w in (PAD, BOS):
                continue
            if w == EOS:
                break
            out.append(w)
        return " ".join(out)


def findings_to_text(lesions: Sequence[tuple[str, str]],
                     domain: Domain = CHEST_ABDOMEN_CT) -> str:
    """Ground-truth report text from ``(organ, kind)`` pairs, one per lesion.

    A kind the site does not hold counts as the site's first kind (a
    chest-abdomen organ has one kind); lesions outside the domain's sites are
    not reported.
    """
    if not any(organ in domain.kinds for organ, _kind in lesions):
        return "no focal abnormality . impression : normal study ."
    parts = []
    summary = []
    for site in domain.sites:
        kinds = domain.kinds[site]
        here = Counter(k if k in kinds else kinds[0] for o, k in lesions if o == site)
        if not here:
            continue
        words, short = [], []
        for kind in kinds:
            n = here.get(kind, 0)
            if n:
                words.append(f"{NUMBER_WORDS[min(n, 5)]} {kind if n == 1 else domain.plural[kind]}")
                short.append(domain.short[kind] if n == 1 else domain.short_plural[kind])
        parts.append(f"{site} : {' and '.join(words)} .")
        summary.append(f"{site} {' and '.join(short)}")
    return " ".join(parts) + " impression : " + " , ".join(summary) + " ."


@dataclass(frozen=True)
class ParsedFinding:
    """One finding sentence parsed back: organ, kind, count and the sentence.

    ``kind`` is the first kind named (else the site's first); ``kinds`` every
    kind named, in the domain's order (empty when none is).
    """

    organ: str
    kind: str
    count: int
    sentence: str
    kinds: tuple[str, ...] = ()


def parse_findings(text: str, domain: Domain = CHEST_ABDOMEN_CT) -> list[ParsedFinding]:
    """Parse the findings part of a report (before ``impression :``).

    Unparseable sentences are skipped; an organ named twice keeps its first
    sentence. The count is the sum of the numbers before each kind named
    ("one mass and two cysts": 3), else the first word's number, else 1; the
    kind is the first one named, else the site's first.
    """
    body = text.split("impression", 1)[0]
    out: list[ParsedFinding] = []
    seen: set[str] = set()
    for sentence in body.split("."):
        sentence = sentence.strip()
        if ":" not in sentence:
            continue
        organ, rest = (s.strip() for s in sentence.split(":", 1))
        if organ not in domain.kinds or organ in seen:
            continue
        words = rest.split()
        count = 0
        named: list[str] = []
        for kind in domain.kinds[organ]:
            for form in (domain.plural[kind], kind):
                m = re.search(rf"(\w+) {re.escape(form)}\b", rest)
                if m and m.group(1) in NUMBER_WORDS:
                    count += max(NUMBER_WORDS.index(m.group(1)), 1)
                    named.append(kind)
                    break
        if not count:
            count = 1
            if words and words[0] in NUMBER_WORDS:
                count = max(NUMBER_WORDS.index(words[0]), 1)
        seen.add(organ)
        kind = named[0] if named else domain.kinds[organ][0]
        out.append(ParsedFinding(organ, kind, count, f"{organ} : {rest} .", tuple(named)))
    return out


def impression_of(text: str) -> str:
    """The impression part of a report, or ``""``."""
    if "impression" not in text:
        return ""
    tail = text.split("impression", 1)[1].lstrip(" :")
    return tail.strip()


def without_sites(text: str, sites: Iterable[str], domain: Domain = CHEST_ABDOMEN_CT) -> str:
    """``text`` (model grammar) without the findings and impression items of ``sites``.

    The findings kept are :func:`parse_findings`' sentences (an unparseable
    sentence is dropped); the impression keeps its items that do not start
    with a dropped site. With no finding left, the text of a normal study.
    """
    drop = set(sites)
    kept = [pf for pf in parse_findings(text, domain) if pf.organ not in drop]
    if not kept:
        return findings_to_text([], domain)
    items = [i for i in _impression_items(text) if _item_site(i, drop) is None]
    if not items:  # the impression named none of the sites kept: name them
        items = [pf.organ for pf in kept]
    return " ".join(pf.sentence for pf in kept) + " impression : " + " , ".join(items) + " ."


def with_findings(text: str, lesions: Sequence[tuple[str, str]],
                  domain: Domain = CHEST_ABDOMEN_CT) -> str:
    """``text`` (model grammar) with findings for the sites of ``lesions`` it does not name.

    ``lesions`` are ``(site, kind)`` pairs, one per lesion, written as
    :func:`findings_to_text` writes them; a site ``text`` already names keeps
    its own sentence. Findings and impression items stay in the domain's
    site order. A text with no finding (the normal study's sentence) becomes
    the new findings alone.
    """
    kept = parse_findings(text, domain)
    named = {pf.organ for pf in kept}
    new = [(site, kind) for site, kind in lesions if site not in named and site in domain.kinds]
    if not new:
        return text
    if not kept:
        return findings_to_text(new, domain)
    added = findings_to_text(new, domain)
    sentences = {pf.organ: pf.sentence for pf in kept}
    sentences.update({pf.organ: pf.sentence for pf in parse_findings(added, domain)})
    items = _impression_items(text) + _impression_items(added)

    def site_order(item: str) -> int:
        site = _item_site(item, domain.sites)
        return domain.sites.index(site) if site is not None else len(domain.sites)

    body = " ".join(sentences[site] for site in domain.sites if site in sentences)
    return body + " impression : " + " , ".join(sorted(items, key=site_order)) + " ."


def _impression_items(text: str) -> list[str]:
    """The items of a report's impression ("liver lesion", "right lung nodules"), in order."""
    return [i.strip() for i in impression_of(text).rstrip(" .").split(",") if i.strip()]


def _item_site(item: str, sites: Iterable[str]) -> str | None:
    """The site an impression item starts with (the first of ``sites`` to match), or ``None``."""
    return next((site for site in sites if item == site or item.startswith(site + " ")), None)


def sentence_case(text: str) -> str:
    """Turn the model's token text into readable prose for the SR."""
    text = re.sub(r"\s+([.,:?])", r"\1", text.strip())
    sentences = re.split(r"(?<=[.?])\s+", text)
    return " ".join(s[:1].upper() + s[1:] for s in sentences if s)


# ----------------------------------------------------------------------------
# Questions: templates used in training, and their ground-truth answers.
# ----------------------------------------------------------------------------

QUESTION_TEMPLATES: tuple[str, ...] = (
    "is there a lesion in the {organ} ?",
    "does the {organ} contain a {kind} ?",
    "how many lesions are in the {organ} ?",
    "is the {organ} normal ?",
    "which organ has a lesion ?",
    "are there any focal findings ?",
)


#: referring segmentation: the answer is ``<seg> .`` (a mask follows) or ``none .``
REFER_TEMPLATES: tuple[str, ...] = (
    "segment the {organ} .",
    "segment the lesions in the {organ} .",
    "segment the lesions .",
)


def is_referring(question: str) -> bool:
    """Whether a question asks for a mask (``segment ...``)."""
    return question.strip().lower().startswith("segment")


def with_closing_mark(question: str) -> str:
    """``question`` ending as the training questions end: "?", or "." for a "segment" request.

    A question typed without its closing mark is another sequence to the
    language model: on the first validation phantoms, "is there a lesion in
    the liver" was answered "yes" where "is there a lesion in the liver ?"
    got the right "no", and "segment the liver" got "none ." A question that
    ends in either mark is left as it is.
    """
    q = question.strip()
    if not q or q[-1] in "?.":
        return q
    return f"{q} {'.' if is_referring(q) else '?'}"


def refer_answer(template: str, organ: str, counts: Counter[str], organ_present: bool = True
                 ) -> str:
    """Ground-truth answer to a filled referring ``template``: ``<seg> .`` or ``none .``."""
    if template.startswith("segment the lesions in"):
        there = counts.get(organ, 0) > 0
    elif template.startswith("segment the lesions"):
        there = sum(counts.values()) > 0
    else:
        there = organ_present
    return "<seg> ." if there else "none ."


def answer_for(template: str, organ: str, counts: Counter[str],
               domain: Domain = CHEST_ABDOMEN_CT, kind: str | None = None,
               kind_counts: Counter[tuple[str, str]] | None = None) -> str:
    """Ground-truth answer to a filled ``template`` given lesion counts per organ.

    ``kind`` and ``kind_counts`` (lesions per ``(organ, kind)``) answer "does
    the {organ} contain a {kind} ?" where a site holds several kinds; without
    them any lesion of the organ counts.
    """
    n = counts.get(organ, 0)
    if template.startswith("does the") and kind is not None and kind_counts is not None:
        return "yes" if kind_counts.get((organ, kind), 0) else "no"
    if template.startswith("how many"):
        return NUMBER_WORDS[min(n, 5)]
    if template.startswith("is the {organ}"):  # not "is there ...": that one is below
        return "no" if n else "yes"
    if template.startswith("which organ"):
        organs = [o for o in domain.structures if counts.get(o, 0)]
        return " , ".join(organs) if organs else "none"
    if template.startswith("are there"):
        return "yes" if sum(counts.values()) else "no"
    return "yes" if n else "no"


#: other ways people ask the trained questions, each with the template it
#: asks (the same ``{organ}`` and ``{kind}``; ``{kinds}``: the kind's plural,
#: for sites that hold one kind). The language model, trained on the
#: templates' words only, answers these badly: on 40 test phantoms
#: (``benchmarks/questions.py``, 2026-11-25) "does the {organ} have a lesion
#: ?" asked as typed was answered right in 0.03 of cases, "is the {organ}
#: abnormal ?" in 0.004, "is there a lesion ?" in 0.48, against 0.95-1.00
#: for the templates; matched to them, all in 0.975-1.000.
PARAPHRASES: dict[str, str] = {
    "does the {organ} have a lesion ?": "is there a lesion in the {organ} ?",
    "does the {organ} contain a lesion ?": "is there a lesion in the {organ} ?",
    "is the {organ} abnormal ?": "is there a lesion in the {organ} ?",
    "lesions in the {organ} ?": "is there a lesion in the {organ} ?",
    "is there a {kind} in the {organ} ?": "does the {organ} contain a {kind} ?",
    "does the {organ} have a {kind} ?": "does the {organ} contain a {kind} ?",
    "how many lesions does the {organ} have ?": "how many lesions are in the {organ} ?",
    "how many lesions in the {organ} ?": "how many lesions are in the {organ} ?",
    "how many {kinds} are in the {organ} ?": "how many lesions are in the {organ} ?",
    "how many {kinds} does the {organ} have ?": "how many lesions are in the {organ} ?",
    "is there a lesion ?": "are there any focal findings ?",
    "are there any findings ?": "are there any focal findings ?",
    "any findings ?": "are there any focal findings ?",
    "any focal findings ?": "are there any focal findings ?",
    "is the study abnormal ?": "are there any focal findings ?",
    "is this study abnormal ?": "are there any focal findings ?",
    "is the scan abnormal ?": "are there any focal findings ?",
    "lesions ?": "are there any focal findings ?",
    "which organs have lesions ?": "which organ has a lesion ?",
    "which organs have a lesion ?": "which organ has a lesion ?",
    "which organ has lesions ?": "which organ has a lesion ?",
    "where are the lesions ?": "which organ has a lesion ?",
}

#: questions whose answer is the opposite of a template's: "is the study
#: normal ?" is "no" where "are there any focal findings ?" is "yes". Asked
#: as typed, the model was right in 0.40 of 40 test phantoms; so answered, 1.00.
NEGATIONS: dict[str, str] = {
    "is the study normal ?": "are there any focal findings ?",
    "is this study normal ?": "are there any focal findings ?",
    "is the scan normal ?": "are there any focal findings ?",
}

#: words that do not tell the questions apart, and words matched as another
_DROPPED = frozenset({"the", "a", "an", "any"})
_SAME = {"are": "is", "lesions": "lesion", "organs": "organ", "have": "has"}

#: "segment ..." requests in other words, each with the
#: :data:`REFER_TEMPLATES` entry it asks. Asked as typed, "Segment liver"
#: got a mask in 0.10 of 40 test phantoms, "segment the liver ." in all
#: (``benchmarks/questions.py``, 2026-11-25).
REFER_PARAPHRASES: dict[str, str] = {
    "segment the {organ} lesions .": "segment the lesions in the {organ} .",
    "segment the {kinds} in the {organ} .": "segment the lesions in the {organ} .",
    "segment the {organ} {kinds} .": "segment the lesions in the {organ} .",
    "segment all lesions .": "segment the lesions .",
    "segment all the lesions .": "segment the lesions .",
    "segment every lesion .": "segment the lesions .",
}

class QuestionMatch(NamedTuple):
    """The trained question a free-text question asks (:func:`match_question`).

    ``template`` is a :data:`QUESTION_TEMPLATES` or :data:`REFER_TEMPLATES`
    entry; ``organ`` the site filled in (``""`` for a study-level template);
    ``kind`` the kind named (``None`` where the template names none);
    ``negated``: the question asks the template's opposite (:data:`NEGATIONS`).
    """

    template: str
    organ: str
    kind: str | None
    negated: bool = False

    @property
    def question(self) -> str:
        """The question in the template's own words, as the model was trained on it."""
        return self.template.format(organ=self.organ, kind=self.kind)


def phrasings(domain: Domain, referring: bool = False
              ) -> Iterator[tuple[str, str, QuestionMatch]]:
    """Every recognised wording, filled in: ``(phrasing, question, what it asks)``.

    The templates first, then :data:`PARAPHRASES` and :data:`NEGATIONS` (with
    ``referring``: :data:`REFER_TEMPLATES`, then :data:`REFER_PARAPHRASES`).
    ``{organ}`` is each lesion site (any structure for "segment the {organ}
    ." requests), ``{kind}`` each kind the site holds, ``{kinds}`` the plural
    of a site's one kind (sites with several are left out of those).
    """
    if referring:
        entries = [(t, t, False) for t in REFER_TEMPLATES]
        entries += [(p, t, False) for p, t in REFER_PARAPHRASES.items()]
    else:
        entries = [(t, t, False) for t in QUESTION_TEMPLATES]
        entries += [(p, t, False) for p, t in PARAPHRASES.items()]
        entries += [(p, t, True) for p, t in NEGATIONS.items()]
    for phrasing, template, negated in entries:
        if "{organ}" not in phrasing:
            yield phrasing, phrasing, QuestionMatch(template, "", None, negated)
            continue
        organs = (domain.structures[1:] if referring and "lesion" not in template
                  else domain.sites)
        for organ in organs:
            single = domain.single_kind(organ)
            if "{kinds}" in phrasing and single is None:
                continue  # "how many cysts" is not "how many lesions" there
            kinds: tuple[str | None, ...] = (
                domain.kinds[organ] if "{kind}" in phrasing else (None,))
            for kind in kinds:
                question = phrasing.format(organ=organ, kind=kind,
                                           kinds=domain.plural[single] if single else "")
                yield phrasing, question, QuestionMatch(
                    template, organ, kind if "{kind}" in template else None, negated)


#: per (domain name, referring): :func:`_match_words` of every filled-in
#: wording -> what it asks (the first wording to give those words wins)
_FILLED: dict[tuple[str, bool], dict[tuple[str, ...], QuestionMatch]] = {}


def _match_words(text: str, domain: Domain) -> tuple[str, ...]:
    """The words two phrasings of one question share.

    Lower case, without closing marks or articles; plurals as singulars (the
    domain's kinds too); "are" as "is", "have" as "has".
    """
    words = re.findall(WORD_PATTERN, text.lower())
    while words and words[-1] in ("?", "."):
        words.pop()
    joined = " " + " ".join(words) + " "
    for kind in domain.lesion_kinds:  # "hypodense lesions" -> "hypodense lesion"
        for plural, single in ((domain.plural[kind], kind),
                               (domain.short_plural[kind], domain.short[kind])):
            joined = joined.replace(f" {plural} ", f" {single} ")
    return tuple(_SAME.get(w, w) for w in joined.split() if w not in _DROPPED)


def match_question(question: str, domain: Domain = CHEST_ABDOMEN_CT,
                   referring: bool = False) -> QuestionMatch | None:
    """The trained question (``referring``: "segment ..." request) ``question`` asks, or ``None``.

    A question matches a template or one of its other wordings
    (:func:`phrasings`) word for word once case, articles, plurals and the
    closing mark are set aside: "Are there lesions in the liver?" asks "is
    there a lesion in the liver ?", "Segment liver" asks "segment the liver .".
    """
    index = _FILLED.get((domain.name, referring))
    if index is None:
        index = {}
        for _phrasing, filled, match in phrasings(domain, referring):
            index.setdefault(_match_words(filled, domain), match)
        _FILLED[(domain.name, referring)] = index
    return index.get(_match_words(question, domain))


def flip_yes_no(answer: str) -> str:
    """``answer`` with a leading "yes" and "no" swapped (any case); anything else as it is."""
    m = re.match(r"\s*(yes|no)\b", answer, flags=re.IGNORECASE)
    if m is None:
        return answer
    word = m.group(1)
    other = "no" if word.lower() == "yes" else "yes"
    if word[0].isupper():
        other = other.capitalize()
    return answer[:m.start(1)] + other + answer[m.end(1):]


def answer_from_findings(match: QuestionMatch, findings: Sequence[ParsedFinding],
                         domain: Domain = CHEST_ABDOMEN_CT) -> str:
    """The answer a report's ``findings`` give to a trained question (model grammar).

    The lesion count of a site is its finding's count; a finding names its
    kinds (else the site's first kind); a negated question gets the
    template's opposite. Counterpart of :func:`answer_for`, which answers from
    the ground truth's lesions.
    """
    counts: Counter[str] = Counter()
    kind_counts: Counter[tuple[str, str]] = Counter()
    for pf in findings:
        counts[pf.organ] += pf.count
        for k in pf.kinds or (pf.kind,):
            kind_counts[(pf.organ, k)] += 1
    answer = answer_for(match.template, match.organ, counts, domain, match.kind, kind_counts)
    return flip_yes_no(answer) if match.negated else answer
