"""The public vLLM hooks: a quantization config whose methods serve each layer from the base plus resident
fine-tune deltas, and the worker-side bank of fine-tunes they read.

Linear layers (merged q/k/v and gate/up included: one XorLinear per Hugging Face sub-layer, each on a row
slice of the merged base weight, sharing its storage) go through XorLinearMethod; the head through
XorLMHeadMethod (one row per request, by vLLM's sampler indices); norms and embeddings through slot forwards
(xorgemm.serving.routing.SlotForward). Every layer has vLLM's LoRA slots as its own (max_loras of them):
an XorLinear's slot table points at the resident deltas of the fine-tune in each slot, a norm's or
embedding's slot holds a copy of that fine-tune's tensor. patches.py rewrites them when vLLM changes what
its slots hold, and a step's selection is vLLM's per-token slot numbers themselves (SlotIds), on the
device: a step reads nothing on the host, and the same kernels read the same tensors whatever the slots
hold, which is what a CUDA graph captured once needs.

Tensor parallel: each rank's XorLinear serves its block of the Hugging Face weight (rows for column-parallel
layers, columns for row-parallel ones), and gets that block of each delta cut from the tiles as they are
(DeltaTensor.block_section): shard boundaries must fall on 64-wide tiles, checked when the engine starts.
Vocabulary-parallel embeddings and head get their shard of each dense copy through vLLM's own weight
loader. The base hashes are checked against the whole tensors in the front end (admission.py).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

from xorgemm.errors import BaseMismatchError, InputError
from xorgemm.format.layout import DEFAULT_TILE
from xorgemm.format.reader import load_delta
from xorgemm.nn import XorLinear
from xorgemm.packing.sources import open_source
from xorgemm.resident import resident_section
from xorgemm.serving.routing import SlotForward
from xorgemm.serving.state import ServedModel

logger = logging.getLogger(__name__)

# vLLM's merged layers and the Hugging Face sub-layers they stack, in row order.
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class LinearShard:
    """Where a Hugging Face Linear weight is served on this rank."""

    xl: XorLinear  # over this rank's block of the weight (a view of vLLM's merged local weight)
    block: tuple[tuple[int, int], tuple[int, int]]  # that block's rows and columns in the whole HF weight
    full: bool  # the block is the whole weight (no tensor parallel split)
    bias: str | None  # the layer's bias: added "here" by the XorLinear, on "another rank" (row-parallel), or
    # "outside" the layer by the model (skip_bias_add); None: the layer has none


class FinetuneBank:
    """This worker's fine-tunes: the served-model state the layers read, and where each tensor is served."""

    def __init__(self):
        self.st = ServedModel()
        self.linears: dict[str, LinearShard] = {}  # HF weight name -> where it is served
        self.model = None  # the vLLM model, its LoRA manager and their shared Punica wrapper, once vLLM has
        self.manager = None  # made its LoRA modules (patches.py)
        self.punica = None
        self.id_to_name: dict[int, str] = {}  # LoRA int id -> fine-tune name in st.finetunes
        self.model_dir = None  # the served checkpoint's folder: whole base tensors for the ranks' shards
        self._base_source = None
        self.slot_names: list[str | None] = []  # the fine-tune in each of vLLM's LoRA slots (enable_slots)
        self.slot_forwards: dict[str, SlotForward] = {}  # HF module name -> the slots of a norm or embedding

    def enable_slots(self, n: int):
        """Gives every layer vLLM's `n` LoRA slots, all empty (the base): from here on a step runs the same
        kernels on the same tensors whatever the slots hold. Norms and embeddings get a copy of each of their
        parameters per slot."""
        self.slot_names = [None] * n
        for shard in self.linears.values():
            shard.xl.enable_slots(n)
        for mname, module in self.model.named_modules():
            # vLLM's LoRA wrapper of the embedding calls its base_layer's forward: that is what is routed.
            if hasattr(module, "base_layer") or not _row_wise(module) or not list(module.parameters(recurse=False)):
                continue
            hf = mname.removesuffix(".base_layer")
            lookup = getattr(getattr(module, "quant_method", None), "embedding", None)
            if lookup is not None:  # an embedding: route its local lookup, not the forward's all-reduce
                self.slot_forwards[hf] = SlotForward.install_slots(module, self.st, hf, n, module.quant_method,
                                                                   "embedding")
            else:
                self.slot_forwards[hf] = SlotForward.install_slots(module, self.st, hf, n)

    def sync_slots(self, slot_to_id):
        """Makes every layer's slots hold what vLLM's LoRA slots hold (`slot_to_id`: LoRA int id or None per
        slot; an id this bank has not loaded, such as vLLM's dummy LoRAs, is the base). Host-side, between
        steps: only slots that changed are rewritten."""
        names = [self.id_to_name.get(i) if i is not None else None for i in slot_to_id]
        for s, name in enumerate(names):
            if s < len(self.slot_names) and self.slot_names[s] != name:
                self._set_slot(s, name)

    def _set_slot(self, s: int, name: str | None):
        for shard in self.linears.values():
            shard.xl.set_slot(s, name)
        for routed in self.slot_forwards.values():
            routed.set_slot(s, name)
        self.slot_names[s] = name

    def dense_reader(self, tname: str):
        """(module, path) of the module that reads HF tensor `tname`, for tensors no XorLinear serves."""
        owner, _, attr = tname.rpartition(".")
        try:
            module = self.model.get_submodule(owner)
        except AttributeError:
            return None, None
        # vLLM's LoRA wrapper (embeddings) adds its per-token LoRA output around base_layer.forward: route that.
        return getattr(module, "base_layer", module), attr

    def add(self, name: str, path: str):
        """Loads fine-tune `name` from a .xor.safetensors delta and makes it resident beside the base. Every
        tensor is checked (served here, made from this base) before anything changes."""
        d = load_delta(path)
        linear, biases, dense = {}, {}, {}
        for tname, t in d.tensors.items():
            if t.kind == "same":
                continue
            if t.kind == "whole":  # admission.py refuses these first; the worker holds the same line
                raise InputError(f"{d.path}: tensor '{tname}': stored whole ({t.reason}); this vLLM model "
                                 "cannot serve it per request")
            if tname in self.linears:
                linear[tname] = self._linear_delta(t, self.linears[tname])
                continue
            weight = tname.removesuffix(".bias") + ".weight"
            if tname.endswith(".bias") and weight in self.linears:
                shard = self.linears[weight]
                if shard.bias in ("outside", None):
                    why = "vLLM adds this layer's bias outside it" if shard.bias else "vLLM's layer has no bias"
                    raise InputError(f"{d.path}: tensor '{tname}': {why}; a fine-tuned bias cannot be served per "
                                     "request here")
                if shard.bias == "here":  # else a row-parallel layer's bias, which rank 0 serves
                    biases[weight] = _local_copy(t, shard.xl.bias, self._whole_base, shard.block[0])
                continue
            module, attr = self.dense_reader(tname)
            base = getattr(module, attr, None) if module is not None else None
            routed = self.slot_forwards.get(tname.rpartition(".")[0])
            served_here = isinstance(base, torch.Tensor) and (
                isinstance(getattr(module, "quant_method", None), XorLMHeadMethod)
                or (routed is not None and attr in routed.slot_values))
            if not served_here:
                raise InputError(f"{d.path}: tensor '{tname}': not a tensor xorgemm serves per row here; this "
                                 "vLLM model cannot serve it per request")
            dense[tname] = (_local_copy(t, base, self._whole_base, loader=getattr(base, "weight_loader", None)),
                            module, attr)
        for tname, shard in self.linears.items():  # every layer gets the fine-tune: unchanged ones an empty delta
            section, bias = linear.get(tname), biases.get(tname)
            if section is None:
                shard.xl.add_unchanged(name, bias)
            else:
                shard.xl.add_finetune_section(name, section, bias)
        tied = getattr(getattr(self.model, "config", None), "tie_word_embeddings", False)
        heads = [m for m in self.model.modules()
                 if tied and isinstance(getattr(m, "quant_method", None), XorLMHeadMethod)]
        for tname, (value, module, attr) in dense.items():
            self.st.overrides.add(tname, name, value)
            if isinstance(getattr(module, "quant_method", None), XorLMHeadMethod):
                module._xorgemm_head = tname  # the head reads its copies itself
                continue
            for head in heads:  # tied embeddings: the head is this very tensor, and serves its copies too
                if getattr(head, "weight", None) is getattr(module, attr):
                    head._xorgemm_head = tname
        self.st.finetunes.append(name)
        logger.info("xorgemm: loaded fine-tune %s from %s: %s bytes resident", name, path,
                    f"{self.resident_bytes()[name]:,}")

    @staticmethod
    def _linear_delta(t, shard: LinearShard):
        """The delta section that serves `t` on this rank: its whole section made resident beside the weight
        (its base checked; on a GPU decompressed there), else the section of this rank's block of it, cut
        on tile boundaries."""
        if t.tile != shard.xl.tile:  # admission.py refuses these first
            raise InputError(f"{t.where()}: tiled {t.tile}, not {shard.xl.tile}; vLLM's layer cannot serve it")
        if shard.full:
            t.check_base(shard.xl.base_weight)
            return resident_section(t, shard.xl.base_weight.device)[0]
        if t.dtype != shard.xl.base_weight.dtype:
            raise BaseMismatchError(f"{t.where()}: the delta is {t.dtype}, the served weight "
                                    f"{shard.xl.base_weight.dtype}")
        return t.block_section(*shard.block)[0]

    def remove(self, lora_id: int):
        """Frees what fine-tune `lora_id` keeps resident (vLLM's LRU evicted it); the base is untouched."""
        name = self.id_to_name.pop(lora_id, None)
        if name is None or name not in self.st.finetunes:
            return
        for s, held in enumerate(self.slot_names):  # its slots emptied before its memory is freed
            if held == name:
                self._set_slot(s, None)
        for shard in self.linears.values():
            shard.xl.remove_finetune(name)
        self.st.overrides.drop(name)
        self.st.finetunes.remove(name)
        logger.info("xorgemm: evicted fine-tune %s; %d resident, %s bytes", name, len(self.st.finetunes),
                    f"{sum(self.resident_bytes().values()):,}")

    def resident_bytes(self) -> dict[str, int]:
        """Bytes each resident fine-tune keeps: delta sections, tile offsets and biases of every layer, and its
        dense copies (norms, embeddings, head)."""
        out = dict.fromkeys(self.st.finetunes, 0)
        for shard in self.linears.values():
            for name in shard.xl.finetunes:
                out[name] += shard.xl.resident_bytes(name)
        for name, n in self.st.overrides.bytes_per_finetune().items():
            out[name] += n
        return out

    def _whole_base(self, tname: str) -> torch.Tensor:
        """The whole base tensor `tname`, read from the served checkpoint: a rank holds only its shard, and
        a conditioned tile decodes against its whole base tile."""
        if self.model_dir is None:
            raise InputError(f"tensor '{tname}': this rank holds a shard of it and the served checkpoint's "
                             "folder is unknown")
        if self._base_source is None:  # opened once (lazily, mmap): a fine-tune reads several tensors
            self._base_source = open_source(self.model_dir, "base")
        return self._base_source.get(tname)

    def slot_bytes(self) -> int:
        """Bytes the slots keep whatever they hold: the norms' and embeddings' per-slot copies, the tables."""
        n = sum(v.numel() * v.element_size() for r in self.slot_forwards.values() for v in r.slot_values.values())
        for shard in self.linears.values():
            n += sum(t.numel() * t.element_size() for t in (shard.xl._slot_table, shard.xl._slot_bias)
                     if t is not None)
        return n

    def sampler_slots(self) -> torch.Tensor | None:
        """Per-request LoRA slots (-1 none) of the rows the head computes logits for: vLLM's sampler indices."""
        pw = self.punica
        if pw is None or pw.indices_len[1] is None:
            return None
        return pw.sampler_indices


