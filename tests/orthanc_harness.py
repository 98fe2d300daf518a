"""A real Orthanc (with the tomoscribe plugin) for tests, in a loopback-only network namespace.

Orthanc 1.10 listens on all addresses, so every test server runs in its own
network namespace (``unshare -n``; only ``lo`` is up) and nothing outside can
reach it. Inside a fresh namespace the standard ports are free, so every
server uses 8042 (HTTP) and 4242 (DICOM).

The test talks to it from the same namespace:

* HTTP: :meth:`OrthancServer.request` runs on a dedicated thread that joined
  the namespace with ``setns(2)`` (only that thread; the test process stays put).
* Commands (``storescu``...): :meth:`OrthancServer.run` wraps them in
  ``nsenter --net=/proc/<orthanc pid>/ns/net``.

Usage::

    with orthanc_server(tmp_path, tomoscribe={"JobFunction": ...}) as server:
        server.storescu(folder)
        server.wait_for(lambda: server.get_json("/tomoscribe/jobs"), timeout=60)

On exit Orthanc gets SIGTERM (the plugin then stops its worker), and any
process still left in the namespace is killed by pid. Needs root (or
CAP_SYS_ADMIN), ``unshare``, ``nsenter`` and ``ip``; :func:`unavailable_reason`
says why not.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
PLUGIN_SCRIPT = REPO / "plugin" / "tomoscribe_plugin.py"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PLUGINS_DIR = Path("/usr/share/orthanc/plugins")
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
CLONE_NEWNET = 0x40000000
HTTP_PORT, DICOM_PORT = 8042, 4242
T = TypeVar("T")


def unavailable_reason() -> str | None:
    """None if a namespaced Orthanc can run here, else why not (for ``pytest.skip``)."""
    for tool in (ORTHANC, "unshare", "nsenter", "ip", "storescu"):
        if not shutil.which(tool) and not Path(tool).exists():
            return f"{tool} not found (Debian packages orthanc, util-linux, iproute2, dcmtk)"
    for lib in ("libOrthancPython.so", "libOrthancDicomWeb.so"):
        if not (PLUGINS_DIR / lib).exists():
            return f"{PLUGINS_DIR / lib} missing (Debian packages orthanc-python, orthanc-dicomweb)"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace (needs root): {probe.stderr.strip()}"
    return None


@dataclass
class Response:
    """An HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def _join_netns(pid: int) -> None:
    """Move the calling thread into the network namespace of ``pid``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class OrthancServer:
    """A running namespaced Orthanc; see the module docstring."""

    root: Path
    proc: subprocess.Popen[bytes]
    user: str
    password: str
    config: dict[str, Any]
    _pool: concurrent.futures.ThreadPoolExecutor = field(repr=False)

    @property
    def pid(self) -> int:
        """Orthanc's pid (also the namespace's anchor)."""
        return self.proc.pid

    @property
    def netns(self) -> str:
        """Path of the namespace handle."""
        return f"/proc/{self.pid}/ns/net"

    @property
    def url(self) -> str:
        """Base URL inside the namespace."""
        return f"http://127.0.0.1:{HTTP_PORT}"

    def auth_header(self) -> str:
        """``Authorization`` value for the test user."""
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def in_netns(self, fn: Callable[[], T], timeout: float = 120.0) -> T:
        """Run ``fn`` on the thread that lives in Orthanc's namespace."""
        return self._pool.submit(fn).result(timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, auth: bool = True,
                timeout: float = 60.0) -> Response:
        """One HTTP request to Orthanc (from inside the namespace)."""
        hdrs = dict(headers or {})
        if auth:
            hdrs.setdefault("Authorization", self.auth_header())

        def call() -> Response:
            conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=timeout)
            try:
                conn.request(method, path, body=body, headers=hdrs)
                resp = conn.getresponse()
                return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                                resp.read())
            finally:
                conn.close()

        return self.in_netns(call, timeout=timeout + 5)

    def get_json(self, path: str) -> Any:
        """GET ``path``; assert 200; parse JSON."""
        resp = self.request("GET", path)
        if resp.status != 200:
            raise AssertionError(f"GET {path}: HTTP {resp.status} {resp.body[:300]!r}")
        return resp.json()

    def run(self, cmd: Sequence[str], timeout: float = 300.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in Orthanc's network namespace."""
        done = subprocess.run(["nsenter", f"--net={self.netns}", *cmd], capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{cmd[0]} exited {done.returncode}: "
                                 f"{(done.stderr or done.stdout)[-2000:]}")
        return done

    def storescu(self, folder: Path) -> subprocess.CompletedProcess[str]:
        """C-STORE every file under ``folder`` to Orthanc (``-R``: SEG/SR contexts too)."""
        return self.run(["storescu", "-aet", "TESTSCU", "-aec", "ORTHANC", "+sd", "+r", "-R",
                         "127.0.0.1", str(DICOM_PORT), str(folder)])

    def wait_for(self, predicate: Callable[[], T | None], timeout: float, interval: float = 0.5,
                 what: str = "condition") -> T:
        """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited ({self.proc.returncode}) while waiting"
                                     f" for {what}\n{self.orthanc_log()[-3000:]}")
            try:
                value = predicate()
                if value:
                    return value
            except Exception as exc:  # keep polling; report the last error on timeout
                last_exc = exc
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                             f" (last error: {last_exc!r})\n--- worker log ---\n"
                             f"{self.worker_log()[-3000:]}")

    def orthanc_log(self) -> str:
        """Orthanc's stdout/stderr so far."""
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def worker_log(self) -> str:
        """The tomoscribe worker's log so far."""
        path = self.root / "tomoscribe" / "worker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def processes_in_netns(self) -> list[int]:
        """Pids of every process in this server's network namespace (Orthanc included)."""
        try:
            ns = os.readlink(self.netns)
        except OSError:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/net") == ns:
                        pids.append(int(entry))
        return pids

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM Orthanc, wait, then kill (by pid) whatever is left in the namespace."""
        leftovers = [p for p in self.processes_in_netns() if p != self.pid]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        for pid in leftovers:  # normally already gone: the plugin stops its worker
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_config(root: Path, user: str, password: str, tomoscribe: dict[str, Any],
                stable_age: int) -> dict[str, Any]:
    """The Orthanc configuration a test server uses."""
    return {
        "Name": "tomoscribe-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": HTTP_PORT,
        "DicomPort": DICOM_PORT,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": True,  # the namespace has only loopback; auth is on
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "HttpDescribeErrors": True,
        "StableAge": stable_age,
        "Plugins": [str(PLUGINS_DIR / "libOrthancPython.so"),
                    str(PLUGINS_DIR / "libOrthancDicomWeb.so")],
        "PythonScript": str(PLUGIN_SCRIPT),
        "PythonVerbose": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "Tomoscribe": {
            "Python": str(VENV_PYTHON),
            "StorageDirectory": str(root / "tomoscribe"),
            "PollSeconds": 0.5,
            **tomoscribe,
        },
    }


@contextlib.contextmanager
def orthanc_server(root: Path, tomoscribe: dict[str, Any] | None = None, stable_age: int = 2,
                   env: dict[str, str] | None = None,
                   start_timeout: float = 60.0) -> Iterator[OrthancServer]:
    """Start a namespaced Orthanc with the tomoscribe plugin; stop it on exit.

    Args:
        root: Empty folder for the config, storage, job DB and logs.
        tomoscribe: Keys of the ``"Tomoscribe"`` config section to set.
        stable_age: Orthanc's ``StableAge`` (seconds without new instances before
            ``STABLE_STUDY``).
        env: Extra environment for Orthanc (inherited by the worker).
        start_timeout: How long to wait for the REST API and the worker.
    """
    root.mkdir(parents=True, exist_ok=True)
    user, password = "tester", secrets.token_urlsafe(12)
    config = make_config(root, user, password, tomoscribe or {}, stable_age)
    cfg_path = root / "orthanc.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    full_env = dict(os.environ)
    full_env.update(env or {})
    # setpriv --pdeathsig: Orthanc gets SIGTERM if the test process dies without cleaning up.
    guard = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
    with open(root / "orthanc.log", "wb") as log:
        proc = subprocess.Popen(
            [*guard, "unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$1"', ORTHANC,
             str(cfg_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=full_env,
            cwd=str(root), start_new_session=True)
    # setpriv, unshare and sh exec in place: proc.pid becomes Orthanc's pid, in the new namespace.
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="netns", initializer=_join_netns,
        initargs=(proc.pid,))
    server = OrthancServer(root, proc, user, password, config, pool)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the namespace exists once unshare ran
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start:\n{server.orthanc_log()[-3000:]}")
            try:
                if os.readlink(server.netns) != os.readlink("/proc/self/ns/net"):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        server.wait_for(lambda: server.request("GET", "/system").status == 200,
                        start_timeout, 0.2, "Orthanc's REST API")
        yield server
    finally:
        server.stop()
