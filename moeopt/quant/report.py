"""What the quantize pass chose: per-slot bits, bitwidth histogram, bytes per layer, a printable summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class QuantReport:
    """The allocation the quantize pass applied (stored as the `quantize-report` analysis).

    bits[l][s]: the slot's bitwidth (None = float); layer_bytes[l]: routed-expert bytes as stored;
    float_bytes: the same experts in fp16; params: routed-expert weights in all.
    """

    method: str
    group: int
    symmetric: bool
    bits: list[list[int | None]]
    layer_bytes: list[int]
    float_bytes: int
    params: int
    capacity: int | None = None  # the budget in its unit (bytes or bit-parameters), None for uniform
    unit: str = "B"
    error: float = 0.0  # summed sensitivity of the chosen bits (0 when not measured)
    pinned: int = 0
    algo: str = "rtn"  # how the slots were rounded: rtn or gptq
    rtn_fallback: int = 0  # algo=gptq: quantized slots rounded to nearest (no calibration rows, or singular)
    extra: dict[str, float] = field(default_factory=dict)
    linears: dict[str, int | None] = field(default_factory=dict)  # non-expert linear -> bits (None = float)
    linear_bytes: int = 0  # those linears as stored (float ones at fp16)
    linear_float_bytes: int = 0  # the same in fp16

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes)

    def histogram(self) -> dict[str, int]:
        """Slots per bitwidth, keys '2', '3', '4', '8', 'float', in that order."""
        count = Counter("float" if b is None else str(b) for row in self.bits for b in row)
        keys = sorted((k for k in count if k != "float"), key=int) + (["float"] if "float" in count else [])
        return {k: count[k] for k in keys}

    def nominal_bits(self) -> float:
        """Average code bits per weight (float = 16), ignoring scales and zero points."""
        flat = [16 if b is None else b for row in self.bits for b in row]
        return sum(flat) / len(flat) if flat else 0.0

    def effective_bits(self) -> float:
        """Stored bits per weight, scales and zero points included."""
        return 8 * self.total_bytes / self.params if self.params else 0.0

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {f"slots-{k}bit" if k != "float" else "slots-float": float(v)
                                 for k, v in self.histogram().items()}
        out.update({
            "expert-bytes": float(self.total_bytes), "fp16-expert-bytes": float(self.float_bytes),
            "compression": self.float_bytes / self.total_bytes if self.total_bytes else 0.0,
            "avg-bits": round(self.nominal_bits(), 4), "effective-bits": round(self.effective_bits(), 4),
            "error": self.error, "pinned": float(self.pinned),
        })
        if self.algo != "rtn":
            out["rtn-fallback"] = float(self.rtn_fallback)
        out.update({f"layer-{i}-bytes": float(b) for i, b in enumerate(self.layer_bytes)})
        if self.linears:
            out.update({"linears": float(len(self.linears)),
                        "linears-quantized": float(sum(b is not None for b in self.linears.values())),
                        "linear-bytes": float(self.linear_bytes), "fp16-linear-bytes": float(self.linear_float_bytes)})
        return out

    def summary(self) -> str:
        hist = ", ".join(f"{k}: {v}" for k, v in self.histogram().items())
        mode = "symmetric" if self.symmetric else "zero points"
        algo = "" if self.algo == "rtn" else f"{self.algo}, "
        lines = [
            f"quantize ({self.method}, {algo}group {self.group}, {mode}): "
            f"routed experts {self.total_bytes / 1e6:.3f} MB "
            f"(fp16 {self.float_bytes / 1e6:.3f} MB, {self.float_bytes / max(self.total_bytes, 1):.2f}x smaller), "
            f"{self.nominal_bits():.3f} bits/weight nominal, {self.effective_bits():.3f} stored",
            f"  slots per bitwidth: {hist}" + (f"; {self.pinned} pinned" if self.pinned else ""),
        ]
        if self.linears:
            count = Counter("float" if b is None else str(b) for b in self.linears.values())
            hist = ", ".join(f"{k}: {v}" for k, v in sorted(count.items()))
            lines.append(f"  non-expert linears: {self.linear_bytes / 1e6:.3f} MB "
                         f"(fp16 {self.linear_float_bytes / 1e6:.3f} MB); per bitwidth: {hist}")
        if self.rtn_fallback:
            lines.append(f"  {self.rtn_fallback} quantized slot(s) rounded to nearest instead of {self.algo} "
                         "(no calibration tokens routed to them, or a singular Hessian)")
        if self.capacity is not None:
            lines.append(f"  budget {self.capacity:,} {self.unit}; summed sensitivity {self.error:.4g}")
        for i, (row, nbytes) in enumerate(zip(self.bits, self.layer_bytes, strict=True)):
            cells = " ".join("f" if b is None else str(b) for b in row)
            lines.append(f"  layer {i}: {nbytes / 1e6:.3f} MB  bits [{cells}]")
        return "\n".join(lines)
