"""Every bad input gets a clear xorgemm error naming the file (and tensor), never garbage or a deep crash."""
import json
import pickle
import struct

import numpy as np
import pytest
import torch
import zstandard
from helpers import payload_range
from safetensors.torch import save_file

import xorgemm
from xorgemm.errors import BaseMismatchError, DeltaFormatError, InputError
from xorgemm.format.writer import compress_span, write_delta_file
from xorgemm.testing import perturb


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(130, 70, generator=g).bfloat16(),
            "a.bias": torch.randn(130, generator=g).bfloat16(),
            "b.weight": torch.randn(64, 64, generator=g).bfloat16(),
            "c.weight": torch.randn(256, 128, generator=g).bfloat16()}  # the stream spans several chunks
    ft = {k: perturb(v, "dense", seed=i) for i, (k, v) in enumerate(base.items())}
    return base, ft


@pytest.fixture
def delta(tmp_path, pair):
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack(*pair, path, chunk_bytes=4096)
    return path


def read_container(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    part = lambda k: data[header[k]["data_offsets"][0]:header[k]["data_offsets"][1]]  # noqa: E731
    index = json.loads(zstandard.ZstdDecompressor().decompress(part("index")))
    chunks = np.frombuffer(part("chunks"), dtype="<i8").reshape(-1, 4).copy()
    return index, chunks, part("payload")


def rewrite(path, edit):
    """Re-emits a delta after `edit(index, chunks, payload)` changed it: a crafted, lying file."""
    index, chunks, payload = read_container(path)
    payload = edit(index, chunks, payload) or payload
    write_delta_file(path, index, chunks, payload)


def unpack_error(base, path, exc=DeltaFormatError):
    with pytest.raises(exc) as e:
        xorgemm.unpack(base, path)
    assert str(path) in str(e.value)
    return str(e.value)


def test_truncated_file(delta, pair):
    raw = delta.read_bytes()
    for cut in (4, 100, len(raw) // 2, len(raw) - 1):
        delta.write_bytes(raw[:cut])
        msg = unpack_error(pair[0], delta)
        assert "truncated" in msg or "not a safetensors" in msg


def test_flipped_bytes_in_a_payload_chunk(delta, pair):
    raw = bytearray(delta.read_bytes())
    index, chunks, payload = read_container(delta)
    payload_start = len(raw) - len(payload)
    raw[payload_start + int(chunks[3, 0]) + 40] ^= 0x5A
    delta.write_bytes(bytes(raw))
    msg = unpack_error(pair[0], delta)
    assert "chunk 3 is corrupted" in msg and "tensor '" in msg


def test_every_single_byte_flip_is_caught_or_harmless(delta, pair):
    """Flip each byte of the payload of a small file: unpack must fail cleanly or still be exact."""
    base, ft = pair
    small = {"w": base["b.weight"]}
    path = delta.parent / "small.xor.safetensors"
    xorgemm.pack(small, {"w": ft["b.weight"]}, path)
    raw = path.read_bytes()
    for i in range(0, len(raw), 7):
        bad = bytearray(raw)
        bad[i] ^= 0xFF
        path.write_bytes(bytes(bad))
        try:
            out = xorgemm.unpack(small, path)
        except xorgemm.XorgemmError:
            continue
        assert torch.equal(out["w"].view(torch.int16), ft["b.weight"].view(torch.int16))


def test_header_offsets_outside_the_file(delta, pair):
    raw = delta.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["payload"]["data_offsets"][1] += 1000
    header["payload"]["shape"][0] += 1000
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    delta.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    assert "truncated" in unpack_error(pair[0], delta)


def test_header_length_larger_than_the_file(delta, pair):
    raw = delta.read_bytes()
    delta.write_bytes(struct.pack("<Q", 10 ** 12) + raw[8:])
    assert "truncated or not a safetensors" in unpack_error(pair[0], delta)


def test_span_outside_the_stream(delta, pair):
    rewrite(delta, lambda ix, c, p: ix["tensors"]["a.weight"].update(span=[ix["stream_bytes"], 64]))
    msg = unpack_error(pair[0], delta)
    assert "a.weight" in msg and "outside" in msg


def test_tile_counts_that_do_not_match_the_shape(delta, pair):
    rewrite(delta, lambda ix, c, p: ix["tensors"]["a.weight"].update(shape=[260, 70]))
    msg = unpack_error(pair[0], delta)
    assert "a.weight" in msg and "tile counts" in msg


def test_tile_table_that_lies_about_its_tiles(delta, pair):
    """The tile table inside the stream claims more exceptions than the tile has elements."""
    index, chunks, payload = read_container(delta)
    span = index["tensors"]["b.weight"]["span"]
    stream = bytearray(b"".join(zstandard.ZstdDecompressor().decompress(payload[o:o + n], max_output_size=r)
                                for o, n, r, _ in chunks.tolist()))
    stream[span[0]:span[0] + 4] = struct.pack("<I", 99999)
    f = compress_span(bytes(stream), 4096, 3)
    offsets = np.cumsum([0] + [len(x) for x in f.frames[:-1]])
    table = np.array([offsets, [len(x) for x in f.frames], f.raw_sizes, f.checksums]).T
    index["stream_bytes"] = sum(f.raw_sizes)
    write_delta_file(delta, index, table, b"".join(f.frames))
    msg = unpack_error(pair[0], delta)
    assert "b.weight" in msg and "malformed delta section" in msg


def replace_chunk0(chunks, payload, frame):
    old = int(chunks[0, 1])
    chunks[0, 1] = len(frame)
    chunks[1:, 0] += len(frame) - old
    return frame + payload[old:]


def test_chunk_that_decompresses_larger_than_declared(delta, pair):
    """A frame without a size claim that inflates past the table's raw size: stopped at that size."""
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 2 ** 20)
    rewrite(delta, lambda ix, chunks, payload: replace_chunk0(chunks, payload, frame))
    assert "chunk 0 is corrupted" in unpack_error(pair[0], delta)


def test_chunk_whose_frame_claims_a_huge_size(delta, pair):
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 2 ** 20)
    rewrite(delta, lambda ix, chunks, payload: replace_chunk0(chunks, payload, frame))
    assert "claims 1048576 decompressed bytes" in unpack_error(pair[0], delta)


