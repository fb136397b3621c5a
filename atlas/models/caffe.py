"""A reader of Caffe's ``.caffemodel`` files that needs neither Caffe nor protobuf: the wire format, decoded by hand.

A ``.caffemodel`` is one serialized ``NetParameter`` message (``caffe.proto``). Only the parts that hold trained
parameters are read; every other field is skipped by its wire type, so parameters of layer types this module has
never heard of do not get in the way:

- ``NetParameter``: ``layer = 100`` (``LayerParameter``, the current layout) and ``layers = 2``
  (``V1LayerParameter``, the layout of models saved before 2015, BVLC GoogLeNet among them);
- ``LayerParameter``: ``name = 1``, ``type = 2`` (a string such as ``"Convolution"``), ``blobs = 7``;
- ``V1LayerParameter``: ``name = 4``, ``type = 5`` (an enum: ``CONVOLUTION = 4``, ``INNER_PRODUCT = 14``), ``blobs = 6``;
- ``BlobProto``: ``shape = 7`` (``BlobShape``: ``dim = 1``, repeated int64), ``data = 5`` (repeated float),
  ``double_data = 8`` (repeated double) and the legacy 4-d size ``num = 1``, ``channels = 2``, ``height = 3``,
  ``width = 4`` (used when ``shape`` is absent).

Repeated numbers are read packed (one length-delimited field) or unpacked (one tagged field per value), as protobuf
parsers must accept both. A file that is not a NetParameter (truncated, random bytes, another format) raises
:class:`CaffeError` with one line saying where the reading stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CaffeError", "CaffeLayer", "read_caffemodel"]

# Wire types (protobuf encoding): what follows a field's tag.
VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5

# V1LayerParameter.LayerType (caffe.proto) -> the type string the current layout uses for the same layer.
V1_TYPES = {
    0: "None", 1: "Accuracy", 2: "BNLL", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout", 7: "EuclideanLoss",
    8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 11: "Im2col", 12: "ImageData", 13: "InfogainLoss", 14: "InnerProduct",
    15: "LRN", 16: "MultinomialLogisticLoss", 17: "Pooling", 18: "ReLU", 19: "Sigmoid", 20: "Softmax", 21: "SoftmaxWithLoss",
    22: "Split", 23: "TanH", 24: "WindowData", 25: "Eltwise", 26: "Power", 27: "SigmoidCrossEntropyLoss", 28: "HingeLoss",
    29: "MemoryData", 30: "ArgMax", 31: "Threshold", 32: "DummyData", 33: "Slice", 34: "MVN", 35: "AbsVal", 36: "Silence",
    37: "ContrastiveLoss", 38: "Exp", 39: "Deconvolution",
}


class CaffeError(ValueError):
    """The bytes are not a Caffe NetParameter this reader can decode; the message is one line."""


@dataclass
class CaffeLayer:
    """One layer of a caffemodel: its name, its type (``"Convolution"``, ``"InnerProduct"``, ...; a V1 enum value
    is given its V2 name, an unknown one as ``"V1:<number>"``) and its parameter blobs, each an array of the blob's
    own shape (float32)."""

    name: str
    type: str
    blobs: list[np.ndarray] = field(default_factory=list)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it."""
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise CaffeError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise CaffeError(f"varint longer than 10 bytes at byte {pos}")


def _field(buf: memoryview, pos: int, end: int) -> tuple[int, int, int | tuple[int, int], int]:
    """The field whose tag starts at ``pos``: ``(field_number, wire_type, value, next_position)``.

    ``value`` is the integer of a varint, the ``(offset, end)`` slice of a length-delimited or fixed-width field.
    Groups (wire types 3 and 4, deprecated and never used by caffe.proto) are refused rather than skipped.
    """
    key, after = _varint(buf, pos, end)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise CaffeError(f"field number 0 at byte {pos}")
    if wire == VARINT:
        value, after = _varint(buf, after, end)
        return number, wire, value, after
    if wire == LENGTH:
        size, after = _varint(buf, after, end)
    elif wire == FIXED32:
        size = 4
    elif wire == FIXED64:
        size = 8
    else:
        raise CaffeError(f"unsupported wire type {wire} (field {number}) at byte {pos}")
    if after + size > end:
        raise CaffeError(f"field {number} at byte {pos} runs {after + size - end} bytes past the end of its message")
    return number, wire, (after, after + size), after + size


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int], int]]:
    """Yield ``(field_number, wire_type, value, position)`` for each field of the message in ``buf[start:end]``."""
    pos = start
    while pos < end:
        number, wire, value, after = _field(buf, pos, end)
        yield number, wire, value, pos
        pos = after


def _unpacked_run(buf: memoryview, at: int, end: int, width: int) -> tuple[np.ndarray, int]:
    """The values of a run of unpacked fixed-width fields starting at ``at`` (a one-byte tag + ``width`` bytes each).

    An unpacked ``repeated float`` of a million values is a million tagged fields; decoding them one by one in
    Python would take seconds, so the run is read as a (k, 1 + width) byte table: its length is the number of
    leading rows whose first byte is the same tag. Returns the raw value bytes (k, width) and the position after.
    """
    tag = buf[at]
    rows = (end - at) // (1 + width)
    table = np.frombuffer(buf, np.uint8, count=rows * (1 + width), offset=at).reshape(rows, 1 + width)
    same = table[:, 0] == tag
    k = rows if same.all() else int(np.argmin(same))
    if k == 0:  # fewer than 1 + width bytes left in the message: the value is cut off
        raise CaffeError(f"truncated {width}-byte value at byte {at}")
    return table[:k, 1:], at + k * (1 + width)


