"""What the operators of one run share: the run's state and the error capture.

holoscan runs ``compute`` on its own thread and turns an exception there into a
logged GXF failure with a traceback. Our operators instead record the first
exception in the :class:`RunState` the application hands them and emit
nothing, so the operators downstream never tick and the graph ends quietly;
:func:`operators.app.run_app` then re-raises the original error.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from holoscan.core import InputContext, OutputContext
from monai.deploy.core import Fragment, Operator
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from tomoscribe.errors import OutputError


@dataclass
class RunState:
    """Shared by the operators of one application run.

    Attributes:
        staging: folder the writers write into; moved into place on success.
        error: the first exception raised by any operator, else ``None``.
        failed_step: name of the operator that raised it.
        explanation: why the series was chosen (one line per series), plus
            what the scanner and loader skipped or handled on the way.
        report_text: the report's text, once the language model ran.
        answers: ``(question, answer)`` pairs, once the language model ran.
        answer_slices: per answer, its key images (indices into the volume's
            slices, most relevant first).
        written: files the writers wrote into ``staging``.
        timings: seconds spent in each operator's ``compute``.
    """

    staging: Path
    error: Exception | None = None
    failed_step: str = ""
    explanation: list[str] = field(default_factory=list)
    report_text: str = ""
    answers: list[tuple[str, str]] = field(default_factory=list)
    answer_slices: list[tuple[int, ...]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class StepOperator(Operator):
    """Base class: ``compute`` runs :meth:`step` and records its exception.

    Subclasses declare ports in ``setup`` and do their work in ``step``.
    """

    def __init__(self, fragment: Fragment, *args: Any, state: RunState, **kwargs: Any) -> None:
        self.state = state
        super().__init__(fragment, *args, **kwargs)

    def step(self, op_input: InputContext, op_output: OutputContext) -> None:
        """The operator's work (override)."""
        raise NotImplementedError

    def _drain(self, op_input: InputContext) -> None:
        """Take the waiting messages off every input port after another step failed.

        A message left unreceived keeps the port's condition true, so the
        scheduler would tick this operator forever (measured: a writer whose
        inputs arrived after the SR writer failed hung the run).
        """
        for name in list(self.spec.inputs):
            with contextlib.suppress(Exception):
                op_input.receive(name)

    def compute(self, op_input: InputContext, op_output: OutputContext, context: Any) -> None:
        """Run :meth:`step`; on error record it and emit nothing."""
        if self.state.error is not None:
            self._drain(op_input)
            return
        start = time.perf_counter()
        try:
            self.step(op_input, op_output)
        except Exception as exc:  # re-raised by run_app once the graph has stopped
            self.state.error = exc
            self.state.failed_step = self.name
        finally:
            self.state.timings[self.name] = time.perf_counter() - start


def write_dataset(ds: Dataset, folder: Path, name: str) -> Path:
    """Write ``ds`` as ``folder/name`` atomically (hidden temp file, fsync, rename).

    Raises:
        OutputError: the file could not be written; no file is left behind.
    """
    final = folder / name
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            dcmwrite(fh, ds, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:  # pydicom could not encode a value
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"cannot encode {name}: {exc}") from exc
    return final
