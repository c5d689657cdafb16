"""Strip outputs, execution counts and timing metadata from notebooks, in place.

    python scripts/strip_notebooks.py [notebooks/*.ipynb]

The tests refuse a committed notebook that carries outputs (tests/test_notebooks.py).
"""
import pathlib
import sys

import nbformat


def strip(path: pathlib.Path) -> bool:
    """Strip one notebook; True when it changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + "\n")
    return after != before


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parents[1]
    paths = [pathlib.Path(p) for p in sys.argv[1:]] or sorted((root / "notebooks").glob("*.ipynb"))
    for p in paths:
        print(("stripped " if strip(p) else "clean    ") + str(p))
