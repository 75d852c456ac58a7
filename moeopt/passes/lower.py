"""`lower`: write an ONNX Runtime artifact of the model (see `moeopt.lower`); the IR is unchanged."""

from __future__ import annotations

from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.options import Option
from moeopt.passes.registry import register
from moeopt.runtime.manifest import read_manifest


@register
class Lower(Pass):
    name = "lower"
    kind = "lowering"
    summary = "write an ONNX Runtime artifact (decoder with KV cache, MoE layers as com.microsoft.MoE, manifest)"
    exact = True
    options = (
        Option("out", "path", None, "artifact folder to write (required; an existing non-empty one needs "
               "overwrite=true)"),
        Option("overwrite", "bool", False, "replace an existing output folder that moeopt wrote (never another)"),
        Option("verify", "bool", True, "run the written artifact in onnxruntime against PyTorch before it is "
               "renamed into place; refuse it beyond its parity tolerance"),
        Option("target", "choice", "x86_64", "target profile recorded in the manifest", choices=("x86_64", "arm64")),
        Option("threads", "int", 0, "intra-op threads in the profile (0: all cores)", min=0),
        Option("opt-level", "choice", "none", "store the graph ORT-optimised offline (extended is portable)",
               choices=("none", "extended")),
        Option("kv-cache", "bool", True, "export past/present key-value inputs and outputs"),
        Option("accuracy-level", "int", 0,
               "quantized experts: 0 keeps fp32 activations (exact), 4 lets QMoE/MatMulNBits use int8 "
               "activations (faster, ~1% logit error)", min=0, max=4),
        Option("experts", "choice", "resident", "resident: every expert in the graph; offload: hot experts in "
               "segment graphs, the rest in a packed file (run with moeopt.runtime.OffloadSession)",
               choices=("resident", "offload")),
        Option("hot", "str", "2", "offload: hot slots per layer (a number or 'all'; the model's plan wins)"),
        Option("prefetch", "choice", "auto", "offload: routing-predictor hint outputs (auto: when the model has "
               "a predictor)", choices=("auto", "true", "false")),
        Option("attention", "choice", "auto", "resident decoder graphs: gqa = one com.microsoft.GroupQueryAttention "
               "per layer (cache updated in place, fused RMSNorm; Mixtral-style attention), export = as traced, "
               "auto = gqa where it applies", choices=("auto", "gqa", "export")),
        Option("kernel-routing", "bool", True, "resident artifacts: a layer whose quantized experts are one QMoE "
               "node routes inside it from the router logits where that is the same function (softmax "
               "renormalised over the top-k; ~17 fewer nodes per layer); false keeps the graph's router"),
        Option("prefetch-top", "int", 0, "offload: experts each hint output names, best first (0: the router's "
               "top_k)", min=0),
    )

    def requires(self, model: MoEModel, ctx: PassContext) -> None:
        if self.opts["out"] is None:
            raise BadInputError("lower needs out=FOLDER, e.g. lower{out=artifacts/model}")
        self.hot_slots()

    def hot_slots(self) -> int | None:
        raw = str(self.opts["hot"]).strip().lower()
        if raw == "all":
            return None
        if not raw.isdigit():
            raise BadInputError(f"option 'hot' of pass 'lower' expects a number or 'all', got '{raw}'")
        return int(raw)

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        from moeopt import distributed

        stats = distributed.on_main(lambda: self._write(model, ctx))  # rank 0 alone writes the artifact
        return PassResult(model, False, stats=stats or {})

    def _write(self, model: MoEModel, ctx: PassContext) -> dict[str, float]:
        from moeopt.lower import lower

        history = " | ".join([*model.history, self.text()])
        path = lower(
            model, self.opts["out"], target=self.opts["target"], threads=self.opts["threads"],
            ort_optimize=self.opts["opt-level"] == "extended", kv_cache=self.opts["kv-cache"], pipeline=history,
            accuracy_level=self.opts["accuracy-level"], experts=self.opts["experts"], hot=self.hot_slots(),
            prefetch={"auto": None, "true": True, "false": False}[self.opts["prefetch"]],
            prefetch_top=self.opts["prefetch-top"] or None, overwrite=self.opts["overwrite"],
            verify=self.opts["verify"], attention=self.opts["attention"], kernel_routing=self.opts["kernel-routing"],
        )
        ctx.log(f"lower: wrote {path}")
        manifest = read_manifest(path, verify=False)
        graphs = [manifest["graph"], *([manifest["encoder"]] if manifest.get("encoder") else [])]
        return {
            "moe-nodes": sum(g["moe_nodes"] for g in graphs),
            "plain-op-layers": sum(g["dense_moe_layers"] for g in graphs),
            "bytes": sum(f["bytes"] for f in manifest["files"].values()),
            **({"parity-measured": manifest["parity_measured"]} if manifest.get("verified") else {}),
        }
