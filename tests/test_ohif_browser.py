"""The OHIF viewer served by the plugin, driven by a real browser (headless Debian chromium).

One real Orthanc (namespaced, see orthanc_harness.py) processes the sample
phantom study (seed 9) with the real app; then chromium, started by
chromedriver inside the same loopback-only namespace, opens the study's deep
link ``/ohif/viewer?StudyInstanceUIDs=...`` the way a new user would: the
password once (cached by the browser, as after its log-in prompt), the
"investigational use" banner and the onboarding tour dismissed, each series
opened by a double-click on its entry in the study browser. Everything
asserted is read from the page: the SR's findings text in the viewport, the
SEG's segments in the segmentation panel (after confirming the load prompt),
and the measurement SR's regions in the measurement panel when the app wrote one.
Screenshots go to ``test-artifacts/ohif/`` (ignored by git).

Selenium talks to chromedriver over loopback, so every WebDriver call runs on
the harness thread that joined Orthanc's namespace (``server.in_netns``);
chromedriver and chromium, forked from that thread, live in the namespace too.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
from orthanc_harness import REPO, OrthancServer, orthanc_server, unavailable_reason

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
OHIF_DIR = REPO / "var" / "ohif" / "dist"
ARTIFACTS = REPO / "test-artifacts" / "ohif"
SAMPLE_SEED = 9
TRUTH_JOB = Path(__file__).resolve().parent / "ohif_truth_job.py"
#: the plugin's standing questions: two masks that overlap (the liver holds its lesion)
ANSWER_QUESTIONS = ["segment the liver .", "segment the lesions ."]
T = TypeVar("T")


def _reason() -> str | None:
    reason = unavailable_reason()
    if reason:
        return f"no namespaced Orthanc here: {reason}"
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not Path(tool).exists():
            return f"{tool} not found (Debian packages chromium, chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make setup)"
    return None


_REASON = _reason()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


# -- the study, processed by the real app ---------------------------------------------------


def _sr_texts(ds: pydicom.Dataset) -> dict[str, list[str]]:
    """TEXT values of an SR grouped by the name of the container holding them."""
    out: dict[str, list[str]] = {}

    def walk(items: Any, parent: str) -> None:
        for item in items:
            name = (item.ConceptNameCodeSequence[0].CodeMeaning
                    if "ConceptNameCodeSequence" in item else "")
            if item.ValueType == "TEXT":
                out.setdefault(parent, []).append(str(item.TextValue))
            walk(item.get("ContentSequence", []), name if item.ValueType == "CONTAINER"
                 else parent)

    walk(ds.get("ContentSequence", []), str(ds.ConceptNameCodeSequence[0].CodeMeaning))
    return out


def _download(server: OrthancServer, instance_id: str) -> pydicom.Dataset:
    resp = server.request("GET", f"/instances/{instance_id}/file")
    assert resp.status == 200, resp.body[:200]
    from io import BytesIO

    return pydicom.dcmread(BytesIO(resp.body))


def _outputs(server: OrthancServer, study_uid: str, timeout: float) -> dict[str, Any]:
    from test_e2e_orthanc import own_series, wait_job_settled

    job = wait_job_settled(server, study_uid, timeout=timeout)
    assert job["state"] == "done", f"{job['reason']}\n{server.worker_log()[-3000:]}"
    series = own_series(server, job["orthanc_study_id"])
    assert {"SR", "SEG"} <= set(series), series
    return {"study_uid": study_uid,
            "sr": _download(server, series["SR"][0]),
            "seg": _download(server, series["SEG"][0]),
            "meas": _download(server, series["MEAS"][0]) if "MEAS" in series else None,
            "qseg": _download(server, series["QSEG"][0]) if "QSEG" in series else None}


@pytest.fixture(scope="module")
def processed(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancServer, dict[str, Any]]]:
    """A server holding two processed studies: ``sample`` (the real app) and ``truth``.

    ``sample`` is the sample phantom study (seed 9) as the real app reports it, whatever
    the shipped model's state; ``truth`` is the same phantom as another patient, reported
    from its ground truth by ``ohif_truth_job.py`` so that a measurement SR always exists.
    """
    from test_e2e_orthanc import write_study

    from tomoscribe.phantom import make_phantom, write_dicom_series

    assert (OHIF_DIR / "index.html").is_file(), f"no OHIF build at {OHIF_DIR}: run 'make setup'"
    root = tmp_path_factory.mktemp("ohif")
    folder, study_uid = write_study(root / "sample", seed=SAMPLE_SEED)
    truth_uid = "1.2.826.0.1.3680043.8.498.1009"
    write_dicom_series(make_phantom(SAMPLE_SEED), root / "truth", study_instance_uid=truth_uid,
                       patient_id=f"TRUTH{SAMPLE_SEED}")
    with orthanc_server(root / "server", {"LeaseSeconds": 30, "OhifDirectory": str(OHIF_DIR),
                                          "JobFunction": f"{TRUTH_JOB}:run_app",
                                          "Questions": ANSWER_QUESTIONS},
                        stable_age=2) as server:
        server.storescu(folder)
        server.storescu(root / "truth")
        yield server, {"sample": _outputs(server, study_uid, 420),
                       "truth": _outputs(server, truth_uid, 120)}


# -- the browser ----------------------------------------------------------------------------


class Page:
    """A chromium session in the server's namespace; every call hops to that thread."""

    def __init__(self, server: OrthancServer, profile: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.server = server
        self.study_uid = ""  # the study open in the viewer
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1600,1000",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent /
                                                                       "chromedriver.log"))
        self.driver = server.in_netns(lambda: webdriver.Chrome(service=service,
                                                              options=options), timeout=120)

    def call(self, fn: Callable[[Any], T], timeout: float = 60) -> T:
        """``fn(driver)`` on the namespace thread."""
        return self.server.in_netns(lambda: fn(self.driver), timeout=timeout)

    def wait(self, xpath: str, timeout: float = 60, what: str = "") -> Any:
        """The first element matching ``xpath`` once there is one (polls)."""
        from selenium.webdriver.common.by import By

        def poll(driver: Any) -> Any:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                found = driver.find_elements(By.XPATH, xpath)
                if found and found[0].is_displayed():
                    return found[0]
                time.sleep(0.25)
            return None

        element = self.call(poll, timeout + 10)
        if element is None:
            self.screenshot("timeout")
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for"
                                 f" {what or xpath}")
        return element

    def text_of(self, data_cy: str) -> str:
        """Visible text of the first element with ``data-cy=...`` ('' if none)."""
        from selenium.webdriver.common.by import By

        def get(driver: Any) -> str:
            found = driver.find_elements(By.CSS_SELECTOR, f"[data-cy='{data_cy}']")
            return str(found[0].text) if found else ""

        return self.call(get)

    def wait_text(self, data_cy: str, wanted: list[str], timeout: float = 60) -> str:
        """Wait until the element's text holds every string of ``wanted`` (spaces folded)."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = _fold(self.text_of(data_cy))
            if all(_fold(w) in text for w in wanted):
                return text
            time.sleep(0.5)
        self.screenshot("timeout")
        missing = [w for w in wanted if _fold(w) not in text]
        raise AssertionError(f"{data_cy} never showed {missing!r}; it shows: {text[:800]!r}")

    def click(self, element: Any) -> None:
        self.call(lambda d: element.click())

    def double_click(self, element: Any) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        self.call(lambda d: ActionChains(d).double_click(element).perform())

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.call(lambda d: d.save_screenshot(str(path)))
        return path

    def quit(self) -> None:
        self.call(lambda d: d.quit(), timeout=60)


def overview(segmentation: Path) -> None:
    """``overview.png``: the report's text over the segmentation view (docs/ohif.png is one)."""
    from PIL import Image

    report_png = segmentation.with_name("report.png")
    if not report_png.exists():
        return
    with Image.open(report_png) as report, Image.open(segmentation) as seg:
        top = report.crop((0, 0, report.width, min(report.height, 300)))
        both = Image.new("RGB", (seg.width, top.height + seg.height))
        both.paste(top, (0, 0))
        both.paste(seg, (0, top.height))
        both.quantize(256).save(segmentation.with_name("overview.png"), optimize=True)


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def series_entry(page: Page, description: str) -> Any:
    """The study browser's entry of the series with this SeriesDescription."""
    return page.wait(f"//*[@data-cy='series-description-label' and normalize-space()="
                     f"'{description}']", what=f"the series '{description}' in the study browser")


