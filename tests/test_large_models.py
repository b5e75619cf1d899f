"""Models of any size: the bounded pipeline, sharded deltas, unpack writing the fine-tune's own files, and the
commands' peak memory measured in processes of their own on a generated model larger than the bound."""
import json
import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import xorgemm
from xorgemm.errors import DeltaFormatError, InputError
from xorgemm.format.safetensors_io import Header
from xorgemm.packing.pipeline import SLACK_BYTES, bounded_map
from xorgemm.testing import perturb, run_measured, write_llama_pair

# ------------------------------------------------------------------------------------------ the pipeline


def test_bounded_map_keeps_order_and_the_budget():
    lock, state = threading.Lock(), {"now": 0, "peak": 0}
    cost = {i: (50 if i == 7 else 10) for i in range(20)}  # item 7 costs more than the budget: it runs alone

    def work(i):
        with lock:
            state["now"] += cost[i]
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.002 * (i % 3))
        with lock:
            state["now"] -= cost[i]
        return i * i

    got = list(bounded_map(work, range(20), cost.get, budget=30, workers=4))
    assert got == [(i, i * i) for i in range(20)]
    assert state["peak"] == 50  # item 7 alone; otherwise at most 30 at once


def test_bounded_map_raises_where_the_item_failed():
    def work(i):
        if i == 3:
            raise InputError("item 3 is bad")
        return i

    seen = []
    with pytest.raises(InputError, match="item 3"):
        for i, _ in bounded_map(work, range(10), lambda i: 1, budget=4, workers=2):
            seen.append(i)
    assert seen == [0, 1, 2]


def test_thread_count_from_the_environment(monkeypatch):
    from xorgemm._threads import threads

    monkeypatch.setenv("XORGEMM_THREADS", "3")
    assert threads() == 3
    monkeypatch.setenv("XORGEMM_THREADS", "none")
    with pytest.raises(InputError, match="XORGEMM_THREADS"):
        threads()


def test_a_large_span_compresses_on_every_core_to_the_same_chunks(monkeypatch):
    import numpy as np
    import zstandard

    from xorgemm.format.writer import compress_span

    data = np.random.default_rng(0).integers(0, 4, 20 * 2**20 + 5, dtype=np.uint8)  # 321 chunks, ragged
    monkeypatch.setenv("XORGEMM_THREADS", "1")
    one = compress_span(data, 65536, 3)
    monkeypatch.setenv("XORGEMM_THREADS", "3")
    many = compress_span(data, 65536, 3)
    assert many.frames == one.frames and many.checksums == one.checksums and len(many.frames) == 321
    raw = b"".join(zstandard.ZstdDecompressor().decompress(f) for f in many.frames)
    assert raw[:len(data)] == data.tobytes() and len(raw) % 16 == 0 and not any(raw[len(data):])


# ------------------------------------------------------------------------------------------ sharded deltas


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": (0.02 * torch.randn(128, 256, generator=g)).bfloat16() for i in range(6)}
    base["norm.weight"] = torch.ones(256).bfloat16()
    ft = {k: perturb(v, "dense", seed=i) for i, (k, v) in enumerate(base.items())}
    ft["head.weight"] = torch.randn(10, 256, generator=g).bfloat16()  # new in the fine-tune: stored whole
    return base, ft


def shard_files(folder, stem="d"):
    return sorted(p.name for p in folder.glob(f"{stem}-*-of-*.xor.safetensors"))


def test_a_delta_past_the_size_limit_is_written_as_shards(tmp_path, pair):
    base, ft = pair
    path = tmp_path / "d.xor.safetensors"
    rep = xorgemm.pack(base, ft, path, max_shard_size="40KB")
    assert not path.exists()
    index = json.loads((tmp_path / "d.xor.safetensors.index.json").read_text())
    names = shard_files(tmp_path)
    assert len(names) > 2 and names[0] == f"d-00001-of-{len(names):05d}.xor.safetensors"
    assert set(index["weight_map"]) == set(ft) and set(index["weight_map"].values()) == set(names)
    assert rep.file_bytes == sum(f.stat().st_size for f in rep.files) and len(rep.files) == len(names) + 1
    assert rep.stream_bytes == xorgemm.load_delta(path).stream_bytes > 0
    for n in names:  # whole tensors per shard, each within the limit unless one tensor alone is larger
        shard = xorgemm.load_delta(tmp_path / n)
        assert shard.file_bytes <= 40_000 + 1000 or len(shard) == 1
    d = xorgemm.load_delta(path)  # the path pack was given reads the sharded form
    assert d.sharded and len(d.shards) == len(names) and set(d) == set(ft)
    assert str(d["layers.3.weight"].file.path).endswith("-of-" + f"{len(names):05d}.xor.safetensors")
    d.check_chunks()
    out = xorgemm.unpack(base, path)
    assert all(torch.equal(out[k].view(torch.int16), ft[k].view(torch.int16)) for k in ft)
    assert xorgemm.verify(base, tmp_path / "d.xor.safetensors.index.json", ft).ok


