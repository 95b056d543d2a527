"""A minimal, fast GGUF reader: metadata as plain Python values, tensors as memory-mapped bytes.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array, which takes
seconds for a 49k-token vocabulary; this parser reads the same header in tens of milliseconds.
Dequantization is still `gguf.quants.dequantize`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_MAGIC = b"GGUF"

# GGUF metadata value types -> struct format (scalars).
_SCALARS = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass(slots=True)
class GGUFTensor:
    """One tensor: HF-order shape (rows first), ggml type, and its raw bytes [.., row_bytes]."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    data: np.ndarray  # uint8 memmap view, shape[:-1] + (bytes per row,)

    def dequantize(self) -> np.ndarray:
        """float32 array of `shape` (a copy for quantized types, a view for F32)."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        out = dequantize(self.data, GGMLQuantizationType(self.qtype))
        return out.reshape(self.shape)

    def dequantize_torch(self) -> torch.Tensor:
        """float32 tensor of `shape`, bit-identical to `dequantize()`.

        The common block formats (Q4_0, Q4_1, Q8_0) are decoded with multithreaded torch ops,
        several times faster than gguf's numpy code; others fall back to it.
        """
        fast = _TORCH_DEQUANT.get(self.qtype)
        if fast is None:
            arr = self.dequantize()
            if not arr.flags.writeable or not arr.flags.c_contiguous:  # F32 data is a read-only memmap view
                arr = np.array(arr, order="C")
            return torch.from_numpy(arr)
        raw = torch.from_numpy(np.array(self.data, copy=True)).view(-1, _BLOCK_BYTES[self.qtype])
        return fast(raw).reshape(self.shape)


class GGUFFile:
    """Parse a .gguf header: `metadata` (key -> value) and `tensors` (in file order)."""

    def __init__(self, path: str | Path) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._mm)
        if bytes(buf[:4]) != _MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (big-endian files are not supported)")
        self.version = version
        self._buf = buf
        self._off = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype)

        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            qtype, offset = self._unpack("<IQ")
            infos.append((name, dims, qtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._off + align - 1) // align * align

        self.tensors: list[GGUFTensor] = []
        for name, dims, qtype, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name!r} has unknown ggml type {qtype}") from None
            shape = tuple(int(d) for d in reversed(dims))  # ggml lists the fastest dim first
            if shape[-1] % block:
                raise ValueError(f"tensor {name!r}: row of {shape[-1]} is not a multiple of block {block}")
            row_bytes = shape[-1] // block * type_size
            n_bytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
            start = data_start + offset
            if start + n_bytes > len(self._mm):
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
            data = self._mm[start : start + n_bytes].reshape(*shape[:-1], row_bytes)
            self.tensors.append(GGUFTensor(name, shape, qtype, data))
        del self._buf  # memoryview no longer needed; tensors keep the memmap alive

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    # ---- parsing helpers ---------------------------------------------------------------

    def _unpack(self, fmt: str) -> tuple:
        vals = struct.unpack_from(fmt, self._buf, self._off)
        self._off += struct.calcsize(fmt)
        return vals

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._off)
        start = self._off + 8
        self._off = start + n
        return bytes(self._buf[start : start + n]).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack("<" + _SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type in _NUMPY:
                dt = np.dtype(_NUMPY[item_type]).newbyteorder("<")
                arr = np.frombuffer(self._buf, dtype=dt, count=count, offset=self._off)
                self._off += arr.nbytes
                return arr.tolist()
            return [self._value(item_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF metadata type {vtype}")


# ---- torch block decoders (same fp32 arithmetic as gguf.quants, so results are bit-identical) --

_Q4_0, _Q4_1, _Q8_0 = 2, 3, 8
_BLOCK_BYTES = {_Q4_0: 18, _Q4_1: 20, _Q8_0: 34}


def _scales(raw: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` little-endian fp16 scale fields at the start of each block -> fp32 [n, count]."""
    return raw[:, : 2 * count].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes -> 32 fp32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    out = torch.empty(qs.shape[0], 32)
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4
    return out


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    return _nibbles(raw[:, 2:]).sub_(8.0).mul_(_scales(raw, 1))


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    dm = _scales(raw, 2)
    return _nibbles(raw[:, 4:]).mul_(dm[:, 0:1]).add_(dm[:, 1:2])


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    return raw[:, 2:].contiguous().view(torch.int8).float().mul_(_scales(raw, 1))


_TORCH_DEQUANT = {_Q4_0: _dequant_q4_0, _Q4_1: _dequant_q4_1, _Q8_0: _dequant_q8_0}