# The bank of the engine whose model was made last in this process (each engine has its own: XorgemmConfig
# makes it), for in-process inspection: tests and bench/serve.py read its resident bytes.
BANK: FinetuneBank | None = None


def bank_of(model) -> FinetuneBank | None:
    """The fine-tune bank of a vLLM model served through the plugin (its layers' methods hold it)."""
    for m in model.modules():
        bank = getattr(getattr(m, "quant_method", None), "bank", None)
        if isinstance(bank, FinetuneBank):
            return bank
    return None


def _xor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a XOR b, bit for bit, as a's dtype."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return (a.view(as_int) ^ b.to(a.device).view(as_int)).view(a.dtype)


def _local_copy(t, base: torch.Tensor, whole_base, rows: tuple[int, int] | None = None, loader=None) -> torch.Tensor:
    """This rank's fine-tuned copy of tensor `t`, whose local base is `base`: base XOR this rank's part of the
    delta, which is rows `rows` of it, or what vLLM's weight `loader` puts on this rank (vocabulary shards,
    padding rows left as the base's; a replicated tensor whole), else the whole delta for a tensor of the
    same shape (`t` applied, its base hash checked). The delta is decoded against the whole base tensor
    (`whole_base(name)`: conditioned tiles need it), whose hash apply() checks."""
    attrs = {k: v for k, v in vars(base).items() if k != "weight_loader"}  # vLLM's sharding facts (output_dim...)
    base = base.detach()
    if rows is None and loader is None and tuple(base.shape) == t.shape:
        t.check_base(base.cpu())
        return t.apply(base.cpu(), verify=False).to(base.device)
    if base.dtype != t.dtype:
        raise BaseMismatchError(f"{t.where()}: the delta is {t.dtype}, the served tensor {base.dtype}")
    xor = t.xor_bytes(whole_base(t.name)).view(t.dtype).reshape(t.shape)
    part = None
    if rows is not None:
        part = xor[rows[0]:rows[1]]
    elif loader is not None:
        param = torch.nn.Parameter(torch.zeros_like(base, device="cpu"), requires_grad=False)
        param.__dict__.update(attrs)
        try:
            loader(param, xor)
            part = param.data
        except (AssertionError, RuntimeError, ValueError):  # vLLM's loaders assert shapes
            part = None
    if part is None or tuple(part.shape) != tuple(base.shape):
        raise BaseMismatchError(f"{t.where()}: the delta is {list(t.shape)}, this rank serves "
                                f"{list(base.shape)} of it and cannot tell which part")
    return _xor(base, part)


