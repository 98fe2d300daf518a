"""The ``tomoscribe`` command and ``python -m operators``.

Most cases call :func:`tomoscribe.cli.main` in this process (holoscan starts
once, and ``capfd`` sees anything holoscan writes to file descriptor 2); two
run as real subprocesses: the console script, and ``python -m operators`` with
MONAI Deploy's environment variables.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from tomoscribe import __version__
from tomoscribe.cli import EXIT_ERROR, EXIT_SKIPPED, build_parser, main
from tomoscribe.dicomio.synth import write_series
from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.phantom import make_phantom, write_dicom_series
from tomoscribe.report import ORGANS
from tomoscribe.scope import CHEST_ABDOMEN_CT
from tomoscribe.train import save_model

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
QUESTION = "is there a lesion in the liver ?"
HEADERS_ONLY = dataclasses.replace(CHEST_ABDOMEN_CT, anatomy=()).to_dict()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = ScribeNet(NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16)))
    bias = net.seg.out.bias
    assert bias is not None
    with torch.no_grad():  # segmentation says "liver" everywhere: there is always a SEG
        net.seg.out.weight.zero_()
        bias.fill_(-10.0)
        bias[ORGANS.index("liver") + 1] = 10.0
    # a toy model: the header checks of the shipped scope, not its anatomy check (which
    # refuses "liver" everywhere, see test_image_check_refuses_what_the_model_cannot_read)
    save_model(net, base / "model", {"version": "0.0.1-test", "scope": HEADERS_ONLY})
    save_model(net, base / "model-checked", {"version": "0.0.1-test"})
    write_dicom_series(make_phantom(7, lesion_probability=1.0, shape=(16, 40, 40)), base / "study")
    junk = base / "junk"
    junk.mkdir()
    (junk / "IM0001").write_bytes(os.urandom(4096))
    (junk / "IM0002.dcm").write_bytes(os.urandom(300))
    sr_only = base / "sr_only"
    sr_only.mkdir()
    shutil.copy(str(get_testdata_file("test-SR.dcm")), sr_only / "IM0001")
    mr = base / "mr"  # a series the model was not trained on: MR
    write_series(mr, n=12, modality="MR", slope=1.0, intercept=0.0)
    head = base / "head"  # CT, but of the head
    write_dicom_series(make_phantom(8, shape=(16, 40, 40)), head)
    for path in head.iterdir():
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "HEAD"
        ds.save_as(path)
    return {"model": base / "model", "model_checked": base / "model-checked",
            "study": base / "study", "junk": junk, "sr_only": sr_only,
            "mr": mr, "head": head}


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, **(env or {})})


def _one_error_line(stderr: str, kind: str = "error") -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"tomoscribe: {kind}: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_help_and_version_import_nothing_heavy() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from tomoscribe.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "    main(['version'])\n"
        "    main(['questions'])\n"
        "print(sorted(m for m in ('torch', 'holoscan', 'monai', 'pydicom') if m in sys.modules))\n"
    )
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"tomoscribe {__version__}"


def test_questions_lists_every_wording_for_the_models_domain(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["questions"]) == 0
    text = capsys.readouterr().out
    assert "is there a lesion in the {organ} ?" in text and "segment the {organ} ." in text
    assert "does the {organ} have a lesion ?" in text
    assert "the opposite: is the study normal ?" in text
    assert "right kidney" in text and "cerebellum" not in text
    assert main(["questions", "-m", "head-mr"]) == 0
    text = capsys.readouterr().out
    assert "cerebellum" in text and "mass (" in text and "liver" not in text
    assert main(["questions", "-m", str(tmp_path)]) == EXIT_ERROR  # no config.json there
    err = capsys.readouterr().err
    assert err.startswith("tomoscribe: error: cannot read the domain") and err.count("\n") == 1


def test_run_help_lists_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{EXIT_SKIPPED} skipped: the model does not read this study" in text
    assert f"{EXIT_ERROR} error" in text


def test_parser_requires_input_and_output() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", "-i", "x"])
    assert info.value.code == 2


def test_console_script_success_writes_sr_and_seg(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run([str(BIN / "tomoscribe"), "run", "-i", str(data["study"]), "-o", str(out),
                 "-m", str(data["model"]), "-q", QUESTION, "-v"])
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.iterdir())
    assert [p.name[:3] for p in files] == ["PDF", "SEG", "SR_"]
    for p in files:
        assert f"wrote {p}" in proc.stdout
    assert pydicom.dcmread(files[0]).Modality == "DOC"
    assert pydicom.dcmread(files[1]).Modality == "SEG"
    assert pydicom.dcmread(files[2]).Modality == "SR"
    assert "chosen: qualifies under" in proc.stdout  # -v: the selection explanation
    assert f"Q: {QUESTION}" in proc.stdout
    # the answer's key images (3D-only model: where the liver segment is largest)
    assert "   key images: " in proc.stdout
    assert "Traceback" not in proc.stderr


def test_operators_main_bad_input_in_process(
    data: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from operators.__main__ import main as operators_main

    out = tmp_path / "out"
    status = operators_main(["-i", str(data["junk"]), "-o", str(out), "-m", str(data["model"])])
    assert status == EXIT_ERROR
    assert "no DICOM files found" in _one_error_line(capfd.readouterr().err)
    assert list(out.iterdir()) == []


def test_python_m_operators_monai_convention(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {"HOLOSCAN_INPUT_PATH": str(data["study"]), "HOLOSCAN_OUTPUT_PATH": str(out)}
    proc = _run([sys.executable, "-m", "operators", "-m", str(data["model"])], env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name[:3] for p in out.iterdir()) == ["PDF", "SEG", "SR_"]


@pytest.mark.parametrize(
    ("which", "status", "kind", "reason"),
    [
        ("junk", EXIT_ERROR, "error", "no DICOM files found"),
        ("sr_only", EXIT_ERROR, "error", "no series qualifies"),
        ("absent", EXIT_ERROR, "error", "does not exist"),
        # outside the model's scope is not an error: its own status and "skipped:"
        ("mr", EXIT_SKIPPED, "skipped",
         "no series the model can read: the model reads CT of the chest and abdomen, not MR"),
        ("head", EXIT_SKIPPED, "skipped",
         "the model reads CT of the chest and abdomen, not Body Part Examined HEAD"),
    ],
)
def test_unread_input_one_line_no_output(
    data: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str],
    which: str, status: int, kind: str, reason: str,
) -> None:
    out = tmp_path / "out"
    folder = data.get(which, tmp_path / "absent")
    assert main(["run", "-i", str(folder), "-o", str(out), "-m", str(data["model"])]) == status
    captured = capfd.readouterr()
    assert reason in _one_error_line(captured.err, kind)
    assert captured.out == ""
    assert not out.exists() or list(out.iterdir()) == []


def test_image_check_refuses_what_the_model_cannot_read(
    data: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A model that calls everything "liver": its report is refused (skipped), nothing written."""
    out = tmp_path / "out"
    status = main(["run", "-i", str(data["study"]), "-o", str(out), "-m",
                   str(data["model_checked"])])
    line = _one_error_line(capfd.readouterr().err, "skipped")
    assert status == EXIT_SKIPPED
    assert "the image does not look like CT of the chest and abdomen: what the model took for " \
           "the liver" in line and "not -20 to 250 HU" in line
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_settings_and_model(
    data: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("tomoscribe:\n  outputs: {sr: false, seg: false}\n")
    out = tmp_path / "out"
    assert main(["run", "-i", str(data["study"]), "-o", str(out), "-c", str(config)]) == 2
    assert "at least one of sr, seg" in _one_error_line(capfd.readouterr().err)
    assert main(["run", "-i", str(data["study"]), "-o", str(out), "-m", str(tmp_path)]) == 2
    assert "lacks config.json" in _one_error_line(capfd.readouterr().err)
    assert not out.exists() or list(out.iterdir()) == []
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["run", "-i", str(data["study"]), "-o", str(a_file), "-m", str(data["model"])]) == 2
    assert "is not a folder" in _one_error_line(capfd.readouterr().err)