def test_rewriting_in_the_other_form_leaves_no_stale_files(tmp_path, pair):
    base, ft = pair
    path = tmp_path / "d.xor.safetensors"
    lookalike = tmp_path / "d-00007-of-00009.xor.safetensors"  # no index lists it: never removed
    lookalike.write_bytes(b"someone else's")
    xorgemm.pack(base, ft, path)
    xorgemm.pack(base, ft, path, max_shard_size="40KB")  # the single file would shadow the index
    assert not path.exists() and shard_files(tmp_path)
    xorgemm.pack(base, ft, path, max_shard_size="60KB")  # fewer shards: the old ones go
    index = json.loads((tmp_path / "d.xor.safetensors.index.json").read_text())
    assert shard_files(tmp_path) == sorted(set(index["weight_map"].values()) | {lookalike.name})
    xorgemm.pack(base, ft, path)  # back to one file: the index and shards go
    assert path.is_file() and shard_files(tmp_path) == [lookalike.name]
    assert not (tmp_path / "d.xor.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-00007-of-00009.xor.safetensors", "d.xor.safetensors"]


@pytest.fixture
def sharded(tmp_path, pair):
    xorgemm.pack(*pair, tmp_path / "d.xor.safetensors", max_shard_size="40KB")
    return tmp_path


def test_a_missing_shard_is_named(sharded):
    victim = shard_files(sharded)[1]
    (sharded / victim).unlink()
    with pytest.raises(InputError, match=victim):
        xorgemm.load_delta(sharded / "d.xor.safetensors")


def edit_index(folder, edit):
    p = folder / "d.xor.safetensors.index.json"
    doc = json.loads(p.read_text())
    edit(doc)
    p.write_text(json.dumps(doc))


def test_a_shard_index_that_lies_is_refused(sharded):
    names = shard_files(sharded)
    edit_index(sharded, lambda doc: doc["weight_map"].update({"layers.0.weight": names[-1]}))
    with pytest.raises(DeltaFormatError, match="does not hold the tensors"):
        xorgemm.load_delta(sharded / "d.xor.safetensors")


def test_a_shard_index_pointing_outside_its_folder_is_refused(sharded):
    outside = "../d-00001-of-00002.xor.safetensors"
    edit_index(sharded, lambda doc: doc["weight_map"].update({"layers.0.weight": outside}))
    with pytest.raises(DeltaFormatError, match="not a .xor.safetensors file name in its folder"):
        xorgemm.load_delta(sharded / "d.xor.safetensors")


def test_shards_of_another_base_are_refused(sharded):
    edit_index(sharded, lambda doc: doc["metadata"].update(base_fingerprint="0" * 16))
    with pytest.raises(DeltaFormatError, match="another base"):
        xorgemm.load_delta(sharded / "d.xor.safetensors")


def test_a_shard_index_that_is_not_json_is_refused(sharded):
    (sharded / "d.xor.safetensors.index.json").write_text("{nope")
    with pytest.raises(DeltaFormatError, match="not a JSON shard index"):
        xorgemm.load_delta(sharded / "d.xor.safetensors")


# ------------------------------------------------------------------------------------------ unpack's files


def hf_folder(folder, sd: dict, files: dict[str, list[str]], metadata: dict):
    """A Hugging Face model folder: `files` {shard name: tensor names}, with an index when there are several."""
    folder.mkdir()
    for fname, names in files.items():
        save_file({n: sd[n] for n in names}, folder / fname, metadata=metadata)
    if len(files) > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": {n: f for f, ns in files.items() for n in ns}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def layout_of(folder):
    return {p.name: (Header.read(p).metadata, sorted(Header.read(p).entries)) for p in folder.glob("*.safetensors")}


def same_tensors(folder, sd):
    got = {}
    for p in folder.glob("*.safetensors"):
        got.update(load_file(p))
    return set(got) == set(sd) and all(torch.equal(got[k].view(torch.uint8), sd[k].view(torch.uint8)) for k in sd)


@pytest.fixture
def hf_pair(tmp_path, pair):
    base, ft = pair
    names = list(ft)
    files = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    base_files = {"model-00001-of-00002.safetensors": [n for n in names[:4] if n in base],
                  "model-00002-of-00002.safetensors": [n for n in names[4:] if n in base]}
    b = hf_folder(tmp_path / "base", base, base_files, {"format": "pt"})
    f = hf_folder(tmp_path / "ft", ft, files, {"format": "pt", "trained_by": "someone"})
    return b, f


