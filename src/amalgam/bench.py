"""`python -m amalgam.bench experiment=demo`: time the amalgamation step against its bound.

In ONE run, on the same models, batch and data, it times (a) the teachers' forward, (b) the
student train step alone, (c) the full amalgamation step without cache and (d) with the teacher
cache, and prints images/s, the ratios c / bound (bound: a and b back to back) and d / c, and
peak memory. Phases are interleaved over rounds and the median round is reported.
"""

from __future__ import annotations

import resource
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from amalgam.build import build_amalgamation
from amalgam.files import atomic_write_text
from amalgam.launch import method_name
from amalgam.losses import soft_cross_entropy
from amalgam.module import AmalgamModule
from amalgam.optim import build_optimizer
from amalgam.provenance import cpu_name
from amalgam.teachers.cache import open_or_build
from amalgam.utils import CONF_DIR, quiet_known_warnings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[int], Any], steps: int, device: torch.device) -> float:
    """Seconds per call of fn(i), i over `steps` calls (after the caller's warm-up)."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(i)
    sync(device)
    return (time.perf_counter() - t0) / steps


def precision_plugin(precision: Any, device: torch.device) -> Precision:
    """The precision plugin Lightning's Trainer picks for `precision` on `device`.

    The bench times its phases inside this plugin's `forward_context()` (and, for `*-true`
    half precisions, on the module and inputs it converts), so each phase runs under exactly
    the autocast region and dtypes of a training step: e.g. `bf16-mixed` autocast with its
    weight-cast cache disabled, and `16-mixed` on a CPU falling back to bf16, as Lightning does.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "16-mixed is not supported on CPU", GPU-available notes
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    return trainer.precision_plugin


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__} (CPU)"


