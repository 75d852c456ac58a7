"""scripts/card_text.py: the model card's reproduce commands carry each stage's validation period."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from card_text import eval_every, reproduce, stages  # scripts/ is a folder of scripts, not a package

ROOT = Path(__file__).resolve().parents[1]


def _stages() -> list[dict]:
    return stages(json.loads((ROOT / "moeopt/assets/reference-moe/training.json").read_text()))


def test_eval_period_is_read_from_the_record_or_its_curve() -> None:
    assert eval_every({"eval_every": 25, "valid_curve": [{"step": 50}, {"step": 100}]}) == 25
    assert eval_every({"valid_curve": [{"step": 50}, {"step": 100}]}) == 50
    assert eval_every({"valid_curve": [{"step": 40}]}) == 100  # one point: the last step, default period
    # The shipped checkpoint: stages 1 and 2 validated every 100 steps, stage 3 every 50.
    assert [eval_every(s) for s in _stages()] == [100, 100, 50]


def test_only_the_stage_that_validated_every_50_steps_says_so() -> None:
    stages = _stages()
    moe = stages[-1]
    lines = [ln for ln in reproduce(moe, moe) if "train_reference.py" in ln]
    assert len(lines) == 2 * len(stages)
    with_flag = [ln for ln in lines if "--eval-every 50" in ln]
    assert len(with_flag) == 2 and all("--seed 2 " in ln for ln in with_flag)
