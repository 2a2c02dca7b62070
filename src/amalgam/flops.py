"""`python -m amalgam.flops experiment=cub_dogs`: measured FLOPs per image and GPU-time estimates.

Without any weights or data files it (1) counts, with `torch.utils.flop_counter.FlopCounterMode`
on the CPU, the FLOPs per image of each teacher's forward, of the student's forward + backward
and of the method's own block (e.g. CFL's common-feature block and its losses, forward +
backward), (2) measures here the single-core rate of decoding + preprocessing a typical
fine-grained JPEG (500 x 375, quality 90) with the training transform, and (3) turns both into
ESTIMATES of GPU time per epoch and per run: compute = FLOPs / (vendor peak x assumed MFU),
input bound = images / (decode rate x loader workers), each phase bounded by the slower of the
two. Only the FLOP counts and the decode rate are measurements; every time is an estimate.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from amalgam.backbone import Backbone, ModelOutput, create_timm
from amalgam.build import build_method
from amalgam.errors import ConfigError
from amalgam.files import atomic_write_text
from amalgam.provenance import cpu_name
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import TeacherOutputs
from amalgam.utils import CONF_DIR, quiet_known_warnings, to_dict

# official split sizes: the student's training pool is the union of the tasks' training images,
# evaluation runs teachers and student over the union of their test images
DATASET_IMAGES = {
    "cub200": {"classes": 200, "train": 5994, "test": 5794},
    "dogs": {"classes": 120, "train": 12000, "test": 8580},
    "cars": {"classes": 196, "train": 8144, "test": 8041},
    "aircraft": {"classes": 100, "train": 6667, "test": 3333},
}
EXPERIMENT_DATASETS = {
    "cub_dogs": ("cub200", "dogs"),
    "cars_aircraft": ("cars", "aircraft"),
    "fine_grained4": ("cub200", "dogs", "cars", "aircraft"),
}
EXPERIMENT_IMAGES = {
    name: {
        "train": sum(DATASET_IMAGES[d]["train"] for d in sets),
        "test": sum(DATASET_IMAGES[d]["test"] for d in sets),
    }
    for name, sets in EXPERIMENT_DATASETS.items()
}
# a teacher's class count from its name: the first key contained in it
NAME_CLASSES = {"cub": 200, "dogs": 120, "cars": 196, "aircraft": 100}
BATCH = 2


# ------------------------------------------------------------------------------ FLOPs


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (matrix products and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def teacher_classes(name: str, cfg: Mapping[str, Any], given: Mapping[str, int]) -> int:
    """K of a teacher: flops.num_classes.<name>, else len(classes), else from its name."""
    if name in given:
        return int(given[name])
    if cfg.get("classes"):
        return len(cfg["classes"])
    low = name.lower()
    for key, k in NAME_CLASSES.items():
        if key in low:
            return k
    raise ConfigError(
        f"teacher '{name}': cannot tell its class count (classes: null and its name names none "
        f"of {list(NAME_CLASSES)}); set flops.num_classes.{name}=<K>"
    )


def build_backbone(cfg: Mapping[str, Any], num_classes: int, key: str) -> Backbone:
    """A randomly initialised network of the config's arch (no weights read)."""
    model = create_timm(
        cfg["arch"],
        num_classes,
        cfg.get("in_chans") or 3,
        key=key,
        **(cfg.get("model_kwargs") or {}),
    )
    return Backbone(
        model,
        cfg.get("in_chans") or 3,
        cfg.get("input_size"),
        cfg.get("mean"),
        cfg.get("std"),
        cfg.get("feature_indices") or (-1,),
    )


def forward_flops(net: Backbone, x: torch.Tensor, features: bool = False) -> float:
    """FLOPs per image of an eval, no-grad forward."""
    net.eval()

    def run() -> None:
        with torch.no_grad():
            net(x, features=features)

    return count_flops(run) / x.shape[0]


def train_flops(net: Backbone, x: torch.Tensor, num_classes: int, features: bool) -> float:
    """FLOPs per image of a training forward + backward (summed cross-entropy on the logits)."""
    net.train()
    y = torch.randint(0, num_classes, (x.shape[0],))

    def run() -> None:
        out = net(x, features=features)
        F.cross_entropy(out.logits, y, reduction="sum").backward()

    flops = count_flops(run) / x.shape[0]
    net.zero_grad(set_to_none=True)
    return flops


