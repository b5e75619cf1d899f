"""Loads the compiled extensions, with an error that says how to build them."""
try:
    from xorgemm import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "xorgemm's C++ extension is not built; run `pip install --no-build-isolation -e .` in the repository"
    ) from e

try:
    from xorgemm import _C_cuda  # noqa: F401
except ModuleNotFoundError:  # built without CUDA (no nvcc or a CPU build of torch): the CPU kernels serve
    _C_cuda = None
except ImportError as e:  # built, but it does not load: say so rather than silently serve without it
    raise ImportError(f"xorgemm's CUDA extension is built but does not load ({e}); rebuild it with "
                      "`pip install --no-build-isolation -e .`, or set XORGEMM_FORCE_CPU=1 when building") from e

C = _C
CUDA = _C_cuda
