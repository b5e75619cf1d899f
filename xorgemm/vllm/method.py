"""The public vLLM hooks: a quantization config whose methods serve each layer from the base plus resident
fine-tune deltas, and the worker-side bank of fine-tunes they read.

Linear layers (merged q/k/v and gate/up included: one XorLinear per Hugging Face sub-layer, each on a row
slice of the merged base weight, sharing its storage) go through XorLinearMethod; the head through
XorLMHeadMethod (one row per request, by vLLM's sampler indices); norms and embeddings through routed
forwards (xorgemm.serving.routing) over dense per-fine-tune copies. The selection in force during a step is
per-token ids that patches.py derives from vLLM's LoRA slots.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

from xorgemm.errors import InputError
from xorgemm.format.reader import load_delta
from xorgemm.nn import XorLinear
from xorgemm.serving.routing import RoutedForward
from xorgemm.serving.state import ServedModel

logger = logging.getLogger(__name__)

# vLLM's merged layers and the Hugging Face sub-layers they stack, in row order.
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class FinetuneBank:
    """This worker's fine-tunes: the served-model state the layers read, and where each tensor is served."""

    def __init__(self):
        self.st = ServedModel()
        self.linears: dict[str, XorLinear] = {}  # HF weight name -> the XorLinear serving it
        self.model = None  # the vLLM model, its LoRA manager and their shared Punica wrapper, once vLLM has
        self.manager = None  # made its LoRA modules (patches.py)
        self.punica = None
        self.id_to_name: dict[int, str] = {}  # LoRA int id -> fine-tune name in st.finetunes

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
        linear, dense = {}, {}
        for tname, t in d.tensors.items():
            if t.kind == "same":
                continue
            if tname in self.linears:
                layer = self.linears[tname]
                if t.kind != "xor" or t.tile != layer.tile:
                    why = f"stored whole ({t.reason})" if t.kind == "whole" else f"tiled {t.tile}, not {layer.tile}"
                    raise InputError(f"{d.path}: tensor '{tname}': {why}; vLLM's layer cannot serve it per request")
                t.check_base(layer.base_weight)
                linear[tname] = t
                continue
            module, attr = self.dense_reader(tname)
            base = getattr(module, attr, None) if module is not None else None
            served_here = isinstance(base, torch.Tensor) and (
                isinstance(getattr(module, "quant_method", None), XorLMHeadMethod) or _row_wise(module))
            if t.kind == "whole" or not served_here:
                why = f"stored whole ({t.reason})" if t.kind == "whole" else "not a tensor xorgemm serves per row here"
                raise InputError(f"{d.path}: tensor '{tname}': {why}; this vLLM model cannot serve it per request")
            t.check_base(base.detach().cpu())
            dense[tname] = (t, module, attr, base)
        for tname, layer in self.linears.items():  # every layer gets the fine-tune: unchanged ones an empty delta
            if tname in linear:
                layer.add_finetune_from_file(name, linear[tname], check_base=False)
            else:
                layer.add_unchanged(name)
        for tname, (t, module, attr, base) in dense.items():
            self.st.overrides.add(tname, name, t.apply(base.detach().cpu(), verify=False).to(base.device))
            if not isinstance(getattr(module, "quant_method", None), XorLMHeadMethod):  # the head reads them itself
                RoutedForward.install(module, self.st, tname.rpartition(".")[0]).tensors[attr] = tname
        self.st.finetunes.append(name)
        logger.info("xorgemm: loaded fine-tune %s from %s: %s bytes resident", name, path,
                    f"{self.resident_bytes()[name]:,}")

    def remove(self, lora_id: int):
        """Frees what fine-tune `lora_id` keeps resident (vLLM's LRU evicted it); the base is untouched."""
        name = self.id_to_name.pop(lora_id, None)
        if name is None or name not in self.st.finetunes:
            return
        for layer in self.linears.values():
            layer.remove_finetune(name)
        self.st.overrides.drop(name)
        self.st.finetunes.remove(name)
        logger.info("xorgemm: evicted fine-tune %s; %d resident, %s bytes", name, len(self.st.finetunes),
                    f"{sum(self.resident_bytes().values()):,}")

    def resident_bytes(self) -> dict[str, int]:
        """Bytes each resident fine-tune keeps: delta sections, tile offsets and biases of every layer, and its
        dense copies (norms, embeddings, head)."""
        out = dict.fromkeys(self.st.finetunes, 0)
        for layer in self.linears.values():
            for name in layer.finetunes:
                out[name] += layer.resident_bytes(name)
        for name, n in self.st.overrides.bytes_per_finetune().items():
            out[name] += n
        return out

    def sampler_ids(self) -> torch.Tensor | None:
        """Per-request fine-tune ids for the rows the head computes logits for (vLLM's sampler indices)."""
        pw = self.punica
        if pw is None or pw.indices_len[1] is None:
            return None
        return self.ids(pw.sampler_indices, self.manager.lora_index_to_id)

    def ids(self, slots: torch.Tensor, slot_to_id) -> torch.Tensor:
        """Per-row fine-tune ids (indices into st.finetunes, -1 the base) from vLLM's per-row LoRA slots."""
        lut = [self.st.finetunes.index(self.id_to_name[i]) if i in self.id_to_name else -1 for i in slot_to_id]
        return torch.tensor(lut + [-1], dtype=torch.long)[slots.cpu().long()]


