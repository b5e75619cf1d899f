"""The package follows the data: format -> packing | resident -> ops -> nn -> serving -> the command. No
module imports from a layer above its own (read from the source, imports inside functions included)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xorgemm"
# Lower numbers are lower layers; a module may import its own layer and those below it.
LAYERS = {
    "xorgemm.errors": 0, "xorgemm._native": 0, "xorgemm._threads": 0,
    "xorgemm._C": 0, "xorgemm._C_cuda": 0,  # the built extensions
    "xorgemm.format": 1,
    "xorgemm.packing": 2, "xorgemm.resident": 2,
    "xorgemm.ops": 3,
    "xorgemm.nn": 4,
    "xorgemm.serving": 5, "xorgemm.vllm": 5,
    "xorgemm.testing": 6, "xorgemm.cli": 6, "xorgemm.__main__": 6, "xorgemm": 6,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    raise KeyError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path


def imports_of(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xorgemm"):
            for alias in node.names:  # `from xorgemm import X` imports the submodule X when there is one
                sub = f"{node.module}.{alias.name}"
                yield sub if sub in LAYERS or any(m == sub for m, _ in modules()) else node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("xorgemm"))


@pytest.mark.parametrize("name,path", list(modules()), ids=[m for m, _ in modules()])
def test_no_module_imports_a_layer_above_it(name, path):
    own = layer_of(name)
    above = sorted({m for m in imports_of(path) if layer_of(m) > own})
    assert not above, f"{name} (layer {own}) imports {above} from above it"