def test_declared_chunk_size_limit(delta, pair):
    rewrite(delta, lambda ix, c, p: ix.update(chunk_bytes=1 << 40))
    assert "chunk size" in unpack_error(pair[0], delta)


def test_unknown_format_version(delta, pair):
    raw = delta.read_bytes()
    assert b'"format_version":"2"' in raw  # dense bf16 deltas: conditioned tiles, so version 2
    delta.write_bytes(raw.replace(b'"format_version":"2"', b'"format_version":"7"', 1))
    assert "format version '7'" in unpack_error(pair[0], delta)


def test_a_version_that_does_not_declare_its_codecs(delta, pair):
    """A version 1 file has no conditioned tiles: one that claims version 1 with five codecs is refused."""
    raw = delta.read_bytes()
    delta.write_bytes(raw.replace(b'"format_version":"2"', b'"format_version":"1"', 1))
    assert "format version 1 has ['zero', 'sparse', 'byteplane', 'raw']" in unpack_error(pair[0], delta)


def test_unknown_codec_table(delta, pair):
    rewrite(delta, lambda ix, c, p: ix.update(codecs=["zero", "sparse", "huffman", "raw"]))
    assert "codecs" in unpack_error(pair[0], delta)


def test_wrong_base(delta, pair):
    base, _ = pair
    other = {k: perturb(v, "sparse", seed=99) for k, v in base.items()}
    msg = unpack_error(other, delta, BaseMismatchError)
    assert "base bytes do not match" in msg and "tensor '" in msg


def test_base_with_other_shape_or_dtype(delta, pair):
    base, _ = pair
    msg = unpack_error({**base, "a.weight": torch.zeros(70, 130).bfloat16()}, delta, BaseMismatchError)
    assert "a.weight" in msg and "[70, 130]" in msg
    msg = unpack_error({**base, "a.weight": base["a.weight"].float()}, delta, BaseMismatchError)
    assert "a.weight" in msg and "F32" in msg


def test_base_missing_a_tensor(delta, pair):
    base, _ = pair
    msg = unpack_error({k: v for k, v in base.items() if k != "a.bias"}, delta, BaseMismatchError)
    assert "a.bias" in msg


def test_not_a_safetensors_file(tmp_path, pair):
    p = tmp_path / "junk.xor.safetensors"
    p.write_bytes(b"hello, this is not a delta file at all" * 10)
    assert "not a safetensors" in unpack_error(pair[0], p) or "truncated" in unpack_error(pair[0], p)
    plain = tmp_path / "plain.safetensors"
    save_file(pair[0], plain)
    assert "not an xorgemm delta" in unpack_error(pair[0], plain)


def test_pickle_files_are_refused_unread(tmp_path, pair):
    p = tmp_path / "evil.xor.safetensors"
    p.write_bytes(pickle.dumps({"x": 1}))
    assert "pickle" in unpack_error(pair[0], p)
    ckpt = tmp_path / "model.bin"
    torch.save(pair[0], ckpt)
    with pytest.raises(InputError, match="pickle"):
        xorgemm.pack(ckpt, pair[1], tmp_path / "out.xor.safetensors")
    renamed = tmp_path / "model.safetensors"
    torch.save(pair[0], renamed)
    with pytest.raises(InputError, match="pickle"):
        xorgemm.pack(renamed, pair[1], tmp_path / "out.xor.safetensors")
    assert not (tmp_path / "out.xor.safetensors").exists()


