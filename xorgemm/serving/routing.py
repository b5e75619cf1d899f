"""Per-row fine-tunes for the modules XorLinear does not serve: norms, embeddings, weights a module reads
directly (nn.MultiheadAttention's), Linear layers a fine-tune stores whole.

A fine-tune's dense copy of such a tensor (DenseOverrides) is never copied into the model. Instead the
module that reads it gets a routed forward: for the selection in force in the calling thread or task it
runs the module's own forward with that fine-tune's tensors in place of the base's; for per-row ids it
runs it once per fine-tune present, on that fine-tune's rows (sliced along dim 0 of every input whose
leading dimension is the batch's; inputs that broadcast over the batch, like position ids, go whole), and
puts the rows back in order. While a group runs, the selection in
force is that group's fine-tune, so modules nested inside (XorLinear, other routed modules) follow it.

Tensors are put in place for one call at a time under the module's lock, so concurrent requests in
threads or tasks each see their own fine-tune's tensors and the base's are back after every call.

SlotForward routes the same modules for engines that capture their steps in CUDA graphs (the vLLM plugin),
under per-row slot numbers (xorgemm.nn.SlotIds) instead of ids: each of a fixed number of slots has its own
copy of the module's tensors, written when the slot changes, and the module runs on every row once for the
base and once per slot, each row keeping its own slot's result. The same passes over the same tensors
whatever the slots hold, and no host sync, at the price of those passes (small for norms and embedding
lookups) and of a copy of the module's tensors per slot.
"""
from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from xorgemm.errors import InputError
from xorgemm.nn import SlotIds
from xorgemm.serving.state import ServedModel


class RoutedForward:
    """The forward a served model installs on a module some fine-tune holds dense tensors for."""

    def __init__(self, module: nn.Module, st: ServedModel, module_name: str):
        self.module, self.st, self.module_name = module, st, module_name
        self.forward = module.forward  # the module's own forward, bound
        self.tensors: dict[str, str] = {}  # path inside the module ("weight", "out_proj.weight") -> model name
        self.lock = threading.RLock()

    def __deepcopy__(self, memo):  # copy.deepcopy of a served model: the copy routes its own module, own lock
        routed = type(self).__new__(type(self))
        memo[id(self)] = routed
        routed.module = copy.deepcopy(self.module, memo)
        routed.st = copy.deepcopy(self.st, memo)
        routed.module_name = self.module_name
        routed.forward = copy.deepcopy(self.forward, memo)
        routed.tensors = dict(self.tensors)
        routed.lock = threading.RLock()
        return routed

    @classmethod
    def install(cls, module: nn.Module, st: ServedModel, module_name: str) -> RoutedForward:
        """The module's routed forward (of this class), installed on first use."""
        routed = module.__dict__.get("forward")
        if not isinstance(routed, cls):
            routed = cls(module, st, module_name)
            module.forward = routed
        return routed

    def __call__(self, *args, **kwargs):
        selection = self.st.current()
        if not isinstance(selection, torch.Tensor):
            return self._run(selection, args, kwargs)
        ids = selection.reshape(-1) if selection.dim() == 0 else selection
        if ids.dim() != 1:
            raise InputError(f"{self.module_name or 'the model'}: per-row fine-tune ids over more than the batch "
                             f"dimension ({tuple(ids.shape)}) cannot route {type(self.module).__name__}; give one id "
                             "per batch row")
        present = ids.unique().tolist()
        if len(present) == 1:
            return self._run(self._name(present[0]), args, kwargs)
        batch, out = ids.shape[0], None
        for f in present:
            rows = (ids == f).nonzero().reshape(-1)
            part_args = [_rows(a, rows, batch) for a in args]
            part_kwargs = {k: _rows(v, rows, batch) for k, v in kwargs.items()}
            name = self._name(f)
            with self.st.choosing(name):  # nested modules serve this group's fine-tune
                part = self._run(name, part_args, part_kwargs)
            out = _scatter(out, part, rows, batch, self.module_name)
        return out

    def _name(self, f: int) -> str | None:
        if f == -1:
            return None
        if not 0 <= f < len(self.st.finetunes):
            raise InputError(f"fine-tune ids must be in -1..{len(self.st.finetunes) - 1} (-1 is the base), got {f}")
        return self.st.finetunes[f]

    def _run(self, finetune, args, kwargs):
        """The module's forward with `finetune`'s dense tensors in place of the base's (None: the base)."""
        swaps = {}
        if finetune is not None:
            if not isinstance(finetune, str) or finetune not in self.st.finetunes:
                raise InputError(f"unknown fine-tune {finetune!r}; this model has {self.st.finetunes}")
            for path, name in self.tensors.items():
                value = self.st.overrides.value(name, finetune)
                if value is not None:
                    swaps[path] = value
        return self._run_with(swaps, args, kwargs)

    def _run_with(self, swaps, args, kwargs):
        """The module's forward with the tensors `swaps` ({path: tensor}) in place of its own."""
        with self.lock:  # another thread must not see this call's tensors, nor this call another's
            saved = {path: _put(self.module, path, value) for path, value in swaps.items()}
            try:
                return self.forward(*args, **kwargs)
            finally:
                for path, value in saved.items():
                    _put(self.module, path, value)


