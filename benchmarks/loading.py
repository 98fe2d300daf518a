"""Loading speed and memory: tomoscribe vs MONAI Deploy's operators vs a plain pydicom loop.

    .venv/bin/python benchmarks/loading.py [--quick] [--repeats N] [--json PATH]
        [--case ct|study|j2k ...] [--loader tomoscribe|monai-deploy ...]

Inputs are generated once with pydicom (int16 CT with realistic headers and
body-like content) and cached under ``benchmarks/results/cache/`` (git-ignored):

* ``ct``: one thin axial series (300 slices 512x512, uncompressed);
* ``study``: a realistic study in one flat folder: a 3-image localizer, the
  thin axial series, a thick axial series (60 x 5 mm), a coronal reformat
  (150 images, DERIVED/SECONDARY) and a Comprehensive SR;
* ``j2k``: the thin axial series in JPEG 2000 lossless.

``--quick`` uses 60 slices of 256x256 (12 thick, 30 coronal): each load takes a
fraction of a second; the run still takes a minute or two on 2 cores, nearly
all of it MONAI Deploy's imports (holoscan) in its fresh interpreters.

Loaders, each from a folder to a ``(D, H, W)`` float32 volume of the chosen series:

* ``tomoscribe``: ``scan_folder`` + ``select_series`` (default rules) + ``load_series``;
* ``monai-deploy``: ``DICOMDataLoaderOperator.load_data_to_studies`` +
  ``DICOMSeriesSelectorOperator.filter`` + ``DICOMSeriesToVolumeOperator.convert_to_image``
  called directly (no holoscan graph), cast to float32;
* ``pydicom-loop``: the floor: ``dcmread`` every file of the chosen series
  (the file list is given, no scan), sort by position, stack ``pixel_array``,
  rescale to float32; single-threaded.

Timing: all loaders run in this one process, after a warm-up run of each on
each input; the median of ``--repeats`` runs (interleaved) is reported, with
the median CPU seconds of the same runs (this process plus its child
processes, i.e. tomoscribe's decoding workers, reaped or still running): on a
machine whose cores are busy with other work, wall time cannot drop below CPU
time / free cores. tomoscribe keeps its decoding workers between series, so
the warm runs do not pay for starting them: "cold s" is one load in a fresh
interpreter after its imports (the workers' start-up included), and the
pool's start-up alone (fresh interpreter, until each worker answers) is
printed below the table. Import/start-up cost (imports plus operator
construction) is measured separately, each in a fresh interpreter.
``--case`` and ``--loader`` run a subset (``--case j2k --loader tomoscribe``:
the JPEG 2000 target only, against the pydicom loop, which always runs).
Peak memory: each loader runs once
per input in a fresh subprocess; the figure is the peak resident set during
the load (``VmHWM``, reset through ``/proc/self/clear_refs`` just before it)
minus the resident set just before it (imports done), so it counts numpy and
decoder buffers alike, plus the largest summed resident set of its child
processes (tomoscribe's decoding workers for the JPEG 2000 case), sampled
every 10 ms and shown apart as "(workers)". Every loader's volume is checked
against the pydicom loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from tomoscribe.dicomio.synth import save_dicom

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / "cache"
#: bump when the generated data changes
DATA_VERSION = 1

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
COMPREHENSIVE_SR = UID("1.2.840.10008.5.1.4.1.1.88.33")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

#: MONAI Deploy rules picking the thin axial series of the study
MONAI_RULES: dict[str, Any] = {
    "selections": [
        {
            "name": "thin axial CT",
            "conditions": {
                "Modality": "(?i)CT",
                "ImageType": ["PRIMARY", "!LOCALIZER", "!SECONDARY"],
                "SliceThickness": [0.5, 2.0],
            },
        }
    ]
}

LOADERS = ("tomoscribe", "monai-deploy", "pydicom-loop")
CASES = ("ct", "study", "j2k")


# --------------------------------------------------------------------------- data


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"thin": 60, "size": 256, "thick": 12, "coronal": 30}
    return {"thin": 300, "size": 512, "thick": 60, "coronal": 150}


def _body(size: int, z: float, rng: np.random.Generator) -> np.ndarray:
    """A CT-like slice ``(size, size)`` in HU: air, an elliptic body, a spine, noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    a = 0.42 + 0.03 * np.sin(z / 40.0)
    body = (x / a) ** 2 + (y / 0.30) ** 2 <= 1.0
    hu[body] = 40.0
    lungs = ((np.abs(x) - 0.17) / 0.12) ** 2 + ((y + 0.02) / 0.18) ** 2 <= 1.0
    hu[lungs & body] = -850.0
    spine = (x / 0.05) ** 2 + ((y - 0.2) / 0.05) ** 2 <= 1.0
    hu[spine] = 700.0
    hu[body] += rng.normal(0.0, 12.0, size=int(body.sum())).astype(np.float32)
    return np.clip(hu, -1024.0, 3071.0)


