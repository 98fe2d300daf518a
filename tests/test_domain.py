"""Domains: what a model reads (anatomy, lesions, words, intensities), one definition each."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tomoscribe.domain import CHEST_ABDOMEN_CT, DOMAINS, HEAD_MR, Domain, get_domain
from tomoscribe.model.text import (
    VOCAB,
    WordTokenizer,
    answer_for,
    findings_to_text,
    parse_findings,
    vocabulary,
)
from tomoscribe.phantom_head import (
    HEAD_STRUCTURES,
    LESION_SITES,
    head_report_text,
    make_head_phantom,
)
from tomoscribe.phantom_head import LESION_KINDS as HEAD_KIND_ODDS

WEIGHTS = Path(__file__).resolve().parents[1] / "tomoscribe" / "weights"


def test_the_chest_abdomen_vocabulary_is_the_shipped_models_word_for_word() -> None:
    shipped = json.loads((WEIGHTS / "config.json").read_text())["net"]["vocab"]
    assert vocabulary(CHEST_ABDOMEN_CT) == VOCAB
    # the shipped model's ids may only have grown at the end
    assert VOCAB[: len(shipped)] == tuple(shipped)


def test_the_head_vocabulary_holds_every_word_of_its_reports() -> None:
    tok = WordTokenizer(vocabulary(HEAD_MR))
    for seed in range(40):
        text = head_report_text(make_head_phantom(seed))
        assert tok.unk_id not in tok.encode(text), text


def test_the_head_domain_is_the_head_phantoms() -> None:
    assert HEAD_MR.structures == HEAD_STRUCTURES
    assert HEAD_MR.sites == tuple(LESION_SITES)
    assert set(HEAD_MR.lesion_kinds) == set(HEAD_KIND_ODDS)
    assert HEAD_MR.num_classes == 7 and HEAD_MR.lesion_label == 6
    assert CHEST_ABDOMEN_CT.num_classes == 9 and CHEST_ABDOMEN_CT.lesion_label == 8


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_the_head_report_parses_back_to_the_phantoms_lesions(seed: int) -> None:
    ph = make_head_phantom(seed)
    lesions = [(les.site, les.kind) for les in ph.lesions]
    text = head_report_text(ph)
    parsed = parse_findings(text, HEAD_MR)
    assert Counter({f.organ: f.count for f in parsed}) == Counter(site for site, _k in lesions)


def test_a_site_with_two_kinds_names_both_and_counts_both() -> None:
    text = findings_to_text([("cerebellum", "cyst"), ("cerebellum", "mass"),
                             ("cerebellum", "mass")], HEAD_MR)
    assert text == ("cerebellum : two masses and one cyst . impression : cerebellum masses "
                    "and cyst .")
    (f,) = parse_findings(text, HEAD_MR)
    assert (f.organ, f.kind, f.count) == ("cerebellum", "mass", 3)
    # the chest-abdomen grammar does not know the head's sites
    assert parse_findings(text) == []


def test_the_chest_abdomen_grammar_is_unchanged() -> None:
    lesions = [("spleen", "hypodense lesion"), ("right lung", "nodule"), ("right lung", "nodule")]
    text = findings_to_text(lesions)
    assert text == ("right lung : two nodules . spleen : one hypodense lesion . impression : "
                    "right lung nodules , spleen lesion .")
    assert [(f.organ, f.kind, f.count) for f in parse_findings(text)] == [
        ("right lung", "nodule", 2), ("spleen", "hypodense lesion", 1)]


def test_does_it_contain_a_kind_is_answered_for_that_kind() -> None:
    lesions = [("left cerebral hemisphere", "cyst")]
    counts = Counter(o for o, _k in lesions)
    kinds = Counter(lesions)
    t = "does the {organ} contain a {kind} ?"
    site = "left cerebral hemisphere"
    assert answer_for(t, site, counts, HEAD_MR, "cyst", kinds) == "yes"
    assert answer_for(t, site, counts, HEAD_MR, "mass", kinds) == "no"
    assert answer_for("which organ has a lesion ?", site, counts, HEAD_MR) == site


def test_domains_are_looked_up_by_name_and_old_folders_are_chest_abdomen() -> None:
    assert get_domain(None) is CHEST_ABDOMEN_CT and get_domain("") is CHEST_ABDOMEN_CT
    for name, dom in DOMAINS.items():
        assert get_domain(name) is dom and get_domain(dom) is dom
    with pytest.raises(ValueError, match="unknown domain 'knee'"):
        get_domain("knee")


def test_a_domain_must_be_complete() -> None:
    with pytest.raises(ValueError, match="kinds"):
        Domain("x", "x", ("region", "a"), ("a",), {}, {}, {}, {}, "ct")
    with pytest.raises(ValueError, match="plural"):
        Domain("x", "x", ("region", "a"), ("a",), {"a": ("k",)}, {}, {"k": "k"},
               {"k": "ks"}, "ct")
    with pytest.raises(ValueError, match="intensity"):
        Domain("x", "x", ("region", "a"), ("a",), {"a": ("k",)}, {"k": "ks"}, {"k": "k"},
               {"k": "ks"}, "pet")