def open_study(page: Page, study_uid: str, first: bool = False) -> None:
    """Open the study's deep link; dismiss the banner and the tour (whichever shows, any order).

    The tour's overlay can cover the banner's button, so clicks that land on something
    else are retried. ``first``: a new user's first visit, where both must show up (and
    are waited for); later visits dismiss whatever shows within a few seconds.
    """
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    url = f"{page.server.url}/ohif/viewer?StudyInstanceUIDs={study_uid}"
    page.call(lambda d: d.get(url))
    page.wait("//*[@data-cy='series-description-label']", 90, "the study browser")
    dialogs = {"banner": "//*[@data-cy='confirm-and-hide-button']",
               "tour": "//*[normalize-space(text())='Skip all']"}

    def dismiss(driver: Any) -> set[str]:
        gone: set[str] = set()
        quiet_until = time.monotonic() + 3  # nothing shown for 3 s: nothing to dismiss
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (time.monotonic() < quiet_until
                                               or (first and len(gone) < len(dialogs))):
            for name, xpath in dialogs.items():
                shown = [e for e in driver.find_elements(By.XPATH, xpath) if e.is_displayed()]
                if shown:
                    quiet_until = time.monotonic() + 3
                    try:
                        shown[0].click()
                        gone.add(name)
                    except WebDriverException:  # covered by the other one: next round
                        pass
            time.sleep(0.3)
        return gone

    dismissed = page.call(dismiss, 80)
    if first:
        assert dismissed == set(dialogs), f"a new user's first visit showed only {dismissed}"
    page.study_uid = study_uid