def test_unpack_writes_the_finetunes_own_files(tmp_path, hf_pair):
    base, ft = hf_pair
    xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")
    rep = xorgemm.unpack_to(base, tmp_path / "d.xor.safetensors", tmp_path / "out")
    assert layout_of(tmp_path / "out") == layout_of(ft)  # the same files, tensors and metadata
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((ft / "model.safetensors.index.json").read_text())["weight_map"]
    assert same_tensors(tmp_path / "out", xorgemm.unpack(base, tmp_path / "d.xor.safetensors"))
    assert rep.tensors == 8 and len(rep.files) == 3
    assert xorgemm.verify(base, tmp_path / "d.xor.safetensors", tmp_path / "out").ok


def test_unpack_falls_back_to_the_bases_files(tmp_path, hf_pair, pair):
    base, _ = hf_pair
    xorgemm.pack(base, pair[1], tmp_path / "d.xor.safetensors")  # from a state dict: no files recorded
    xorgemm.unpack_to(base, tmp_path / "d.xor.safetensors", tmp_path / "out")
    got = layout_of(tmp_path / "out")
    assert sorted(got) == sorted(layout_of(base))
    assert "head.weight" in got["model-00002-of-00002.safetensors"][1]  # new in the fine-tune: with the last
    assert same_tensors(tmp_path / "out", pair[1])


def test_unpack_without_any_files_recorded_writes_one_model_file(tmp_path, pair):
    base, ft = pair
    xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")
    rep = xorgemm.unpack_to(base, tmp_path / "d.xor.safetensors", tmp_path / "out")
    assert rep.files == [tmp_path / "out" / "model.safetensors"]  # what transformers looks for, no index
    assert Header.read(rep.files[0]).metadata == {"format": "pt"}
    assert same_tensors(tmp_path / "out", ft)


def test_unpack_to_shards_of_a_size(tmp_path, hf_pair, pair):
    base, ft = hf_pair
    xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")
    xorgemm.unpack_to(base, tmp_path / "d.xor.safetensors", tmp_path / "out", max_shard_size="150KB")
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((tmp_path / "out" / f).stat().st_size <= 150_000 + 4096 for f in files)
    assert all(m == {"format": "pt", "trained_by": "someone"} for m, _ in layout_of(tmp_path / "out").values())
    assert same_tensors(tmp_path / "out", pair[1])
    assert xorgemm.verify(base, tmp_path / "d.xor.safetensors", tmp_path / "out").ok  # the index is read


def test_unpack_to_one_file(tmp_path, hf_pair, pair):
    base, ft = hf_pair
    xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")
    xorgemm.unpack_to(base, tmp_path / "d.xor.safetensors", tmp_path / "ft.safetensors")
    assert Header.read(tmp_path / "ft.safetensors").metadata == {"format": "pt", "trained_by": "someone"}
    assert torch.equal(load_file(tmp_path / "ft.safetensors")["layers.2.weight"].view(torch.int16),
                       pair[1]["layers.2.weight"].view(torch.int16))
    with pytest.raises(InputError, match="folder of shards"):
        xorgemm.unpack_to(base, tmp_path / "d.xor.safetensors", tmp_path / "x.safetensors", max_shard_size="1MB")


