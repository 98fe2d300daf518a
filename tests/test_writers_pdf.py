"""Encapsulated PDF report of the phantom study: dciodvfy, round trip, pixels of the page."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_writers_measurements import case, needs_dciodvfy, run_dciodvfy  # noqa: F401

import tomoscribe
from tomoscribe.errors import ReportError
from tomoscribe.report import Finding, Report
from tomoscribe.volume import Volume
from tomoscribe.writers import is_tomoscribe_output
from tomoscribe.writers.identity import PDF_SERIES_NUMBER, output_uids
from tomoscribe.writers.pdf import ENCAPSULATED_PDF_STORAGE, build_pdf_report

needs_pdftoppm = pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="poppler-utils")


@needs_dciodvfy
def test_pdf_validates_and_round_trips(case: tuple[Report, Volume],  # noqa: F811
                                       tmp_path: Path) -> None:
    report, volume = case
    ds = build_pdf_report(report, volume)
    path = tmp_path / "pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    run_dciodvfy(path)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    pdf = bytes(back.EncapsulatedDocument)[: int(back.EncapsulatedDocumentLength)]
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    assert back.BurnedInAnnotation == "YES"
    assert back.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert back.SeriesNumber == PDF_SERIES_NUMBER
    assert back.Manufacturer == tomoscribe.MANUFACTURER and is_tomoscribe_output(back)
    assert (back.SeriesInstanceUID, back.SOPInstanceUID) == output_uids(
        volume.study_instance_uid, report.model_version, "pdf")
    source = volume.headers[0]
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate",
                    "AccessionNumber"):
        assert back.get(keyword) == source.get(keyword), keyword
    assert build_pdf_report(report, volume).EncapsulatedDocument == ds.EncapsulatedDocument


@needs_pdftoppm
def test_pdf_page_shows_text_and_outlines(case: tuple[Report, Volume],  # noqa: F811
                                          tmp_path: Path) -> None:
    report, volume = case
    pdf_path = tmp_path / "r.pdf"
    pdf_path.write_bytes(bytes(build_pdf_report(report, volume).EncapsulatedDocument))
    subprocess.run(["pdftoppm", "-png", "-r", "40", "-singlefile", str(pdf_path),
                    str(tmp_path / "page")], check=True, timeout=60)
    from PIL import Image

    page = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).astype(int)
    red = (page[..., 0] > 180) & (page[..., 1] < 60) & (page[..., 2] < 60)  # DRAFT banner
    yellow = (page[..., 0] > 200) & (page[..., 1] > 160) & (page[..., 2] < 80)  # outlines
    assert red[: page.shape[0] // 4].sum() > 500
    assert yellow.sum() > 20
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(pdf_path), "-"], capture_output=True,
                              text=True, check=True, timeout=60).stdout
        assert "DRAFT - not verified" in text
        assert report.findings[0].text in text and report.impression in text
        assert str(volume.headers[0].PatientID) in text


def test_pdf_refuses_bad_reports(case: tuple[Report, Volume]) -> None:  # noqa: F811
    report, volume = case
    first = report.findings[0]
    bad = Report(findings=[Finding(first.text, first.structure, [-1], first.segment)],
                 impression="x.", text="x.", label_map=report.label_map,
                 segments=report.segments)
    with pytest.raises(ReportError, match="out of range"):
        build_pdf_report(bad, volume)
