"""An artifact as a causal LM, so `moeopt.eval` (and `moeopt eval ARTIFACT`) measure what ships.

numpy and onnxruntime only: `moeopt eval ARTIFACT` runs on a device install without torch.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.manifest import MANIFEST
from moeopt.runtime.session import Session


def is_artifact(path: str | Path) -> bool:
    """Whether `path` is an artifact folder (has manifest.json) rather than a checkpoint."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


class ArtifactLM:
    """`numpy_logits(input_ids, attention_mask)` (B, T, V) computed by ONNX Runtime on the artifact (a
    `moeopt.eval.model_io.NumpyLM`: the harness scores it in numpy).

    The harness's right padding is kept as it comes: positions count the real tokens (pads get 1, as in
    `Session.logits`), so real tokens score as when run alone.
    """

    def __init__(self, session: Session) -> None:
        if session.encoder is not None:
            raise BadInputError(f"{session.path}: eval reads decoder-only artifacts, this one has an encoder")
        self.session = session
        m = session.manifest
        self.config = SimpleNamespace(vocab_size=int(m.get("vocab_size", 0)) or None,
                                      max_position_embeddings=m.get("max_positions"))

    def numpy_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Float32 logits (B, T, V) of (B, T) ids, with an optional (B, T) mask (1 real, 0 padding)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = None if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        return np.asarray(self.session.logits(ids, mask))  # (B, T, V)


def load_for_eval(path: str | Path, *, threads: int | None = None, source: Any = None) -> tuple[ArtifactLM, Any]:
    """(the artifact as a `NumpyLM`, its tokenizers.Tokenizer), after verifying the manifest.

    `source` is the expert source of an offload artifact (see `moeopt.runtime.cli.offload_source`).
    """
    from moeopt.runtime.offload import open_artifact

    sess = open_artifact(path, threads=threads, **({"source": source} if source is not None else {}))
    name = sess.manifest.get("tokenizer")
    if not name:
        raise BadInputError(f"{path}: the artifact has no tokenizer.json; eval needs the model's tokenizer")
    from tokenizers import Tokenizer

    return ArtifactLM(sess), Tokenizer.from_file(str(Path(path) / name))