def method_flops(method: torch.nn.Module, s_out: ModelOutput, t_out: TeacherOutputs) -> float:
    """FLOPs per image of the method's forward + backward on random student/teacher outputs."""
    method.train()
    n = s_out.logits.shape[0]
    logits = s_out.logits.detach().clone().requires_grad_(True)
    feats = [f.detach().clone().requires_grad_(True) for f in s_out.features]
    labels = torch.randint(0, logits.shape[1], (n,))

    def run() -> None:
        terms = method(ModelOutput(logits, feats), t_out, labels)
        torch.stack([v.float() for v in terms.values()]).sum().backward()

    return count_flops(run) / n


def measure_flops(cfg: DictConfig) -> dict[str, Any]:
    """GFLOPs per image of each teacher's forward, the student's forward and forward + backward,
    and the method's block (forward + backward), at data.image_size, batch 2, on the CPU."""
    size = int(cfg.data.image_size)
    channels = int(cfg.data.get("channels") or 3)
    given = to_dict(cfg.flops.get("num_classes") or {})
    teacher_set = to_dict(cfg.teacher_set)
    student_cfg = dict(to_dict(cfg.student))
    feat_idx = student_cfg.get("feature_indices") or [-1]
    torch.manual_seed(0)
    x = torch.rand(BATCH, channels, size, size)

    tasks, teachers = {}, {}
    for name, t in teacher_set.items():
        k = teacher_classes(name, t, given)
        tasks[name] = [f"{name}/{i}" for i in range(k)]
        tcfg = {**t, "feature_indices": t.get("feature_indices") or feat_idx}
        teachers[name] = build_backbone(tcfg, k, f"teacher_set.{name}.arch")
        teachers[name].fixed_stages = t.get("feature_indices") is not None
    space = LabelSpace.from_mapping(tasks)
    student = build_backbone(student_cfg, space.num_classes, "student.arch")
    bank = SimpleNamespace(teachers=teachers)  # what build_method reads: .teachers
    method = build_method(cfg.method, space, student, bank, size, channels, cfg.get("targets"))
    s_feats = bool(method.needs_features)
    t_feats = bool(method.needs_teacher_features)

    t_gflops, t_outs = {}, []
    for name, net in teachers.items():
        t_gflops[name] = forward_flops(net, x, features=t_feats) / 1e9
        with torch.no_grad():
            t_outs.append(net(x, features=t_feats))
    t_out = TeacherOutputs([o.logits for o in t_outs], [o.features for o in t_outs])
    s_fwd = forward_flops(student, x) / 1e9
    s_train = train_flops(student, x, space.num_classes, s_feats) / 1e9
    student.eval()
    with torch.no_grad():
        s_out = student(x, features=s_feats)
    m_train = method_flops(method, s_out, t_out) / 1e9
    uses_teachers = bool(getattr(method, "uses_teachers", True))
    teachers_sum = sum(t_gflops.values()) if uses_teachers else 0.0
    return {
        "image_size": size,
        "channels": channels,
        "batch": BATCH,
        "method": str(cfg.method.get("name") or cfg.method["_target_"].rsplit(".", 1)[-1]),
        "student": {"arch": str(student_cfg["arch"]), "classes": space.num_classes},
        "teachers": {
            n: {"arch": str(teacher_set[n]["arch"]), "classes": len(tasks[n])} for n in teachers
        },
        "teacher_fwd_gflops": t_gflops,
        "student_fwd_gflops": s_fwd,
        "student_train_gflops": s_train,
        "method_train_gflops": m_train,
        # per training image: the frozen teachers' forward (no cache), the student's forward +
        # backward and the method's block forward + backward
        "train_gflops": teachers_sum + s_train + m_train,
        # per test image: every teacher's and the student's forward
        "eval_gflops": sum(t_gflops.values()) + s_fwd,
    }


# ------------------------------------------------------------------------------ decode rate


def make_jpegs(directory: Path, n: int, width: int = 500, height: int = 375) -> list[Path]:
    """`n` random-texture photos-like JPEGs (smooth blobs + fine grain), quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        path = directory / f"img_{i:04d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def preprocess_of(cfg: DictConfig):
    """The experiment's timm preprocessing (data.preprocess with mode=timm)."""
    from amalgam.data.transforms import Preprocess

    given = to_dict(cfg.data.get("preprocess")) or {}
    return Preprocess.from_config({**given, "mode": "timm"})


