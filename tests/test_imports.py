"""The package's import graph has no cycle, counting imports inside functions too (a lazy import is
still a dependency: the config -> registry -> plugin -> config loop was made of lazy imports).

Imports under `if TYPE_CHECKING:` are annotations only and are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tipdistill"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Project modules one file imports anywhere (module level or in a function)."""
    tree = ast.parse(path.read_text())
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in out if m in modules and m != this}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "tipdistill.config" in graph["tipdistill.train"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_detector_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lazy_and_type_checking_imports_are_told_apart():
    path = PKG / "selectors.py"
    edges = imported_modules(path, set(import_graph()))
    assert "tipdistill.config" not in edges  # annotations only, under TYPE_CHECKING
    assert "tipdistill.registry" in edges
    assert "tipdistill.selectors" in import_graph()["tipdistill.config"]  # the lazy import in validation counts


BARE_BOX_MISSING = ("hydra", "omegaconf", "wandb", "vllm")  # the GPU box has torch + transformers only


def module_level_imports(path: Path) -> set[str]:
    """Every module one file imports at import time (module level, outside TYPE_CHECKING and functions)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and not _is_type_checking(node):
            nodes = node.body + node.orelse
        elif isinstance(node, ast.Try):
            nodes = node.body
        else:
            nodes = [node]
        for n in nodes:
            if isinstance(n, ast.Import):
                out.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                out.add(n.module)
                out.update(f"{n.module}.{a.name}" for a in n.names)
    return out


def test_the_update_step_needs_no_hydra_wandb_or_vllm_at_import():
    """Statically: what `import tipdistill.update` loads, plus the registries TrainConfig's validation
    imports, never imports Hydra, omegaconf, W&B or vLLM at module level (the subprocess test below checks
    the same for real)."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    todo = ["tipdistill.update", "tipdistill.config", *sorted(import_graph()["tipdistill.config"])]
    seen, bad = set(), {}
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        imports = module_level_imports(files[mod])
        bad.update({mod: sorted(i for i in imports if i.split(".")[0] in BARE_BOX_MISSING)} if any(
            i.split(".")[0] in BARE_BOX_MISSING for i in imports) else {})
        parents = [".".join(mod.split(".")[:i]) for i in range(2, mod.count(".") + 1)]  # importing a submodule runs its package
        todo += [m for m in imports | set(parents) if m in files]
    assert {"tipdistill.update", "tipdistill.teacher", "tipdistill.selectors", "tipdistill.sinks"} <= seen
    assert bad == {}, f"imported at module level on the update path: {bad}"


@pytest.mark.integration  # a fresh interpreter importing torch and transformers
def test_the_update_step_imports_with_torch_and_transformers_only():
    """The GPU box that runs scripts/gpu_checks.sh has torch + transformers only: the update step, the
    teacher and everything they import must not need Hydra, omegaconf, W&B or vLLM."""
    import subprocess
    import sys

    code = (
        "import importlib.abc, importlib.machinery, sys\n"
        # importing a blocked package fails; probing for it (accelerate asks find_spec('wandb')) does not
        "class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('hydra', 'omegaconf', 'wandb', 'vllm'):\n"
        "            return importlib.machinery.ModuleSpec(name, self)\n"
        "    def create_module(self, spec):\n"
        "        raise ImportError('blocked: ' + spec.name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tipdistill.update, tipdistill.teacher, tipdistill.runtime\n"
        "from tipdistill.config import TrainConfig\n"
        "TrainConfig()\n"  # validation imports every registry
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
