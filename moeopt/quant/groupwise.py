"""Group-wise integer quantization of one (rows, cols) matrix in ONNX Runtime's MatMulNBits layout.

The matrix is nn.Linear-style W (N = rows = out features, K = cols = in features), quantized along K in
blocks of `group` values, which is exactly the `B` input of `com.microsoft.MatMulNBits` (no transpose):

    k_blocks  = ceil(K / group)            (the last block is zero-padded)
    blob_size = group * bits / 8           (bytes per block)
    packed    uint8 (N, k_blocks * blob_size)   == MatMulNBits B [N, k_blocks, blob_size] reshaped
    scales    float32 (N, k_blocks)             == MatMulNBits scales [N * k_blocks]
    zero_pts  uint8 (N, ceil(k_blocks * bits / 8)) or None == MatMulNBits zero_points, packed

Inside a block (and inside a row of zero points) value j occupies bits [j*bits, (j+1)*bits) of the
little-endian bit stream: for 2/4/8 bits that is ORT's packing (low bits first). 3-bit uses the same
stream rule (8 values in 3 bytes): MatMulNBits rejects 3 bits, but QMoE's INT3 (`weights_prepacked=0`,
fp16 activations, block 32-128, symmetric only on CPU) reads exactly this packing. Stacked per slot, the
same rows are QMoE's `fc*_experts_weights` [E, N, K*bits/8], scales [E, N, k_blocks] and zero points
[E, N, ceil(k_blocks*bits/8)] (tests/test_quant_qmoe.py); GLU gate/up rows only need interleaving.

Reference formula (per block w of `group` float32 values, m = 2**bits - 1, h = 2**(bits-1)):
    symmetric:  a = the value of largest |w| (first one), scale = a / -h, zp = h (implicit: ORT's
                default zero point when none is given), q = clamp(round(w / scale) + h, 0, m)
                (the largest-magnitude value lands exactly on level 0, so all 2**bits levels are used)
    asymmetric: lo = min(min(w), 0), hi = max(max(w), 0), scale = (hi - lo) / m,
                zp = clamp(round(-lo / scale), 0, m), q = clamp(round(w / scale) + zp, 0, m)
    a block of zeros has scale 0 and q = zp.  dequantized w' = (q - zp) * scale   (float32)
round() is round-half-to-even (torch.round).

Scale search (`search=True`, `search_params`): the min/max rule above spends the grid on each block's
extremes; a block's squared error is usually smaller with a tighter range that clips an outlier. The
search tries, per block, candidate scales around the min/max one, refits each by least squares on the
codes it produces (llama.cpp's make_qkx2 / AWQ-style clipping), and keeps the (scale, zero point) with
the smallest (optionally importance-weighted) squared error. The result is in the same format (a float32
scale and an integer zero point per block), so packing and lowering do not change.

Scale storage (`scale_storage(torch.float16)`, the quantize pass's `scale-dtype=float16`): each block's scale
is rounded to float16 as soon as it is chosen, BEFORE the codes are rounded against it, and `Quantized.scales`
holds float16. The codes are then exactly those of that scale, so the artifact (which stores the float16
scales and casts them to float32 when the session loads; `moeopt.lower.half_scales`) computes the same
dequantized weights as PyTorch does. At block 64 that stores 4.31 instead of 4.56 bits per 4-bit weight.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)
GROUPS = (16, 32, 64, 128, 256)
SEARCH_STEPS = 20  # candidate scales per block: (hi - lo) / (m - 1 + 0.1 * i), i = 0 .. SEARCH_STEPS
SEARCH_SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6)  # symmetric: candidate fractions of the min/max scale (then refit)

# Which widths get the scale search: True / False for all, or the set of widths (the quantize pass's
# `scales=auto` searches 2 and 3 bits only, where it measured better; see `searched`).
Search = bool | frozenset[int]


SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_SCALE_DTYPE: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("moeopt_scale_dtype",
                                                                            default=torch.float32)


@contextlib.contextmanager
def scale_storage(dtype: torch.dtype) -> Iterator[None]:
    """Within it, `quantize`, `gptq` and `matrix_bytes` store (and count) block scales as `dtype`.

    A context rather than one more argument through every quantizer, sensitivity and byte count between the
    quantize pass and this module (the same pattern as the lowering's `quant_settings`): the pass sets it once
    around its work, and everything it calls quantizes in the one format the artifact will hold.
    """
    if dtype not in SCALE_DTYPES.values():
        raise ValueError(f"scale dtype must be float32 or float16, got {dtype}")
    token = _SCALE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _SCALE_DTYPE.reset(token)


class ScaleRangeError(ValueError):
    """A block scale does not fit the storage dtype (float16: |scale| > 65504)."""


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` (float32) rounded to the storage dtype, as float32 values (unchanged under float32).

    Raises ScaleRangeError when a scale does not fit float16's range (|scale| > 65504: weights beyond ~1e6).
    """
    dt = _SCALE_DTYPE.get()
    if dt == torch.float32:
        return scale
    big = float(scale.abs().amax()) if scale.numel() else 0.0
    if not math.isfinite(big) or big > torch.finfo(dt).max:
        raise ScaleRangeError(f"a block scale of {big:g} does not fit {str(dt).removeprefix('torch.')}; "
                              "store scales as float32")
    return scale.to(dt).float()


def searched(search: Search, bits: int) -> bool:
    """Whether `search` asks for the scale search at `bits`."""
    return bits in search if isinstance(search, frozenset) else bool(search)


@dataclass(frozen=True)
class Quantized:
    """A quantized matrix: packed codes, scales and (asymmetric only) packed zero points."""

    rows: int  # N
    cols: int  # K
    bits: int
    group: int
    packed: torch.Tensor  # uint8 (N, k_blocks * group * bits / 8)
    scales: torch.Tensor  # float32 or float16 (`scale_storage`) (N, k_blocks)
    zero_points: torch.Tensor | None  # uint8 (N, ceil(k_blocks * bits / 8)), None = symmetric

    def __post_init__(self) -> None:
        check_format(self.bits, self.group)
        kb = k_blocks(self.cols, self.group)
        if tuple(self.packed.shape) != (self.rows, kb * blob_size(self.bits, self.group)):
            raise ValueError(f"packed is {tuple(self.packed.shape)} for a ({self.rows}, {self.cols}) matrix")
        if tuple(self.scales.shape) != (self.rows, kb):
            raise ValueError(f"scales are {tuple(self.scales.shape)}, expected ({self.rows}, {kb})")

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def nbytes(self) -> int:
        return matrix_bytes(self.rows, self.cols, self.bits, self.group, self.symmetric, self.scales.element_size())


def check_format(bits: int, group: int) -> None:
    """Raise ValueError unless (bits, group) is a supported format."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group not in GROUPS:
        raise ValueError(f"group size must be one of {GROUPS}, got {group}")


def k_blocks(cols: int, group: int) -> int:
    return -(-cols // group)


def blob_size(bits: int, group: int) -> int:
    """Bytes per block; every supported group is a multiple of 8 so blocks are whole bytes."""
    return group * bits // 8


def zp_row_bytes(cols: int, bits: int, group: int) -> int:
    return -(-k_blocks(cols, group) * bits // 8)


def matrix_bytes(rows: int, cols: int, bits: int, group: int, symmetric: bool, scale_bytes: int | None = None) -> int:
    """Stored bytes of a quantized (rows, cols) matrix: codes + scales (+ packed zero points).

    `scale_bytes`: bytes per scale; None: the current storage (`scale_storage`; float32 by default).
    """
    if scale_bytes is None:
        scale_bytes = _SCALE_DTYPE.get().itemsize
    kb = k_blocks(cols, group)
    total = rows * kb * blob_size(bits, group) + rows * kb * scale_bytes
    return total + (0 if symmetric else rows * zp_row_bytes(cols, bits, group))


def _chunk(bits: int) -> tuple[int, int]:
    """(values, bytes) of the smallest run of values that fills whole bytes: 2 and 1 for 4 bits, 8 and 3 for 3."""
    values = 8 // math.gcd(bits, 8)
    return values, values * bits // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, n) integer codes < 2**bits -> (R, ceil(n * bits / 8)) uint8, value j at bit j*bits, LSB first.

    Works a chunk of values at a time (a byte, or 3 bytes for 3-bit) with shifts and ORs, rather than through
    a stream of single bits: a 1B model's experts are 10**9 codes, and a bit stream of int64 is 32 bytes each.
    """
    rows, n = codes.shape
    values, nbytes = _chunk(bits)
    out_bytes = -(-n * bits // 8)
    wide = torch.uint8 if nbytes == 1 else torch.int32 if values * bits < 32 else torch.int64
    x = codes.to(wide)
    pad = -n % values
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(rows, -1, values)  # (R, chunks, values)
    acc = x[..., 0].clone()
    for j in range(1, values):
        acc |= x[..., j] << (j * bits)
    if nbytes == 1:
        return acc  # (R, chunks) == (R, out_bytes)
    out = torch.stack([(acc >> (8 * b)) & 0xFF for b in range(nbytes)], dim=-1).reshape(rows, -1)
    return out[:, :out_bytes].to(torch.uint8).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: (R, nbytes) uint8 -> (R, n) int64 codes."""
    rows, have = packed.shape
    values, nbytes = _chunk(bits)
    mask = (1 << bits) - 1
    if nbytes == 1:
        acc = packed
    else:
        wide = torch.int32 if values * bits < 32 else torch.int64
        x = packed.to(wide)
        pad = -have % nbytes
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        x = x.reshape(rows, -1, nbytes)  # (R, chunks, nbytes)
        acc = x[..., 0].clone()
        for b in range(1, nbytes):
            acc |= x[..., b] << (8 * b)
    out = torch.stack([(acc >> (j * bits)) & mask for j in range(values)], dim=-1).reshape(rows, -1)  # (R, n')
    return out[:, :n].to(torch.int64).contiguous()


def _blocks(w: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) -> (N, k_blocks, group) float32, zero-padded along K (a view when no padding or cast is needed)."""
    rows, cols = w.shape
    pad = k_blocks(cols, group) * group - cols
    w = w.float()
    return (torch.nn.functional.pad(w, (0, pad)) if pad else w).reshape(rows, -1, group)


def quantize(w: torch.Tensor, bits: int, group: int, symmetric: bool, search: bool = False) -> Quantized:
    """Quantize a (N, K) matrix group-wise along K (see the module docstring for the formula; `search`:
    per-block scale search instead of min/max)."""
    return _quantize(w, bits, group, symmetric, search)[0]


def quantize_dequantize(
    w: torch.Tensor, bits: int, group: int, symmetric: bool, search: bool = False
) -> tuple[Quantized, torch.Tensor]:
    """`quantize(w)` and `dequantize` of it, float32 (N, K), computed from the codes before they are packed.

    Bit-identical to `dequantize(quantize(w))` (the same float codes, zero points and scales enter the same
    (q - zp) * scale), without unpacking the bytes again.
    """
    q, codes_f, zp = _quantize(w, bits, group, symmetric, search)
    codes_f.sub_(zp[..., None]).mul_(q.scales[..., None])  # (N, kb, g): (q - zp) * scale, in place
    return q, codes_f.reshape(q.rows, -1)[:, : q.cols].contiguous()


def _quantize(
    w: torch.Tensor, bits: int, group: int, symmetric: bool, search: bool = False
) -> tuple[Quantized, torch.Tensor, torch.Tensor]:
    """(the packed matrix, its codes as float32 (N, kb, g), its zero points as float32 (N, kb))."""
    check_format(bits, group)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    blk = _blocks(w, group)  # (N, kb, g)
    scale, zp = search_params(blk, bits, symmetric) if search else block_params(blk, bits, symmetric)
    scale = stored_scale(scale)
    q = round_codes(blk, scale, zp, bits)
    return from_codes(rows, cols, bits, group, q, scale, zp, symmetric), q, zp


def block_params(blk: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., g) float32 blocks -> (scale, zero point), each (...), float32, by the module docstring's formula."""
    m, h = 2**bits - 1, 2 ** (bits - 1)
    if symmetric:
        idx = blk.abs().argmax(dim=-1, keepdim=True)  # (..., 1)
        scale = blk.gather(-1, idx).squeeze(-1) / -h  # (...)
        zp = torch.full_like(scale, float(h))
    else:
        lo = blk.amin(dim=-1).clamp(max=0.0)  # (...); two reductions: aminmax is 5x slower over short rows
        hi = blk.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / m
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.where(scale == 0, torch.zeros_like(scale), torch.round(-lo / safe).clamp(0, m))
    return scale, zp


def search_params(
    blk: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., g) float32 blocks -> (scale, zero point), each (...), minimising each block's weighted squared error.

    Why our own code: the published searches (llama.cpp's make_qkx2_quants in C, AutoAWQ's clipping search,
    HQQ) each target their own storage (a float min, fp16/6-bit scales, their own packed kernels); ours is a
    float32 scale and an INTEGER zero point in MatMulNBits' layout, so a float min has to be rounded to a
    zero point and the codes re-rounded, inside the search. Vectorised over all blocks at once, one
    candidate at a time (SEARCH_STEPS + 2 passes over the matrix, no per-block Python loop).

    Candidates (each evaluated after one least-squares refit of the scale on its own codes, zero point
    fixed, then re-rounded, which can only lower that candidate's error):
    - the min/max parameters of `block_params` (so the result is never worse than min/max in the weighted error);
    - asymmetric: make_qkx2's grid, scale (hi - lo) / (m - 1 + 0.1 i); the codes it gives are fitted by
      weighted least squares x ~ s * l + mn (mn <= 0, so 0 stays representable), then zp = round(-mn / s);
    - symmetric: the min/max scale times each of SEARCH_SHRINK (clipping the largest values).

    Args:
        blk: the blocks (..., g), float32.
        bits: the code width.
        symmetric: zero point fixed at 2**(bits-1) (then only the scale is searched).
        importance: non-negative weights broadcastable to `blk` (e.g. a Hessian's diagonal per input
            column: how much an error in that column costs at the output), multiplying the per-weight
            rms(block) + |x| weights; None: those alone.
    """
    m, h = 2**bits - 1, 2 ** (bits - 1)
    # Per-weight weights: llama.cpp's make_qkx2 ones, rms(block) + |x|, so that clipping the large weights
    # costs what it does to the model (plain MSE clipped them and measured worse at 4 bits: bench/quantize_real.py),
    # times `importance` when given.
    wt = blk.abs() + blk.pow(2).mean(-1, keepdim=True).sqrt()
    if importance is not None:
        wt = wt * importance.float().expand_as(blk).clamp(min=0)
    wt = torch.where(wt.sum(-1, keepdim=True) > 0, wt, torch.ones_like(wt))  # an all-zero weight row: plain MSE

    def refit(scale: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale refitted on its codes, zp, weighted squared error after re-rounding) per block."""
        c = round_codes(blk, scale, zp, bits).sub_(zp[..., None])  # (..., g): q - zp
        den = (wt * c * c).sum(-1)
        fit = torch.where(den > 0, (wt * blk * c).sum(-1) / den.clamp(min=1e-30), scale)
        fit = torch.where(fit * scale > 0, fit, scale)  # a degenerate fit (or a sign flip) keeps the candidate's scale
        c = round_codes(blk, fit, zp, bits).sub_(zp[..., None]).mul_(fit[..., None])
        return fit, zp, (wt * (blk - c).pow(2)).sum(-1)

    best_s, best_z, best_e = refit(*block_params(blk, bits, symmetric))
    if symmetric:
        base = block_params(blk, bits, True)[0]
        cands = [(base * f, torch.full_like(base, float(h))) for f in SEARCH_SHRINK[1:]]
    else:
        lo, hi = blk.amin(dim=-1).clamp(max=0.0), blk.amax(dim=-1).clamp(min=0.0)
        span = hi - lo
        cands = []
        sw = wt.sum(-1)
        swx = (wt * blk).sum(-1)
        for i in range(SEARCH_STEPS + 1):
            s0 = span / (m - 1 + 0.1 * i)
            safe = torch.where(s0 > 0, s0, torch.ones_like(s0))
            lv = torch.round((blk - lo[..., None]) / safe[..., None]).clamp_(0, m)  # (..., g)
            swl, swl2, swxl = (wt * lv).sum(-1), (wt * lv * lv).sum(-1), (wt * blk * lv).sum(-1)
            det = sw * swl2 - swl * swl
            ok = det > 0
            d = det.clamp(min=1e-30)
            s = torch.where(ok, (sw * swxl - swx * swl) / d, s0)
            mn = torch.where(ok, (swl2 * swx - swl * swxl) / d, lo)
            pos = mn > 0  # keep 0 representable: min clamped to 0, scale refitted alone
            s = torch.where(pos, swxl / swl2.clamp(min=1e-30), s)
            mn = torch.where(pos, torch.zeros_like(mn), mn)
            good = s > 0
            s = torch.where(good, s, s0)
            mn = torch.where(good, mn, lo)
            zp = torch.where(s > 0, torch.round(-mn / torch.where(s > 0, s, torch.ones_like(s))).clamp(0, m),
                             torch.zeros_like(s))
            cands.append((s, zp))
    for scale, zp in cands:
        s, z, e = refit(scale, zp)
        better = e < best_e
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_e = torch.minimum(e, best_e)
    zero = blk.abs().amax(dim=-1) == 0  # an all-zero block: scale 0, as block_params gives
    return torch.where(zero, torch.zeros_like(best_s), best_s), best_z


def round_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of values x (..., g) under per-block (scale, zp) of shape (...): clamp(round(x / scale) + zp).

    Float32 codes in a new tensor (x is not modified), computed in place from the division on.
    """
    zero = scale == 0
    safe = torch.where(zero, torch.ones_like(scale), scale)[..., None]  # (..., 1)
    q = torch.div(x, safe)
    q.round_().add_(zp[..., None])
    if bool(zero.any()):
        q = torch.where(zero[..., None], zp[..., None].expand_as(q), q)
    return q.clamp_(0, 2**bits - 1)


def from_codes(
    rows: int, cols: int, bits: int, group: int, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
    symmetric: bool,
) -> Quantized:
    """Pack (N, kb, g) codes (padding included) with (N, kb) scales and zero points into a Quantized.

    The scales are stored in the current `scale_storage` dtype (they must already be `stored_scale` values).
    """
    packed = pack_bits(q.to(torch.uint8).reshape(rows * q.shape[1], group), bits).reshape(rows, -1)
    zpp = None if symmetric else pack_bits(zp.to(torch.uint8), bits)
    return Quantized(rows, cols, bits, group, packed, scale.to(_SCALE_DTYPE.get()).contiguous(), zpp)


def codes(q: Quantized) -> torch.Tensor:
    """The integer codes as (N, k_blocks, group) int64 (padding included)."""
    kb = k_blocks(q.cols, q.group)
    flat = q.packed.reshape(q.rows * kb, blob_size(q.bits, q.group))
    return unpack_bits(flat, q.bits, q.group).reshape(q.rows, kb, q.group)


def zero_points(q: Quantized) -> torch.Tensor:
    """The zero points as (N, k_blocks) float32 (2**(bits-1) for symmetric matrices)."""
    kb = k_blocks(q.cols, q.group)
    if q.zero_points is None:
        return torch.full((q.rows, kb), float(2 ** (q.bits - 1)))
    return unpack_bits(q.zero_points, q.bits, kb).float()


def dequantize(q: Quantized) -> torch.Tensor:
    """(q - zp) * scale as a float32 (N, K) matrix."""
    w = (codes(q).float() - zero_points(q)[..., None]) * q.scales[..., None]  # (N, kb, g)
    return w.reshape(q.rows, -1)[:, : q.cols].contiguous()


def fake_quantize(w: torch.Tensor, bits: int, group: int, symmetric: bool, search: bool = False) -> torch.Tensor:
    """dequantize(quantize(w)) in w's dtype: what the model computes with after quantization."""
    return quantize_dequantize(w, bits, group, symmetric, search)[1].to(w.dtype)
