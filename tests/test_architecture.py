"""The library's layers: every import (module-level or inside a function) points down the layer
order, never into ``experiments/``, and no import circle exists.

The order (``docs/architecture.md``), lowest first; a module may import modules of lower layers
and, within its own package folder (``models/``, ``data/``, ...), its siblings:
"""
import ast
from pathlib import Path
import re
import subprocess

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rlhf_jax"

LAYERS = [
    # 0: the base: no project imports
    {"rlhf_jax.masked", "rlhf_jax.assets", "rlhf_jax.gguf_file", "rlhf_jax.checkpoint",
     "rlhf_jax.metrics", "rlhf_jax.parallel", "rlhf_jax.labelers", "rlhf_jax.stats",
     "rlhf_jax.launch"},
    # 1: pure math on arrays
    {"rlhf_jax.losses", "rlhf_jax.rl"},
    # 2: models and data (data never imports models)
    {"rlhf_jax.models", "rlhf_jax.data"},
    # 3: what runs models: the sampler, scoring, model bundles, the training loop
    {"rlhf_jax.generation", "rlhf_jax.scoring", "rlhf_jax.runs", "rlhf_jax.loop"},
    # 4: algorithms and tasks
    {"rlhf_jax.ppo", "rlhf_jax.dpo", "rlhf_jax.best_of_n", "rlhf_jax.reward_head",
     "rlhf_jax.tasks"},
    # 5: algorithm variants built on those (PPO with LoRA adapters; RLOO/GRPO on PPO's pieces)
    {"rlhf_jax.lora_ppo", "rlhf_jax.grpo"},
    # 6: applications
    {"rlhf_jax.chat", "rlhf_jax.labeling", "rlhf_jax"},
]


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: a package folder or a top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer_of(module: str) -> int:
    unit = unit_of(module)
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{module}: not placed in any layer of tests/test_architecture.py "
                         "(add it to LAYERS and to docs/architecture.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in the file, at any depth (function bodies too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module_name(path).split(".")
                if path.name != "__init__.py":
                    pkg = pkg[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from rlhf_jax import ppo` imports the module rlhf_jax.ppo
                sub = ROOT / Path(*f"{base}.{a.name}".split("."))
                is_module = sub.with_suffix(".py").exists() or sub.is_dir()
                out.append((node.lineno, f"{base}.{a.name}" if is_module else base))
    return out


def project_graph() -> dict[str, list[tuple[int, str]]]:
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = module_name(path)
        graph[mod] = [(line, m) for line, m in imports_of(path)
                      if m.split(".")[0] in ("rlhf_jax", "experiments")]
    return graph


GRAPH = project_graph()


def test_every_module_has_a_layer():
    for mod in GRAPH:
        layer_of(mod)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_layers(module):
    src = layer_of(module)
    bad = []
    for line, target in GRAPH[module]:
        where = f"{module} (line {line}) imports {target}"
        if target.split(".")[0] == "experiments":
            bad.append(f"{where}: the library never imports experiments/")
            continue
        if target == "rlhf_jax" and module != "rlhf_jax":
            bad.append(f"{where}: import the module you need, not the package root")
            continue
        if module == "rlhf_jax":  # the package root re-exports the public API of lower layers
            continue
        same_unit = unit_of(target) == unit_of(module)
        if same_unit:
            continue
        dst = layer_of(target)
        if dst >= src:
            bad.append(f"{where}: layer {dst} is not below layer {src}")
    assert not bad, "\n".join(bad)


def test_losses_and_rl_never_import_each_other():
    for a, b in (("rlhf_jax.losses", "rlhf_jax.rl"), ("rlhf_jax.rl", "rlhf_jax.losses")):
        assert not [t for _, t in GRAPH[a] if t == b], f"{a} imports {b}"


def test_data_never_imports_models():
    bad = [(m, t) for m, imps in GRAPH.items() if unit_of(m) == "rlhf_jax.data"
           for _, t in imps if unit_of(t) == "rlhf_jax.models"]
    assert not bad, bad


def test_no_import_cycles():
    edges = {m: {t for _, t in imps if t in GRAPH and t != m} for m, imps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checker_catches_a_climbing_import(tmp_path):
    # The checker itself must be able to fail: a model module importing the sampler climbs.
    bad = tmp_path / "rlhf_jax" / "models" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from rlhf_jax import generation\n")
    found = [t for _, t in imports_of(bad)]
    assert "rlhf_jax.generation" in found
    assert layer_of("rlhf_jax.generation") >= layer_of("rlhf_jax.models.bad")


def test_every_document_link_points_into_the_repository():
    """Markdown links and notebook links name files that exist in the repository: the project's
    docs live in the project."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    bad = []
    for f in files:
        if Path(f).suffix not in (".md", ".ipynb"):
            continue
        text = (ROOT / f).read_text(encoding="utf-8", errors="replace")
        for target in re.findall(r"\]\(([^)\s#]+)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not ((ROOT / f).parent / target).exists() and not (ROOT / target).exists():
                bad.append(f"{f}: {target}")
    assert not bad, f"links to files outside the repository: {bad}"
