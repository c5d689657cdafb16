"""Every notebook runs top to bottom in a fresh Jupyter kernel on the CPU, then again in another
fresh kernel: no hidden state, nothing from the first run needed or clobbered by the second.

The kernels run in ``tmp_path`` (their working directory) with ``TMPDIR`` below it, so every
file a notebook writes is inside ``tmp_path`` and can be checked. The time each run takes is
printed at the end of the session (``conftest.pytest_terminal_summary``, from each test
report's ``notebook_seconds`` property, so that pytest-xdist workers' runs count too).
"""
import hashlib
import json
import os
import pathlib
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# notebook-specific kernel environment: 03 shows sharding, so it gets 4 emulated devices
EXTRA_ENV = {"03_offline_generation.ipynb": {
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}}


def _tree(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _execute(path: pathlib.Path, cwd: pathlib.Path, env: dict):
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    t0 = time.perf_counter()
    client.execute(env=env)
    return nb, time.perf_counter() - t0


def _kernel_env(tmp_path: pathlib.Path, name: str) -> dict:
    from tests.conftest import _CACHE
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "TRDQ_"))}
    env.update({"JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT),
                "JAX_COMPILATION_CACHE_DIR": str(_CACHE / "xla"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "MPLBACKEND": "module://matplotlib_inline.backend_inline",
                "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                **EXTRA_ENV.get(name, {})})
    return env


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells
               if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_twice_in_fresh_kernels(path, tmp_path, record_property):
    work = tmp_path / "work"
    work.mkdir()
    env = _kernel_env(tmp_path, path.name)
    first, seconds = _execute(path, work, env)
    times = [seconds]
    record_property("notebook_seconds", times)  # summed up by conftest (xdist workers too)
    assert _images(first) >= 1, f"{path.name}: no figure among the outputs"
    outputs = "".join(out.get("text", "") for cell in first.cells if cell.cell_type == "code"
                      for out in cell.outputs)
    assert "backend cpu" in outputs  # the kernel ran the notebook on the CPU, scaled down
    after_first = _tree(tmp_path)
    second, seconds = _execute(path, work, env)  # a fresh kernel, the same order
    times.append(seconds)
    assert _images(second) >= 1
    after_second = _tree(tmp_path)
    changed = [f for f, digest in after_first.items() if after_second.get(f) != digest]
    assert not changed, f"{path.name}: the second run changed or removed {changed[:5]}"


def test_committed_notebooks_are_stripped_and_end_with_their_assertion():
    assert len(NOTEBOOKS) >= 4, [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
        assert not dirty, f"{path.name}: code cells {dirty} have outputs; strip them before " \
                          "committing (python scripts/strip_notebooks.py)"
        assert "assert " in "".join(code[-1]["source"]), f"{path.name}: the last code cell " \
                                                          "must assert the notebook's number"
        assert "find_spec(\"trdq_jax\")" in "".join(code[0]["source"]), \
            f"{path.name}: the first code cell must be the install cell"


def test_the_strip_script_removes_outputs_and_keeps_the_source(tmp_path):
    import importlib.util

    import nbformat
    spec = importlib.util.spec_from_file_location("strip_notebooks",
                                                  ROOT / "scripts" / "strip_notebooks.py")
    strip_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(strip_notebooks)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[0].execution_count = 3
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    assert strip_notebooks.strip(path) is True and strip_notebooks.strip(path) is False
    cell = nbformat.read(path, as_version=4).cells[0]
    assert cell.source == "print(1)" and cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_install_cell_installs_only_when_the_package_is_missing(path, monkeypatch):
    """The first cell, run here with pip replaced by a recorder: nothing when trdq_jax imports,
    ``pip install`` of TRDQ_JAX_SOURCE (default the package name) into the kernel's Python when
    it does not (a fresh Colab runtime)."""
    import importlib.util
    import subprocess
    source = "".join(json.loads(path.read_text())["cells"][1]["source"])
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: calls.append(argv))
    exec(compile(source, f"{path.name}[install]", "exec"), {})
    assert calls == []  # importable here: a no-op
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trdq_jax" else real_find_spec(name, *a))
    monkeypatch.delenv("TRDQ_JAX_SOURCE", raising=False)
    exec(compile(source, f"{path.name}[install]", "exec"), {})
    monkeypatch.setenv("TRDQ_JAX_SOURCE", "git+https://example.org/trdq_jax.git")
    exec(compile(source, f"{path.name}[install]", "exec"), {})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "trdq_jax"],
                     [sys.executable, "-m", "pip", "install", "-q",
                      "git+https://example.org/trdq_jax.git"]]
