"""patch_model: serve one or many fine-tunes of a loaded base model from their delta files.

    model = xorgemm.patch_model(base_model, {"legal": "legal.xor.safetensors", "med": "med.xor.safetensors"})
    with xorgemm.use(model, "legal"):
        y = model(x)                                   # the legal fine-tune, bit-exact weights
    with xorgemm.use(model, torch.tensor([0, 1, -1])):
        y = model(x)                                   # batch rows: legal, med, base (one forward)

Every nn.Linear whose weight a delta covers becomes an XorLinear sharing the base weight's storage.
Other tensors a fine-tune changes (norms, embeddings, weights that modules use directly, like
nn.MultiheadAttention's, Linear weights stored whole) are kept as dense per-fine-tune copies that the
modules reading them use for the rows that ask for them (routing.py): every tensor follows a row's
fine-tune, so a batch may mix full fine-tunes freely. The base tensors are never overwritten.

A selection made with `use` belongs to the thread or asyncio task that made it: concurrent requests on one
model each get their own fine-tune. `select` sets the default for the others.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from xorgemm.errors import BaseMismatchError, InputError
from xorgemm.format.hashes import digest
from xorgemm.format.reader import DeltaFile, load_delta
from xorgemm.nn import XorLinear
from xorgemm.serving.routing import RoutedForward
from xorgemm.serving.state import MemoryReport, ServedModel, served, served_or_new

_ONLY = object()  # patch_model's default `active`: the fine-tune, when there is exactly one


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by their original names: an XorLinear's base weight is its `<name>.weight`, its
    resident deltas are not base tensors."""
    state = dict(model.state_dict(keep_vars=True))
    for mod_name, mod in model.named_modules():
        if isinstance(mod, XorLinear):
            prefix = f"{mod_name}." if mod_name else ""
            for k in [k for k in state if k.startswith(prefix + "deltas.") or k == prefix + "base_weight"]:
                del state[k]
            state[prefix + "weight"] = mod.base_weight
    return state


def _check_bases(served_state: ServedModel, d: DeltaFile, state: dict):
    """Refuses a delta made for another base before anything is touched: every tensor it derives from the
    base must be the model's own, by shape, dtype and content hash. Each base tensor is hashed once per
    model (the base is frozen while served), so adding a fine-tune later does not hash the model again."""
    hashes = served_state.base_digests
    for tname, t in d.tensors.items():
        if t.kind == "whole":
            if tname not in state:
                raise InputError(f"{d.path}: tensor '{tname}' is new in the fine-tune; the model has nowhere to put it")
            continue
        if tname not in state:
            raise BaseMismatchError(f"{d.path}: tensor '{tname}': the model has no such tensor; this delta was made "
                                    "for another model")
        base = state[tname].detach()
        key = (tname, base.data_ptr(), base._version)
        if key not in hashes and base.dtype == t.dtype and tuple(base.shape) == t.shape:
            hashes[key] = digest(base)
        t.check_base(base, base_digest=hashes.get(key))


