"""Loads the compiled extensions, with an error that says how to build them."""
try:
    from xorgemm import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "xorgemm's C++ extension is not built; run `pip install --no-build-isolation -e .` in the repository"
    ) from e

try:
    from xorgemm import _C_cuda  # noqa: F401
except ImportError:
    _C_cuda = None

C = _C
CUDA = _C_cuda
