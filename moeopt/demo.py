"""The README's main job: the whole spine on the embedded default model, with a short report."""

from __future__ import annotations

import time
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "assets" / "reference-moe"
DEMO_PIPELINE = "canonicalize,verify"


def default_model_dir(work: Path) -> Path:
    """The repository's reference MoE when it is shipped, else a seeded small Mixtral written to `work`."""
    if (REFERENCE / "config.json").exists() and (REFERENCE / "model.safetensors").exists():
        return REFERENCE
    return seeded_checkpoint(work / "seeded-moe")


def seeded_checkpoint(path: Path, seed: int = 0) -> Path:
    """A small Mixtral-architecture MoE from a fixed seed, saved as a Hugging Face checkpoint."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
    )
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)  # a router with preferences, not uniform
    model.save_pretrained(path)
    return path


def run_demo(out: Path) -> dict[str, object]:
    """load -> inspect -> pipeline -> save -> reload -> compare; prints and returns a short report."""
    import moeopt
    from moeopt.passes import PassManager

    t0 = time.perf_counter()
    src = default_model_dir(out)
    model = moeopt.load(src)
    t_load = time.perf_counter() - t0
    print(f"== model: {src}")
    print(model.summary())
    report = PassManager(DEMO_PIPELINE, verify_each=True, timing=True).run(model, source=str(src))
    print(f"== pipeline: {report.pipeline}")
    print(report.timing_table())
    saved = report.model.save(out / "converted")
    again = moeopt.load(saved)
    ids = torch.randint(0, int(model.config.vocab_size), (2, 32), generator=torch.Generator().manual_seed(0))
    a, b = model.logits(ids), again.logits(ids)
    program = moeopt.trace(again, ids[:1])
    nodes = len(moeopt.moe_nodes(program))
    s = again.stats()
    result: dict[str, object] = {
        "model": str(src), "architecture": again.architecture, "moe_layers": len(again.layers),
        "params": s.total, "active_params": s.active, "expert_share": round(s.expert / s.total, 3),
        "reload_max_abs_diff": float((a - b).abs().max()), "moe_nodes_in_trace": nodes,
        "load_seconds": round(t_load, 2), "saved": str(saved),
    }
    print("== report")
    for k, v in result.items():
        print(f"  {k:<22} {v}")
    ok = result["reload_max_abs_diff"] == 0.0 and nodes == len(again.layers)
    print("  status                 " + ("OK" if ok else "MISMATCH"))
    if not ok:
        raise SystemExit(1)
    return result
