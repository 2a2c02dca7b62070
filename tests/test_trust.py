"""Files read back from disk are data: no callable off the allow-list is resolved from a
checkpoint's stored config, and pickled code is refused with a message that never advises
weights_only=False."""

import os
from pathlib import Path

import pytest
import torch
import yaml

import amalgam
from amalgam.checkpoint import read_checkpoint
from amalgam.errors import ConfigError
from amalgam.evaluate import evaluate_checkpoint
from amalgam.export import export_student
from amalgam.teachers.io import read_weights, torch_load_safely
from amalgam.trust import SHIPPED_TARGETS, allowed, check_untrusted_config
from amalgam.utils import CONF_DIR
from test_scaleout import cli

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]


# ------------------------------------------------------------------------------ the allow-list


def conf_targets() -> set[str]:
    out = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "_target_":
                    out.add(str(v))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for p in Path(CONF_DIR).rglob("*.yaml"):
        walk(yaml.safe_load(p.read_text()))
    return out


def test_every_target_of_the_shipped_configs_is_allowed():
    targets = conf_targets()
    assert "amalgam.methods.CFL" in targets and "lightning.Trainer" in targets
    assert [t for t in sorted(targets) if not allowed(t)] == []


@pytest.mark.parametrize(
    "target",
    [
        "amalgam.methods.CFL",
        "amalgam.methods.KD",
        "amalgam.targets.DensityRatio",
        "amalgam.data.AmalgamDataModule",
        "amalgam.data.sources.synthetic",
        "amalgam.nan_guard.NanGuard",
        "amalgam.csv_logger.CSVLogger",
        "amalgam.checkpoint_io.AtomicCheckpointIO",
        "amalgam.reliability.NanGuard",  # as configs stored before the move name them
        "amalgam.reliability.CSVLogger",
        "amalgam.reliability.AtomicCheckpointIO",
        *sorted(SHIPPED_TARGETS),
    ],
)
def test_amalgam_extension_points_are_allowed(target):
    assert allowed(target)


@pytest.mark.parametrize(
    "target",
    [
        "logging.basicConfig",
        "os.system",
        "builtins.eval",
        "subprocess.Popen",
        "amalgam.utils.os.system",  # an amalgam module's import of os: not amalgam's
        "amalgam.files.atomic_write_text",  # amalgam's, but a file writer, not a target
        "amalgam.data.sources.load_image",  # a helper of the sources module, not a source
        "amalgam.utils.log",
        "amalgam.nope.Thing",
        "amalgam.methods.CFL; import os",
        "",
        42,
    ],
)
def test_anything_else_is_refused(target):
    assert not allowed(target)
    assert allowed(target, trusted=[target]) == isinstance(target, str)


def test_untrusted_config_is_refused_before_import(monkeypatch):
    import importlib

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda n, *a: imported.append(n) or real(n))
    cfg = {"data": {"source": {"sources": [{"_target_": "evil_module_never_imported.run"}]}}}
    with pytest.raises(ConfigError) as e:
        check_untrusted_config(cfg, "checkpoint 'x.ckpt'", root="amalgam.config")
    msg = str(e.value)
    assert "amalgam.config.data.source.sources[0]._target_='evil_module_never_imported.run'" in msg
    assert (
        "refused before import" in msg and "trust_targets=[evil_module_never_imported.run]" in msg
    )
    assert not [n for n in imported if n.startswith("evil")]
    with pytest.raises(ConfigError, match=r"optim.lr='\$\{oc.env:HOME\}' is an interpolation"):
        check_untrusted_config({"optim": {"lr": "${oc.env:HOME}"}}, "checkpoint 'x.ckpt'")


# ------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def finished_run(tiny_teachers, tmp_path_factory) -> Path:
    """A tiny fast_dev_run amalgamation; returns its final.ckpt."""
    out = tmp_path_factory.mktemp("trusted_run")
    cfg = amalgam.compose(
        ["experiment=tiny", "debug=fast_dev_run", *QUIET], root=tiny_teachers, output_dir=out
    )
    amalgam.Amalgamation.from_config(cfg).fit()
    return out / "checkpoints" / "final.ckpt"


def tampered(ckpt: Path, dest: Path, victim: Path) -> Path:
    """`ckpt` with its stored target rule replaced by logging.basicConfig(filename=victim,
    filemode='w'): resolving and calling it would empty `victim`."""
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    data["amalgam"]["config"]["targets"] = {
        "_target_": "logging.basicConfig",
        "filename": str(victim),
        "filemode": "w",
    }
    torch.save(data, dest)
    return dest


@pytest.mark.slow
def test_checkpoint_naming_a_foreign_callable_never_calls_it(finished_run, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not empty me\n")
    evil = tampered(finished_run, tmp_path / "evil.ckpt", victim)
    key = "amalgam.config.targets._target_='logging.basicConfig'"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        evaluate_checkpoint(evil, tmp_path / "eval")
    with pytest.raises(ConfigError, match="is not a callable amalgam runs"):
        amalgam.load(evil)
    with pytest.raises(ConfigError, match="refused before import"):
        export_student(evil, tmp_path / "export")
    assert victim.read_text() == "do not empty me\n"
    assert not (tmp_path / "eval").exists() and not (tmp_path / "export").exists()
    # the untouched checkpoint still loads, through every entry point
    assert (
        read_checkpoint(finished_run, ())
        .record.config["targets"]["_target_"]
        .startswith("amalgam.targets.")
    )


@pytest.mark.slow
def test_evaluate_cli_refuses_it_in_one_line(finished_run, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep\n")
    evil = tampered(finished_run, tmp_path / "evil.ckpt", victim)
    p = cli(tmp_path, f"ckpt_path={evil}", f"output_dir={tmp_path / 'e'}",
            module="amalgam.evaluate", check=False)  # fmt: skip
    assert p.returncode != 0
    assert "amalgam.config.targets._target_='logging.basicConfig'" in p.stderr
    assert "Traceback" not in p.stderr
    assert victim.read_text() == "keep\n"


# ------------------------------------------------------------------------------ pickled code


class Foreign:
    """Unpickles to posix.system(...): a foreign global, as a hostile file would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [None, 4])
def test_pickled_code_is_named_as_such_and_torch_advice_never_shown(tmp_path, protocol):
    import pickle

    marker = tmp_path / "ran"
    p = tmp_path / "evil.ckpt"
    if protocol is None:
        torch.save({"state_dict": {}, "x": Foreign(marker)}, p)
    else:  # a plain pickle file: torch's unpickler stops at an opcode, not a global
        p.write_bytes(pickle.dumps({"x": Foreign(marker)}, protocol=protocol))
    for call in (
        lambda: torch_load_safely(p, "checkpoint"),
        lambda: read_weights(p, "teacher 'evil' weights"),
        lambda: read_checkpoint(p),
    ):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "holds pickled Python code" in msg and "refused for safety" in msg
        assert "weights_only" not in msg and "truncated" not in msg
        assert "\n" not in msg
    if protocol is None:
        assert "posix.system" in msg
    assert not marker.exists()


def test_truncated_file_is_named_truncated_not_code(tmp_path):
    p = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ConfigError, match="truncated or corrupt") as e:
        read_checkpoint(p)
    assert "pickled" not in str(e.value) and "weights_only" not in str(e.value)
