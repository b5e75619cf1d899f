"""Decompressing a delta file's zstd chunks on the GPU with nvCOMP (the optional `xorgemm[cuda]` extra).

The chunks are independent zstd frames (docs/format.md), which is what nvCOMP's batched zstd decoder takes:
one host-to-device copy of the compressed bytes, one batched decode on the current stream. Without nvCOMP,
or with XORGEMM_DECOMPRESS=cpu, the `zstandard` package decodes them on the CPU and the bytes are copied
over; both give the same bytes (tests/test_cuda.py checks it on a GPU).

What is checked on the GPU path: nvCOMP's per-frame status and every frame's decompressed size against the
chunk table; then the section's tile table is read back and checked (xorgemm._C.table_offsets). The XXH3
chunk checksums are checked on the CPU path only (`xorgemm verify` checks a whole file).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from xorgemm.errors import DeltaFormatError, InputError

_CHOICES = ("auto", "nvcomp", "cpu")


def nvcomp_available() -> bool:
    try:
        from nvidia import nvcomp  # noqa: F401
    except ImportError:
        return False
    return True


def decompressor_for(device: torch.device) -> str:
    """"nvcomp" or "cpu": who decompresses chunks bound for `device` (XORGEMM_DECOMPRESS=auto|nvcomp|cpu)."""
    choice = os.environ.get("XORGEMM_DECOMPRESS", "auto")
    if choice not in _CHOICES:
        raise InputError(f"XORGEMM_DECOMPRESS must be one of {', '.join(_CHOICES)}, got {choice!r}")
    if torch.device(device).type != "cuda" or choice == "cpu":
        return "cpu"
    if nvcomp_available():
        return "nvcomp"
    if choice == "nvcomp":
        raise InputError("XORGEMM_DECOMPRESS=nvcomp but nvCOMP is not installed: pip install 'xorgemm[cuda]'")
    return "cpu"


def _align16(n: int) -> int:
    return -(-n // 16) * 16


def decompress_on_gpu(frames: list, raw_sizes: list[int], device, where: str) -> torch.Tensor:
    """Decompresses independent zstd `frames` on `device` with nvCOMP; returns their raw bytes concatenated
    (uint8 on the device). `where` names the file (and tensor) in errors."""
    from nvidia import nvcomp

    device = torch.device(device)
    stream = torch.cuda.current_stream(device)
    # Frames packed 16-byte aligned into one pinned buffer: one copy, and nvCOMP's alignment is met.
    comp_offsets, pos = [], 0
    for f in frames:
        comp_offsets.append(pos)
        pos = _align16(pos + len(f))
    host = torch.empty(max(pos, 16), dtype=torch.uint8, pin_memory=True)
    h = host.numpy()
    for off, f in zip(comp_offsets, frames):
        h[off:off + len(f)] = np.frombuffer(f, dtype=np.uint8)
    out_offsets, pos = [], 0
    for n in raw_sizes:
        out_offsets.append(pos)
        pos = _align16(pos + n)
    with torch.cuda.device(device):
        comp = host.to(device, non_blocking=True)
        out = torch.empty(max(pos, 16), dtype=torch.uint8, device=device)
        s = stream.cuda_stream
        try:
            codec = nvcomp.Codec(algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW, device_id=device.index or 0,
                                 cuda_stream=s)
            src = nvcomp.as_arrays(comp, comp_offsets, [len(f) for f in frames], cuda_stream=s)
            dst = nvcomp.as_arrays(out, out_offsets, list(raw_sizes), cuda_stream=s)
            got = codec.decode(src, out=dst).buffer_sizes  # waits for the decode: `host` may go after this
        except (RuntimeError, ValueError) as e:
            raise DeltaFormatError(f"{where}: nvCOMP could not decompress the chunks ({e}); XORGEMM_DECOMPRESS=cpu "
                                   "decodes them with zstandard instead") from None
    for i, (g, want) in enumerate(zip(got, raw_sizes)):
        if g != want:
            raise DeltaFormatError(f"{where}: chunk {i} of the span decompressed to {g} bytes on the GPU, the chunk "
                                   f"table says {want}: the file is corrupted")
    if all(n % 16 == 0 for n in raw_sizes[:-1]):  # the chunks sit back to back already (64 KiB chunks)
        return out[: sum(raw_sizes)]
    return torch.cat([out[o:o + n] for o, n in zip(out_offsets, raw_sizes)])
