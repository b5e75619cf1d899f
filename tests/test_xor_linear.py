"""XorLinear and the xor_linear op against F.linear on the reconstructed weight (float64 reference), on every
device present (tests/helpers.py: DEVICES)."""
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, close, rel_err
from torch import nn

import xorgemm
from xorgemm import XorLinear
from xorgemm._native import C
from xorgemm.format.layout import grid_of, tensor_bytes
from xorgemm.ops import xor_linear
from xorgemm.testing import DELTA_KINDS, ROW_DISTRIBUTIONS, perturb, row_finetunes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Normwise relative error bounds against float64: fp32 as the issue asks; fp16/bf16 within their rounding
# of the output (the inputs are exact in both paths, so only accumulation/rounding differs).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def sections_for(base, fts, tile=(64, 64)):
    g = grid_of(base.shape, tile, base.dtype)
    secs = [C.encode_section(tensor_bytes(base), tensor_bytes(f), g) for f in fts]
    return secs, [C.validate_section(s, g) for s in secs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", DELTA_KINDS)
@pytest.mark.parametrize("shape", [(192, 128), (130, 70), (1, 5), (300, 1)])
@pytest.mark.parametrize("x_shape", [(), (7,), (2, 3, 5)])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_dense_reference(dtype, kind, shape, x_shape, device):
    torch.manual_seed(0)
    base = torch.randn(shape).to(dtype)
    ft = perturb(base, kind, seed=1, magnitude=0.05)
    bias = torch.randn(shape[0]).to(dtype)
    layer = XorLinear.from_linear(_linear(base, bias), ft, bias * 2).to(device)
    x = torch.randn(*x_shape, shape[1]).to(dtype)
    want = F.linear(x.double(), ft.double(), (bias * 2).double())
    got = layer(x.to(device))
    assert got.shape == (*x_shape, shape[0]) and got.dtype == dtype and got.device.type == device
    assert rel_err(got, want) < TOL[dtype]


def _linear(w, b=None):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_input_and_bias(dtype, device):
    torch.manual_seed(1)
    base = torch.randn(150, 90).to(dtype)
    ft = perturb(base, "dense", seed=2)
    lin = _linear(base, torch.randn(150).to(dtype))
    layer = XorLinear.from_linear(lin, ft).to(device)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 6, 90).to(dtype).to(device).requires_grad_(True)
    gy = torch.randn(4, 6, 150).to(dtype)
    layer(x).backward(gy.to(device))
    assert rel_err(x.grad, gy.double() @ ft.double()) < TOL[dtype]
    assert rel_err(layer.bias.grad, gy.double().sum((0, 1))) < TOL[dtype]


def test_frozen_weights_are_a_clear_error():
    layer = XorLinear.from_linear(_linear(torch.randn(8, 4)), torch.randn(8, 4))
    layer.base_weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        layer(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="frozen"):
        layer.weight.requires_grad_(True)


def test_non_contiguous_inputs():
    base = torch.randn(64, 96)
    ft = perturb(base, "sparse", seed=3)
    layer = XorLinear.from_linear(_linear(base), ft)
    x = torch.randn(96, 10).t()  # [10, 96], non-contiguous
    assert not x.is_contiguous()
    assert rel_err(layer(x), F.linear(x.double(), ft.double())) < 1e-5
    x3 = torch.randn(5, 12, 96)[:, ::3]
    assert rel_err(layer(x3), F.linear(x3.double(), ft.double())) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_fine_tune_rows(dtype, device):
    torch.manual_seed(2)
    base = torch.randn(200, 130).to(dtype)
    b0 = torch.randn(200).to(dtype)
    fts = {"a": perturb(base, "sparse", seed=4, magnitude=0.1), "b": perturb(base, "dense", seed=5),
           "c": perturb(base, "structured", seed=6, magnitude=0.1)}
    biases = {"a": None, "b": torch.randn(200).to(dtype), "c": b0 + 1}
    layer = XorLinear(base, b0)
    for n in fts:
        layer.add_finetune(n, fts[n], biases[n])
    layer.to(device)
    ids = torch.tensor([[0, 1, -1, 2, 0], [2, 2, -1, 1, 0]])  # [2, 5] over x's [2, 5, 3, 130]
    x = torch.randn(2, 5, 3, 130).to(dtype)
    got = layer(x.to(device), finetune=ids)
    weights = [base] + list(fts.values())
    bs = [b0] + [biases[n] if biases[n] is not None else b0 for n in fts]
    for i in range(2):
        for j in range(5):
            k = ids[i, j].item() + 1
            want = F.linear(x[i, j].double(), weights[k].double(), bs[k].double())
            assert rel_err(got[i, j], want) < TOL[dtype]
    # backward through mixed rows
    xr = x.to(device).requires_grad_(True)
    layer(xr, finetune=ids).sum().backward()
    for i in range(2):
        for j in range(5):
            k = ids[i, j].item() + 1
            want = weights[k].double().sum(0).expand(3, -1)
            assert rel_err(xr.grad[i, j], want) < TOL[dtype]


