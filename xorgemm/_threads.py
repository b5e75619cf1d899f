"""How many threads xorgemm's CPU work (pack, unpack, verify: packing/pipeline.py) runs on."""
from __future__ import annotations

import os

from xorgemm.errors import InputError


def threads() -> int:
    """Worker threads: XORGEMM_THREADS if set, else the cores this process may run on."""
    env = os.environ.get("XORGEMM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise InputError(f"XORGEMM_THREADS={env!r} must be a positive integer")
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
