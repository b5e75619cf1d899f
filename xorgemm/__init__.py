"""xorgemm: fine-tunes stored losslessly as tiled XOR deltas against a shared base.

    import xorgemm
    xorgemm.pack("base.safetensors", "ft.safetensors", "ft.xor.safetensors")
    sd = xorgemm.unpack("base.safetensors", "ft.xor.safetensors")     # bit-exact fine-tuned state dict
    delta = xorgemm.load_delta("ft.xor.safetensors")                  # validated, lazily decoded
"""
from xorgemm.delta import PackReport, VerifyReport, pack, save_state_dict, unpack, verify
from xorgemm.errors import BaseMismatchError, DeltaFormatError, InputError, XorgemmError
from xorgemm.format import DeltaFile, DeltaTensor, load_delta

__version__ = "0.1.0"

__all__ = [
    "pack", "unpack", "verify", "load_delta", "save_state_dict", "DeltaFile", "DeltaTensor", "PackReport",
    "VerifyReport", "XorgemmError", "InputError", "DeltaFormatError", "BaseMismatchError",
]
