"""An independent NumPy reading of the tile format spec (docs/format.md), used to check the native code.

It shares no code with xorgemm: it parses the tile table and byte planes straight from the spec.
"""
import math

import numpy as np

TILE_ALIGN = 16
ZERO, SPARSE, BYTEPLANE, RAW, CONDITIONED = range(5)
RICE_ESCAPE = 16  # a unary run of this many ones: the quotient is in the escape list


def payload_size(codec, low_bytes, n_exc, elems, w, reserved=0):
    if codec == ZERO:
        return 0
    if codec == CONDITIONED:
        return reserved * TILE_ALIGN
    n = elems * low_bytes + n_exc * (2 + w - low_bytes)
    return -(-n // TILE_ALIGN) * TILE_ALIGN


ENTRY = np.dtype([("n_exc", "<u4"), ("codec", "u1"), ("low", "u1"), ("r", "<u2")])


def tile_table(section: bytes, n_tiles: int) -> np.ndarray:
    """The section's tile table: one ENTRY per tile."""
    return np.frombuffer(section[: n_tiles * ENTRY.itemsize], dtype=ENTRY)


def conditioned_tile(p: np.ndarray, e, base: np.ndarray, w: int) -> np.ndarray:
    """A conditioned tile's XOR words (uint64) from its payload and its base words (uint64, row-major)."""
    bits = 8 * w
    nx, low = int(e["n_exc"]), int(e["low"])
    transform, shift, high = low & 1, (low >> 1) & 31, (low >> 6) + 1
    pos = p[:nx].astype(np.int64) | (p[nx:2 * nx].astype(np.int64) << 8)
    hi = np.zeros(nx, dtype=np.uint64)
    for j in range(high):
        hi |= p[(2 + j) * nx:(3 + j) * nx].astype(np.uint64) << np.uint64(8 * j)
    h = -(-nx * (2 + high) // 2) * 2
    n_classes = int(p[h]) | int(p[h + 1]) << 8
    unary_words = int(p[h + 2]) | int(p[h + 3]) << 8
    width = np.zeros(256, dtype=np.int64)
    for c in range(n_classes):
        width[p[h + 4 + 2 * c]] = p[h + 5 + 2 * c]
    unary = -(-(h + 4 + 2 * n_classes) // 4) * 4
    slots = unary + 4 * unary_words
    # The quotients: element i's unary run ends at the i-th zero bit of the stream (LSB first).
    zeros = np.flatnonzero(np.unpackbits(p[unary:slots], bitorder="little") == 0)[:len(base)]
    q = (zeros - np.concatenate([[-1], zeros[:-1]]) - 1).astype(np.uint64)
    assert len(zeros) == len(base) and q.max(initial=0) <= RICE_ESCAPE
    assert np.array_equal(np.flatnonzero(q == RICE_ESCAPE), pos), "escape codes must be the listed positions"
    q[pos] = hi
    stream = np.unpackbits(p[slots:], bitorder="little")  # bit i of the slots, LSB first
    widths = width[((base >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64)]
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    value = np.zeros(len(base), dtype=np.uint64)
    for b in range(bits):  # bit b of every element whose slot is wider than b
        has = widths > b
        value[has] |= stream[starts[has] + b].astype(np.uint64) << np.uint64(b)
    value |= q << widths.astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    if transform == 0:
        ft = (base ^ value) & mask  # a word's bits, as a decoder's Word type keeps them
    else:  # zig-zag back to a difference modulo 2^bits
        d = (value >> np.uint64(1)) ^ ((np.uint64(0) - (value & np.uint64(1))) & mask)
        ft = (base + d) & mask
    return base ^ ft


def decode_section(section: bytes, rows: int, cols: int, tile_rows: int, tile_cols: int, w: int,
                   base: np.ndarray | None = None) -> np.ndarray:
    """The XOR words of a whole tensor (rows x cols, uint64) from its section; `base` (rows x cols words,
    uint64) for conditioned tiles, which decode against it."""
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
        size = payload_size(codec, k, nx, elems, w, int(e["r"]))
        p = buf[at: at + size]
        words = np.zeros(elems, dtype=np.uint64)
        if codec == CONDITIONED:
            words = conditioned_tile(p, e, base[r0:r0 + h, c0:c0 + wd].reshape(-1), w)
        elif codec != ZERO:
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


def words(buf: np.ndarray, w: int, rows: int, cols: int) -> np.ndarray:
    """A byte buffer as (rows, cols) little-endian words, uint64."""
    a = np.frombuffer(buf, dtype=np.uint8).reshape(-1, w).astype(np.uint64)
    shifts = (np.arange(w, dtype=np.uint64) * np.uint64(8))
    return (a << shifts).sum(axis=1, dtype=np.uint64).reshape(rows, cols)
