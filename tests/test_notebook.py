"""notebooks/analysis.ipynb and amalgam.report.analysis on a real tiny multirun (kd, cfl x 2)."""

import shutil
import statistics
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from amalgam.report import analysis as A
from test_scaleout import cli

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
TSNE_IMAGES = 40


def test_notebook_on_disk_is_valid_stripped_and_tracked():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(
            ["git", "check-ignore", str(NOTEBOOK), str(NOTEBOOK.parent / "README.md")],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert ignored.returncode == 1, f"hidden by .gitignore: {ignored.stdout}"


def test_find_sweep_names_the_variable_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(A.SWEEP_ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=A.SWEEP_ENV):
        A.find_sweep()
    with pytest.raises(FileNotFoundError, match=r"no results\.json"):
        A.load_sweep(tmp_path)


@pytest.fixture(scope="module")
def sweep(tiny_teachers, tmp_path_factory) -> Path:
    """A real 2 methods x 2 seeds multirun (fast_dev_run) through the CLI."""
    out = tmp_path_factory.mktemp("nb") / "sweep"
    cli(
        tiny_teachers,
        "-m",
        "experiment=tiny",
        "debug=fast_dev_run",
        "method=kd,cfl",
        "seed=0,1",
        f"hydra.sweep.dir={out}",
    )
    return out


def outputs_of(nb, marker: str) -> list:
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    return cell.outputs


def text_of(outputs: list) -> str:
    parts = []
    for o in outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif "data" in o:
            parts.append(o.data.get("text/markdown", "") + o.data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.slow
def test_analysis_functions_on_a_tiny_sweep(sweep):
    results = A.load_sweep(sweep)
    assert len(results) == 4
    assert {r["variant"] for r in results} == {"method=kd", "method=cfl"}

    # ablation table: teachers first, then kd before cfl; mean ± std over the seeds
    table = A.ablation_table(results)
    assert table.column("variant") == ["teachers (ensemble for joint)", "method=kd", "method=cfl"]
    assert table.header[3:] == ["tiny_a student", "tiny_b student", "joint student"]
    accs = [100 * r["joint"]["student_acc"] for r in results if r["variant"] == "method=cfl"]
    expect = f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}"
    assert table.rows[2][table.header.index("joint student")] == expect
    assert "| method=kd | 2 | 0, 1 |" in table.markdown()

    # bars: one group per task plus joint; teachers + 2 variants per group
    ax = A.plot_bars(results).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tiny_a", "tiny_b", "joint"]
    bars = list(ax.patches)
    assert len(bars) == 3 * 3
    assert bars[-1].get_height() == pytest.approx(statistics.fmean(accs))

    # confusion over the union space reproduces results.json's joint accuracy
    run = A.pick_run(results, "cfl")
    assert run["seed"] == 0
    loaded = A.load_run(run)
    conf = A.confusion(loaded)
    k = len(conf.classes)
    assert conf.matrix.shape == (k, k) and k == 6
    assert conf.total == run["joint"]["n_test"] == 96
    assert (conf.matrix.sum(1) == 16).all()
    assert conf.accuracy == pytest.approx(run["joint"]["student_acc"], abs=1e-6)
    A.plot_confusion(conf)

    # common space: student + each teacher, same images, same width; one joint t-SNE
    space = A.common_space(loaded, TSNE_IMAGES)
    assert list(space.features) == ["student", "tiny_a", "tiny_b"]
    dims = {f.shape for f in space.features.values()}
    assert len(dims) == 1 and dims.pop()[0] == TSNE_IMAGES
    assert len(space.labels) == TSNE_IMAGES and set(space.labels.tolist()) <= set(range(k))
    emb = A.tsne(space)
    assert sum(len(v) for v in emb.values()) == 3 * TSNE_IMAGES
    assert all(v.shape == (TSNE_IMAGES, 2) and np.isfinite(v).all() for v in emb.values())
    assert len(A.tsne_plot(space, emb).axes) == 3
    assert len(A.pc_share(space).rows) == 3

    # a method without a common space is refused with the reason
    with pytest.raises(ValueError, match="common feature"):
        A.common_space(A.pick_run(results, "kd"), 8)


@pytest.mark.slow
def test_notebook_executes_on_a_tiny_sweep(sweep, monkeypatch):
    monkeypatch.setenv(A.SWEEP_ENV, str(sweep))
    monkeypatch.setenv("AMALGAM_TSNE_IMAGES", str(TSNE_IMAGES))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    for c in nb.cells:
        if c.cell_type == "code":
            assert not [o for o in c.outputs if o.output_type == "error"], c.source

    assert f"sweep {sweep}: 4 runs" in text_of(outputs_of(nb, "load_sweep"))
    table = text_of(outputs_of(nb, "ablation_table"))
    for name in ("teachers (ensemble for joint)", "method=kd", "method=cfl", "joint student"):
        assert name in table
    for marker in ("plot_bars", "tsne_plot", "plot_confusion"):
        assert any("image/png" in o.get("data", {}) for o in outputs_of(nb, marker)), marker
    run = A.pick_run(A.load_sweep(sweep), "cfl")
    acc = run["joint"]["student_acc"]
    assert f"joint accuracy {acc:.4f} (results.json: {acc:.4f})" in text_of(
        outputs_of(nb, "plot_confusion")
    )
