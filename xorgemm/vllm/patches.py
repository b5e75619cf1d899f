"""Every private vLLM internal the plugin patches, in one place, each with why. vLLM 0.32.0 (SUPPORTED_VLLM).

vLLM routes a per-request adapter to per-token slots (LoRA, Punica's segment layout): exactly what a
per-request fine-tune needs. A fine-tune enters as an *empty* LoRA whose weights are our resident deltas:
  1. WorkerLoRAManager._load_adapter: a `.xor.safetensors` path loads into the worker's FinetuneBank (base
     checked tensor by tensor) and returns an empty LoRAModel, instead of parsing a PEFT folder;
  2. LoRAModelManager._add_adapter: registers an empty LoRA without merging its (absent) weights, which
     would raise StopIteration;
  3. LoRAModelManager._create_lora_modules: after vLLM wraps the layers, keep the model and the shared
     Punica wrapper, give every layer vLLM's LoRA slots (FinetuneBank.enable_slots: before any CUDA graph
     is captured), and before the model runs select vLLM's per-token slots (SlotIds);
  4. BaseLinearLayerWithLoRA._apply_lora_to_output: our linear layers have no LoRA product to add;
  5. InputProcessor._validate_lora (front end): a request's delta is validated against the served base
     before the request reaches the engine (admission.py says why);
  6. in 3, the registered adapters' LRU cache: an adapter vLLM evicts or removes frees its resident deltas;
  7. LoRAModelManager.set_adapter_mapping: vLLM calls it before every step, after putting adapters in slots
     (and also when an out-of-band add reassigns slots): every layer's slots are made to hold the same
     fine-tunes. This runs on the host between steps, also before a replayed CUDA graph, which a forward
     hook would not.
"""
from __future__ import annotations

from xorgemm.errors import InputError
from xorgemm.nn import SlotIds
from xorgemm.vllm.admission import check_request
from xorgemm.vllm.method import XorLinearMethod, bank_of

_APPLIED = False


def apply_patches():
    global _APPLIED
    if _APPLIED:  # plugins may load more than once per process
        return
    _APPLIED = True
    from vllm.lora import model_manager, worker_manager
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.lora_model import LoRAModel

    manager, worker = model_manager.LoRAModelManager, worker_manager.WorkerLoRAManager
    create_modules, add_adapter = manager._create_lora_modules, manager._add_adapter
    set_mapping = manager.set_adapter_mapping
    load_adapter, lora_output = worker._load_adapter, BaseLinearLayerWithLoRA._apply_lora_to_output

    def _create_lora_modules(self):  # 3
        create_modules(self)
        bank = self._xorgemm_bank = bank_of(self.model)  # None: a model the plugin does not serve
        if bank is None:
            return
        bank.model, bank.manager = self.model, self
        bank.punica = next((m.punica_wrapper for m in self.modules.values()
                            if getattr(m, "punica_wrapper", None) is not None), None)
        bank.enable_slots(self.lora_slots)
        self.model.register_forward_pre_hook(lambda module, args: _select_step(bank))
        # 6. Every way an adapter leaves the registered set (LRU eviction, remove_adapter) goes through this
        # cache's deactivate_fn: the fine-tune's resident deltas go with it.
        registered, deactivate = self._registered_adapters, self._registered_adapters.deactivate_fn

        def _evict(lora_id):
            deactivate(lora_id)
            bank.remove(lora_id)

        registered.deactivate_fn = _evict

    def _add_adapter(self, lora):  # 2
        if not lora.loras:
            self._registered_adapters[lora.id] = lora
            return
        add_adapter(self, lora)

    def _load_adapter(self, request):  # 1
        path = str(request.lora_path)
        if not path.endswith(".xor.safetensors"):
            return load_adapter(self, request)
        bank = getattr(self._adapter_manager, "_xorgemm_bank", None)
        if bank is None:
            raise ValueError(f"{path}: a .xor.safetensors fine-tune needs the engine started with "
                             "xorgemm.vllm.engine_args (quantization='xorgemm')")
        name = f"lora{request.lora_int_id}"
        if name not in bank.st.finetunes:
            bank.add(name, path)
        bank.id_to_name[request.lora_int_id] = name
        return LoRAModel(request.lora_int_id, 1, {})

    def set_adapter_mapping(self, mapping):  # 7
        set_mapping(self, mapping)
        bank = getattr(self, "_xorgemm_bank", None)
        if bank is not None:
            bank.sync_slots(self.lora_index_to_id)

    def _apply_lora_to_output(self, x, output):  # 4
        if isinstance(self.base_layer.quant_method, XorLinearMethod):
            return output
        return lora_output(self, x, output)

    from vllm.v1.engine import input_processor

    processor = input_processor.InputProcessor
    validate_lora = processor._validate_lora

    def _validate_lora(self, lora_request):  # 5
        validate_lora(self, lora_request)
        if lora_request is not None and str(lora_request.lora_path).endswith(".xor.safetensors"):
            if self.model_config.quantization != "xorgemm":
                raise InputError(f"{lora_request.lora_path}: a .xor.safetensors fine-tune needs the engine started "
                                 "with xorgemm.vllm.engine_args (quantization='xorgemm')")
            check_request(self.model_config.model, str(lora_request.lora_path))

    processor._validate_lora = _validate_lora
    manager._create_lora_modules, manager._add_adapter = _create_lora_modules, _add_adapter
    manager.set_adapter_mapping = set_adapter_mapping
    worker._load_adapter = _load_adapter
    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output


def _select_step(bank):
    """Before each model step run in Python (eager, or captured into a CUDA graph): vLLM's per-token LoRA slots
    become the selection. Its buffer on the device, not its values: a replay reads what the step holds."""
    bank.sync_slots(bank.manager.lora_index_to_id)
    pw = bank.punica
    bank.st.default = None if pw is None or pw.indices_len[0] is None else SlotIds(pw.token_lora_indices)
