"""How a tensor maps onto the tile grid, and the dtypes the format knows.

Every tensor is viewed as 2-D: (shape[0], prod(shape[1:])). A 1-D tensor (bias, norm) is one row and
gets a one-row tile of the same element count; a 0-d tensor is 1x1. See docs/format.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xorgemm._native import C
from xorgemm.errors import InputError

CODEC_NAMES = ("zero", "sparse", "byteplane", "raw")
DEFAULT_TILE = (64, 64)
MAX_TILE_ELEMS = int(C.MAX_TILE_ELEMS)
TILE_ALIGN = int(C.TILE_ALIGN)

# safetensors dtype names <-> torch dtypes. XOR works on bytes, so any of these round-trips; the kernels
# serve F32/F16/BF16.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InputError(f"dtype {dtype} is not supported (supported: {', '.join(DTYPES)})") from None


@dataclass(frozen=True)
class Grid:
    """The 2-D view of a tensor and its tile shape: everything the native code needs to find a tile."""

    rows: int
    cols: int
    tile_rows: int
    tile_cols: int
    elem_bytes: int

    @property
    def num_tiles(self) -> int:
        return math.ceil(self.rows / self.tile_rows) * math.ceil(self.cols / self.tile_cols)

    @property
    def args(self) -> tuple[int, int, int, int, int]:
        return (self.rows, self.cols, self.tile_rows, self.tile_cols, self.elem_bytes)


def view_2d(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


def tile_for(shape, tile=DEFAULT_TILE) -> tuple[int, int]:
    """The tile shape recorded for a tensor: `tile` for 2-D and up, one row of as many elements for 1-D."""
    tr, tc = int(tile[0]), int(tile[1])
    if tr <= 0 or tc <= 0 or tr * tc > MAX_TILE_ELEMS:
        raise InputError(f"tile shape {tr}x{tc} must be positive and hold at most {MAX_TILE_ELEMS} elements")
    return (1, tr * tc) if len(shape) <= 1 else (tr, tc)


def grid_of(shape, tile, dtype: torch.dtype) -> Grid:
    rows, cols = view_2d(shape)
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    return Grid(rows, cols, int(tile[0]), int(tile[1]), elem_bytes)


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor as a flat uint8 CPU tensor (a view where possible, never a cast)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)
