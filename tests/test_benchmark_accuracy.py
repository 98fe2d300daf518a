"""The accuracy benchmark runs end to end on a few test phantoms and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_accuracy_benchmark_prints_and_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--n", "2",
                          "--json", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "GFLOP" in res.stdout and "lesion Dice by size" in res.stdout
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"model", "image-blind", "majority"}
    assert data["test_studies"] == 2
    flops = data["encode_gflops_first_study"]
    assert flops["total"] > 0 and flops["encoder"] > 0 and flops["seg"] > 0
    assert data["parameters"] > 1e6
    assert 0.0 <= data["rows"]["model"]["findings_f1"] <= 1.0
    assert set(data["segmentation_lesions_by_size"]) == set(data["lesion_dice_by_size"])
    assert "segmentation alone" in res.stdout
    # the shipped model answers "segment ..." with a mask: the referring rows are there
    refer = data["referring_segmentation"]
    if refer:
        assert set(refer) == {"model", "image-blind"}
        assert refer["model"]["questions"] == 2 * 13
        assert "referring segmentation (model)" in res.stdout


def test_inference_benchmark_compares_trimming_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "inf.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference.py"), "--n", "2",
                          "--threads", "1", "--json", str(out)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"tomoscribe", "glibc default"}
    for row in data["rows"].values():
        assert row["median_seconds"] > 0 and row["peak_rss_mib"] >= row["rss_last_mib"] > 100
    assert set(data["ratios"]) == {"time", "rss_last", "peak_rss"}
    assert "tomoscribe / glibc default" in res.stdout


def test_head_benchmark_scores_a_head_model_and_refuses_another(tmp_path: Path) -> None:
    import torch

    from tomoscribe.model.network import NetConfig, ScribeNet
    from tomoscribe.train import save_model

    cfg = NetConfig.for_domain("mr-head")
    cfg.model_shape, cfg.channels = (16, 32, 32), (8, 8, 16, 16)
    cfg.refine_width, cfg.seg_token = 4, True  # a refiner on MR, and referring questions
    torch.manual_seed(0)
    save_model(ScribeNet(cfg), tmp_path / "head", {"version": "0.0.0-test"})
    out = tmp_path / "head.json"
    script = str(ROOT / "benchmarks" / "head_accuracy.py")
    res = subprocess.run([sys.executable, script, "--model-dir", str(tmp_path / "head"),
                          "--n", "2", "--json", str(out)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "structure Dice" in res.stdout and "head MR phantoms" in res.stdout
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"model", "image-blind", "majority"}
    assert data["studies"] == 2 and data["domain"] == "mr-head"
    assert data["questions_per_study"] == 17
    assert "key-slice pointing" in res.stdout
    assert set(data["rows"]["model"]) >= {"key_slice_pointing", "key_slice_findings"}
    # lesions by size: the refined segmentation's Dice beside the head's before the refiner
    assert "before the refiner" in res.stdout
    assert all(set(v) == {"dice", "detected", "coarse_dice", "n"}
               for v in data["lesion_dice_by_size"].values())
    # every referring question: 4 structures x 2 templates + "segment the lesions ."
    assert {k: v["questions"] for k, v in data["referring_segmentation"].items()} == {
        "model": 2 * 9, "image-blind": 2 * 9}
    # the majority row answers from the training phantoms' answers: better than chance
    assert data["rows"]["majority"]["closed_vqa_accuracy"] > 0.5
    # the chest-abdomen model is not a head model: one line, exit 2
    res = subprocess.run([sys.executable, script, "--model-dir",
                          str(ROOT / "tomoscribe" / "weights"), "--n", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 2 and "not MR of the head" in res.stderr


def test_retrieval_benchmark_reads_the_models_domain(tmp_path: Path) -> None:
    import torch

    from tomoscribe.model.network import NetConfig, ScribeNet
    from tomoscribe.train import save_model

    cfg = NetConfig.for_domain("mr-head")
    cfg.model_shape, cfg.channels, cfg.align_dim = (16, 32, 32), (8, 8, 16, 16), 16
    torch.manual_seed(0)
    save_model(ScribeNet(cfg), tmp_path / "head", {"version": "0.0.0-test"})
    out = tmp_path / "retrieval.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "retrieval.py"), "--n", "3",
                          "--model-dir", str(tmp_path / "head"), "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["domain"] == "mr-head" and data["studies"] == 3
    assert data["distinct_reports"] >= 1
    assert set(data["recall"]) == {"model", "frequency baseline"}


def test_questions_benchmark_scores_every_phrasing_both_ways(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "questions.py"), "--n", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["phrasings"]
    assert "does the {organ} have a lesion ?" in rows and "is the study normal ?" in rows
    for r in rows.values():
        assert 0.0 <= r["as_typed"] <= 1.0 and 0.0 <= r["as_answered"] <= 1.0 and r["n"] >= 1
    assert set(data["summary"]) == {"templates", "templates, loosely", "other words"}
    assert "all other words" in res.stdout


def test_misses_benchmark_puts_every_error_in_one_stage(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "misses.py"), "--n", "3",
                          "--json", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["missed"]) == {"not segmented", "under the minimum", "grounded elsewhere",
                                   "left out by the text"}
    assert set(data["false"]) == {"another organ's lesion", "false component"}
    assert data["organs_with_lesions"] > 0  # the first three validation phantoms have lesions
    missed = [c for c in data["cases"] if c["error"] == "missed"]
    assert sum(data["missed"].values()) == len(missed)
    assert sum(data["false"].values()) == len([c for c in data["cases"] if c["error"] == "false"])
    for case in data["cases"]:
        assert case["cause"] in set(data["missed"]) | set(data["false"])
    assert "missed, by stage" in res.stdout and "still left out" in res.stdout
    assert "added (left out" in res.stdout
    assert set(data["added"]) == {"true", "false"}
    assert "contrast of the components" in res.stdout and "contrasts" in data
    # the contrast table counts false components apart from the false findings (the JSON's
    # "false" once took the last kind's false components for the false findings)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from misses import contrast_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows: list[dict[str, object]] = [
        {"kind": "nodule", "lesion": True, "contrast": 9.0},
        {"kind": "nodule", "lesion": False, "contrast": 4.5},
        {"kind": "nodule", "lesion": False, "contrast": 1.0},
        {"kind": "cyst", "lesion": True, "contrast": -1.0}]
    table = contrast_table(rows, {"nodule": 4.0, "cyst": -1.5})
    assert table["nodule"] == {"threshold": 4.0, "lesions": 1, "lesions_passing": 1, "false": 2,
                               "false_passing": 1, "false_most_lesion_like": 4.5}
    assert table["cyst"]["lesions_passing"] == 0 and table["cyst"]["false"] == 0
    # a head MR model is traced on head phantoms
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "misses.py"), "--n", "2",
                          "--model-dir", str(ROOT / "tomoscribe" / "weights-head-mr"),
                          "--json", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "head-mr" in json.loads(out.read_text())["model"]
