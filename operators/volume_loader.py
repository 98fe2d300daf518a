"""VolumeLoaderOperator: decode the chosen series into a :class:`~tomoscribe.volume.Volume`."""

from __future__ import annotations

from holoscan.core import InputContext, OutputContext
from monai.deploy.core import OperatorSpec

from operators.base import StepOperator
from tomoscribe.dicomio import Selection, load_series


class VolumeLoaderOperator(StepOperator):
    """Read the pixels of the selected series.

    Named input:
        study_selected_series_list: a :class:`tomoscribe.dicomio.Selection`.

    Named output:
        image: the :class:`tomoscribe.volume.Volume`, voxels ``(D, H, W)``
        float32 with its affine and per-slice provenance.
    """

    INPUT = "study_selected_series_list"
    OUTPUT = "image"

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT)
        spec.output(self.OUTPUT)

    def step(self, op_input: InputContext, op_output: OutputContext) -> None:
        selection: Selection = op_input.receive(self.INPUT)
        volume = load_series(selection.chosen)
        self.state.explanation.extend(f"load: {note}" for note in volume.notes)
        op_output.emit(volume, self.OUTPUT)
