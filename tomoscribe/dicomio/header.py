"""A fast reader for DICOM headers (everything before the pixel data).

:func:`pydicom.dcmread` with ``stop_before_pixels`` spends about 0.3-0.8 ms
per file in its general element generator; a study of 500 files then takes
most of its time in the header scan. :func:`read_header` walks the elements of
the common encodings (a Part 10 file, little endian, explicit or implicit VR)
itself, on one read of the file's first bytes, and builds the same
:class:`~pydicom.dataset.FileDataset` :func:`pydicom.dcmread` would: every
top-level element as a lazily converted raw element, sequences included. It
hands anything unusual back to pydicom (big endian, deflated, no preamble,
unknown VRs, command elements, headers over :data:`MAX_HEADER` bytes...),
so the result never differs from pydicom's.

It also records where an uncompressed Pixel Data value starts, so the loader
reads the pixels of a file with one seek and one read.

:func:`raw_text` and :func:`raw_int` read one value straight from a raw
element without pydicom's value conversion (validation, ``DSfloat`` and
``MultiValue`` objects), which costs more than reading the header itself.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

#: first read of a file; the rest of a longer header is read when needed
FIRST_READ = 16384
#: headers longer than this are left to pydicom
MAX_HEADER = 4 << 20

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_ALL_VRS = _LONG_VRS | _SHORT_VRS
_VR_TEXT = {vr: vr.decode() for vr in _ALL_VRS}
#: tags at which pydicom's ``stop_before_pixels`` stops
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
_EXPLICIT_HEAD = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_UNPACK = struct.Struct("<HHL").unpack_from


def _IMPLICIT_HEAD(data: bytes, pos: int) -> tuple[int, int, bytes, int]:  # noqa: N802
    group, elem, length = _IMPLICIT_UNPACK(data, pos)
    return group, elem, b"", length


_EXPLICIT_SYNTAXES = frozenset(
    str(s) for s in AllTransferSyntaxes
) - {str(ImplicitVRLittleEndian), str(ExplicitVRBigEndian), str(DeflatedExplicitVRLittleEndian)}


class _UnusualError(Exception):
    """This file is left to pydicom's general reader."""


@dataclass(frozen=True)
class PixelLocation:
    """Where a Pixel Data (7FE0,0010) value of defined length starts in its file.

    Attributes:
        offset: byte offset of the value in the file.
        length: value length in bytes.
    """

    offset: int
    length: int


class _Buffer:
    """The first bytes of an open file, extended on demand."""

    def __init__(self, fh: object, data: bytes) -> None:
        self.fh = fh
        self.data = data
        self.eof = False

    def ensure(self, end: int) -> bool:
        """Make ``data`` hold at least ``end`` bytes; False at end of file."""
        while len(self.data) < end:
            if self.eof:
                return False
            if end > MAX_HEADER:
                raise _UnusualError
            more = self.fh.read(max(end - len(self.data), len(self.data)))  # type: ignore[attr-defined]
            if not more:
                self.eof = True
                return False
            self.data += more
        return True


