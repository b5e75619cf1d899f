"""The `xorgemm` command: pack, unpack, inspect and verify lossless XOR deltas of fine-tunes.

Bad input ends with one line on stderr naming the file and tensor, and a non-zero exit code:
2 for unusable input or a malformed file, 1 when `verify` finds a difference.
"""
from __future__ import annotations

import argparse
import json
import sys

EXIT_MISMATCH = 1
EXIT_ERROR = 2


def _tile(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile shape {text!r} is not ROWSxCOLS, e.g. 64x64") from None
    return r, c


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xorgemm",
        description="Store fine-tunes losslessly as tiled XOR deltas against their base model. Inputs are "
                    ".safetensors files or Hugging Face model folders (sharded safetensors); pickle checkpoints "
                    "are refused.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pk = sub.add_parser("pack", help="write a fine-tune as an XOR delta against its base",
                        description="XOR every fine-tuned tensor against its base, tile it, encode each tile with "
                                    "the smallest codec and compress the stream in independent zstd chunks.")
    pk.add_argument("--base", required=True, help="base weights: a .safetensors file or a model folder")
    pk.add_argument("--finetuned", required=True, nargs="+", metavar="FT",
                    help="fine-tuned weights: a .safetensors file or a model folder; several fine-tunes of one "
                         "base are packed in one pass that reads each base tensor once")
    pk.add_argument("-o", "--output", required=True,
                    help="the delta file to write (e.g. ft.xor.safetensors), written atomically; with several "
                         "fine-tunes, a folder that receives <name>.xor.safetensors for each (the name of its "
                         "folder or file)")
    pk.add_argument("--level", type=int, default=3, help="zstd level of the chunks, 1-22 (default 3: fast to pack; "
                                                         "19 is ~2-5%% smaller and much slower)")
    pk.add_argument("--tile", type=_tile, default=(64, 64),
                    help="tile shape ROWSxCOLS for 2-D tensors (default 64x64; at most 65536 elements); 1-D "
                         "tensors use one row of as many elements")
    pk.add_argument("--chunk-kib", type=int, default=64,
                    help="uncompressed size of each zstd chunk in KiB (default 64, the unit nvCOMP decompresses)")
    pk.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="a delta larger than this is written as shards of whole tensors, NAME-00001-of-0000N."
                         "xor.safetensors, with NAME.xor.safetensors.index.json; every command reads either form "
                         "by the path NAME.xor.safetensors (default 5GB; e.g. 500MB, 2GiB)")
    _common(pk)

    up = sub.add_parser("unpack", help="rebuild the fine-tuned weights, bit for bit",
                        description="Apply a delta to its base and write the fine-tuned weights as .safetensors, "
                                    "a few tensors at a time. Into a folder, the files are the fine-tune's own (its "
                                    "shards and model.safetensors.index.json, each file's metadata kept), or the "
                                    "base's when the delta did not record them. The base is checked against the "
                                    "hashes the delta recorded.")
    up.add_argument("--base", required=True, help="the base the delta was made from")
    up.add_argument("--delta", required=True, help="the delta (NAME.xor.safetensors, one file or sharded)")
    up.add_argument("-o", "--output", required=True,
                    help="a folder to write the fine-tune's files into (created if missing), or one .safetensors "
                         "file; every file is written atomically")
    up.add_argument("--max-shard-size", metavar="SIZE",
                    help="write shards model-0000i-of-0000N.safetensors of at most SIZE (e.g. 5GB) into the "
                         "output folder instead of the fine-tune's own files")
    _common(up)

    ins = sub.add_parser("inspect", help="per-tensor table of a delta: tiles, zero tiles, codec mix, bytes, ratio",
                         description="Validate a delta file and show, per tensor, its tiles, how many are all-zero, "
                                     "the codec mix, its stored and on-disk bytes and the ratio to the tensor's "
                                     "bytes; then totals.")
    ins.add_argument("delta", help="the delta (NAME.xor.safetensors, one file or sharded)")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.add_argument("--top", type=int, metavar="N", help="list only the N tensors taking the most disk bytes "
                                                          "(totals still cover every tensor)")
    ins.add_argument("--no-check", action="store_true",
                     help="skip reading every chunk (checksums) and validating every tile section; by default a "
                          "corrupted delta is an error (exit 2)")

    ver = sub.add_parser("verify", help="prove a delta rebuilds the fine-tune exactly",
                         description="Rebuild every tensor from base + delta and compare it byte for byte with the "
                                     "fine-tune. Exit 0 if identical, 1 if not.")
    ver.add_argument("--base", required=True, help="the base the delta was made from")
    ver.add_argument("--delta", required=True, help="the delta (NAME.xor.safetensors, one file or sharded)")
    ver.add_argument("--finetuned", required=True, help="the fine-tune to compare against")
    _common(ver)
    return p