def _blob(buf: memoryview, start: int, end: int, where: str) -> np.ndarray:
    """A BlobProto as a float32 array of its shape (``shape`` else the legacy num/channels/height/width)."""
    dims: list[int] | None = None
    legacy = {1: 0, 2: 0, 3: 0, 4: 0}
    chunks: list[np.ndarray] = []
    pos = start
    while pos < end:
        # Unpacked floats (tag 0x2d: field 5, wire type 5) and doubles (0x41: field 8, wire type 1) come in long
        # runs: read a whole run at once.
        if buf[pos] in (0x2D, 0x41):
            width = 4 if buf[pos] == 0x2D else 8
            raw, pos = _unpacked_run(buf, pos, end, width)
            with np.errstate(over="ignore"):  # a double beyond float32's range becomes inf (refused by the caller)
                chunks.append(raw.copy().view("<f4" if width == 4 else "<f8").reshape(-1).astype(np.float32))
            continue
        at = pos
        number, wire, value, pos = _field(buf, pos, end)
        if number in (5, 8) and wire == LENGTH:  # packed data / double_data
            a, b = value
            width = 4 if number == 5 else 8
            if (b - a) % width:
                raise CaffeError(f"{where}: packed {'float' if width == 4 else 'double'} data of {b - a} bytes at byte {a}")
            with np.errstate(over="ignore"):
                chunks.append(np.frombuffer(buf, "<f4" if width == 4 else "<f8", count=(b - a) // width, offset=a).astype(np.float32))
        elif number == 7 and wire == LENGTH:  # BlobShape
            dims = _shape(buf, *value, where)
        elif number in legacy and wire == VARINT:
            legacy[number] = value
        elif number in (5, 7, 8) or (number in legacy and wire != VARINT):
            raise CaffeError(f"{where}: blob field {number} has wire type {wire} at byte {at}")
    data = np.concatenate(chunks) if len(chunks) > 1 else chunks[0] if chunks else np.zeros(0, np.float32)
    if dims is None:
        dims = [legacy[1], legacy[2], legacy[3], legacy[4]]
    count = int(np.prod(dims, dtype=np.int64))
    if count != data.size:
        raise CaffeError(f"{where}: blob of shape {tuple(dims)} holds {data.size} values, not {count}")
    return data.reshape(dims)


def _shape(buf: memoryview, start: int, end: int, where: str) -> list[int]:
    """BlobShape's ``dim`` values (field 1, packed or not)."""
    dims: list[int] = []
    for number, wire, value, at in _fields(buf, start, end):
        if number != 1:
            continue
        if wire == VARINT:
            dims.append(value)
        elif wire == LENGTH:
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(buf, pos, stop)
                dims.append(dim)
        else:
            raise CaffeError(f"{where}: shape dim with wire type {wire} at byte {at}")
    if any(d >= 1 << 62 for d in dims):  # int64 negatives arrive as huge unsigned varints
        raise CaffeError(f"{where}: negative blob dimension")
    return dims


def _string(buf: memoryview, value: tuple[int, int], at: int) -> str:
    try:
        return bytes(buf[value[0] : value[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise CaffeError(f"a layer name or type that is not UTF-8 at byte {at}") from None


def _layer(buf: memoryview, start: int, end: int, v1: bool, keep: Callable[[str], bool]) -> CaffeLayer:
    """A LayerParameter (``v1=False``) or V1LayerParameter; its blobs decoded only when ``keep(name)``."""
    name_field, type_field, blobs_field = (4, 5, 6) if v1 else (1, 2, 7)
    name, kind, blob_spans = None, "", []
    for number, wire, value, at in _fields(buf, start, end):
        if number == name_field and wire == LENGTH:
            name = _string(buf, value, at)
        elif number == type_field and wire == (VARINT if v1 else LENGTH):
            kind = V1_TYPES.get(value, f"V1:{value}") if v1 else _string(buf, value, at)
        elif number == blobs_field and wire == LENGTH:
            blob_spans.append(value)
    if name is None:
        raise CaffeError(f"a layer without a name at byte {start}")
    if not keep(name):
        return CaffeLayer(name, kind)
    return CaffeLayer(name, kind, [_blob(buf, a, b, f"layer {name!r}, blob {i}") for i, (a, b) in enumerate(blob_spans)])


def read_caffemodel(path: str | Path, keep: Callable[[str], bool] | None = None) -> list[CaffeLayer]:
    """The layers of a ``.caffemodel`` in file order, with their parameter blobs.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.caffemodel`` (a binary NetParameter).
    keep : callable or None, default None
        ``keep(layer_name) -> bool``: whose blobs to decode (the others are listed without blobs, which saves
        decoding e.g. auxiliary classifiers); None decodes every layer's.

    Returns
    -------
    list of CaffeLayer
        Every layer of the ``layer`` (V2) and ``layers`` (V1) lists; a file normally uses one of them.

    Raises
    ------
    CaffeError
        The file is not a NetParameter this reader can decode (one line: what and at which byte).
    """
    keep = keep or (lambda name: True)
    data = Path(path).read_bytes()
    buf = memoryview(data)
    layers: list[CaffeLayer] = []
    try:
        for number, wire, value, _ in _fields(buf, 0, len(buf)):
            if number in (2, 100) and wire == LENGTH:
                layers.append(_layer(buf, *value, v1=number == 2, keep=keep))
    except CaffeError:
        raise
    except (ValueError, OverflowError, IndexError, MemoryError) as exc:  # sizes no real blob has (random bytes)
        raise CaffeError(f"undecodable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not layers:
        raise CaffeError("no layers (neither a 'layer' nor a 'layers' list): not a Caffe model")
    return layers

