"""plugin/ohif.py without a server: path safety, single-page-app fallback, rewriting, config.

The site here is a small stand-in folder shaped like the ``@ohif/app`` build
(plus, where installed, checks on the real build under ``var/ohif/dist``); the
browser test (test_ohif_browser.py) runs the real viewer against a real Orthanc.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from ohif import (
    NOT_INSTALLED,
    OhifSite,
    app_config,
    content_type,
    dicomweb_root,
    make_callback,
    register,
    resolve_file,
    rewrite,
    safe_relative,
)

REAL_BUILD = Path(__file__).resolve().parent.parent / "var" / "ohif" / "dist"

INDEX = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json"><link rel="icon" href="/assets/favicon.ico">'
    '<a href="//cdn.example/x.js"></a><a href="https://ohif.org/">x</a>'
    '<script rel="preload" as="script" src="/app-config.js"></script>'
    '<script rel="preload" as="script" type="module" src="/init-service-worker.js"></script>'
    '<script defer src="/app.bundle.abc123.js"></script><link href="/app.bundle.css" '
    'rel="stylesheet"></head><body><div id="root"></div></body></html>'
)


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text(INDEX)
    (root / "app-config.js").write_text("window.config = {routerBasename: null};")
    (root / "app.bundle.abc123.js").write_text(
        'var x = 1;\n__webpack_require__.p = "/";\nvar y = "/";\n')
    (root / "7.bundle.js").write_text('export const a = "/";\n')
    (root / "app.bundle.css").write_text(
        "@font-face{src:url(/a1.woff2) format('woff2')}"
        "a{background:url('/assets/b.png')}b{background:url(//cdn/x.png)}"
        "c{background:url(data:image/png;base64,AA==)}")
    (root / "manifest.json").write_text('{"icons": [{"src": "/assets/i.png"}]}')
    (root / "assets" / "favicon.ico").write_bytes(b"\0\1icon")
    (root / "x.wasm").write_bytes(b"\0asm")
    (root / ".hidden").write_text("secret")
    (tmp_path / "secret.txt").write_text("outside the site")
    return root


@pytest.fixture
def site(site_dir: Path) -> OhifSite:
    return OhifSite(site_dir, "/ohif", "/dicom-web/")


# -- path handling ---------------------------------------------------------------------------


@pytest.mark.parametrize(("subpath", "expected"), [
    ("", ""),
    ("/", ""),
    ("/viewer", "viewer"),
    ("//assets//favicon.ico", "assets/favicon.ico"),
    ("/../secret.txt", None),
    ("/assets/../../secret.txt", None),
    ("/..", None),
    ("/./index.html", None),
    ("/.hidden", None),
    ("/assets\\..\\..\\secret.txt", None),
    ("/%2e%2e/secret.txt", None),
    ("/index.html\0.png", None),
])
def test_safe_relative(subpath: str, expected: str | None) -> None:
    assert safe_relative(subpath) == expected


def test_resolve_file_stays_inside(site_dir: Path, tmp_path: Path) -> None:
    assert resolve_file(site_dir, "assets/favicon.ico") == (site_dir / "assets" /
                                                             "favicon.ico").resolve()
    assert resolve_file(site_dir, "assets") is None  # a folder is not a file
    assert resolve_file(site_dir, "missing.js") is None
    assert resolve_file(site_dir, "../secret.txt") is None  # even if safe_relative let it by
    assert resolve_file(site_dir, str(tmp_path / "secret.txt")) is None  # absolute
    os.symlink(tmp_path / "secret.txt", site_dir / "link.txt")
    assert resolve_file(site_dir, "link.txt") is None  # a link leading outside
    os.symlink(site_dir / "x.wasm", site_dir / "inside.wasm")
    assert resolve_file(site_dir, "inside.wasm") is not None  # a link staying inside


@pytest.mark.parametrize("subpath", [
    "/../secret.txt", "/assets/../../secret.txt", "/link.txt", "/%2e%2e/secret.txt",
    "/..\\secret.txt",
])
def test_no_traversal_through_answer(site: OhifSite, site_dir: Path, tmp_path: Path,
                                     subpath: str) -> None:
    os.symlink(tmp_path / "secret.txt", site_dir / "link.txt")
    answer = site.answer("GET", subpath)
    assert b"outside the site" not in answer.body
    assert answer.status == 404 or answer.content_type.startswith("text/html")


# -- answers ---------------------------------------------------------------------------------


def test_files_and_content_types(site: OhifSite) -> None:
    ico = site.answer("GET", "/assets/favicon.ico")
    assert (ico.status, ico.body, ico.content_type) == (200, b"\0\1icon", "image/x-icon")
    assert ico.cacheable
    wasm = site.answer("GET", "/x.wasm")
    assert wasm.content_type == "application/wasm"
    assert site.answer("GET", "/app.bundle.css").content_type.startswith("text/css")
    assert site.answer("GET", "/7.bundle.js").content_type.startswith("text/javascript")
    assert content_type("a.woff2") == "font/woff2"
    assert content_type("README") == "application/octet-stream"


@pytest.mark.parametrize("subpath", ["", "/", "/viewer", "/viewer/", "/segmentation",
                                     "/viewer/1.2.840.113619.2"])
def test_spa_fallback_is_index(site: OhifSite, subpath: str) -> None:
    answer = site.answer("GET", subpath)
    assert answer.status == 200 and answer.content_type.startswith("text/html")
    assert b'window.PUBLIC_URL="/ohif/"' in answer.body
    assert not answer.cacheable


@pytest.mark.parametrize("subpath", ["/missing.js", "/assets/nope.png", "/9.bundle.css"])
def test_missing_asset_is_404(site: OhifSite, subpath: str) -> None:
    answer = site.answer("GET", subpath)
    assert answer.status == 404 and b"no file" in answer.body


def test_only_get(site: OhifSite) -> None:
    assert site.answer("POST", "/viewer").status == 405


def test_not_installed_says_how(tmp_path: Path) -> None:
    for directory in (None, tmp_path / "nowhere", tmp_path):
        answer = OhifSite(directory).answer("GET", "/viewer")
        assert answer.status == 404 and answer.body.decode() == NOT_INSTALLED
    assert "make setup" in NOT_INSTALLED and "OhifDirectory" in NOT_INSTALLED


def test_generated_config_replaces_the_packaged_one(site: OhifSite) -> None:
    answer = site.answer("GET", "/app-config.js")
    assert answer.status == 200 and not answer.cacheable
    assert b"routerBasename: null" not in answer.body
    assert b'routerBasename: "/ohif"' in answer.body
    assert b'window.location.origin + "/dicom-web"' in answer.body


# -- rewriting -------------------------------------------------------------------------------


def test_index_rewritten(site: OhifSite) -> None:
    html = site.answer("GET", "/viewer").body.decode()
    assert 'window.PUBLIC_URL="/ohif/"' in html
    for ref in ('href="/ohif/manifest.json"', 'href="/ohif/assets/favicon.ico"',
                'src="/ohif/app-config.js"', 'src="/ohif/app.bundle.abc123.js"',
                'href="/ohif/app.bundle.css"', 'href="//cdn.example/x.js"',
                'href="https://ohif.org/"'):
        assert ref in html, ref
    assert "init-service-worker" not in html
    assert 'src="/' not in html.replace('src="/ohif/', "")


def test_bundle_public_path_rewritten(site: OhifSite) -> None:
    js = site.answer("GET", "/app.bundle.abc123.js").body.decode()
    assert '__webpack_require__.p = "/ohif/";' in js
    assert 'var y = "/";' in js  # other strings untouched
    assert site.answer("GET", "/7.bundle.js").body == b'export const a = "/";\n'


def test_css_and_manifest_rewritten(site: OhifSite) -> None:
    css = site.answer("GET", "/app.bundle.css").body.decode()
    assert "url(/ohif/a1.woff2)" in css and "url('/ohif/assets/b.png')" in css
    assert "url(//cdn/x.png)" in css and "url(data:image/png" in css
    manifest = site.answer("GET", "/manifest.json").body.decode()
    assert '"src": "/ohif/assets/i.png"' in manifest


def test_rewrite_cache_follows_the_file(site: OhifSite, site_dir: Path) -> None:
    first = site.answer("GET", "/app.bundle.css").body
    assert site.answer("GET", "/app.bundle.css").body is first  # cached
    path = site_dir / "app.bundle.css"
    path.write_text("d{src:url(/c.woff2)}")
    os.utime(path, ns=(1, 1))
    assert site.answer("GET", "/app.bundle.css").body == b"d{src:url(/ohif/c.woff2)}"


def test_rewrite_leaves_other_files_alone() -> None:
    data = b'__webpack_require__.p = "/";'
    assert rewrite("x.png", data, "/ohif") is data
    assert rewrite("a/sw.txt", b"url(/x)", "/ohif") == b"url(/x)"


def test_app_config_roots() -> None:
    js = app_config("/viewer", "dicom-web2")
    assert 'routerBasename: "/viewer"' in js and '+ "/dicom-web2"' in js
    assert dicomweb_root({"DicomWeb": {"Root": "/dw/"}}) == "/dw/"
    assert dicomweb_root({}) == "/dicom-web/"
    assert dicomweb_root({"DicomWeb": "nonsense"}) == "/dicom-web/"


# -- the Orthanc callback --------------------------------------------------------------------


class Output:
    """Records what the callback answered (orthanc-python's RestOutput)."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.answer: tuple[Any, str] | None = None
        self.status: tuple[int, str, int] | None = None
        self.allowed: str | None = None

    def SetHttpHeader(self, key: str, value: str) -> None:  # noqa: N802 (Orthanc's names)
        self.headers[key] = value

    def AnswerBuffer(self, body: Any, mime: str) -> None:  # noqa: N802
        self.answer = (body, mime)

    def SendHttpStatus(self, status: int, body: str, size: int) -> None:  # noqa: N802
        self.status = (status, body, size)

    def SendMethodNotAllowed(self, allowed: str) -> None:  # noqa: N802
        self.allowed = allowed


def test_callback(site: OhifSite) -> None:
    errors: list[str] = []
    callback = make_callback(site, errors.append)
    out = Output()
    callback(out, "/ohif/assets/favicon.ico", method="GET", groups=("/assets/favicon.ico",))
    assert out.answer == (b"\0\1icon", "image/x-icon")
    assert out.headers["Cache-Control"].startswith("private, max-age=")
    out = Output()
    callback(out, "/ohif", method="GET", groups=(None,))  # the optional group did not match
    assert out.answer is not None and out.answer[1].startswith("text/html")
    assert out.headers["Cache-Control"] == "no-cache"
    out = Output()
    callback(out, "/ohif/x.js", method="GET", groups=("/x.js",))
    assert out.status is not None and out.status[0] == 404
    assert out.status[2] == len(out.status[1].encode())
    out = Output()
    callback(out, "/ohif/", method="PUT", groups=("/",))
    assert out.allowed == "GET"
    assert errors == []


def test_callback_never_raises(site: OhifSite) -> None:
    errors: list[str] = []
    callback = make_callback(site, errors.append)
    out = Output()
    callback(out, "/ohif/x", method="GET", groups=(42,))  # not a string: a bug, not a crash
    assert out.status is not None and out.status[0] == 500
    assert len(errors) == 1 and "\n" not in errors[0]


def test_register(site_dir: Path) -> None:
    routes: dict[str, Any] = {}
    logs: list[str] = []

    class Orthanc:
        RegisterRestCallback = staticmethod(routes.__setitem__)
        LogError = staticmethod(logs.append)

    register(Orthanc, site_dir, {"DicomWeb": {"Root": "/dicom-web/"}}, logs.append)
    assert list(routes) == ["/ohif(/.*)?"]
    assert "OHIF viewer at /ohif/" in logs[-1]
    register(Orthanc, None, {}, logs.append)
    assert "answers 404" in logs[-1]


@pytest.mark.skipif(not (REAL_BUILD / "index.html").is_file(), reason="no OHIF build (make setup)")
def test_real_build_is_fully_moved() -> None:
    """On the pinned build: no root-relative reference is left in what the browser loads first."""
    site = OhifSite(REAL_BUILD)
    html = site.answer("GET", "/viewer").body.decode()
    assert 'window.PUBLIC_URL="/ohif/"' in html
    assert 'src="/' not in html.replace('src="/ohif/', "")
    assert 'href="/' not in html.replace('href="/ohif/', "")
    css = site.answer("GET", "/app.bundle.css").body.decode()
    assert "url(/" not in css.replace("url(/ohif/", "")
    entries = [p.name for p in REAL_BUILD.glob("*.js")
               if b'__webpack_require__.p = "/"' in p.read_bytes()]
    assert entries, "no webpack runtime found: has the build's layout changed?"
    for name in entries:
        js = site.answer("GET", f"/{name}").body
        assert b'__webpack_require__.p = "/ohif/"' in js, name
