"""DeltaTensor: one tensor's entry in a delta file, decoded lazily from the file it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from xorgemm._native import C, require_kernel
from xorgemm.errors import BaseMismatchError, DeltaFormatError, InputError, where
from xorgemm.format.hashes import digest
from xorgemm.format.layout import TileGrid, dtype_name, grid_of, tensor_bytes

if TYPE_CHECKING:
    from xorgemm.format.reader import DeltaFile


@dataclass
class DeltaTensor:
    """One tensor's entry in a delta file; decodes lazily from the file it came from."""

    name: str
    kind: str  # "xor": tiled XOR section; "same": identical to base; "whole": stored whole (new / reshaped)
    dtype: torch.dtype
    shape: tuple[int, ...]
    tile: tuple[int, int] | None
    span: tuple[int, int]  # (offset, length) in the decoded stream
    base_hash: str | None
    ft_hash: str
    tile_counts: tuple[int, ...]  # tiles per codec, in CODEC_NAMES order
    reason: str | None = None  # why a "whole" tensor is whole: "new" or "reshaped"
    file: DeltaFile = field(repr=False, default=None)
    _offsets: torch.Tensor | None = field(repr=False, default=None)  # validate once: a memo, not an interface

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def grid(self) -> TileGrid:
        return grid_of(self.shape, self.tile, self.dtype)

    def where(self) -> str:
        """'file: tensor 'name'', the prefix of every message about this tensor."""
        return where(self.file.path, self.name)

    def require_section(self):
        """Raises InputError unless this tensor is stored as a tile section (kind "xor")."""
        if self.kind != "xor":
            raise InputError(f"{self.where()}: is stored as '{self.kind}', it has no tile section")

    def section(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The delta section (tile table + payloads) as a uint8 CPU tensor, validated completely, and its tile
        payload offsets (int64)."""
        self.require_section()
        sec = self.file.read_span(*self.span, tensor=self.name)  # chunk checksums checked on every read
        if self._offsets is None:
            try:
                self._offsets = C.validate_section(sec, self.grid)
            except C.FormatError as e:
                raise DeltaFormatError(f"{self.where()}: malformed delta section: {e}") from None
        return sec, self._offsets

    def block_section(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The section (and its tile offsets) of the block rows [rows) x columns [cols) of this tensor's 2-D
        view, made of its tiles as they are: a tensor-parallel rank's shard. The block must lie on tile
        boundaries (its end may be the tensor's edge); otherwise InputError."""
        sec, offsets = self.section()
        try:
            part, grid = C.slice_section(sec, offsets, self.grid, rows[0], rows[1], cols[0], cols[1])
        except C.FormatError as e:
            raise InputError(f"{self.where()}: cannot take rows [{rows[0]}, {rows[1]}) x columns [{cols[0]}, "
                             f"{cols[1]}) of {list(self.shape)} tiled {self.tile}: {e}") from None
        return part, C.validate_section(part, grid)

    def tile_table(self) -> torch.Tensor:
        """Per tile (int64 [n_tiles, 3]): its number of exceptions, codec id (CODEC_NAMES) and low bytes."""
        sec, _ = self.section()
        return C.tile_table(sec, self.grid)

    def check_base(self, base: torch.Tensor, *, hash_check: bool = True, base_digest: str | None = None,
                   base_label: str | None = None):
        """Refuses a base tensor this delta was not made from (dtype, shape, then content hash; `base_digest`
        is the base's digest() when the caller has it already; `base_label` names where the base came from,
        for the message)."""
        if self.kind == "whole":
            return
        the_base = f"the base ({base_label})" if base_label else "the base"
        if base is None:
            raise BaseMismatchError(f"{self.where()}: {the_base} has no such tensor")
        if base.dtype != self.dtype or tuple(base.shape) != self.shape:
            raise BaseMismatchError(
                f"{self.where()}: {the_base} is {dtype_name_safe(base.dtype)} {list(base.shape)}, the delta was "
                f"made against {dtype_name(self.dtype)} {list(self.shape)}")
        if hash_check:
            got = base_digest if base_digest is not None else digest(base)
            if got != self.base_hash:
                given = f"{base_label}: " if base_label else ""
                raise BaseMismatchError(
                    f"{self.where()}: base bytes do not match the base this delta was made from ({given}hash "
                    f"{got} != {self.base_hash})")

    def apply(self, base: torch.Tensor | None, *, verify: bool = True, base_label: str | None = None) -> torch.Tensor:
        """The fine-tuned tensor, bit for bit, on the base's device (the apply_section op runs on the base's
        device: a GPU kernel for a CUDA base); `base` may be None for tensors stored whole, which come back on
        the CPU. `verify=False` skips the two content hashes (base in, fine-tune out) for a base already known
        to be the right one; the chunk checksums and the section validation still run. `base_label` names
        where the base came from in a mismatch's message."""
        self.check_base(base, hash_check=verify, base_label=base_label)
        if self.kind == "same":
            out = base.detach().clone().contiguous()
        elif self.kind == "whole":
            raw = self.file.read_span(*self.span, tensor=self.name)
            out = raw.view(self.dtype).reshape(self.shape).clone()
        else:
            require_kernel(base.device.type, self.where())
            sec, offsets = self.section()
            base = base.detach().contiguous()
            out = torch.empty_like(base)
            torch.ops.xorgemm.apply_section(sec.to(base.device), offsets.to(base.device), base, out, *self.tile)
        if verify and digest(out) != self.ft_hash:
            raise DeltaFormatError(f"{self.where()}: reconstructed bytes do not match the fine-tune's recorded "
                                   "hash: the file is corrupted")
        return out

    def xor_bytes(self, base: torch.Tensor) -> torch.Tensor:
        """The XOR of base and fine-tuned bytes (flat uint8 on the CPU). Conditioned tiles decode against the
        base, so it is needed even for the XOR; it is checked as apply() checks it."""
        ft = self.apply(base.detach().cpu())
        return (tensor_bytes(ft) ^ tensor_bytes(base)).reshape(-1)


def dtype_name_safe(dtype) -> str:
    try:
        return dtype_name(dtype)
    except ValueError:
        return str(dtype)