def _row_wise(module) -> bool:
    """Modules whose output rows depend only on the same input rows: what routing per row group serves."""
    name = type(module).__name__
    return bool(re.search(r"Norm|Embedding", name))


class XorgemmConfig(QuantizationConfig):
    """`quantization="xorgemm"`: layers served from the base plus resident XOR deltas."""

    def __init__(self):
        super().__init__()
        self.bank = None  # this engine's fine-tunes, made with its first layer

    def __getstate__(self):  # the config travels to worker processes before any layer: each makes its own
        return {**self.__dict__, "bank": None}

    def get_name(self):
        return "xorgemm"

    def get_supported_act_dtypes(self):
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls):
        return 0

    @staticmethod
    def get_config_filenames():
        return []

    @classmethod
    def from_config(cls, config):
        return cls()

    def get_quant_method(self, layer, prefix):
        global BANK
        if self.bank is None:
            from vllm.config import get_current_vllm_config_or_none  # set while vLLM builds the model

            self.bank = BANK = FinetuneBank()
            config = get_current_vllm_config_or_none()
            self.bank.model_dir = config.model_config.model if config is not None else None
        if isinstance(layer, ParallelLMHead):
            return XorLMHeadMethod(self.bank)
        if isinstance(layer, LinearBase):
            return XorLinearMethod(self.bank)
        return None


