"""bench/apps.py --pool-seeds: pooling runs over LoRA seeds and the paired gap to the upper bound."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import apps as bench_apps  # bench/ is a folder of scripts, not a package


def _run(folder: Path, seeds: list[int], litemoe: list[float], upper: list[float], **settings: Any) -> Path:
    folder.mkdir()
    per = {"proxy_tuned": litemoe, "litemoe": litemoe, "upper": upper}
    result = {"model": "m", "apps": ["a", "b"], "settings": {"steps": 10, "seeds": seeds, **settings},
              "rows": {"a": {"accuracy_per_seed": per}, "b": {"accuracy_per_seed": per}}}
    (folder / "results.json").write_text(json.dumps(result))
    return folder


def test_pool_seeds_pairs_the_gap_by_seed(tmp_path: Path) -> None:
    one = _run(tmp_path / "one", [0, 1], [0.30, 0.40], [0.33, 0.41])
    two = _run(tmp_path / "two", [2], [0.20], [0.22])
    pooled = bench_apps.pool_seeds([one, two])
    assert pooled["seeds"] == [0, 1, 2] and sorted(pooled["apps"]) == ["a", "b"]
    gap = pooled["apps"]["a"]["gap_to_upper_points"]
    assert gap["per_seed"] == [3.0, 1.0, 2.0]
    assert gap["mean"] == pytest.approx(2.0) and gap["standard_error"] == pytest.approx(1 / 3 ** 0.5)
    # t(0.975, 2 degrees of freedom) = 4.303
    assert gap["ci95"] == pytest.approx([2.0 - 4.303 / 3 ** 0.5, 2.0 + 4.303 / 3 ** 0.5], abs=1e-3)
    assert pooled["apps"]["a"]["mean"]["upper"] == pytest.approx((0.33 + 0.41 + 0.22) / 3)
    assert "+2.0 +- 0.6" in bench_apps.pool_table(pooled)


def test_pool_seeds_refuses_other_settings_and_repeated_seeds(tmp_path: Path) -> None:
    one = _run(tmp_path / "one", [0], [0.3], [0.3])
    other = _run(tmp_path / "other", [1], [0.3], [0.3], keep=0.5)
    with pytest.raises(ValueError, match="differ in --seeds alone"):
        bench_apps.pool_seeds([one, other])
    with pytest.raises(ValueError, match="a seed occurs in two runs"):
        bench_apps.pool_seeds([one, one])
    with pytest.raises(ValueError, match=r"no results\.json"):
        bench_apps.pool_seeds([one, tmp_path / "missing"])
