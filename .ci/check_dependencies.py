#!/usr/bin/env python
"""Fail when the code or the tests import a distribution that the README's install line does not
declare.

Every top-level import in iaunet/, tools/, tests/, datasets/*.py and train_net.py is mapped to the
distributions that provide it (``importlib.metadata.packages_distributions``) and compared with the
requirements of the installed ``iaunet`` distribution for the given extras (its Requires-Dist, i.e.
setup.py's install_requires + extras_require). torch, torchvision and detectron2 are the documented
prerequisites (README, "Install"). A developer's Python has more installed than a newcomer's, so an
undeclared import would pass the tests here and fail for them.

    python .ci/check_dependencies.py test            # the extras of the README's install line
"""

import ast
import importlib.metadata as md
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("iaunet", "tools", "tests", "datasets", "train_net.py")
PREREQUISITES = {"torch", "torchvision", "detectron2"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules():
    """{top-level module: first file importing it}, absolute imports only."""
    found = {}
    for src in SOURCES:
        path = os.path.join(ROOT, src)
        files = (
            [path]
            if path.endswith(".py")
            else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py")]
        )
        for file in files:
            tree = ast.parse(open(file).read(), file)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], os.path.relpath(file, ROOT))
    return found


def first_party():
    """Modules of this repository: the package, test modules and tool scripts (imported by path)."""
    names = {"iaunet", "conftest"}
    for d in ("tests", "tools", "datasets"):
        names |= {f[:-3] for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".py")}
    return names


def declared(extras):
    reqs = md.requires("iaunet") or []
    names = set()
    for req in reqs:
        name = _norm(re.split(r"[ ;<>=!~\[]", req, 1)[0])
        marker = req.split(";", 1)[1] if ";" in req else ""
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra is None or extra.group(1) in extras:
            names.add(name)
    return names


def main(extras):
    modules = imported_modules()
    provided = md.packages_distributions()
    allowed = declared(set(extras)) | {_norm(p) for p in PREREQUISITES}
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for module, where in sorted(modules.items()):
        if module in stdlib or module in first_party():
            continue
        dists = {_norm(d) for d in provided.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported in {where}) is not installed by any distribution")
        elif not dists & allowed:
            problems.append(
                f"{module} (imported in {where}) comes from {sorted(dists)}, which setup.py does "
                "not "
                f"declare for the extras {sorted(extras)}"
            )
    if problems:
        print("Undeclared dependencies:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"dependencies: {len(modules)} imported modules, all declared (extras {sorted(extras)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
