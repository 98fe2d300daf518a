"""MONAI Deploy operators of tomoscribe and the application that composes them.

Each operator is a thin adapter over the core (:mod:`tomoscribe`); the graph
reads in :mod:`operators.app`::

    series_selector --study_selected_series_list--> volume_loader
    volume_loader   --image--> image_encoder, seg_writer, sr_writer
    image_encoder   --encoded--> language_model
    language_model  --report--> seg_writer, sr_writer
    seg_writer      --seg--> sr_writer     (the SR references the SEG written)

Importing this package prepares the process for holoscan (see
:mod:`operators.runtime`) before any operator module imports it.
"""

from operators.runtime import prepare_runtime

prepare_runtime()

__all__ = ["prepare_runtime"]
