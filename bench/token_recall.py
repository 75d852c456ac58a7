"""How much of layer 0's true routing the token table names, looked up for the argmax token (the graph's
``prefetch.next0``) or for the token actually fed (the driver's token hint), on a decoded run.

    .venv/bin/python bench/token_recall.py \
        ~/.cache/moeopt/bench/reference/offload-4bit-hot0-top4 /tmp/sweep/tok256/reference/work

ARTIFACT is the bench's offload artifact; WORK the work folder of an `offload_sweep.py` / `offload.py` run
(its resident run's tokens and logits, `resident.npz`, and routing trace, `trace-eval.json`). Prints
recall@k of layer 0's experts per decode step for k = 2, 3, 4, and how many distinct tokens the run
generated (greedy text loops: 55 distinct in 448 with `--new 448`). The trace's step 0 is the prompt; decode
step s feeds the token chosen from the logits kept at step s - 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def recall(named: list[np.ndarray], true: list[tuple[int, ...]]) -> float:
    hit = sum(len(set(n.tolist()) & set(t)) for n, t in zip(named, true, strict=True))
    return hit / sum(len(t) for t in true)


def main() -> None:
    art, work = Path(sys.argv[1]), Path(sys.argv[2])
    table = np.load(art / "prefetch-token0.npy")  # (vocab, k) layer-0 experts per token, best first
    run = np.load(work / "resident.npz")
    tokens, logits = run["tokens"][0], run["logits"][:, 0]  # (prompt + new,), (new, vocab)
    trace = json.loads((work / "trace-eval.json").read_text())
    true0 = [tuple(dict((la, tuple(s)) for la, s in step)[0]) for step in trace[1:]]
    prompt = len(tokens) - len(logits)
    n = len(true0)
    out = {}
    for k in range(2, table.shape[1] + 1):
        argmax = [table[int(np.argmax(logits[s]))][:k] for s in range(n)]
        fed = [table[int(tokens[prompt + s])][:k] for s in range(n)]
        out[k] = {"argmax_token": round(recall(argmax, true0), 3), "fed_token": round(recall(fed, true0), 3)}
    new = tokens[prompt:].tolist()
    print(json.dumps({"steps": n, "new_tokens": len(new), "distinct_new_tokens": len(set(new)),
                      "recall_of_layer0_top2": out}, indent=1))


if __name__ == "__main__":
    main()
