"""SEGWriterOperator: the report's label map, and the referring answers' masks, as DICOM SEG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from holoscan.core import InputContext, OutputContext
from monai.deploy.core import ConditionType, OperatorSpec
from pydicom.dataset import Dataset

from operators.base import StepOperator, write_dataset
from tomoscribe.report import Report
from tomoscribe.volume import Volume
from tomoscribe.writers import build_answer_seg, build_seg


@dataclass(frozen=True)
class SegOutput:
    """What the SEG writer emits: the SEG it wrote, or nothing for an empty label map.

    ``answers`` is the SEG of the masks answering referring questions
    ("segment the liver ."), ``None`` when no answer has one.
    """

    dataset: Dataset | None
    path: Path | None
    answers: Dataset | None = None


class SEGWriterOperator(StepOperator):
    """Build the SEG (``tomoscribe.writers.build_seg``) and write it atomically.

    A report whose label map has no voxels gives no SEG (nothing is written).
    Answers with a mask get a second SEG, in a series of their own
    (``tomoscribe.writers.build_answer_seg``).

    Named inputs:
        report: a :class:`tomoscribe.report.Report`.
        image: the :class:`tomoscribe.volume.Volume` it was made from.

    Named output:
        seg: a :class:`SegOutput`, so the SR can reference the SEG
        (receiver optional).
    """

    INPUTS = ("report", "image")
    OUTPUT = "seg"

    def setup(self, spec: OperatorSpec) -> None:
        for name in self.INPUTS:
            spec.input(name)
        spec.output(self.OUTPUT).condition(ConditionType.NONE)

    def step(self, op_input: InputContext, op_output: OutputContext) -> None:
        report: Report = op_input.receive("report")
        volume: Volume = op_input.receive("image")
        seg = build_seg(report, volume)
        answers = build_answer_seg(report, volume)
        path = None
        if seg is not None:
            path = write_dataset(seg, self.state.staging, f"SEG_{seg.SOPInstanceUID}.dcm")
            self.state.written.append(path)
        if answers is not None:
            self.state.written.append(write_dataset(
                answers, self.state.staging, f"QSEG_{answers.SOPInstanceUID}.dcm"))
        op_output.emit(SegOutput(seg, path, answers), self.OUTPUT)
