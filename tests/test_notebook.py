"""notebooks/quickstart.ipynb runs top to bottom (small settings) in a fresh Jupyter kernel."""

import pathlib

import nbformat
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(monkeypatch, fresh_gguf_cache):
    monkeypatch.setenv("BITA_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", []))
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "identical to plain greedy: True" in text
    assert "identical to greedy: trained True, untrained True" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the speed plot and the training curve
    tables = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "text/markdown" in o.get("data", {})]
    assert tables and "| plain greedy |" in tables[0]["data"]["text/markdown"]
