"""Every notebook in notebooks/ runs top to bottom (nbclient), with no stale outputs committed."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_at_least_three_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    stale = [i for i, cell in enumerate(book.cells) if cell.cell_type == "code" and (cell.outputs or
                                                                                     cell.execution_count)]
    assert not stale, f"{path.name}: clear the outputs of cells {stale} before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.delenv("LOOMC_DB", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    shutil.copy(path, tmp_path / path.name)
    book = nbformat.read(tmp_path / path.name, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert not errors
