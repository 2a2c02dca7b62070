"""Task-aware and joint accuracy of the student and of the teachers, on the same test images."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from amalgam.backbone import Backbone
from amalgam.targets import TargetRule, union_log_targets
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import TeacherBank


class AmalgamAccuracy(Metric):
    """Accumulates, from logits over the union label space and union labels:

    - task-aware accuracy of task i: on images of C_i, argmax restricted to the logits of C_i;
    - joint accuracy: on every image, argmax over the whole union.
    """

    full_state_update = False

    def __init__(self, space: LabelSpace, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.space = space
        k, n = space.num_classes, len(space.tasks)
        member = torch.zeros(n, k, dtype=torch.bool)
        local = torch.full((n, k), -1, dtype=torch.long)
        for i, t in enumerate(space.tasks):
            idx = torch.tensor(space.indices(t.name))
            member[i, idx] = True
            local[i, idx] = torch.arange(len(idx))
        self.register_buffer("member", member, persistent=False)
        self.register_buffer("local", local, persistent=False)
        self.task_index = [torch.tensor(space.indices(t.name)) for t in space.tasks]
        self.add_state("correct", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("joint_correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("joint_total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.long()
        self.joint_correct += (logits.argmax(1) == labels).sum()
        self.joint_total += labels.numel()
        for i, idx in enumerate(self.task_index):
            mask = self.member[i, labels]
            if not mask.any():
                continue
            pred = logits[mask][:, idx.to(logits.device)].argmax(1)
            self.correct[i] += (pred == self.local[i, labels[mask]]).sum()
            self.total[i] += mask.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {
            t.name: self.correct[i].float() / self.total[i].clamp_min(1)
            for i, t in enumerate(self.space.tasks)
        }
        out["joint"] = self.joint_correct.float() / self.joint_total.clamp_min(1)
        return out


def task_owner(space: LabelSpace) -> torch.Tensor:
    """[K] the task of each union class: the first task (in teacher-set order) that lists it."""
    owner = torch.full((space.num_classes,), -1, dtype=torch.long)
    for i, t in reversed(list(enumerate(space.tasks))):
        owner[torch.tensor(space.indices(t.name))] = i
    return owner


def task_confusion(
    pred: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor, n_tasks: int
) -> torch.Tensor:
    """[N, N] counts: row = true task, column = predicted task (task of the argmax class).

    A class shared by several tasks counts for the first task that lists it (`task_owner`).
    """
    owner = owner.to(labels.device)
    flat = owner[labels.long()] * n_tasks + owner[pred.long()]
    return torch.bincount(flat, minlength=n_tasks * n_tasks).reshape(n_tasks, n_tasks).cpu()


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def throughput(model: Backbone, x: torch.Tensor, iters: int = 3) -> float:
    """Images per second of an eval-mode forward (logits only) on batch `x`."""
    was = model.training
    model.eval()
    model(x, features=False)
    t0 = time.perf_counter()
    for _ in range(iters):
        model(x, features=False)
    if x.is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    model.train(was)
    return iters * x.shape[0] / dt


class TaskConfusion(Metric):
    """[N, N] counts of true task (rows) against the task of the joint argmax (columns), for
    the student and for the teachers' ensemble; a shared class counts for its first task."""

    full_state_update = False

    def __init__(self, space: LabelSpace, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n = len(space.tasks)
        self.n_tasks = n
        self.register_buffer("owner", task_owner(space), persistent=False)
        for who in ("student", "teachers"):
            self.add_state(who, torch.zeros(n, n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor) -> None:
        self.student += task_confusion(student, labels, self.owner, self.n_tasks).to(self.device)
        self.teachers += task_confusion(teachers, labels, self.owner, self.n_tasks).to(self.device)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"student": self.student.clone(), "teachers": self.teachers.clone()}


class TestMetrics(nn.Module):
    """What the final evaluation accumulates over labeled test batches (union labels): the
    student's and the teachers' task-aware and joint accuracy, each teacher's own head on its
    own task, the reference rule's (concatenated logits) ensemble beside the run's rule, and the
    task confusion. Every state is a torchmetrics sum, so DDP ranks add up (`sync=True`).

    The teachers' joint prediction is the argmax of the target rule's distribution (default:
    concatenated logits); task-aware teacher accuracy is each teacher's own head on its task
    (a shared class must not borrow another teacher's logit).
    """

    def __init__(self, space: LabelSpace, targets: TargetRule | None = None, sync: bool = True):
        super().__init__()
        self.space = space
        self.targets = [targets]  # a list: the rule is the module's, not a submodule here
        self.rule = type(targets).__name__ if targets is not None else "Concat"
        self.feats = targets is not None and targets.needs_features

        def acc() -> AmalgamAccuracy:
            return AmalgamAccuracy(space, sync_on_compute=sync)

        self.student = acc()
        self.teachers = acc()
        self.reference = acc() if self.rule != "Concat" else None
        self.own = nn.ModuleList(acc() for _ in space.tasks)
        self.confusion = TaskConfusion(space, sync_on_compute=sync)
        self.index = [torch.tensor(space.indices(t.name)) for t in space.tasks]

    @torch.no_grad()
    def update(
        self, student: Backbone, teachers: TeacherBank, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        space, rule = self.space, self.targets[0]
        s_logits = student(x, features=False).logits
        self.student.update(s_logits, y)
        out = teachers(x, features=self.feats)
        logits = out.logits
        log_q = union_log_targets(logits, space, rule, out.features if self.feats else None)
        self.teachers.update(log_q, y)
        if self.reference is not None:
            self.reference.update(union_log_targets(logits, space, None, None), y)
        self.confusion.update(s_logits.argmax(1), log_q.argmax(1), y)
        for metric, z, idx in zip(self.own, logits, self.index, strict=True):
            full = z.new_full((len(z), space.num_classes), float("-inf"))
            metric.update(full.index_copy_(1, idx.to(z.device), z.float()), y)

    def compute(self) -> dict[str, Any]:
        """{"tasks": {name: accuracies, classes, n_test}, "joint": ..., "task_confusion": ...}"""
        space = self.space
        s, t = self.student.compute(), self.teachers.compute()
        t |= {task.name: self.own[i].compute()[task.name] for i, task in enumerate(space.tasks)}
        with self.student.sync_context(should_sync=self.student.sync_on_compute):
            totals = self.student.total.tolist()  # summed over the ranks
            n = int(self.student.joint_total)
        tasks = {
            task.name: {
                "classes": list(task.classes),
                "teacher_acc": float(t[task.name]),
                "student_acc": float(s[task.name]),
                "n_test": int(totals[i]),
            }
            for i, task in enumerate(space.tasks)
        }
        joint = {
            "student_acc": float(s["joint"]),
            "teacher_ensemble_acc": float(t["joint"]),
            "n_test": n,
            "target_rule": self.rule,
        }
        if self.reference is not None:
            joint["teacher_ensemble_concat_acc"] = float(self.reference.compute()["joint"])
        conf = self.confusion.compute()
        confusion = {
            "tasks": list(space.names),
            "student": conf["student"].tolist(),
            "teachers": conf["teachers"].tolist(),
            "shared_classes": "counted for the first task that lists them",
        }
        return {"tasks": tasks, "joint": joint, "task_confusion": confusion}


@torch.no_grad()
def evaluate(
    student: Backbone,
    teachers: TeacherBank,
    loader,
    space: LabelSpace,
    device: torch.device | str = "cpu",
    targets: TargetRule | None = None,
) -> dict[str, Any]:
    """`TestMetrics` of any student and teachers over a loader of labeled images, in this
    process (a run's final evaluation is `AmalgamModule.test_step`, inside the Trainer)."""
    was = student.training
    student.eval()
    metrics = TestMetrics(space, targets, sync=False).to(device)
    for x, y in loader:
        metrics.update(student, teachers, x.to(device), y.to(device))
    student.train(was)
    return metrics.compute()


def model_stats(
    student: Backbone,
    teachers: TeacherBank,
    image_size: int,
    channels: int,
    device: torch.device | str = "cpu",
    batch: int = 64,
) -> dict[str, Any]:
    """Parameter counts and eval throughput of the student and each teacher, one batch each."""
    x = torch.rand(batch, channels, image_size, image_size, device=device)
    params = {"student": count_params(student), "teachers": {}}
    speed = {
        "student": throughput(student, x),
        "teachers": {},
        "batch": batch,
        "image_size": image_size,
        "device": str(device),
    }
    for name, t in teachers.teachers.items():
        params["teachers"][name] = count_params(t)
        speed["teachers"][name] = throughput(t, x)
    params["teachers_total"] = sum(params["teachers"].values())
    return {"params": params, "throughput_img_s": speed}
