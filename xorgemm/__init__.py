"""xorgemm: fine-tunes stored losslessly as tiled XOR deltas against a shared base.

The package follows the data: format/ (the file) -> packing/ (pack, unpack, verify) and resident/ (sections
on a device) -> ops.py (torch.ops.xorgemm) -> nn.py (XorLinear) -> serving/ (patch_model, the bank).

    import xorgemm
    xorgemm.pack("base.safetensors", "ft.safetensors", "ft.xor.safetensors")
    sd = xorgemm.unpack("base.safetensors", "ft.xor.safetensors")     # bit-exact fine-tuned state dict
    xorgemm.unpack_to("base", "ft.xor.safetensors", "ft/")            # or its files, a tensor at a time
    delta = xorgemm.load_delta("ft.xor.safetensors")                  # validated, lazily decoded

    from xorgemm import XorLinear                                     # nn.Linear over base XOR delta
    model = xorgemm.patch_model(base_model, {"legal": "legal.xor.safetensors", "med": "med.xor.safetensors"})
    with xorgemm.use(model, "legal"): ...                             # or per-row fine-tune ids
"""
from xorgemm.errors import BaseMismatchError, DeltaFormatError, InputError, XorgemmError
from xorgemm.format import DeltaFile, DeltaTensor, load_delta
from xorgemm.nn import SlotIds, XorLinear
from xorgemm.packing import (
    ManyPackReport,
    PackReport,
    UnpackReport,
    VerifyReport,
    pack,
    pack_many,
    save_state_dict,
    unpack,
    unpack_to,
    verify,
)
from xorgemm.serving import (
    MemoryReport,
    PatchReport,
    ServedModel,
    add_finetune,
    memory_report,
    patch_model,
    remove_finetune,
    select,
    use,
)

__version__ = "0.1.0"

__all__ = [
    "pack", "pack_many", "unpack", "unpack_to", "verify", "load_delta", "save_state_dict", "DeltaFile",
    "DeltaTensor", "PackReport", "ManyPackReport", "UnpackReport",
    "VerifyReport", "XorgemmError", "InputError", "DeltaFormatError", "BaseMismatchError", "XorLinear", "SlotIds",
    "patch_model", "use", "select", "PatchReport", "add_finetune", "remove_finetune", "memory_report",
    "MemoryReport", "ServedModel",
]