def show_study(page: Page, study_uid: str) -> None:
    """Make sure the viewer shows this study (opened afresh only when it is another one)."""
    if page.study_uid != study_uid:
        open_study(page, study_uid)


@pytest.fixture(scope="module")
def page(processed: tuple[OrthancServer, dict[str, Any]],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    """The viewer open on the sample study, as a new user: fresh profile, password once."""
    server, studies = processed
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's pictures only
    t0 = time.monotonic()
    page = Page(server, profile)
    try:
        # the password once, as a user types it at the browser's prompt: cached for the origin
        page.call(lambda d: d.get(f"http://{server.user}:{server.password}@127.0.0.1:8042/system"))
        open_study(page, studies["sample"]["study_uid"], first=True)
        page.wait("//*[@data-cy='viewport-pane']", 30, "the viewport")
        print(f"viewer open in {time.monotonic() - t0:.1f} s")
        yield page
    finally:
        page.quit()


# -- the tests ------------------------------------------------------------------------------


def test_deep_link_serves_the_app(processed: tuple[OrthancServer, dict[str, Any]]) -> None:
    """The deep link answers index.html under the prefix; assets and config are in place."""
    server, studies = processed
    study_uid = studies["sample"]["study_uid"]
    resp = server.request("GET", f"/ohif/viewer?StudyInstanceUIDs={study_uid}")
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/html")
    assert b'window.PUBLIC_URL="/ohif/"' in resp.body and b'src="/ohif/app-config.js"' in resp.body
    config = server.request("GET", "/ohif/app-config.js")
    assert config.status == 200 and b'routerBasename: "/ohif"' in config.body
    bundle = re.search(rb'src="(/ohif/app\.bundle\.[0-9a-f]+\.js)"', resp.body)
    assert bundle is not None
    js = server.request("GET", bundle.group(1).decode())
    assert js.status == 200 and b'__webpack_require__.p = "/ohif/"' in js.body
    assert server.request("GET", "/ohif/no-such-chunk.js").status == 404
    assert server.request("GET", "/ohif/viewer", auth=False).status == 401  # Orthanc's auth


@pytest.mark.parametrize("study", ["sample", "truth"])
def test_report_findings_shown(processed: tuple[OrthancServer, dict[str, Any]],
                               page: Page, study: str) -> None:
    """Double-click the draft SR: its findings (and impression) text is in the viewport.

    ``sample`` is what the shipped model wrote; ``truth`` has findings with image
    references, sizes and segment references under each finding's text.
    """
    info = processed[1][study]
    sr = info["sr"]
    texts = _sr_texts(sr)
    findings = texts.get("Findings", [])
    assert findings, f"the {study} SR has no Findings text: {texts}"
    show_study(page, info["study_uid"])
    page.double_click(series_entry(page, str(sr.SeriesDescription)))
    shown = page.wait_text("viewport-pane", ["Findings", *findings,
                                             *texts.get("Impressions", [])])
    page.screenshot("report" if study == "sample" else f"report-{study}")
    assert str(sr.ConceptNameCodeSequence[0].CodeMeaning) in shown


def load_segmentation(page: Page, study_uid: str, seg: pydicom.Dataset) -> tuple[str, Any]:
    """Double-click a SEG series, confirm the load prompt, open the segmentation panel.

    Returns the page text once every segment label shows, and the number of
    segments of each segmentation in cornerstone's state (``None`` if it has none).
    """
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    show_study(page, study_uid)
    page.double_click(series_entry(page, str(seg.SeriesDescription)))
    page.click(page.wait("//button[@data-cy='yes-hydrate-btn']", 60,
                         f"the prompt to load '{seg.SeriesDescription}'"))
    page.click(page.wait("//*[@data-cy='panelSegmentation-btn']", 30,
                         "the segmentation panel button"))
    body = _wait_body_text(page, labels, 90)
    counts = page.call(lambda d: d.execute_script(
        "const s = window.cornerstoneTools && window.cornerstoneTools.segmentation;"
        "return s ? s.state.getSegmentations().map("
        "  x => Object.keys(x.segments || {}).length) : null;"))
    return body, counts


def test_segmentation_loaded(processed: tuple[OrthancServer, dict[str, Any]],
                             page: Page) -> None:
    """Double-click the SEG, confirm the prompt: its segments are listed and drawn."""
    info = processed[1]["sample"]
    seg = info["seg"]
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    body, count = load_segmentation(page, info["study_uid"], seg)
    page.call(lambda d: d.execute_script(  # for the picture only: a slice through the organs
        "try { const v = window.cornerstone.getRenderingEngines()[0].getViewports()[0];"
        "  v.setImageIdIndex(Math.floor(v.getImageIds().length * 0.6)); } catch (e) {}"))
    time.sleep(1)
    overview(page.screenshot("segmentation"))
    assert count, "no segmentation in cornerstone's state"
    assert len(labels) in count, (count, labels, body[-300:])


def test_answer_masks_loaded(processed: tuple[OrthancServer, dict[str, Any]],
                             page: Page) -> None:
    """The referring answers' SEG (overlapping segments) loads and lists each question."""
    info = processed[1]["sample"]
    qseg = info["qseg"]
    assert qseg is not None, "the sample study's answers wrote no answer SEG"
    labels = [str(s.SegmentLabel) for s in qseg.SegmentSequence]
    assert labels == [f"Q{i}: {q.rstrip(' .')}" for i, q in enumerate(ANSWER_QUESTIONS, 1)]
    body, counts = load_segmentation(page, info["study_uid"], qseg)
    page.screenshot("answer-masks")
    assert counts and len(labels) in counts, (counts, labels, body[-300:])


def _wait_body_text(page: Page, wanted: list[str], timeout: float) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = _fold(page.call(lambda d: d.find_element(By.TAG_NAME, "body").text))
        if all(_fold(w) in text for w in wanted):
            return text
        time.sleep(0.5)
    page.screenshot("timeout")
    raise AssertionError(f"the page never showed {wanted!r}; it shows: {text[-800:]!r}")


def _planar_groups(meas: pydicom.Dataset) -> list[tuple[str, str]]:
    """(referenced SOP Instance UID, Long axis value) of each TID 1410 group of a TID 1500 SR."""
    groups = []

    def walk(items: Any) -> None:
        for item in items:
            code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item \
                else ""
            if item.ValueType == "CONTAINER" and code == "125007":
                sop, axis = "", ""
                for child in item.ContentSequence:
                    name = child.ConceptNameCodeSequence[0].CodeMeaning
                    if child.ValueType == "SCOORD":
                        sop = child.ContentSequence[0].ReferencedSOPSequence[0]\
                            .ReferencedSOPInstanceUID
                    elif child.ValueType == "NUM" and name.lower() == "long axis":
                        axis = f"{float(child.MeasuredValueSequence[0].NumericValue):.2f}"
                groups.append((str(sop), axis))
            else:
                walk(item.get("ContentSequence", []))

    walk(meas.ContentSequence)
    return groups


@pytest.mark.parametrize("study", ["truth", "sample"])
def test_measurements_drawn(processed: tuple[OrthancServer, dict[str, Any]], page: Page,
                            study: str) -> None:
    """Double-click the measurement SR: one outline per measured finding, on its image.

    ``truth`` always has one; ``sample`` has one when the shipped model measured a finding.
    """
    info = processed[1][study]
    meas = info["meas"]
    if meas is None:
        pytest.skip(f"the real app wrote no measurement SR for the {study} study (no finding"
                    " was measured); the truth study covers the drawing")
    groups = _planar_groups(meas)
    assert groups and all(sop for sop, _ in groups), groups
    open_study(page, info["study_uid"])  # afresh: no SEG or SR of an earlier test loaded
    page.double_click(series_entry(page, str(meas.SeriesDescription)))

    def drawn(driver: Any) -> list[list[str]]:
        deadline = time.monotonic() + 60
        found: list[list[str]] = []
        while time.monotonic() < deadline:
            found = driver.execute_script(
                "const a = window.cornerstoneTools && window.cornerstoneTools.annotation;"
                "return a ? a.state.getAllAnnotations()"
                "  .filter(x => x.metadata.toolName === 'DICOMSRDisplay')"
                "  .map(x => [x.metadata.referencedImageId || '', String(x.data.label || '')])"
                "  : [];") or []
            if len(found) >= len(groups):
                return found
            time.sleep(0.5)
        return found

    annotations = page.call(drawn, 80)
    # OHIF 3.13 jumps to the first measurement's image before its annotations exist and,
    # with more than one measurement in the SR, does not always repaint once they do (the
    # outline then appears on the next scroll): repaint once, as a user's first scroll would.
    page.call(lambda d: d.execute_script(
        "window.cornerstone.getEnabledElements().forEach(e => e.viewport.render());"), 20)
    page.screenshot(f"measurements-{study}")
    assert len(annotations) == len(groups), (annotations, groups)
    drawn_on = sorted(image_id for image_id, _ in annotations)
    for sop, _ in groups:  # each outline sits on the image the SR's SCOORD references
        assert any(f"/instances/{sop}/" in image_id for image_id in drawn_on), (sop, drawn_on)
    # the image shown first carries one of them, with its long axis written beside it
    text = _wait_body_text(page, ["Long axis:"], 30)
    assert any(f"Long axis: {axis} mm" in text for _, axis in groups), (groups, text[-400:])
