"""Every notebook runs top to bottom at tiny scale (code cells exec'd in one namespace)."""
import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = json.loads(path.read_text())
    namespace = {"TINY": True, "__name__": "__notebook__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        try:
            exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{path.name} cell {i} failed: {type(e).__name__}: {e}") from e
    assert "results" in namespace and set(namespace["results"]) == {"W8A8", "W4A8"}


def test_there_is_a_notebook():
    assert NOTEBOOKS