def decode_rate(cfg: DictConfig, n: int, rounds: int = 3, min_s: float = 0.3) -> dict[str, Any]:
    """Images/s on ONE core: PIL open + convert RGB + the timm train (eval) transform at
    data.image_size, over `n` generated JPEGs: median of `rounds` rounds (each whole passes
    over the files, at least `min_s` seconds) after a warm-up."""
    from PIL import Image

    size = int(cfg.data.image_size)
    pre = preprocess_of(cfg)
    transforms = {"train": pre.train_transform(size), "eval": pre.eval_transform(size)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="amalgam-flops-") as d:
            paths = make_jpegs(Path(d), n)
            kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
            rates = {}
            for mode, tf in transforms.items():

                def one_pass(tf=tf) -> float:  # whole passes over the files, >= min_s long
                    done, t0 = 0, time.perf_counter()
                    while done == 0 or time.perf_counter() - t0 < min_s:
                        for p in paths:
                            with Image.open(p) as im:
                                tf(im.convert("RGB"))
                        done += len(paths)
                    return done / (time.perf_counter() - t0)

                for p in paths[: min(8, len(paths))]:  # warm-up
                    with Image.open(p) as im:
                        tf(im.convert("RGB"))
                rates[mode] = statistics.median(one_pass() for _ in range(rounds))
    finally:
        torch.set_num_threads(threads)
    return {
        "images": n,
        "jpeg_kb": kb,
        "train_img_per_s_core": rates["train"],
        "eval_img_per_s_core": rates["eval"],
    }


# ------------------------------------------------------------------------------ estimate


def experiment_images(cfg: DictConfig, name: str | None) -> tuple[int, int]:
    """(train images per epoch, test images per evaluation): flops.*, else the experiment's."""
    known = EXPERIMENT_IMAGES.get(str(name or cfg.get("task_name")), {})
    train = cfg.flops.get("train_images") or known.get("train")
    test = cfg.flops.get("test_images") or known.get("test")
    if train is None:
        raise ConfigError(
            f"flops.train_images: no image counts known for experiment '{name}' (known: "
            f"{list(EXPERIMENT_IMAGES)}); pass flops.train_images=<N> (and flops.test_images)"
        )
    return int(train), int(test or 0)


def estimate_times(
    train_gflops: float,
    eval_gflops: float,
    train_images: int,
    test_images: int,
    peak_tflops: float,
    mfu: float,
    decode: Mapping[str, float] | None = None,
    workers: tuple[int, ...] = (8, 16),
) -> dict[str, Any]:
    """Seconds per epoch: compute = FLOPs x images / (peak x mfu) for training and for the
    evaluation; input bound = images / (per-core decode rate x workers); per phase the slower."""
    flops_per_s = peak_tflops * 1e12 * mfu
    train_s = train_gflops * 1e9 * train_images / flops_per_s
    eval_s = eval_gflops * 1e9 * test_images / flops_per_s
    out: dict[str, Any] = {
        "train_compute_s": train_s,
        "eval_compute_s": eval_s,
        "compute_s": train_s + eval_s,
        "input_s": {},
        "epoch_s": {},
    }
    for w in workers:
        if decode:
            tin = train_images / (decode["train_img_per_s_core"] * w)
            ein = test_images / (decode["eval_img_per_s_core"] * w)
        else:
            tin = ein = 0.0
        out["input_s"][w] = tin + ein
        out["epoch_s"][w] = max(train_s, tin) + max(eval_s, ein)
    return out


def flops_report(cfg: DictConfig, name: str | None = None) -> dict[str, Any]:
    """Measured FLOPs and decode rate, and the GPU-time estimates, as one dict."""
    quiet_known_warnings()
    f = measure_flops(cfg)
    train_images, test_images = experiment_images(cfg, name)
    decode = decode_rate(cfg, int(cfg.flops.decode_images)) if cfg.flops.decode_images else None
    workers = tuple(int(w) for w in cfg.flops.get("workers") or (8, 16))
    epochs = int(cfg.trainer.max_epochs)
    mfu = float(cfg.flops.mfu)
    gpus = {}
    for gpu, peak in to_dict(cfg.flops.gpus).items():
        est = estimate_times(
            f["train_gflops"],
            f["eval_gflops"],
            train_images,
            test_images,
            float(peak),
            mfu,
            decode,
            workers,
        )
        est["peak_tflops"] = float(peak)
        est["run_s"] = {w: s * epochs for w, s in est["epoch_s"].items()}
        gpus[gpu] = est
    return {
        "experiment": str(name or cfg.get("task_name")),
        "machine": cpu_name(),
        "torch": torch.__version__,
        "flops": f,
        "decode": decode,
        "train_images": train_images,
        "test_images": test_images,
        "epochs": epochs,
        "mfu": mfu,
        "workers": list(workers),
        "gpus": gpus,
    }


# ------------------------------------------------------------------------------ output


