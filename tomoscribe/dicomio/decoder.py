"""Parallel decoding of compressed pixel data in worker processes.

The decoders pydicom uses for JPEG 2000, JPEG-LS and JPEG
(pylibjpeg-openjpeg, pylibjpeg-libjpeg, pyjpegls) hold the GIL while they
decode, so threads run them one at a time. :class:`DecoderPool` starts worker
processes (this file, run by path: numpy and pydicom are all they import),
asks each for one file at a time over its stdin, and finds the stored pixel
values in shared memory: each worker owns :data:`SLOTS` slots of an anonymous
shared file (``memfd``) that parent and worker both map; the worker decodes a
file into the slot the request names and answers with its shape and dtype
only, so no pixel travels through a pipe. A worker keeps up to :data:`SLOTS`
requests, so it goes on decoding while the parent copies the last answer into
the volume; the last files are shared out one at a time, so the decoders
finish together.

Plain subprocesses rather than :mod:`multiprocessing`: its ``spawn`` and
``forkserver`` children import the parent's ``__main__`` module (for the
application that is MONAI Deploy, holoscan and torch: seconds and hundreds of
MB per worker, or endless recursion from an unguarded script), and ``fork``
of a threaded parent can deadlock.

Workers cost about 0.4 s of imports each to start. :func:`shared_pool` keeps
one pool per process for later series (a PACS plugin's worker loads many
studies); it is closed after :data:`IDLE_SECONDS` unused and at interpreter
exit, and started again after a worker died. A worker ignores SIGINT (the
parent decides, and kills it), and ends at end of input, that is when the
parent closes its pipe or dies.

Protocol (pickle protocol 5 frames): the parent writes a list of
``(path, slot)`` requests; the worker answers each, in order, with
``("ok", shape, dtype)`` (values in that slot), ``("array", array)`` (too large
for a slot: the array itself) or ``("error", reason)``. An empty list asks
for ``("ready",)``; ``None`` or end of input ends the worker.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from tomoscribe.errors import GeometryError, TomoscribeError

#: requests a worker holds at once (one decoding, the others waiting), each with its slot
SLOTS = 3
#: bytes of one slot: a 2048 x 2048 16-bit frame; larger arrays come back through the pipe
SLOT_BYTES = 8 << 20
#: the package's parent folder, put on the workers' PYTHONPATH
_ROOT = str(Path(__file__).resolve().parents[2])
#: the worker is this file run by path under another name: the package
#: (``tomoscribe.dicomio``, with its scanner and selector) is not imported
_BOOT = (
    "import importlib.util as u, sys\n"
    "sys.modules.update(requests=None, tqdm=None)  # pydicom's download helpers, never used\n"
    "s = u.spec_from_file_location('_tomoscribe_decode_worker', sys.argv[1])\n"
    "m = u.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "sys.exit(m.main(int(sys.argv[2]), int(sys.argv[3])))\n"
)


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


def _shared_file(size: int) -> tuple[int, mmap.mmap] | None:
    """An anonymous shared file of ``size`` bytes and its mapping, or ``None`` (no memfd)."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("tomoscribe-decode", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except (OSError, ValueError):
        os.close(fd)
        return None


