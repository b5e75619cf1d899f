"""How a tensor maps onto the tile grid, and the dtypes the format knows.

Every tensor is viewed as 2-D: (shape[0], prod(shape[1:])) (the native TileGrid). A 1-D tensor (bias,
norm) is one row and gets a one-row tile of the same element count; a 0-d tensor is 1x1. See
docs/format.md.
"""
from __future__ import annotations

import torch

from xorgemm._native import C
from xorgemm.errors import InputError

# Layout facts of the native format code (csrc/codec/tile_codec.h), never restated here.
CODEC_NAMES: tuple[str, ...] = tuple(C.CODEC_NAMES)
MAX_TILE_ELEMS = int(C.MAX_TILE_ELEMS)
TILE_ALIGN = int(C.TILE_ALIGN)
TILE_ENTRY_BYTES = int(C.TILE_ENTRY_BYTES)
TileGrid = C.TileGrid
DEFAULT_TILE = (64, 64)

# The container (docs/format.md): what the metadata says, how a tensor can be stored, and the limits every
# reader enforces whatever a file claims.
FORMAT = "xorgemm.delta"
FORMAT_VERSION = 2
# What each version's index declares as its codecs: version 1 had no conditioned tiles.
VERSION_CODECS = {1: CODEC_NAMES[:4], 2: CODEC_NAMES}
KINDS = ("xor", "same", "whole")  # a tiled XOR section; identical to the base; stored whole (new / reshaped)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_CHUNK_BYTES = 16 * 1024 * 1024  # bounds any single decompression
HASH_HEX = 16  # hex digits of an XXH3-64 digest

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


def tile_for(shape, tile=DEFAULT_TILE) -> tuple[int, int]:
    """The tile shape recorded for a tensor: `tile` for 2-D and up, one row of as many elements for 1-D."""
    tr, tc = int(tile[0]), int(tile[1])
    if tr <= 0 or tc <= 0 or tr * tc > MAX_TILE_ELEMS:
        raise InputError(f"tile shape {tr}x{tc} must be positive and hold at most {MAX_TILE_ELEMS} elements")
    return (1, tr * tc) if len(shape) <= 1 else (tr, tc)


# The conditioned codec's class of a base word: the bits from here up (the exponent; fp16: sign and exponent).
_CONTEXT_SHIFT = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def context_shift(dtype: torch.dtype, shape) -> int:
    """The class bits the conditioned codec may use for a tensor (docs/format.md), or -1: floats of 16 and
    32 bits with two or more dimensions. A 1-D tensor (bias, norm) keeps the XOR codecs: it is small, and a
    tensor-parallel rank decodes its slice of one without the rest of the base."""
    return _CONTEXT_SHIFT.get(dtype, -1) if len(shape) >= 2 else -1


def grid_of(shape, tile, dtype: torch.dtype) -> TileGrid:
    """The native tile grid over a tensor's 2-D view (shape[0], prod(shape[1:])); raises C.FormatError (a
    ValueError) for a shape or tile shape the format cannot hold."""
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    return TileGrid.of_shape([int(s) for s in shape], int(tile[0]), int(tile[1]), elem_bytes)


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor as a flat uint8 CPU tensor (a view where possible, never a cast)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)
