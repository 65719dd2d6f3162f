"""The documentation a user follows: every relative link in the README and docs/ leads to a file
(and a heading, for an anchor), and docs/architecture.md names every module of the package."""

import glob
import os
import re

import pytest
from conftest import ROOT

PAGES = sorted(
    [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "datasets", "README.md")]
    + glob.glob(os.path.join(ROOT, "docs", "*.md"))
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: str):
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    with open(page, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(full):
            bad.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{target}: no heading #{anchor} in {os.path.relpath(full, ROOT)}")
    assert not bad, f"{os.path.relpath(page, ROOT)}: " + "; ".join(bad)


def test_slug_is_githubs():
    assert slug("Correct and retrain: *Plugins > IAUNet training*") == (
        "correct-and-retrain-plugins--iaunet-training"
    )
    assert slug("Second round: every method from its label image, at 600 CPU-s") == (
        "second-round-every-method-from-its-label-image-at-600-cpu-s"
    )


def test_architecture_names_every_module():
    """Each module of iaunet/ is named on the map by its path under iaunet/ (modeling modules may
    be named by their path under iaunet/modeling/, as in the thesis table)."""
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        page = f.read()
    missing = []
    for path in sorted(glob.glob(os.path.join(ROOT, "iaunet", "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, os.path.join(ROOT, "iaunet")).replace(os.sep, "/")
        if rel.endswith("__init__.py") and rel != "__init__.py":
            continue
        names = {rel, "iaunet/" + rel}
        if rel.startswith("modeling/"):
            names.add(rel[len("modeling/") :])
        if not any(f"`{n}`" in page or f"`{n} " in page or f" {n}`" in page for n in names):
            missing.append(rel)
    assert not missing, "docs/architecture.md does not name: " + ", ".join(missing)