def test_the_bias_is_added_before_the_one_rounding():
    """As F.linear does in bf16: every output within half a unit in the last place of the exact x w^T + b
    (plus the fp32 accumulation's error, orders smaller). Adding the bias to an already rounded product
    rounds twice and misses that on a good share of the outputs: a served fine-tune would drift from its
    dense model. (fp16 GEMMs on the CPU round more than once inside ATen itself, so bf16 is the measure.)"""
    dtype = torch.bfloat16
    torch.manual_seed(3)
    base = torch.randn(1100, 256).to(dtype)  # several patched blocks: each adds its slice of the bias
    fts = {"a": perturb(base, "dense", seed=1)}
    biases = {"a": torch.randn(1100).to(dtype), "base": torch.randn(1100).to(dtype)}
    layer = XorLinear(base, biases["base"])
    layer.add_finetune("a", fts["a"], biases["a"])
    x = torch.randn(6, 256).to(dtype)
    for ids in (torch.tensor([0, -1, 0, 0, -1, 0]), None):
        got = layer(x, ids if ids is not None else "a").double()
        for row in range(6):
            f = "a" if ids is None or ids[row] == 0 else "base"
            exact = F.linear(x[row].double(), (fts[f] if f == "a" else base).double(), biases[f].double())
            ulp = torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(exact.abs()))
            assert ((got[row] - exact).abs() / ulp).max() <= 0.5 + 1e-3, f"row {row}, ids {ids}"


@pytest.mark.parametrize("device", DEVICES)
def test_groups_with_no_rows_and_all_rows_on_one(device):
    base = torch.randn(70, 40)
    layer = XorLinear(base)
    layer.add_finetune("a", perturb(base, "dense", seed=1))
    layer.add_finetune("b", perturb(base, "dense", seed=2))
    layer.to(device)
    x = torch.randn(6, 40)
    all_b = layer(x.to(device), finetune=torch.ones(6, dtype=torch.long))
    assert close(all_b, layer(x.to(device), finetune="b"), 1e-6)
    assert close(all_b, F.linear(x, layer.materialize("b")))
    assert close(layer(x.to(device), finetune=torch.full((6,), -1)), F.linear(x, base))


@pytest.mark.parametrize("dist", ROW_DISTRIBUTIONS)
@pytest.mark.parametrize("d", [1, 4, 16])
@pytest.mark.parametrize("device", DEVICES)
def test_row_distributions_match_per_finetune_references(dist, d, device):
    """The op on the multi-tenant benchmark's row distributions."""
    g = torch.Generator().manual_seed(d)
    base = torch.randn(96, 80, generator=g)
    layer = XorLinear(base)
    fts = [perturb(base, DELTA_KINDS[i % 4], seed=i, magnitude=1e-2) for i in range(d)]
    for i, f in enumerate(fts):
        layer.add_finetune(f"f{i}", f)
    layer.to(device)
    for m in (d, 4 * d):
        ids = row_finetunes(dist, m, d, seed=m)
        x = torch.randn(m, 80, generator=g)
        y = layer(x.to(device), finetune=ids).cpu()
        for f in range(d):
            rows = (ids == f).nonzero().reshape(-1)
            if len(rows):
                assert rel_err(y[rows], x[rows].double() @ fts[f].double().T) < 1e-5


