"""Process set-up that holoscan needs, done before holoscan is first imported.

Measured on this platform (holoscan-cu13 4.6.0, CPU only):

- holoscan links ``libcudart.so.13``; outside a CUDA install it is found only
  in the ``nvidia-cuda-runtime`` wheel. :func:`prepare_runtime` preloads it
  with ``RTLD_GLOBAL`` so no ``LD_LIBRARY_PATH`` is needed.
- holoscan asks for a 32 MiB stack. Operators' ``compute`` runs on a thread
  that holoscan creates, whose stack size glibc takes from ``RLIMIT_STACK``
  *at exec time*: raising the limit later with ``setrlimit`` alone leaves
  those threads at 8 MiB. :func:`prepare_runtime` therefore also sets glibc's
  default thread stack size (``pthread_setattr_default_np``), which does
  reach threads created afterwards; no re-exec is needed.
- holoscan's own log (GXF scheduler chatter, "CUDA driver version is
  insufficient" on CPU-only hosts) goes to stderr; it is quietened to errors
  unless ``HOLOSCAN_LOG_LEVEL`` is already set.

Only the standard library is imported here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import warnings
from pathlib import Path

#: stack size holoscan recommends (``ulimit -s 32768``)
STACK_BYTES = 32 * 1024 * 1024

_done = False


def _cudart_candidates() -> list[Path]:
    """Folders of the ``nvidia-cuda-runtime`` wheel on ``sys.path``."""
    found = []
    for entry in sys.path:
        lib = Path(entry or ".") / "nvidia" / "cu13" / "lib" / "libcudart.so.13"
        if lib.is_file():
            found.append(lib)
    return found


def _preload_cudart() -> str | None:
    """Load ``libcudart.so.13`` globally; returns the path loaded, if any."""
    for lib in _cudart_candidates():
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return str(lib)
    return None


def _raise_stack_limit() -> int:
    """Raise the soft ``RLIMIT_STACK`` to :data:`STACK_BYTES` where allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft >= STACK_BYTES:
        return soft
    target = STACK_BYTES if hard == resource.RLIM_INFINITY else min(STACK_BYTES, hard)
    try:
        resource.setrlimit(resource.RLIMIT_STACK, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def _default_thread_stack(size: int) -> bool:
    """Make threads created from now on get ``size`` bytes of stack (glibc only)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        setter = libc.pthread_setattr_default_np
    except (OSError, AttributeError):
        return False
    attr = ctypes.create_string_buffer(256)  # >= sizeof(pthread_attr_t) (56 on x86_64)
    if libc.pthread_attr_init(attr) != 0:
        return False
    try:
        if libc.pthread_attr_setstacksize(attr, ctypes.c_size_t(size)) != 0:
            return False
        return bool(setter(attr) == 0)
    finally:
        libc.pthread_attr_destroy(attr)


def prepare_runtime() -> None:
    """Preload CUDA's runtime library, raise stack limits, quieten holoscan's log.

    Idempotent and cheap; call it before ``import holoscan`` (importing the
    :mod:`operators` package does).
    """
    global _done
    if _done:
        return
    _done = True
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "ERROR")
    _preload_cudart()
    limit = _raise_stack_limit()
    thread_ok = _default_thread_stack(STACK_BYTES)
    if limit != resource.RLIM_INFINITY and limit < STACK_BYTES and not thread_ok:
        warnings.warn(
            f"stack limit is {limit // 1024} KiB and cannot be raised; holoscan recommends "
            f"'ulimit -s {STACK_BYTES // 1024}'",
            RuntimeWarning,
            stacklevel=2,
        )
