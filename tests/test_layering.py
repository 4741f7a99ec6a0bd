"""The house rules of the layout (docs/architecture.md), checked on the source: which package may import which."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imports_of(folder: str) -> dict[str, set[str]]:
    """file -> every module it imports (top level, in functions, and ``from x import y`` as ``x``)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f} imports {m}" for f, mods in imports_of(folder).items() for m in sorted(mods)
            if any(m == p or m.startswith(p + ".") for p in forbidden)]


@pytest.mark.parametrize("folder, forbidden", [
    ("hexgen/wire", ("hexgen.head", "workers", "hexgen.planner", "hexgen.cli")),  # the shared wire format
    ("hexgen/head", ("workers", "hexgen.planner", "torch")),  # the head never imports the planner's search
    ("hexgen/engine", ("redis", "hexgen.wire", "hexgen.head", "workers")),  # the engine knows no Redis
    ("hexgen/model", ("torch.distributed", "redis", "hexgen.engine")),  # model math; collectives via hexgen.parallel
    # the kernels know no model, engine, process group or Redis: everything above calls into them
    ("hexgen/kernels", ("torch.distributed", "redis", "hexgen.model", "hexgen.engine", "hexgen.parallel",
                        "hexgen.wire", "hexgen.head", "workers", "hexgen.planner", "hexgen.cli")),
    ("hexgen/parallel", ("hexgen.model", "hexgen.engine", "hexgen.head", "workers", "redis")),  # nothing above it
    ("hexgen/planner", ("hexgen.head", "workers")),
])
def test_package_boundaries(folder, forbidden):
    assert offenders(folder, forbidden) == []


def test_no_import_cycles_between_kernel_modules():
    """Every kernel module imports only modules below it: no two of them import each other, even lazily."""
    mods = {f.removeprefix("hexgen/kernels/").removesuffix(".py"): names for f, names in imports_of("hexgen/kernels").items()}
    uses = {m: {n.removeprefix("hexgen.kernels.") for n in names if n.startswith("hexgen.kernels.")} for m, names in mods.items()}
    cycles = [(a, b) for a, deps in uses.items() for b in deps if a in uses.get(b, set())]
    assert cycles == []


def test_the_checker_sees_imports():
    """The rule above can fail: the head does import the wire format, and in-function imports count."""
    head = imports_of("hexgen/head")
    assert "hexgen.wire.protocol" in head["hexgen/head/service.py"]
    assert offenders("hexgen/cli", ("hexgen.planner",))  # the CLI builds the Placer, lazily inside a function
