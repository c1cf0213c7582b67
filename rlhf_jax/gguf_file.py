"""GGUF files read safely: a bounds-checked walk of the whole layout before the ``gguf`` package
reads it, so a truncated or malformed file ends in an error naming the file and what was expected
(never a numpy reshape error from deep inside the reader).

The base of both GGUF readers: ``rlhf_jax.models.gguf`` (weights) and
``rlhf_jax.data.tokenizers.from_gguf`` (the tokenizer), which never import each other.
"""
from __future__ import annotations

import math
import mmap
import os
import pathlib
import struct

_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_UINT32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9
_GGML_MAX_DIMS = 4


def check_gguf_layout(path: str | os.PathLike) -> None:
    """Walks the layout of a GGUF file (v2/v3) and raises where it is malformed.

    Checks, in file order: the magic ``b"GGUF"``, the version, the tensor and metadata counts,
    every metadata key and value (strings must be UTF-8), the tensor table (name, at most 4
    dimensions, a tensor type the ``gguf`` package knows, rows a whole number of quantisation
    blocks), and that every tensor's data lies inside the file. Nothing is dequantised.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``"{path}: ..."`` saying what was expected and where, e.g. ``"truncated:
            expected 16384 bytes of tensor data for 'blk.0.attn_q.weight' at byte 9344, the file
            ends 8000 bytes short (file size 10000)"``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file; expected a GGUF file starting with b'GGUF'")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _GgufLayout(buf, size, path).check()


class _GgufLayout:
    """Bounds-checked walk over the bytes of a GGUF file (see :func:`check_gguf_layout`)."""

    def __init__(self, buf, size: int, path: pathlib.Path):
        self.buf, self.size, self.path = buf, size, path
        self.pos, self.order, self.section = 0, "<", "header"

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.path}: {message}")

    def take(self, n: int, what: str) -> int:
        """Claims ``n`` bytes at the cursor (for ``what``); returns their offset."""
        if self.pos + n > self.size:
            raise self.error(f"truncated in the {self.section}: expected {n} bytes for {what} "
                             f"at byte {self.pos}, the file has {self.size} bytes")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, start)

    def string(self, what: str) -> str:
        (n,) = self.unpack("Q", f"the length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{what} is not valid UTF-8 (byte {start + e.start})") from e

    def value(self, vtype: int, what: str):
        """Steps over one metadata value of type ``vtype``.

        Returns the offset of a scalar, the text of a string, None for an array.
        """
        if vtype in _GGUF_SCALAR_SIZES:
            return self.take(_GGUF_SCALAR_SIZES[vtype], what)  # its offset
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype == _GGUF_ARRAY:
            (itype,) = self.unpack("I", f"the item type of {what}")
            (count,) = self.unpack("Q", f"the length of {what}")
            if itype in _GGUF_SCALAR_SIZES:
                self.take(count * _GGUF_SCALAR_SIZES[itype], f"the {count} items of {what}")
            else:
                for j in range(count):
                    self.value(itype, f"{what}[{j}]")
            return None
        raise self.error(f"{what} has value type {vtype}; expected a GGUF value type 0-12")

    def check(self) -> None:
        import gguf

        magic = bytes(self.buf[:4])
        if magic != b"GGUF":
            raise self.error(f"not a GGUF file: expected magic b'GGUF' at byte 0, got {magic!r}")
        self.take(4, "the magic")
        (version,) = self.unpack("I", "the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            raise self.error(f"GGUF version {version}; expected 2 or 3")
        n_tensors, n_kv = self.unpack("QQ", "the tensor and metadata counts")

        self.section = "metadata"
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = self.string(f"the name of metadata key #{i} (of {n_kv})")
            (vtype,) = self.unpack("I", f"the value type of {key!r}")
            value = self.value(vtype, f"metadata {key!r}")
            if key == "general.alignment":
                if vtype != _GGUF_UINT32:
                    raise self.error(f"general.alignment has value type {vtype}; expected "
                                     f"uint32 ({_GGUF_UINT32})")
                (alignment,) = struct.unpack_from(self.order + "I", self.buf, value)
                if alignment == 0 or alignment & (alignment - 1):
                    raise self.error(f"general.alignment={alignment}; expected a power of two")

        self.section = "tensor table"
        infos = []
        for i in range(n_tensors):
            name = self.string(f"the name of tensor #{i} (of {n_tensors})")
            (n_dims,) = self.unpack("I", f"the number of dimensions of {name!r}")
            if not 1 <= n_dims <= _GGML_MAX_DIMS:
                raise self.error(f"tensor {name!r} has {n_dims} dimensions; expected 1 to "
                                 f"{_GGML_MAX_DIMS}")
            dims = self.unpack(f"{n_dims}Q", f"the dimensions of {name!r}")
            (ttype,) = self.unpack("I", f"the type of {name!r}")
            (offset,) = self.unpack("Q", f"the data offset of {name!r}")
            infos.append((name, dims, ttype, offset))

        data_start = self.pos + (-self.pos) % alignment
        known = {int(t): t for t in gguf.GGML_QUANT_SIZES}
        for name, dims, ttype, offset in infos:
            if ttype not in known:
                raise self.error(f"tensor {name!r} has tensor type {ttype}, which is not a GGML "
                                 f"type the gguf package knows; expected one of "
                                 f"{', '.join(t.name for t in known.values())}")
            qtype = known[ttype]
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise self.error(f"tensor {name!r} ({qtype.name}) has rows of {dims[0]} values; "
                                 f"expected a multiple of the block size {block}")
            n_bytes = math.prod(dims) // block * type_size
            start = data_start + offset
            if start + n_bytes > self.size:
                raise self.error(f"truncated: expected {n_bytes} bytes of tensor data for "
                                 f"{name!r} at byte {start}, the file ends "
                                 f"{start + n_bytes - self.size} bytes short (file size "
                                 f"{self.size})")


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` for ``path``, after :func:`check_gguf_layout` found it well formed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed file (``"{path}: ..."``, what was expected), including anything
            the ``gguf`` package itself rejects (e.g. a duplicate key or tensor name).
    """
    import gguf

    check_gguf_layout(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: the gguf package cannot read this file: "
                         f"{type(e).__name__}: {e}") from e
