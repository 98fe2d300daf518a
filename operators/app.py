"""The tomoscribe application: the whole flow of one study, as a MONAI Deploy graph.

::

    series_selector --study_selected_series_list--> volume_loader
    volume_loader   --image--> image_encoder, seg_writer, sr_writer
    image_encoder   --encoded--> language_model
    language_model  --report--> seg_writer, sr_writer, measurements_writer, pdf_writer
    seg_writer      --seg--> sr_writer, measurements_writer

The SR and measurement writers take the SEG writer's output so that findings
with a segment reference the SEG actually written; with ``outputs.seg: false``
they hang off the language model alone. ``outputs.measurements`` and
``outputs.pdf`` add the TID 1500 measurement SR and the PDF report writers
(the loader's ``image`` goes to every writer).

:func:`run_app` is the one entry point (the CLI, ``python -m operators`` and the
Orthanc worker all call it, the worker once per study in one long-lived
process). Writers write into a hidden staging folder inside the output folder;
only when every operator succeeded are the files moved into place, so a failed
run leaves no output file, and the operator's original
:class:`~tomoscribe.errors.TomoscribeError` is raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from holoscan.conditions import CountCondition
from monai.deploy.core import Application

from operators.base import RunState
from operators.image_encoder import ImageEncoderOperator
from operators.language_model import LanguageModelOperator
from operators.seg_writer import SEGWriterOperator
from operators.series_selector import SeriesSelectorOperator
from operators.sr_writer import MeasurementsWriterOperator, PDFWriterOperator, SRWriterOperator
from operators.volume_loader import VolumeLoaderOperator
from tomoscribe.config import Settings, load_settings
from tomoscribe.errors import InputError, OutputError

log = logging.getLogger("tomoscribe.app")

STAGING_PREFIX = ".tomoscribe-staging-"


class TomoscribeApp(Application):
    """Series selection, volume loading, encoder, language model, SEG and SR writers.

    Build one per run (holoscan composes the graph when ``run()`` is called).
    """

    def __init__(
        self,
        *,
        input_folder: Path,
        state: RunState,
        settings: Settings,
        model_dir: Path | None = None,
        questions: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        """Create the application.

        Args:
            input_folder: the study's folder.
            state: shared state; its ``staging`` folder receives the outputs.
            settings: selection rules and which outputs to write.
            model_dir: the model folder; ``None``: the default model.
            questions: questions the report must answer.
            **kwargs: passed to holoscan's ``Application``.
        """
        self.input_folder = input_folder
        self.state = state
        self.settings = settings
        self.model_dir = model_dir
        self.questions = tuple(questions)
        # holoscan parses argv for its own options: give it none of ours
        super().__init__(["tomoscribe"], **kwargs)

    def compose(self) -> None:
        """The graph, as in the module docstring."""
        state = self.state
        selector = SeriesSelectorOperator(
            self,
            CountCondition(self, 1),  # a source operator runs once per application run
            state=state,
            input_folder=self.input_folder,
            rules=self.settings.selection,
            model_dir=self.model_dir,
            name="series_selector",
        )
        loader = VolumeLoaderOperator(self, state=state, name="volume_loader")
        encoder = ImageEncoderOperator(
            self, state=state, model_dir=self.model_dir, name="image_encoder"
        )
        language_model = LanguageModelOperator(
            self,
            state=state,
            model_dir=self.model_dir,
            questions=self.questions,
            name="language_model",
        )
        selected = "study_selected_series_list"
        self.add_flow(selector, loader, {(selected, selected)})
        self.add_flow(loader, encoder, {("image", "image")})
        self.add_flow(encoder, language_model, {("encoded", "encoded")})

        outputs = self.settings.outputs
        if outputs.seg:
            seg_writer = SEGWriterOperator(self, state=state, name="seg_writer")
            self.add_flow(language_model, seg_writer, {("report", "report")})
            self.add_flow(loader, seg_writer, {("image", "image")})
        if outputs.sr:
            sr_writer = SRWriterOperator(self, state=state, with_seg=outputs.seg, name="sr_writer")
            self.add_flow(language_model, sr_writer, {("report", "report")})
            self.add_flow(loader, sr_writer, {("image", "image")})
            if outputs.seg:
                self.add_flow(seg_writer, sr_writer, {("seg", "seg")})
        if outputs.measurements:
            meas_writer = MeasurementsWriterOperator(
                self, state=state, with_seg=outputs.seg, name="measurements_writer"
            )
            self.add_flow(language_model, meas_writer, {("report", "report")})
            self.add_flow(loader, meas_writer, {("image", "image")})
            if outputs.seg:
                self.add_flow(seg_writer, meas_writer, {("seg", "seg")})
        if outputs.pdf:
            pdf_writer = PDFWriterOperator(self, state=state, name="pdf_writer")
            self.add_flow(language_model, pdf_writer, {("report", "report")})
            self.add_flow(loader, pdf_writer, {("image", "image")})


@dataclass
class RunResult:
    """What one run produced.

    Attributes:
        written: the output files, in ``output_dir``.
        explanation: why the series was chosen (one line per series) and what
            the scanner and loader skipped or handled.
        report_text: the report's full text.
        answers: ``(question, answer)`` pairs, in the order asked.
        answer_slices: per answer, its key images (indices into the series'
            slices in position order, most relevant first).
        timings: seconds per operator, plus ``"total"``.
    """

    written: list[Path]
    explanation: list[str]
    report_text: str
    answers: list[tuple[str, str]] = field(default_factory=list)
    answer_slices: list[tuple[int, ...]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


#: order in which outputs are listed (and moved into place): SR first
_KIND_ORDER = ("SR_", "SEG_", "QSEG_", "MEAS_", "PDF_")


def _publish_order(path: Path) -> tuple[int, str]:
    """Sort key of a staged file: by kind (:data:`_KIND_ORDER`), then by name."""
    for i, prefix in enumerate(_KIND_ORDER):
        if path.name.startswith(prefix):
            return i, path.name
    return len(_KIND_ORDER), path.name


def _publish(files: list[Path], output_dir: Path) -> list[Path]:
    """Move staged files into ``output_dir``; all or none."""
    moved: list[Path] = []
    try:
        for src in files:
            dst = output_dir / src.name
            os.replace(src, dst)
            moved.append(dst)
    except OSError as exc:
        for path in moved:
            with contextlib.suppress(OSError):
                path.unlink()
        raise OutputError(f"cannot move outputs into {output_dir}: {exc.strerror or exc}") from exc
    return moved


@contextlib.contextmanager
def _python_signal_handlers() -> Iterator[None]:
    """Give SIGINT / SIGTERM back to Python after a holoscan run.

    holoscan installs C-level handlers that, once its graph has finished, turn
    SIGTERM into three seconds of error logs and exit status 1 (measured). The
    handlers Python knew about are put back; this works from the main thread
    only (elsewhere signal handlers cannot be set and are left alone).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def run_app(
    input_dir: Path,
    output_dir: Path,
    model_dir: Path | None = None,
    questions: Sequence[str] = (),
    config_path: Path | None = None,
    verbose: bool = False,
    settings: Settings | None = None,
) -> RunResult:
    """Run the application graph on one study folder.

    Safe to call many times in one process (the model is loaded once).

    Args:
        input_dir: folder (searched recursively) or file holding the study.
        output_dir: folder for the SR / SEG files (created if missing).
        model_dir: the model folder; ``None``: the settings' model (by default
            the model shipped with tomoscribe).
        questions: questions to answer; empty: the settings' standing questions.
        config_path: an ``app.yaml``-style settings file; ``None``: built-in defaults.
        verbose: log the selection explanation and timings (logger ``tomoscribe.app``).
        settings: already loaded settings (overrides ``config_path``).

    Returns:
        The written files, the selection explanation and the report text.

    Raises:
        TomoscribeError: the original one-line error of the step that failed
            (no output file is left behind).
    """
    start = time.perf_counter()
    settings = settings if settings is not None else load_settings(config_path)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.exists():
        raise InputError(f"input {input_dir} does not exist")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output {output_dir} exists and is not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
    except OSError as exc:
        raise OutputError(f"cannot write into {output_dir}: {exc.strerror or exc}") from exc

    state = RunState(staging=staging)
    try:
        app = TomoscribeApp(
            input_folder=input_dir,
            state=state,
            settings=settings,
            model_dir=model_dir if model_dir is not None else settings.model,
            questions=tuple(questions) or settings.questions,
        )
        with _python_signal_handlers():
            app.run()
        if state.error is not None:
            raise state.error
        if not state.written:  # holoscan stopped the graph early (interrupted by a signal)
            raise RuntimeError("the application graph stopped before writing any output")
        staged = sorted(state.written, key=_publish_order)
        written = _publish(staged, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    state.timings["total"] = time.perf_counter() - start
    if verbose:
        for line in state.explanation:
            log.info("%s", line)
        log.info("timings: %s", ", ".join(f"{k} {v:.2f} s" for k, v in state.timings.items()))
    return RunResult(
        written=written,
        explanation=list(state.explanation),
        report_text=state.report_text,
        answers=list(state.answers),
        answer_slices=list(state.answer_slices),
        timings=dict(state.timings),
    )
