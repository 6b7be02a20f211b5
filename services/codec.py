"""The wire format of everything that crosses Redis except weights: a msgpack header describing a tree of
dicts, lists and scalars whose numpy arrays travel as one lz4-compressed block of raw bytes. No pickle.

Layout: b"MSO1" | u32 header length | msgpack header | lz4 frame of the concatenated array bytes.
The header holds the tree (arrays replaced by {"__nd__": i}), each array's dtype and shape, and a CRC32
of the uncompressed block, so a truncated or corrupted entry is rejected with a reason, never half-read.
"""

from __future__ import annotations

import struct
import zlib

import lz4.frame
import msgpack
import numpy as np

MAGIC = b"MSO1"
_LEN = struct.Struct("<I")
# Plain numeric dtypes only: object arrays would need pickle, and must never be accepted from the wire.
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                              "uint64", "float16", "float32", "float64"))


class CodecError(ValueError):
    """A payload that is not a valid mso message; the message says what was wrong with it."""


def encode(tree) -> bytes:
    arrays: list[np.ndarray] = []

    def strip(node):
        if isinstance(node, np.ndarray):
            arrays.append(np.ascontiguousarray(node))
            return {"__nd__": len(arrays) - 1}
        if isinstance(node, dict):
            return {str(k): strip(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [strip(v) for v in node]
        if isinstance(node, np.generic):
            return node.item()
        return node

    skeleton = strip(tree)
    specs = []
    for a in arrays:
        if a.dtype.str not in ALLOWED_DTYPES:
            raise CodecError(f"cannot encode array of dtype {a.dtype}: only plain numeric dtypes travel")
        specs.append([a.dtype.str, list(a.shape)])
    raw = b"".join(a.tobytes() for a in arrays)
    header = msgpack.packb({"tree": skeleton, "arrays": specs, "raw": len(raw), "crc": zlib.crc32(raw)})
    return MAGIC + _LEN.pack(len(header)) + header + lz4.frame.compress(raw)


def decode(payload: bytes):
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload is {type(payload).__name__}, not bytes")
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise CodecError(f"bad magic {bytes(payload[:4])!r}: not an mso message (expected {MAGIC!r})")
    (hlen,) = _LEN.unpack_from(payload, 4)
    if 8 + hlen > len(payload):
        raise CodecError(f"truncated: header claims {hlen} bytes, payload has {len(payload) - 8}")
    try:
        header = msgpack.unpackb(payload[8:8 + hlen], strict_map_key=False)
        tree, specs, raw_len, crc = header["tree"], header["arrays"], header["raw"], header["crc"]
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise CodecError(f"unreadable header: {exc}") from exc
    try:
        raw = lz4.frame.decompress(payload[8 + hlen:])
    except RuntimeError as exc:
        raise CodecError(f"corrupt array block: {exc}") from exc
    if len(raw) != raw_len or zlib.crc32(raw) != crc:
        raise CodecError(f"array block fails its checksum ({len(raw)} bytes, expected {raw_len})")
    arrays, offset = [], 0
    for dtype, shape in specs:
        if dtype not in ALLOWED_DTYPES:
            raise CodecError(f"array dtype {dtype!r} is not allowed")
        dt = np.dtype(dtype)
        n = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        if n < 0 or offset + n > len(raw):
            raise CodecError(f"array of shape {shape} overruns the block")
        arrays.append(np.frombuffer(raw, dtype=dt, count=n // dt.itemsize, offset=offset).reshape(shape))
        offset += n
    if offset != len(raw):
        raise CodecError(f"{len(raw) - offset} bytes of the block belong to no array")

    def fill(node):
        if isinstance(node, dict):
            if set(node) == {"__nd__"}:
                index = node["__nd__"]
                if not isinstance(index, int) or not 0 <= index < len(arrays):
                    raise CodecError(f"array reference {index!r} out of range")
                return arrays[index]
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    return fill(tree)