def _header(
    study: dict[str, str], series_uid: str, for_uid: str, number: int, desc: str, itype: list[str]
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = itype
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, kw, "20240315")
    for kw in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        setattr(ds, kw, "101500.000000")
    ds.AccessionNumber = "A20240315001"
    ds.Modality = "CT"
    ds.Manufacturer = "Bench Medical"
    ds.InstitutionName = "Bench Hospital"
    ds.ReferringPhysicianName = "Doe^Jane"
    ds.StationName = "CT01"
    ds.StudyDescription = "CT CHEST ABDOMEN"
    ds.SeriesDescription = desc
    ds.ManufacturerModelName = "Bench 128"
    ds.PatientName = "Bench^Patient"
    ds.PatientID = "BENCH0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = "064Y"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = "bench-1.0"
    ds.ReconstructionDiameter = "400"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.Exposure = "100"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study["uid"]
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _write_series(
    folder: Path,
    study: dict[str, str],
    n: int,
    size: int,
    orientation: tuple[float, ...],
    spacing: float,
    thickness: float,
    number: int,
    desc: str,
    itype: list[str],
    rng: np.random.Generator,
    syntax: UID = ExplicitVRLittleEndian,
    origin: tuple[float, float, float] = (-200.0, -200.0, -150.0),
    series_uid: str | None = None,
) -> list[Path]:
    """Write ``n`` slices with random file names; returns paths in slice order."""
    series_uid = series_uid or generate_uid()
    row = np.asarray(orientation[:3])
    col = np.asarray(orientation[3:])
    normal = np.cross(row, col)
    pix = 400.0 / size
    paths = []
    for k in range(n):
        pos = np.asarray(origin) + k * spacing * normal
        ds = _header(study, series_uid, study["for"], number, desc, itype)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.SliceLocation = f"{float(np.dot(pos, normal)):.4f}"
        ds.SliceThickness = f"{thickness:g}"
        ds.PixelSpacing = [f"{pix:.6g}", f"{pix:.6g}"]
        ds.Rows = size
        ds.Columns = size
        stored = (_body(size, float(pos[2]), rng) + 1024.0).astype(np.int16)
        if syntax == JPEG2000Lossless:
            ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg")
        else:
            ds.PixelData = stored.tobytes()
        path = folder / f"{rng.integers(1 << 62):016x}"
        save_dicom(ds, path, syntax)
        paths.append(path)
    return paths


def _write_sr(path: Path, study: dict[str, str]) -> None:
    ds = Dataset()
    ds.SOPClassUID = COMPREHENSIVE_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study["uid"]
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.PatientName = "Bench^Patient"
    ds.PatientID = "BENCH0001"
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    save_dicom(ds, path)


