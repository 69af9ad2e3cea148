"""The shape of the code: layers that only import downward, and functions short enough to read.

Layers, from the ground up (``core/__init__.py``): core -> datasets -> models -> losses -> metrics
-> inference -> scripts. A module may import from its own layer and the layers below it, never from
a layer above (lazy imports inside functions count too).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["core", "datasets", "models", "losses", "metrics", "inference", "scripts"]
SCRIPTS = ("train", "infer", "evaluate", "export")
MAX_FUNCTION_LINES = 80


def layer(module: str) -> str | None:
    top = module.split(".")[0]
    return "scripts" if top in SCRIPTS else top if top in LAYERS else None


def sources() -> dict[str, str]:
    """``{module name: source}`` of the scripts and every module of the layered packages."""
    paths = [ROOT / f"{name}.py" for name in SCRIPTS]
    for package in LAYERS[:-1]:
        paths += sorted((ROOT / package).glob("*.py"))
    out = {}
    for path in paths:
        rel = path.relative_to(ROOT).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path.read_text()
    return out


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def upward_imports(modules: dict[str, str]) -> list[str]:
    problems = []
    for module, text in modules.items():
        here = layer(module)
        for line, name in imported_modules(ast.parse(text)):
            there = layer(name)
            if here and there and LAYERS.index(there) > LAYERS.index(here):
                problems.append(f"{module}:{line}: {here} imports {name} ({there}, a higher layer)")
    return problems


def long_functions(modules: dict[str, str]) -> list[str]:
    problems = []
    for module, text in modules.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                    problems.append(f"{module}:{node.lineno}: {node.name} has {lines} lines")
    return problems


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "scripts"}
    assert packages == set(LAYERS[:-1])


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(sources()) == []


def test_no_function_is_longer_than_80_lines_without_a_reason():
    assert long_functions(sources()) == []


@pytest.mark.parametrize("module, code, expected", [
    ("core.probe", "from inference.predict import load_model\n", 1),
    ("metrics.probe", "def f():\n    from models import build_model\n", 0),  # models is below metrics
    ("models.probe", "def f():\n    from metrics import dice\n", 1),  # a lazy import counts
    ("inference.probe", "from core.task import Task\nimport numpy\nimport train\n", 1),  # scripts are the top
])
def test_the_import_check_finds_upward_imports(module, code, expected):
    assert len(upward_imports({module: code})) == expected


def test_the_length_check_finds_long_functions():
    body = "    x = 1\n" * MAX_FUNCTION_LINES
    assert len(long_functions({"core.probe": "def f():\n" + body})) == 1
    assert long_functions({"core.probe": 'def f():\n    """Long because: a table."""\n' + body}) == []