def _element_head(buf: _Buffer, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """``(tag, VR, length, value offset)`` of the element at ``pos``."""
    if not buf.ensure(pos + 8):
        raise _UnusualError
    data = buf.data
    group, elem = _TAG.unpack_from(data, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        return tag, None, _U32.unpack_from(data, pos + 4)[0], pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in _SHORT_VRS:
        return tag, _VR_TEXT[vr], _U16.unpack_from(data, pos + 6)[0], pos + 8
    if vr not in _LONG_VRS or not buf.ensure(pos + 12):
        raise _UnusualError
    return tag, _VR_TEXT[vr], _U32.unpack_from(data, pos + 8)[0], pos + 12


def _skip_items(buf: _Buffer, pos: int, implicit: bool) -> int:
    """Offset of the sequence delimiter closing the undefined-length sequence at ``pos``."""
    while True:
        tag, _, length, value = _element_head(buf, pos, True)
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _UnusualError
        if length != _UNDEFINED:
            pos = value + length
            continue
        pos = value
        while True:  # an undefined-length item: elements up to the item delimiter
            tag, vr, length, value = _element_head(buf, pos, implicit)
            if tag == _ITEM_END:
                pos = value
                break
            if length == _UNDEFINED:
                if vr not in (None, "SQ"):
                    raise _UnusualError
                pos = _skip_items(buf, value, implicit) + 8
            else:
                pos = value + length


def _elements(
    buf: _Buffer, pos: int, implicit: bool, meta: bool
) -> tuple[dict[BaseTag, RawDataElement | DataElement], int, PixelLocation | None]:
    """Top-level elements from ``pos``: a dict, where they stop, and the pixel data.

    The loop is written for speed (it runs ~70 times per file): one unpack per
    element, raw elements built as plain tuples.
    """
    out: dict[BaseTag, RawDataElement | DataElement] = {}
    pixels: PixelLocation | None = None
    head = _IMPLICIT_HEAD if implicit else _EXPLICIT_HEAD
    make = tuple.__new__
    data = buf.data
    size = len(data)
    while True:
        if pos + 12 > size:
            if not buf.ensure(pos + 12) and not buf.ensure(pos + 8):
                break
            data = buf.data
            size = len(data)
        group, elem, vr_bytes, length = head(data, pos)
        if meta and group != 2:
            break
        tag = group << 16 | elem
        vr: str | None
        if implicit:
            vr, value = None, pos + 8
        elif vr_bytes in _SHORT_VRS:
            vr, value = _VR_TEXT[vr_bytes], pos + 8
        elif vr_bytes in _LONG_VRS:
            vr, value = _VR_TEXT[vr_bytes], pos + 12
            length = _U32.unpack_from(data, pos + 8)[0]
        else:
            raise _UnusualError
        if tag in _PIXEL_TAGS:
            if tag == 0x7FE00010 and length != _UNDEFINED:
                pixels = PixelLocation(value, length)
            break
        if group in (0x0000, 0xFFFE) or (group == 2 and not meta):
            raise _UnusualError
        btag = BaseTag(tag)
        if length == _UNDEFINED:
            if vr not in (None, "SQ"):
                raise _UnusualError
            end = _skip_items(buf, value, implicit)
            data = buf.data
            size = len(data)
            out[btag] = make(
                RawDataElement,
                (btag, vr or "SQ", length, data[value:end], value, implicit, True, True, False),
            )
            pos = end + 8
            continue
        end = value + length
        if end > size:
            if not buf.ensure(end):
                raise _UnusualError
            data = buf.data
            size = len(data)
        content = data[value:end] if length else empty_value_for_VR(vr, raw=True)
        out[btag] = make(
            RawDataElement, (btag, vr, length, content, value, implicit, True, True, False)
        )
        pos = end
    return out, pos, pixels


def _fast(path: Path) -> tuple[FileDataset, PixelLocation | None]:
    with path.open("rb") as fh:
        buf = _Buffer(fh, fh.read(FIRST_READ))
        if len(buf.data) < 132 or buf.data[128:132] != b"DICM":
            raise _UnusualError
        if buf.data[136:138] not in _ALL_VRS:
            raise _UnusualError  # implicit VR file meta: pydicom copes
        meta_elems, pos, _ = _elements(buf, 132, False, True)
        syntax_raw = meta_elems.get(BaseTag(0x00020010))
        if syntax_raw is None or not syntax_raw.value:
            raise _UnusualError
        syntax = syntax_raw.value.decode("ascii", "replace").strip("\0 ")
        if syntax == str(ImplicitVRLittleEndian):
            implicit = True
        elif syntax in _EXPLICIT_SYNTAXES:
            implicit = False
        else:
            raise _UnusualError
        if buf.ensure(pos + 8):
            looks_explicit = buf.data[pos + 4 : pos + 6] in _ALL_VRS
            if looks_explicit == implicit:
                raise _UnusualError  # the syntax lies; pydicom's heuristics decide
        elems, _, pixels = _elements(buf, pos, implicit, False)
    file_meta = FileMetaDataset(meta_elems)
    file_meta.set_original_encoding(False, True, default_encoding)
    charset = elems.get(BaseTag(0x00080005))
    encoding = (
        default_encoding if charset is None else _encoding(charset.value or b"", implicit)
    )
    ds = FileDataset(str(path), elems, buf.data[:128], file_meta, implicit, True)
    ds.set_original_encoding(
        implicit, True, list(encoding) if isinstance(encoding, list) else encoding
    )
    return ds, pixels


@functools.lru_cache(maxsize=64)
def _encoding(charset: bytes, implicit: bool) -> str | list[str]:
    """The Python encodings for a raw SpecificCharacterSet value (as pydicom reads them)."""
    raw = RawDataElement(BaseTag(0x00080005), None if implicit else "CS", len(charset),
                         charset, 0, implicit, True)  # fmt: skip
    return convert_encodings(convert_raw_data_element(raw).value)


def read_header(path: Path) -> tuple[FileDataset, PixelLocation | None]:
    """The header of ``path`` as :func:`pydicom.dcmread` (``stop_before_pixels``) reads it.

    Args:
        path: a DICOM file.

    Returns:
        The dataset without pixel data, and where an uncompressed Pixel Data
        value starts (``None`` when unknown or encapsulated).

    Raises:
        Whatever :func:`pydicom.dcmread` raises for this file (the fast walk
        hands every file it does not fully understand to pydicom).
    """
    try:
        return _fast(path)
    except (_UnusualError, struct.error, UnicodeDecodeError, ValueError, IndexError, KeyError):
        return pydicom.dcmread(path, stop_before_pixels=True), None


def _raw_element(ds: Dataset, tag: int) -> RawDataElement | DataElement | None:
    try:
        elem = ds._dict.get(tag)  # type: ignore[call-overload]  # skips Tag() parsing: this runs ~20 times per file
    except AttributeError:
        elem = None
    else:
        if not (isinstance(elem, RawDataElement) and elem.value is None):
            return elem
    try:
        return ds.get_item(tag)
    except (KeyError, TypeError):
        return None


def raw_text(ds: Dataset, tag: int) -> str | None:
    """The text of element ``tag`` of ``ds`` (multiple values joined by ``\\``), or ``None``.

    Reads a raw element's bytes directly (ASCII, padding stripped); falls back
    to pydicom's converted value for converted elements.
    """
    elem = _raw_element(ds, tag)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        value = elem.value
        if value is None:
            return None
        if isinstance(value, bytes):
            return value.decode("latin-1").strip("\0 ")
    value = ds[tag].value
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip("\0 ")


def raw_int(ds: Dataset, tag: int) -> int | None:
    """The first value of a US/UL/IS element ``tag``, read without conversion, or ``None``."""
    elem = _raw_element(ds, tag)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        vr = elem.VR
        value = elem.value
        if vr == "US" and elem.is_little_endian and len(value) >= 2:
            return int(_U16.unpack_from(value)[0])
        if vr == "UL" and elem.is_little_endian and len(value) >= 4:
            return int(_U32.unpack_from(value)[0])
    try:
        converted = ds[tag].value
        if isinstance(converted, list | tuple) or type(converted).__name__ == "MultiValue":
            converted = converted[0] if len(converted) else None
        return None if converted is None or converted == "" else int(converted)
    except (TypeError, ValueError, IndexError):
        return None