def _common(p):
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _pack_summary(rep, seconds: float) -> dict:
    kinds = {k: sum(1 for t in rep.tensors if t.kind == k) for k in ("xor", "same", "whole")}
    return {"output": str(rep.path), "files": [str(f) for f in rep.files], "tensors": len(rep.tensors), "kinds": kinds,
            "finetuned_bytes": rep.finetuned_bytes, "file_bytes": rep.file_bytes, "ratio": rep.ratio,
            "seconds": seconds, "mb_per_s": rep.finetuned_bytes / 1e6 / max(seconds, 1e-9)}


def _pack_line(s: dict) -> str:
    k = s["kinds"]
    shards = f" ({len(s['files']) - 1} shards and their index)" if len(s["files"]) > 1 else ""
    return (f"wrote {s['output']}{shards}: {_human(s['file_bytes'])} for {_human(s['finetuned_bytes'])} of weights "
            f"({100 * s['ratio']:.2f}%), {s['tensors']} tensors ({k['xor']} delta, {k['same']} unchanged, "
            f"{k['whole']} stored whole) in {s['seconds']:.2f} s ({s['mb_per_s']:.0f} MB/s)")


def cmd_pack(a) -> int:
    import xorgemm

    kw = dict(tile=a.tile, level=a.level, chunk_bytes=a.chunk_kib * 1024, progress=not a.quiet and not a.json,
              max_shard_size=a.max_shard_size)
    if len(a.finetuned) == 1:
        rep = xorgemm.pack(a.base, a.finetuned[0], a.output, **kw)
        summary = _pack_summary(rep, rep.seconds)
        print(json.dumps(summary, indent=2) if a.json else _pack_line(summary))
        return 0
    many = xorgemm.pack_many(a.base, a.finetuned, a.output, **kw)
    # One pass serves them all: each delta's time is the pass's.
    written = {name: _pack_summary(rep, many.seconds) for name, rep in many.reports.items()}
    if a.json:
        print(json.dumps({"written": written, "failed": many.failed, "seconds": many.seconds}, indent=2))
    else:
        for s in written.values():
            print(_pack_line(s))
    for name, error in many.failed.items():
        print(f"xorgemm: error: fine-tune {name!r} skipped: {error}", file=sys.stderr)
    return 0 if many.ok else EXIT_ERROR


def cmd_unpack(a) -> int:
    import xorgemm

    rep = xorgemm.unpack_to(a.base, a.delta, a.output, max_shard_size=a.max_shard_size,
                            progress=not a.quiet and not a.json)
    if a.json:
        print(json.dumps({"output": a.output, "files": [str(f) for f in rep.files], "tensors": rep.tensors,
                          "bytes": rep.nbytes, "seconds": rep.seconds}, indent=2))
    else:
        what = f"{len(rep.files)} files" if len(rep.files) > 1 else rep.files[0].name
        print(f"wrote {a.output} ({what}): {rep.tensors} tensors, {_human(rep.nbytes)} in {rep.seconds:.2f} s")
    return 0


def inspect_rows(d) -> list[dict]:
    from xorgemm.format.layout import CODEC_NAMES, dtype_name

    rows = []
    for name, t in d.tensors.items():
        disk = d.compressed_share(name)
        codecs = dict(zip(CODEC_NAMES, t.tile_counts))
        rows.append({
            "name": name, "kind": t.kind + (f" ({t.reason})" if t.reason else ""), "dtype": dtype_name(t.dtype),
            "shape": list(t.shape), "tile": list(t.tile) if t.tile else None,
            "tiles": sum(t.tile_counts), "zero_tiles": codecs.get("zero", 0), "codecs": codecs, "bytes": t.nbytes,
            "stored_bytes": t.span[1],
            "disk_bytes": round(disk), "ratio": disk / max(1, t.nbytes)})
    return rows