def _require_device(device):
    """Refuses, in xorgemm's words, a device this machine does not have (torch's own error comes from deep in
    its driver layer)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"patch_model: device {device!r} is not a device torch knows: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"patch_model: device {device!r} asked for, but no CUDA GPU is available here "
                             "(torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"patch_model: device {device!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s)")


def patch_model(model: nn.Module, deltas, *, device=None, active=_ONLY) -> nn.Module:
    """Patches `model` (in place) to serve the fine-tunes in `deltas` ({name: path or DeltaFile}, or one path,
    named "finetune"). Returns the model; `model.xorgemm.report` says what was replaced. With `device`, the
    model moves there first, so the resident deltas are made on it (on a GPU, nvCOMP decompresses them
    there). More fine-tunes can be added and removed later: `add_finetune`, `remove_finetune`."""
    if device is not None:
        _require_device(device)
    if isinstance(deltas, (str, Path, DeltaFile)):
        deltas = {"finetune": deltas}
    files = {name: d if isinstance(d, DeltaFile) else load_delta(d) for name, d in deltas.items()}
    if device is not None:
        model.to(device)
    st = served_or_new(model)
    state = _base_state(model)
    for d in files.values():  # every base checked before anything is touched
        _check_bases(st, d, state)
    # A Linear some fine-tune stores whole (reshaped) stays nn.Linear, served by dense copies for all.
    for mod_name, mod in model.named_modules():
        wname = f"{mod_name}.weight" if mod_name else "weight"
        if type(mod) is nn.Linear and any(wname in d.tensors and d.tensors[wname].kind == "whole"
                                          for d in files.values()):
            st.keep_dense.add(mod_name)
            st.report.skipped[mod_name] = "a fine-tune stores its weight whole (reshaped)"
    for name, d in files.items():
        _add_finetune(model, st, name, d)
    if active is _ONLY:  # one fine-tune: the model becomes it; several: the base until chosen
        active = next(iter(files)) if len(files) == 1 else None
    select(model, active)
    return model


def add_finetune(model: nn.Module, name: str, delta, *, check_base: bool = True) -> nn.Module:
    """Adds fine-tune `name` (a delta path or DeltaFile) to a model, patched already or not, at run time: its
    delta tiles become resident beside the others on the model's device; the base is never touched. An
    nn.Linear it changes first becomes an XorLinear (the fine-tunes already there keep its base weight).
    `check_base=False` skips the base hash check for a delta already known to fit."""
    d = delta if isinstance(delta, DeltaFile) else load_delta(delta)
    st = served_or_new(model)
    if check_base:
        _check_bases(st, d, _base_state(model))
    _add_finetune(model, st, name, d)
    return model


def _add_finetune(model: nn.Module, st: ServedModel, name: str, d: DeltaFile):
    """add_finetune's work, its base hashes checked already."""
    names = st.finetunes
    if not isinstance(name, str) or not name:
        raise InputError(f"fine-tune name {name!r} must be a non-empty string")
    if name in names:
        raise InputError(f"fine-tune {name!r} is already served by this model; remove_finetune it first")
    for mod_name, mod in model.named_modules():  # refused before any layer changes
        wname = f"{mod_name}.weight" if mod_name else "weight"
        t = d.tensors.get(wname)
        if isinstance(mod, XorLinear) and t is not None and t.kind == "whole":
            raise InputError(f"{d.path}: tensor '{wname}' is stored whole ({t.reason}), but {mod_name} is already "
                             "served by an XorLinear; such a fine-tune can only be patched in with the others")
    ov, report = st.overrides, st.report
    covered = set()
    for mod_name, mod in list(model.named_modules()):
        wname = f"{mod_name}.weight" if mod_name else "weight"
        bname = f"{mod_name}.bias" if mod_name else "bias"
        t = d.tensors.get(wname)
        if isinstance(mod, XorLinear):
            if t is None:
                bias = d.tensors.get(bname)
                mod.add_unchanged(name, None if bias is None or bias.kind == "same" else
                                  bias.apply(None if mod.bias is None else mod.bias.detach().cpu()))
            else:
                mod.add_finetune_from_file(name, t, d.tensors.get(bname), check_base=False)
            covered.update({wname, bname})
        elif type(mod) is nn.Linear:
            if t is None or t.kind != "xor" or mod_name in st.keep_dense:
                continue
            layer = XorLinear(mod.weight, mod.bias, tile=t.tile)
            layer.active = st.current  # the selection in force in the calling thread or task
            for prev in names:  # they leave this weight alone; a bias they changed moves into the layer
                layer.add_unchanged(prev, ov.pop(bname, prev))
            report.dense.pop(bname, None)
            layer.add_finetune_from_file(name, t, d.tensors.get(bname), check_base=False)
            _set_submodule(model, mod_name, layer)
            report.replaced.append(mod_name)
            covered.update({wname, bname})
        elif isinstance(mod, nn.Linear) and t is not None and t.kind == "xor":
            report.skipped[mod_name] = f"{type(mod).__name__} is used by its parent directly, not called"
    state = _base_state(model)
    for tname, t in d.tensors.items():
        if tname in covered or t.kind == "same":
            continue
        ref = state[tname]
        ov.add(tname, name, t.apply(None if t.kind == "whole" else ref.detach().cpu()).to(ref.device))
        report.dense.setdefault(tname, []).append(name + (f" (stored whole: {t.reason})" if t.kind == "whole" else ""))
        reader_name, path = _reader_of(model, tname, report)
        RoutedForward.install(model.get_submodule(reader_name), st, reader_name).tensors[path] = tname
    names.append(name)
    report.finetunes = list(names)


