"""LanguageModelOperator: the report (findings, impression, answers) from image tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from holoscan.core import InputContext, OutputContext
from monai.deploy.core import Fragment, OperatorSpec

from operators.base import RunState, StepOperator
from tomoscribe.model.api import Encoded
from tomoscribe.model.scribe import load_cached


class LanguageModelOperator(StepOperator):
    """Generate the draft report and answer the standing questions.

    A report on an image that does not show what the model reads (its
    scope's anatomy check, :meth:`tomoscribe.model.scribe.Scribe.check_anatomy`)
    is not emitted: the run ends with
    :class:`~tomoscribe.errors.OutOfScopeError` and writes nothing.

    Named input:
        encoded: a :class:`tomoscribe.model.api.Encoded`.

    Named output:
        report: a :class:`tomoscribe.report.Report` on the source volume's grid.
    """

    INPUT = "encoded"
    OUTPUT = "report"

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
            state: RunState,
            model_dir: Path | None,
            questions: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        """Create the operator.

        Args:
            fragment: the application.
            state: the run's shared state.
            model_dir: the model folder; ``None``: the default model.
            questions: free-text questions the report must answer.
        """
        self.model_dir = model_dir
        self.questions = tuple(questions)
        super().__init__(fragment, *args, state=state, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT)
        spec.output(self.OUTPUT)

    def step(self, op_input: InputContext, op_output: OutputContext) -> None:
        encoded: Encoded = op_input.receive(self.INPUT)
        scribe = load_cached(self.model_dir)
        report = scribe.generate(encoded, self.questions)
        scribe.check_anatomy(report, encoded.volume)  # OutOfScopeError: no report on a head CT
        self.state.report_text = report.text
        self.state.explanation.extend(
            f"report: withheld, no lesion segmented there: {sentence}"
            for sentence in report.withheld)
        self.state.explanation.extend(
            f"report: added, the text left out a lesion that stands out on the image: {sentence}"
            for sentence in report.added)
        self.state.answers = [(a.question, a.answer) for a in report.answers]
        self.state.answer_slices = [tuple(a.key_slices) for a in report.answers]
        op_output.emit(report, self.OUTPUT)
