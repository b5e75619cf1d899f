"""Tensor-parallel shards of a delta, taken on tile boundaries (DeltaTensor.block_section): each rank's
XorLinear over its slice of the base gives exactly its slice of the unsharded layer's output. This is what
the vLLM plugin does per rank; the whole engine at TP=2 is tested in tests/vllm_plugin."""
import pytest
import torch
from helpers import rel_err

import xorgemm
from xorgemm.errors import InputError
from xorgemm.format.reader import load_delta
from xorgemm.nn import XorLinear
from xorgemm.testing import perturb


@pytest.fixture(scope="module")
def delta(tmp_path_factory):
    """A 384 x 320 bf16 weight (6 x 5 tiles of 64) and a 300 x 200 one (its last tile row and column
    ragged), both with dense deltas."""
    torch.manual_seed(0)
    base = {"w": torch.randn(384, 320).to(torch.bfloat16), "ragged": torch.randn(300, 200).to(torch.bfloat16)}
    ft = {k: perturb(v, "dense", seed=i, magnitude=1e-2) for i, (k, v) in enumerate(base.items())}
    path = tmp_path_factory.mktemp("shard") / "ft.xor.safetensors"
    xorgemm.pack(base, ft, path)
    return base, ft, load_delta(path)


def shard_layer(base_w, t, rows, cols):
    layer = XorLinear(base_w[slice(*rows), slice(*cols)].contiguous())  # a rank holds its shard alone
    section, _ = t.block_section(rows, cols)
    layer.add_finetune_section("ft", section)
    return layer


@pytest.mark.parametrize("tp", [2, 3, 4, 6])
def test_column_parallel_ranks_give_their_rows_of_the_output(delta, tp):
    base, ft, d = delta
    x = torch.randn(5, 320).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.double(), ft["w"].double())
    part = 384 // tp
    if part % 64:  # tp = 4: 96 rows a rank
        with pytest.raises(InputError, match=r"cannot take rows \[96, 192\).*row 96 is not on a 64-wide tile"):
            shard_layer(base["w"], d.tensors["w"], (part, 2 * part), (0, 320))
        return
    for rank in range(tp):
        rows = (rank * part, (rank + 1) * part)
        layer = shard_layer(base["w"], d.tensors["w"], rows, (0, 320))
        assert torch.equal(layer.materialize("ft"), ft["w"][slice(*rows)])
        assert rel_err(layer(x, "ft"), want[:, slice(*rows)]) < 1e-2  # bf16 output rounding


def test_row_parallel_ranks_sum_to_the_output(delta):
    """Each rank takes a column block of the weight and its columns of x; the all-reduce is the sum."""
    base, ft, d = delta
    x = torch.randn(5, 320).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.double(), ft["w"].double())
    total = torch.zeros(5, 384, dtype=torch.float64)
    for cols in ((0, 128), (128, 320)):
        layer = shard_layer(base["w"], d.tensors["w"], (0, 384), cols)
        total += layer(x[:, slice(*cols)].contiguous(), "ft").double()
        assert torch.equal(layer.materialize("ft"), ft["w"][:, slice(*cols)])
    assert rel_err(total, want) < 1e-2


def test_a_shard_ending_at_a_ragged_edge_is_bit_exact(delta):
    base, ft, d = delta
    layer = shard_layer(base["ragged"], d.tensors["ragged"], (256, 300), (128, 200))
    assert torch.equal(layer.materialize("ft"), ft["ragged"][256:, 128:])
