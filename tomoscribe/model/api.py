"""The contract between the model and the rest of tomoscribe.

Two steps, matching the two operators of the application graph::

    scribe = Scribe.load(model_dir)          # once per process
    encoded = scribe.encode(volume)          # image encoder operator
    report = scribe.generate(encoded, questions)   # language model operator

``Encoded`` is opaque to callers except for the fields documented here; it
keeps a reference to the volume so ``generate`` can put slice indices and the
label map back on the source grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tomoscribe.volume import Volume


@dataclass
class Encoded:
    """Output of :meth:`Scribe.encode`.

    Attributes:
        volume: the source volume (geometry, slice provenance).
        image_tokens: ``(1, N, C)`` tokens for the language model.
        seg_logits: ``(1, K, d, h, w)`` segmentation logits on the model grid.
        slice_features: ``(1, d, C)`` per-slice features on the model grid.
        extra: model-specific tensors (kept for the generate step).
    """

    volume: Volume
    image_tokens: torch.Tensor
    seg_logits: torch.Tensor
    slice_features: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)
