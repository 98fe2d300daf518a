"""Domains: what a model reads (anatomy, lesions, words, intensities), one definition each."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tomoscribe.domain import CHEST_ABDOMEN_CT, DOMAINS, HEAD_MR, Domain, get_domain
from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.preprocess import labels_to_model_grid, prepare
from tomoscribe.model.scribe import Scribe
from tomoscribe.model.text import (
    NEGATIONS,
    PARAPHRASES,
    QUESTION_TEMPLATES,
    REFER_PARAPHRASES,
    REFER_TEMPLATES,
    VOCAB,
    QuestionMatch,
    WordTokenizer,
    answer_for,
    answer_from_findings,
    findings_to_text,
    flip_yes_no,
    match_question,
    parse_findings,
    phrasings,
    vocabulary,
    with_closing_mark,
)
from tomoscribe.phantom import SPLITS
from tomoscribe.phantom_head import (
    HEAD_STRUCTURES,
    LESION_SITES,
    head_report_text,
    make_head_phantom,
    render_head_acquisition,
)
from tomoscribe.phantom_head import LESION_KINDS as HEAD_KIND_ODDS
from tomoscribe.scope import DEFAULT_MODEL_DIR
from tomoscribe.train import draw_question, make_sample, sample_domain, sample_report, save_model
from tomoscribe.train import main as train_main
from tomoscribe.volume import SliceRef, Volume

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
    assert (f.organ, f.kind, f.count, f.kinds) == ("cerebellum", "mass", 3, ("mass", "cyst"))
    (one,) = parse_findings("cerebellum : one cyst .", HEAD_MR)
    assert one.kinds == ("cyst",) and one.kind == "cyst"
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


@pytest.mark.parametrize(("domain", "question", "expected"), [
    (CHEST_ABDOMEN_CT, "segment the lesions in the liver .", True),
    (CHEST_ABDOMEN_CT, "Segment the nodules in the right lung", True),
    (CHEST_ABDOMEN_CT, "segment the cyst of the left kidney?", True),
    (CHEST_ABDOMEN_CT, "segment the lesions .", True),
    (CHEST_ABDOMEN_CT, "segment the liver .", False),
    (CHEST_ABDOMEN_CT, "segment the left lung .", False),
    (HEAD_MR, "segment the masses in the cerebellum .", True),
    (HEAD_MR, "segment the cerebellum .", False),
    (HEAD_MR, "segment the massive right cerebral hemisphere", False),
])
def test_a_question_about_lesions_is_told_from_one_about_a_structure(
        domain: Domain, question: str, expected: bool) -> None:
    assert domain.asks_for_lesions(question) is expected


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


# ---------------------------------------------------------------- MR images


def _head(seed: int, plane: str = "axial", sequence: str = "T1",
          shape: tuple[int, int, int] = (24, 96, 96)
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    ph = make_head_phantom(seed, plane=plane, sequence=sequence, shape=shape,
                           lesion_probability=1.0)
    values, labels, aff = render_head_acquisition(ph)
    return values * np.float32(ph.scale), labels, aff, ph.scale


@pytest.mark.parametrize("sequence", ["T1", "T2", "FLAIR"])
def test_mr_input_does_not_depend_on_the_scanners_scale(sequence: str) -> None:
    values, _labels, aff, _scale = _head(3, sequence=sequence)
    x1, g1 = prepare(values, aff, (16, 32, 32), "mr")
    x2, g2 = prepare(values * np.float32(7.3), aff, (16, 32, 32), "mr")
    assert replace(g2, windows=g1.windows) == g1  # the same crop...
    assert np.allclose(np.array(g2.windows), 7.3 * np.array(g1.windows), rtol=1e-4)  # ...levels
    assert torch.allclose(x1, x2, atol=1e-5)
    assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0
    # the two channels are not the same picture: the second stretches the tissue range
    assert not torch.allclose(x1[0, 0], x1[0, 1], atol=0.05)


def test_mr_crop_is_the_head_not_the_noisy_field_of_view() -> None:
    values, labels, aff, _scale = _head(4, shape=(24, 128, 128))
    _x, grid = prepare(values, aff, (16, 32, 32), "mr")
    # the in-plane box hugs the head (labels > 0) within the margin, though
    # the air is Rician noise, never below zero
    canon_head = np.transpose(labels > 0, grid.perm)
    for axis in (1, 2):
        prof = np.nonzero(canon_head.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        assert grid.start[axis] >= int(prof[0]) - 4
        assert grid.stop[axis] <= int(prof[-1]) + 1 + 4
        assert grid.start[axis] <= int(prof[0]) and grid.stop[axis] >= int(prof[-1]) + 1
    # read as CT (every MR value is above -500 "HU"), the whole field of view is the body
    _ct, ct_grid = prepare(values, aff, (16, 32, 32), "ct")
    assert ct_grid.start == (0, 0, 0) and ct_grid.stop == ct_grid.canonical_shape()


def test_an_unknown_intensity_is_refused() -> None:
    values, _labels, aff, _scale = _head(1)
    with pytest.raises(ValueError, match="intensity"):
        prepare(values, aff, (16, 32, 32), "pet")


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_head_samples_of_every_plane_land_on_the_model_grid(plane: str) -> None:
    values, labels, aff, _scale = _head(5, plane=plane)
    _x, grid = prepare(values, aff, (16, 32, 32), "mr")
    y = labels_to_model_grid(labels, grid)
    back = grid.to_source_labels(y)
    assert back.shape == labels.shape
    # every structure survives the round trip through the model grid
    assert set(np.unique(y)) >= {1, 2, 3, 4}


def test_make_sample_draws_head_phantoms_for_the_head_domain() -> None:
    s = make_sample(SPLITS["train"][0], (16, 32, 32), HEAD_MR)
    assert s["domain"] == "mr-head"
    assert s["x"].shape == (2, 16, 32, 32)  # type: ignore[union-attr]
    y = s["y"]
    assert isinstance(y, np.ndarray) and int(y.max()) <= HEAD_MR.lesion_label
    ph = make_head_phantom(SPLITS["train"][0])
    assert s["lesions"] == [(les.site, les.kind) for les in ph.lesions]
    assert sample_report(s) == head_report_text(ph)
    # chest-abdomen samples are what they were, and old caches (no "domain") read as such
    ct = make_sample(SPLITS["train"][0], (16, 32, 32))
    assert sample_domain(ct) is CHEST_ABDOMEN_CT
    assert sample_domain({k: v for k, v in ct.items() if k != "domain"}) is CHEST_ABDOMEN_CT


def test_head_questions_ask_about_head_sites_and_kinds() -> None:
    rng = np.random.default_rng(0)
    lesions = [("cerebellum", "cyst")]
    for _ in range(60):
        template, organ, q, a = draw_question(lesions, rng, HEAD_MR)
        assert organ in HEAD_MR.sites
        assert WordTokenizer(vocabulary(HEAD_MR)).unk_id not in WordTokenizer(
            vocabulary(HEAD_MR)).encode(f"{q} {a}")
        if template.startswith("does the"):
            assert a == ("yes" if (organ == "cerebellum" and "cyst" in q) else "no")


# ---------------------------------------------------------------- a head model

HEAD_SMALL = NetConfig.for_domain(HEAD_MR)
HEAD_SMALL.model_shape = (16, 32, 32)
HEAD_SMALL.channels = (8, 8, 16, 16)


def test_a_head_model_has_the_heads_classes_words_and_scope(tmp_path: Path) -> None:
    assert (HEAD_SMALL.num_classes, HEAD_SMALL.lesion_class) == (7, 6)
    assert HEAD_SMALL.organ_classes == (1, 2, 3, 4, 5)
    torch.manual_seed(0)
    net = ScribeNet(HEAD_SMALL)
    save_model(net, tmp_path, {"version": "0.0.1-head"})
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["net"]["domain"] == "mr-head"
    assert conf["scope"]["modalities"] == ["MR"] and "HEAD" in conf["scope"]["body_parts"]
    scribe = Scribe.load(tmp_path)
    assert scribe.domain is HEAD_MR
    values, _labels, aff, _scale = _head(2, plane="sagittal")
    vol = Volume(values, aff, [SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.4")
                               for k in range(values.shape[0])])
    enc = scribe.encode(vol)
    assert enc.seg_logits.shape == (1, 7, *HEAD_SMALL.model_shape)
    report = scribe.generate(enc, ["is there a lesion in the cerebellum ?"])
    assert report.label_map.shape == vol.shape
    assert len(report.answers) == 1
    for f in report.findings:  # an untrained model may write anything, but only head sites
        assert f.structure in HEAD_MR.sites
    assert {s.structure for s in report.segments} <= set(HEAD_MR.structures)


def test_a_joint_training_run_on_head_phantoms(tmp_path: Path) -> None:
    out = tmp_path / "head"
    assert train_main(["--domain", "mr-head", "--out", str(out), "--checkpoint",
                       str(tmp_path / "ck"), "--samples", "3", "--steps", "2", "--batch", "2",
                       "--workers", "1", "--lm-start", "1", "--version", "0.0.1-head"]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["net"]["domain"] == "mr-head" and conf["net"]["num_classes"] == 7
    assert tuple(conf["net"]["vocab"]) == vocabulary(HEAD_MR)
    assert (tmp_path / "ck" / "cache-mr-head-3-48x96x96.pt").is_file()
    assert Scribe.load(out).domain is HEAD_MR
    # a chest-abdomen model cannot be continued as a head model
    with pytest.raises(SystemExit):
        train_main(["--domain", "mr-head", "--init", str(DEFAULT_MODEL_DIR), "--stage",
                    "language", "--out", str(tmp_path / "x")])


def test_the_cli_drafts_a_head_mr_study_with_a_head_model(tmp_path: Path) -> None:
    """A head model folder reads a head MR series (and writes SR + SEG coded for the head);
    it skips a chest-abdomen CT, as the chest-abdomen model skips the head."""
    import pydicom

    from tomoscribe.cli import main as cli_main
    from tomoscribe.phantom import make_phantom, write_dicom_series
    from tomoscribe.phantom_head import write_head_series
    from tomoscribe.scope import HEAD_MR as HEAD_SCOPE

    torch.manual_seed(0)
    # an untrained model segments whatever it likes: the image check (sizes) would
    # refuse it, so this folder declares the head's headers only
    scope = replace(HEAD_SCOPE, volumes=()).to_dict()
    save_model(ScribeNet(HEAD_SMALL), tmp_path / "model", {"version": "0.0.1-head",
                                                           "scope": scope})
    ph = make_head_phantom(SPLITS["test"][3], plane="coronal", shape=(16, 64, 64),
                           lesion_probability=1.0)
    write_head_series(ph, tmp_path / "head")
    out = tmp_path / "out"
    assert cli_main(["run", "-i", str(tmp_path / "head"), "-o", str(out), "-m",
                     str(tmp_path / "model"), "-q", "is there a lesion in the cerebellum ?"]) == 0
    seg = next(out.glob("SEG_*.dcm"))
    assert next(out.glob("SR_*.dcm")).is_file()
    types = {str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
             for s in pydicom.dcmread(seg).SegmentSequence}
    # an untrained model segments whatever it likes, but only as head structures
    assert types <= {"69536005", "372073000", "113305005", "66720007", "4147007", "367643001",
                     "52988006"}
    write_dicom_series(make_phantom(9, shape=(8, 48, 48)), tmp_path / "ct")
    assert cli_main(["run", "-i", str(tmp_path / "ct"), "-o", str(tmp_path / "out2"), "-m",
                     str(tmp_path / "model")]) == 3
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def test_a_question_about_another_domains_structures_is_routed_away() -> None:
    from tomoscribe.domain import CHEST_ABDOMEN_CT, HEAD_MR, about_other_domain

    ct, head = CHEST_ABDOMEN_CT, HEAD_MR
    assert about_other_domain("is there a lesion in the liver ?", head) is ct
    assert about_other_domain("Any nodules in the lungs?", head) is ct  # plural, case
    assert about_other_domain("is the left kidney normal", head) is ct
    assert about_other_domain("is the cerebellum normal ?", ct) is head
    assert about_other_domain("Lateral ventricles enlarged?", ct) is head
    # its own structures, or none at all: the question is for the model
    for q in ("is there a lesion in the liver ?", "are there any focal findings ?",
              "is the left side normal ?"):
        assert about_other_domain(q, ct) is None
    assert about_other_domain("is there a mass in the right cerebral hemisphere ?", head) is None
    # naming both: each model answers for its own part
    both = "is there a lesion in the liver or the cerebellum ?"
    assert about_other_domain(both, ct) is None and about_other_domain(both, head) is None


@pytest.mark.parametrize(("domain", "question", "expected"), [
    (CHEST_ABDOMEN_CT, "is there a lesion in the liver ?",
     ("is there a lesion in the {organ} ?", "liver", None)),
    (CHEST_ABDOMEN_CT, "Is there a lesion in the  Liver?",
     ("is there a lesion in the {organ} ?", "liver", None)),
    (CHEST_ABDOMEN_CT, "does the right kidney contain a cyst",
     ("does the {organ} contain a {kind} ?", "right kidney", "cyst")),
    (CHEST_ABDOMEN_CT, "Which organ has a lesion?", ("which organ has a lesion ?", "", None)),
    (HEAD_MR, "does the cerebellum contain a mass ?",
     ("does the {organ} contain a {kind} ?", "cerebellum", "mass")),
    # the same questions in other words
    (CHEST_ABDOMEN_CT, "Are there lesions in the liver?",
     ("is there a lesion in the {organ} ?", "liver", None)),
    (CHEST_ABDOMEN_CT, "does the spleen have a lesion",
     ("is there a lesion in the {organ} ?", "spleen", None)),
    (CHEST_ABDOMEN_CT, "Is there a nodule in the right lung?",
     ("does the {organ} contain a {kind} ?", "right lung", "nodule")),
    (CHEST_ABDOMEN_CT, "how many nodules are in the left lung ?",
     ("how many lesions are in the {organ} ?", "left lung", None)),
    (CHEST_ABDOMEN_CT, "Is there a lesion?", ("are there any focal findings ?", "", None)),
    (CHEST_ABDOMEN_CT, "where are the lesions?", ("which organ has a lesion ?", "", None)),
    (CHEST_ABDOMEN_CT, "Is the study normal?",
     ("are there any focal findings ?", "", None, True)),
    (HEAD_MR, "is there a cyst in the cerebellum",
     ("does the {organ} contain a {kind} ?", "cerebellum", "cyst")),
    # a count of one kind where a site holds two is not the site's count
    (HEAD_MR, "how many cysts are in the cerebellum ?", None),
    # a kind the site does not hold, a structure that holds no lesion, free text
    (CHEST_ABDOMEN_CT, "does the liver contain a cyst ?", None),
    (CHEST_ABDOMEN_CT, "is the body normal ?", None),
    (CHEST_ABDOMEN_CT, "is there a lesion in the liver or the spleen ?", None),
    (HEAD_MR, "is there a lesion in the liver ?", None),
])
def test_a_question_is_matched_to_its_template_word_for_word(
        domain: Domain, question: str, expected: tuple[str, ...] | None) -> None:
    got = match_question(question, domain)
    assert got == (QuestionMatch(*expected) if expected is not None else None)


def test_the_findings_answer_each_templated_question() -> None:
    """What the report says, read back: counts, kinds, the organs named, in domain order."""
    text = ("right lung : two nodules . liver : one hypodense lesion . "
            "impression : right lung nodules , liver lesion .")
    found = parse_findings(text)
    expected = {
        ("is there a lesion in the {organ} ?", "liver", None): "yes",
        ("is there a lesion in the {organ} ?", "spleen", None): "no",
        ("does the {organ} contain a {kind} ?", "right lung", "nodule"): "yes",
        ("how many lesions are in the {organ} ?", "right lung", None): "two",
        ("how many lesions are in the {organ} ?", "left kidney", None): "zero",
        ("is the {organ} normal ?", "liver", None): "no",
        ("is the {organ} normal ?", "spleen", None): "yes",
        ("which organ has a lesion ?", "", None): "right lung , liver",
        ("are there any focal findings ?", "", None): "yes",
    }
    for match, answer in expected.items():
        assert answer_from_findings(QuestionMatch(*match), found) == answer, match
    focal = QuestionMatch("are there any focal findings ?", "", None)
    assert answer_from_findings(focal._replace(negated=True), found) == "no"  # study normal?
    normal = parse_findings("no focal abnormality . impression : normal study .")
    assert answer_from_findings(focal, normal) == "no"
    assert answer_from_findings(focal._replace(negated=True), normal) == "yes"
    assert answer_from_findings(QuestionMatch("which organ has a lesion ?", "", None),
                                normal) == "none"
    head = parse_findings("cerebellum : one mass and one cyst . impression : cerebellum mass "
                          "and cyst .", HEAD_MR)
    t = "does the {organ} contain a {kind} ?"
    for site, kind, answer in (("cerebellum", "cyst", "yes"), ("cerebellum", "mass", "yes"),
                               ("left cerebral hemisphere", "mass", "no")):
        assert answer_from_findings(QuestionMatch(t, site, kind), head, HEAD_MR) == answer
    count = QuestionMatch("how many lesions are in the {organ} ?", "cerebellum", None)
    assert answer_from_findings(count, head, HEAD_MR) == "two"


@pytest.mark.parametrize(("question", "expected"), [
    ("is the spleen normal", "is the spleen normal ?"),
    ("  segment the liver ", "segment the liver ."),
    ("Is there a lesion in the liver?", "Is there a lesion in the liver?"),
    ("segment the lesions .", "segment the lesions ."),
    ("", ""),
])
def test_a_question_gets_the_closing_mark_training_questions_have(question: str,
                                                                  expected: str) -> None:
    assert with_closing_mark(question) == expected


@pytest.mark.parametrize("domain", [CHEST_ABDOMEN_CT, HEAD_MR])
def test_no_two_phrasings_are_taken_for_one_another(domain: Domain) -> None:
    """Every template and other wording, filled in, is matched to what it asks."""
    for referring, entries in ((False, {**PARAPHRASES, **NEGATIONS}),
                               (True, REFER_PARAPHRASES)):
        filled = list(phrasings(domain, referring))
        templates = REFER_TEMPLATES if referring else QUESTION_TEMPLATES
        # every entry is filled in for some site, but a "{kinds}" one needs a one-kind site
        one_kind = any(domain.single_kind(site) for site in domain.sites)
        assert {p for p, _q, _m in filled} == set(templates) | {
            p for p in entries if one_kind or "{kinds}" not in p}
        assert len(filled) > len(templates) * len(domain.sites)
        for _phrasing, question, match in filled:
            assert match_question(question, domain, referring) == match, question
            assert match_question(match.question, domain, referring) == match._replace(
                negated=False), question  # asked in the template's own words


@pytest.mark.parametrize(("domain", "request_", "expected"), [
    (CHEST_ABDOMEN_CT, "segment liver", "segment the liver ."),
    (CHEST_ABDOMEN_CT, "Segment the liver lesions.", "segment the lesions in the liver ."),
    (CHEST_ABDOMEN_CT, "segment the nodules in the right lung",
     "segment the lesions in the right lung ."),
    (CHEST_ABDOMEN_CT, "segment all lesions", "segment the lesions ."),
    (HEAD_MR, "segment lateral ventricles", "segment the lateral ventricles ."),
    # the region, another domain's organ, one kind of two, a structure with no lesions
    (CHEST_ABDOMEN_CT, "segment the body", None),
    (HEAD_MR, "segment the liver", None),
    (HEAD_MR, "segment the cysts in the cerebellum", None),
    (HEAD_MR, "segment the lesions in the lateral ventricles", None),
])
def test_a_segment_request_is_matched_to_its_template(domain: Domain, request_: str,
                                                      expected: str | None) -> None:
    match = match_question(request_, domain, referring=True)
    assert (match.question if match is not None else None) == expected


def test_a_question_that_inverts_its_template_is_told_apart() -> None:
    def negated(q: str) -> bool:
        match = match_question(q)
        return match is not None and match.negated

    assert negated("Is the study normal?") and negated("is this study normal")
    assert not negated("is the study abnormal ?") and not negated("is the liver normal ?")
    assert [flip_yes_no(a) for a in ("Yes", "no .", "No. (Asked ...)", "None", "yesterday")] == [
        "No", "yes .", "Yes. (Asked ...)", "None", "yesterday"]
