"""`Session`: run a moeopt artifact with ONNX Runtime - verified manifest, target profile, KV-cache decoding."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.manifest import read_manifest
from moeopt.runtime.sampling import Sampler
from moeopt.runtime.steppers import DecoderOnlyStepper, EncoderDecoderStepper, position_ids

TokenCallback = Callable[[int, np.ndarray], None]  # (step, next tokens (B,))


@dataclass
class Generation:
    """Result of `Session.generate`."""

    sequences: np.ndarray  # (B, T + new) prompt and generated tokens (pad after a row stopped)
    new_tokens: int  # generated positions (steps run)
    prefill_seconds: float
    decode_seconds: float
    step_logits: list[np.ndarray] = field(default_factory=list)  # (B, V) per step, when asked

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1  # the first token comes out of the prefill
        return steps * self.sequences.shape[0] / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _version(text: str) -> tuple[int, ...]:
    """(1, 32, 0) from '1.32.0' (or '1.32.0+cpu', '1.33.0.dev2025'): the leading numeric parts."""
    parts = []
    for part in text.split("+")[0].split("."):
        digits = part[: len(part) - len(part.lstrip("0123456789"))]
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def older_ort_hint(manifest: dict[str, Any]) -> str:
    """A note for a graph ORT cannot load, when this onnxruntime is older than the one the artifact was
    checked with: on Python 3.10 pip gets at most 1.23.2 (no newer wheels), which rejects e.g. the QMoE
    nodes of quantized artifacts. Empty when the versions do not explain it."""
    import sys

    import onnxruntime as ort

    want = str((manifest.get("versions") or {}).get("onnxruntime") or "")
    if not want or _version(ort.__version__) >= _version(want):
        return ""
    why = ""
    if sys.version_info < (3, 11):
        why = " (the newest with Python 3.10 wheels; Python 3.11 or later gets a newer one)"
    return f"; the artifact was checked with onnxruntime {want}, this is the older {ort.__version__}{why}"


def session_options(target: dict[str, Any], threads: int | None = None) -> Any:
    """ORT SessionOptions from a manifest's target profile."""
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[target.get("graph_optimization_level", "extended")]
    so.intra_op_num_threads = int(threads if threads is not None else target.get("intra_op_threads", 0))
    so.inter_op_num_threads = int(target.get("inter_op_threads", 1))
    parallel = target.get("execution_mode") == "parallel"
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in target.get("config", {}).items():
        so.add_session_config_entry(key, str(value))
    return so