class XorLinearMethod(UnquantizedLinearMethod):
    """A vLLM linear layer as XorLinears over row slices of its (merged) base weight."""

    def __init__(self, bank: FinetuneBank):
        super().__init__()
        self.bank = bank

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, *args, **kwargs):
        # vLLM passes these by keyword: keep the parameter names.
        layer._xorgemm_parts = list(output_partition_sizes)
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, *args, **kwargs)

    def process_weights_after_loading(self, layer):
        # Not the inherited one: on the CPU it repacks the weight for oneDNN and drops `layer.weight`.
        parent, _, leaf = layer.prefix.rpartition(".")
        w = layer.weight.data
        # The bias is added where this layer's forward passes it to apply(): not on the ranks > 0 of a
        # row-parallel layer (after the all-reduce it would count tp_size times), nor with skip_bias_add.
        bias = None
        if layer.bias is not None:
            bias = "here"
            if getattr(layer, "skip_bias_add", False):
                bias = "outside"
            elif isinstance(layer, RowParallelLinear) and getattr(layer, "tp_rank", 0) > 0:
                bias = "another rank"
        layer._xorgemm_subs = []
        for sub, (rows, block, full) in zip(MERGED.get(leaf, (leaf,)), _blocks(layer)):
            name = f"{parent}.{sub}.weight"
            for axis, what in enumerate(("rows", "columns")):
                for edge in block[axis]:
                    if edge % DEFAULT_TILE[axis] and edge != full[axis]:
                        raise InputError(
                            f"xorgemm: tensor parallel size {getattr(layer, 'tp_size', 1)} splits '{name}' at "
                            f"{what} {edge} of {full[axis]}, not on a {DEFAULT_TILE[axis]}-wide tile boundary; "
                            "serve this model with a tensor parallel size that splits it on tiles")
            xl = XorLinear(w[rows[0]:rows[1]], layer.bias.data[rows[0]:rows[1]] if bias == "here" else None)
            xl.active = self.bank.st.current  # a row slice: the base storage is shared, never copied
            self.bank.linears[name] = LinearShard(xl, block, block == ((0, full[0]), (0, full[1])), bias)
            layer._xorgemm_subs.append(xl)

    def apply(self, layer, x, bias=None):
        # The bias, where vLLM passes one, is the XorLinears' own (each fine-tune's, per row).
        outs = [xl(x) for xl in layer._xorgemm_subs]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _blocks(layer):
    """Per Hugging Face sub-layer of a vLLM linear layer, in row order: its rows in the layer's local
    (merged) weight, this rank's block of the sub-layer's whole weight as ((row0, row1), (col0, col1)), and
    that whole weight's (rows, cols)."""
    rank, size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    cols = layer.weight.shape[1]
    col0, full_cols = (rank * cols, cols * size) if isinstance(layer, RowParallelLinear) else (0, cols)
    out, row = [], 0
    for i, part in enumerate(layer._xorgemm_parts):
        shard, shards = 0, 1
        if isinstance(layer, ColumnParallelLinear):
            shard, shards = rank, size
            if isinstance(layer, QKVParallelLinear) and i > 0:  # k and v: heads replicated over ranks
                shard, shards = rank // layer.num_kv_head_replicas, size // layer.num_kv_head_replicas
        block = ((shard * part, (shard + 1) * part), (col0, col0 + cols))
        out.append(((row, row + part), block, (part * shards, full_cols)))
        row += part
    return out


class XorLMHeadMethod(UnquantizedEmbeddingMethod):
    """The output head, one row per request: each request's fine-tune's head where it changed it."""

    def __init__(self, bank: FinetuneBank):
        super().__init__()
        self.bank = bank

    def apply(self, layer, x, bias=None):
        out = F.linear(x, layer.weight, bias)
        bank = self.bank
        heads = bank.st.overrides.tuned.get(getattr(layer, "_xorgemm_head", None))
        sampler = bank.sampler_slots() if heads else None
        if sampler is None:
            return out
        # Every row through the head of each slot whose fine-tune changed it, kept where the row is of that
        # slot: no host sync on the slots (a decode step reads each head once either way). vLLM computes the
        # logits outside its CUDA graphs, so these passes may follow what the slots hold.
        for s, name in enumerate(bank.slot_names):
            w = heads.get(name) if name is not None else None
            if w is not None:
                out = torch.where((sampler == s).unsqueeze(-1), F.linear(x, w, bias), out)
        return out


__all__ = ["XorgemmConfig", "XorLinearMethod", "XorLMHeadMethod", "FinetuneBank", "bank_of"]