def fmt_s(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def table_columns(r: dict[str, Any], est: str) -> list[str]:
    ws = r["workers"]
    cols = ["GPU", "peak TFLOP/s (vendor)", f"train compute/epoch ({est})"]
    cols += [f"eval compute/epoch ({est})"]
    cols += [f"input bound/epoch, {w} workers ({est})" for w in ws]
    cols += [f"epoch, {w} workers ({est})" for w in ws]
    run = f"{r['epochs']} epoch{'s' if r['epochs'] != 1 else ''}"
    cols += [f"{run}, {w} workers ({est})" for w in ws]
    return cols


def table_rows(r: dict[str, Any]) -> list[list[str]]:
    ws = r["workers"]
    return [
        [
            gpu,
            f"{e['peak_tflops']:g}",
            fmt_s(e["train_compute_s"]),
            fmt_s(e["eval_compute_s"]),
            *[fmt_s(e["input_s"][w]) for w in ws],
            *[fmt_s(e["epoch_s"][w]) for w in ws],
            *[fmt_s(e["run_s"][w]) for w in ws],
        ]
        for gpu, e in r["gpus"].items()
    ]


def flops_lines(r: dict[str, Any]) -> list[str]:
    f = r["flops"]
    lines = []
    for n, t in f["teachers"].items():
        lines.append(
            f"teacher {n} ({t['arch']}, {t['classes']} classes) forward: "
            f"{f['teacher_fwd_gflops'][n]:.2f} GFLOPs/image (measured)"
        )
    s = f["student"]
    lines += [
        f"student ({s['arch']}, {s['classes']} classes) forward: "
        f"{f['student_fwd_gflops']:.2f} GFLOPs/image (measured)",
        f"student forward + backward: {f['student_train_gflops']:.2f} GFLOPs/image (measured)",
        f"method {f['method']} block forward + backward: "
        f"{f['method_train_gflops']:.3f} GFLOPs/image (measured)",
        f"total per training image (teachers fwd + student fwd/bwd + method): "
        f"{f['train_gflops']:.2f} GFLOPs (measured)",
        f"total per test image (teachers + student fwd): {f['eval_gflops']:.2f} GFLOPs (measured)",
    ]
    return lines


def header(r: dict[str, Any]) -> str:
    f = r["flops"]
    return (
        f"Experiment {r['experiment']}, method {f['method']}, {f['image_size']} px. FLOPs counted "
        f"with torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions; batch "
        f"{f['batch']}, per image) on {r['machine']}, torch {r['torch']}."
    )


def decode_line(r: dict[str, Any]) -> str:
    d = r["decode"]
    if not d:
        return "decode rate: not measured (flops.decode_images=0): no input bound"
    return (
        f"decode + timm preprocessing, one core (measured on {r['machine']}): "
        f"{d['train_img_per_s_core']:.0f} images/s train transform, "
        f"{d['eval_img_per_s_core']:.0f} images/s eval transform "
        f"({d['images']} generated 500x375 JPEGs, quality 90, {d['jpeg_kb']:.0f} KB each)"
    )


def assumptions(r: dict[str, Any]) -> str:
    ws = " / ".join(str(w) for w in r["workers"])
    return (
        f"Estimates: {r['train_images']} training images and {r['test_images']} test images per "
        f"epoch (teachers + student forward on the test images every epoch), {r['epochs']} "
        f"epochs; compute = FLOPs / (vendor dense bf16 peak x MFU {r['mfu']:g}, assumed); input "
        f"bound = images / (this CPU's per-core decode rate x {ws} loader workers, assumed as "
        f"fast as this CPU's cores); per phase (train, eval) the slower of compute and input. "
        f"No teacher cache; no loader start-up, checkpointing or logging time."
    )


def print_report(r: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(header(r))
    for line in flops_lines(r):
        console.print(line)
    console.print(decode_line(r))
    table = Table(title=f"GPU time ESTIMATES: {r['experiment']} (not measured)")
    for i, col in enumerate(table_columns(r, "estimate")):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in table_rows(r):
        table.add_row(*row)
    console.print(table)
    console.print(assumptions(r))


def markdown(r: dict[str, Any], command: str) -> str:
    cols = table_columns(r, "estimate")
    rows = [
        f"## GPU time estimates: {r['experiment']}",
        "",
        header(r) + f" Command: `{command}`",
        "",
        *[f"- {line}" for line in flops_lines(r)],
        f"- {decode_line(r)}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *["| " + " | ".join(row) + " |" for row in table_rows(r)],
        "",
        assumptions(r),
        "",
    ]
    return "\n".join(rows)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="flops")
def main(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    name = HydraConfig.get().runtime.choices.get("experiment") or cfg.get("task_name")
    r = flops_report(cfg, name)
    print_report(r, Console(width=max(Console().width, 180)))
    if cfg.flops.get("write"):
        command = "python -m amalgam.flops " + " ".join(sys.argv[1:])
        path = Path(str(cfg.flops.write))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, markdown(r, command))
        print(f"wrote {path}")
    return r


if __name__ == "__main__":
    main()
