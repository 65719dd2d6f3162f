"""The package's layers only point down: a walk of every import in iaunet/ (function-level ones
included) with ``ast``. A part may import parts of a lower rank; parts of one rank may import each
other in one direction only (no cycle). A new part must be given its rank here."""

import ast
import glob
import os
from collections import defaultdict

from conftest import ROOT

# lowest first (docs/architecture.md, "Layers")
RANKS = [
    ["utils", "version"],
    ["config"],
    ["structures"],
    ["solver"],
    ["checkpoint"],
    ["modeling", "data"],
    ["iaunet_model"],
    ["evaluation", "outputs"],
    ["inference"],
    ["deploy", "bigimage"],
    ["engine"],
    ["predict", "predict_args", "predict_stack", "napari_plugin", "check", "bench", "__init__"],
]
RANK = {part: k for k, parts in enumerate(RANKS) for part in parts}
PACKAGE = os.path.join(ROOT, "iaunet")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def part(module: str) -> str:
    """``iaunet.inference.tiling`` -> ``inference``; the package itself -> ``__init__``."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def imports(path: str):
    """(imported module, line) of every ``iaunet`` import in the file, relative ones resolved;
    ``from iaunet import x`` gives ``iaunet.x`` when x is a module, else ``iaunet``."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "iaunet":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "iaunet":
                continue
            for alias in node.names:
                sub = os.path.join(ROOT, *module.split("."), alias.name)
                is_module = os.path.isfile(sub + ".py") or os.path.isdir(sub)
                yield (f"{module}.{alias.name}" if is_module else module), node.lineno


def edges():
    """{(from part, to part): ["file:line imports module", ...]}"""
    found = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
        src = part(module_name(path))
        for module, line in imports(path):
            dst = part(module)
            if dst != src:
                found[(src, dst)].append(f"{os.path.relpath(path, ROOT)}:{line} imports {module}")
    return found


def test_every_part_has_a_rank():
    parts = {part(module_name(p)) for p in glob.glob(os.path.join(PACKAGE, "**", "*.py"),
                                                      recursive=True)}  # fmt: skip
    assert parts - set(RANK) == set(), "give these parts a rank in RANKS"


def test_layers_only_point_down():
    found = edges()
    upward = [w for (a, b), where in found.items() if RANK[b] > RANK[a] for w in where]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)
    cycles = [
        f"{a} <-> {b}: {found[(a, b)][0]}; {found[(b, a)][0]}"
        for (a, b) in found
        if (b, a) in found and a < b
    ]
    assert not cycles, "parts of one layer that import each other:\n" + "\n".join(cycles)


def test_the_walk_sees_relative_lazy_and_package_imports(tmp_path, monkeypatch):
    """The walk itself: a relative import inside a function, ``from .. import module`` and
    ``from iaunet import name`` are all seen, resolved to their part."""
    pkg = tmp_path / "iaunet"
    (pkg / "outputs").mkdir(parents=True)
    (pkg / "inference").mkdir()
    for init in (pkg / "__init__.py", pkg / "outputs" / "__init__.py",
                 pkg / "inference" / "__init__.py"):  # fmt: skip
        init.write_text("")
    (pkg / "inference" / "tiling.py").write_text("")
    (pkg / "outputs" / "table.py").write_text(
        "def f():\n    from ..inference.tiling import box_hits\n"
        "from .. import inference\nfrom iaunet import __version__\n"
    )
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    found = sorted(m for m, _ in imports(str(pkg / "outputs" / "table.py")))
    assert found == ["iaunet", "iaunet.inference", "iaunet.inference.tiling"]
    assert [part(m) for m in found] == ["__init__", "inference", "inference"]