def _right_aligned(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A left-padded batch moved to right padding: each row's real tokens first (GroupQueryAttention takes
    each row's length from the mask's sum and its new tokens then go right after them)."""
    shift = (mask == 0).sum(-1)
    cols = (np.arange(ids.shape[1])[None] + shift[:, None]) % ids.shape[1]
    rows = np.arange(ids.shape[0])[:, None]
    return ids[rows, cols], mask[rows, cols]


class Session:
    """An artifact opened with ONNX Runtime.

    Args:
        artifact: the folder `moeopt lower` wrote.
        verify: check every file's sha256 against the manifest first (a corrupted artifact is refused).
        threads: override the profile's intra-op thread count.
    """

    drives_segments = False  # OffloadSession runs an offload artifact's segments; Session cannot

    def __init__(self, artifact: str | Path, *, verify: bool = True, threads: int | None = None) -> None:
        self.path = Path(artifact)
        self.manifest = read_manifest(self.path, verify=verify)
        if self.manifest.get("offload") is not None and not self.drives_segments:
            raise BadInputError(f"{self.path}: an offload artifact; open it with moeopt.runtime.OffloadSession "
                                "(or open_artifact)")
        graph = self.manifest["graph"]
        target = self.manifest.get("target", {})
        self.ort = self._open(graph["file"], target, threads)
        self.encoder_meta: dict[str, Any] | None = self.manifest.get("encoder")
        self.encoder = self._open(self.encoder_meta["file"], target, threads) if self.encoder_meta else None
        self.cache: dict[str, Any] | None = graph.get("kv_cache")
        self.input_names: list[str] = list(graph["inputs"])
        self.output_names: list[str] = list(graph["outputs"])
        # "gqa": GroupQueryAttention graphs (moeopt.lower.attention) run with a KV buffer bound as both past
        # and present, updated in place; "export" (and artifacts older than the field): numpy past/present.
        self.attention: str = str(graph.get("attention") or "export")
        self._binding: tuple[list[Any], Any] | None = None  # (KV buffers, their io binding)
        tokens = self.manifest.get("tokens", {})
        self.eos: list[int] = list(tokens.get("eos", []))
        self.pad_id = int((tokens.get("pad") or self.eos or [0])[0])

    def _open(self, name: str, target: dict[str, Any], threads: int | None) -> Any:
        import onnxruntime as ort

        try:
            return ort.InferenceSession(
                str(self.path / name), session_options(target, threads),
                providers=target.get("providers", ["CPUExecutionProvider"]),
            )
        except Exception as e:  # ORT's messages are long; the file and the first line say enough
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInputError(f"{self.path / name}: onnxruntime cannot load it ({first})"
                                f"{older_ort_hint(self.manifest)}") from e

    def _run(self, feeds: dict[str, np.ndarray], past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        all_feeds = {k: v if v.dtype == np.float32 else v.astype(np.int64) for k, v in feeds.items()}
        if past and not isinstance(past[0], np.ndarray):  # KV buffers (empty_past of a gqa artifact)
            return self._run_bound(all_feeds, past)
        n = len(feeds)
        all_feeds.update(zip(self.input_names[n:], past, strict=True))
        out = self.ort.run(self.output_names, all_feeds)
        return out[0], list(out[1:])

    def _run_bound(self, feeds: dict[str, np.ndarray], past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        """One step with I/O binding: each KV buffer is past and present at once (GroupQueryAttention writes
        the new positions in place), the logits land in a fresh array; nothing else is copied."""
        import onnxruntime as ort

        bound = self._binding
        if bound is None or len(bound[0]) != len(past) or any(a is not b for a, b in zip(bound[0], past, strict=True)):
            io = self.ort.io_binding()  # a new generation's buffers: bound once (held here, so never stale)
            for name, out_name, buf in zip(self.input_names[-len(past):], self.output_names[1:], past, strict=True):
                io.bind_ortvalue_input(name, buf)
                io.bind_ortvalue_output(out_name, buf)
            bound = self._binding = (list(past), io)
        io = bound[1]
        for name, value in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        ids = feeds["input_ids"]
        logits = np.empty((*ids.shape, int(self.manifest["vocab_size"])), np.float32)  # (B, T, V)
        io.bind_ortvalue_output(self.output_names[0], ort.OrtValue.ortvalue_from_numpy(logits))
        self.ort.run_with_iobinding(io)
        return logits, list(past)

    def empty_past(self, batch: int, capacity: int | None = None) -> list[Any]:
        """The past key/values in input order at the start of a generation.

        Exported-attention artifacts: zero-length numpy arrays (each step returns longer ones). GroupQueryAttention
        artifacts: one zeroed onnxruntime buffer per tensor holding `capacity` positions (default: the model's
        max_positions), bound as past and present of every step; a generation may not outgrow it.
        """
        c = self.cache
        if c is None:
            return []
        if self.attention == "gqa":
            import onnxruntime as ort

            cap = int(capacity or self.manifest.get("max_positions") or 2048)
            shapes = [(batch, c["key_heads"], cap, c["key_dim"]), (batch, c["value_heads"], cap, c["value_dim"])]
            return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                    for _ in range(c["num_layers"]) for shape in shapes]
        kv = [np.zeros((batch, c["key_heads"], 0, c["key_dim"]), np.float32),
              np.zeros((batch, c["value_heads"], 0, c["value_dim"]), np.float32)]
        return [t for _ in range(c["num_layers"]) for t in kv]

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, past: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder-only forward: (B, T) new tokens with the (B, P + T) mask -> logits (B, T, V), present."""
        return self._run({"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions}, past)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """(B, T) token ids -> (B, T, V) logits, no cache carried over (decoder-only artifacts)."""
        if self.encoder is not None:
            raise BadInputError(f"{self.path}: an encoder-decoder artifact; use generate")
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if self.attention == "gqa" and np.any(np.diff(mask, axis=-1) > 0):
            raise BadInputError(f"{self.path}: GroupQueryAttention artifacts take right-padded rows only "
                                "(a 0 before a 1 in attention_mask)")
        return self.step(ids, mask, position_ids(mask), self.empty_past(ids.shape[0], ids.shape[1]))[0]

    def generate(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int = 32,
        *,
        attention_mask: np.ndarray | None = None,
        sampler: Sampler | None = None,
        stop_tokens: Sequence[int] | None = None,
        on_token: TokenCallback | None = None,
        keep_logits: bool = False,
    ) -> Generation:
        """Decode with the KV cache: prefill the (left-padded) prompt, then one token per step.

        Args:
            stop_tokens: a row stops after emitting one of these (default: the model's eos tokens);
                stopped rows are padded; generation ends when every row has stopped.
            on_token: called after every step with the new tokens, for streaming.
            keep_logits: keep each step's (B, V) logits in the result (parity tests).
        """
        if self.cache is None:
            raise BadInputError(f"{self.path}: this artifact has no KV cache; generate needs one")
        if max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        lens = None
        if self.attention == "gqa" and not np.all(mask):  # GroupQueryAttention reads rows as right-padded
            lens = mask.sum(-1)
            if np.any(np.diff(mask, axis=-1) < 0) or np.any(lens == 0):
                raise BadInputError(f"{self.path}: generate takes left-padded prompts (mask 0s before the 1s)")
        sampler = sampler or Sampler()
        rng = sampler.rng()
        stops = np.array(self.eos if stop_tokens is None else list(stop_tokens), dtype=np.int64)
        done = np.zeros(ids.shape[0], dtype=bool)
        t0 = time.perf_counter()
        stepper: DecoderOnlyStepper | EncoderDecoderStepper
        if self.encoder is not None and self.encoder_meta is not None:
            stepper = EncoderDecoderStepper(self._run, self.encoder, self.encoder_meta, ids, mask)
        else:
            stepper = DecoderOnlyStepper(self._run, *_right_aligned(ids, mask) if lens is not None else (ids, mask))
        logits, past = stepper.prefill(self.empty_past(ids.shape[0], ids.shape[1] + max_new_tokens))
        if lens is not None:  # each row's last real token, then one column as usual
            logits = logits[np.arange(ids.shape[0]), lens - 1][:, None]
        prefill = time.perf_counter() - t0
        seqs, kept = [ids if lens is not None else stepper.prompt()], []
        steps = 0
        t1 = time.perf_counter()
        while True:
            last = logits[:, -1]
            if keep_logits:
                kept.append(last.copy())
            tok = np.where(done, self.pad_id, sampler(last, rng))
            seqs.append(tok[:, None])
            steps += 1
            if on_token is not None:
                on_token(steps - 1, tok)
            done |= np.isin(tok, stops)
            if steps >= max_new_tokens or done.all():
                break
            logits, past = stepper.step(tok, past)
        decode = time.perf_counter() - t1
        return Generation(np.concatenate(seqs, axis=1), steps, prefill, decode, kept)
