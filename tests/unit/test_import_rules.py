"""The layer rules of docs/architecture.md hold in lmforge/, and nothing imports itself in a circle.

An `ast` walk (no import runs) collects every `import lmforge...` / `from lmforge... import` of
every module, including imports inside functions: a lazy import is still a dependency. Each rule
is checked against a planted bad package too, so the checker is shown to fail when a rule breaks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# package -> the lmforge packages it may import (itself always allowed). The table in
# docs/architecture.md states the same; test_architecture_doc_states_these_rules keeps them equal.
LAYERS: dict[str, set[str]] = {
    "tensors": set(),
    "storage": set(),
    "config": set(),
    "models": {"config", "storage"},
    "data": {"config", "storage", "safety"},
    "observability": {"config", "storage"},
    "plan": {"config", "storage", "observability"},
    "checkpoint": {"config", "storage"},
    "parallel": {"config", "models", "observability"},
    "interop": {"config", "models", "checkpoint", "storage"},
    "serve": {"config", "data", "models", "checkpoint", "interop", "compress", "safety", "storage"},
    "eval": {"config", "data", "models", "checkpoint", "serve", "storage"},
    "compress": {"config", "data", "models", "checkpoint", "interop", "storage"},
    "safety": {"config", "storage"},
    "train": {"config", "data", "models", "observability", "parallel", "checkpoint", "storage"},
}
SHARED = {"tensors"}  # tensor primitives (dtype names, DTensor helpers): any package may import them
TOP = {"cli", "cli_ckpt", "cli_data", "cli_eval", "cli_exit_gates", "cli_export", "cli_plan", "cli_bench", "cli_compress", "cli_quantize", "cli_prune", "cli_distill",
       "cli_serve", "cli_safety", "cli_model_watermark", "cli_errors", "launcher", "__main__", "__init__"}  # the entry points: may import anything


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lmforge_imports(path: Path, package: str) -> set[str]:
    """Every module of `package` that the file at `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == package:
                found.add(node.module)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package-internal modules it imports (`from a.b import c` counts a.b.c when c
    is a module, else a.b)."""
    modules = {module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in lmforge_imports(path, root.name):
            targets.add(imported if imported in modules else imported.rsplit(".", 1)[0])
        graph[name] = {t for t in targets if t in modules and t != name}
    # `from pkg import mod` names the module itself: add those edges
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                graph[name] |= {f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in modules and f"{node.module}.{a.name}" != name}
    return graph


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(root: Path, layers: dict[str, set[str]] = LAYERS) -> list[str]:
    out = []
    for module, targets in sorted(import_graph(root).items()):
        src = layer_of(module)
        if src in TOP:
            continue
        if src not in layers:
            out.append(f"{module}: package {src!r} has no row in the layer table")
            continue
        for target in sorted(targets):
            dst = layer_of(target)
            if dst != src and dst not in layers[src] and dst not in SHARED:
                out.append(f"{module} imports {target}: {src} may import only {sorted(layers[src]) or 'nothing'}")
    return out


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_lmforge_follows_the_layer_rules() -> None:
    assert layer_violations(REPO / "lmforge") == []


def test_lmforge_has_no_import_cycles() -> None:
    assert cycles(REPO / "lmforge") == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "lmforge"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    return root


def test_a_planted_layer_violation_is_reported(tmp_path: Path) -> None:
    root = _plant(tmp_path, {
        "models/model.py": "def build():\n    from lmforge.train.trainer import Trainer  # lazy, still counted\n",
        "train/trainer.py": "from lmforge.models import model\nclass Trainer: ...\n",
        "config/job.py": "",
    })
    got = layer_violations(root)
    assert got == ["lmforge.models.model imports lmforge.train.trainer: models may import only ['config', 'storage']"]


def test_a_planted_unknown_package_is_reported(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"gadgets/thing.py": "import lmforge.config\n", "config/job.py": ""})
    assert layer_violations(root) == ["lmforge.gadgets: package 'gadgets' has no row in the layer table",
                                      "lmforge.gadgets.thing: package 'gadgets' has no row in the layer table"]


def test_a_planted_cycle_is_reported(tmp_path: Path) -> None:
    root = _plant(tmp_path, {
        "data/a.py": "from lmforge.data import b\n",
        "data/b.py": "from lmforge.data.c import f\n",
        "data/c.py": "import lmforge.data.a\ndef f(): ...\n",
        "data/d.py": "from lmforge.data import a\n",
    })
    assert cycles(root) == [["lmforge.data.a", "lmforge.data.b", "lmforge.data.c"]]


def test_architecture_doc_states_these_rules() -> None:
    """The table in docs/architecture.md ("| `pkg` | imports |") lists the same allowed imports."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]*) \|", doc, re.MULTILINE))
    stated = {pkg: set(re.findall(r"`(\w+)`", text)) for pkg, text in rows.items() if pkg in LAYERS}
    assert stated == LAYERS, {p: (stated.get(p), LAYERS[p]) for p in LAYERS if stated.get(p) != LAYERS[p]}


def test_architecture_doc_places_every_module() -> None:
    """docs/architecture.md is the picture of the code: every module of lmforge is named there (its
    file name, or its name in backticks as the layer table lists `checkpoint`'s), so a new one cannot
    land without a place in it."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    unnamed = sorted(str(f.relative_to(REPO)) for f in (REPO / "lmforge").rglob("*.py")
                     if f.name != "__init__.py" and not re.search(rf"\b{re.escape(f.name)}", doc)
                     and f"`{f.stem}`" not in doc)
    assert not unnamed, unnamed



MAX_LINES = 500  # a module longer than this holds more than one concern: split it


def long_modules(root: Path, limit: int = MAX_LINES) -> list[str]:
    return sorted(f"{p.relative_to(root.parent)}: {n} lines" for p in root.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > limit)


def test_no_module_is_longer_than_the_limit(tmp_path: Path) -> None:
    assert long_modules(REPO / "lmforge") == []
    root = _plant(tmp_path, {"train/huge.py": "x = 1\n" * (MAX_LINES + 1)})
    assert long_modules(root) == [f"lmforge/train/huge.py: {MAX_LINES + 1} lines"]