def generate(quick: bool, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate (or reuse from the cache) the three inputs.

    Returns:
        ``{"root": Path, "cases": {case: {"folder": str, "files": [chosen series paths]}}}``.
    """
    s = _sizes(quick)
    root = CACHE / f"v{DATA_VERSION}-{'quick' if quick else 'full'}"
    manifest = root / "manifest.json"
    if manifest.exists():
        got: dict[str, Any] = json.loads(manifest.read_text())
        return got
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(20240315)
    t0 = time.perf_counter()
    study = {"uid": str(generate_uid()), "for": str(generate_uid())}
    ct = root / "ct"
    ct.mkdir(parents=True)
    thin = _write_series(
        ct, study, s["thin"], s["size"], AXIAL, 1.0, 1.0, 3, "AX 1.0 STANDARD",
        ["ORIGINAL", "PRIMARY", "AXIAL"], rng,
    )  # fmt: skip
    log(f"  generated ct ({s['thin']} slices) in {time.perf_counter() - t0:.1f} s")

    st = root / "study"
    st.mkdir()
    for p in thin:  # the same thin series, hard-linked into the study folder
        os.link(p, st / p.name)
    scout_uid = generate_uid()  # one localizer series of three planes
    for i, ori in enumerate((CORONAL, SAGITTAL, AXIAL)):
        _write_series(
            st, study, 1, s["size"], ori, 1.0, 2.0, 1, "SCOUT",
            ["ORIGINAL", "PRIMARY", "LOCALIZER"], rng, origin=(-200.0 + i, -200.0, 0.0),
            series_uid=scout_uid,
        )  # fmt: skip
    _write_series(
        st, study, s["thick"], s["size"], AXIAL, 5.0, 5.0, 2, "AX 5.0",
        ["ORIGINAL", "PRIMARY", "AXIAL"], rng,
    )  # fmt: skip
    _write_series(
        st, study, s["coronal"], s["size"], CORONAL, 2.0, 2.0, 4, "COR MPR 2.0",
        ["DERIVED", "SECONDARY", "REFORMATTED"], rng, origin=(-200.0, -150.0, 150.0),
    )  # fmt: skip
    _write_sr(st / "sr0000", study)
    log(f"  generated study in {time.perf_counter() - t0:.1f} s")

    j2k = root / "j2k"
    j2k.mkdir()
    rng = np.random.default_rng(20240315)
    j2k_files = _write_series(
        j2k, study, s["thin"], s["size"], AXIAL, 1.0, 1.0, 3, "AX 1.0 STANDARD J2K",
        ["ORIGINAL", "PRIMARY", "AXIAL"], rng, syntax=JPEG2000Lossless,
    )  # fmt: skip
    log(f"  generated j2k in {time.perf_counter() - t0:.1f} s")

    out = {
        "root": str(root),
        "sizes": s,
        "cases": {
            "ct": {"folder": str(ct), "files": [str(p) for p in thin]},
            "study": {"folder": str(st), "files": [str(st / p.name) for p in thin]},
            "j2k": {"folder": str(j2k), "files": [str(p) for p in j2k_files]},
        },
    }
    manifest.write_text(json.dumps(out))
    return out


# --------------------------------------------------------------------------- loaders


def _imports(loader: str) -> Any:
    """Import what ``loader`` needs and build its objects; returns the load function."""
    if loader == "tomoscribe":
        from tomoscribe.dicomio import load_series, scan_folder, select_series

        def tomo(folder: str, files: list[str]) -> np.ndarray:
            chosen = select_series(scan_folder(folder)).chosen
            return load_series(chosen).voxels

        return tomo
    if loader == "monai-deploy":
        import logging

        from holoscan.core import Fragment
        from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
        from monai.deploy.operators.dicom_series_selector_operator import (
            DICOMSeriesSelectorOperator,
        )
        from monai.deploy.operators.dicom_series_to_volume_operator import (
            DICOMSeriesToVolumeOperator,
        )

        logging.disable(logging.WARNING)
        fragment = Fragment()
        reader = DICOMDataLoaderOperator(fragment, name="loader")
        selector = DICOMSeriesSelectorOperator(fragment, name="selector")
        to_volume = DICOMSeriesToVolumeOperator(fragment, name="to_volume")

        def monai(folder: str, files: list[str]) -> np.ndarray:
            studies = reader.load_data_to_studies(Path(folder))
            chosen = selector.filter(MONAI_RULES, studies)
            image = to_volume.convert_to_image(chosen)
            if image is None:
                raise RuntimeError("MONAI Deploy made no image")
            return np.asarray(image.asnumpy(), dtype=np.float32)

        return monai
    if loader == "pydicom-loop":
        import pydicom.pixels  # decoders registered before timing

        def loop(folder: str, files: list[str]) -> np.ndarray:
            dss = [pydicom.dcmread(f) for f in files]
            dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
            vol = np.stack([d.pixel_array for d in dss]).astype(np.float32)
            vol *= np.float32(float(dss[0].RescaleSlope))
            vol += np.float32(float(dss[0].RescaleIntercept))
            return vol

        return loop
    raise ValueError(loader)


def _children_rss_kib() -> int:
    """Summed resident set (KiB) of this process's direct children (decoding workers)."""
    total = 0
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
            total += pages * (os.sysconf("SC_PAGE_SIZE") // 1024)
    return total


def _worker(loader: str, folder: str, files_json: str) -> None:
    """Subprocess entry: one load; print peak RSS increase (KiB), workers' peak, volume size.

    Worker processes (tomoscribe decodes compressed series in a pool) are
    sampled every 10 ms: ``workers_kib`` is the largest sum of their resident
    sets seen (shared library pages included, so it over-counts a little).
    """
    import threading

    fn = _imports(loader)
    files = json.loads(Path(files_json).read_text())
    children = {"peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            children["peak"] = max(children["peak"], _children_rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    before = _reset_peak()
    sampler.start()
    t = time.perf_counter()
    vol = fn(folder, files)
    dt = time.perf_counter() - t
    after = _status_kib("VmHWM")
    stop.set()
    sampler.join()
    if after is None:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "peak_kib": after - before,
                "workers_kib": children["peak"],
                "seconds": dt,
                "shape": list(vol.shape),
            }
        )
    )


