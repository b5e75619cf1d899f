"""Delta sections made resident on a device: what the kernels read (format -> resident -> ops).

`resident_section(t, device)` gives a DeltaTensor's section and tile offsets on `device`. Bound for a GPU,
the chunks are decompressed there by nvCOMP when it is installed (`xorgemm[cuda]`; gpu_decompress.py) and
only the tile table comes back to be checked; otherwise zstandard decodes them on the CPU, the whole
section is validated and copied over. Both give the same bytes. XORGEMM_DECOMPRESS=nvcomp|cpu|auto picks.

On the CPU a section may be made resident in another form: `xor_codecs_only` re-encodes its conditioned
tiles (Rice codes against the base: the smallest, but decoded at ~300 M elements/s a core) with the XOR
codecs, which the fused CPU kernel applies at memory speed. XorLinear does so unless
XORGEMM_CPU_RESIDENT=compact (docs/kernels.md has the measurements).
"""
from __future__ import annotations

import os

import torch

from xorgemm._native import C
from xorgemm.errors import DeltaFormatError, InputError, where
from xorgemm.format.layout import CODEC_NAMES, TileGrid, tensor_bytes
from xorgemm.format.tensor import DeltaTensor
from xorgemm.resident.gpu_decompress import GpuZstdBatch, decompressor_for, nvcomp_available


def resident_section(t: DeltaTensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The section and its tile payload offsets (int64) on `device`, checked, ready for the kernels."""
    device = torch.device(device)
    if decompressor_for(device) == "cpu":
        section, offsets = t.section()
        return section.to(device), offsets.to(device)
    t.require_section()
    sec = read_span_on(t, device)
    try:
        offsets = section_offsets(sec, t.grid)
    except C.FormatError as e:
        raise DeltaFormatError(f"{t.where()}: malformed delta section: {e}") from None
    return sec, offsets.to(device)


CPU_RESIDENT_FORMS = ("fast", "compact")


def cpu_resident_form() -> str:
    """How deltas are kept resident on the CPU (XORGEMM_CPU_RESIDENT): "fast" (the default) re-encodes
    conditioned tiles with the XOR codecs, "compact" keeps the sections as stored."""
    form = os.environ.get("XORGEMM_CPU_RESIDENT", "") or "fast"
    if form not in CPU_RESIDENT_FORMS:
        raise InputError(f"XORGEMM_CPU_RESIDENT must be one of {', '.join(CPU_RESIDENT_FORMS)}, got {form!r}")
    return form


def xor_codecs_only(section: torch.Tensor, offsets: torch.Tensor, base: torch.Tensor, grid: TileGrid,
                    tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same delta of `base` (CPU tensors) with its conditioned tiles re-encoded by the XOR codecs, and
    its tile offsets; the section itself when it has none. The other tiles come out as they were: the
    encoder picks the smallest XOR codec, which they already are. Holds one fine-tuned copy of the tensor
    while it works. Raises C.FormatError when a tile does not decode against this base."""
    if C.codec_counts(section, grid)[CODEC_NAMES.index("conditioned")] == 0:
        return section, offsets
    base = base.detach().contiguous()
    patched = torch.empty_like(base)
    try:
        torch.ops.xorgemm.apply_section(section, offsets, base, patched, *tile)
    except RuntimeError as e:  # the op's FormatError, as the dispatcher hands it on
        if "does not decode" not in str(e):
            raise
        raise C.FormatError(str(e).splitlines()[0]) from None
    out = C.encode_section(tensor_bytes(base), tensor_bytes(patched), grid, -1)
    return out, C.validate_section(out, grid)


def section_offsets(section: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """The tile payload offsets (int64, on the CPU) of a section on any device, checked: completely on the
    CPU; from its tile table alone on a GPU (one small copy back, no pass over the payloads). Raises
    C.FormatError for a malformed section."""
    if section.device.type == "cpu":
        return C.validate_section(section.contiguous(), grid)
    if section.numel() < grid.table_bytes:
        raise C.FormatError(f"section of {section.numel()} bytes is shorter than its tile table "
                            f"({grid.table_bytes} bytes)")
    return C.table_offsets(section[: grid.table_bytes].cpu(), section.numel(), grid)


def read_span_on(t: DeltaTensor, device) -> torch.Tensor:
    """t's span of the decoded stream, decompressed on a GPU by nvCOMP: the result lives on `device`."""
    offset, length = t.span
    if length == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    frames, sizes, start = t.file.span_frames(offset, length)
    raw = GpuZstdBatch(frames, sizes, device, where(t.file.path, t.name)).decode()
    return raw[start:start + length].clone()  # its own allocation: aligned, and the rest is freed


__all__ = ["resident_section", "section_offsets", "read_span_on", "GpuZstdBatch", "decompressor_for",
           "nvcomp_available", "cpu_resident_form", "xor_codecs_only", "CPU_RESIDENT_FORMS"]
