"""The `xorgemm` command end to end, as a user runs it (a subprocess), good input and bad."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from helpers import payload_range
from safetensors.torch import load_file, save_file

from xorgemm.testing import perturb, seed_scenario, state_dict_of


def run(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "xorgemm", *map(str, args)], capture_output=True, text=True, timeout=120)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    base, ft = seed_scenario()
    save_file(state_dict_of(base), d / "base.safetensors")
    save_file(state_dict_of(ft), d / "ft.safetensors")
    run("pack", "--base", d / "base.safetensors", "--finetuned", d / "ft.safetensors", "-o", d / "ft.xor.safetensors")
    return d


def test_pack_prints_a_summary_and_json(files):
    out = run("pack", "--base", files / "base.safetensors", "--finetuned", files / "ft.safetensors",
              "-o", files / "again.xor.safetensors", "--level", "19", "--json")
    s = json.loads(out.stdout)
    assert s["tensors"] == 12 and s["kinds"]["xor"] == 12 and s["file_bytes"] <= 7009
    text = run("pack", "--base", files / "base.safetensors", "--finetuned", files / "ft.safetensors",
               "-o", files / "again.xor.safetensors", "-q").stdout
    assert text.startswith("wrote ") and "12 tensors" in text


def test_inspect_table_and_json(files):
    out = run("inspect", files / "ft.xor.safetensors").stdout
    assert "sparse/byteplane/raw" in out and "self_attn.in_proj_weight" in out and "12 tensors" in out
    top = run("inspect", files / "ft.xor.safetensors", "--top", "2").stdout
    assert "self_attn.in_proj_weight" in top and "ln1.bias" not in top and "10 smaller tensors not shown" in top
    s = json.loads(run("inspect", files / "ft.xor.safetensors", "--json").stdout)
    row = {r["name"]: r for r in s["tensors"]}["self_attn.in_proj_weight"]
    assert row["tiles"] == 3 and row["codecs"]["sparse"] == 3 and row["shape"] == [192, 64]
    assert s["totals"]["file_bytes"] == (files / "ft.xor.safetensors").stat().st_size


def test_unpack_and_verify(files):
    run("unpack", "--base", files / "base.safetensors", "--delta", files / "ft.xor.safetensors", "-o",
        files / "rebuilt.safetensors")
    got, want = load_file(files / "rebuilt.safetensors"), load_file(files / "ft.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want) and set(got) == set(want)
    out = run("verify", "--base", files / "base.safetensors", "--delta", files / "ft.xor.safetensors",
              "--finetuned", files / "ft.safetensors")
    assert out.stdout.startswith("OK: 12 tensors")


def test_sharded_delta_and_unpack_into_a_folder(files, tmp_path):
    """--max-shard-size on pack writes shards and their index; every command takes the one path; unpack into a
    folder writes the fine-tune's file (its name and metadata), or shards of a size."""
    out = run("pack", "--base", files / "base.safetensors", "--finetuned", files / "ft.safetensors", "-o",
              tmp_path / "d.xor.safetensors", "--max-shard-size", "4KB", "--json")
    s = json.loads(out.stdout)
    assert len(s["files"]) > 2 and s["files"][-1].endswith("d.xor.safetensors.index.json")
    assert not (tmp_path / "d.xor.safetensors").exists()
    p = run("inspect", tmp_path / "d.xor.safetensors")
    assert f"in {len(s['files']) - 1} shards" in p.stdout
    run("unpack", "--base", files / "base.safetensors", "--delta", tmp_path / "d.xor.safetensors", "-o",
        tmp_path / "ft")
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == ["ft.safetensors", "model.safetensors.index.json"]
    got, want = load_file(tmp_path / "ft" / "ft.safetensors"), load_file(files / "ft.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    run("unpack", "--base", files / "base.safetensors", "--delta", tmp_path / "d.xor.safetensors", "-o",
        tmp_path / "shards", "--max-shard-size", "40KB")
    assert len(list((tmp_path / "shards").glob("model-*-of-*.safetensors"))) >= 3
    out = run("verify", "--base", files / "base.safetensors", "--delta", tmp_path / "d.xor.safetensors",
              "--finetuned", tmp_path / "shards")
    assert out.stdout.startswith("OK: 12 tensors")
    p = run("unpack", "--base", files / "base.safetensors", "--delta", tmp_path / "d.xor.safetensors", "-o",
            tmp_path / "x.safetensors", "--max-shard-size", "1MB", ok=False)
    assert p.returncode == 2 and "folder of shards" in p.stderr
    p = run("pack", "--base", files / "base.safetensors", "--finetuned", files / "ft.safetensors", "-o",
            tmp_path / "e.xor.safetensors", "--max-shard-size", "lots", ok=False)
    assert p.returncode == 2 and "is not a number of bytes" in p.stderr


def test_verify_mismatch_exits_1(files):
    other = load_file(files / "ft.safetensors")
    other["ln1.weight"] = perturb(other["ln1.weight"], "sparse", seed=5)
    save_file(other, files / "other.safetensors")
    p = run("verify", "--base", files / "base.safetensors", "--delta", files / "ft.xor.safetensors",
            "--finetuned", files / "other.safetensors", ok=False)
    assert p.returncode == 1 and "'ln1.weight'" in p.stdout


