"""A bounded walk over a GGUF header, so that gguf-py may then parse it safely.

gguf-py's `GGUFReader` trusts the counts a header declares: an array that claims 2**62 items, a string of
2**60 bytes or a tensor count of 2**50 make it loop and allocate until memory runs out, and a corrupt field
escapes as an IndexError or KeyError. `read_header` walks the same bytes first, through a read-only memory
map, with every read bounded by the file size: each declared count times the smallest encoding of one item
is checked against the bytes left before any loop, unknown value and ggml types, more than
``GGML_MAX_DIMS`` (4) dimensions, element counts beyond int64, keys and tensor names that are not UTF-8,
duplicate keys or tensor names (gguf-py raises on both), a bad ``general.alignment`` and tensor data that
runs past the end of the file are refused with a one-line `FormatError`. Every loop consumes at least 8 bytes
per pass and the counts are capped (`MAX_ARRAY_ITEMS`, `MAX_TENSORS`, `MAX_KV`), so the walk ends quickly on
any input; gguf-py spends about a kilobyte and 15-25 us per array item, so the cap also bounds its memory.

It reads only the header (a few MB at most for a real model), never tensor data, and does not decode values
for use: `GGUFHeader.values` keeps the header's scalars and short strings (``general.type``), nothing else.
`gguf_errors` turns what gguf-py may still raise on a corrupt file into a `FormatError` naming the file.
It lives in `moescope.imports`, below `moescope.gguf` in the package layering, so that both the imatrix
reader and `moescope.gguf.inspect.open_gguf` use it.

    >>> header = read_header("model.gguf")           # FormatError on anything gguf-py would choke on
    >>> with gguf_errors("model.gguf"):
    ...     reader = gguf.GGUFReader("model.gguf")
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

from moescope.errors import FormatError, MoescopeError

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)  # gguf-py's READER_SUPPORTED_VERSIONS
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32  # gguf.constants.GGUF_DEFAULT_ALIGNMENT
ALIGNMENT_KEY = "general.alignment"
# Caps far above any real model (a 262k-token vocabulary with scores, types and merges is about a million
# array items; the largest models have a few thousand tensors and a few dozen keys).
MAX_ARRAY_ITEMS = 2**21
MAX_TENSORS = 2**17
MAX_KV = 2**16
MAX_NAME_BYTES = 2**16  # a key or tensor name (llama.cpp itself refuses tensor names of 64 bytes or more)
MAX_NESTING = 8  # arrays of arrays (gguf-py parses them recursively)
MAX_KEPT_STRING = 4096  # longer string values are walked over, not kept in GGUFHeader.values
MAX_KEPT_ARRAY = 4096  # arrays of numbers up to this length (per-layer values) are kept; longer ones walked over
INT64_MAX = 2**63 - 1
FIX = "re-download or re-convert it"

# GGUF wire value types (gguf.GGUFValueType) -> struct code of the fixed-size ones; 8 string, 9 array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY, UINT32 = 8, 9, 4
# The fewest bytes one value of each type takes: a string is at least its u64 length, an array its u32 item
# type and u64 count.
MIN_SIZE = {**{t: struct.calcsize("<" + c) for t, c in SCALARS.items()}, STRING: 8, ARRAY: 12}
MIN_KV_SIZE = 8 + 4 + 1  # key length, value type, the smallest value
MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # name length, n_dims, ggml type, offset
FIXED_HEADER_SIZE = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
# Exceptions gguf-py (numpy, struct, the OS) may raise while parsing a file that `read_header` let through.
PARSE_ERRORS = (
    IndexError,
    KeyError,
    ValueError,
    TypeError,
    struct.error,
    OverflowError,
    UnicodeDecodeError,
    EOFError,
    OSError,
)


class RawString(bytes):
    """A string value that is not UTF-8, kept as its bytes (a reader decoding it raises, as gguf-py does)."""


@dataclasses.dataclass(frozen=True)
class TensorSpan:
    """One tensor's info: name, ggml type code, dims in GGUF order (innermost first), absolute data range."""

    name: str
    ggml_type: int
    dims: tuple[int, ...]
    start: int
    n_bytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """What the walk proved about a GGUF file.

    path, file_size : the file and its bytes; version : 2 or 3; byteorder : ``"<"`` or ``">"``;
    n_kv : metadata keys; tensors : every tensor's `TensorSpan`, in file order; alignment : the data
    alignment (``general.alignment``, 32 when absent); tensor_info_offset : where the tensor infos start
    (the key/value section ends); data_offset : where tensor data starts (header end rounded up to the
    alignment); array_items : values in all header arrays (nested ones included); values : key -> value of
    the scalar and string keys (strings over `MAX_KEPT_STRING` bytes left out, non-UTF-8 ones as
    `RawString`) and of arrays of at most
    `MAX_KEPT_ARRAY` numbers (per-layer metadata), as lists; other arrays (vocabularies) are not kept.
    """

    path: str
    file_size: int
    version: int
    byteorder: str
    n_kv: int
    tensors: tuple[TensorSpan, ...]
    alignment: int
    tensor_info_offset: int
    data_offset: int
    array_items: int
    values: Mapping[str, Any]


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Walk the GGUF header of `path` with reads bounded by the file size; see the module docstring.

    Parameters
    ----------
    path : a GGUF file (model, imatrix, LoRA adapter...).

    Returns
    -------
    `GGUFHeader`: after it returns, gguf-py's `GGUFReader` parses the file in bounded time and memory.

    Raises
    ------
    FormatError : the file cannot be read, is not a GGUF, or its header is truncated or corrupt.
    """
    name = str(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < FIXED_HEADER_SIZE:
                raise FormatError(
                    f"{name}: not a readable GGUF: {size:,} bytes is shorter than the {FIXED_HEADER_SIZE}-byte GGUF "
                    f"header; the file is truncated or not a GGUF; {FIX}"
                )
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _Walker(buf, size, name).walk()
    except OSError as exc:
        reason = exc.strerror or exc
        raise FormatError(f"{name}: cannot be read ({reason}); check the path and its permissions") from exc


@contextlib.contextmanager
def gguf_errors(path: str | os.PathLike, fix: str = FIX) -> Iterator[None]:
    """Turn an exception of `PARSE_ERRORS` raised while gguf-py parses `path` into a one-line `FormatError`.

    Wrap only the calls into gguf-py (the reader's construction, ``field.contents()``), never moescope's own
    logic, so that bugs stay visible. `MoescopeError` passes through.
    """
    try:
        yield
    except MoescopeError:
        raise
    except PARSE_ERRORS as exc:
        detail = " ".join(str(exc).split())[:200]
        raise FormatError(
            f"{path}: not a readable GGUF ({type(exc).__name__}: {detail}); the file is corrupt; {fix}"
        ) from exc


class _Walker:
    """A cursor over the mapped file; every read checks the bytes left first."""

    def __init__(self, buf: mmap.mmap, size: int, name: str) -> None:
        self.buf, self.size, self.name = buf, size, name
        self.pos, self.items = 0, 0
        self.set_order("<")

    def set_order(self, order: str) -> None:
        self.order = order
        self.structs = {code: struct.Struct(order + code) for code in {*SCALARS.values(), "Q", "I"}}

    def fail(self, what: str) -> None:
        raise FormatError(f"{self.name}: not a readable GGUF: {what}; {FIX}")

    def need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            self.fail(
                f"{what} at byte {self.pos:,} needs {n:,} bytes but the {self.size:,}-byte file has {left:,} left; "
                f"the file is truncated or not a GGUF"
            )

    def count(self, n: int, each: int, what: str) -> None:
        """Check that `n` items of at least `each` bytes fit in the bytes left, before looping over them."""
        left = self.size - self.pos
        if n * each > left:
            self.fail(
                f"{what} {n:,} at byte {self.pos:,} needs at least {n * each:,} bytes but the {self.size:,}-byte "
                f"file has {left:,} left; the file is truncated or not a GGUF"
            )

    def scalar(self, code: str, what: str) -> Any:
        s = self.structs[code]
        self.need(s.size, what)
        value = s.unpack_from(self.buf, self.pos)[0]
        self.pos += s.size
        return value

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        """A u64 length and that many bytes; at most `limit` bytes when given."""
        n = self.scalar("Q", f"the length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} at byte {self.pos - 8:,} is {n:,} bytes long; expected at most {limit:,}")
        self.need(n, what)
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos]

    def name_string(self, what: str) -> str:
        """A key or tensor name: UTF-8, at most `MAX_NAME_BYTES`."""
        raw = self.raw_string(what, MAX_NAME_BYTES)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} {raw[:60]!r} at byte {self.pos - len(raw):,} is not UTF-8")
            raise  # unreachable: fail raises

    def walk(self) -> GGUFHeader:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        magic = bytes(self.buf[:4])
        if magic != GGUF_MAGIC:
            self.fail(f"starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}; the file is not a GGUF")
        self.pos = 4
        version = self.scalar("I", "the version")
        if version & 0xFFFF == 0:  # gguf-py's test: a small version read in the other byte order
            self.set_order(">")
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in VERSIONS:
            self.fail(f"GGUF version {version}; expected one of {list(VERSIONS)} (re-convert with a current llama.cpp)")
        n_tensors, n_kv = self.scalar("Q", "the tensor count"), self.scalar("Q", "the key/value count")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            self.fail(
                f"the header declares {n_tensors:,} tensors and {n_kv:,} keys; expected at most {MAX_TENSORS:,} "
                f"and {MAX_KV:,} (real models have a few thousand and a few dozen): the header is corrupt"
            )
        least, left = n_tensors * MIN_TENSOR_INFO_SIZE + n_kv * MIN_KV_SIZE, self.size - self.pos
        if least > left:
            self.fail(
                f"the header declares {n_tensors:,} tensors and {n_kv:,} keys, which need at least {least:,} bytes "
                f"but the {self.size:,}-byte file has {left:,} left; the file is truncated or not a GGUF"
            )
        values, alignment = self._kvs(n_kv)
        info_offset = self.pos
        infos = self._tensor_infos(n_tensors, GGML_QUANT_SIZES)
        data_offset = -(-self.pos // alignment) * alignment
        tensors = []
        for name, ggml_type, dims, offset, n_bytes in infos:
            start = data_offset + offset
            if start + n_bytes > self.size:
                kind = GGMLQuantizationType(ggml_type).name
                self.fail(
                    f"tensor {name!r} ({kind} {list(dims)}) spans bytes {start:,}..{start + n_bytes:,} but the "
                    f"file has {self.size:,}; the file is truncated or its tensor offsets are corrupt"
                )
            tensors.append(TensorSpan(name, ggml_type, dims, start, n_bytes))
        return GGUFHeader(
            path=self.name,
            file_size=self.size,
            version=version,
            byteorder=self.order,
            n_kv=n_kv,
            tensors=tuple(tensors),
            alignment=alignment,
            tensor_info_offset=info_offset,
            data_offset=data_offset,
            array_items=self.items,
            values=values,
        )

    def _kvs(self, n_kv: int) -> tuple[dict[str, Any], int]:
        values: dict[str, Any] = {}
        seen = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # gguf-py's own fields share the names
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = self.name_string(f"key {i}")
            if key in seen:
                self.fail(f"key {key!r} appears twice; expected each key once")
            seen.add(key)
            vtype = self.scalar("I", f"the value type of key {key!r}")
            if vtype in SCALARS:
                values[key] = self.scalar(SCALARS[vtype], f"the value of key {key!r}")
            elif vtype == STRING:
                raw = self.raw_string(f"the string value of key {key!r}")
                if len(raw) <= MAX_KEPT_STRING:
                    try:
                        values[key] = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        values[key] = RawString(raw)
            else:
                start = self.pos
                self._skip(vtype, f"key {key!r}", 0)
                kept = self._numbers(start)
                if kept is not None:
                    values[key] = kept
            if key == ALIGNMENT_KEY:
                alignment = values.get(key, 0)
                if vtype != UINT32 or alignment <= 0 or alignment & (alignment - 1):
                    self.fail(f"{ALIGNMENT_KEY} is {alignment!r} (value type {vtype}); expected a u32 power of two")
        return values, alignment

    def _numbers(self, start: int) -> list[Any] | None:
        """The array of numbers walked over from `start` as a list, when it has at most `MAX_KEPT_ARRAY`."""
        item = self.structs["I"].unpack_from(self.buf, start)[0]
        n = self.structs["Q"].unpack_from(self.buf, start + 4)[0]
        if item not in SCALARS or n > MAX_KEPT_ARRAY:
            return None
        code = SCALARS[item]
        return list(struct.unpack_from(f"{self.order}{n}{code}", self.buf, start + 12))

    def _skip(self, vtype: int, what: str, depth: int) -> None:
        """Walk over one value of type `vtype` (an array, or an item of one)."""
        if vtype in SCALARS:
            self.need(MIN_SIZE[vtype], f"a value of {what}")
            self.pos += MIN_SIZE[vtype]
        elif vtype == STRING:
            self.raw_string(f"a string of {what}")
        elif vtype == ARRAY:
            if depth >= MAX_NESTING:
                self.fail(f"{what} nests arrays {depth + 1} deep; expected at most {MAX_NESTING}")
            item = self.scalar("I", f"the item type of the array of {what}")
            n = self.scalar("Q", f"the length of the array of {what}")
            if item not in MIN_SIZE:
                self.fail(f"the array of {what} has item type {item}; expected 0..12 (gguf.GGUFValueType)")
            self.count(n, MIN_SIZE[item], f"the array of {what} declares length")
            self.items += n
            if self.items > MAX_ARRAY_ITEMS:
                self.fail(
                    f"the array of {what} brings the header's array items to {self.items:,}; expected at most "
                    f"{MAX_ARRAY_ITEMS:,} (a 262k-token vocabulary with its merges has about a million)"
                )
            if item in SCALARS:
                self.pos += n * MIN_SIZE[item]
            elif item == STRING:
                self._skip_strings(n, what)
            else:
                for _ in range(n):
                    self._skip(item, what, depth + 1)
        else:
            self.fail(f"{what} has value type {vtype}; expected 0..12 (gguf.GGUFValueType)")

    def _skip_strings(self, n: int, what: str) -> None:
        """Walk over `n` strings (a tokenizer's tokens or merges): the one hot loop, so it is kept tight."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, self.structs["Q"].unpack_from
        for _ in range(n):
            if size - pos < 8 or unpack(buf, pos)[0] > size - pos - 8:
                self.pos = pos
                self.raw_string(f"a string of the array of {what}")  # raises, naming the short read
            pos += 8 + unpack(buf, pos)[0]
        self.pos = pos

    def _tensor_infos(self, n_tensors: int, quant_sizes: Mapping[Any, tuple[int, int]]) -> list[tuple]:
        """(name, ggml type, dims, offset in the data section, bytes) of each tensor."""
        sizes = {int(k): v for k, v in quant_sizes.items()}
        infos, names = [], set()
        for i in range(n_tensors):
            name = self.name_string(f"the name of tensor {i}")
            if name in names:
                self.fail(f"tensor {name!r} appears twice; expected each tensor once")
            names.add(name)
            n_dims = self.scalar("I", f"the dimension count of tensor {name!r}")
            if n_dims > GGML_MAX_DIMS:
                self.fail(f"tensor {name!r} has {n_dims:,} dimensions; expected at most {GGML_MAX_DIMS}")
            dims = tuple(self.scalar("Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
            ggml_type = self.scalar("I", f"the ggml type of tensor {name!r}")
            offset = self.scalar("Q", f"the data offset of tensor {name!r}")
            if ggml_type not in sizes:
                self.fail(
                    f"tensor {name!r} has ggml type {ggml_type}; expected one of {sorted(sizes)} (the file is corrupt, "
                    f"or uses a type newer than the installed gguf package: upgrade it)"
                )
            n_elements = 1
            for d in dims:
                n_elements *= d
            if n_elements > INT64_MAX or max(dims, default=0) > INT64_MAX:
                self.fail(f"tensor {name!r} has dimensions {list(dims)}, whose product overflows int64")
            block, type_size = sizes[ggml_type]
            if dims and dims[0] % block:
                self.fail(
                    f"tensor {name!r} has a first dimension of {dims[0]:,}, not a multiple of its ggml type's block "
                    f"of {block}"
                )
            infos.append((name, ggml_type, dims, offset, n_elements * type_size // block))
        return infos
