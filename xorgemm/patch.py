"""patch_model: serve one or many fine-tunes of a loaded base model from their delta files.

    model = xorgemm.patch_model(base_model, {"legal": "legal.xor.safetensors", "med": "med.xor.safetensors"})
    with xorgemm.use(model, "legal"):
        y = model(x)                                   # the legal fine-tune, bit-exact weights
    with xorgemm.use(model, torch.tensor([0, 1, -1])):
        y = model(x)                                   # batch rows: legal, med, base (one forward)

Every nn.Linear whose weight a delta covers becomes an XorLinear sharing the base weight's storage.
Other tensors a fine-tune changes (norms, embeddings, weights that modules use directly, like
nn.MultiheadAttention's) are kept as dense per-fine-tune copies and swapped in when a fine-tune is chosen.
A batch that mixes fine-tunes row by row is served when those fine-tunes agree on every such tensor;
otherwise `use` refuses it by name.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from xorgemm.errors import BaseMismatchError, InputError
from xorgemm.format.container import DeltaFile, load_delta
from xorgemm.nn import XorLinear


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


class _Overrides:
    """Dense fine-tuned copies of the tensors that are not served by an XorLinear, and the base values."""

    def __init__(self):
        self.base: dict[str, torch.Tensor] = {}
        self.tuned: dict[str, dict[str, torch.Tensor]] = {}  # tensor -> fine-tune -> value

    def add(self, tensor_name, finetune, base_value, value):
        self.base.setdefault(tensor_name, base_value.detach().clone())
        self.tuned.setdefault(tensor_name, {})[finetune] = value

    def value(self, tensor_name, finetune):
        return self.tuned[tensor_name].get(finetune, self.base[tensor_name])


def _tensor_ref(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    t = getattr(mod, attr, None)
    if not isinstance(t, torch.Tensor):
        raise InputError(f"model has no tensor '{name}'")
    return t


def patch_model(model: nn.Module, deltas, *, device=None, active=None) -> nn.Module:
    """Patches `model` (in place) to serve the fine-tunes in `deltas` ({name: path or DeltaFile}, or one path,
    named "finetune"). Returns the model; `model.xorgemm_report` says what was replaced."""
    if isinstance(deltas, (str, Path, DeltaFile)):
        deltas = {"finetune": deltas}
    files = {name: d if isinstance(d, DeltaFile) else load_delta(d) for name, d in deltas.items()}
    names = list(files)
    if device is not None:  # first, so resident deltas are made on the device (nvCOMP decompresses on a GPU)
        model.to(device)
    state = dict(model.state_dict(keep_vars=True))
    # Refuse deltas for another base before touching anything: every tensor a delta derives from the base
    # must be the model's own, by shape, dtype and content hash.
    for d in files.values():
        for tname, t in d.tensors.items():
            if t.kind == "whole":
                if tname not in state:
                    raise InputError(f"{d.path}: tensor '{tname}' is new in the fine-tune; the model has nowhere "
                                     "to put it")
                continue
            if tname not in state:
                raise BaseMismatchError(f"{d.path}: tensor '{tname}': the model has no such tensor; this delta was "
                                        "made for another model")
            t.check_base(state[tname].detach().cpu())
    report = PatchReport(names)
    overrides = _Overrides()
    covered = set()
    for mod_name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            if isinstance(mod, nn.Linear):
                report.skipped[mod_name] = f"{type(mod).__name__} is used by its parent directly, not called"
            continue
        wname = f"{mod_name}.weight" if mod_name else "weight"
        bname = f"{mod_name}.bias" if mod_name else "bias"
        kinds = [files[f].tensors[wname].kind for f in names if wname in files[f].tensors]
        if not any(k == "xor" for k in kinds):
            continue
        if "whole" in kinds:
            report.skipped[mod_name] = "a fine-tune stores its weight whole (reshaped)"
            continue
        layer = XorLinear(mod.weight, mod.bias, tile=next(files[f].tensors[wname].tile for f in names
                                                           if wname in files[f].tensors
                                                           and files[f].tensors[wname].kind == "xor"))
        for f in names:
            d = files[f]
            if wname in d.tensors:
                # The base was checked by hash for every tensor above: no second pass over it here.
                layer.add_delta_from_file(f, d.tensors[wname], d.tensors.get(bname), check_base=False)
            else:  # this fine-tune does not list the tensor: it keeps the base
                layer.add_delta(f, mod.weight.detach(), None)
        _set_submodule(model, mod_name, layer)
        report.replaced.append(mod_name)
        covered.update({wname, bname})
    for f in names:
        for tname, t in files[f].tensors.items():
            if tname in covered or t.kind == "same":
                continue
            ref = state[tname]
            overrides.add(tname, f, ref, t.apply(None if t.kind == "whole" else ref.detach().cpu()).to(ref.device))
            report.dense.setdefault(tname, []).append(f)
    model.xorgemm_finetunes = names
    model.xorgemm_overrides = overrides
    model.xorgemm_report = report
    select(model, active)
    return model


def _set_submodule(model, name, new):
    owner, _, attr = name.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    setattr(parent, attr, new)


def _selection_names(model, finetune):
    names = model.xorgemm_finetunes
    if finetune is None:
        return [None]
    if isinstance(finetune, str):
        if finetune not in names:
            raise InputError(f"unknown fine-tune {finetune!r}; this model has {names}")
        return [finetune]
    ids = torch.as_tensor(finetune)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise InputError("per-row fine-tune ids must be an integer tensor")
    used = sorted(set(ids.reshape(-1).tolist()))
    if used and (used[0] < -1 or used[-1] >= len(names)):
        raise InputError(f"fine-tune ids must be in -1..{len(names) - 1} (-1 is the base), got {used[0]}..{used[-1]}")
    return [None if i == -1 else names[i] for i in used]


def select(model: nn.Module, finetune):
    """Makes `finetune` (a name, None for the base, or per-row ids) the active selection of a patched model."""
    if not hasattr(model, "xorgemm_finetunes"):
        raise InputError("this model was not patched by xorgemm.patch_model")
    chosen = _selection_names(model, finetune)
    ov = model.xorgemm_overrides
    for tname in ov.tuned:
        values = [ov.value(tname, f) for f in chosen]
        if any(not torch.equal(v, values[0]) for v in values[1:]):
            raise InputError(f"fine-tunes {[f or 'base' for f in chosen]} differ in '{tname}', which is not served "
                             "by an XorLinear; a batch can mix them only if they agree on such tensors")
        with torch.no_grad():
            _tensor_ref(model, tname).copy_(ov.value(tname, chosen[0]))
    active = finetune if not isinstance(finetune, (list, tuple)) else torch.as_tensor(finetune)
    if isinstance(active, torch.Tensor):
        active = active.to(torch.long)
    for mod in model.modules():
        if isinstance(mod, XorLinear):
            mod.active = active
    model.xorgemm_active = finetune


@contextlib.contextmanager
def use(model: nn.Module, finetune):
    """Within the block, the patched model serves `finetune`: a name, None (the base), or per-row ids
    (int tensor over the batch's leading dimensions, -1 for the base). The previous choice comes back after."""
    previous = getattr(model, "xorgemm_active", None)
    select(model, finetune)
    try:
        yield model
    finally:
        select(model, previous)
