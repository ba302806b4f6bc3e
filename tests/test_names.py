"""Every shape suffix a tensor name in the package uses (`keep_mask_B_T`, `logits_N_V`) is in the legend
of tipdistill/types.py, so a reader can decode any name from one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tipdistill.types

PKG = Path(tipdistill.types.__file__).parent
SUFFIX = re.compile(r"[a-z0-9]_((?:[A-Z]{1,2}_)*[A-Z]{1,2})$")


def legend() -> set[str]:
    """The axis letters the types.py docstring defines (`  B  sequences ...`, `P  prompts;  G  ...`)."""
    doc = tipdistill.types.__doc__
    return set(re.findall(r"(?:^|;)\s+([A-Z]{1,2})\s{2,}\S", doc, flags=re.M))


def used_suffixes() -> dict[str, str]:
    out = {}
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Name):
                names.append(node.id)
            elif isinstance(node, ast.arg):
                names.append(node.arg)
            elif isinstance(node, ast.Attribute):
                names.append(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.append(node.name)
            for name in names:
                m = SUFFIX.search(name)
                if m:
                    out.setdefault(m.group(1), f"{path.name}: {name}")
    return out


def test_every_shape_suffix_is_in_the_legend():
    letters = legend()
    assert {"B", "L", "T", "H", "V", "K", "N", "C", "R", "P", "G"} <= letters
    used = used_suffixes()
    assert {"B_T", "N_V", "R_C"} <= set(used)  # the scan sees the package
    # a two-letter part is one flattened axis (BT = B * T): each letter must be in the legend
    unknown = {suffix: where for suffix, where in used.items() if not set(suffix.replace("_", "")) <= letters}
    assert unknown == {}, f"shape suffixes missing from the legend in tipdistill/types.py: {unknown}"