@pytest.mark.parametrize("case", ["truncated", "wrong_base", "pickle", "missing", "not_delta"])
def test_bad_input_is_one_clear_line(files, case):
    d = files
    delta = d / "ft.xor.safetensors"
    if case == "truncated":
        (d / "cut.xor.safetensors").write_bytes(delta.read_bytes()[:3000])
        args = ("unpack", "--base", d / "base.safetensors", "--delta", d / "cut.xor.safetensors")
    elif case == "wrong_base":
        args = ("unpack", "--base", d / "ft.safetensors", "--delta", delta)
    elif case == "pickle":
        torch.save({"w": torch.zeros(2)}, d / "model.bin")
        args = ("pack", "--base", d / "model.bin", "--finetuned", d / "ft.safetensors")
    elif case == "missing":
        args = ("unpack", "--base", d / "base.safetensors", "--delta", d / "nope.xor.safetensors")
    else:
        args = ("unpack", "--base", d / "base.safetensors", "--delta", d / "base.safetensors")
    out = d / f"out_{case}.safetensors"
    p = run(*args, "-o", out, ok=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xorgemm: error: "), p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists() and not list(d.glob(f".out_{case}*"))


def test_help_explains_every_flag():
    out = run("pack", "--help").stdout
    for flag in ("--base", "--finetuned", "--output", "--level", "--tile", "--chunk-kib", "--json", "--quiet"):
        assert flag in out
    assert "inspect" in run("--help").stdout


def test_bad_tile_argument_is_a_usage_error(files):
    p = run("pack", "--base", files / "base.safetensors", "--finetuned", files / "ft.safetensors", "-o",
            files / "x.xor.safetensors", "--tile", "big", ok=False)
    assert p.returncode == 2 and "ROWSxCOLS" in p.stderr


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_the_umask(files, umask, mode):
    """Outputs get 0666 less the umask, as a plain open() would give them, though written through a
    temporary file (which mkstemp makes 0600)."""
    old = os.umask(umask)
    try:
        run("pack", "--base", files / "base.safetensors", "--finetuned", files / "ft.safetensors",
            "-o", files / f"mode{mode:o}.xor.safetensors", "-q")
        run("unpack", "--base", files / "base.safetensors", "--delta", files / f"mode{mode:o}.xor.safetensors",
            "-o", files / f"mode{mode:o}.safetensors", "-q")
    finally:
        os.umask(old)
    for name in (f"mode{mode:o}.xor.safetensors", f"mode{mode:o}.safetensors"):
        assert stat.S_IMODE((files / name).stat().st_mode) == mode, name


def test_output_naming_a_folder_says_so(files):
    (files / "adir").mkdir(exist_ok=True)
    p = run("pack", "--base", files / "base.safetensors", "--finetuned", files / "ft.safetensors",
            "-o", files / "adir", ok=False)
    assert p.returncode == 2 and "is a folder" in p.stderr and ".tmp" not in p.stderr, p.stderr
    assert not list(files.glob(".adir*"))


def test_inspect_checks_the_file(files):
    """One byte flipped in a chunk: inspect's default check finds it (exit 2, one line naming the file);
    --no-check prints the table from the index alone."""
    data = bytearray((files / "ft.xor.safetensors").read_bytes())
    data[payload_range(files / "ft.xor.safetensors")[1] - 200] ^= 0x5A  # inside the payload
    bad = files / "flipped.xor.safetensors"
    bad.write_bytes(bytes(data))
    p = run("inspect", bad, ok=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and str(bad) in lines[0] and "corrupted" in lines[0], p.stderr
    assert "12 tensors" in run("inspect", bad, "--no-check").stdout


def test_wrong_base_names_the_base_given(files):
    p = run("unpack", "--base", files / "ft.safetensors", "--delta", files / "ft.xor.safetensors", "-o",
            files / "never.safetensors", ok=False)
    assert p.returncode == 2 and "base bytes do not match" in p.stderr
    assert str(files / "ft.safetensors") in p.stderr and str(files / "ft.xor.safetensors") in p.stderr, p.stderr


def test_pack_several_finetunes_into_a_folder(files):
    """Two good fine-tunes and one of another dtype: the good ones written as <name>.xor.safetensors, the
    bad one reported on one line and skipped, exit 2."""
    good = load_file(files / "ft.safetensors")
    save_file({k: perturb(v, "sparse", seed=11) for k, v in good.items()}, files / "second.safetensors")
    save_file({k: v.double() for k, v in good.items()}, files / "wrongdtype.safetensors")
    out = files / "many"
    p = run("pack", "--base", files / "base.safetensors", "--finetuned", files / "ft.safetensors",
            files / "second.safetensors", files / "wrongdtype.safetensors", "-o", out, ok=False)
    assert p.returncode == 2, p.stderr
    errors = p.stderr.strip().splitlines()
    assert len(errors) == 1 and "'wrongdtype' skipped" in errors[0] and "Traceback" not in p.stderr, p.stderr
    assert sorted(f.name for f in out.iterdir()) == ["ft.xor.safetensors", "second.xor.safetensors"]
    assert p.stdout.count("wrote ") == 2
    run("verify", "--base", files / "base.safetensors", "--delta", out / "second.xor.safetensors",
        "--finetuned", files / "second.safetensors")