def test_row_distributions_are_what_they_say():
    assert row_finetunes("distinct", 16, 16).tolist() == list(range(16))
    assert set(row_finetunes("identical", 9, 4).tolist()) == {3}
    skewed = row_finetunes("skewed", 1000, 16)
    assert (skewed == 0).float().mean() > 0.85
    zipf = row_finetunes("zipf", 2000, 16).bincount(minlength=16)
    assert zipf[0] > zipf[1] > zipf[4] and zipf.sum() == 2000
    u = row_finetunes("uniform", 1600, 16).bincount(minlength=16)
    assert u.min() > 50
    with pytest.raises(ValueError, match="unknown row distribution"):
        row_finetunes("bursty", 4, 2)


def test_materialize_and_introspection():
    base = torch.randn(130, 70).bfloat16()
    ft = perturb(base, "sparse", seed=7)
    layer = XorLinear.from_linear(_linear(base), ft, name="legal")
    assert torch.equal(layer.materialize("legal").view(torch.int16), ft.view(torch.int16))
    assert (layer.in_features, layer.out_features) == (70, 130)
    assert layer.weight.shape == (130, 70) and layer.weight.dtype == torch.bfloat16
    assert "legal:" in repr(layer) and "delta" in repr(layer)
    assert layer.delta_bytes() < 0.2 * base.numel() * 2


def test_base_storage_is_shared_not_copied():
    lin = _linear(torch.randn(64, 64))
    layer = XorLinear.from_linear(lin, perturb(lin.weight.detach(), "sparse"))
    assert layer.base_weight.data_ptr() == lin.weight.data_ptr()


def test_state_dict_round_trip():
    base = torch.randn(100, 60)
    layer = XorLinear(base, torch.randn(100))
    layer.add_finetune("a", perturb(base, "sparse", seed=1), torch.randn(100))
    layer.add_finetune("b", perturb(base, "dense", seed=2))
    sd = layer.state_dict()
    fresh = XorLinear(base.clone(), torch.zeros(100))
    fresh.load_state_dict(sd)
    assert fresh.finetunes == ["a", "b"]
    x = torch.randn(3, 60)
    ids = torch.tensor([0, 1, -1])
    assert torch.equal(fresh(x, finetune=ids), layer(x, finetune=ids))


@pytest.mark.parametrize("damage,error", [("entry", "malformed delta section"), ("length", "malformed delta section"),
                                          ("offsets", "do not match the section's tile table")])
def test_a_state_dict_with_a_bad_section_is_refused_before_anything_changes(damage, error):
    """The kernels trust the sections they are given (a wild offset on a GPU kills the CUDA context): a state
    dict's sections are checked as they load, and a bad one leaves the layer as it was."""
    base = torch.randn(100, 60)
    layer = XorLinear(base)
    layer.add_finetune("a", perturb(base, "dense", seed=1))
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    if damage == "entry":
        sd["deltas.a.section"][4] = 7  # tile 0's codec byte: no such codec
    elif damage == "length":
        sd["deltas.a.section"] = sd["deltas.a.section"][:-16]
    else:
        sd["deltas.a.offsets"][1] += 16
    fresh = XorLinear(base.clone())
    fresh.add_finetune("b", perturb(base, "sparse", seed=2))
    with pytest.raises(xorgemm.InputError, match=error) as e:
        fresh.load_state_dict(sd, strict=False)
    assert "deltas.a." in str(e.value)
    assert fresh.finetunes == ["b"]


def test_to_device_moves_state():
    layer = XorLinear.from_linear(_linear(torch.randn(32, 16)), torch.randn(32, 16))
    moved = layer.to("meta")
    assert moved.base_weight.device.type == "meta" and moved.deltas["finetune"].section.device.type == "meta"
    assert moved(torch.randn(2, 16, device="meta")).shape == (2, 32)  # shapes only, from the fake kernel