def _child_pids() -> list[int]:
    """This process's direct children (tomoscribe's decoding workers), Linux, else none."""
    pids: list[int] = []
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return pids
    for task in tasks:
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return pids


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children, reaped or alive.

    Reaped children (workers ended after a load) are in ``os.times``; live
    ones (tomoscribe's kept decoding pool) are read from ``/proc/PID/stat``.
    """
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _child_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` figure in KiB (Linux), or ``None``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> int:
    """Reset the peak RSS mark to the current RSS (Linux); returns the RSS now, KiB.

    ``ru_maxrss`` survives fork+exec (a child starts with its parent's peak), so
    the peak is read from ``VmHWM``, reset through ``/proc/self/clear_refs``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _import_cost(loader: str) -> float:
    code = (
        f"import time; t=time.perf_counter(); import sys; sys.path.insert(0, {str(HERE)!r}); "
        f"import loading; loading._imports({loader!r}); print(time.perf_counter()-t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def _cold(loader: str, folder: str, files: list[str]) -> float | None:
    """Seconds of one load in a fresh interpreter after its imports (workers' start-up included)."""
    code = (
        f"import sys, json, time; sys.path.insert(0, {str(HERE)!r}); import loading; "
        f"fn = loading._imports({loader!r}); "
        f"t = time.perf_counter(); fn({folder!r}, json.loads({json.dumps(files)!r})); "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        return float(out.stdout.split()[-1])
    except (IndexError, ValueError):
        return None


def _pool_start_cost() -> dict[str, Any] | None:
    """Seconds to start tomoscribe's decoding workers until each answers, fresh interpreter.

    Imports are done before the clock starts (they are in the import cost);
    ``None`` when the machine gets no workers (one CPU) or they cannot start.
    """
    code = (
        "import time; from tomoscribe.dicomio.load import default_processes; "
        "from tomoscribe.dicomio.decoder import DecoderPool; n = default_processes() - 1; "
        "t = time.perf_counter(); pool = DecoderPool(n) if n > 0 else None; "
        "pool and pool.ping(); dt = time.perf_counter() - t; pool and pool.close(); "
        "print(n, dt)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        n, dt = out.stdout.split()[-2:]
    except ValueError:
        return None
    return {"workers": int(n), "seconds": float(dt)} if int(n) > 0 else None


def _peak(loader: str, folder: str, files: list[str]) -> dict[str, Any]:
    files_json = CACHE / "files.json"
    files_json.write_text(json.dumps(files))
    out = subprocess.run(
        [sys.executable, __file__, "--worker", loader, folder, str(files_json)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


# --------------------------------------------------------------------------- main


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small inputs (60 x 256x256)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3/5)")
    ap.add_argument("--json", type=Path, default=RESULTS / "loading.json")
    ap.add_argument(
        "--case",
        action="append",
        choices=CASES,
        help="run only this input (repeatable; default all): e.g. --case j2k",
    )
    ap.add_argument(
        "--loader",
        action="append",
        choices=LOADERS,
        help="run only this loader (repeatable; default all; pydicom-loop always runs)",
    )
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    repeats = args.repeats or (5 if args.quick else 3)
    run_cases = tuple(c for c in CASES if not args.case or c in args.case)
    run_loaders = tuple(
        n for n in LOADERS if not args.loader or n in args.loader or n == "pydicom-loop"
    )

    print(f"inputs ({'quick' if args.quick else 'full'}), cached under {CACHE}:")
    data = generate(args.quick)
    cases = data["cases"]

    print("import/start-up cost (fresh interpreter each)...")
    imports = {name: _import_cost(name) for name in run_loaders}
    pool_start = _pool_start_cost() if "tomoscribe" in run_loaders else None
    fns = {name: _imports(name) for name in run_loaders}

    results: dict[str, dict[str, Any]] = {}
    for case in run_cases:
        folder, files = cases[case]["folder"], cases[case]["files"]
        ref = fns["pydicom-loop"](folder, files)  # warm-up of the floor, reference volume
        row: dict[str, Any] = {
            "volume_bytes": int(ref.nbytes),
            "shape": list(ref.shape),
            "files": len(os.listdir(folder)),
        }
        for name in run_loaders:  # warm-up + correctness
            try:
                vol = fns[name](folder, files)
            except Exception as err:  # report, do not stop the benchmark
                row[name] = {"error": f"{type(err).__name__}: {err}"[:200]}
                continue
            same = vol.shape == ref.shape and bool(np.array_equal(vol, ref))
            row[name] = {"times": [], "matches_floor": same}
            if not same:
                row[name]["mismatch"] = f"shape {vol.shape} vs {ref.shape}"
            del vol
        for _ in range(repeats):
            for name in run_loaders:
                if "times" not in row[name]:
                    continue
                c = _cpu_seconds()
                t = time.perf_counter()
                fns[name](folder, files)
                row[name]["times"].append(time.perf_counter() - t)
                row[name].setdefault("cpu", []).append(_cpu_seconds() - c)
        for name in run_loaders:
            if "times" in row[name]:
                row[name]["median_s"] = statistics.median(row[name]["times"])
                row[name]["median_cpu_s"] = statistics.median(row[name]["cpu"])
            row[name]["peak"] = _peak(name, folder, files)
            row[name]["cold_s"] = _cold(name, folder, files)
        results[case] = row
        print(f"  {case}: done")

    def med(case: str, name: str) -> float:
        if case not in results or name not in results[case]:
            return float("nan")
        return float(results[case][name].get("median_s", float("nan")))

    def cold(case: str, name: str) -> float:
        """One load in a fresh process after its imports: start-up of workers included."""
        got = results[case][name].get("cold_s")
        return float("nan") if got is None else float(got)

    def peak_mib(case: str, name: str) -> float:
        """Peak of the loading process plus its decoding workers, MiB."""
        got = results[case][name]["peak"]
        return float(got.get("peak_kib", float("nan")) + got.get("workers_kib", 0)) / 1024

    def workers_mib(case: str, name: str) -> float:
        return float(results[case][name]["peak"].get("workers_kib", 0)) / 1024

    lines = [
        f"{'case':6} {'loader':13} {'median s':>9} {'cpu s':>6} {'cold s':>7} {'x floor':>8} "
        f"{'x monai':>8} {'peak MiB':>9} {'(workers)':>9} {'x vol':>6}  same",
    ]
    for case in run_cases:
        vol_mib = results[case]["volume_bytes"] / 2**20
        shape = "x".join(map(str, results[case]["shape"]))
        lines.append(f"{case} ({results[case]['files']} files; volume {shape} = {vol_mib:.0f} MiB)")
        for name in run_loaders:
            r = results[case][name]
            if "error" in r:
                lines.append(f"{'':6} {name:13} error: {r['error']}")
                continue
            m = med(case, name)
            pk = peak_mib(case, name)
            lines.append(
                f"{'':6} {name:13} {m:9.3f} {r.get('median_cpu_s', float('nan')):6.2f} "
                f"{cold(case, name):7.3f} {m / med(case, 'pydicom-loop'):8.2f} "
                f"{m / med(case, 'monai-deploy'):8.2f} {pk:9.0f} {workers_mib(case, name):9.0f} "
                f"{pk / vol_mib:6.2f}  "
                f"{'yes' if r['matches_floor'] else 'NO ' + r.get('mismatch', '')}"
            )
    lines.append(
        "import + start-up s: " + ", ".join(f"{n} {imports[n]:.2f}" for n in run_loaders)
    )
    if pool_start is not None:
        lines.append(
            f"tomoscribe decoding pool start-up (fresh interpreter, imports done, "
            f"{pool_start['workers']} worker(s) until each answered): "
            f"{pool_start['seconds']:.2f} s;"
            " paid once per process, by its first compressed series large enough for workers "
            "(j2k full size: inside 'cold s' above, not in 'median s')"
        )

    targets: dict[str, bool] = {}
    if "tomoscribe" in run_loaders:
        tomo_ct, floor_ct = med("ct", "tomoscribe"), med("ct", "pydicom-loop")
        if "ct" in results:
            targets["ct: tomoscribe <= 1.2x pydicom loop"] = tomo_ct <= 1.2 * floor_ct
            if "monai-deploy" in run_loaders:
                targets["ct: tomoscribe no slower than MONAI Deploy"] = tomo_ct <= med(
                    "ct", "monai-deploy"
                )
        if "study" in results and "monai-deploy" in run_loaders:
            targets["study: tomoscribe >= 3x faster than MONAI Deploy"] = med(
                "study", "monai-deploy"
            ) >= 3 * med("study", "tomoscribe")
        if "j2k" in results:
            targets["j2k: tomoscribe >= 1.7x faster than single-threaded pydicom loop"] = med(
                "j2k", "pydicom-loop"
            ) >= 1.7 * med("j2k", "tomoscribe")
        targets["memory: tomoscribe peak <= 2x float32 volume (every case run)"] = all(
            peak_mib(c, "tomoscribe") <= 2 * results[c]["volume_bytes"] / 2**20
            for c in run_cases
        )
    lines.append(f"targets (cpu count {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}):")
    lines += [f"  {_verdict(ok)}  {what}" for what, ok in targets.items()]
    print("\n".join(lines))

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "repeats": repeats,
                "cases_run": list(run_cases),
                "loaders_run": list(run_loaders),
                "sizes": data["sizes"],
                "cpu_count": os.cpu_count(),
                "load_avg": os.getloadavg(),
                "pydicom": pydicom.__version__,
                "import_s": imports,
                "pool_start": pool_start,
                "cases": results,
                "targets": targets,
                "peak_method": "VmHWM (reset before the load) minus VmRSS before, fresh subprocess",
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
