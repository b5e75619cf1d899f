"""The native tile codecs against the independent NumPy reading of the spec (tests/reference_codec.py)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_codec import (
    BYTEPLANE,
    CONDITIONED,
    RAW,
    SPARSE,
    ZERO,
    decode_section,
    payload_size,
    tile_table,
    words,
    xor_words,
)

from xorgemm._native import C
from xorgemm.format.layout import context_shift, grid_of, tensor_bytes, tile_for
from xorgemm.testing import DELTA_KINDS, perturb

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def encode(base, ft, tile=(64, 64), conditioned=False):
    grid = grid_of(base.shape, tile_for(base.shape, tile), base.dtype)
    shift = context_shift(base.dtype, base.shape) if conditioned else -1
    return C.encode_section(tensor_bytes(base), tensor_bytes(ft), grid, shift), grid


def table(section, grid):
    return tile_table(section.numpy().tobytes(), grid.num_tiles)


def check_section(base, ft, tile=(64, 64), conditioned=False):
    """Native and reference decoders both give back the exact XOR; returns the tile table."""
    section, grid = encode(base, ft, tile, conditioned)
    want = xor_words(tensor_bytes(base).numpy(), tensor_bytes(ft).numpy(), grid.elem_bytes, grid.rows, grid.cols)
    base_words = words(tensor_bytes(base).numpy(), grid.elem_bytes, grid.rows, grid.cols)
    got_ref = decode_section(section.numpy().tobytes(), grid.rows, grid.cols, grid.tile_rows, grid.tile_cols,
                             grid.elem_bytes, base_words)
    np.testing.assert_array_equal(got_ref, want)
    offsets = C.validate_section(section, grid)
    out = torch.empty_like(base)
    torch.ops.xorgemm.apply_section(section, offsets, base.contiguous(), out, grid.tile_rows, grid.tile_cols)
    assert torch.equal(tensor_bytes(out), tensor_bytes(ft)), "native decode must rebuild the fine-tuned bytes"
    return table(section, grid)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", DELTA_KINDS)
@pytest.mark.parametrize("shape", [(256, 192), (100, 70), (65, 129), (1, 1), (3, 200), (300,), (7,)])
def test_roundtrip_every_dtype_kind_and_ragged_shape(dtype, kind, shape):
    base = torch.randn(shape).to(dtype)
    check_section(base, perturb(base, kind, seed=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", DELTA_KINDS)
@pytest.mark.parametrize("shape", [(256, 192), (100, 70), (65, 129), (1, 1), (3, 200)])
def test_conditioned_roundtrip_every_dtype_kind_and_ragged_shape(dtype, kind, shape):
    base = torch.randn(shape).to(dtype)
    check_section(base, perturb(base, kind, seed=1), conditioned=True)


# Float words of every kind a checkpoint holds: normal ones at a weight's scale, zeros of both signs,
# subnormals, Infs and NaNs (bit patterns, so NaN payloads survive).
SPECIAL = {torch.float32: [0x00000000, 0x80000000, 0x00000001, 0x807fffff, 0x7f800000, 0xff800000, 0x7fc00001],
           torch.float16: [0x0000, 0x8000, 0x0001, 0x83ff, 0x7c00, 0xfc00, 0x7e01],
           torch.bfloat16: [0x0000, 0x8000, 0x0001, 0x807f, 0x7f80, 0xff80, 0x7fc1]}
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), rows=st.integers(1, 140), cols=st.integers(1, 140),
       seed=st.integers(0, 2**31 - 1), ulps=st.integers(1, 3000), flips=st.floats(0, 0.2),
       special=st.floats(0, 0.1))
def test_conditioned_roundtrip_hypothesis(dtype, rows, cols, seed, ulps, flips, special):
    """Training-like moves of a few ulps (carrying into the exponent across powers of two), sign flips and
    special words, on ragged shapes: the native and the reference decoder rebuild the fine-tune exactly."""
    g = torch.Generator().manual_seed(seed)
    it = INT[dtype]
    base = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    bits = base.view(it).clone()
    specials = torch.tensor(SPECIAL[dtype], dtype=torch.int64).to(it)
    pick = torch.rand(rows, cols, generator=g) < special
    bits[pick] = specials[torch.randint(len(specials), (int(pick.sum()),), generator=g)]
    base = bits.view(dtype)
    ft_bits = bits + torch.randint(-ulps, ulps + 1, (rows, cols), generator=g).to(it)
    flip = torch.rand(rows, cols, generator=g) < flips
    ft_bits[flip] ^= torch.tensor(1 << (8 * base.element_size() - 1), dtype=torch.int64).to(it)
    check_section(base, ft_bits.view(dtype), conditioned=True)


def test_conditioned_tiles_are_chosen_for_training_like_deltas():
    base = (torch.randn(256, 256) * 0.05).bfloat16()
    ft = (base.view(torch.int16) + torch.randint(-20, 21, (256, 256)).to(torch.int16)).view(torch.bfloat16)
    codecs = check_section(base, ft, conditioned=True)["codec"].tolist()
    plain, grid = encode(base, ft)
    cond, _ = encode(base, ft, conditioned=True)
    assert codecs == [CONDITIONED] * 16 and cond.numel() < 0.8 * plain.numel()


def test_each_codec_is_chosen_where_it_is_smallest():
    base = torch.randn(128, 128)
    ft = base.clone()
    ft[0, 0] += 1e-3                                                  # tile 0: one element -> sparse
    ft[0:64, 64:128] = ft[0:64, 64:128] * (1 + 1e-6)                  # tile 1: low-byte changes -> byteplane
    ft[64:128, 0:64] = -ft[64:128, 0:64] * 3.7                        # tile 2: sign/exponent too -> raw
    codecs = table(*encode(base, ft))["codec"].tolist()               # tile 3 untouched -> zero
    assert codecs == [SPARSE, BYTEPLANE, RAW, ZERO]
    check_section(base, ft)


def test_choice_is_the_minimum_over_every_low_byte_count():
    base = torch.randn(64, 64)
    ft = perturb(base, "dense", magnitude=1e-3, seed=3)
    ft.view(-1)[::97] *= -1  # some sign flips force exceptions
    sec, grid = encode(base, ft)
    e = table(sec, grid)[0]
    words = xor_words(tensor_bytes(base).numpy(), tensor_bytes(ft).numpy(), 4, 64, 64).ravel()
    sig = np.array([(int(w).bit_length() + 7) // 8 for w in words])
    sizes = [64 * 64 * k + int((sig > k).sum()) * (2 + 4 - k) for k in range(5)]
    assert e["low"] == int(np.argmin(sizes))
    assert e["n_exc"] == int((sig > e["low"]).sum())
    assert e["codec"] == BYTEPLANE


def test_payload_sizes_match_the_spec():
    base = torch.randn(64, 64)
    ft = perturb(base, "sparse", frac=0.05, seed=2)
    sec, grid = encode(base, ft)
    e = table(sec, grid)[0]
    assert sec.numel() == 16 + payload_size(int(e["codec"]), int(e["low"]), int(e["n_exc"]), 4096, 4)


def test_zero_tiles_cost_no_payload():
    base = torch.randn(256, 256)
    ft = base.clone()
    ft[200, 200] += 1.0
    sec, grid = encode(base, ft)
    t = table(sec, grid)
    assert (t["codec"] == ZERO).sum() == 15
    assert sec.numel() == 16 * 8 + payload_size(SPARSE, 0, 1, 4096, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int8, torch.uint8, torch.int32])
def test_other_element_sizes_round_trip(dtype):
    base = (torch.randn(70, 90) * 100).to(dtype)
    ft = base.clone()
    ft.view(-1)[::13] += 1 if not dtype.is_floating_point else 0.5
    check_section(base, ft)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 150), cols=st.integers(1, 150), tile_rows=st.integers(1, 80),
       tile_cols=st.integers(1, 80), dtype=st.sampled_from(DTYPES), density=st.floats(0, 1),
       seed=st.integers(0, 2 ** 16))
def test_property_any_grid_any_density_round_trips(rows, cols, tile_rows, tile_cols, dtype, density, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).to(dtype)
    bits = torch.randint(0, 2 ** 15, (rows, cols), generator=g, dtype=torch.int32)
    mask = torch.rand(rows, cols, generator=g) < density
    fb = tensor_bytes(base).clone().view(rows, cols, -1)
    fb[..., 0] ^= (bits & 0xFF).to(torch.uint8) * mask
    fb[..., -1] ^= ((bits >> 8) & 0xFF).to(torch.uint8) * (mask & (bits % 7 == 0))
    ft = fb.reshape(-1).view(dtype).reshape(rows, cols)
    check_section(base, ft, (tile_rows, tile_cols))


def test_unusable_grids_are_refused():
    with pytest.raises(C.FormatError, match="tile shape"):
        C.TileGrid(4, 4, 300, 300, 1)
    with pytest.raises(C.FormatError, match="element size"):
        C.TileGrid(4, 4, 4, 4, 3)
    with pytest.raises(C.FormatError, match="must be positive"):
        C.TileGrid(0, 4, 4, 4, 2)
    b = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="must hold the grid's 32 bytes"):
        C.encode_section(b, b, C.TileGrid(4, 4, 4, 4, 2))


def test_tile_grid_is_the_native_view_of_a_tensor():
    g = C.TileGrid.of_shape([130, 3, 25], 64, 64, 2)  # 2-D view: (shape[0], prod(shape[1:]))
    assert (g.rows, g.cols, g.grid_rows, g.grid_cols, g.num_tiles) == (130, 75, 3, 2, 6)
    assert g.table_bytes == 48 and g.tensor_bytes == 130 * 75 * 2  # 6 entries of 8 bytes, padded to 16
    assert C.TileGrid.of_shape([], 1, 4, 4).rows == 1 and C.TileGrid.of_shape([7], 1, 4096, 4).cols == 7
    assert g == grid_of((130, 3, 25), (64, 64), torch.bfloat16)


@settings(max_examples=40, deadline=None)
@given(grid_rows=st.integers(1, 5), grid_cols=st.integers(1, 5),
       ragged=st.tuples(st.integers(0, 15), st.integers(0, 15)), dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(DELTA_KINDS), data=st.data())
def test_a_block_on_tile_boundaries_is_the_section_of_that_block(grid_rows, grid_cols, ragged, dtype, kind, data):
    """A tensor-parallel shard taken from the tiles as they are equals encoding the shard's own tensors."""
    tile = (16, 16)
    rows, cols = grid_rows * 16 - ragged[0], grid_cols * 16 - ragged[1]
    base = torch.randn(rows, cols).to(dtype)
    ft = perturb(base, kind, seed=3)
    section, grid = encode(base, ft, tile)
    r0, r1 = sorted(data.draw(st.lists(st.integers(0, grid_rows), min_size=2, max_size=2, unique=True)))
    c0, c1 = sorted(data.draw(st.lists(st.integers(0, grid_cols), min_size=2, max_size=2, unique=True)))
    rows_, cols_ = (r0 * 16, min(r1 * 16, rows)), (c0 * 16, min(c1 * 16, cols))
    part, sub = C.slice_section(section, C.validate_section(section, grid), grid, *rows_, *cols_)
    block = (slice(*rows_), slice(*cols_))
    want, want_grid = encode(base[block].contiguous(), ft[block].contiguous(), tile)
    assert sub == want_grid
    assert torch.equal(part, want)


def test_a_block_off_tile_boundaries_is_refused():
    base = torch.randn(100, 70)
    section, grid = encode(base, perturb(base, "dense", seed=1))
    offsets = C.validate_section(section, grid)
    with pytest.raises(C.FormatError, match="row 32 is not on a 64-wide tile boundary"):
        C.slice_section(section, offsets, grid, 0, 32, 0, 70)
    with pytest.raises(C.FormatError, match="column 10 is not on a 64-wide"):
        C.slice_section(section, offsets, grid, 0, 100, 10, 70)
    with pytest.raises(C.FormatError, match="not inside"):
        C.slice_section(section, offsets, grid, 64, 64, 0, 70)
    part, sub = C.slice_section(section, offsets, grid, 64, 100, 64, 70)  # the ragged corner tile
    assert (sub.rows, sub.cols, sub.num_tiles) == (36, 6, 1)
    C.validate_section(part, sub)
