"""A served model's state: one `ServedModel` object at `model.xorgemm`, and the reports it keeps."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from torch import nn

from xorgemm.errors import InputError


@dataclass
class PatchReport:
    finetunes: list[str]
    replaced: list[str] = field(default_factory=list)  # nn.Linear modules now XorLinear
    dense: dict[str, list[str]] = field(default_factory=dict)  # tensor -> fine-tunes holding a dense copy of it
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it stayed nn.Linear

    def __str__(self):
        lines = [f"patched {len(self.replaced)} nn.Linear modules into XorLinear for fine-tunes {self.finetunes}"]
        if self.dense:
            lines.append(f"{len(self.dense)} other changed tensors kept as dense per-fine-tune copies: "
                         + ", ".join(sorted(self.dense)[:6]) + (" ..." if len(self.dense) > 6 else ""))
        for m, why in self.skipped.items():
            lines.append(f"kept {m} as nn.Linear: {why}")
        return "\n".join(lines)


class DenseOverrides:
    """Dense fine-tuned copies of the tensors a fine-tune changes that no XorLinear serves (norms, embeddings,
    weights a module reads directly). The model's own tensors stay the base's: a forward reads these copies
    for the rows that ask for them (routing.py), so nothing is swapped in for the whole model."""

    def __init__(self):
        self.tuned: dict[str, dict[str, torch.Tensor]] = {}  # tensor -> fine-tune -> value

    def add(self, tensor_name, finetune, value):
        self.tuned.setdefault(tensor_name, {})[finetune] = value

    def value(self, tensor_name, finetune) -> torch.Tensor | None:
        """Fine-tune `finetune`'s copy of a tensor, or None where it uses the base's (None: the base itself)."""
        return self.tuned.get(tensor_name, {}).get(finetune)

    def pop(self, tensor_name, finetune):
        """Removes and returns one fine-tune's copy of a tensor (None if it has none)."""
        value = self.tuned.get(tensor_name, {}).pop(finetune, None)
        if tensor_name in self.tuned and not self.tuned[tensor_name]:
            del self.tuned[tensor_name]
        return value

    def drop(self, finetune):
        for tensor_name in list(self.tuned):
            self.pop(tensor_name, finetune)

    def bytes_per_finetune(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for values in self.tuned.values():
            for f, v in values.items():
                out[f] = out.get(f, 0) + v.numel() * v.element_size()
        return out


# The selection each thread or asyncio task made with `use`: {ServedModel: selection}. A context variable, so a
# server's concurrent requests never see each other's choice (threads start empty; a task copies its creator's).
_SELECTIONS: contextvars.ContextVar[dict] = contextvars.ContextVar("xorgemm_selections")


@dataclass(eq=False)
class ServedModel:
    """Everything xorgemm keeps about a model it serves fine-tunes on (`model.xorgemm`)."""

    finetunes: list[str] = field(default_factory=list)  # served fine-tunes; per-row ids index this list
    overrides: DenseOverrides = field(default_factory=DenseOverrides)  # dense copies of non-XorLinear tensors
    report: PatchReport = field(default_factory=lambda: PatchReport([]))
    keep_dense: set[str] = field(default_factory=set)  # nn.Linear modules a fine-tune stores whole: served densely
    default: object = None  # what a thread or task that chose nothing with `use` serves (`select` sets it)
    base_digests: dict = field(default_factory=dict)  # (tensor, data_ptr, version) -> digest, hashed once

    def current(self):
        """The selection in force for the calling thread or task: its `use`, else the default. A name, None
        (the base) or per-row ids (int64 tensor, -1 for the base)."""
        return _SELECTIONS.get({}).get(self, self.default)

    active = property(current)

    @contextlib.contextmanager
    def choosing(self, selection):
        """Within the block, the calling thread or task (only) serves `selection`."""
        chosen = dict(_SELECTIONS.get({}))
        chosen[self] = selection
        token = _SELECTIONS.set(chosen)
        try:
            yield
        finally:
            _SELECTIONS.reset(token)


def served(model: nn.Module) -> ServedModel:
    """The model's ServedModel; InputError if xorgemm does not serve it."""
    state = getattr(model, "xorgemm", None)
    if not isinstance(state, ServedModel):
        raise InputError("this model was not patched by xorgemm.patch_model")
    return state


def served_or_new(model: nn.Module) -> ServedModel:
    """The model's ServedModel, made (empty) on first use."""
    if not isinstance(getattr(model, "xorgemm", None), ServedModel):
        model.xorgemm = ServedModel()
    return model.xorgemm


@dataclass
class MemoryReport:
    """What a patched model keeps resident, per fine-tune, and how many more of that size would fit."""

    device: str
    base_bytes: int
    finetune_bytes: dict[str, int]
    free_bytes: int | None  # free memory on the device now (None if unknown)

    @property
    def mean_finetune_bytes(self) -> float:
        return sum(self.finetune_bytes.values()) / max(1, len(self.finetune_bytes))

    @property
    def more_that_fit(self) -> int | None:
        """Fine-tunes of the current mean size that fit in the free memory (None if unknown or no fine-tune)."""
        if self.free_bytes is None or not self.finetune_bytes or self.mean_finetune_bytes == 0:
            return None
        return int(self.free_bytes // self.mean_finetune_bytes)

    def __str__(self):
        lines = [f"base model: {self.base_bytes:,} B on {self.device}"]
        for n, b in self.finetune_bytes.items():
            lines.append(f"  {n}: {b:,} B resident ({100 * b / max(1, self.base_bytes):.2f}% of the base)")
        if self.free_bytes is not None:
            more = self.more_that_fit
            lines.append(f"free on {self.device}: {self.free_bytes:,} B"
                         + (f", room for about {more:,} more fine-tunes of the mean size" if more is not None else ""))
        return "\n".join(lines)
