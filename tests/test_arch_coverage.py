"""Every MoE causal-LM type of the installed transformers is accounted for, as the README's table says.

The table is `scripts/arch_coverage.json` (written by `scripts/arch_coverage.py`). Here each type it
lists as `ok` is lowered from a one-layer tiny model and its graph run in plain onnxruntime against
transformers on one short prompt (no decode loop: the decode path is `test_lower.py`'s), and each type
it lists as `refused` must be refused by `moeopt.load` with the very one-line reason of the table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers

import moeopt
from moeopt.archs import moe_types, tiny_model
from moeopt.errors import UnsupportedModelError
from moeopt.lower.export import export_decoder

TABLE = json.loads((Path(__file__).resolve().parents[1] / "scripts" / "arch_coverage.json").read_text())
RECORDS = {r["type"]: r for r in TABLE["types"]}
OK = sorted(t for t, r in RECORDS.items() if r["status"] == "ok")
REFUSED = sorted(t for t, r in RECORDS.items() if r["status"] == "refused")
TOL = 1e-4  # max abs logit difference in plain ORT (measured <= 1e-6 on every type)
# One layer each keeps the whole set to a few minutes of export; MOEOPT_TEST_ALL_ARCHS lowers the
# table's two-layer models instead.
LAYERS = 2 if os.environ.get("MOEOPT_TEST_ALL_ARCHS") else 1


def test_table_is_for_the_installed_transformers() -> None:
    """A transformers bump must come with a regenerated table (scripts/arch_coverage.py)."""
    assert TABLE["versions"]["transformers"] == transformers.__version__
    assert sorted(RECORDS) == sorted(t.model_type for t in moe_types())
    assert not [t for t, r in RECORDS.items() if r["status"] == "error"], "the table lists failing types"


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_type_is_refused_at_load_with_its_feature_named(model_type: str) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        moeopt.load(tiny_model(model_type))
    assert str(err.value) == RECORDS[model_type]["reason"]
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model_type", OK)
def test_type_lowers_and_matches_transformers_in_plain_ort(model_type: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    hf = tiny_model(model_type, layers=LAYERS)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.numpy()
    info = export_decoder(moeopt.load(hf), tmp_path / "model.onnx", kv_cache=True)
    assert info.cache is not None
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 6), np.int64),
            "position_ids": np.arange(6, dtype=np.int64)[None]}
    feed.update({name: t.numpy() for name, t in zip(info.inputs[3:], info.cache.empty(1, 0), strict=True)})
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(sess.run(["logits"], feed)[0] - ref).max() <= TOL
