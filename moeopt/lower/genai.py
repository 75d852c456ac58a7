"""The files ONNX Runtime GenAI needs to run an artifact: genai_config.json (and tokenizer_config.json).

`onnxruntime_genai.Model(ARTIFACT)` reads genai_config.json beside the graph: the model type, the decoder's
file, its input/output names and the KV-cache shape it allocates, and the search defaults. moeopt's graph
already uses the names GenAI expects (input_ids, attention_mask, position_ids, past_key_values.%d.key/value
-> logits, present.%d.key/value), so the same model.onnx runs under both, and GenAI's greedy search picks
the tokens `moeopt run` does. GenAI's tokenizer (onnxruntime-extensions) reads tokenizer.json and insists
on a tokenizer_config.json beside it; one is written when the checkpoint brought none.

Written for every decoder-only artifact GenAI can drive (plain JSON, no import of onnxruntime_genai), so an
artifact is GenAI-ready without an option to remember. Left out, with the reason in the manifest's "genai"
entry: offload artifacts (the runtime drives several segment graphs and an expert cache, which GenAI's
single-decoder loop cannot), encoder-decoder ones (GenAI's encoder-decoder types are Whisper-shaped), graphs
without a KV cache, and caches whose keys and values differ in heads or head size (GenAI allocates both
from one shape, e.g. not MLA).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# GenAI's generic decoder-only type: no architecture-specific handling, the graph does all the maths.
MODEL_TYPE = "decoder"
# search.max_length when the checkpoint states no max_position_embeddings (GenAI needs a bound).
DEFAULT_CONTEXT = 2048
_OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}
_PROVIDERS = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml", "CoreMLExecutionProvider": "coreml",
              "QNNExecutionProvider": "qnn", "OpenVINOExecutionProvider": "OpenVINO",
              "WebGpuExecutionProvider": "WebGPU"}


def unsupported(manifest: dict[str, Any]) -> str | None:
    """Why GenAI cannot run this artifact, or None when it can."""
    if manifest.get("offload") is not None:
        return ("offload artifact: moeopt's runtime drives its segment graphs and expert cache; GenAI runs "
                "one decoder graph")
    if manifest.get("encoder") is not None:
        return "encoder-decoder artifact: GenAI has no generic encoder-decoder model type"
    graph = manifest.get("graph") or {}
    cache = graph.get("kv_cache")
    if not graph.get("file") or cache is None:
        return "no KV cache in the graph (lowered with kv_cache=False)"
    if (cache["key_heads"], cache["key_dim"]) != (cache["value_heads"], cache["value_dim"]):
        return (f"keys ({cache['key_heads']} heads x {cache['key_dim']}) and values ({cache['value_heads']} x "
                f"{cache['value_dim']}) differ in shape; GenAI allocates both from one")
    return None


def session_options(target: dict[str, Any]) -> dict[str, Any]:
    """GenAI's session_options from the manifest's target profile, so GenAI opens the graph as moeopt does
    (the same fusions, hence the same numerics; unknown keys become ORT session config entries)."""
    opts: dict[str, Any] = {"log_id": "onnxruntime-genai"}
    level = _OPT_LEVELS.get(str(target.get("graph_optimization_level", "extended")))
    if level:
        opts["graph_optimization_level"] = level
    if int(target.get("intra_op_threads", 0)) > 0:
        opts["intra_op_num_threads"] = int(target["intra_op_threads"])
    opts["inter_op_num_threads"] = int(target.get("inter_op_threads", 1))
    for key, value in (target.get("config") or {}).items():
        opts[str(key)] = str(value)
    opts["provider_options"] = [{_PROVIDERS[p]: {}} for p in target.get("providers", []) if p in _PROVIDERS]
    return opts


def genai_config(manifest: dict[str, Any], hf_config: Any) -> dict[str, Any]:
    """genai_config.json for a decoder-only artifact with a KV cache (see `unsupported`)."""
    graph = manifest["graph"]
    cache = graph["kv_cache"]
    tokens = manifest.get("tokens") or {}
    eos = [int(t) for t in tokens.get("eos") or []]
    bos = [int(t) for t in tokens.get("bos") or []]
    pad = [int(t) for t in tokens.get("pad") or []] or eos or [0]  # as moeopt.runtime.Session pads
    context = int(manifest.get("max_positions") or DEFAULT_CONTEXT)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    names = set(graph["inputs"])
    inputs = {k: v for k, v in inputs.items() if "%d" in v or v in names}  # e.g. a graph without position_ids
    return {
        "model": {
            "type": MODEL_TYPE,
            "bos_token_id": bos[0] if bos else pad[0],
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad[0],
            "vocab_size": int(manifest["vocab_size"]),
            "context_length": context,
            "decoder": {
                "filename": graph["file"],
                "session_options": session_options(manifest.get("target") or {}),
                "head_size": int(cache["key_dim"]),
                "hidden_size": int(getattr(hf_config, "hidden_size", 0) or 0),
                "num_attention_heads": int(getattr(hf_config, "num_attention_heads", 0) or cache["key_heads"]),
                "num_hidden_layers": int(cache["num_layers"]),
                "num_key_value_heads": int(cache["key_heads"]),
                "inputs": inputs,
                "outputs": outputs,
            },
        },
        # Greedy by default, and sampling (do_sample) over every token as `moeopt run --sample` does: top_k 0,
        # not 1, which GenAI treats as greedy even when sampling. set_search_options overrides any of these.
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
            # The graph concatenates past and new keys into a present that grows by one each step.
            "past_present_share_buffer": bool(cache.get("shared_buffer", False)),
        },
    }


def write_genai_files(folder: Path, manifest: dict[str, Any], hf_config: Any) -> dict[str, Any]:
    """Write GenAI's files into the artifact folder (before it is hashed) and return the manifest's "genai"
    entry: {"config": file, "files": [written]} or {"config": None, "reason": why not}."""
    reason = unsupported(manifest)
    if reason is not None:
        return {"config": None, "reason": reason}
    (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(manifest, hf_config), indent=1))
    written = [GENAI_CONFIG]
    tokenizer = manifest.get("tokenizer")
    if tokenizer and not (folder / TOKENIZER_CONFIG).exists():
        # onnxruntime-extensions reads the BPE/WordLevel model and its pre/post-processing from tokenizer.json;
        # this file only has to exist. No special-token flags: encoding stays as `tokenizers` does it.
        (folder / TOKENIZER_CONFIG).write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
        written.append(TOKENIZER_CONFIG)
    return {"config": GENAI_CONFIG, "files": written}
