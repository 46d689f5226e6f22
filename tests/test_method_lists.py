"""The method lists written for people — README's feature list, docs/ARCHITECTURE.md's module table and the
all-methods sweep (sweeps/cifar10.yaml) — name exactly the registered methods, by their labels."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from raydd.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def named(text: str) -> set[str]:
    """The registered methods whose label appears in ``text`` as a word of its own."""
    found = set()
    for key, cls in METHODS.items():
        label = cls.label or key
        if re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", text):
            found.add(key)
    return found


def test_readme_feature_list_names_every_method():
    readme = (REPO / "README.md").read_text()
    bullet = readme[readme.index("- **Condensation methods**"):readme.index("- **Ray Tune sweeps**")]
    assert named(bullet) == set(METHODS)


def test_architecture_lists_every_method_module():
    table = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    row = next(line for line in table.splitlines() if "One method per module" in line)
    modules = {Path(sys.modules[cls.__module__].__file__).name for cls in METHODS.values()}
    assert {m for m in modules if not re.search(rf"[`/]{re.escape(m)}`", row)} == set()
    assert named(row.split("One method per module", 1)[1]) == set(METHODS)


def test_the_all_methods_sweep_has_every_method():
    spec = yaml.safe_load((REPO / "sweeps" / "cifar10.yaml").read_text())
    assert sorted(spec["methods"]) == sorted(METHODS)
