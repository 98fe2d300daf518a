# SPDX-License-Identifier: AGPL-3.0-or-later  (tomoscribe Orthanc plugin, see plugin/LICENSE)
"""Serve the OHIF viewer's built site from Orthanc's own HTTP server, under ``/ohif/``.

Why here and not Orthanc's ServeFolders plugin: OHIF is a single-page app whose
deep links (``/ohif/viewer?StudyInstanceUIDs=...``) are client-side routes;
ServeFolders answers 404 for them. This route answers ``index.html`` for any
path that does not name a file (and is not asset-like), and serves the files
otherwise. Same origin as Orthanc, so DICOMweb needs no cross-origin headers and
Orthanc's own authentication covers the viewer too.

The site is the ``dist/`` folder of the ``@ohif/app`` npm package, unmodified on
disk (``scripts/setup.sh`` fetches it). That build assumes it lives at ``/``;
the few files that say so are rewritten in memory the first time they are
served (then cached; the rest are read from disk on each request):

* ``index.html``: ``window.PUBLIC_URL`` and every root-relative ``href``/``src``
  get the prefix; the service-worker registration is dropped (its precache list
  names root paths, and a viewer behind a password gains nothing from offline use);
* JavaScript entry bundles: webpack's public path (``__webpack_require__.p = "/"``),
  from which lazy chunks, workers and wasm are loaded;
* CSS: ``url(/...)`` (the fonts); ``manifest.json``: the icon paths.

Rewriting at serve time rather than at set-up keeps the installed copy pristine
(``npm pack`` output, checkable against its integrity hash) and lets the prefix
change without re-installing. ``app-config.js`` is not read from the package: it
is generated (:func:`app_config`) with ``routerBasename`` = the prefix and one
DICOMweb data source at Orthanc's own DICOMweb root.

Standard library only: imported inside Orthanc's process.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

#: Where the viewer lives on Orthanc's HTTP server.
PREFIX = "/ohif"

#: Content types by file suffix; anything else is application/octet-stream.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
    ".xml": "application/xml",
    ".onnx": "application/octet-stream",
}

#: Static answers may be cached by the browser for this long (the bundles' names carry
#: a content hash; index.html and app-config.js are never cached).
MAX_AGE_S = 3600

NOT_INSTALLED = ("the OHIF viewer is not installed: run 'make setup' (it fetches the pinned"
                 " @ohif/app build into var/ohif/dist), or set \"Tomoscribe.OhifDirectory\""
                 " to the dist/ folder of an @ohif/app package")


@dataclass(frozen=True)
class Answer:
    """One HTTP answer of the viewer route."""

    status: int
    body: bytes
    content_type: str
    cacheable: bool = False


def content_type(name: str) -> str:
    """The ``Content-Type`` for a file name."""
    return CONTENT_TYPES.get(PurePosixPath(name).suffix.lower(), "application/octet-stream")


def safe_relative(subpath: str) -> str | None:
    """Normalise a request path below the prefix, or None if it may not name a file.

    Rejected: ``..`` or ``.`` segments, back-slashes, NUL, percent signs (Orthanc has
    already decoded the URI once; a second encoding layer is never legitimate here)
    and hidden names (a segment starting with ``.``). Empty segments are dropped.

    Args:
        subpath: The part of the URI after the prefix, e.g. ``"/assets/x.png"``.

    Returns:
        ``"assets/x.png"``, ``""`` for the site root, or None.
    """
    if any(c in subpath for c in ("\\", "\0", "%")):
        return None
    parts = [p for p in subpath.split("/") if p]
    if any(p.startswith(".") for p in parts):
        return None
    return "/".join(parts)


def resolve_file(root: Path, relative: str) -> Path | None:
    """The regular file ``relative`` names inside ``root``, or None.

    Symbolic links are followed, but the result must still lie inside ``root``
    (resolved): nothing outside the site folder is ever served.
    """
    if not relative:
        return None
    try:
        base = root.resolve(strict=True)
        target = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target


def looks_like_asset(relative: str) -> bool:
    """True if a missing path should be a 404 rather than the app (``x.js``, ``y.png``)."""
    return PurePosixPath(relative).suffix.lower() in CONTENT_TYPES


_WEBPACK_PUBLIC_PATH = re.compile(r'(__webpack_require__\.p\s*=\s*)"/"')
_HTML_ROOT_ATTR = re.compile(r'(\s(?:href|src)=")/(?!/)')
_HTML_PUBLIC_URL = re.compile(r'(window\.PUBLIC_URL\s*=\s*)"/"')
_HTML_SERVICE_WORKER = re.compile(
    r'<script[^>]*src="[^"]*init-service-worker\.js"[^>]*>\s*</script>')
_CSS_ROOT_URL = re.compile(r'url\((["\']?)/(?!/)')
_JSON_ROOT_SRC = re.compile(r'("src"\s*:\s*")/(?!/)')


def rewrite(relative: str, data: bytes, prefix: str) -> bytes:
    """Move a file of the OHIF build from ``/`` to ``prefix`` (see the module docstring).

    Args:
        relative: The file's path in the site (decides what is rewritten).
        data: Its content.
        prefix: ``"/ohif"`` (no trailing slash).

    Returns:
        The content to serve (``data`` itself when nothing applies).
    """
    name = PurePosixPath(relative).name
    suffix = PurePosixPath(relative).suffix.lower()
    if suffix == ".js" and b"__webpack_require__.p" in data:
        text = data.decode("utf-8")
        return _WEBPACK_PUBLIC_PATH.sub(lambda m: f'{m.group(1)}"{prefix}/"', text).encode()
    if suffix == ".css" and b"url(" in data:
        text = data.decode("utf-8")
        return _CSS_ROOT_URL.sub(lambda m: f"url({m.group(1)}{prefix}/", text).encode()
    if name == "index.html":
        text = data.decode("utf-8")
        text = _HTML_SERVICE_WORKER.sub("", text)
        text = _HTML_PUBLIC_URL.sub(lambda m: f'{m.group(1)}"{prefix}/"', text)
        text = _HTML_ROOT_ATTR.sub(lambda m: f"{m.group(1)}{prefix}/", text)
        return text.encode()
    if name == "manifest.json":
        text = data.decode("utf-8")
        return _JSON_ROOT_SRC.sub(lambda m: f"{m.group(1)}{prefix}/", text).encode()
    return data


def app_config(prefix: str, dicomweb_root: str) -> str:
    """OHIF's ``app-config.js``: the router under ``prefix``, one DICOMweb source: Orthanc.

    The DICOMweb URLs are built in the browser from ``window.location.origin``, so
    the viewer works under whatever host name and port Orthanc is reached by.

    Args:
        prefix: Where the viewer is served (``"/ohif"``).
        dicomweb_root: Orthanc's DICOMweb root path (``DicomWeb.Root``, ``"/dicom-web/"``).
    """
    root = "/" + dicomweb_root.strip("/")
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (tomoscribe)",
            "name": "orthanc",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    return (
        "/* Generated by tomoscribe (plugin/ohif.py): OHIF reads Orthanc's DICOMweb. */\n"
        f"const dicomweb = window.location.origin + {json.dumps(root)};\n"
        f"const source = {json.dumps(source, indent=2)};\n"
        "source.configuration.qidoRoot = dicomweb;\n"
        "source.configuration.wadoRoot = dicomweb;\n"
        "source.configuration.wadoUriRoot = dicomweb;\n"
        "window.config = {\n"
        f"  routerBasename: {json.dumps(prefix)},\n"
        "  showStudyList: true,\n"
        "  extensions: [],\n"
        "  modes: [],\n"
        "  maxNumberOfWebWorkers: 2,\n"
        "  showLoadingIndicator: true,\n"
        "  strictZSpacingForVolumeViewport: true,\n"
        "  defaultDataSourceName: 'orthanc',\n"
        "  dataSources: [source],\n"
        "};\n"
    )


class OhifSite:
    """The viewer's files under a prefix: lookup, fallback, rewriting, caching.

    Args:
        directory: The ``dist/`` folder of ``@ohif/app``, or None if not configured.
        prefix: URL prefix without a trailing slash.
        dicomweb_root: Orthanc's DICOMweb root (for :func:`app_config`).
    """

    def __init__(self, directory: Path | None, prefix: str = PREFIX,
                 dicomweb_root: str = "/dicom-web/"):
        self.directory = directory
        self.prefix = "/" + prefix.strip("/")
        self.config_js = app_config(self.prefix, dicomweb_root).encode()
        self._cache: dict[str, tuple[tuple[int, int], bytes]] = {}
        self._lock = threading.Lock()

    def installed(self) -> bool:
        """True if the configured folder holds an OHIF build (its ``index.html``)."""
        return self.directory is not None and (self.directory / "index.html").is_file()

    def _content(self, relative: str, path: Path) -> bytes:
        """The file as served: rewritten ones come from the cache while the file is unchanged."""
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            hit = self._cache.get(relative)
        if hit is not None and hit[0] == key:
            return hit[1]
        data = path.read_bytes()
        served = rewrite(relative, data, self.prefix)
        if served is not data:
            with self._lock:
                self._cache[relative] = (key, served)
        return served

    def answer(self, method: str, subpath: str) -> Answer:
        """Answer ``method`` on ``<prefix><subpath>`` (``subpath`` empty or starting with /).

        Returns:
            200 with a file, ``app-config.js`` or ``index.html`` (the single-page-app
            fallback); 404 with a one-line reason; 405 for anything but GET.
        """
        if method != "GET":
            return Answer(405, b"GET only", "text/plain; charset=utf-8")
        directory = self.directory
        if directory is None or not self.installed():
            return Answer(404, NOT_INSTALLED.encode(), "text/plain; charset=utf-8")
        relative = safe_relative(subpath)
        if relative is None:
            return Answer(404, b"no such file in the viewer", "text/plain; charset=utf-8")
        if relative == "app-config.js":
            return Answer(200, self.config_js, content_type(relative))
        path = resolve_file(directory, relative)
        if path is not None and path.name != "index.html":
            try:
                return Answer(200, self._content(relative, path), content_type(relative),
                              cacheable=True)
            except OSError as exc:
                return Answer(404, f"cannot read {relative}: {exc.strerror}".encode(),
                              "text/plain; charset=utf-8")
        if path is None and looks_like_asset(relative):
            return Answer(404, f"no file {relative} in the viewer".encode(),
                          "text/plain; charset=utf-8")
        index = directory / "index.html"
        try:
            return Answer(200, self._content("index.html", index), content_type("index.html"))
        except OSError as exc:
            return Answer(404, f"cannot read index.html: {exc.strerror}".encode(),
                          "text/plain; charset=utf-8")


def make_callback(site: OhifSite, log_error: Callable[[str], None]) -> Callable[..., None]:
    """An Orthanc REST callback (``RegisterRestCallback``) serving ``site``."""

    def callback(output: Any, uri: str, **request: Any) -> None:
        try:
            groups = request.get("groups") or ()
            subpath = (groups[0] if groups else "") or ""
            answer = site.answer(str(request.get("method", "GET")), subpath)
        except Exception as exc:  # never a traceback into Orthanc's HTTP thread
            log_error(f"tomoscribe: {uri}: {type(exc).__name__}: {exc}")
            answer = Answer(500, f"{type(exc).__name__}".encode(), "text/plain; charset=utf-8")
        if answer.status == 200:
            output.SetHttpHeader("Cache-Control", f"private, max-age={MAX_AGE_S}"
                                 if answer.cacheable else "no-cache")
            output.SetHttpHeader("X-Content-Type-Options", "nosniff")
            output.AnswerBuffer(answer.body, answer.content_type)
        elif answer.status == 405:
            output.SendMethodNotAllowed("GET")
        else:
            text = answer.body.decode("utf-8", errors="replace")
            output.SendHttpStatus(answer.status, text, len(text.encode()))

    return callback


def dicomweb_root(config: Mapping[str, Any]) -> str:
    """Orthanc's DICOMweb root from its configuration (``DicomWeb.Root``)."""
    section = config.get("DicomWeb") or {}
    root = section.get("Root", "/dicom-web/") if isinstance(section, Mapping) else "/dicom-web/"
    return str(root or "/dicom-web/")


def register(orthanc: Any, directory: Path | None, config: Mapping[str, Any],
             log: Callable[[str], None]) -> OhifSite:
    """Register the viewer route on Orthanc; log where it is and whether it is installed."""
    site = OhifSite(directory, PREFIX, dicomweb_root(config))
    callback = make_callback(site, orthanc.LogError)
    orthanc.RegisterRestCallback(f"{PREFIX}(/.*)?", callback)
    if site.installed():
        log(f"tomoscribe: OHIF viewer at {PREFIX}/ (files: {directory})")
    else:
        log(f"tomoscribe: {PREFIX}/ answers 404: {NOT_INSTALLED}")
    return site

