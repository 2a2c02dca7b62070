"""Provenance: the code, packages and machine recorded with every result and teacher file."""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import amalgam
from amalgam.provenance import PACKAGE_DIR, code_version, provenance
from amalgam.report.analysis import plot_bars
from amalgam.report.run import code_line
from amalgam.report.sweep import jobs_frame, plot, provenance_notes, table_rows, variants_frame

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(cwd: Path, *args: str) -> str:
    env_args = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    out = subprocess.run(["git", *env_args, *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repository laid out like amalgam's: src/amalgam/ with a tracked file, committed."""
    pkg = tmp_path / "src" / "amalgam"
    pkg.mkdir(parents=True)
    (pkg / "core.py").write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path, pkg.resolve()


@needs_git
def test_commit_and_uncommitted_changes_of_a_checkout(repo):
    root, pkg = repo
    head = git(root, "rev-parse", "HEAD")
    got = code_version(pkg)
    assert got == {"amalgam": amalgam.__version__, "git_commit": head, "git_dirty": False}
    (pkg / "notes.txt").write_text("untracked files are not the code\n")
    assert code_version(pkg)["git_dirty"] is False
    (pkg / "core.py").write_text("x = 2\n")  # a tracked file changed: the result is not HEAD's
    assert code_version(pkg) == {**got, "git_dirty": True}
    git(root, "commit", "-q", "-am", "second")
    again = code_version(pkg)
    assert again["git_commit"] != head and len(again["git_commit"]) == 40
    assert again["git_dirty"] is False


@needs_git
def test_a_repository_that_is_not_amalgams_gives_no_commit(tmp_path):
    """amalgam installed into a venv inside some other repository reports no commit of it."""
    (tmp_path / "lib" / "amalgam").mkdir(parents=True)
    (tmp_path / "lib" / "amalgam" / "core.py").write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    got = code_version((tmp_path / "lib" / "amalgam").resolve())
    assert got["git_commit"] is None and got["git_dirty"] is None


def test_outside_any_repository_gives_no_commit(tmp_path):
    assert code_version(tmp_path.resolve())["git_commit"] is None


def test_provenance_names_the_packages_and_machine():
    p = provenance()
    assert p["torch"] == torch.__version__ and p["amalgam"] == amalgam.__version__
    assert p["threads"] == torch.get_num_threads() and p["cpu"]
    assert all(p[k] for k in ("lightning", "timm", "hydra-core", "numpy", "python"))
    line = code_line(p)
    assert f"amalgam {amalgam.__version__}" in line and f"torch {torch.__version__}" in line
    if p["git_commit"]:  # this checkout's own commit
        assert git(PACKAGE_DIR, "rev-parse", "HEAD") == p["git_commit"]
        assert f"commit {p['git_commit'][:12]}" in line
    dirty = code_line({**p, "git_commit": "ab" * 20, "git_dirty": True})
    assert "commit abababababab (uncommitted changes)" in dirty
    assert "no git commit" in code_line({**p, "git_commit": None})


def test_sweep_report_warns_when_jobs_mix_commits_or_teacher_files():
    def job(commit, dirty, hashes):
        return {
            "provenance": {"git_commit": commit, "git_dirty": dirty},
            "teacher_hashes": hashes,
        }

    a, b = "a" * 40, "b" * 40
    same = [job(a, False, {"t": "1"}), job(a, False, {"t": "1"})]
    assert provenance_notes(same) == [f"Code: {a[:12]} (2 jobs)"]
    mixed = [job(a, False, {"t": "1"}), job(b, True, {"t": "2"}), job(a, False, {"t": "1"})]
    notes = provenance_notes(mixed)
    code = f"Code: {a[:12]} (2 jobs), {b[:12]} (1 jobs)"
    assert notes[0] == f"{code}; 1 jobs with uncommitted changes"
    assert "different commits" in notes[1] and "2 different sets of teacher files" in notes[2]
    # results written before provenance was recorded
    assert provenance_notes([{"teacher_hashes": {"t": "1"}}]) == ["Code: unknown (1 jobs)"]


def test_provenance_records_the_code_at_import_and_a_later_change(monkeypatch):
    import amalgam.provenance as prov

    start = {"amalgam": amalgam.__version__, "git_commit": "aa" * 20, "git_dirty": False}
    monkeypatch.setattr(prov, "AT_IMPORT", start)
    monkeypatch.setattr(prov, "code_version", lambda: dict(start))
    p = prov.provenance()
    assert p["git_commit"] == "aa" * 20 and "git_at_write" not in p
    # a commit landed while the process ran: the record keeps the code that ran, and says so
    monkeypatch.setattr(prov, "code_version", lambda: {**start, "git_commit": "bb" * 20})
    p = prov.provenance()
    assert p["git_commit"] == "aa" * 20 and p["git_dirty"] is False
    assert p["git_at_write"] == {"git_commit": "bb" * 20, "git_dirty": False}


def job(variant, seed, student, ensemble):
    """One sweep job's results.json, as far as the sweep report reads it: one task, joint."""
    return {
        "variant": variant,
        "method": "cfl",
        "seed": seed,
        "tasks": {"a": {"student_acc": 0.9, "teacher_acc": 0.95}},
        "joint": {"student_acc": student, "teacher_ensemble_acc": ensemble},
    }


def test_sweep_table_gives_each_rule_its_own_teacher_ensemble():
    """A sweep over targets=: each variant's teacher ensemble differs, so the joint cell of the
    teachers' row cannot stand for all of them; each row carries its own."""
    jobs = [job("targets=concat", s, 0.60 + s / 100, 0.59) for s in (0, 1)]
    header, body = table_rows(variants_frame(jobs_frame(jobs)))
    assert header[-1] == "joint student" and body[0][-1] == "59.00 ± 0.00"
    jobs += [job("targets=density_ratio", s, 0.88, 0.87 + s / 100) for s in (0, 1)]
    header, body = table_rows(variants_frame(jobs_frame(jobs)))
    assert header[-2:] == ["joint student", "joint teacher ensemble"]
    assert body[0][-2:] == ["per variant ->", "-"]
    rows = {r[0]: r[-2:] for r in body[1:]}
    assert rows["targets=concat"] == ["60.50 ± 0.71", "59.00 ± 0.00"]
    assert rows["targets=density_ratio"] == ["88.00 ± 0.00", "87.50 ± 0.71"]
    assert all(len(r) == len(header) for r in body)


def test_sweep_plots_mark_each_rule_ensemble_instead_of_one_teachers_bar(tmp_path):
    from matplotlib.collections import LineCollection

    def dashed(c):
        return isinstance(c, LineCollection) and c.get_linestyle()[0][1] is not None

    same = [job("targets=concat", s, 0.6, 0.59) for s in (0, 1)]
    ax = plot_bars(same).axes[0]
    assert ax.patches[1].get_height() == pytest.approx(59.0)  # teachers' joint bar
    assert not [c for c in ax.collections if dashed(c)]
    jobs = same + [job("targets=density_ratio", s, 0.88, 0.30 + s / 10) for s in (0, 1)]
    ax = plot_bars(jobs).axes[0]
    bars = list(ax.patches)  # teachers a, joint; then each variant a, joint
    assert len(bars) == 6 and math.isnan(bars[1].get_height())
    marks = [c for c in ax.collections if dashed(c)]
    ys = sorted(seg[0][1] for c in marks for seg in c.get_segments())
    assert ys == pytest.approx([35.0, 59.0])
    assert ax.get_ylim()[0] <= 35.0
    variants = variants_frame(jobs_frame(jobs))
    assert plot(variants, tmp_path / "p.png").stat().st_size > 0