def bench(cfg: DictConfig) -> dict[str, Any]:
    quiet_known_warnings()
    L.seed_everything(cfg.seed)
    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.bench.device != "cpu" else "cpu"
    )
    dm, module = build_amalgamation(cfg)
    precision = cfg.trainer.get("precision", "32-true")
    plugin = precision_plugin(precision, device)
    module: AmalgamModule = plugin.convert_module(module.to(device))
    module.train()
    steps, rounds = int(cfg.bench.steps), int(cfg.bench.rounds)
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(steps)]
    xs = [plugin.convert_input(b["image"].to(device)) for b in batches]
    ids = [b["index"] for b in batches]
    n = xs[0].shape[0]
    params = [p for p in module.parameters() if p.requires_grad]
    s_params = [p for p in module.student.parameters() if p.requires_grad]
    # the training run's optimiser (type, fused kernels), at a small lr
    opt = build_optimizer(cfg.optim, [{"params": params, "lr": 1e-4}])
    s_opt = build_optimizer(cfg.optim, [{"params": s_params, "lr": 1e-4}])
    with torch.no_grad(), plugin.forward_context():
        rule = module.method.targets
        t_feats = module.method.needs_teacher_features
        outs = [module.teachers(x, features=t_feats) for x in xs]
        targets = [rule(o.logits, 1.0, o.features) for o in outs]

    def teachers(i: int) -> None:
        with plugin.forward_context():
            module.teachers(xs[i], features=module.method.needs_teacher_features)

    def student(i: int) -> None:
        with plugin.forward_context():
            out = module.student(xs[i], features=module.method.needs_features)
            loss = soft_cross_entropy(out.logits, targets[i])
        s_opt.zero_grad(set_to_none=True)
        loss.backward()
        s_opt.step()

    def full(i: int, cached: bool = False) -> None:
        with plugin.forward_context():
            terms = module.losses(xs[i], index=ids[i] if cached else None)
            loss = torch.stack(list(terms.values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    module.cache = open_or_build(
        cfg.teacher_cache.dir,
        module.teachers,
        dm.cache_key(),
        dm.cache_ids(),
        dm.cache_dataloader,
        device,
    )
    cache_build_s = time.perf_counter() - t0
    phases = {
        "teachers": teachers,
        "student": student,
        "full": full,
        "cached": lambda i: full(i, cached=True),
    }
    for fn in phases.values():  # warm-up
        for i in range(min(2, steps)):
            fn(i)
    times: dict[str, list[float]] = {k: [] for k in phases}
    for _ in range(rounds):
        for k, fn in phases.items():
            times[k].append(timed(fn, steps, device))
    sec = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: n / v for k, v in sec.items()}
    spread = {k: (n / max(v), n / min(v)) for k, v in times.items()}  # slowest, fastest round
    bound = n / (sec["teachers"] + sec["student"])
    return {
        "machine": machine(device),
        "device": str(device),
        "batch": n,
        "image_size": dm.image_size,
        "channels": dm.channels,
        "method": method_name(cfg),
        "student": str(cfg.student.arch),
        "teachers": {k: m.arch for k, m in module.teachers.metas.items()},
        "teacher_dtype": str(module.teachers.dtype).replace("torch.", ""),
        "precision": str(plugin.precision),  # what Lightning runs (16-mixed on a CPU: bf16)
        "channels_last": bool(cfg.student.get("channels_last", False)),
        "teacher_channels_last": module.teachers.channels_last,
        "optimizer": type(opt).__name__ + (" (fused)" if opt.defaults.get("fused") else ""),
        "steps": steps,
        "rounds": rounds,
        "img_per_s": ips,
        "img_per_s_range": spread,
        "bound_img_per_s": bound,
        "teachers_share_of_bound": sec["teachers"] / (sec["teachers"] + sec["student"]),
        "ratio_full_over_bound": ips["full"] / bound,
        "ratio_cached_over_full": ips["cached"] / ips["full"],
        "cache_build_s": cache_build_s,
        "peak_memory_mb": peak_memory_mb(device),
    }


def markdown(r: dict[str, Any], command: str) -> str:
    ips, rng = r["img_per_s"], r["img_per_s_range"]

    def row(label: str, k: str) -> str:
        lo, hi = rng[k]
        return f"| {label} | {ips[k]:.0f} | {lo:.0f}-{hi:.0f} |"

    return "\n".join(
        [
            f"## {r['method']} step, {r['student']} student, teachers "
            + ", ".join(f"{k} ({v})" for k, v in r["teachers"].items()),
            "",
            f"Machine: {r['machine']}. Batch {r['batch']}, {r['image_size']} px, "
            f"{r['channels']} channel(s); precision {r.get('precision', '32-true')}; student "
            f"channels_last {r.get('channels_last', False)}; teachers in {r['teacher_dtype']}"
            f"{', channels_last' if r.get('teacher_channels_last') else ''}; "
            f"optimiser {r['optimizer']}; median of {r['rounds']} interleaved rounds of "
            f"{r['steps']} steps each. Command: `{command}`",
            "",
            "| phase | images/s (median round) | slowest-fastest round |",
            "|---|---|---|",
            row("(a) teachers' forward", "teachers"),
            row("(b) student train step alone", "student"),
            f"| bound: (a) and (b) back to back | {r['bound_img_per_s']:.0f} | |",
            row("(c) full amalgamation step, no cache", "full"),
            row("(d) full amalgamation step, teacher cache", "cached"),
            "",
            f"- c / bound = **{r['ratio_full_over_bound']:.3f}**; d / c = "
            f"**{r['ratio_cached_over_full']:.2f}x**; teachers' forward = "
            f"{100 * r['teachers_share_of_bound']:.0f} % of the bound",
            f"- cache build (once, over the whole pool): {r['cache_build_s']:.1f} s; "
            f"peak memory {r['peak_memory_mb']:.0f} MB "
            f"({'process RSS' if r['device'] == 'cpu' else 'GPU allocated'})",
            "",
        ]
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    import sys

    r = bench(cfg)
    table = Table(title=f"amalgam bench: {r['machine']}")
    table.add_column("phase")
    table.add_column("img/s", justify="right")
    table.add_column("slowest-fastest round", justify="right")
    for k, v in r["img_per_s"].items():
        lo, hi = r["img_per_s_range"][k]
        table.add_row(k, f"{v:.0f}", f"{lo:.0f}-{hi:.0f}")
    table.add_row("bound (teachers + student)", f"{r['bound_img_per_s']:.0f}", "")
    Console().print(table)
    Console().print(
        f"full / bound = {r['ratio_full_over_bound']:.3f}, "
        f"cached / full = {r['ratio_cached_over_full']:.2f}x, "
        f"peak memory {r['peak_memory_mb']:.0f} MB"
    )
    if cfg.bench.write:
        command = "python -m amalgam.bench " + " ".join(sys.argv[1:])
        path = Path(cfg.bench.write)
        head = path.read_text() if path.is_file() else "# Performance\n\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, head.rstrip() + "\n\n" + markdown(r, command))
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
