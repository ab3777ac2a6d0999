"""A streaming GGUF writer for surgery on an existing file: copy its metadata (raw bytes, untouched) except
the keys given new values, and its tensors, some of them gathered along their outermost dimension.

Tensor data is copied slice by slice with ``copy_file_range`` (in the kernel, no user-space buffer; plain
reads and writes where that is refused), so memory stays constant whatever the file size, and any
quantisation type works: the outermost dimension (the last in GGUF's order) of a tensor
is made of whole rows of blocks, so one index along it is a contiguous run of ``n_bytes / dim`` bytes.
Only little-endian GGUF v2/v3 files are handled. The output is written to a temporary file beside the
target and renamed into place (see `moescope._atomic`); the source is opened read-only.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from moescope.errors import FormatError

_COPY_CHUNK = 16 << 20  # bytes per write when copying a whole tensor

# GGUFValueType codes -> struct format of a scalar
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorOut:
    """One output tensor: `name`, GGUF-order `shape`, ggml `type` code, and where its bytes come from:
    ``source_offset`` / ``source_bytes`` in the source file, optionally gathered: `take` lists indices along
    the outermost dimension (`outer` of them in the source), copied in that order."""

    name: str
    shape: tuple[int, ...]
    type: int
    source_offset: int
    source_bytes: int
    take: tuple[int, ...] | None = None
    outer: int = 1

    @property
    def n_bytes(self) -> int:
        if self.take is None:
            return self.source_bytes
        return self.source_bytes // self.outer * len(self.take)


def encode_kv(key: str, vtype: int, value: Any, sub_type: int | None = None) -> bytes:
    """One metadata pair in GGUF's encoding (scalars, strings, arrays of scalars or strings)."""
    out = _string(key) + struct.pack("<I", vtype)
    return out + _value(vtype, value, sub_type)


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value: Any, sub_type: int | None) -> bytes:
    if vtype == _STRING:
        return _string(value)
    if vtype == _ARRAY:
        if sub_type is None:
            raise ValueError("an array needs its element type")
        items = list(value)
        return struct.pack("<IQ", sub_type, len(items)) + b"".join(_value(sub_type, v, None) for v in items)
    return struct.pack("<" + _SCALAR[vtype], value)


def raw_field(field: Any) -> bytes:
    """The exact bytes of a `gguf.ReaderField` as stored in the source."""
    return b"".join(np.ascontiguousarray(p).tobytes() for p in field.parts)


def _align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def write_gguf(
    reader: Any,
    out: Path,
    tensors: Sequence[TensorOut],
    replace_kv: Mapping[str, bytes],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write a GGUF to `out` (an already-temporary path): the source's metadata with `replace_kv` (key ->
    encoded pair, see `encode_kv`) substituted in place, then `tensors`. Returns the bytes written."""
    if reader.byte_order == "S":  # the reader had to swap bytes: a big-endian file
        raise FormatError("big-endian GGUF files are not supported; convert the model as little-endian")
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    alignment = int(reader.alignment)
    kvs = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        kvs.append(replace_kv.get(name, raw_field(field)))
    kvs.extend(v for k, v in replace_kv.items() if k not in reader.fields)
    header = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    infos, offset = [], 0
    for t in tensors:
        offset = _align(offset, alignment)
        infos.append(
            _string(t.name)
            + struct.pack("<I", len(t.shape))
            + struct.pack(f"<{len(t.shape)}Q", *t.shape)
            + struct.pack("<IQ", t.type, offset)
        )
        offset += t.n_bytes
    head = header + b"".join(infos)
    total = sum(t.n_bytes for t in tensors)
    done = 0
    with open(reader.data.filename, "rb") as src, out.open("wb") as fh:
        fh.write(head)
        fh.write(b"\0" * (-len(head) % alignment))
        pos = 0
        for t in tensors:
            pad = -pos % alignment
            fh.write(b"\0" * pad)
            pos += pad
            _copy(src, fh, t)
            pos += t.n_bytes
            done += t.n_bytes
            if progress:
                progress(done, total)
        return fh.tell()


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, n: int) -> None:
    """Append bytes ``offset .. offset + n`` of `src` to `dst`: in the kernel where it can, else in chunks."""
    dst.flush()
    if hasattr(os, "copy_file_range"):
        left, at = n, offset
        while left:
            try:
                got = os.copy_file_range(src.fileno(), dst.fileno(), min(left, _COPY_CHUNK), at)
            except OSError:
                break  # e.g. across file systems that refuse it: copy in user space
            if got == 0:
                raise FormatError(f"the source ends at byte {at}, before its tensor data does; the file is truncated")
            left -= got
            at += got
        offset, n = at, left
    src.seek(offset)
    while n:
        buf = src.read(min(n, _COPY_CHUNK))
        if not buf:
            raise FormatError(f"the source ends at byte {offset}, before its tensor data does; the file is truncated")
        dst.write(buf)
        n -= len(buf)
        offset += len(buf)


def _copy(src: BinaryIO, fh: BinaryIO, t: TensorOut) -> None:
    if t.take is None:
        _copy_range(src, fh, t.source_offset, t.source_bytes)
        return
    per = t.source_bytes // t.outer
    for i in t.take:
        _copy_range(src, fh, t.source_offset + i * per, per)
