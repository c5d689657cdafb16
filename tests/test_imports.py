"""The import graph of the package: no cycles, and nothing outside ``trdq_jax/cli`` imports it.

Every ``import`` statement counts, also those inside functions (a lazy import is still a
dependency). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg``; relative imports are resolved.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("trdq_jax", "pallas_kernels")


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for target in targets:
                resolved = resolve(target)
                if resolved and resolved != mod:
                    edges[mod].add(resolved)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(edges) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_package_modules():
    edges = import_graph()
    assert "trdq_jax.models.zoo" in edges and "trdq_jax.checkpoint" in edges["trdq_jax.models.zoo"]
    assert find_cycles(edges) == []


def test_nothing_outside_cli_imports_cli():
    offenders = sorted(m for m, targets in import_graph().items()
                       if not (m == "trdq_jax.cli" or m.startswith("trdq_jax.cli."))
                       and any(t == "trdq_jax.cli" or t.startswith("trdq_jax.cli.")
                               for t in targets))
    assert offenders == []


@pytest.mark.parametrize("module", ["trdq_jax.checkpoint", "trdq_jax.files", "trdq_jax.manifest"])
def test_storage_modules_know_nothing_of_models(module):
    assert not any(t.startswith("trdq_jax.models") for t in import_graph()[module])


def test_cli_constants_match_the_library():
    from trdq_jax.cli import quantization, sampling
    from trdq_jax.quant import BACKENDS, RECIPES
    from trdq_jax.quant.pipeline import DEFAULT_CALIB_SEED
    assert set(sampling.BACKENDS) == set(BACKENDS)
    assert set(quantization.RECIPE_NAMES) == set(RECIPES)
    assert quantization.DEFAULT_CALIB_SEED == DEFAULT_CALIB_SEED
