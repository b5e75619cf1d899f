"""An independent NumPy reading of the tile format spec (docs/format.md), used to check the native code.

It shares no code with xorgemm: it parses the tile table and byte planes straight from the spec.
"""
import math

import numpy as np

TILE_ALIGN = 16
ZERO, SPARSE, BYTEPLANE, RAW = range(4)


def payload_size(codec, low_bytes, n_exc, elems, w):
    if codec == ZERO:
        return 0
    n = elems * low_bytes + n_exc * (2 + w - low_bytes)
    return -(-n // TILE_ALIGN) * TILE_ALIGN


ENTRY = np.dtype([("n_exc", "<u4"), ("codec", "u1"), ("low", "u1"), ("r", "<u2")])


def tile_table(section: bytes, n_tiles: int) -> np.ndarray:
    """The section's tile table: one ENTRY per tile."""
    return np.frombuffer(section[: n_tiles * ENTRY.itemsize], dtype=ENTRY)


def decode_section(section: bytes, rows: int, cols: int, tile_rows: int, tile_cols: int, w: int) -> np.ndarray:
    """The XOR words of a whole tensor (rows x cols, uint64) from its section."""
    gr, gc = math.ceil(rows / tile_rows), math.ceil(cols / tile_cols)
    n = gr * gc
    table = tile_table(section, n)
    at = -(-n * 8 // TILE_ALIGN) * TILE_ALIGN
    out = np.zeros((rows, cols), dtype=np.uint64)
    buf = np.frombuffer(section, dtype=np.uint8)
    for t, e in enumerate(table):
        r0, c0 = (t // gc) * tile_rows, (t % gc) * tile_cols
        h, wd = min(tile_rows, rows - r0), min(tile_cols, cols - c0)
        elems = h * wd
        codec, k, nx = int(e["codec"]), int(e["low"]), int(e["n_exc"])
        size = payload_size(codec, k, nx, elems, w)
        p = buf[at: at + size]
        words = np.zeros(elems, dtype=np.uint64)
        if codec != ZERO:
            for j in range(k):
                words |= p[j * elems:(j + 1) * elems].astype(np.uint64) << np.uint64(8 * j)
            q = p[k * elems:]
            pos = q[:nx].astype(np.int64) | (q[nx:2 * nx].astype(np.int64) << 8)
            hi = np.zeros(nx, dtype=np.uint64)
            for j in range(w - k):
                hi |= q[2 * nx + j * nx: 2 * nx + (j + 1) * nx].astype(np.uint64) << np.uint64(8 * (k + j))
            words[pos] |= hi
        out[r0:r0 + h, c0:c0 + wd] = words.reshape(h, wd)
        at += size
    assert at == len(section), "section length must equal the sum of its tile payloads"
    return out


def xor_words(base: np.ndarray, ft: np.ndarray, w: int, rows: int, cols: int) -> np.ndarray:
    """XOR of two byte buffers as (rows, cols) little-endian words, uint64."""
    a = np.frombuffer(base, dtype=np.uint8).reshape(-1, w).astype(np.uint64)
    b = np.frombuffer(ft, dtype=np.uint8).reshape(-1, w).astype(np.uint64)
    shifts = (np.arange(w, dtype=np.uint64) * np.uint64(8))
    x = ((a ^ b) << shifts).sum(axis=1, dtype=np.uint64)
    return x.reshape(rows, cols)