def test_bad_inputs():
    layer = XorLinear.from_linear(_linear(torch.randn(32, 16)), torch.randn(32, 16), name="a")
    with pytest.raises(xorgemm.InputError, match="16 input features"):
        layer(torch.randn(2, 15))
    with pytest.raises(xorgemm.InputError, match="float64"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(xorgemm.InputError, match="unknown fine-tune 'zzz'"):
        layer(torch.randn(2, 16), finetune="zzz")
    with pytest.raises(xorgemm.InputError, match="-1..0"):
        layer(torch.randn(2, 16), finetune=torch.tensor([0, 3]))
    with pytest.raises(xorgemm.InputError, match="do not prefix"):
        layer(torch.randn(2, 16), finetune=torch.tensor([0, 0, 0]))
    with pytest.raises(xorgemm.InputError, match="already"):
        layer.add_finetune("a", torch.randn(32, 16))
    with pytest.raises(xorgemm.InputError, match="base is"):
        layer.add_finetune("b", torch.randn(16, 32))
    with pytest.raises(xorgemm.InputError, match="input is on meta but its weight is on cpu"):
        layer(torch.randn(2, 16, device="meta"))


@pytest.mark.parametrize("device", DEVICES)
def test_op_validates_its_arguments(device):
    base = torch.randn(64, 64, device=device)
    secs, offs = sections_for(base.cpu(), [perturb(base.cpu(), "sparse")])
    secs, offs = [s.to(device) for s in secs], [o.to(device) for o in offs]
    x = torch.randn(2, 64, device=device)
    with pytest.raises(RuntimeError, match="row_finetune"):
        xor_linear(x, base, secs * 2, offs * 2)
    with pytest.raises(RuntimeError, match=r"bias must be \[64\]"):
        xor_linear(x, base, secs, offs, bias=torch.zeros(5, 64, device=device))
    with pytest.raises(RuntimeError, match="x has 63 features but the weight has 64 inputs"):
        xor_linear(x[:, :63], base, secs, offs)
    with pytest.raises(RuntimeError, match="tile_offsets 0 must hold one int64 per tile"):
        xor_linear(x, base, secs, [offs[0][:-1]])
    for k_or_n in ("k", "n"):  # an empty reduction or output: a clear error, never a division by zero
        empty = torch.zeros((64, 0) if k_or_n == "k" else (0, 64), device=device)
        xe = torch.zeros(2, empty.shape[1], device=device)
        with pytest.raises(RuntimeError, match="must be positive"):
            xor_linear(xe, empty, [], [], torch.tensor([-1, -1], device=device))
    bad = offs[0].clone()
    bad[0] = 10 ** 9
    if device == "cpu":
        with pytest.raises(RuntimeError, match="asks for fine-tune 5"):
            xor_linear(x, base, secs, offs, torch.tensor([0, 5]))
        with pytest.raises(RuntimeError, match="outside the section"):
            xor_linear(x, base, secs, [bad])
    else:  # on a GPU the fused kernel skips what it cannot read or serve, and the next call raises it
        wh = base.half()
        hs, ho = sections_for(wh.cpu(), [perturb(wh.cpu(), "dense", seed=3)])
        hs, ho = [t.to(device) for t in hs], [t.to(device) for t in ho]
        wild = ho[0].clone()
        wild[0] = 10 ** 9
        xh, ids = x.half(), torch.tensor([0, 0], device=device)
        for call, what in ((lambda: xor_linear(xh, wh, hs, [wild], ids), "a tile outside it"),
                           (lambda: xor_linear(xh, wh, hs, ho, torch.tensor([0, 5], device=device)), "ids outside")):
            call()
            torch.cuda.synchronize()
            with pytest.raises(RuntimeError, match=what):
                xor_linear(xh, wh, hs, ho, ids)
            xor_linear(xh, wh, hs, ho, ids)  # reported once: the device goes on serving


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    base = torch.randn(70, 50)
    secs, offs = sections_for(base, [perturb(base, "sparse", seed=1), perturb(base, "dense", seed=2)])
    base, secs, offs = base.to(device), [s.to(device) for s in secs], [o.to(device) for o in offs]
    x = torch.randn(3, 4, 50, device=device)
    ids = torch.tensor([0, 1, -1, 0, 1, 1, -1, 0, 0, 1, 1, 0], device=device)
    bias = torch.randn(3, 70, device=device)
    torch.library.opcheck(torch.ops.xorgemm.xor_linear, (x, base, secs, offs, ids, bias, 64, 64))
    torch.library.opcheck(torch.ops.xorgemm.xor_linear, (x, base, secs[:1], offs[:1], None, bias[0], 64, 64))
    torch.library.opcheck(torch.ops.xorgemm.xor_linear_grad_input,
                          (torch.randn(3, 4, 70, device=device), base, secs, offs, ids, 64, 64))
    out = torch.empty_like(base)
    torch.library.opcheck(torch.ops.xorgemm.apply_section, (secs[0], offs[0], base, out, 64, 64))


def test_torch_compile_traces_the_op():
    base = torch.randn(64, 32)
    ft = perturb(base, "dense", seed=3)
    layer = XorLinear.from_linear(_linear(base), ft)
    x = torch.randn(5, 32)
    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    assert torch.allclose(compiled(x), F.linear(x, ft), atol=1e-5)


def test_from_delta_file_including_a_bias_only_finetune(tmp_path):
    torch.manual_seed(3)
    lin = _linear(torch.randn(96, 80), torch.randn(96))
    sd = {"proj.weight": lin.weight.detach(), "proj.bias": lin.bias.detach()}
    ft = {"proj.weight": perturb(sd["proj.weight"], "structured", seed=1), "proj.bias": sd["proj.bias"] + 1}
    bias_only = {"proj.weight": sd["proj.weight"].clone(), "proj.bias": sd["proj.bias"] * 3}
    xorgemm.pack(sd, ft, tmp_path / "a.xor.safetensors")
    xorgemm.pack(sd, bias_only, tmp_path / "b.xor.safetensors")
    layer = XorLinear.from_delta(lin, tmp_path / "a.xor.safetensors", "proj", name="a")
    layer.add_finetune_from_file("b", *(xorgemm.load_delta(tmp_path / "b.xor.safetensors")[n]
                                     for n in ("proj.weight", "proj.bias")))
    x = torch.randn(3, 80)
    want = [F.linear(x[0].double(), ft["proj.weight"].double(), ft["proj.bias"].double()),
            F.linear(x[1].double(), sd["proj.weight"].double(), bias_only["proj.bias"].double()),
            F.linear(x[2].double(), sd["proj.weight"].double(), sd["proj.bias"].double())]
    got = layer(x, finetune=torch.tensor([0, 1, -1]))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    with pytest.raises(xorgemm.BaseMismatchError):
        XorLinear.from_delta(_linear(torch.randn(96, 80)), tmp_path / "a.xor.safetensors", "proj")


@pytest.mark.parametrize("device", DEVICES)
def test_add_finetune_section_validates_and_serves(device):
    base = torch.randn(130, 70)
    ft = perturb(base, "dense", seed=5)
    src = XorLinear(base)
    src.add_finetune("a", ft)
    layer = XorLinear(base).to(device)
    layer.add_finetune_section("copy", src.deltas["a"].section.clone().to(device))
    assert layer.deltas["copy"].section.device.type == device
    assert torch.equal(layer.deltas["copy"].offsets.cpu(), src.deltas["a"].offsets)
    x = torch.randn(3, 70)
    assert close(layer(x.to(device), finetune="copy"), F.linear(x.double(), ft.double()))
    bad = src.deltas["a"].section.clone()
    bad[4] = 9  # tile 0's codec byte
    with pytest.raises(xorgemm.InputError, match="fine-tune 'bad': malformed delta section"):
        layer.add_finetune_section("bad", bad.to(device))
    with pytest.raises(xorgemm.InputError, match="1-D uint8"):
        layer.add_finetune_section("bad", src.deltas["a"].section.view(torch.int8).to(device))
    assert layer.finetunes == ["copy"]


def test_apply_without_a_kernel_for_the_device_is_a_clear_error(tmp_path, monkeypatch):
    """As on a CUDA base where xorgemm was built without its CUDA extension (faked here on the CPU)."""
    base = torch.randn(64, 64)
    xorgemm.pack({"w": base}, {"w": perturb(base, "sparse")}, tmp_path / "d.xor.safetensors")
    t = xorgemm.load_delta(tmp_path / "d.xor.safetensors")["w"]
    monkeypatch.setattr(xorgemm._native, "has_kernel", lambda device_type: False)
    with pytest.raises(NotImplementedError, match="d.xor.safetensors: tensor 'w': xorgemm has no cpu kernel"):
        t.apply(base)
