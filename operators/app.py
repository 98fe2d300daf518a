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

Several models (the settings' ``model: [default, head-mr]``, the CLI's
repeated ``-m``) each run the graph in turn, in the order listed, on the
series in their own scope. A model with nothing to read in the study
(:class:`~tomoscribe.errors.NoSeriesError`, which includes
:class:`~tomoscribe.errors.OutOfScopeError`: from its series selection or its
image check) is skipped and says why in the explanation; the outputs of the
others are published together. Any other error of any model fails the whole
run and publishes nothing, as with one model. Each model stays loaded
(:func:`tomoscribe.model.scribe.load_cached` keeps one per folder).
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
from tomoscribe.domain import about_other_domain
from tomoscribe.errors import (
    InputError,
    ModelError,
    NoSeriesError,
    OutOfScopeError,
    OutputError,
)
from tomoscribe.scope import (
    ModelArg,
    first_repeat,
    model_label,
    model_labels,
    read_model_domain,
    read_model_version,
    resolve_model,
)

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
        models: the label of each model whose outputs were written
            (:func:`tomoscribe.scope.model_label`), in the order they ran.
        skipped: ``(model label, one-line reason)`` of each model that had
            nothing to read in the study (several models only).

    With several models, the explanation lines, report texts, questions and
    timings of each model are marked with its label (``"head-mr: ..."``,
    ``"[head-mr]"``, ``"head-mr/language_model"``) and put one after another.
    """

    written: list[Path]
    explanation: list[str]
    report_text: str
    answers: list[tuple[str, str]] = field(default_factory=list)
    answer_slices: list[tuple[int, ...]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


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


def _resolve_models(model_dir: ModelArg, settings: Settings) -> tuple[Path | None, ...]:
    """The model folders to run (``None``: the default model), in order.

    Raises:
        ModelError: an unknown model name, or a model listed twice.
    """
    if model_dir is None:
        return settings.models
    items = [model_dir] if isinstance(model_dir, str | Path) else list(model_dir)
    if not items:
        return settings.models
    models = tuple(resolve_model(item) for item in items)
    if (repeat := first_repeat(models)) is not None:
        raise ModelError(f"model {model_label(models[repeat[1]])} is listed twice; "
                         "list each model once")
    return models


def _check_versions(models: Sequence[Path | None], labels: Sequence[str]) -> None:
    """Refuse two models of the same version: their outputs would get the same UIDs.

    Output UIDs (and so file names) derive from the study and the model
    version (:func:`tomoscribe.writers.identity.output_uids`).
    """
    seen: dict[str, str] = {}
    for folder, label in zip(models, labels, strict=True):
        version = read_model_version(folder)
        if version is None:  # loading the model reports the broken folder
            continue
        if version.strip() in seen:
            raise ModelError(
                f"models {seen[version.strip()]} and {label} both have version {version}: "
                "their outputs would get the same UIDs; give each model its own version "
                "(config.json 'version')"
            )
        seen[version.strip()] = label


def _run_graph(
    input_dir: Path,
    staging: Path,
    settings: Settings,
    model_dir: Path | None,
    questions: tuple[str, ...],
) -> RunState:
    """Run the graph of one model; its outputs go into ``staging``.

    Returns:
        The run's state; ``state.error`` holds the first operator error, if any.
    """
    state = RunState(staging=staging)
    app = TomoscribeApp(
        input_folder=input_dir,
        state=state,
        settings=settings,
        model_dir=model_dir,
        questions=questions,
    )
    with _python_signal_handlers():
        app.run()
    if state.error is None and not state.written:
        # holoscan stopped the graph early (interrupted by a signal)
        state.error = RuntimeError("the application graph stopped before writing any output")
    return state


def _route_questions(asked: tuple[str, ...], folder: Path | None
                     ) -> tuple[tuple[str, ...], list[str]]:
    """The questions for one of several models, and a line for each one left out.

    A question about another domain's structures only is left out
    (:func:`~tomoscribe.domain.about_other_domain`); a model whose domain
    cannot be read gets every question (loading it reports the folder).
    """
    domain = read_model_domain(folder)
    if domain is None:
        return asked, []
    own: list[str] = []
    lines: list[str] = []
    for question in asked:
        other = about_other_domain(question, domain)
        if other is None:
            own.append(question)
        else:
            lines.append(f"not asked {question!r}: it is about {other.description}")
    return tuple(own), lines


def _nobody_reads(skipped: Sequence[tuple[str, NoSeriesError]]) -> NoSeriesError:
    """The error when no model reads the study: each model's reason, on one line.

    :class:`OutOfScopeError` (a skip, CLI exit 3) when any model was turned
    away by its scope; otherwise no series qualifies under the rules at all
    and the :class:`NoSeriesError` (an error, exit 2) is the same as with one model.
    """
    reasons = [str(exc) for _label, exc in skipped]
    if len(set(reasons)) == 1:
        line = reasons[0]
    else:
        line = "no model reads this study: " + "; ".join(
            f"{label}: {reason}" for (label, _exc), reason in zip(skipped, reasons, strict=True))
    if any(isinstance(exc, OutOfScopeError) for _label, exc in skipped):
        return OutOfScopeError(line)
    return NoSeriesError(line)


def run_app(
    input_dir: Path,
    output_dir: Path,
    model_dir: ModelArg = None,
    questions: Sequence[str] = (),
    config_path: Path | None = None,
    verbose: bool = False,
    settings: Settings | None = None,
) -> RunResult:
    """Run the application graph on one study folder, with one model or several.

    Safe to call many times in one process (each model is loaded once).

    With one model, its error is raised as it is. With several, each runs in
    the order given on the series in its own scope; one that has nothing to
    read in the study (:class:`~tomoscribe.errors.NoSeriesError`, including
    :class:`~tomoscribe.errors.OutOfScopeError`) is skipped, with its reason in
    :attr:`RunResult.skipped` and the explanation, and the outputs of all the
    others are published together.

    Args:
        input_dir: folder (searched recursively) or file holding the study.
        output_dir: folder for the SR / SEG files (created if missing).
        model_dir: the model, or a list of models, each a
            :class:`~pathlib.Path` (a folder), or a string: a packaged model's
            name (``"default"``, ``"head-mr"``) or a folder
            (:func:`tomoscribe.scope.resolve_model`). ``None`` or empty: the
            settings' models (by default the model shipped with tomoscribe).
        questions: questions to answer; empty: the settings' standing questions.
            With several models, a question that names a structure of another
            model's domain and none of a model's own (``"is there a lesion in
            the liver ?"`` for a head MR model) is not put to that model
            (:func:`~tomoscribe.domain.about_other_domain`; the explanation
            says so); every other question is put to every model.
        config_path: an ``app.yaml``-style settings file; ``None``: built-in defaults.
        verbose: log the selection explanation and timings (logger ``tomoscribe.app``).
        settings: already loaded settings (overrides ``config_path``).

    Returns:
        The written files, the selection explanation and the report text.

    Raises:
        OutOfScopeError: no model reads the study (one line: each model's reason).
        ModelError: an unknown model name, a model listed twice, or two models
            of the same version (their outputs would share UIDs).
        TomoscribeError: the original one-line error of the step that failed
            (no output file is left behind).
    """
    start = time.perf_counter()
    settings = settings if settings is not None else load_settings(config_path)
    models = _resolve_models(model_dir, settings)
    labels = model_labels(models)
    if len(models) > 1:
        _check_versions(models, labels)
    asked = tuple(questions) or settings.questions
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

    several = len(models) > 1
    ran: list[tuple[int, str, RunState]] = []
    skipped: list[tuple[str, NoSeriesError]] = []
    explanation: list[str] = []
    timings: dict[str, float] = {}
    try:
        for number, (folder, label) in enumerate(zip(models, labels, strict=True)):
            where = staging / str(number) if several else staging
            own, routed = _route_questions(asked, folder) if several else (asked, [])
            explanation.extend(f"{label}: {line}" for line in routed)
            state = _run_graph(input_dir, where, settings, folder, own)
            mark = f"{label}: " if several else ""
            explanation.extend(f"{mark}{line}" for line in state.explanation)
            timings.update({(f"{label}/{k}" if several else k): v
                            for k, v in state.timings.items()})
            if several and isinstance(state.error, NoSeriesError):
                explanation.append(f"{label}: skipped: {state.error}")
                skipped.append((label, state.error))
                continue
            if state.error is not None:
                raise state.error
            ran.append((number, label, state))
        if not ran:
            raise _nobody_reads(skipped)
        # file names are UIDs of (study, model version): distinct per model (_check_versions)
        staged = [(number, path) for number, _label, state in ran for path in state.written]
        staged.sort(key=lambda item: (_publish_order(item[1])[0], item[0], item[1].name))
        written = _publish([path for _number, path in staged], output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    timings["total"] = time.perf_counter() - start
    if verbose:
        for line in explanation:
            log.info("%s", line)
        log.info("timings: %s", ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    if not several:
        state = ran[0][2]
        return RunResult(
            written=written,
            explanation=explanation,
            report_text=state.report_text,
            answers=list(state.answers),
            answer_slices=list(state.answer_slices),
            timings=timings,
            models=[labels[0]],
        )
    return RunResult(
        written=written,
        explanation=explanation,
        report_text="\n\n".join(f"[{label}]\n{state.report_text}" for _n, label, state in ran),
        answers=[(f"[{label}] {q}", a) for _n, label, state in ran for q, a in state.answers],
        answer_slices=[keys for _n, _label, state in ran for keys in state.answer_slices],
        timings=timings,
        models=[label for _n, label, _state in ran],
        skipped=[(label, str(exc)) for label, exc in skipped],
    )
