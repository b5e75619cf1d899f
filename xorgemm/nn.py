"""XorLinear: a drop-in for nn.Linear that multiplies by base XOR delta without materializing the weight.

One XorLinear holds one shared base weight and any number of named fine-tunes (their delta sections,
validated once, and their biases). A forward uses the base, one fine-tune for the whole batch, or a
fine-tune per row (ids into `finetunes`, -1 for the base), like Punica's segmented GEMM:

    layer = XorLinear.from_linear(base_linear, finetuned_weight, finetuned_bias, name="legal")
    layer.add_finetune("med", med_weight, med_bias)
    y = layer(x, finetune="legal")                        # one fine-tune
    y = layer(x, finetune=torch.tensor([0, 1, -1, 0]))    # rows of x[0..3] use legal, med, base, legal

Without a `finetune` argument the layer uses its `active` selection: a name, ids, None, or a callable
returning one, which is how a served model makes the choice per thread or task (see xorgemm/serving).

Engines that capture their steps in CUDA graphs use a fixed table of slots instead (vLLM's LoRA slots):

    layer.enable_slots(4)                                 # four slots, all empty (the base)
    layer.set_slot(0, "legal"); layer.set_slot(2, "med")  # between steps, in place
    y = layer(x, finetune=SlotIds(torch.tensor([0, 2, -1, 0])))

The call's arguments never change when the slots do, and on a GPU the kernel reads the table itself.
"Fine-tune" names what a user serves; "delta" names its bytes: `deltas[name]` holds fine-tune `name`'s
resident delta section.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from xorgemm._native import C, require_kernel
from xorgemm.errors import InputError
from xorgemm.format.layout import DEFAULT_TILE, context_shift, grid_of, tensor_bytes, tile_for
from xorgemm.ops import xor_linear
from xorgemm.resident import cpu_resident_form, resident_section, section_offsets, xor_codecs_only

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class DeltaWeight:
    """What `XorLinear.weight` returns: the fine-tuned weight's shape, dtype and device, no data.
    `materialize()` builds the exact tensor when it is really needed."""

    def __init__(self, layer: XorLinear):
        self._layer = layer

    shape = property(lambda self: self._layer.base_weight.shape)
    dtype = property(lambda self: self._layer.base_weight.dtype)
    device = property(lambda self: self._layer.base_weight.device)
    ndim = property(lambda self: 2)
    requires_grad = property(lambda self: False)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self):
        return 2

    def numel(self):
        return self.shape.numel()

    def materialize(self, finetune=None):
        return self._layer.materialize(finetune)

    def requires_grad_(self, requires_grad=True):
        if requires_grad:
            raise RuntimeError("xorgemm: an XorLinear's weight (base XOR delta) is frozen and has no gradient")
        return self

    def __repr__(self):
        return f"DeltaWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


def _rewrite_slots_after_load(module, incompatible_keys):
    if module.slot_names is not None:
        module._write_slots()


class SlotIds:
    """Per-row slot numbers for an XorLinear with slots (`XorLinear.enable_slots`): row i uses the fine-tune
    slot ids[i] holds when the layer runs, -1 (or an empty slot) the base. Inference only."""

    __slots__ = ("ids",)

    def __init__(self, ids: torch.Tensor):
        self.ids = ids


class _ResidentDelta(nn.Module):
    """One fine-tune's state in an XorLinear: its delta section, tile offsets and bias (buffers)."""

    def __init__(self, section: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("section", section)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A loaded section has its own size: take the incoming shapes before the usual copy.
        for name in ("section", "offsets", "bias"):
            t = state_dict.get(prefix + name)
            if t is not None and (self._buffers.get(name) is None or self._buffers[name].shape != t.shape):
                like = self._buffers.get(name)
                self._buffers[name] = torch.empty_like(t, device=like.device if like is not None else t.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class XorLinear(nn.Module):
    """y = x @ (base XOR delta)^T + bias, with the delta decoded tile by tile inside the matmul."""

    def __init__(self, base_weight: torch.Tensor, base_bias: torch.Tensor | None = None, *, tile=DEFAULT_TILE):
        super().__init__()
        if base_weight.dim() != 2:
            raise InputError(f"XorLinear needs a 2-D weight, got shape {tuple(base_weight.shape)}")
        if base_bias is not None and tuple(base_bias.shape) != (base_weight.shape[0],):
            raise InputError(f"bias of shape {tuple(base_bias.shape)} does not match {base_weight.shape[0]} outputs")
        # detach() shares storage with the base model: no copy of the base is ever made.
        self.register_buffer("base_weight", base_weight.detach())
        self.bias = None if base_bias is None else nn.Parameter(base_bias.detach(), requires_grad=False)
        self.tile = tile_for((1, 1), tile)
        self.deltas = nn.ModuleDict()  # fine-tune name -> its resident delta; ids index them in this order
        # Without a `finetune` argument: a name, per-row ids, None (the base), or a callable returning one.
        self.active = None
        # Slots (enable_slots): the fine-tune in each, and the table and bias rows the op reads. Plain
        # attributes, not buffers: addresses are never saved, and a moved or copied layer rewrites them.
        self.slot_names: list[str | None] | None = None
        self._slot_table = self._slot_bias = None
        self._slots_written_for = None  # id(self) when the table matches slot_names, else None
        # A load may free sections a captured graph's table points at: the table is rewritten at once.
        self.register_load_state_dict_post_hook(_rewrite_slots_after_load)

    # --- construction

    @classmethod
    def from_linear(cls, base: nn.Linear, finetuned_weight: torch.Tensor | None = None,
                    finetuned_bias: torch.Tensor | None = None, *, name: str = "finetune", tile=DEFAULT_TILE):
        """Wraps `base` (sharing its weight storage) and, if given, adds one fine-tune `name`."""
        layer = cls(base.weight, base.bias, tile=tile)
        if finetuned_weight is not None:
            layer.add_finetune(name, finetuned_weight, finetuned_bias)
            layer.active = name
        return layer

    @classmethod
    def from_delta(cls, base: nn.Linear, delta, prefix: str, *, name: str = "finetune"):
        """Wraps `base` with the fine-tune that `delta` (a DeltaFile or path) stores for `prefix`.weight/.bias."""
        from xorgemm.format.reader import DeltaFile, load_delta

        d = delta if isinstance(delta, DeltaFile) else load_delta(delta)
        weight = d[f"{prefix}.weight"]
        layer = cls(base.weight, base.bias, tile=weight.tile or DEFAULT_TILE)
        layer.add_finetune_from_file(name, weight, d.tensors.get(f"{prefix}.bias"))
        layer.active = name
        return layer

    def _check_name(self, name: str):
        if not isinstance(name, str) or not _NAME.match(name):
            raise InputError(f"fine-tune name {name!r} must be letters, digits, '_' or '-', starting with a letter")
        if name in self.finetunes:
            raise InputError(f"fine-tune {name!r} is already in this XorLinear")

    @property
    def finetunes(self) -> list[str]:
        """The fine-tunes this layer serves, in id order (per-row ids index this list)."""
        return list(self.deltas)

    def add_finetune(self, name: str, finetuned_weight: torch.Tensor, finetuned_bias: torch.Tensor | None = None):
        """Adds fine-tune `name` given its full weight (encoded here into a delta section; the weight is not kept)."""
        self._check_name(name)
        w = self.base_weight
        if finetuned_weight.shape != w.shape or finetuned_weight.dtype != w.dtype:
            raise InputError(f"fine-tune {name!r}: weight is {finetuned_weight.dtype} {tuple(finetuned_weight.shape)}, "
                             f"the base is {w.dtype} {tuple(w.shape)}")
        grid = grid_of(w.shape, self.tile, w.dtype)
        # Encoded on the CPU (tensor_bytes copies there); _add_delta puts the section beside the base. A CPU
        # layer in the fast form keeps the XOR codecs only (resident.xor_codecs_only): no conditioned tiles.
        shift = -1 if w.device.type == "cpu" and cpu_resident_form() == "fast" else context_shift(w.dtype, w.shape)
        section = C.encode_section(tensor_bytes(w), tensor_bytes(finetuned_weight), grid, shift)
        self._add_delta(name, section, C.validate_section(section, grid), finetuned_bias)

    def add_finetune_from_file(self, name: str, weight, bias=None, *, check_base: bool = True):
        """Adds fine-tune `name` from DeltaTensor entries of a loaded delta file (weight, optional bias).
        `check_base=False` skips the base hash for a caller that has already checked it (patch_model)."""
        self._check_name(name)
        w = self.base_weight
        weight.check_base(w, hash_check=check_base)  # digest() copies to the CPU only when it hashes
        if weight.kind == "xor":
            if weight.tile != self.tile:
                raise InputError(f"{weight.file.path}: tensor '{weight.name}' is tiled {weight.tile}, this XorLinear "
                                 f"uses {self.tile}")
            # On a GPU base the chunks are decompressed on the GPU (nvCOMP) when xorgemm[cuda] is installed.
            section, offsets = resident_section(weight, w.device)
        elif weight.kind == "same":
            section = offsets = None  # this fine-tune leaves the weight alone (its bias may still differ)
        else:
            raise InputError(f"{weight.file.path}: tensor '{weight.name}' is stored whole ({weight.reason}); an "
                             "XorLinear needs a delta against its base")
        fb = None
        if bias is not None and bias.kind != "same":
            fb = bias.apply(None if self.bias is None else self.bias.detach().cpu())
        self._add_delta(name, section, offsets, fb)

    def add_unchanged(self, name: str, bias: torch.Tensor | None = None):
        """Adds fine-tune `name` that leaves this weight as the base (an all-zero delta: a tile table, no
        payload), optionally with its own bias."""
        self._check_name(name)
        self._add_delta(name, None, None, bias)

    def add_finetune_section(self, name: str, section: torch.Tensor, bias: torch.Tensor | None = None):
        """Adds fine-tune `name` from a delta section of this layer's weight (a uint8 tensor on any device, e.g.
        one already resident beside another layer's). It is validated here and its tile offsets computed: on
        the CPU completely, on a GPU from its tile table (copied back)."""
        self._check_name(name)
        w = self.base_weight
        grid = grid_of(w.shape, self.tile, w.dtype)
        if section.dtype != torch.uint8 or section.dim() != 1:
            raise InputError(f"fine-tune {name!r}: a section is a 1-D uint8 tensor, got {section.dtype} "
                             f"{tuple(section.shape)}")
        try:
            offsets = section_offsets(section, grid)
        except C.FormatError as e:
            raise InputError(f"fine-tune {name!r}: malformed delta section: {e}") from None
        self._add_delta(name, section, offsets, bias)

    def remove_finetune(self, name: str):
        """Drops fine-tune `name` and frees its resident delta; the base is untouched. Per-row ids index
        `finetunes`, so the fine-tunes after it move down by one."""
        if name not in self.deltas:
            raise InputError(f"unknown fine-tune {name!r}; this XorLinear has {self.finetunes}")
        if self.slot_names is not None and name in self.slot_names:  # no slot may point at freed memory
            self.slot_names = [None if n == name else n for n in self.slot_names]
            self._write_slots()
        del self.deltas[name]
        if isinstance(self.active, str) and self.active == name:
            self.active = None

    def resident_bytes(self, name: str) -> int:
        """Bytes fine-tune `name` keeps resident here: its delta section, tile offsets and bias."""
        slot = self.deltas[name]
        return sum(t.numel() * t.element_size() for t in (slot.section, slot.offsets, slot.bias) if t is not None)

    def _add_delta(self, name, section, offsets, bias):
        dev = self.base_weight.device
        if bias is not None:
            if bias.shape != (self.out_features,) or bias.dtype != self.base_weight.dtype:
                raise InputError(f"fine-tune {name!r}: bias is {bias.dtype} {tuple(bias.shape)}, expected "
                                 f"{self.base_weight.dtype} ({self.out_features},)")
            bias = bias.detach().to(dev)
        if section is None:  # an all-zero delta: only a tile table, every tile skipped
            grid = grid_of(self.base_weight.shape, self.tile, self.base_weight.dtype)
            section = torch.zeros(grid.table_bytes, dtype=torch.uint8)
            offsets = C.validate_section(section, grid)
        section = section.to(dev)
        if dev.type == "cpu" and cpu_resident_form() == "fast":
            grid = grid_of(self.base_weight.shape, self.tile, self.base_weight.dtype)
            try:
                section, offsets = xor_codecs_only(section, offsets.cpu(), self.base_weight, grid, self.tile)
            except C.FormatError as e:
                raise InputError(f"fine-tune {name!r}: its delta does not decode against this base: {e}") from None
        if section.data_ptr() % 16:  # a view inside a larger buffer: the GPU kernels load 16 bytes at a time
            section = section.clone()
        self.deltas[name] = _ResidentDelta(section, offsets.to(dev), bias)

    # --- slots

    def enable_slots(self, n: int):
        """Gives this layer a table of `n` slots (1 to 64), all empty, on the base's device: a forward with
        `finetune=SlotIds(ids)` serves row i the fine-tune in slot ids[i]. `set_slot` rewrites the table and
        the slots' bias rows in place, so a CUDA graph captured earlier replays with the new fine-tunes."""
        if not isinstance(n, int) or not 1 <= n <= 64:
            raise InputError(f"an XorLinear has 1 to 64 slots, not {n!r}")
        self.slot_names = [None] * n
        self._write_slots()

    def set_slot(self, slot: int, name: str | None):
        """Puts fine-tune `name` in `slot` (None empties it: its rows get the base). Between steps: on a GPU
        this is a small copy to the device, ordered before the next kernel on the current stream."""
        if self.slot_names is None:
            raise InputError("this XorLinear has no slots; call enable_slots first")
        if not 0 <= slot < len(self.slot_names):
            raise InputError(f"slot {slot} out of range: this XorLinear has {len(self.slot_names)} slots")
        if name is not None:
            if name not in self.deltas:
                raise InputError(f"unknown fine-tune {name!r}; this XorLinear has {self.finetunes}")
            if self.deltas[name].bias is not None and self.bias is None:
                raise InputError(f"fine-tune {name!r} has a bias where the base layer has none; slots keep a bias "
                                 "row per slot only for a layer with a bias")
        self.slot_names[slot] = name
        self._write_slots()

    def _write_slots(self):
        """The table (and bias rows) as slot_names say, in place when they already exist on the base's device."""
        with torch.inference_mode(False):  # never inference tensors: later updates happen outside that mode too
            self._write_slots_now()

    def _write_slots_now(self):
        w = self.base_weight
        rows = torch.zeros(len(self.slot_names), 3, dtype=torch.long)
        biases = [self.bias] if self.bias is not None else None
        for s, name in enumerate(self.slot_names):
            if name is not None:
                d = self.deltas[name]
                rows[s] = torch.tensor([d.section.data_ptr(), d.offsets.data_ptr(), d.section.numel()])
            if biases is not None:
                biases.append(self.bias if name is None or self.deltas[name].bias is None else self.deltas[name].bias)
        table = self._slot_table
        if table is None or table.device != w.device or table.shape != rows.shape:
            self._slot_table = rows.to(w.device)
            self._slot_bias = None if biases is None else torch.stack([b.detach() for b in biases])
        else:
            table.copy_(rows)
            if biases is not None:
                self._slot_bias.copy_(torch.stack([b.detach() for b in biases]))
        self._slots_written_for = id(self)

    def __getstate__(self):
        # Addresses never leave this object: a copy or an unpickled layer rewrites its own table.
        return {**self.__dict__, "_slot_table": None, "_slot_bias": None, "_slots_written_for": None}

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._slots_written_for = None  # sections moved: their addresses are rewritten before the next forward
        return out

    # --- introspection

    @property
    def in_features(self) -> int:
        return self.base_weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.base_weight.shape[0]

    @property
    def weight(self) -> DeltaWeight:
        return DeltaWeight(self)

    def delta_bytes(self, name: str | None = None) -> int:
        names = [name] if name is not None else self.finetunes
        return sum(self.deltas[n].section.numel() for n in names)

    def extra_repr(self) -> str:
        wbytes = self.base_weight.numel() * self.base_weight.element_size()
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"bias={self.bias is not None}", f"dtype={self.base_weight.dtype}", f"tile={self.tile}"]
        for n in self.finetunes:
            parts.append(f"{n}: {self.delta_bytes(n):,} B delta ({100 * self.delta_bytes(n) / wbytes:.1f}%)")
        return ", ".join(parts)

    def materialize(self, finetune: str | None = None) -> torch.Tensor:
        """The exact fine-tuned weight (or the base for None), built on the CPU."""
        name = self._resolve_name(finetune)
        base = self.base_weight.detach().cpu().contiguous()
        if name is None:
            return base.clone()
        slot = self.deltas[name]
        out = torch.empty_like(base)
        torch.ops.xorgemm.apply_section(slot.section.cpu(), slot.offsets.cpu(), base, out, *self.tile)
        return out

    def _resolve_name(self, finetune):
        if finetune is None:
            finetune = self._active()
            finetune = finetune if isinstance(finetune, str) else None
        if finetune is not None and finetune not in self.deltas:
            raise InputError(f"unknown fine-tune {finetune!r}; this XorLinear has {self.finetunes}")
        return finetune

    # --- forward

    def _row_ids(self, finetune, x) -> torch.Tensor | None:
        """Per-row fine-tune indices into `finetunes` (int64, -1 = base) for x's rows; None unless given ids.
        Ids on the CPU are range-checked there and copied once per ids tensor; ids already on the GPU are
        checked by the op on the GPU without waiting for it: a row with a bad id is served the base and the
        next call on that GPU raises the error (a device assert would kill the CUDA context)."""
        if not isinstance(finetune, torch.Tensor):
            return None
        lead = x.shape[:-1]
        if finetune.shape != lead[: finetune.dim()]:
            raise InputError(f"fine-tune ids of shape {tuple(finetune.shape)} do not prefix the input's rows "
                             f"{tuple(lead)}")
        n = len(self.finetunes)
        if finetune.device == x.device and finetune.device.type != "cpu":
            ids = finetune.to(torch.long)
        else:
            # Checked and copied once per ids tensor while it is unchanged. Inference tensors (made under
            # torch.inference_mode, as serving engines run) have no version counter: checked every call.
            version = None if finetune.is_inference() else finetune._version
            cached = getattr(self, "_ids_cache", None)
            key = (finetune, version, x.device, n)
            if version is not None and cached is not None and cached[0][0] is finetune and cached[0][1:] == key[1:]:
                ids = cached[1]
            else:
                if finetune.numel() and (finetune.min() < -1 or finetune.max() >= n):
                    raise InputError(f"fine-tune ids must be in -1..{n - 1} (-1 is the base), got "
                                     f"{finetune.min().item()}..{finetune.max().item()}")
                ids = finetune.to(device=x.device, dtype=torch.long)
                if version is not None:
                    self._ids_cache = (key, ids)
        return ids.reshape(*ids.shape, *([1] * (len(lead) - ids.dim()))).expand(lead).reshape(-1)

    def _active(self):
        return self.active() if callable(self.active) else self.active

    def forward(self, x: torch.Tensor, finetune: str | torch.Tensor | None = None) -> torch.Tensor:
        if finetune is None:
            finetune = self._active()
        w = self.base_weight
        if x.shape[-1] != self.in_features:
            raise InputError(f"XorLinear expects {self.in_features} input features, got input of shape "
                             f"{tuple(x.shape)}")
        if x.dtype != w.dtype:
            raise InputError(f"XorLinear input is {x.dtype} but its weight is {w.dtype}; cast the input")
        if x.device != w.device:
            raise InputError(f"XorLinear input is on {x.device} but its weight is on {w.device}")
        if w.device.type != "cpu":  # the CPU kernels are always built (and torch.compile traces this line)
            require_kernel(w.device.type, "XorLinear")
        if isinstance(finetune, SlotIds):
            return self._forward_slots(x, finetune.ids)
        row_ids = self._row_ids(finetune, x)
        names = self.finetunes if row_ids is not None else [n for n in [self._resolve_name(finetune)] if n]
        sections = [self.deltas[n].section for n in names]
        offsets = [self.deltas[n].offsets for n in names]
        if row_ids is None:  # one fine-tune (or the base) for every row: its own bias, else the base's
            own = self.deltas[names[0]].bias if names else None
            bias = own if own is not None else self.bias
        else:
            bias = self._bias_rows(names)
        return xor_linear(x, w, sections, offsets, row_ids, bias, tile=self.tile)

    def _forward_slots(self, x, ids):
        if self.slot_names is None:
            raise InputError("this XorLinear has no slots; call enable_slots first")
        lead = x.shape[:-1]
        if not isinstance(ids, torch.Tensor) or ids.shape != lead[: ids.dim()] or ids.device != x.device:
            raise InputError(f"slot ids must be a tensor on {x.device} prefixing the input's rows {tuple(lead)}, got "
                             f"{getattr(ids, 'shape', ids)}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise InputError("slot forwards are inference only; train through fine-tune names or per-row ids")
        if self._slots_written_for != id(self):  # moved, copied or reloaded since the table was written
            self._write_slots()
        rows = ids.to(torch.long).reshape(*ids.shape, *([1] * (len(lead) - ids.dim()))).expand(lead).reshape(-1)
        return torch.ops.xorgemm.xor_linear_slots(x, self.base_weight, self._slot_table, rows, self._slot_bias,
                                                  *self.tile)

    def _bias_rows(self, names):
        """[len(names) + 1, N] biases (row 0 the base's), or None if no bias at all."""
        slots = [self.deltas[n] for n in names]
        if self.bias is None and all(s.bias is None for s in slots):
            return None
        base = self.bias if self.bias is not None else torch.zeros(self.out_features, dtype=self.base_weight.dtype,
                                                                   device=self.base_weight.device)
        return torch.stack([base] + [s.bias if s.bias is not None else base for s in slots])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        names = []
        for k in state_dict:
            if k.startswith(prefix + "deltas."):
                n = k[len(prefix) + len("deltas."):].split(".")[0]
                if n not in names:
                    names.append(n)
        grid = grid_of(self.base_weight.shape, self.tile, self.base_weight.dtype)
        for n in names:  # every section checked before anything changes: the kernels trust what they are given
            section, offsets = (state_dict.get(f"{prefix}deltas.{n}.{b}") for b in ("section", "offsets"))
            if section is None or offsets is None:
                continue  # a missing key: load_state_dict's own report
            if section.dtype != torch.uint8 or section.dim() != 1:
                raise InputError(f"{prefix}deltas.{n}.section: a section is a 1-D uint8 tensor, got {section.dtype} "
                                 f"{tuple(section.shape)}")
            try:
                want = section_offsets(section.contiguous(), grid)
            except C.FormatError as e:
                raise InputError(f"{prefix}deltas.{n}.section: malformed delta section: {e}") from None
            if not torch.equal(offsets.detach().cpu().to(torch.long).reshape(-1), want):
                raise InputError(f"{prefix}deltas.{n}.offsets: do not match the section's tile table")
        for n in names:
            if n not in self.deltas:
                empty = torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
                self.deltas[n] = _ResidentDelta(*empty, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._slots_written_for = None  # new sections: the slot table is rewritten before the next forward

