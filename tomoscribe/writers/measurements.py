"""TID 1500 Measurement Report: each segmented finding outlined and measured.

:func:`build_measurement_sr` writes one Planar ROI group (TID 1410) per
finding that has a segment::

    CONTAINER (DCM 126000) Imaging Measurement Report            TID 1500
      language, observer (the model as a Device), procedure reported
      CONTAINS CONTAINER (DCM 126010) Imaging Measurements
        CONTAINS CONTAINER (DCM 125007) Measurement Group        TID 1410
          Tracking Identifier (text) / Tracking Unique Identifier (UID)
          Finding (lesion kind or organ), Finding Site (organ; with its
              Laterality where the organ's code lacks the side: the
              cerebral hemispheres, the lateral ventricles)
          SCOORD POLYLINE (DCM 111030) Image Region, closed, in pixel
              coordinates of the finding's first key slice, SELECTED FROM
              that source image
          IMAGE (DCM 121191) Referenced Segment (the finding's SEG segment)
          NUM (SCT 103339001) Long axis [mm], NUM (SCT 42798000) Area [mm2]

The outline is the outer pixel-edge boundary of the largest 4-connected part
of the segment on that slice (holes filled), so every vertex lies on a corner
shared by a segment pixel and a background pixel; DICOM pixel coordinates put
the top-left corner of the top-left pixel at ``(0, 0)``.

Decisions:
    * Every group has spatial coordinates. OHIF 3.12/3.13 crash on a TID 1500
      group that only references a segment (measured), so none is written.
    * highdicom's TID 1410 takes either a region or a segment, not both; the
      segment reference is appended to the group as an IMAGE item with
      ReferencedSegmentNumber, built from UIDs (``ReferencedSegment.
      from_segmentation`` fails on a single-segment SEG in highdicom 0.28.2).
    * A report without any segmented finding gets no measurement SR (``None``).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr import RelationshipTypeValues as Rel
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from scipy import ndimage

from tomoscribe import SOFTWARE_NAME
from tomoscribe.errors import ReportError
from tomoscribe.report import Finding, Report
from tomoscribe.volume import Volume
from tomoscribe.writers import identity
from tomoscribe.writers.codes import segment_coding, structure_code, structure_laterality
from tomoscribe.writers.common import source_headers, study_uid_of
from tomoscribe.writers.sr import ENGLISH_US, REFERENCED_SEGMENT, _check_seg, check_report

LONG_AXIS: Code = codes.SCT.LongAxis  # 103339001
AREA: Code = codes.SCT.Area  # 42798000
MILLIMETER = Code("mm", "UCUM", "millimeter")
SQUARE_MILLIMETER = Code("mm2", "UCUM", "square millimeter")


def finding_mask(report: Report, finding: Finding, index: int) -> np.ndarray:
    """The finding's segment on its first key slice, as drawn: ``(H, W)`` bool.

    The largest 4-connected part of ``label_map[key] == segment``, holes filled.

    Raises:
        ReportError: no voxel of the segment on that slice.
    """
    assert finding.segment is not None
    k = int(finding.key_slices[0])
    plane = np.asarray(report.label_map)[k] == finding.segment
    parts, n = ndimage.label(plane)
    if n == 0:
        raise ReportError(
            f"finding {index} ({finding.text.strip()[:40]!r}): segment {finding.segment} "
            f"has no voxel on its key slice {k}"
        )
    sizes = np.bincount(parts.ravel())[1:]
    largest = parts == int(np.argmax(sizes)) + 1
    return np.asarray(ndimage.binary_fill_holes(largest), dtype=bool)


def trace_outline(mask: np.ndarray) -> np.ndarray:
    """Outer boundary of one 4-connected, hole-free region, along pixel edges.

    Args:
        mask: ``(H, W)`` bool, one 4-connected region without holes.

    Returns:
        ``(N, 2)`` float ``(column, row)`` vertices in DICOM pixel coordinates
        (pixel ``(r, c)`` spans ``[c, c+1] x [r, r+1]``), clockwise on screen,
        collinear vertices dropped, closed: the last point equals the first.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    # directed edges with the region on the right (screen coordinates, rows down)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    rows, cols = np.nonzero(m)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        x, y = c - 1, r - 1  # corner (x, y) = (column, row) of the unpadded image
        if not m[r - 1, c]:  # top edge, left to right
            edges.setdefault((x, y), []).append((x + 1, y))
        if not m[r, c + 1]:  # right edge, downwards
            edges.setdefault((x + 1, y), []).append((x + 1, y + 1))
        if not m[r + 1, c]:  # bottom edge, right to left
            edges.setdefault((x + 1, y + 1), []).append((x, y + 1))
        if not m[r, c - 1]:  # left edge, upwards
            edges.setdefault((x, y + 1), []).append((x, y))
    start = min(edges, key=lambda p: (p[1], p[0]))  # top-left corner: a top edge starts here
    path = [start]
    prev_dir = (1, 0)
    current = start
    total = sum(len(v) for v in edges.values())
    for _ in range(total + 1):
        options = edges[current]
        if len(options) == 1:
            nxt = options.pop()
        else:  # a pinch corner: turn right (towards the region), keeping the loop tight
            # cross product of the last step and the next one; > 0: a right turn on screen
            turns = [prev_dir[0] * (p[1] - current[1]) - prev_dir[1] * (p[0] - current[0])
                     for p in options]
            nxt = options.pop(int(np.argmax(turns)))
        prev_dir = (nxt[0] - current[0], nxt[1] - current[1])
        current = nxt
        path.append(current)
        if current == start and not edges[start]:
            break
    pts = np.asarray(path, dtype=np.float64)
    # drop vertices in the middle of a straight run
    keep = [0]
    for i in range(1, len(pts) - 1):
        d0 = pts[i] - pts[i - 1]
        d1 = pts[i + 1] - pts[i]
        if d0[0] * d1[1] - d0[1] * d1[0] != 0:
            keep.append(i)
    keep.append(len(pts) - 1)
    return pts[keep]


