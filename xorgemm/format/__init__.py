"""The .xor.safetensors delta format: tile layout, container, and the lazily decoded DeltaFile."""
from xorgemm.format.container import DeltaFile, DeltaTensor, load_delta
from xorgemm.format.layout import CODEC_NAMES, DEFAULT_TILE

__all__ = ["DeltaFile", "DeltaTensor", "load_delta", "CODEC_NAMES", "DEFAULT_TILE"]