def test_base_and_finetune_of_different_dtypes(tmp_path, pair):
    base, ft = pair
    out = tmp_path / "out.xor.safetensors"
    with pytest.raises(InputError, match="a.weight.*BF16.*F32|a.weight.*F32.*BF16"):
        xorgemm.pack({**base, "a.weight": base["a.weight"].float()}, ft, out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_missing_inputs(tmp_path, pair):
    with pytest.raises(InputError, match="no such file"):
        xorgemm.pack(tmp_path / "nope.safetensors", pair[1], tmp_path / "o.xor.safetensors")
    with pytest.raises(InputError, match="no such file"):
        xorgemm.load_delta(tmp_path / "nope.xor.safetensors")
    with pytest.raises(InputError, match="does not exist"):
        xorgemm.pack(*pair, tmp_path / "no" / "dir" / "o.xor.safetensors")
    with pytest.raises(InputError, match="no .safetensors"):
        xorgemm.pack(tmp_path, pair[1], tmp_path / "o.xor.safetensors")


def test_bad_pack_arguments(tmp_path, pair):
    with pytest.raises(InputError, match="zstd level"):
        xorgemm.pack(*pair, tmp_path / "o.xor.safetensors", level=40)
    with pytest.raises(InputError, match="chunk size"):
        xorgemm.pack(*pair, tmp_path / "o.xor.safetensors", chunk_bytes=10)
    with pytest.raises(InputError, match="multiple of 16"):  # chunks would not keep the spans aligned
        xorgemm.pack(*pair, tmp_path / "o.xor.safetensors", chunk_bytes=4100)
    with pytest.raises(InputError, match="tile shape"):
        xorgemm.pack(*pair, tmp_path / "o.xor.safetensors", tile=(512, 512))


def test_corrupted_input_safetensors(tmp_path, pair):
    p = tmp_path / "base.safetensors"
    save_file(pair[0], p)
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(InputError, match="base.safetensors"):
        xorgemm.pack(p, pair[1], tmp_path / "o.xor.safetensors")


def test_header_length_that_looks_like_a_pickle_opcode(delta, pair):
    """A header of 0x380 bytes starts the file with 0x80 0x03, the bytes a protocol-3 pickle starts with."""
    rewrite(delta, lambda ix, c, p: None)  # with its header as short as it can be (pack reserves a page)
    raw = delta.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n < 0x380
    delta.write_bytes(struct.pack("<Q", 0x380) + raw[8:8 + n] + b" " * (0x380 - n) + raw[8 + n:])
    assert delta.read_bytes()[:2] == b"\x80\x03"
    assert xorgemm.verify(pair[0], delta, pair[1]).ok


def test_unsupported_dtype_names_the_tensor(tmp_path):
    base = {"w": torch.zeros(4, dtype=torch.complex64)}
    with pytest.raises(InputError, match="tensor 'w'.*complex64"):
        xorgemm.pack(base, base, tmp_path / "o.xor.safetensors")


def test_verify_false_still_checks_shape_and_chunks(delta, pair):
    d = xorgemm.load_delta(delta)
    with pytest.raises(BaseMismatchError, match="a.weight"):
        d["a.weight"].apply(torch.zeros(70, 130).bfloat16(), verify=False)


def test_tile_integers_beyond_int64_are_a_format_error(delta, pair):
    """A crafted index whose tile shape does not even fit the native integers: refused by name, no traceback."""
    def edit(index, chunks, payload):
        name = next(n for n, e in index["tensors"].items() if e["kind"] == "xor")
        index["tensors"][name]["tile"] = [2 ** 64, 1]

    rewrite(delta, edit)
    with pytest.raises(DeltaFormatError, match="tile shape") as e:
        xorgemm.load_delta(delta)
    assert str(delta) in str(e.value)


def test_check_chunks_finds_a_corrupted_chunk_up_front(delta):
    d = xorgemm.load_delta(delta)
    d.check_chunks()  # a good file passes
    raw = bytearray(delta.read_bytes())
    raw[payload_range(delta)[1] - 10] ^= 0xFF  # inside the last chunk
    delta.write_bytes(bytes(raw))
    with pytest.raises(DeltaFormatError, match=r"chunk \d+ is corrupted") as e:
        xorgemm.load_delta(delta).check_chunks()
    assert str(delta) in str(e.value)