BANK = FinetuneBank()


def _row_wise(module) -> bool:
    """Modules whose output rows depend only on the same input rows: what routing per row group serves."""
    name = type(module).__name__
    return bool(re.search(r"Norm|Embedding", name))


class XorgemmConfig(QuantizationConfig):
    """`quantization="xorgemm"`: layers served from the base plus resident XOR deltas."""

    def __init__(self):
        super().__init__()

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
        if isinstance(layer, ParallelLMHead):
            return XorLMHeadMethod()
        if isinstance(layer, LinearBase):
            return XorLinearMethod()
        return None


class XorLinearMethod(UnquantizedLinearMethod):
    """A vLLM linear layer as XorLinears over row slices of its (merged) base weight."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, *args, **kwargs):
        # vLLM passes these by keyword: keep the parameter names.
        layer._xorgemm_parts = list(output_partition_sizes)
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, *args, **kwargs)

    def process_weights_after_loading(self, layer):
        # Not the inherited one: on the CPU it repacks the weight for oneDNN and drops `layer.weight`.
        from vllm.distributed import get_tensor_model_parallel_world_size

        if get_tensor_model_parallel_world_size() > 1:  # deltas would need slicing on tile boundaries per rank
            raise NotImplementedError("xorgemm's vLLM plugin serves tensor_parallel_size=1 only for now")
        parent, _, leaf = layer.prefix.rpartition(".")
        w, row = layer.weight.data, 0
        layer._xorgemm_subs = []
        for sub, rows in zip(MERGED.get(leaf, (leaf,)), layer._xorgemm_parts):
            xl = XorLinear(w[row:row + rows])  # a row slice: the base storage is shared, never copied
            xl.active = BANK.st.current
            row += rows
            BANK.linears[f"{parent}.{sub}.weight"] = xl
            layer._xorgemm_subs.append(xl)

    def apply(self, layer, x, bias=None):
        outs = [xl(x) for xl in layer._xorgemm_subs]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y if bias is None else y + bias


class XorLMHeadMethod(UnquantizedEmbeddingMethod):
    """The output head, one row per request: each request's fine-tune's head where it changed it."""

    def apply(self, layer, x, bias=None):
        sampler = BANK.sampler_ids()
        out = F.linear(x, layer.weight, bias)
        if sampler is None or not BANK.st.overrides.tuned.get("lm_head.weight"):
            return out
        for f in sampler.unique().tolist():
            if f < 0:
                continue
            w = BANK.st.overrides.value("lm_head.weight", BANK.st.finetunes[f])
            if w is not None:
                rows = (sampler == f).nonzero().reshape(-1)
                out[rows] = F.linear(x[rows], w, bias)
        return out


__all__ = ["XorgemmConfig", "XorLinearMethod", "XorLMHeadMethod", "BANK"]