def remove_finetune(model: nn.Module, name: str) -> nn.Module:
    """Drops fine-tune `name` from a patched model and frees what it kept resident; the base and the other
    fine-tunes are untouched. Per-row ids index `model.xorgemm.finetunes`: later ones move down by one."""
    st = served(model)
    names = st.finetunes
    if name not in names:
        raise InputError(f"unknown fine-tune {name!r}; this model has {names}")
    for mod in model.modules():
        if isinstance(mod, XorLinear) and name in mod.deltas:
            mod.remove_finetune(name)
    st.overrides.drop(name)
    report = st.report
    for tname in list(report.dense):
        report.dense[tname] = [f for f in report.dense[tname] if f.split(" ")[0] != name]
        if not report.dense[tname]:
            del report.dense[tname]
    names.remove(name)
    report.finetunes = list(names)
    if st.default == name:
        st.default = None
    return model


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes each fine-tune keeps resident in a patched model (delta sections, tile offsets, biases, dense
    copies of other changed tensors), the base's bytes, and the device's free memory."""
    st = served(model)
    per = dict.fromkeys(st.finetunes, 0)
    seen = set()  # tensors already counted: the deltas' here, shared base tensors once
    for mod in model.modules():
        if isinstance(mod, XorLinear):
            for n in mod.finetunes:
                per[n] += mod.resident_bytes(n)
                seen.update(id(t) for t in mod.deltas[n].buffers())
    base_bytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            base_bytes += t.numel() * t.element_size()
    for n, b in st.overrides.bytes_per_finetune().items():
        per[n] += b
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    return MemoryReport(str(device), base_bytes, per, _free_bytes(device))


def _set_submodule(model, name, new):
    owner, _, attr = name.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    setattr(parent, attr, new)


def _reader_of(model: nn.Module, tname: str, report) -> tuple[str, str]:
    """The module whose forward reads tensor `tname`, and the tensor's path inside it: its owner, or the
    owner's parent when the owner is a Linear its parent uses directly (nn.MultiheadAttention's out_proj)."""
    owner, _, attr = tname.rpartition(".")
    if owner in report.skipped:  # used by its parent directly, not called
        parent, _, child = owner.rpartition(".")
        return parent, f"{child}.{attr}"
    return owner, attr


def _selection(st: ServedModel, finetune):
    """`finetune` checked against the served fine-tunes: a name, None (the base) or int64 per-row ids."""
    names = st.finetunes
    if finetune is None:
        return None
    if isinstance(finetune, str):
        if finetune not in names:
            raise InputError(f"unknown fine-tune {finetune!r}; this model has {names}")
        return finetune
    ids = torch.as_tensor(finetune)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise InputError("per-row fine-tune ids must be an integer tensor")
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= len(names)):
        raise InputError(f"fine-tune ids must be in -1..{len(names) - 1} (-1 is the base), got "
                         f"{int(ids.min())}..{int(ids.max())}")
    return ids.to(torch.long)


def select(model: nn.Module, finetune):
    """Makes `finetune` (a name, None for the base, or per-row ids) what a patched model serves wherever no
    `use` block says otherwise (the default of every thread and task)."""
    st = served(model)
    st.default = _selection(st, finetune)
    for mod in model.modules():
        if isinstance(mod, XorLinear):
            mod.active = st.current


@contextlib.contextmanager
def use(model: nn.Module, finetune):
    """Within the block, the patched model serves `finetune` to the calling thread or asyncio task only: a
    name, None (the base), or per-row ids (int tensor over the batch's leading dimensions, -1 for the base;
    modules routed per row take one id per batch row). Other threads and tasks keep their own choice."""
    st = served(model)
    with st.choosing(_selection(st, finetune)):
        yield model