def test_unpacking_into_a_folder_again_replaces_what_the_last_unpack_wrote(tmp_path, pair):
    base, ft = pair
    xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")  # from state dicts: model.safetensors by default
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # the user's: never touched
    xorgemm.unpack_to(base, tmp_path / "d.xor.safetensors", out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    for size in ("40KB", "100KB"):  # shards: model.safetensors, then the first write's extra shards, go
        rep = xorgemm.unpack_to(base, tmp_path / "d.xor.safetensors", out, max_shard_size=size)
        assert sorted(p.name for p in out.iterdir()) == sorted(["config.json"] + [f.name for f in rep.files])
        assert same_tensors(out, ft)
    xorgemm.unpack_to(base, tmp_path / "d.xor.safetensors", out)  # one file again: the index and shards go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_a_failed_unpack_leaves_nothing(tmp_path, hf_pair, pair):
    base, ft = hf_pair
    xorgemm.pack(base, ft, tmp_path / "d.xor.safetensors")
    with pytest.raises(xorgemm.BaseMismatchError):
        xorgemm.unpack_to(ft, tmp_path / "d.xor.safetensors", tmp_path / "out")  # the wrong base
    assert list((tmp_path / "out").iterdir()) == []


def test_sizes_are_read_as_hugging_face_writes_them():
    from xorgemm.packing import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 1024**3 and parse_size(100) == 100
    assert parse_size("1.5 MB") == 1_500_000
    for bad in ("five", "0", "-1GB", "1XB"):
        with pytest.raises(InputError, match="size"):
            parse_size(bad)


# ------------------------------------------------------------------------------------------ peak memory

GIB = 1024**3


def peak_rss(*args) -> int:
    """Runs `xorgemm ARGS` in a process of its own; its peak resident set in bytes (VmHWM counts mapped file
    pages: a map of a model would show)."""
    m = run_measured(*args)
    assert m.code == 0 and m.peak_rss > 0
    return m.peak_rss


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux)")
def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    """A generated Llama-shaped pair of 0.8 GB per model whose largest tensor is 34 MB: every command stays
    within 1 GiB + 3 x the largest tensor, which holding the model (or mapping it) would pass."""
    base, ft = write_llama_pair(tmp_path, layers=6, hidden=2048, intermediate=8192, kv=512, vocab=8192,
                                shard_bytes=300 * 10**6)
    model = sum(f.stat().st_size for f in ft.glob("*.safetensors"))
    largest = max(e[3] for f in ft.glob("*.safetensors") for e in Header.read(f).entries.values())
    bound = GIB + 3 * largest
    assert model > bound - 400 * 2**20  # what the process holds anyway plus the model would break the bound
    delta, out = tmp_path / "ft.xor.safetensors", tmp_path / "out"
    xorgemm.pack(base, ft, delta)
    interpreter = peak_rss("inspect", "--no-check", delta)  # Python, torch and a delta's index: held anyway
    peaks = {"pack": peak_rss("pack", "-q", "--base", base, "--finetuned", ft, "-o", delta),
             "unpack": peak_rss("unpack", "-q", "--base", base, "--delta", delta, "-o", out),
             "verify": peak_rss("verify", "-q", "--base", base, "--delta", delta, "--finetuned", out),
             "inspect": peak_rss("inspect", delta)}
    (tmp_path / "again").symlink_to(ft, target_is_directory=True)  # a second fine-tune, for pack_many
    peaks["pack of 2 fine-tunes"] = peak_rss("pack", "-q", "--base", base, "--finetuned", ft, tmp_path / "again",
                                             "-o", tmp_path / "many")
    assert all(p <= bound for p in peaks.values()), (peaks, bound)
    # What the commands hold beyond the interpreter is what the pipeline admits, far below one model.
    assert all(p - interpreter <= 3 * largest + SLACK_BYTES for p in peaks.values()), (peaks, interpreter)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ft.iterdir())


# ------------------------------------------------------------------------------------------ bad input


def safetensors_with(tmp_path, header: dict, data: bytes):
    import struct

    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


@pytest.mark.parametrize("case,message", [
    ("hole", "hole or an overlap"), ("overlap", "hole or an overlap"), ("trailing", "bytes after its last tensor"),
    ("short", "is truncated"), ("shape", "do not match its shape"), ("dtype", "malformed header entry"),
    ("metadata", "not a map of strings")])
def test_a_malformed_safetensors_checkpoint_is_named(tmp_path, case, message):
    """The checkpoint reader (pread, not safetensors' map) checks the header as strictly as safetensors does."""
    a = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}
    header, data = {"a": a, "b": b}, bytes(32)
    if case == "hole":
        b["data_offsets"] = [20, 36]
        data = bytes(36)
    elif case == "overlap":
        b["data_offsets"] = [8, 24]
    elif case == "trailing":
        data = bytes(40)
    elif case == "short":
        data = bytes(20)
    elif case == "shape":
        b["shape"] = [5]
    elif case == "dtype":
        b["dtype"] = "F31"
    elif case == "metadata":
        header["__metadata__"] = {"format": 1}
    path = safetensors_with(tmp_path, header, data)
    with pytest.raises(InputError, match=message) as e:
        xorgemm.pack(path, path, tmp_path / "d.xor.safetensors")
    assert str(path) in str(e.value)
    assert not list(tmp_path.glob(".d*"))  # no temporary delta left behind


def test_unpack_into_a_path_that_is_a_file_is_refused(tmp_path, pair):
    xorgemm.pack(*pair, tmp_path / "d.xor.safetensors")
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(InputError, match="is a file"):
        xorgemm.unpack_to(pair[0], tmp_path / "d.xor.safetensors", tmp_path / "out")
    with pytest.raises(InputError, match="is a folder"):
        (tmp_path / "dir.safetensors").mkdir()
        xorgemm.unpack_to(pair[0], tmp_path / "d.xor.safetensors", tmp_path / "dir.safetensors")
