"""pack / unpack / verify: a fine-tune as a lossless XOR delta against its base, and back, bit for bit.

The checkpoints come in through sources.py (state dicts, modules, .safetensors files, model folders), and
every command runs its tensors through pipeline.py: all cores, memory bounded by the largest tensor."""
from xorgemm.errors import XorgemmError
from xorgemm.packing.pack import (
           DEFAULT_MAX_SHARD_SIZE,
           ManyPackReport,
           PackReport,
           TensorReport,
           finetune_name,
           pack,
           pack_many,
)
from xorgemm.packing.unpack import UnpackReport, VerifyReport, parse_size, save_state_dict, unpack, unpack_to, verify

__all__ = ["pack", "pack_many", "unpack", "unpack_to", "verify", "save_state_dict", "parse_size", "PackReport",
           "ManyPackReport", "TensorReport", "UnpackReport", "VerifyReport", "XorgemmError", "finetune_name",
           "DEFAULT_MAX_SHARD_SIZE"]
