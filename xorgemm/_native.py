"""Loads the compiled extensions, with an error that says how to build them."""
import functools
import importlib.util

try:
    from xorgemm import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "xorgemm's C++ extension is not built; run `pip install --no-build-isolation -e .` in the repository"
    ) from e

if importlib.util.find_spec("xorgemm._C_cuda") is None:  # built without CUDA (no nvcc, or a CPU build of torch)
    _C_cuda = None
else:
    try:
        from xorgemm import _C_cuda  # noqa: F401
    except ImportError as e:  # built, but it does not load: say so rather than silently serve without it
        raise ImportError(f"xorgemm's CUDA extension is built but does not load ({e}); rebuild it with "
                          "`pip install --no-build-isolation -e .`, or set XORGEMM_FORCE_CPU=1 when building") from e

C = _C
CUDA = _C_cuda


@functools.cache
def has_kernel(device_type: str) -> bool:
    """Whether the xorgemm ops have a kernel for this device type (fixed once the extensions are loaded:
    cached, as XorLinear.forward asks on every call)."""
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("xorgemm::xor_linear", key)


def require_kernel(device_type: str, what: str):
    """Raises NotImplementedError naming `what` when the ops have no kernel for this device type."""
    if not has_kernel(device_type):
        hint = (" (xorgemm was built without its CUDA extension: rebuild where nvcc and a CUDA build of torch are "
                "present)" if device_type == "cuda" else "")
        raise NotImplementedError(f"{what}: xorgemm has no {device_type} kernel{hint}; use the CPU")
