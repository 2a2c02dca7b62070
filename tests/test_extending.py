"""A new amalgamation method is one class plus one config entry (docs/EXTENDING.md)."""

import json

import pytest
import torch.nn.functional as F

from amalgam.amalgamate import amalgamate
from amalgam.errors import ConfigError
from amalgam.methods import Method
from conftest import make_cfg


class LogitMatching(Method):
    """Example from docs/EXTENDING.md: match the log of the target rule's distribution."""

    terms = ("match",)

    def __init__(self, space, student_shapes=(), teacher_shapes=None, weights=None, targets=None):
        super().__init__(space, student_shapes, teacher_shapes, weights or {"match": 1.0}, targets)

    def forward(self, student, teachers, labels=None):
        log_q = self.targets(teachers.logits).clamp_min(1e-8).log()
        log_p = F.log_softmax(student.logits.float(), dim=1)
        return {"match": self.weights["match"] * F.mse_loss(log_p, log_q)}


CONFIG = """# conf/method/logit_matching.yaml (here in a user's own config dir)
_target_: test_extending.LogitMatching
_partial_: true
name: logit_matching
weights: {match: 2.0}
"""


@pytest.mark.slow
def test_a_new_method_from_one_class_and_one_config_file(tiny_teachers, tmp_path):
    user_conf = tmp_path / "user_conf"
    (user_conf / "method").mkdir(parents=True)
    (user_conf / "method" / "logit_matching.yaml").write_text(CONFIG)
    over = [
        f"hydra.searchpath=[file://{user_conf}]",
        "experiment=tiny",
        "debug=fast_dev_run",
        "~callbacks.progress",
        "+trainer.enable_progress_bar=false",
        "method=logit_matching",
    ]
    cfg = make_cfg("amalgamate", over, tiny_teachers, tmp_path / "run")
    assert cfg.method.weights == {"match": 2.0}
    res = amalgamate(cfg)
    assert res["method"] == "logit_matching"
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(on_disk["tasks"]) == {"tiny_a", "tiny_b"}
    assert 0 <= on_disk["joint"]["student_acc"] <= 1
    # a loss-weight key the method does not have is refused before any work
    bad = make_cfg("amalgamate", [*over, "+method.weights.mse=1.0"], tiny_teachers)
    with pytest.raises(ConfigError, match="match"):
        amalgamate(bad)
