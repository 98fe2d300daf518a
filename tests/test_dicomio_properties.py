"""Property tests of scan + load on generated series in random geometry.

Each example writes a small series (4-12 slices of a few pixels) with a random
orientation (a random rotation), random pixel and slice spacing, random
origin, file names and InstanceNumbers that carry no order, and slices written
in a random order along the normal. Checked: the affine maps every slice
index (and in-plane corner) to its ImagePositionPatient, every slice holds the
values of the file at that position, and each injected defect (duplicate
slice, missing slice, mixed orientation) gives its documented outcome.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from tomoscribe.dicomio import load_series, scan_folder
from tomoscribe.dicomio.synth import expected_stored, write_series
from tomoscribe.errors import GeometryError
from tomoscribe.volume import Volume

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOPE, INTERCEPT = 1.0, -1024.0


@dataclass
class Case:
    """A drawn series: geometry, and which file goes where."""

    n: int
    rows: int
    columns: int
    rotation: np.ndarray  # (3, 3): columns are row cosine, column cosine, normal
    pixel_spacing: tuple[float, float]
    spacing: float
    origin: np.ndarray  # (3,)
    order: list[int]  # file i lies at slot order[i] along the normal
    seed: int

    @property
    def orientation(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.concatenate([self.rotation[:, 0], self.rotation[:, 1]]))

    def position(self, slot: int) -> np.ndarray:
        return self.origin + slot * self.spacing * self.rotation[:, 2]


def _rotation(q: tuple[float, float, float, float]) -> np.ndarray:
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@st.composite
def cases(draw: st.DrawFn, min_slices: int = 4) -> Case:
    unit = st.floats(-1.0, 1.0, allow_nan=False)
    q = draw(st.tuples(unit, unit, unit, unit).filter(lambda v: np.linalg.norm(v) > 0.2))
    n = draw(st.integers(min_slices, 12))
    return Case(
        n=n,
        rows=draw(st.integers(4, 10)),
        columns=draw(st.integers(4, 10)),
        rotation=_rotation(q),
        pixel_spacing=(draw(st.floats(0.3, 3.0)), draw(st.floats(0.3, 3.0))),
        spacing=draw(st.floats(0.5, 6.0)),
        origin=np.array(draw(st.tuples(*[st.floats(-200.0, 200.0)] * 3))),
        order=draw(st.permutations(range(n))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@contextmanager
def written(case: Case) -> Iterator[tuple[Path, list[Path]]]:
    """The series in a temp folder; file ``i`` stores ``expected_stored(i)``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_series(
            folder,
            n=case.n,
            rows=case.rows,
            columns=case.columns,
            orientation=case.orientation,
            pixel_spacing=case.pixel_spacing,
            positions=[tuple(case.position(case.order[i])) for i in range(case.n)],
            slope=SLOPE,
            intercept=INTERCEPT,
            seed=case.seed,
        )
        rng = np.random.default_rng(case.seed)
        for path, number in zip(paths, rng.permutation(case.n) + 1, strict=True):
            ds = pydicom.dcmread(path)
            ds.InstanceNumber = int(number)  # no order in InstanceNumber either
            ds.save_as(path)
        yield folder, paths


def _load(folder: Path) -> Volume:
    index = scan_folder(folder)
    assert len(index.series) == 1
    return load_series(index.series[0])


def _check_volume(case: Case, paths: list[Path], volume: Volume) -> None:
    assert volume.voxels.shape == (case.n, case.rows, case.columns)
    file_at = {slot: i for i, slot in enumerate(case.order)}
    for k in range(case.n):
        i = file_at[k]
        ds = pydicom.dcmread(paths[i], stop_before_pixels=True)
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
        np.testing.assert_allclose((volume.affine @ [k, 0, 0, 1])[:3], ipp, atol=2e-3)
        assert volume.slices[k].sop_instance_uid == ds.SOPInstanceUID
        expected = expected_stored(i, case.rows, case.columns) * SLOPE + INTERCEPT
        np.testing.assert_array_equal(volume.voxels[k], expected.astype(np.float32))
    # in-plane: last row and column of the first slice
    r, c = case.rows - 1, case.columns - 1
    corner = (
        case.position(0)
        + c * case.pixel_spacing[1] * case.rotation[:, 0]
        + r * case.pixel_spacing[0] * case.rotation[:, 1]
    )
    np.testing.assert_allclose((volume.affine @ [0, r, c, 1])[:3], corner, atol=2e-3)
    # the slice axis is row cosine x column cosine, one spacing long
    np.testing.assert_allclose(volume.affine[:3, 0], case.spacing * case.rotation[:, 2], atol=1e-3)


@SETTINGS
@given(cases())
def test_any_orientation_and_order_loads_in_place(case: Case) -> None:
    with written(case) as (folder, paths):
        volume = _load(folder)
        _check_volume(case, paths, volume)
        assert not volume.notes


def _copy_of(path: Path, dest: Path, change_pixels: bool) -> None:
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if change_pixels:
        arr = ds.pixel_array.copy()
        arr[0, 0] += 1
        ds.PixelData = arr.tobytes()
    ds.save_as(dest)


@SETTINGS
@given(cases(), st.data())
def test_identical_duplicate_slice_is_dropped(case: Case, data: st.DataObject) -> None:
    with written(case) as (folder, paths):
        twin = data.draw(st.integers(0, case.n - 1))
        _copy_of(paths[twin], folder / "zz_duplicate", change_pixels=False)
        volume = _load(folder)
        _check_volume(case, paths, volume)
        assert any("dropped 1 duplicate slice" in note for note in volume.notes)


@SETTINGS
@given(cases(), st.data())
def test_conflicting_duplicate_slice_is_refused(case: Case, data: st.DataObject) -> None:
    with written(case) as (folder, paths):
        twin = data.draw(st.integers(0, case.n - 1))
        _copy_of(paths[twin], folder / "zz_duplicate", change_pixels=True)
        with pytest.raises(GeometryError, match="hold different images"):
            _load(folder)


@SETTINGS
@given(cases(min_slices=5), st.data())
def test_missing_slice_is_refused_as_a_gap(case: Case, data: st.DataObject) -> None:
    with written(case) as (folder, paths):
        slot = data.draw(st.integers(1, case.n - 2))  # an interior slice
        paths[case.order.index(slot)].unlink()
        with pytest.raises(GeometryError, match=r"gap of .*about 1 slice\(s\) missing"):
            _load(folder)


@SETTINGS
@given(cases(), st.data())
def test_mixed_orientation_is_refused(case: Case, data: st.DataObject) -> None:
    with written(case) as (folder, paths):
        odd = paths[data.draw(st.integers(0, case.n - 1))]
        ds = pydicom.dcmread(odd)
        # the same slice turned 90 degrees about its column direction
        row, col = case.rotation[:, 2], case.rotation[:, 1]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in np.concatenate([row, col])]
        ds.save_as(odd)
        index = scan_folder(folder)
        assert index.series[0].orientation == "Mixed"
        with pytest.raises(GeometryError, match="mixes slice orientations"):
            load_series(index.series[0])
