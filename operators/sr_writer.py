"""Report writers: the draft SR, the TID 1500 measurement SR and the PDF report.

``SRWriterOperator`` writes the Comprehensive SR, ``MeasurementsWriterOperator``
the measurement SR (nothing when no finding has a segment) and
``PDFWriterOperator`` the Encapsulated PDF; all stage their file atomically in
the run's staging folder.
"""

from __future__ import annotations

from typing import Any

from holoscan.core import InputContext, OutputContext
from monai.deploy.core import Fragment, OperatorSpec

from operators.base import RunState, StepOperator, write_dataset
from operators.seg_writer import SegOutput
from tomoscribe.report import Report
from tomoscribe.volume import Volume
from tomoscribe.writers import build_measurement_sr, build_pdf_report, build_sr


class SRWriterOperator(StepOperator):
    """Build the SR (``tomoscribe.writers.build_sr``) and write it atomically.

    Named inputs:
        report: a :class:`tomoscribe.report.Report`.
        image: the :class:`tomoscribe.volume.Volume` it was made from.
        seg: a :class:`~operators.seg_writer.SegOutput` (only with
            ``with_seg``): findings with a segment then reference that SEG,
            answers with a mask the answer SEG.
    """

    def __init__(
        self, fragment: Fragment, *args: Any, state: RunState, with_seg: bool, **kwargs: Any
    ) -> None:
        """Create the operator.

        Args:
            fragment: the application.
            state: the run's shared state.
            with_seg: declare the ``seg`` input (the SEG writer runs too).
        """
        self.with_seg = with_seg
        super().__init__(fragment, *args, state=state, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("report")
        spec.input("image")
        if self.with_seg:
            spec.input("seg")

    def step(self, op_input: InputContext, op_output: OutputContext) -> None:
        report: Report = op_input.receive("report")
        volume: Volume = op_input.receive("image")
        seg: SegOutput | None = op_input.receive("seg") if self.with_seg else None
        sr = build_sr(report, volume, seg=seg.dataset if seg is not None else None,
                      answer_seg=seg.answers if seg is not None else None)
        path = write_dataset(sr, self.state.staging, f"SR_{sr.SOPInstanceUID}.dcm")
        self.state.written.append(path)


class MeasurementsWriterOperator(SRWriterOperator):
    """Build the TID 1500 measurement SR (``build_measurement_sr``) and write it atomically.

    Same inputs as :class:`SRWriterOperator`; a report without a segmented
    finding gives no file.
    """

    def step(self, op_input: InputContext, op_output: OutputContext) -> None:
        report: Report = op_input.receive("report")
        volume: Volume = op_input.receive("image")
        seg: SegOutput | None = op_input.receive("seg") if self.with_seg else None
        sr = build_measurement_sr(report, volume, seg.dataset if seg is not None else None)
        if sr is not None:
            path = write_dataset(sr, self.state.staging, f"MEAS_{sr.SOPInstanceUID}.dcm")
            self.state.written.append(path)


class PDFWriterOperator(StepOperator):
    """Build the Encapsulated PDF report (``build_pdf_report``) and write it atomically.

    Named inputs:
        report: a :class:`tomoscribe.report.Report`.
        image: the :class:`tomoscribe.volume.Volume` it was made from.
    """

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("report")
        spec.input("image")

    def step(self, op_input: InputContext, op_output: OutputContext) -> None:
        report: Report = op_input.receive("report")
        volume: Volume = op_input.receive("image")
        doc = build_pdf_report(report, volume)
        path = write_dataset(doc, self.state.staging, f"PDF_{doc.SOPInstanceUID}.dcm")
        self.state.written.append(path)
