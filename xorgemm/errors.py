"""Errors xorgemm raises on bad input. Each message names the file and the tensor it is about."""


class XorgemmError(Exception):
    """Base class of every error xorgemm raises on purpose."""


class InputError(XorgemmError, ValueError):
    """An input cannot be used: missing file, pickle checkpoint, mismatched dtypes, bad arguments."""


class DeltaFormatError(XorgemmError, ValueError):
    """A delta file is malformed, truncated or corrupted."""


class BaseMismatchError(XorgemmError, ValueError):
    """A delta is being applied to a base it was not made from."""


def where(path, tensor=None) -> str:
    """The 'file: tensor 'name'' prefix every message starts with."""
    return f"{path}: tensor '{tensor}'" if tensor is not None else f"{path}"
