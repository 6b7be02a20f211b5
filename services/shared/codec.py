"""The wire format of everything that crosses Redis except weights: a msgpack header describing a tree of
dicts, lists and scalars whose numpy arrays travel as raw bytes after it, each lz4-compressed when that
pays. No pickle.

Layout: b"MSO3" | u32 header length | msgpack header | one segment per array.
The header holds the tree (arrays replaced by {"__nd__": i}), each array's dtype, shape, segment length and
whether the segment is an lz4 frame, and an XXH3-64 of all arrays' uncompressed bytes, so a truncated or
corrupted entry is rejected with a reason, never half-read. XXH3 runs at tens of GB/s; CRC32, at 6, was
most of a decode.

Compression is decided per array from a 64 KiB sample: image frames of a real game compress well and are
worth it; noise, float states and tiny arrays are not, and compressing them would cost more time than the
Redis round trip it saves (benchmarks/data_plane.py).
"""

from __future__ import annotations

import math
import struct

import lz4.frame
import msgpack
import numpy as np
import xxhash

MAGIC = b"MSO3"
_LEN = struct.Struct("<I")
# Plain numeric dtypes only: object arrays would need pickle, and must never be accepted from the wire.
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                              "uint64", "float16", "float32", "float64"))
SAMPLE = 64 * 1024       # bytes of an array compressed to decide whether the rest is worth compressing
WORTH = 0.75             # compress when the sample shrinks below this fraction
MIN_COMPRESSED = 4096    # smaller arrays travel raw: a frame's overhead is not worth it
MAX_DIMS = 32            # numpy's own limit on dimensions
MAX_DEPTH = 32           # nesting of the tree: observations, actions and states are shallow
MAX_DECODED_BYTES = 4 << 30  # one message's arrays (a 256-step 2x VPT fragment is 21 MB)


class CodecError(ValueError):
    """A payload that is not a valid mso message; the message says what was wrong with it."""


def _worth_compressing(view: memoryview) -> bool:
    if view.nbytes < MIN_COMPRESSED:
        return False
    sample = view[:SAMPLE]
    return len(lz4.frame.compress(sample, store_size=False)) < WORTH * sample.nbytes


def _strip(node, arrays: list):
    """The tree with each array moved to arrays and replaced by {"__nd__": its index} (a module function:
    see _fill)."""
    if isinstance(node, np.ndarray):
        arrays.append(np.ascontiguousarray(node))
        return {"__nd__": len(arrays) - 1}
    if isinstance(node, dict):
        return {str(k): _strip(v, arrays) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_strip(v, arrays) for v in node]
    if isinstance(node, np.generic):
        return node.item()
    return node


def encode(tree) -> bytes:
    arrays: list[np.ndarray] = []
    skeleton = _strip(tree, arrays)
    specs, segments, digest = [], [], xxhash.xxh3_64()
    for a in arrays:
        if a.dtype.str not in ALLOWED_DTYPES:
            raise CodecError(f"cannot encode array of dtype {a.dtype}: only plain numeric dtypes travel")
        view = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")
        digest.update(view)
        segment = lz4.frame.compress(view) if _worth_compressing(view) else view
        specs.append([a.dtype.str, list(a.shape), len(segment), segment is not view])
        segments.append(segment)
    header = msgpack.packb({"tree": skeleton, "arrays": specs, "xxh3": digest.intdigest()})
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *segments])


def decode(payload: bytes):
    """The tree encode() made, or CodecError naming what is wrong. Nothing in the payload is trusted: every
    size is checked before memory is allocated for it, a compressed block may not decompress to more than
    its array's size, and the tree may not nest deeper than MAX_DEPTH."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload is {type(payload).__name__}, not bytes")
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise CodecError(f"bad magic {bytes(payload[:4])!r}: not an mso message (expected {MAGIC!r})")
    (hlen,) = _LEN.unpack_from(payload, 4)
    if 8 + hlen > len(payload):
        raise CodecError(f"truncated: header claims {hlen} bytes, payload has {len(payload) - 8}")
    try:
        header = msgpack.unpackb(payload[8:8 + hlen], strict_map_key=False)
        tree, specs, expected = header["tree"], header["arrays"], header["xxh3"]
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise CodecError(f"unreadable header: {type(exc).__name__}: {exc}") from None
    if not isinstance(specs, list) or not _is_int(expected):
        raise CodecError("header: arrays must be a list and xxh3 an integer")
    body = memoryview(payload)[8 + hlen:]
    arrays, offset, digest, total = [], 0, xxhash.xxh3_64(), 0
    for spec in specs:
        dt, shape, stored, compressed = _check_spec(spec)
        nbytes = math.prod(shape) * dt.itemsize  # Python integers: no int64 wrap
        total += nbytes
        if total > MAX_DECODED_BYTES:
            raise CodecError(f"arrays of {total} bytes exceed the limit of {MAX_DECODED_BYTES}")
        if offset + stored > len(body):
            raise CodecError(f"array of shape {shape} overruns the payload (truncated?)")
        segment = body[offset:offset + stored]
        offset += stored
        if compressed:
            segment = _decompress(segment, nbytes, shape)
        if len(segment) != nbytes:
            raise CodecError(f"array of shape {shape} has {len(segment)} bytes, expected {nbytes}")
        digest.update(segment)
        arrays.append(np.frombuffer(segment, dtype=dt).reshape(shape))
    if offset != len(body):
        raise CodecError(f"{len(body) - offset} bytes of the payload belong to no array")
    if digest.intdigest() != expected:
        raise CodecError("array block fails its checksum")

    return _fill(tree, arrays, 0)


def _fill(node, arrays: list, depth: int):
    """The tree with each {"__nd__": i} replaced by arrays[i]. A module function, not a closure: a recursive
    closure is a reference cycle that would keep every payload alive until the garbage collector runs."""
    if depth > MAX_DEPTH:
        raise CodecError(f"tree nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        if set(node) == {"__nd__"}:
            index = node["__nd__"]
            if not _is_int(index) or not 0 <= index < len(arrays):
                raise CodecError(f"array reference {index!r} out of range")
            return arrays[index]
        return {k: _fill(v, arrays, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, arrays, depth + 1) for v in node]
    return node


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_spec(spec) -> tuple[np.dtype, list[int], int, bool]:
    """(dtype, shape, stored bytes, compressed) of one array's header entry, or CodecError."""
    if not isinstance(spec, list) or len(spec) != 4:
        raise CodecError(f"bad array spec {spec!r:.100}: expected [dtype, shape, bytes, compressed]")
    dtype, shape, stored, compressed = spec
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise CodecError(f"array dtype {dtype!r:.40} is not allowed")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise CodecError(f"bad array shape {shape!r:.100}: at most {MAX_DIMS} non-negative integers")
    if not _is_int(stored) or stored < 0 or not isinstance(compressed, bool):
        raise CodecError(f"bad array spec {spec!r:.100}: stored size must be a non-negative integer")
    return np.dtype(dtype), shape, stored, compressed


def _decompress(segment: memoryview, nbytes: int, shape) -> bytes:
    """An lz4 frame that must decompress to exactly nbytes; never allocates more than that."""
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        out = decompressor.decompress(segment, max_length=nbytes)
    except RuntimeError as exc:
        raise CodecError(f"corrupt array block: {exc}") from None
    if not decompressor.eof or len(out) != nbytes or decompressor.unused_data:
        raise CodecError(f"array block of shape {shape} does not decompress to exactly {nbytes} bytes")
    return out
