"""Measured target profiles: storage read bandwidth and per-expert compute time, for the `plan` pass.

The planner's latency model needs three numbers of the machine that will serve the model: how fast
expert records come off storage, how long one token takes through one expert when the expert is
resident (a QMoE/MoE node with prepacked initializers) or cold (a one-expert session with prepacked
initializers, as the offload runtime runs a loaded expert: `moeopt.runtime.packed_frames`), and how long
building that session takes (part of every load). `measure_profile` measures them on this machine with random weights of
the layer's shape; `save_profile` / `load_profile` keep them as JSON so a profile measured on the device
can be used when planning elsewhere.

Profile (a plain JSON dict)::

    {"format": "moeopt-target-profile", "version": 1,
     "read_bandwidth": bytes/s of page-aligned preads of expert-sized records after dropping the page
                       cache (per-read latency included, since the chunks are one record each),
     "page_cache_dropped": bool (False where posix_fadvise is missing: the bandwidth is then optimistic),
     "resident_s_per_expert": seconds for one token through one resident expert,
     "cold_s_per_expert": seconds for one token through one loaded cold expert (its own session),
     "pack_s_per_expert": seconds to build a loaded expert's session (ORT prepacks its weights); optional,
                          0 when absent (profiles measured before the runtime packed its frames),
     "expert": {"hidden", "intermediate", "bits" (None: float32), "glu", "block_size",
                "expert_bytes", "record_bytes"},
     "threads": intra-op threads, "host": platform text}
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from moeopt.errors import BadInputError

PROFILE_FORMAT = "moeopt-target-profile"
PROFILE_VERSION = 1
PAGE = 4096  # the offload format's record alignment (moeopt.runtime.offload_format.PAGE)
BLOCKS = (128, 64, 32, 16)
REQUIRED = ("read_bandwidth", "resident_s_per_expert", "cold_s_per_expert", "expert")


def page_align(n: int, page: int = PAGE) -> int:
    """`n` rounded up to whole pages."""
    return -(-n // page) * page


def stored_bits(bits: int) -> int:
    """Bits per code as the kernels read them: 3-bit codes are widened to 4 (see moeopt.lower.onnx_quant)."""
    return 4 if bits == 3 else bits


def block_for(hidden: int, intermediate: int, preferred: int = 32) -> int:
    """The quantization block assumed for a float model: `preferred` if it divides both dims, else the
    largest of 128..16 that does (QMoE needs whole blocks)."""
    for b in (preferred, *BLOCKS):
        if hidden % b == 0 and intermediate % b == 0:
            return b
    raise BadInputError(f"no quantization block of 16..128 divides hidden {hidden} and intermediate {intermediate}")


def expert_bytes(hidden: int, intermediate: int, bits: int | None, glu: bool, block: int = 32) -> int:
    """Bytes of one expert as stored: float32 weights, or packed codes + float32 block scales
    (symmetric: no zero points)."""
    rows_in = (2 if glu else 1) * intermediate  # fc1 (F, H), fc2 (H, I)
    if bits is None:
        return 4 * (rows_in * hidden + hidden * intermediate)
    b = stored_bits(bits)
    codes = (rows_in * hidden + hidden * intermediate) * b // 8
    scales = 4 * (rows_in * (hidden // block) + hidden * (intermediate // block))
    return codes + scales


def measure_read_bandwidth(chunk_bytes: int, *, file_bytes: int = 64 * 2**20, folder: Path | None = None,
                           seed: int = 0) -> tuple[float, bool]:
    """(bytes/s, page cache dropped) of page-aligned preads of `chunk_bytes` records in shuffled order.

    A temporary file of `file_bytes` is written and fsynced, dropped from the page cache with
    POSIX_FADV_DONTNEED, then read record by record, as the expert cache reads cold experts.
    """
    chunk = page_align(max(chunk_bytes, 1))
    n = max(1, file_bytes // chunk)
    fd, name = tempfile.mkstemp(prefix="moeopt-bw-", dir=folder)
    try:
        rng = np.random.default_rng(seed)
        block = rng.integers(0, 256, size=chunk, dtype=np.uint8).tobytes()
        for _ in range(n):
            os.write(fd, block)
        os.fsync(fd)
        dropped = hasattr(os, "posix_fadvise")
        if dropped:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(chunk)
        order = rng.permutation(n)
        t0 = time.perf_counter()
        got = 0
        for i in order:
            got += os.preadv(fd, [buf], int(i) * chunk)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(name)
    return got / max(elapsed, 1e-9), dropped


def _one_node_model(hidden: int, intermediate: int, bits: int | None, glu: bool, block: int, experts: int,
                    seed: int) -> bytes:
    """A one-node QMoE (or MoE for float) model with random weights as initializers (prepacked by ORT).
    Returns the serialized model (inputs x, router)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    f = (2 if glu else 1) * intermediate
    weights: list[tuple[str, np.ndarray]]
    if bits is None:
        weights = [("fc1", (rng.standard_normal((experts, f, hidden)) * 0.02).astype(np.float32)),
                   ("fc2", (rng.standard_normal((experts, hidden, intermediate)) * 0.02).astype(np.float32))]
        names = ["x", "router", "fc1", "", "fc2"]
        attrs: dict[str, Any] = {"k": 1, "activation_type": "swiglu" if glu else "silu",
                                 "normalize_routing_weights": 0, "swiglu_fusion": 1 if glu else 0}
        op = "MoE"
    else:
        b = stored_bits(bits)
        blob = block * b // 8

        def codes(rows: int, cols: int) -> np.ndarray:
            return rng.integers(0, 256, size=(experts, rows, cols // block * blob), dtype=np.uint8)

        def scales(rows: int, cols: int) -> np.ndarray:
            return (rng.random((experts, rows, cols // block)) * 0.01 + 1e-3).astype(np.float32)

        weights = [("fc1", codes(f, hidden)), ("s1", scales(f, hidden)),
                   ("fc2", codes(hidden, intermediate)), ("s2", scales(hidden, intermediate))]
        names = ["x", "router", "fc1", "s1", "", "fc2", "s2"]
        attrs = {"k": 1, "activation_type": "swiglu" if glu else "silu", "normalize_routing_weights": 0,
                 "expert_weight_bits": b, "block_size": block, "weights_prepacked": 0,
                 "activation_alpha": 1.0, "activation_beta": 0.0}
        if glu:
            attrs["swiglu_fusion"] = 1
        op = "QMoE"
    node = helper.make_node(op, names, ["y"], domain="com.microsoft", **attrs)
    fl = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", fl, [1, hidden]),
              helper.make_tensor_value_info("router", fl, [1, experts])]
    inits = [numpy_helper.from_array(arr, name) for name, arr in weights]
    graph = helper.make_graph([node], "expert", inputs, [helper.make_tensor_value_info("y", fl, [1, hidden])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return bytes(helper.make_model(graph, opset_imports=opsets).SerializeToString())


def time_expert(hidden: int, intermediate: int, bits: int | None, glu: bool, block: int, experts: int,
                threads: int, repeats: int, seed: int, builds: int = 1) -> tuple[float, float]:
    """(median seconds for one token through expert 0, median session build seconds) of a one-node
    QMoE/MoE model with `experts` experts: two for a resident layer's node, one for a loaded cold
    expert's own session (whose build is the prepacking every load pays)."""
    import onnxruntime as ort

    model = _one_node_model(hidden, intermediate, bits, glu, block, experts, seed)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    built = []
    for _ in range(builds):
        t0 = time.perf_counter()
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        built.append(time.perf_counter() - t0)
    rng = np.random.default_rng(seed + 1)
    feeds = {"x": rng.standard_normal((1, hidden)).astype(np.float32),
             "router": np.array([[1.0] + [0.0] * (experts - 1)], dtype=np.float32)}
    if bits is None:  # MoE takes logits (softmax inside): make expert 0 the clear choice
        feeds["router"] = np.array([[0.0] + [-30.0] * (experts - 1)], dtype=np.float32)
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.median(built))


def measure_profile(hidden: int, intermediate: int, bits: int | None, glu: bool, *, threads: int = 1,
                    file_bytes: int = 64 * 2**20, folder: Path | None = None, repeats: int = 30,
                    seed: int = 0) -> dict[str, Any]:
    """Measure this machine's profile for experts of this shape (see the module docstring for its keys).

    Args:
        hidden, intermediate: the expert's dimensions (H, I).
        bits: expert bitwidth (2, 3, 4, 8), None for float32 experts.
        glu: SwiGLU experts (gate and up rows) rather than a plain MLP.
        threads: intra-op threads of the timed sessions (the target's setting).
        file_bytes: size of the temporary file the read bandwidth is measured on.
        folder: where that file lies (the storage the expert file will live on; default the temp folder).
    """
    if bits is not None and bits not in (2, 3, 4, 8):
        raise BadInputError(f"expert bits must be 2, 3, 4 or 8 (or None for float), got {bits}")
    block = block_for(hidden, intermediate) if bits is not None else 0
    nbytes = expert_bytes(hidden, intermediate, bits, glu, block or 32)
    bandwidth, dropped = measure_read_bandwidth(nbytes, file_bytes=file_bytes, folder=folder, seed=seed)
    resident_s = time_expert(hidden, intermediate, bits, glu, block or 32, 2, threads, repeats, seed)[0]
    cold_s, pack_s = time_expert(hidden, intermediate, bits, glu, block or 32, 1, threads, repeats, seed, builds=5)
    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION,
        "read_bandwidth": bandwidth, "page_cache_dropped": dropped,
        "resident_s_per_expert": resident_s, "cold_s_per_expert": cold_s, "pack_s_per_expert": pack_s,
        "expert": {"hidden": hidden, "intermediate": intermediate, "bits": bits, "glu": glu, "block_size": block,
                   "expert_bytes": nbytes, "record_bytes": page_align(nbytes)},
        "threads": threads, "host": f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
    }


def check_profile(profile: Any, where: str = "profile") -> dict[str, Any]:
    """The profile if it has every key the planner reads, with positive numbers (the optional packing time
    may be 0); else a BadInputError."""
    if not isinstance(profile, dict):
        raise BadInputError(f"{where}: a target profile is a JSON object")
    missing = [k for k in REQUIRED if k not in profile]
    if missing:
        raise BadInputError(f"{where}: target profile lacks '{missing[0]}' (write one with `moeopt profile`)")
    for key in REQUIRED[:3]:
        v = profile[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
            raise BadInputError(f"{where}: target profile '{key}' must be a positive number, got {v!r}")
    pack = profile.get("pack_s_per_expert", 0.0)  # optional: older profiles lack it
    if isinstance(pack, bool) or not isinstance(pack, (int, float)) or not 0 <= pack < float("inf"):
        raise BadInputError(f"{where}: target profile 'pack_s_per_expert' must be a number >= 0, got {pack!r}")
    exp = profile["expert"]
    dims = ("hidden", "intermediate")
    if not isinstance(exp, dict) or not all(isinstance(exp.get(k), int) and exp[k] > 0 for k in dims):
        raise BadInputError(f"{where}: target profile 'expert' needs positive integer 'hidden' and 'intermediate'")
    return profile


def save_profile(profile: dict[str, Any], path: Path) -> Path:
    """Write a profile as JSON (atomically: a temporary file renamed into place)."""
    check_profile(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(profile, indent=1))
    tmp.replace(path)
    return path


def load_profile(path: Path) -> dict[str, Any]:
    """Read a profile written by `save_profile` (one-line BadInputError when missing or malformed)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(f"no such target profile: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
        raise BadInputError(f"{path}: not a target profile ({e.__class__.__name__})") from None
    if isinstance(data, dict) and data.get("format", PROFILE_FORMAT) != PROFILE_FORMAT:
        raise BadInputError(f"{path}: not a target profile (format '{data.get('format')}')")
    return check_profile(data, str(path))
