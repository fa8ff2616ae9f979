"""The bytes that travel between the grader and the sandboxed student process.

A *frame* is a 4-byte big-endian length followed by that many bytes. A frame's
payload is a *message*: a 4-byte header length, a UTF-8 JSON header, then the raw
blobs the header lists in ``"blobs"`` (their byte lengths, in order). Arrays travel
as ``.npy`` blobs and are read back with ``allow_pickle=False``: nothing the
student process sends can execute code when the grader reads it.

This module is imported inside the sandbox, so it depends on the standard
library and NumPy only.
"""

from __future__ import annotations

import io
import json
import os
import struct

import numpy as np

MAX_FRAME = 64 * 2**20
"""Largest frame either side accepts (64 MiB); bigger output is refused as too large."""

MAX_ARRAY_ELEMENTS = 20_000_000
"""Largest array (in elements) the grader accepts from a student process."""

ALLOWED_KINDS = "biuf"
"""NumPy dtype kinds accepted from a student process: bool, signed, unsigned, float."""


class WireError(ValueError):
    """A frame or message that breaks the protocol (too large, truncated, malformed)."""


def pack(header: dict, blobs: list[bytes] = ()) -> bytes:
    """Encode ``header`` (JSON-able dict) and ``blobs`` as one message payload."""
    header = dict(header, blobs=[len(b) for b in blobs])
    head = json.dumps(header, allow_nan=True).encode()
    return b"".join([struct.pack(">I", len(head)), head, *blobs])


def unpack(payload: bytes) -> tuple[dict, list[bytes]]:
    """Decode a message payload into ``(header, blobs)``; raise :class:`WireError` if malformed."""
    if len(payload) < 4:
        raise WireError("message shorter than its header length")
    (n,) = struct.unpack(">I", payload[:4])
    if n > len(payload) - 4:
        raise WireError("message header runs past the end of the message")
    try:
        header = json.loads(payload[4 : 4 + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"message header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise WireError("message header is not a JSON object")
    sizes = header.get("blobs", [])
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise WireError("message header lists invalid blob sizes")
    blobs, pos = [], 4 + n
    for size in sizes:
        if pos + size > len(payload):
            raise WireError("message blobs run past the end of the message")
        blobs.append(payload[pos : pos + size])
        pos += size
    return header, blobs


def write_frame(fd: int, payload: bytes) -> None:
    """Write one frame (length + payload) to file descriptor ``fd``."""
    data = struct.pack(">I", len(payload)) + payload
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_exact(fd: int, n: int) -> bytes | None:
    """Read exactly ``n`` bytes from ``fd``; ``None`` on end of file."""
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, limit: int = MAX_FRAME) -> bytes | None:
    """Read one frame's payload from ``fd``; ``None`` on a clean end of file."""
    head = read_exact(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > limit:
        raise WireError(f"frame of {n} bytes is larger than the {limit}-byte limit")
    payload = read_exact(fd, n)
    if payload is None:
        raise WireError("frame cut short")
    return payload


def array_to_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of a numeric array (no pickling)."""
    buffer = io.BytesIO()
    array = np.asarray(array)
    # np.ascontiguousarray would turn a 0-d result into shape (1,); keep scalars scalar.
    np.save(buffer, array if array.ndim == 0 else np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def bytes_to_array(data: bytes) -> np.ndarray:
    """Read ``.npy`` bytes back safely: no pickle, numeric dtypes only, bounded size.

    Raises:
        WireError: if the bytes are not a plain numeric ``.npy`` array.
    """
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any failure means "not a valid array"
        raise WireError(f"not a valid .npy array ({type(err).__name__})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in ALLOWED_KINDS:
        raise WireError(f"array of unsupported dtype {getattr(array, 'dtype', '?')}")
    if array.size > MAX_ARRAY_ELEMENTS or array.ndim > 8:
        raise WireError(f"array of shape {array.shape} is too large")
    return array


def encode_value(value, blobs: list[bytes]):
    """Turn a plain value (see :func:`vitcourse.grading.runtime.to_plain`) into JSON, arrays into blobs."""
    if isinstance(value, np.ndarray):
        blobs.append(array_to_bytes(value))
        return {"$npy": len(blobs) - 1}
    if isinstance(value, list):
        return [encode_value(v, blobs) for v in value]
    if isinstance(value, dict):
        return {k: encode_value(v, blobs) for k, v in value.items()}
    return value


def decode_value(value, blobs: list[bytes], depth: int = 0):
    """Inverse of :func:`encode_value`, validating every array; raise :class:`WireError` if malformed."""
    if depth > 20:
        raise WireError("value nested too deeply")
    if isinstance(value, dict):
        if set(value) == {"$npy"}:
            index = value["$npy"]
            if not isinstance(index, int) or not 0 <= index < len(blobs):
                raise WireError("value refers to a missing array")
            return bytes_to_array(blobs[index])
        return {str(k): decode_value(v, blobs, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v, blobs, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise WireError(f"unexpected value of type {type(value).__name__}")
