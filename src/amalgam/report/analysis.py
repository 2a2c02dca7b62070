"""Analysis of a finished sweep for notebooks/analysis.ipynb: tables, bars, t-SNE, confusion.

Everything here reads saved run directories (results.json, checkpoints/final.ckpt, .hydra/) and
reuses the package's own aggregation (`report.sweep`) and checkpoint loading (`api`).
The sweep's numbers are pandas DataFrames: `jobs_frame` (one row per run) and `summarize` (one
row per variant, `report.sweep.variants_frame` in METHOD_ORDER); the table and the bars take
either the jobs frame or the results dicts of `load_sweep`. Figures are plain
`matplotlib.figure.Figure` objects (no pyplot state): a notebook shows the returned figure
once, a script can `fig.savefig(...)`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from amalgam.report.run import md_table
from amalgam.report.sweep import (
    bar_figure,
    collect,
    jobs_frame,
    sweep_title,  # noqa: F401 (for the notebook: the plot's title)
    table_rows,
    variants_frame,
)

SWEEP_ENV = "AMALGAM_SWEEP_DIR"
# display order of the known methods; other variants follow, alphabetically
METHOD_ORDER = ("scratch", "kd", "cfl_no_mmd", "cfl_no_rec", "cfl")

# ----------------------------------------------------------------------------- the sweep


def latest_sweep(start: str | Path | None = None) -> Path | None:
    """The newest `logs/<task>/multiruns/<time>` holding a results.json, searching `logs/` in
    `start` (default: the working directory) and its parents; None if there is none."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        logs = d / "logs"
        if logs.is_dir():
            sweeps = [s for s in logs.glob("*/multiruns/*") if s.is_dir() and collect(s)]
            if sweeps:
                return max(sweeps, key=lambda s: (s.name, s.stat().st_mtime))
    return None


def find_sweep(path: str | Path | None = None) -> Path:
    """The sweep dir: `path`, else $AMALGAM_SWEEP_DIR, else the newest multirun under logs/."""
    given = path or os.environ.get(SWEEP_ENV)
    if given:
        p = Path(given).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(
                f"sweep dir '{p}' does not exist: set {SWEEP_ENV} to a Hydra multirun dir "
                "(logs/<task>/multiruns/<time>), e.g. one written by "
                "`python -m amalgam.amalgamate experiment=demo sweep=ablation`"
            )
        return p
    found = latest_sweep()
    if found is None:
        raise FileNotFoundError(
            f"no sweep found: {SWEEP_ENV} is not set and no logs/*/multiruns/* below "
            f"{Path.cwd()} or its parents holds a results.json. Run a sweep first, e.g. "
            "`python -m amalgam.amalgamate experiment=demo sweep=ablation`, or set "
            f"{SWEEP_ENV}=<sweep dir>"
        )
    return found


def load_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished job's results.json below `sweep_dir` (via `report.sweep.collect`)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir '{sweep_dir}' does not exist")
    results = collect(sweep_dir)
    if not results:
        raise FileNotFoundError(f"no results.json below {sweep_dir}: did the jobs finish?")
    return results


def variant_order(variant: str) -> tuple[int, str]:
    """Sort key: known methods in METHOD_ORDER (`kd` or `method=kd`), then the rest."""
    method = variant.split(",")[0].removeprefix("method=")
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, variant


Runs = pd.DataFrame | Sequence[Mapping[str, Any]]  # a jobs frame, or results dicts


