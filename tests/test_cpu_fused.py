"""The fused CPU kernel (csrc/cpu/fused_linear.h) against F.linear in float64: every instruction set this CPU
runs (XORGEMM_CPU_ISA), every tile codec, ragged tiles and chunk tails, many fine-tunes in one pass, its
fallback, the path choice (XORGEMM_CPU_PATH) and the CPU resident form (XORGEMM_CPU_RESIDENT)."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from xorgemm import XorLinear
from xorgemm._native import C
from xorgemm.errors import InputError
from xorgemm.format.layout import CODEC_NAMES, grid_of

ISAS = C.cpu_isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def every_codec_finetune(base: torch.Tensor, tile) -> torch.Tensor:
    """A fine-tune of `base` whose grid rows hold, in turn: untouched tiles (zero), two changed elements a
    tile (sparse, corrected), an eighth of the elements changed (sparse, decoded), small changes to every
    element (byteplane, or conditioned in the compact form) and new values (raw)."""
    g = torch.Generator().manual_seed(7)
    ft = base.clone()
    tr, tc = tile
    bands = [slice(r, r + tr) for r in range(0, base.shape[0], tr)]
    for i, rows in enumerate(bands):
        block = ft[rows]
        kind = i % 5
        if kind == 1:
            block[0, ::tc] += 0.5
            block[-1, -1] -= 0.25
        elif kind == 2:
            mask = torch.rand(block.shape, generator=g) < 1 / 8
            block[mask] += 0.01
        elif kind == 3:
            block += (1e-2 * block.float().abs().mean() * torch.randn(block.shape, generator=g)).to(block.dtype)
        elif kind == 4:
            block.copy_(torch.randn(block.shape, generator=g) * 3)
    return ft


def codecs_of(layer: XorLinear, name: str) -> set[str]:
    w = layer.base_weight
    counts = C.codec_counts(layer.deltas[name].section, grid_of(w.shape, layer.tile, w.dtype))
    return {CODEC_NAMES[i] for i, c in enumerate(counts) if c}


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("XORGEMM_CPU_PATH", "fused")
    return monkeypatch


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["fast", "compact"])
@pytest.mark.parametrize("shape,tile", [((640, 136), (64, 64)), ((333, 200), (32, 48))])
def test_every_codec_matches_float64(fused, isa, dtype, form, shape, tile):
    """Ragged last tiles (rows and columns), chunk tails (a 48-wide tile, an 8-wide edge), every codec."""
    fused.setenv("XORGEMM_CPU_ISA", isa)
    fused.setenv("XORGEMM_CPU_RESIDENT", form)
    torch.manual_seed(0)
    base = (torch.randn(shape) * 0.05).to(dtype)
    ft = every_codec_finetune(base, tile)
    bias = torch.randn(shape[0]).to(dtype)
    layer = XorLinear(base, bias, tile=tile)
    layer.add_finetune("ft", ft, bias * 2)
    layer.active = "ft"
    want_codecs = {"zero", "sparse", "raw", "byteplane" if form == "fast" else "conditioned"}
    assert want_codecs <= codecs_of(layer, "ft")
    for m in (1, 2, 3, 4, 5, 16):
        x = torch.randn(m, shape[1]).to(dtype)
        got = layer(x)
        want = F.linear(x.double(), ft.double(), (bias * 2).double())
        assert got.dtype == dtype and got.shape == (m, shape[0])
        assert rel_err(got, want) < TOL[dtype], (isa, m)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape,tile", [((200, 2500), (64, 64)), ((130, 1100), (128, 32)), ((40, 2100), (16, 2048))])
def test_several_bands_and_tile_shapes(fused, isa, shape, tile):
    """K past one 1024-column band (band offsets, the next band's prefetch), tiles taller than 64 rows and
    wider than a band; M = 0, and x with leading dimensions, not contiguous."""
    fused.setenv("XORGEMM_CPU_ISA", isa)
    torch.manual_seed(4)
    base = (torch.randn(shape) * 0.05).to(torch.bfloat16)
    ft = every_codec_finetune(base, tile)
    layer = XorLinear(base, tile=tile)
    layer.add_finetune("ft", ft)
    layer.active = "ft"
    x = torch.randn(3, shape[1], 2).to(torch.bfloat16).transpose(1, 2)  # [3, 2, K], not contiguous
    got = layer(x)
    assert got.shape == (3, 2, shape[0])
    assert rel_err(got, F.linear(x.double(), ft.double())) < TOL[torch.bfloat16]
    assert layer(torch.empty(0, shape[1], dtype=torch.bfloat16)).shape == (0, shape[0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_finetunes_one_pass(fused, isa, dtype):
    """Rows of four fine-tunes and of the base, interleaved, with a bias row each: one call."""
    fused.setenv("XORGEMM_CPU_ISA", isa)
    torch.manual_seed(1)
    base = (torch.randn(256, 320) * 0.05).to(dtype)
    fts = [every_codec_finetune(base, (64, 64))]
    for s in range(3):
        ft = base.clone()
        ft.view(-1)[torch.randperm(ft.numel())[: 40 * (s + 1)]] += 0.1  # sparse tiles, corrected or decoded
        fts.append(ft)
    biases = [torch.randn(256).to(dtype) for _ in range(5)]
    layer = XorLinear(base, biases[0])
    for i, ft in enumerate(fts):
        layer.add_finetune(f"ft{i}", ft, biases[i + 1])
    ids = torch.tensor([2, -1, 0, 3, 1, 1, 0, 2, -1, 3, 3, 0])
    x = torch.randn(len(ids), 320).to(dtype)
    got = layer(x, finetune=ids)
    weights = [base] + fts
    for r, f in enumerate(ids.tolist()):
        want = F.linear(x[r].double(), weights[f + 1].double(), biases[f + 1].double())
        assert rel_err(got[r], want) < TOL[dtype], (isa, r, f)


def test_not_finite_weight_in_a_sparse_tile_falls_back(fused):
    """A sparse tile whose base element is inf: corrections cannot carry it, the call is computed again on
    the patched-block path, exactly."""
    base = torch.randn(64, 64) * 0.05
    base[3, 5] = float("inf")
    ft = base.clone()
    ft[3, 5] = 1.0
    layer = XorLinear(base)
    layer.add_finetune("ft", ft)
    assert codecs_of(layer, "ft") == {"sparse"}
    x = torch.randn(1, 64)
    got = layer(x, finetune="ft")
    assert torch.isfinite(got).all()
    assert rel_err(got, F.linear(x.double(), ft.double())) < 1e-5


def test_auto_path_picks_fused_for_small_batches(monkeypatch):
    torch.manual_seed(2)
    base = torch.randn(128, 192)
    ft = every_codec_finetune(base, (64, 64))
    layer = XorLinear(base)
    layer.add_finetune("ft", ft)
    layer.active = "ft"
    for m, path in ((1, "fused"), (4096, "blocks")):
        x = torch.randn(m, 192)
        monkeypatch.delenv("XORGEMM_CPU_PATH", raising=False)
        auto = layer(x)
        monkeypatch.setenv("XORGEMM_CPU_PATH", path)
        assert torch.equal(auto, layer(x)), m  # the same path: the same bits


def test_bad_settings_are_named(monkeypatch):
    layer = XorLinear(torch.randn(64, 64))
    layer.add_finetune("ft", torch.randn(64, 64))
    x = torch.randn(1, 64)
    monkeypatch.setenv("XORGEMM_CPU_PATH", "fastest")
    with pytest.raises(RuntimeError, match="XORGEMM_CPU_PATH must be fused, blocks or auto"):
        layer(x, finetune="ft")
    monkeypatch.setenv("XORGEMM_CPU_PATH", "fused")
    monkeypatch.setenv("XORGEMM_CPU_ISA", "avx1024")
    with pytest.raises(RuntimeError, match="XORGEMM_CPU_ISA=avx1024 is not one this CPU runs"):
        layer(x, finetune="ft")
    monkeypatch.delenv("XORGEMM_CPU_ISA")
    wide = XorLinear(torch.randn(64, 64, dtype=torch.float64))
    wide.add_finetune("ft", torch.randn(64, 64, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="does not take Double weights"):
        wide(torch.randn(1, 64, dtype=torch.float64), finetune="ft")
    monkeypatch.delenv("XORGEMM_CPU_PATH")
    assert torch.isfinite(wide(torch.randn(1, 64, dtype=torch.float64), finetune="ft")).all()  # auto: blocks
    monkeypatch.setenv("XORGEMM_CPU_RESIDENT", "tiny")
    with pytest.raises(InputError, match="XORGEMM_CPU_RESIDENT must be one of fast, compact"):
        layer.add_finetune("ft2", torch.randn(64, 64))


def test_portable_is_always_there():
    assert ISAS[-1] == "portable" and C.cpu_isa() in ISAS


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_vector_code_stays_in_its_instruction_set():
    """Code compiled for AVX2 or AVX-512 runs only behind the CPU check: a template shared with the portable
    path (a codec decoder, a std::vector member) instantiated inside a target region would be one copy that
    every path calls, and fault on a CPU without those instructions."""
    so = Path(C.__file__)
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                         check=True).stdout
    name, bad, isa_fns = "", set(), 0
    for line in out.splitlines():
        if line.endswith(">:") and " <" in line:
            name = line.split(" <", 1)[1][:-2]
        elif ("ymm" in line or "zmm" in line) and name:
            if any(f"::{isa}::" in name for isa in ("avx2", "avx512", "avx512bf16")):
                isa_fns += 1
            else:
                bad.add(name)
    assert isa_fns > 0 and not bad, sorted(bad)[:5]


def test_fast_form_drops_conditioned_tiles_only(monkeypatch):
    """The fast form re-encodes conditioned tiles with the XOR codecs (bigger, decoded at memory speed);
    both forms give the same products."""
    torch.manual_seed(3)
    base = (torch.randn(256, 256) * 0.05).to(torch.bfloat16)
    ft = every_codec_finetune(base, (64, 64))
    layers = {}
    for form in ("compact", "fast"):
        monkeypatch.setenv("XORGEMM_CPU_RESIDENT", form)
        layers[form] = XorLinear(base)
        layers[form].add_finetune("ft", ft)
    assert "conditioned" in codecs_of(layers["compact"], "ft")
    assert "conditioned" not in codecs_of(layers["fast"], "ft")
    assert layers["fast"].resident_bytes("ft") > layers["compact"].resident_bytes("ft")
    x = torch.randn(3, 256).to(torch.bfloat16)
    assert torch.equal(layers["fast"](x, finetune="ft"), layers["compact"](x, finetune="ft"))


def conditioned_delta_and_wrong_base():
    """A conditioned section of a bf16 weight, and a base it does not decode against: all its elements in
    one exponent class, whose slots need more bits than the payload holds."""
    torch.manual_seed(5)
    base = (torch.randn(64, 64) * 0.05).to(torch.bfloat16)
    ft = (base.float() + 0.01 * torch.randn(64, 64)).to(torch.bfloat16)
    layer = XorLinear(base)
    layer.add_finetune("ft", ft)
    return layer.deltas["ft"].section, layer.deltas["ft"].offsets, torch.full((64, 64), 2.0**-12).bfloat16()


def test_a_delta_against_the_wrong_base_is_named(fused):
    fused.setenv("XORGEMM_CPU_RESIDENT", "compact")
    section, offsets, wrong = conditioned_delta_and_wrong_base()
    x = torch.randn(1, 64).bfloat16()
    with pytest.raises(C.FormatError, match="fine-tune 0: tile 0 does not decode against this base"):
        torch.ops.xorgemm.xor_linear(x, wrong, [section], [offsets], None, None, 64, 64)
    fused.setenv("XORGEMM_CPU_RESIDENT", "fast")  # re-encoding it for this base fails the same way, named
    with pytest.raises(InputError, match="fine-tune 'bad': its delta does not decode against this base"):
        XorLinear(wrong).add_finetune_section("bad", section)