class _Worker:
    """One worker process, its pipes and its slots."""

    def __init__(self, env: dict[str, str]) -> None:
        self.slot_bytes = SLOT_BYTES
        shared = _shared_file(SLOTS * self.slot_bytes)
        self.fd = -1
        self.buf: mmap.mmap | None = None
        if shared is not None:
            self.fd, self.buf = shared
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _BOOT,
                    str(Path(__file__).resolve()),
                    str(self.fd),
                    str(self.slot_bytes if self.buf is not None else 0),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                close_fds=True,
                pass_fds=(self.fd,) if self.fd >= 0 else (),
            )
        except BaseException:
            self.release()
            raise
        # the worker has its own descriptor now; the mapping stays ours
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.answered = False

    def view(self, slot: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """The array a worker wrote into ``slot`` (valid until the slot is used again)."""
        assert self.buf is not None
        return np.ndarray(
            shape, dtype=np.dtype(dtype), buffer=self.buf, offset=slot * self.slot_bytes
        )

    def release(self) -> None:
        """Unmap the slots and close the descriptor (after the process is gone)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.buf is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                self.buf.close()
            self.buf = None


class DecoderPool:
    """``processes`` worker processes decoding files.

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
        self.pid = os.getpid()
        #: a worker died or was killed: the pool cannot be used again
        self.broken = False
        self.workers: list[_Worker] = []
        try:
            for _ in range(processes):
                self.workers.append(_Worker(env))
        except (OSError, ValueError) as err:
            self.close()
            raise PoolStartError(" ".join(str(err).split()) or type(err).__name__) from err

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        """The worker processes."""
        return [w.proc for w in self.workers]

    def alive(self) -> bool:
        """Whether every worker is still running and none was lost."""
        return not self.broken and all(w.proc.poll() is None for w in self.workers)

    def ping(self) -> None:
        """Wait until every worker has started (imports done) and answers.

        Raises:
            PoolStartError: a worker could not start.
        """
        for w in self.workers:
            assert w.proc.stdin is not None and w.proc.stdout is not None
            try:
                pickle.dump([], w.proc.stdin, protocol=5)
                w.proc.stdin.flush()
                pickle.load(w.proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError) as err:
                self.kill()
                raise PoolStartError(f"worker {_signal_name(w.proc.wait())}") from err

    def run(
        self,
        files: Sequence[tuple[int, str]],
        place: Callable[[int, np.ndarray], None],
        what: str,
        local: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        """Decode every ``(key, path)`` of ``files``, calling ``place(key, array)`` for each.

        Files are handed out one at a time from one queue, in order; each
        worker holds up to :data:`SLOTS` of them. One thread per worker reads
        its answers and places them; ``place`` is called from those threads,
        for distinct keys, and must copy what it keeps: the array lives in
        the worker's slot, used again after ``place`` returns. With ``local``,
        the calling thread decodes files too (``local(path)``), from the
        first moment: it hides the workers' start-up and is one process fewer
        to start.

        After an error no file is handed out; the files already asked for are
        answered and dropped, so the pool stays usable unless a worker died.

        Raises:
            DecodeWorkerError: a worker died (the others are stopped).
            PoolStartError: no worker answered at all (none could start).
            Exception: the first error ``place`` or ``local`` raised, or a
                :class:`~tomoscribe.errors.GeometryError` for a file a worker
                could not decode.
        """
        queue: deque[tuple[int, str]] = deque(files)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def take() -> tuple[int, str] | None:
            with lock:
                if errors or not queue:
                    return None
                return queue.popleft()

        def fail(err: BaseException) -> None:
            with lock:
                errors.append(err)

        def serve(w: _Worker) -> None:
            proc = w.proc
            assert proc.stdin is not None and proc.stdout is not None
            free = list(range(SLOTS))  # without shared memory, tokens for the pipe
            pending: deque[tuple[int, int]] = deque()
            try:
                while True:
                    asks = []
                    while free and (item := take()) is not None:
                        slot = free.pop()
                        pending.append((item[0], slot))
                        asks.append((item[1], slot))
                    if asks:
                        pickle.dump(asks, proc.stdin, protocol=5)
                        proc.stdin.flush()
                    if not pending:
                        return
                    answer = pickle.load(proc.stdout)
                    w.answered = True
                    key, slot = pending.popleft()
                    try:
                        if errors:
                            pass  # drain: answered and dropped
                        elif answer[0] == "ok":
                            place(key, w.view(slot, answer[1], answer[2]))
                        elif answer[0] == "array":
                            place(key, answer[1])
                        else:
                            raise GeometryError(str(answer[1]))
                    except Exception as err:  # handed to the caller below
                        fail(err)
                    free.append(slot)
            except (EOFError, OSError, pickle.UnpicklingError, TypeError, IndexError):
                try:  # its own exit status first, before the others are stopped
                    code = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                self.kill()
                if code is not None and code > 0 and not any(x.answered for x in self.workers):
                    # exited on its own before any answer: it could not start
                    fail(PoolStartError(f"worker {_signal_name(code)}"))
                    return
                fail(
                    DecodeWorkerError(
                        f"a decoding worker process died ({_signal_name(code)}) "
                        f"while decoding {what}; set TOMOSCRIBE_DECODE_WORKERS=1 to "
                        "decode in one process"
                    )
                )
            except BaseException as err:  # handed to the caller below
                fail(err)
                self.kill()

        threads = [threading.Thread(target=serve, args=(w,), daemon=True) for w in self.workers]
        try:
            for t in threads:
                t.start()
            if local is not None:
                try:
                    while (item := take()) is not None:
                        key, path = item
                        place(key, local(path))
                except Exception as err:  # handed to the caller below
                    fail(err)
            for t in threads:
                t.join()
        except BaseException:  # KeyboardInterrupt, SystemExit: stop the workers now
            self.kill()
            raise
        if errors:
            dead = [e for e in errors if isinstance(e, DecodeWorkerError | PoolStartError)]
            others = [e for e in errors if e not in dead]
            raise (others or dead)[0]

    def kill(self) -> None:
        """Stop every worker now (the pool cannot be used again)."""
        self.broken = True
        for w in self.workers:
            if w.proc.poll() is None:
                with contextlib.suppress(OSError):
                    w.proc.kill()

    def close(self) -> None:
        """End the workers (end of input, then kill after a grace period) and reap them."""
        if os.getpid() != self.pid:  # a forked copy: the workers are the parent's
            self.workers = []
            return
        for w in self.workers:
            try:
                if w.proc.stdin is not None:
                    w.proc.stdin.close()
            except OSError:
                pass
        for w in self.workers:
            try:
                w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            if w.proc.stdout is not None:
                w.proc.stdout.close()
            w.release()
        self.workers = []
        self.broken = True

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if any(exc):
            self.kill()
        self.close()


# ---------------------------------------------------------------- the process-wide pool

#: seconds an unused shared pool is kept before its workers are ended
IDLE_SECONDS = 300.0

_shared_lock = threading.Lock()
_shared: list[DecoderPool] = []  # at most one
_inherited: list[list[_Worker]] = []  # a forked child's copy of its parent's workers
_idle: list[threading.Timer] = []  # at most one: ends the shared pool when unused


def _close_shared() -> None:
    while _idle:
        _idle.pop().cancel()
    while _shared:
        _shared.pop().close()


def _close_if_idle(timer: threading.Timer) -> None:
    """Timer thread: end the shared pool unless it was used since ``timer`` was set."""
    if not _shared_lock.acquire(blocking=False):
        return  # in use: the user sets a new timer when done
    try:
        if _idle and _idle[0] is timer:
            _close_shared()
    finally:
        _shared_lock.release()


def _arm_idle_timer() -> None:
    """(Re)start the idle timer of the shared pool; called with the lock held."""
    while _idle:
        _idle.pop().cancel()
    if _shared and IDLE_SECONDS > 0:
        timer = threading.Timer(IDLE_SECONDS, lambda: _close_if_idle(timer))
        timer.daemon = True
        _idle.append(timer)
        timer.start()


def _forget_shared_in_child() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    for pool in _shared:  # the parent's workers: not ours to end; our copies of the pipes
        for w in pool.workers:  # closed, so that they still see end of input with the parent
            for stream in (w.proc.stdin, w.proc.stdout):
                with contextlib.suppress(OSError, ValueError):
                    if stream is not None:
                        os.close(stream.fileno())  # not stream.close(): no flush of its buffer
        _inherited.append(pool.workers)  # never finalized here: their fds are closed already
        pool.workers = []
    _shared.clear()
    _idle.clear()  # timers are threads of the parent: none runs in the child


atexit.register(_close_shared)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shared_in_child)


@contextlib.contextmanager
def shared_pool(processes: int) -> Iterator[DecoderPool]:
    """The process-wide pool of ``processes`` workers, started on first use and kept.

    Later series skip the workers' start-up. The pool is started again when
    the number asked for changed or a worker died; it is closed after
    :data:`IDLE_SECONDS` unused (a PACS plugin's worker waits for studies for
    days: its decoders should not hold memory meanwhile) and at interpreter
    exit. While another thread uses it, a pool of its own is started for
    this call (and closed after it).

    Raises:
        PoolStartError: the processes could not be started.
    """
    if not _shared_lock.acquire(blocking=False):
        with DecoderPool(processes) as own:
            yield own
        return
    try:
        pool = _shared[0] if _shared else None
        if pool is None or len(pool.workers) != processes or not pool.alive():
            _close_shared()
            pool = DecoderPool(processes)
            _shared.append(pool)
        try:
            yield pool
        except BaseException:
            if not pool.alive():
                _close_shared()
            raise
        if not pool.alive():
            _close_shared()
    finally:
        _arm_idle_timer()
        _shared_lock.release()


# ---------------------------------------------------------------- the worker


def _requests(stream: IO[bytes]) -> Iterator[list[tuple[str, int]]]:
    while True:
        try:
            asks: Any = pickle.load(stream)
        except EOFError:
            return
        if asks is None:
            return
        yield list(asks)


def _decode(path: str) -> np.ndarray:
    """Stored values of one file, decoded by pydicom; the same failure text as in-process."""
    from pydicom.pixels import pixel_array

    try:
        return np.asarray(pixel_array(path))
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise GeometryError(
            f"cannot decode pixel data of {Path(path).name}: {reason[:200]}"
        ) from err


def main(fd: int = -1, slot_bytes: int = 0) -> int:
    """Worker: decode the files asked for on stdin into the shared slots, answer on stdout.

    Args:
        fd: descriptor of the shared file holding the slots (-1: none).
        slot_bytes: bytes per slot (0: every array comes back through stdout).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    from pydicom.pixels import pixel_array  # noqa: F401  (imported before the first request)

    buf = mmap.mmap(fd, SLOTS * slot_bytes) if fd >= 0 and slot_bytes else None
    # answers go to the original stdout; anything a library prints goes to stderr instead
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    for asks in _requests(sys.stdin.buffer):
        if not asks:
            pickle.dump(("ready",), out, protocol=5)
            out.flush()
            continue
        for path, slot in asks:
            try:
                arr = _decode(path)
                if buf is not None and arr.nbytes <= slot_bytes and 0 <= slot < SLOTS:
                    view = np.ndarray(
                        arr.shape, dtype=arr.dtype, buffer=buf, offset=slot * slot_bytes
                    )
                    np.copyto(view, arr)
                    del view
                    answer: tuple[Any, ...] = ("ok", arr.shape, arr.dtype.str)
                else:
                    answer = ("array", np.ascontiguousarray(arr))
            except TomoscribeError as err:
                answer = ("error", str(err))
            except Exception as err:  # any decoder failure is a one-line answer
                answer = ("error", f"cannot decode pixel data of {Path(path).name}: {err}"[:300])
            pickle.dump(answer, out, protocol=5)
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
