"""SeriesSelectorOperator: scan the input folder's headers and choose one series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from holoscan.core import InputContext, OutputContext
from monai.deploy.core import Fragment, OperatorSpec

from operators.base import RunState, StepOperator
from tomoscribe.dicomio import scan_folder, select_series
from tomoscribe.scope import read_scope


class SeriesSelectorOperator(StepOperator):
    """Index a study folder (headers only) and pick the series to read.

    Only series the model was trained to read qualify (its declared
    :class:`~tomoscribe.scope.ModelScope`): a study with none of them ends
    with :class:`~tomoscribe.errors.OutOfScopeError`, never with a report.

    Unlike MONAI Deploy's ``DICOMSeriesSelectorOperator`` it reads the folder
    itself (no ``dicom_study_list`` input): scanning headers is cheap and
    pixels are decoded only for the chosen series, by the next operator.

    Named output:
        study_selected_series_list: a :class:`tomoscribe.dicomio.Selection`
        (the chosen series and one line of reasoning per series).
    """

    OUTPUT = "study_selected_series_list"

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
            state: RunState,
            input_folder: Path,
            rules: dict[str, Any] | None = None,
            model_dir: Path | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the operator.

        Args:
            fragment: the application.
            state: the run's shared state.
            input_folder: the study's folder (searched recursively).
            rules: selection rules (``select_series`` grammar); ``None``: the default.
            model_dir: the model folder whose declared scope (``config.json``'s
                ``scope``, :mod:`tomoscribe.scope`) a series must be in;
                ``None``: the default model.
        """
        self.input_folder = Path(input_folder)
        self.rules = rules
        self.model_dir = model_dir
        super().__init__(fragment, *args, state=state, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output(self.OUTPUT)

    def step(self, op_input: InputContext, op_output: OutputContext) -> None:
        index = scan_folder(self.input_folder)
        scope = read_scope(self.model_dir)
        if not scope.declared:
            self.state.explanation.append("scope: the model declares none; any series may be read")
        selection = select_series(index, self.rules, scope)
        self.state.explanation.extend(selection.explanation)
        self.state.explanation.extend(f"scan: {note}" for note in index.notes)
        op_output.emit(selection, self.OUTPUT)
