"""The hashes a delta file records: XXH3-64 of tensors (which base, which fine-tune), of chunks, of a base."""
from __future__ import annotations

import torch
import xxhash

from xorgemm.format.layout import HASH_HEX, tensor_bytes


def digest(data: torch.Tensor | bytes) -> str:
    """XXH3-64 of a tensor's bytes (~10 GB/s): tells a wrong base or a corrupted result apart."""
    buf = tensor_bytes(data).numpy() if isinstance(data, torch.Tensor) else data
    return xxhash.xxh3_64_hexdigest(memoryview(buf))


def checksum(raw: bytes) -> int:
    """XXH3-64 of a chunk, as the signed 64-bit integer the I64 chunk table stores."""
    h = xxhash.xxh3_64_intdigest(raw)
    return h - (1 << 64) if h >= 1 << 63 else h


def base_fingerprint(base_hashes: dict[str, str]) -> str:
    """One hash for a whole base model: over the sorted (name, base hash) pairs the delta depends on."""
    h = xxhash.xxh3_64()
    for name in sorted(base_hashes):
        h.update(name.encode() + b"\0" + base_hashes[name].encode() + b"\n")
    return h.hexdigest()


def is_hash(h) -> bool:
    """Whether `h` is a digest() as the index stores it: HASH_HEX lowercase hex digits."""
    return isinstance(h, str) and len(h) == HASH_HEX and all(ch in "0123456789abcdef" for ch in h)
