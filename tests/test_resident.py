"""Making delta tiles resident: the loader's choice of decompressor and the tile-table check the GPU path
relies on (it reads back only the table of a section decompressed on the GPU). The GPU half is in
test_cuda.py."""
import pytest
import torch

import xorgemm
from xorgemm._native import C
from xorgemm.resident import decompressor_for, resident_section
from xorgemm.testing import perturb


def test_decompressor_choice(monkeypatch):
    monkeypatch.delenv("XORGEMM_DECOMPRESS", raising=False)
    assert decompressor_for(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("XORGEMM_DECOMPRESS", "cpu")
    assert decompressor_for(torch.device("cuda")) == "cpu"
    monkeypatch.setenv("XORGEMM_DECOMPRESS", "gpu")
    with pytest.raises(xorgemm.InputError, match="XORGEMM_DECOMPRESS"):
        decompressor_for(torch.device("cpu"))


def test_resident_on_cpu_is_the_validated_section(tmp_path):
    base = torch.randn(200, 130).bfloat16()
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack({"w": base}, {"w": perturb(base, "structured", seed=1)}, path)
    d = xorgemm.load_delta(path)
    sec, off = resident_section(d["w"], "cpu")
    want_sec, want_off = d["w"].section()
    assert torch.equal(sec, want_sec) and torch.equal(off, want_off)
    assert torch.equal(off, C.validate_section(sec, d["w"].grid))


def test_table_offsets_agree_with_full_validation_and_reject_bad_tables(tmp_path):
    base = torch.randn(300, 200).bfloat16()
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack({"w": base}, {"w": perturb(base, "dense", seed=2)}, path)
    t = xorgemm.load_delta(path)["w"]
    (sec, _), grid = t.section(), t.grid
    table = sec[: grid.num_tiles * C.TILE_ENTRY_BYTES].clone()
    assert torch.equal(C.table_offsets(table, sec.numel(), grid), C.validate_section(sec, grid))
    with pytest.raises(C.FormatError, match="account for"):
        C.table_offsets(table, sec.numel() + 16, grid)
    with pytest.raises(C.FormatError, match="past the end"):
        C.table_offsets(table, sec.numel() - 16, grid)
    bad = table.clone()
    bad[4] = 9  # codec byte of tile 0
    with pytest.raises(C.FormatError, match="invalid entry"):
        C.table_offsets(bad, sec.numel(), grid)
    with pytest.raises((C.FormatError, RuntimeError), match="one entry per tile"):
        C.table_offsets(table[:-8], sec.numel(), grid)