def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` (jobs or variants) with its variants in METHOD_ORDER, then by seed if any."""
    variants = frame["variant"].astype(str).tolist()
    seeds = frame["seed"].tolist() if "seed" in frame else [None] * len(frame)

    def key(i: int) -> tuple[Any, ...]:
        seed = seeds[i]
        missing = seed is None or seed is pd.NA
        return variant_order(variants[i]), missing, 0 if missing else seed

    return frame.iloc[sorted(range(len(frame)), key=key)].reset_index(drop=True)


def as_jobs(runs: Runs) -> pd.DataFrame:
    """The jobs frame of `runs`: itself, or `jobs_frame` of the results dicts."""
    if isinstance(runs, pd.DataFrame):
        return runs
    return jobs_frame([dict(r) for r in runs])


def summarize(runs: Runs) -> pd.DataFrame:
    """One row per variant with mean and std over seeds in percent, n and the seeds
    (`report.sweep.variants_frame`), in METHOD_ORDER."""
    return ordered(variants_frame(as_jobs(runs)))


@dataclass(repr=False)
class Table:
    """A small table of strings that renders as markdown in a notebook."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""

    def markdown(self) -> str:
        lines = [self.caption, ""] if self.caption else []
        return "\n".join([*lines, *md_table(self.header, self.rows)]) + "\n"

    def column(self, name: str) -> list[str]:
        i = self.header.index(name)
        return [r[i] for r in self.rows]

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def __repr__(self) -> str:
        return self.markdown()


def ablation_table(runs: Runs) -> Table:
    """Teachers (ensemble for joint) and every variant: task-aware accuracy per task and joint
    accuracy over the union, test set, in %, mean ± std over seeds (the value alone for one
    seed), with each variant's job count and seeds."""
    header, body = table_rows(summarize(runs))
    caption = (
        "Test accuracy (%), mean ± std over seeds. Task columns: task-aware accuracy (argmax "
        "inside the task's classes); joint: argmax over the union (teachers: their ensemble "
        "under the run's target rule)."
    )
    return Table(header, body, caption)


def plot_bars(runs: Runs, title: str = "student vs teachers per task") -> Figure:
    """Grouped bars, one group per task plus joint: teachers, then each variant's student
    (mean ± std over seeds as error bars), the y axis from just below the lowest bar."""
    style = {"color": "0.55", "hatch": "//"}
    return bar_figure(summarize(runs), title, "teachers (ensemble for joint)", style)


# ----------------------------------------------------------------------------- one run


def pick_run(
    results: Sequence[Mapping[str, Any]], method: str = "cfl", seed: int | None = None
) -> dict[str, Any]:
    """The results of one run of `method` (the lowest seed unless `seed` is given)."""
    runs = [r for r in results if r.get("method") == method]
    if seed is not None:
        runs = [r for r in runs if r.get("seed") == seed]
    if not runs:
        have = sorted({f"{r.get('method')} seed {r.get('seed')}" for r in results})
        raise LookupError(f"no run of method '{method}' (seed {seed}) in the sweep; runs: {have}")
    return dict(min(runs, key=lambda r: (r.get("seed") is None, r.get("seed"))))


def run_dir_of(run: str | os.PathLike[str] | Mapping[str, Any]) -> Path:
    """A run's directory from its results dict, its results.json, its checkpoint or itself."""
    if isinstance(run, Mapping):
        if run.get("_path"):
            return Path(run["_path"]).parent
        return Path(run["checkpoint"]).parent.parent
    p = Path(run)
    if p.is_file():
        return p.parent.parent if p.suffix == ".ckpt" else p.parent
    return p


def checkpoint_of(run: str | os.PathLike[str] | Mapping[str, Any]) -> Path:
    """The run's final checkpoint: <run dir>/checkpoints/final.ckpt, else the recorded path."""
    if not isinstance(run, Mapping) and Path(run).suffix == ".ckpt":
        return Path(run)
    local = run_dir_of(run) / "checkpoints" / "final.ckpt"
    if local.is_file() or not isinstance(run, Mapping) or not run.get("checkpoint"):
        return local
    return Path(run["checkpoint"])


def launch_dir(run_dir: Path) -> Path:
    """Where the run was launched (Hydra's runtime.cwd): relative paths in its config
    (data, teachers) resolve there. Falls back to the working directory."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        from omegaconf import OmegaConf

        cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd")
        if cwd and Path(cwd).is_dir():
            return Path(cwd)
    return Path.cwd()


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    """Temporarily change the working directory (contextlib.chdir needs Python 3.11)."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@dataclass
class LoadedRun:
    """A run rebuilt from its checkpoint: datamodule, module (eval mode), where it ran."""

    dm: Any
    module: Any
    checkpoint: Path
    launch_dir: Path
    device: torch.device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run(
    run: str | os.PathLike[str] | Mapping[str, Any] | LoadedRun,
    device: str | torch.device | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedRun:
    """Rebuild teachers (hash-checked), student and method from a run's checkpoint, as
    `amalgam.load(path).evaluate()` does, without writing a report."""
    if isinstance(run, LoadedRun):
        return run
    from amalgam.api import load_amalgamation
    from amalgam.utils import quiet_known_warnings

    quiet_known_warnings()
    ckpt_path = checkpoint_of(run).resolve()
    where = launch_dir(run_dir_of(ckpt_path))
    dev = torch.device(device) if device else default_device()
    with working_dir(where):  # the record's relative data and teacher paths
        _, dm, module = load_amalgamation(
            ckpt_path, {"data": {"num_workers": 0}} | dict(overrides or {})
        )
    module.eval().to(dev)
    return LoadedRun(dm, module, ckpt_path, where, dev)


def eval_batches(
    loaded: LoadedRun, n_images: int | None = None, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, union labels) of the test split: all of it, or `n_images` drawn at random.
    Iterate inside `working_dir(loaded.launch_dir)` (sources may read files lazily)."""
    loader = loaded.dm.test_dataloader()
    if n_images is None:
        for x, y in loader:
            yield x.to(loaded.device), y.to(loaded.device)
        return
    ds = loader.dataset
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(len(ds), generator=g)[: min(n_images, len(ds))].sort().values
    for chunk in pos.split(loader.batch_size or 256):
        x, y = torch.utils.data.default_collate(ds.__getitems__(chunk.tolist()))
        yield x.to(loaded.device), y.to(loaded.device)


# ----------------------------------------------------------------------------- common space


@dataclass
class CommonSpace:
    """Flattened common-space features of the same test images, per network."""

    features: dict[str, np.ndarray]  # "student" and each teacher name -> [N, D]
    labels: np.ndarray  # union labels [N]
    classes: list[str]  # union class names
    level: int

    @property
    def n_images(self) -> int:
        return len(self.labels)


@torch.no_grad()
def common_space(
    run: str | os.PathLike[str] | Mapping[str, Any] | LoadedRun,
    n_images: int = 500,
    level: int = -1,
    seed: int = 0,
) -> CommonSpace:
    """Student and teacher features of `n_images` test images through the CFL method's
    CommonFeatureBlock of feature level `level` (`block(fs, fts)` -> hs, hts, recs, targets)."""
    loaded = load_run(run)
    module = loaded.module
    blocks = getattr(module.method, "blocks", None)
    if not blocks:
        raise ValueError(
            f"{loaded.checkpoint}: method {type(module.method).__name__} has no common feature "
            "space (a CFL variant has one); pick a cfl run"
        )
    block = blocks[level]
    names = ["student", *module.teachers.names]
    feats: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels = []
    with working_dir(loaded.launch_dir):
        for x, y in eval_batches(loaded, n_images, seed):
            s = module.student(x, features=True)
            t = module.teachers(x, features=True)
            hs, hts, _, _ = block(s.features[level], [f[level] for f in t.features])
            for n, h in zip(names, [hs, *hts], strict=True):
                feats[n].append(h.flatten(1).float().cpu().numpy())
            labels.append(y.cpu().numpy())
    return CommonSpace(
        {n: np.concatenate(v) for n, v in feats.items()},
        np.concatenate(labels),
        list(module.space.classes),
        level,
    )


def pc_share(space: CommonSpace, k: int = 3) -> Table:
    """Share of variance on the first `k` principal components, per network: a common space
    that has collapsed onto a few directions shows up here before it does in a t-SNE."""
    header = ["network", "dim", *[f"PC{i + 1} %" for i in range(k)]]
    body = []
    for name, f in space.features.items():
        sv = np.linalg.svd(f - f.mean(0), compute_uv=False) ** 2
        share = sv / max(float(sv.sum()), 1e-12)
        body.append([name, str(f.shape[1]), *[f"{100 * v:.1f}" for v in share[:k]]])
    return Table(header, body, "Variance of the common features on their principal components.")


def tsne(space: CommonSpace, perplexity: float = 30.0, seed: int = 0) -> dict[str, np.ndarray]:
    """One joint 2-D t-SNE of every network's common features (so they share one map);
    returns each network's points [N, 2]."""
    from sklearn.manifold import TSNE

    names = list(space.features)
    stacked = np.concatenate([space.features[n] for n in names])
    perplexity = min(perplexity, (len(stacked) - 1) / 3)
    emb = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(stacked)
    n = space.n_images
    return {name: emb[i * n : (i + 1) * n] for i, name in enumerate(names)}


def class_colors(k: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def tsne_plot(space: CommonSpace, embedding: Mapping[str, np.ndarray] | None = None) -> Figure:
    """Side-by-side panels (student, then each teacher) of the joint t-SNE, coloured by class."""
    emb = dict(embedding) if embedding is not None else tsne(space)
    names = list(emb)
    colors = class_colors(len(space.classes))
    fig = Figure(figsize=(3.6 * len(names) + 1.6, 3.8))
    axes = fig.subplots(1, len(names), sharex=True, sharey=True, squeeze=False)[0]
    present = sorted(set(space.labels.tolist()))
    for ax, name in zip(axes, names, strict=True):
        pts = emb[name]
        for c in present:
            m = space.labels == c
            ax.scatter(pts[m, 0], pts[m, 1], s=6, color=colors[c], label=space.classes[c])
        ax.set_title("student" if name == "student" else f"teacher {name}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"t-SNE of the common space (level {space.level}), {space.n_images} test images")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- confusion


@dataclass
class Confusion:
    """Student confusion counts over the union label space: rows true, columns predicted."""

    matrix: np.ndarray
    classes: list[str]
    tasks: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    @property
    def accuracy(self) -> float:
        """Joint accuracy (argmax over the union): trace / total."""
        return float(np.trace(self.matrix)) / max(1, self.total)


@torch.no_grad()
def confusion(run: str | os.PathLike[str] | Mapping[str, Any] | LoadedRun) -> Confusion:
    """The student's confusion matrix over the union label space on the whole test split."""
    loaded = load_run(run)
    space = loaded.module.space
    k = space.num_classes
    m = torch.zeros(k * k, dtype=torch.long)
    with working_dir(loaded.launch_dir):
        for x, y in eval_batches(loaded):
            pred = loaded.module.student(x, features=False).logits.argmax(1)
            m += torch.bincount((y * k + pred).cpu(), minlength=k * k)
    return Confusion(m.view(k, k).numpy(), list(space.classes), space.as_dict())


def plot_confusion(conf: Confusion, normalize: bool = True) -> Figure:
    """Heat map of the confusion matrix (row-normalised by default), task blocks outlined."""
    from matplotlib.patches import Rectangle

    mat = conf.matrix.astype(float)
    if normalize:
        mat = mat / np.maximum(mat.sum(1, keepdims=True), 1)
    k = len(conf.classes)
    side = min(3.0 + 0.45 * k, 14.0)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class" if normalize else "")
    ax.set_xticks(range(k), conf.classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), conf.classes, fontsize=8)
    ax.set_xlabel("predicted (argmax over the union)")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if conf.matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(conf.matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if mat[i, j] > 0.5 else "black",
                    )
    start = 0
    index = {c: i for i, c in enumerate(conf.classes)}
    for classes in conf.tasks.values():
        idx = [index[c] for c in classes]
        if idx == list(range(start, start + len(idx))):  # contiguous block: outline it
            box = (start - 0.5, start - 0.5)
            ax.add_patch(Rectangle(box, len(idx), len(idx), fill=False, ec="tab:red", lw=1.2))
        start += len(idx)
    ax.set_title(f"student confusion, test ({conf.total} images, joint acc {conf.accuracy:.2%})")
    fig.tight_layout()
    return fig