def cmd_inspect(a) -> int:
    import xorgemm

    d = xorgemm.load_delta(a.delta)
    if not a.no_check:  # every chunk's checksum, then every section's tiles: what a load would meet
        d.check_chunks()
        for t in d.tensors.values():
            if t.kind == "xor":
                t.section()
    rows = inspect_rows(d)
    total = sum(r["bytes"] for r in rows)
    file_bytes = d.file_bytes
    totals = {"tensors": len(rows), "tiles": sum(r["tiles"] for r in rows),
              "zero_tiles": sum(r["zero_tiles"] for r in rows), "bytes": total,
              "stored_bytes": d.stream_bytes, "payload_bytes": d.compressed_bytes, "file_bytes": file_bytes,
              "ratio": file_bytes / max(1, total), "chunks": d.n_chunks, "shards": len(d.shards)}
    if a.json:
        print(json.dumps({"file": str(d.path), "format_version": d.format_version, "tensors": rows, "totals": totals},
                         indent=2))
        return 0
    from xorgemm.format.layout import CODEC_NAMES

    stored_codecs = [c for c in CODEC_NAMES if c != "zero"]  # zero tiles have their own column
    head = ("tensor", "kind", "dtype", "shape", "tiles", "zero", "/".join(stored_codecs), "stored", "disk", "ratio")
    table = [head]
    shown = sorted(rows, key=lambda r: -r["disk_bytes"])[:a.top] if a.top else rows
    for r in shown:
        c = r["codecs"]
        table.append((r["name"], r["kind"], r["dtype"], "x".join(map(str, r["shape"])) or "()", str(r["tiles"]),
                      str(r["zero_tiles"]), "/".join(str(c[k]) for k in stored_codecs), _human(r["stored_bytes"]),
                      _human(r["disk_bytes"]), f"{100 * r['ratio']:.2f}%"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(v.ljust(w) if j < 4 else v.rjust(w) for j, (v, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} smaller tensors not shown (--top {a.top})")
    print(f"\n{d.path}: {totals['tensors']} tensors, {totals['tiles']} tiles ({totals['zero_tiles']} all-zero, "
          f"skipped), {_human(total)} of weights in {_human(file_bytes)} on disk ({100 * totals['ratio']:.2f}%), "
          f"{totals['chunks']} zstd chunks" + (f" in {totals['shards']} shards" if totals["shards"] > 1 else ""))
    return 0


def cmd_verify(a) -> int:
    import xorgemm

    rep = xorgemm.verify(a.base, a.delta, a.finetuned, progress=not a.quiet and not a.json)
    if a.json:
        print(json.dumps({"ok": rep.ok, "checked": rep.checked, "mismatched": rep.mismatched,
                          "missing_in_delta": rep.missing_in_delta, "extra_in_delta": rep.extra_in_delta}, indent=2))
    elif rep.ok:
        print(f"OK: {rep.checked} tensors rebuilt bit for bit")
    else:
        for n in rep.mismatched:
            print(f"{a.delta}: tensor '{n}': rebuilt bytes differ from {a.finetuned}")
        for n in rep.missing_in_delta:
            print(f"{a.delta}: tensor '{n}' of {a.finetuned} is missing from the delta")
        for n in rep.extra_in_delta:
            print(f"{a.delta}: tensor '{n}' is not in {a.finetuned}")
    return 0 if rep.ok else EXIT_MISMATCH


COMMANDS = {"pack": cmd_pack, "unpack": cmd_unpack, "inspect": cmd_inspect, "verify": cmd_verify}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import os

    from xorgemm.errors import XorgemmError

    if os.environ.get("XORGEMM_THREADS"):  # the command's threads, and torch's (a large tensor's encode)
        import torch

        from xorgemm._threads import threads

        try:
            torch.set_num_threads(threads())
        except XorgemmError as e:
            print(f"xorgemm: error: {e}", file=sys.stderr)
            return EXIT_ERROR

    try:
        return COMMANDS[args.command](args)
    except XorgemmError as e:
        print(f"xorgemm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # disk full, permissions: the OS's words, with the path
        print(f"xorgemm: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("xorgemm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