class SlotForward(RoutedForward):
    """A routed forward with a fixed number of slots (see the module docstring); names and per-row ids are
    still routed as RoutedForward routes them."""

    def __init__(self, module: nn.Module, st: ServedModel, module_name: str):
        super().__init__(module, st, module_name)
        self.slot_values: dict[str, torch.Tensor] = {}  # path -> [slots, *shape]: each slot's tensor at path

    @classmethod
    def install_slots(cls, module: nn.Module, st: ServedModel, module_name: str, n: int,
                      owner=None, attr: str = "forward") -> SlotForward:
        """Routes every parameter of `module` itself (HF names `module_name`.<path>) through `n` slots, all
        holding the base's tensors. The routed call is `module.forward`, or `owner.<attr>` when given (a
        function that reads the module's tensors, such as a vocabulary-parallel embedding's local lookup,
        whose module forward ends in an all-reduce: routing the lookup keeps that one all-reduce, after the
        rows are chosen, so ranks whose slots hold the fine-tunes in different orders still agree)."""
        if owner is None:
            routed = cls.install(module, st, module_name)
        else:
            routed = cls(module, st, module_name)
            routed.forward = getattr(owner, attr)
            setattr(owner, attr, routed)
        with torch.inference_mode(False):  # never inference tensors: set_slot writes them in any mode
            for path, p in module.named_parameters(recurse=False):
                routed.tensors[path] = f"{module_name}.{path}" if module_name else path
                routed.slot_values[path] = p.detach().unsqueeze(0).repeat(n, *[1] * p.dim())
        return routed

    def set_slot(self, slot: int, finetune: str | None):
        """Writes `finetune`'s tensors (the base's where it has none of its own) into `slot`, in place."""
        with self.lock, torch.inference_mode(False), torch.no_grad():
            for path, values in self.slot_values.items():
                value = self.st.overrides.value(self.tensors[path], finetune) if finetune is not None else None
                values[slot].copy_(value if value is not None else _get(self.module, path))

    def __call__(self, *args, **kwargs):
        selection = self.st.current()
        if not isinstance(selection, SlotIds):
            return super().__call__(*args, **kwargs)
        ids = selection.ids.reshape(-1)
        n = len(next(iter(self.slot_values.values()))) if self.slot_values else 0
        # Every pass on copies: the module may work in place on its inputs (vLLM's fused residual norms do).
        # Ranks may hold fine-tunes in different slots: a routed call must not end in a collective (an
        # embedding's lookup is routed, not its all-reduced forward; see install_slots).
        out = self._run_with({}, *_copies(args, kwargs))
        for s in range(n):
            part = self._run_with({path: v[s] for path, v in self.slot_values.items()}, *_copies(args, kwargs))
            out = _select(ids == s, part, out, self.module_name)
        return out


def _copies(args, kwargs):
    copy_ = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return [copy_(a) for a in args], {k: copy_(v) for k, v in kwargs.items()}


def _select(mine: torch.Tensor, part, out, where: str):
    """`part`'s rows where `mine`, else `out`'s, through tuples and lists of outputs."""
    if isinstance(part, torch.Tensor):
        if part.dim() == 0 or part.shape[0] != mine.shape[0]:
            raise InputError(f"{where or 'the model'}: an output without the batch's rows first cannot be routed "
                             "per row")
        return torch.where(mine.to(part.device).reshape(-1, *[1] * (part.dim() - 1)), part, out)
    if isinstance(part, (tuple, list)):
        return type(part)(_select(mine, p, o, where) if isinstance(p, torch.Tensor) else p for p, o in zip(part, out))
    if part is None:
        return None
    raise InputError(f"{where or 'the model'}: a {type(part).__name__} output cannot be routed per row")


def _get(module: nn.Module, path: str) -> torch.Tensor:
    """The tensor at `path` inside `module`."""
    owner_path, _, attr = path.rpartition(".")
    return getattr(module.get_submodule(owner_path) if owner_path else module, attr)


def _put(module: nn.Module, path: str, value):
    """Puts `value` at `path` inside `module` (a parameter, buffer or attribute); returns what was there."""
    owner_path, _, attr = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    for store in (owner._parameters, owner._buffers):
        if attr in store:
            old, store[attr] = store[attr], value
            return old
    old = getattr(owner, attr)
    object.__setattr__(owner, attr, value)
    return old


def _rows(v, rows: torch.Tensor, batch: int):
    """`v`'s rows `rows` if its leading dimension is the batch's, else `v` itself."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
        return v.index_select(0, rows.to(v.device))
    return v


def _scatter(out, part, rows: torch.Tensor, batch: int, where: str):
    """Puts one group's output rows into the whole batch's output (made from the first group's). An output
    that broadcasts over the batch (leading dimension 1: position embeddings of inputs without the batch's
    rows) becomes that group's rows of it; one with every row gives the group's."""
    if isinstance(part, torch.Tensor):
        n = len(rows)
        if part.dim() > 0 and part.shape[0] != n and part.shape[0] == 1:
            part = part.expand(n, *part.shape[1:])
        elif part.dim() > 0 and part.shape[0] != n and part.shape[0] == batch:
            part = part.index_select(0, rows.to(part.device))
        if part.dim() == 0 or part.shape[0] != n:
            raise InputError(f"{where or 'the model'}: an output without the batch's rows first cannot be routed "
                             "per row")
        if out is None:
            out = part.new_empty((batch, *part.shape[1:]))
        return out.index_copy_(0, rows.to(part.device), part)
    if isinstance(part, (tuple, list)):
        outs = [None] * len(part) if out is None else list(out)
        merged = [_scatter(o, p, rows, batch, where) if isinstance(p, torch.Tensor) else p
                  for o, p in zip(outs, part)]
        return type(part)(merged)
    if part is None:
        return None
    raise InputError(f"{where or 'the model'}: a {type(part).__name__} output cannot be routed per row")