def _longest_distance_mm(points: np.ndarray, spacing: tuple[float, float]) -> float:
    """Largest distance (mm) between two ``(column, row)`` points; spacing is (row, col)."""
    xy = points * np.array([spacing[1], spacing[0]])
    d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
    return float(d.max())


def measurement_tracking_uid(study_uid: str, model_version: str, index: int) -> str:
    """Deterministic Tracking Unique Identifier of the ``index``-th finding's group."""
    return str(generate_uid(entropy_srcs=[SOFTWARE_NAME, study_uid, model_version,
                                          "measurement", str(index)]))


def _group(
    report: Report,
    volume: Volume,
    finding: Finding,
    index: int,
    study_uid: str,
    seg: Dataset | None,
    seg_numbers: dict[int, int],
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    assert finding.segment is not None
    segment = report.segment(finding.segment)
    mask = finding_mask(report, finding, index)
    outline = trace_outline(mask)
    k = int(finding.key_slices[0])
    ref = volume.slices[k]
    _, row_mm, col_mm = volume.spacing
    area = float(mask.sum()) * row_mm * col_mm
    size = (float(finding.size_mm) if finding.size_mm is not None
            else _longest_distance_mm(outline, (row_mm, col_mm)))
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=ref.sop_class_uid,
            referenced_sop_instance_uid=ref.sop_instance_uid,
            referenced_frame_numbers=None if ref.frame_number is None else [ref.frame_number],
        ),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=measurement_tracking_uid(study_uid, report.model_version, index),
            identifier=f"{segment.name} (finding {index})"[:64],
        ),
        referenced_region=region,
        # highdicom takes no modifier for the Finding (a cerebral hemisphere's
        # segment has the side in its SEG type modifier); here the side goes
        # with the Finding Site, as its Laterality
        finding_type=segment_coding(segment).type,
        finding_sites=[hd.sr.FindingSite(anatomic_location=structure_code(finding.structure),
                                         laterality=structure_laterality(finding.structure))],
        measurements=[
            hd.sr.Measurement(name=LONG_AXIS, value=round(size, 1), unit=MILLIMETER),
            hd.sr.Measurement(name=AREA, value=round(area, 1), unit=SQUARE_MILLIMETER),
        ],
    )
    if seg is not None and finding.segment in seg_numbers:
        container = group[0]
        container.ContentSequence.append(hd.sr.ImageContentItem(
            name=REFERENCED_SEGMENT,
            referenced_sop_class_uid=seg.SOPClassUID,
            referenced_sop_instance_uid=seg.SOPInstanceUID,
            referenced_segment_numbers=seg_numbers[finding.segment],
            relationship_type=Rel.CONTAINS,
        ))
    return group


def build_measurement_sr(
    report: Report, volume: Volume, seg: Dataset | None = None
) -> hd.sr.Comprehensive3DSR | None:
    """Build the TID 1500 measurement report of ``report``'s segmented findings.

    Args:
        report: the model's report (``label_map`` ``(D, H, W)`` on the volume grid).
        volume: the volume it was made from, with its source headers.
        seg: the SEG built from the same report, if any; groups then reference
            the finding's segment and the SEG joins the evidence.

    Returns:
        A Comprehensive 3D SR (UNVERIFIED, PARTIAL) with deterministic UIDs, or
        ``None`` when no finding has a segment.

    Raises:
        ReportError: a malformed report (see :func:`tomoscribe.writers.sr.check_report`),
            a label map of the wrong shape, a segmented finding with no voxel on
            its first key slice, or a ``seg`` that does not match.
    """
    check_report(report, volume)
    measured = [(i, f) for i, f in enumerate(report.findings, start=1) if f.segment is not None]
    if not measured:
        return None
    if np.asarray(report.label_map).shape != volume.shape:
        raise ReportError(
            f"label map has shape {np.asarray(report.label_map).shape}, the volume {volume.shape}"
        )
    headers = source_headers(volume)
    study_uid = study_uid_of(volume)
    seg_numbers = _check_seg(seg, report, study_uid) if seg is not None else {}
    groups = [_group(report, volume, f, i, study_uid, seg, seg_numbers) for i, f in measured]

    observer = identity.device_observer(report)
    try:
        content = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=codes.SCT.ImagingProcedure,
            imaging_measurements=groups,
            language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
                hd.sr.CodedConcept.from_code(ENGLISH_US)
            ),
        )
        evidence: list[Dataset] = list(headers)
        if seg is not None:
            evidence.append(seg)
        series_uid, sop_uid = identity.output_uids(study_uid, report.model_version,
                                                   "measurements")
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=content,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            **identity.draft_sr_attributes(
                report,
                series_number=identity.MEASUREMENTS_SERIES_NUMBER,
                series_description=identity.MEASUREMENTS_SERIES_DESCRIPTION,
            ),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ReportError(f"cannot build the measurement report: {exc}") from exc
    return sr


__all__ = ["build_measurement_sr", "finding_mask", "trace_outline"]
