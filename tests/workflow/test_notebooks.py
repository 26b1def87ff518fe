"""Every notebook in colab/ runs end to end (nbclient, a fresh kernel, one CPU device), so none of them rots."""
import glob
import os

import pytest

from tests.lm_testing import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


def test_there_are_notebooks():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "layer_ablation.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code").source
    # The Colab install is there, and guarded so that it is skipped where chimera_jax is importable.
    assert "pip install" in first and 'find_spec("chimera_jax") is None' in first
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(REPO, "colab")}})
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", MPLBACKEND="Agg")
    client.execute(env=env)  # raises CellExecutionError naming the failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert " done" in text, text[-2000:]
