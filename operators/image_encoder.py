"""ImageEncoderOperator: the image side of the model (volume to tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from holoscan.core import InputContext, OutputContext
from monai.deploy.core import Fragment, OperatorSpec

from operators.base import RunState, StepOperator
from tomoscribe.model.scribe import load_cached
from tomoscribe.volume import Volume


class ImageEncoderOperator(StepOperator):
    """Encode a volume with the model's 3D/2D encoders.

    The model is loaded once per process and folder
    (:func:`tomoscribe.model.scribe.load_cached`) and shared with
    :class:`~operators.language_model.LanguageModelOperator`.

    Named input:
        image: a :class:`tomoscribe.volume.Volume`.

    Named output:
        encoded: a :class:`tomoscribe.model.api.Encoded` (image tokens
        ``(1, T, C)``, segmentation logits ``(1, K, d, h, w)``...).
    """

    INPUT = "image"
    OUTPUT = "encoded"

    def __init__(
        self, fragment: Fragment, *args: Any, state: RunState, model_dir: Path | None, **kwargs: Any
    ) -> None:
        """Create the operator.

        Args:
            fragment: the application.
            state: the run's shared state.
            model_dir: the model folder; ``None``: the default model.
        """
        self.model_dir = model_dir
        super().__init__(fragment, *args, state=state, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT)
        spec.output(self.OUTPUT)

    def step(self, op_input: InputContext, op_output: OutputContext) -> None:
        volume: Volume = op_input.receive(self.INPUT)
        scribe = load_cached(self.model_dir)
        op_output.emit(scribe.encode(volume), self.OUTPUT)
