"""pack -> unpack is bit-exact for every dtype, shape, delta kind and tensor kind; inputs in every form."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import xorgemm
import xorgemm.packing.sources
from xorgemm.format.layout import CODEC_NAMES, tensor_bytes
from xorgemm.testing import DELTA_KINDS, perturb, seed_scenario, state_dict_of

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_bit_exact(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(tensor_bytes(got[k]), tensor_bytes(want[k])), k


def model_pair(dtype, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(300, 96, generator=g),
        "layers.0.attn.weight": torch.randn(192, 96, generator=g),
        "layers.0.mlp.weight": torch.randn(130, 75, generator=g),   # ragged in both dims
        "layers.0.mlp.bias": torch.randn(130, generator=g),
        "norm.weight": torch.ones(96),
        "conv.weight": torch.randn(8, 3, 5, 5, generator=g),
        "scale": torch.tensor(0.5),
    }
    base = {k: v.to(dtype) for k, v in base.items()}
    ft = {k: perturb(v, kind, seed=seed + i) for i, (k, v) in enumerate(base.items())}
    return base, ft


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", DELTA_KINDS)
def test_round_trip_state_dicts(tmp_path, dtype, kind):
    base, ft = model_pair(dtype, kind)
    rep = xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")
    assert rep.file_bytes == (tmp_path / "d.xor.safetensors").stat().st_size
    assert_bit_exact(xorgemm.unpack(base, tmp_path / "d.xor.safetensors"), ft)
    assert xorgemm.verify(base, tmp_path / "d.xor.safetensors", ft).ok


def test_tensor_kinds_same_whole_new_reshaped(tmp_path):
    base, ft = model_pair(torch.bfloat16, "sparse")
    ft["norm.weight"] = base["norm.weight"].clone()                  # unchanged -> same
    ft["lm_head.weight"] = torch.randn(50, 96).bfloat16()             # new -> whole
    ft["embed.weight"] = torch.randn(310, 96).bfloat16()              # resized vocab -> whole
    del ft["scale"]                                                    # dropped by the fine-tune
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack(base, ft, path)
    d = xorgemm.load_delta(path)
    assert d["norm.weight"].kind == "same" and d["norm.weight"].span[1] == 0
    assert (d["lm_head.weight"].kind, d["lm_head.weight"].reason) == ("whole", "new")
    assert (d["embed.weight"].kind, d["embed.weight"].reason) == ("whole", "reshaped")
    mlp = d["layers.0.mlp.weight"]
    assert mlp.kind == "xor"
    table = mlp.tile_table()
    assert len(table) == sum(mlp.tile_counts) == 3 * 2  # 130x75 in 64x64 tiles, ragged
    assert [int((table[:, 1] == c).sum()) for c in range(len(CODEC_NAMES))] == list(mlp.tile_counts)
    assert "scale" not in d
    assert_bit_exact(xorgemm.unpack(base, path), ft)


def test_identical_models_cost_only_the_index(tmp_path):
    base, _ = model_pair(torch.float32, "sparse")
    rep = xorgemm.pack(base, {k: v.clone() for k, v in base.items()}, tmp_path / "d.xor.safetensors")
    assert rep.stream_bytes == 0
    assert all(t.kind == "same" for t in rep.tensors)
    assert rep.file_bytes < 1500
    assert_bit_exact(xorgemm.unpack(base, tmp_path / "d.xor.safetensors"), base)


def test_empty_tensors(tmp_path):
    base = {"e": torch.zeros(0, 4), "w": torch.randn(4, 4)}
    ft = {"e": torch.zeros(0, 4), "w": base["w"] + 1, "n": torch.zeros(0)}
    xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")
    assert_bit_exact(xorgemm.unpack(base, tmp_path / "d.xor.safetensors"), ft)


def test_many_chunks_and_lazy_access(tmp_path):
    base = {f"w{i}": torch.randn(256, 256) for i in range(6)}
    ft = {k: perturb(v, "dense", seed=i) for i, (k, v) in enumerate(base.items())}
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack(base, ft, path, chunk_bytes=4096, level=1)
    d = xorgemm.load_delta(path)
    assert d.n_chunks > 100
    # One tensor decodes on its own, touching only its chunks.
    assert torch.equal(d["w3"].apply(base["w3"]), ft["w3"])
    assert torch.equal(d["w3"].apply(base["w3"], verify=False), ft["w3"])
    assert torch.equal(d["w3"].xor_bytes(base["w3"]), tensor_bytes(base["w3"]) ^ tensor_bytes(ft["w3"]))
    assert sum(d.compressed_share(n) for n in d) == pytest.approx(d.compressed_bytes)


@pytest.mark.parametrize("tile", [(16, 16), (64, 64), (128, 64), (1, 512), (256, 256)])
def test_tile_shapes(tmp_path, tile):
    base, ft = model_pair(torch.float16, "structured")
    xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors", tile=tile)
    d = xorgemm.load_delta(tmp_path / "d.xor.safetensors")
    assert d["layers.0.attn.weight"].tile == tile
    assert d["layers.0.mlp.bias"].tile == (1, tile[0] * tile[1])
    assert_bit_exact(xorgemm.unpack(base, d), ft)


def test_safetensors_files_and_sharded_hf_folder(tmp_path):
    base, ft = model_pair(torch.bfloat16, "partial")
    save_file(base, tmp_path / "base.safetensors")
    folder = tmp_path / "ft_model"
    folder.mkdir()
    names = sorted(ft)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for fname, keys in shards.items():
        save_file({k: ft[k] for k in keys}, folder / fname)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (folder / "config.json").write_text("{}")
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack(tmp_path / "base.safetensors", folder, path)
    assert_bit_exact(xorgemm.unpack(tmp_path / "base.safetensors", path), ft)
    assert xorgemm.verify(tmp_path / "base.safetensors", path, folder).ok


def test_modules_are_accepted_as_state_dicts(tmp_path):
    base, ft = seed_scenario()
    xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")
    assert_bit_exact(xorgemm.unpack(base, tmp_path / "d.xor.safetensors"), state_dict_of(ft))


def test_seed_scenario_is_no_larger_than_the_notebooks_package(tmp_path):
    """The seed notebook pickled its package in 7,009 bytes (5,632 of them zstd-10 XOR payload)."""
    base, ft = seed_scenario()
    changed = sum(int((a != b).sum()) for a, b in zip(base.parameters(), ft.parameters()))
    assert changed == 994 and sum(p.numel() for p in base.parameters()) == 33472
    rep = xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")
    assert rep.file_bytes <= 7009
    assert_bit_exact(xorgemm.unpack(base, tmp_path / "d.xor.safetensors"), state_dict_of(ft))


def test_verify_reports_differences(tmp_path):
    base, ft = model_pair(torch.float32, "sparse")
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack(base, ft, path)
    other = dict(ft)
    other["norm.weight"] = ft["norm.weight"] + 1
    other["extra"] = torch.zeros(3)
    rep = xorgemm.verify(base, path, other)
    assert not rep.ok and rep.mismatched == ["norm.weight"] and rep.missing_in_delta == ["extra"]


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 90)), min_size=1, max_size=4),
       dtype=st.sampled_from(DTYPES), kind=st.sampled_from(DELTA_KINDS), frac=st.floats(0.001, 1.0),
       seed=st.integers(0, 1000))
def test_property_round_trip(tmp_path_factory, shapes, dtype, kind, frac, seed):
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=g).to(dtype) for i, s in enumerate(shapes)}
    ft = {k: perturb(v, kind, frac=frac, seed=seed + i) for i, (k, v) in enumerate(base.items())}
    path = tmp_path_factory.mktemp("p") / "d.xor.safetensors"
    xorgemm.pack(base, ft, path, chunk_bytes=4096)
    assert_bit_exact(xorgemm.unpack(base, path), ft)


class CountingSource(xorgemm.packing.sources.DictSource):
    """A base that counts the tensors read from it."""

    def __init__(self, sd, label="base"):
        super().__init__(sd, label)
        self.reads = {}

    def get(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return super().get(name)


def test_pack_many_reads_each_base_tensor_once(tmp_path):
    """Three fine-tunes of one base in one pass: each base tensor read once; each delta byte-identical to
    the one pack() writes alone; a fine-tune pack refuses (another dtype) reported and skipped, the others
    written."""
    base, ft_a = model_pair(torch.bfloat16, "dense", seed=1)
    ft_b = {k: perturb(v, "sparse", seed=3) for k, v in base.items()}
    bad = {**ft_a, "layers.0.attn.weight": ft_a["layers.0.attn.weight"].float()}
    src = CountingSource(base)
    rep = xorgemm.pack_many(src, {"a": ft_a, "b": ft_b, "bad": bad}, tmp_path / "out")
    assert set(rep.reports) == {"a", "b"} and set(rep.failed) == {"bad"} and not rep.ok
    assert "layers.0.attn.weight" in rep.failed["bad"] and "cast one of them" in rep.failed["bad"]
    assert max(src.reads.values()) == 1 and set(src.reads) == set(base)
    assert not (tmp_path / "out" / "bad.xor.safetensors").exists()
    for name, ft in (("a", ft_a), ("b", ft_b)):
        alone = xorgemm.pack(base, ft, tmp_path / f"{name}-alone.xor.safetensors")
        many = tmp_path / "out" / f"{name}.xor.safetensors"
        assert many.read_bytes() == alone.path.read_bytes()
        assert_bit_exact(xorgemm.unpack(base, many), ft)


def test_pack_many_names_deltas_after_their_files(tmp_path):
    base, ft = model_pair(torch.float32, "dense", seed=4)
    save_file(base, tmp_path / "base.safetensors")
    (tmp_path / "run2").mkdir()
    save_file(ft, tmp_path / "run1.safetensors")
    save_file(ft, tmp_path / "run2" / "model.safetensors")
    rep = xorgemm.pack_many(tmp_path / "base.safetensors", [tmp_path / "run1.safetensors", tmp_path / "run2"],
                            tmp_path / "deltas")
    assert rep.ok and sorted(p.name for p in (tmp_path / "deltas").iterdir()) == [
        "run1.xor.safetensors", "run2.xor.safetensors"]
    missing = xorgemm.pack_many(base, [tmp_path / "run1.safetensors", tmp_path / "gone"], tmp_path / "d2")
    assert set(missing.reports) == {"run1"} and "no such file" in missing.failed["gone"]
    with pytest.raises(xorgemm.InputError, match="same delta name"):
        xorgemm.pack_many(base, [tmp_path / "run1.safetensors", tmp_path / "run1.safetensors"], tmp_path / "x")
    with pytest.raises(xorgemm.InputError, match="is a file"):
        xorgemm.pack_many(base, [tmp_path / "run1.safetensors"], tmp_path / "run1.safetensors")
