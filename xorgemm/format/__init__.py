"""The .xor.safetensors delta format: tile layout (layout), hashes, the container writer and reader, and
DeltaTensor, one tensor's lazily decoded entry."""
from xorgemm.format.layout import CODEC_NAMES, DEFAULT_TILE
from xorgemm.format.reader import DeltaFile, load_delta
from xorgemm.format.tensor import DeltaTensor

__all__ = ["DeltaFile", "DeltaTensor", "load_delta", "CODEC_NAMES", "DEFAULT_TILE"]
