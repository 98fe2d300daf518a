"""Parallel decoding of compressed pixel data in worker processes.

The decoders pydicom uses for JPEG 2000, JPEG-LS and JPEG
(pylibjpeg-openjpeg, pylibjpeg-libjpeg, pyjpegls) hold the GIL while they
decode, so threads run them one at a time. :class:`DecoderPool` starts
``python -m tomoscribe.dicomio.decoder`` worker processes, sends each a batch
of file paths at a time over its stdin and reads the stored pixel values
back from its stdout (pickled arrays, one per file, as soon as each file is
decoded).

Plain subprocesses rather than :mod:`multiprocessing`: its ``spawn`` and
``forkserver`` children import the parent's ``__main__`` module (for the
application that is MONAI Deploy, holoscan and torch: seconds and hundreds of
MB per worker, or endless recursion from an unguarded script), and ``fork``
of a threaded parent can deadlock. A worker here imports numpy and pydicom
only.

Protocol (pickle protocol 5 frames): the parent writes a list of paths; the
worker answers with one ``("ok", array)`` or ``("error", reason)`` per path,
in order. An empty list or end of input ends the worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from tomoscribe.errors import GeometryError, TomoscribeError

#: pipe buffer asked for on each worker's answers (Linux allows 1 MiB unprivileged)
_PIPE_BYTES = 1 << 20
#: the package's parent folder, put on the workers' PYTHONPATH
_ROOT = str(Path(__file__).resolve().parents[2])


class DecodeWorkerError(TomoscribeError):
    """A decoding worker process died (killed, out of memory) while loading a series."""


class PoolStartError(Exception):
    """The worker processes could not be started (the caller decodes in-process)."""


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class DecoderPool:
    """``processes`` worker processes decoding batches of files.

    Args:
        processes: number of worker processes.

    Raises:
        PoolStartError: a process could not be started.
    """

    def __init__(self, processes: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_ROOT, env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONWARNINGS"] = "ignore"
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(processes):
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tomoscribe.dicomio.decoder"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        env=env,
                        close_fds=True,
                    )
                )
        except (OSError, ValueError) as err:
            self.close()
            raise PoolStartError(" ".join(str(err).split()) or type(err).__name__) from err
        for proc in self.procs:  # room for a whole 512 x 512 slice: the worker goes on decoding
            if proc.stdout is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
                with contextlib.suppress(OSError):
                    fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

    def run(
        self,
        batches: list[list[tuple[int, str]]],
        place: Callable[[int, np.ndarray], None],
        what: str,
        local: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        """Decode every batch, calling ``place(key, array)`` for each file.

        One thread per worker feeds it the next batch and places the arrays it
        returns; ``place`` is called from those threads, for distinct keys.
        With ``local``, the calling thread decodes batches too (``local(path)``),
        from the first moment: it hides the workers' start-up (about 0.5 s of
        imports) and is one process fewer to start.

        Raises:
            DecodeWorkerError: a worker died (the others are stopped).
            PoolStartError: no worker answered at all (none could start).
            Exception: the first error ``place`` raised, or a
                :class:`~tomoscribe.errors.GeometryError` for a file a worker
                could not decode.
        """
        queue = list(reversed(batches))
        lock = threading.Lock()
        errors: list[BaseException] = []
        answered = [False] * len(self.procs)

        def take() -> list[tuple[int, str]] | None:
            with lock:
                if errors or not queue:
                    return None
                return queue.pop()

        def serve(i: int, proc: subprocess.Popen[bytes]) -> None:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                while (batch := take()) is not None:
                    try:
                        pickle.dump([p for _, p in batch], proc.stdin, protocol=5)
                        proc.stdin.flush()
                        for key, _ in batch:
                            status, value = pickle.load(proc.stdout)
                            answered[i] = True
                            if status != "ok":
                                raise GeometryError(str(value))
                            place(key, value)
                    except (EOFError, OSError, pickle.UnpicklingError) as err:
                        try:
                            code = proc.wait(timeout=5)
                        except subprocess.TimeoutExpired:
                            code = None
                        if code is not None and code > 0 and not any(answered):
                            # exited on its own before any answer: it could not start
                            raise PoolStartError(f"worker {_signal_name(code)}") from err
                        raise DecodeWorkerError(
                            f"a decoding worker process died ({_signal_name(code)}) "
                            f"while decoding {what}; set TOMOSCRIBE_DECODE_WORKERS=1 to "
                            "decode in one process"
                        ) from err
            except BaseException as err:  # handed to the caller below
                with lock:
                    errors.append(err)
                self.kill()

        def serve_here(decode: Callable[[str], np.ndarray]) -> None:
            try:
                while (batch := take()) is not None:
                    for key, path in batch:
                        place(key, decode(path))
            except BaseException as err:  # handed to the caller below
                with lock:
                    errors.append(err)
                self.kill()

        threads = [
            threading.Thread(target=serve, args=(i, p), daemon=True)
            for i, p in enumerate(self.procs)
        ]
        for t in threads:
            t.start()
        if local is not None:
            serve_here(local)
        for t in threads:
            t.join()
        if errors:
            dead = [e for e in errors if isinstance(e, DecodeWorkerError | PoolStartError)]
            others = [e for e in errors if e not in dead]
            raise (others or dead)[0]

    def kill(self) -> None:
        """Stop every worker now."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()

    def close(self) -> None:
        """End the workers (end of input, then kill after a grace period) and reap them."""
        for p in self.procs:
            try:
                if p.stdin is not None:
                    p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        self.procs = []

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if any(exc):
            self.kill()
        self.close()


def _requests(stream: IO[bytes]) -> Iterator[list[str]]:
    while True:
        try:
            paths: Any = pickle.load(stream)
        except EOFError:
            return
        if not paths:
            return
        yield list(paths)


def main() -> int:
    """Worker: decode the files named on stdin, answer on stdout."""
    from tomoscribe.dicomio.load import _decode_path  # the same decoding as in-process

    # answers go to the original stdout; anything a library prints goes to stderr instead
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    for paths in _requests(sys.stdin.buffer):
        for p in paths:
            try:
                answer: tuple[str, Any] = ("ok", np.ascontiguousarray(_decode_path(Path(p))))
            except TomoscribeError as err:
                answer = ("error", str(err))
            except Exception as err:  # any decoder failure is a one-line answer
                answer = ("error", f"cannot decode pixel data of {Path(p).name}: {err}"[:300])
            pickle.dump(answer, out, protocol=5)
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
