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


class GpuZstdBatch:
    """Independent zstd frames made resident on a GPU once and decompressed there by nvCOMP in one batched
    call, as often as asked: the loader decodes once; the unfused benchmark baseline on every call.
    `where` names the file (and tensor) in errors."""

    def __init__(self, frames: list, raw_sizes: list[int], device, where: str):
        from nvidia import nvcomp

        self.device, self.where, self.raw_sizes = torch.device(device), where, list(raw_sizes)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        # Frames packed 16-byte aligned into one pinned buffer: one copy, and nvCOMP's alignment is met.
        comp_offsets, pos = [], 0
        for f in frames:
            comp_offsets.append(pos)
            pos = _align16(pos + len(f))
        host = torch.empty(max(pos, 16), dtype=torch.uint8, pin_memory=True)
        h = host.numpy()
        for off, f in zip(comp_offsets, frames):
            h[off:off + len(f)] = np.frombuffer(f, dtype=np.uint8)
        self.out_offsets, pos = [], 0
        for n in self.raw_sizes:
            self.out_offsets.append(pos)
            pos = _align16(pos + n)
        with torch.cuda.device(self.device):
            self.comp = host.to(self.device, non_blocking=True)
            self.out = torch.empty(max(pos, 16), dtype=torch.uint8, device=self.device)
            try:
                self.codec = nvcomp.Codec(algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW,
                                          device_id=self.device.index or 0, cuda_stream=stream)
                self.src = nvcomp.as_arrays(self.comp, comp_offsets, [len(f) for f in frames], cuda_stream=stream)
                self.dst = nvcomp.as_arrays(self.out, self.out_offsets, self.raw_sizes, cuda_stream=stream)
                # Parsing the frame headers waits for the copy above, so `host` may go after this.
                self.config = self.codec.decompression_config(self.src)
            except (RuntimeError, ValueError) as e:
                raise self._error(e) from None

    def _error(self, e):
        return DeltaFormatError(f"{self.where}: nvCOMP could not decompress the chunks ({e}); XORGEMM_DECOMPRESS=cpu "
                                "decodes them with zstandard instead")

    def decode(self, *, check: bool = True) -> torch.Tensor:
        """Decompresses every frame on the current stream; returns their raw bytes back to back (a view of
        one buffer, reused by the next call). `check` compares each frame's decompressed size with the
        chunk table (it waits for the GPU); without it nothing waits."""
        try:
            result = self.codec.decode(self.src, out=self.dst, decompression_config=self.config)
            got = result.buffer_sizes if check else self.raw_sizes
        except (RuntimeError, ValueError) as e:
            raise self._error(e) from None
        for i, (g, want) in enumerate(zip(got, self.raw_sizes)):
            if g != want:
                raise DeltaFormatError(f"{self.where}: chunk {i} of the span decompressed to {g} bytes on the GPU, "
                                       f"the chunk table says {want}: the file is corrupted")
        if all(n % 16 == 0 for n in self.raw_sizes[:-1]):  # back to back already (64 KiB chunks)
            return self.out[: sum(self.raw_sizes)]
        return torch.cat([self.out[o:o + n] for o, n in zip(self.out_offsets, self.raw_sizes)])
