"""GPTQ (Frantar et al., 2023): group-wise quantization that compensates each column's rounding error.

Round-to-nearest (`groupwise.quantize`) minimises the weight error ||W - Q||. What the model feels is the
output error on its real inputs, ||(W - Q) X^T||^2 = tr((W - Q) H (W - Q)^T) / 2 with the Hessian
H = 2/n * sum x x^T of the layer's inputs. GPTQ quantizes one input column (K) at a time and moves the
not-yet-quantized columns to absorb the error just made, using the inverse Hessian's Cholesky factor
(the Optimal Brain Surgeon update, done lazily in blocks of `block` columns). Inputs that are correlated
(as real activations are) let the later columns cancel much of the earlier columns' error.

Our own implementation, written against the paper and its public reference code; what differs:
- The output is the existing MatMulNBits / QMoE layout (`groupwise.Quantized`) with the exact scale and
  zero-point formulas of `groupwise.quantize`, groups contiguous along K in the ORIGINAL column order,
  so lowering is unchanged and `dequantize(result)` is exactly what the GPTQ loop rounded to.
- Group parameters: without act-order, each group's (scale, zero point) come from its columns as
  updated by the error compensation when the loop reaches the group's first column (as the reference
  does; the block is widened to a multiple of the group so that the group is fully up to date then).
  With act-order (columns in descending diag(H), the important ones first while the most freedom is
  left) a group's columns are scattered over the order, and our layout has no g_idx, so the groups'
  parameters are static: computed from the ORIGINAL weights' groups before the loop ("static groups").
- Dead inputs (diag(H) = 0, never non-zero in the calibration data) keep their weights and are rounded
  plainly (the reference zeroes them; keeping them loses nothing on the calibration data and keeps
  the model's behaviour on inputs the calibration data never exercised).
- Scale search (`search=True`): each group's (scale, zero point) come from `groupwise.search_params`
  weighted by diag(H) of the group's columns (the output cost of an error in that column, ignoring
  correlations), instead of min/max; statically from the original weights with act-order, from the
  updated columns without it. What the loop then rounds to is that grid, as with min/max.
- Scales are rounded to the storage dtype (`groupwise.scale_storage`) as each group's are chosen, before any
  of its columns is rounded, so the error compensation sees the grid the artifact stores.
- Damping `damp * mean(diag H)` is added to the diagonal; when the Cholesky factorisation still fails
  the damping is raised tenfold (up to three times), then the matrix falls back to RTN with a
  `GPTQFallbackWarning`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from moeopt.quant.groupwise import (
    Quantized,
    _blocks,
    block_params,
    check_format,
    from_codes,
    k_blocks,
    quantize,
    round_codes,
    search_params,
    stored_scale,
)

DAMP_TRIES = 4  # damp, then 10x, 100x, 1000x (relative to the mean diagonal) before falling back to RTN


class GPTQFallbackWarning(UserWarning):
    """GPTQ could not factorise the Hessian even with raised damping: the matrix was rounded (RTN)."""


class Hessian:
    """Accumulates H = 2/n * sum x x^T over the rows x (length K) a linear layer sees, in float64.

    Only the (K, K) sum and the row count are kept, so any number of calibration rows costs K*K*8 bytes.
    """

    def __init__(self, cols: int) -> None:
        self.cols = cols
        self._sum = torch.zeros(cols, cols, dtype=torch.float64)
        self.count = 0  # rows seen

    def add(self, x: torch.Tensor) -> None:
        """Add rows x of shape (n, K) (leading dimensions are flattened)."""
        if x.shape[-1] != self.cols:
            raise ValueError(f"rows of length {x.shape[-1]} for a Hessian over {self.cols} inputs")
        x = x.detach().reshape(-1, self.cols).to(torch.float64)
        if x.shape[0]:
            self._sum.addmm_(x.t(), x)
            self.count += int(x.shape[0])

    def add_gram(self, gram: torch.Tensor, rows: int) -> None:
        """Add rows given by their Gram matrix x^T x (K, K) (shared by every Hessian that saw the same rows)."""
        self._sum += gram.to(torch.float64)
        self.count += rows

    def value(self) -> torch.Tensor:
        """(K, K) float32 H = 2/n * sum x x^T (all zeros before any row)."""
        if self.count == 0:
            return torch.zeros(self.cols, self.cols)
        return (self._sum * (2.0 / self.count)).float()


def all_reduce_hessians(hessians: Sequence[Hessian]) -> None:
    """Sum Hessians (their float64 sums and row counts) over the ranks of a distributed run, in place.

    Each rank accumulated the rows of its share of the calibration batches; a Hessian listed twice (one
    shared by several slots) is summed once. One collective for all of them (`moeopt.distributed`).
    """
    from moeopt import distributed

    if distributed.world() == 1:
        return
    unique = list({id(h): h for h in hessians}.values())
    counts = torch.tensor([float(h.count) for h in unique], dtype=torch.float64)
    distributed.all_reduce_([*(h._sum for h in unique), counts])
    for h, c in zip(unique, counts.tolist(), strict=True):
        h.count = int(c)


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + d * mean(diag H) * I)^-1 (float64 in, float32 out), raising d on
    failure; None when every try fails."""
    mean = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    step = damp if damp > 0 else 0.01
    for attempt in range(DAMP_TRIES):
        d = damp if attempt == 0 else step * 10**attempt
        lower, info = torch.linalg.cholesky_ex(h + d * mean * eye)
        if int(info) != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper.float()
    return None


def gptq(
    w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, symmetric: bool, *,
    act_order: bool = True, damp: float = 0.01, block: int = 128, search: bool = False,
) -> Quantized:
    """Quantize a (N, K) nn.Linear weight with GPTQ against the Hessian (K, K) of its inputs.

    Args:
        w: the float weight, rows = output features, columns = input features.
        hessian: 2/n * sum x x^T of the inputs (`Hessian.value()`); only its relative scale matters.
        bits, group, symmetric: the format, as `groupwise.quantize` takes it.
        act_order: quantize columns in descending diag(H) (static group parameters, see the module
            docstring).
        damp: diagonal damping relative to the mean diagonal of H.
        block: columns per lazy-update block (a speed knob; the result does not depend on it beyond
            float rounding, except that without act-order it is widened to a multiple of `group`).
        search: choose each group's scale and zero point by a diag(H)-weighted error search (see the
            module docstring) instead of min/max.

    Returns:
        The packed matrix; `dequantize(result)` is the weight the model computes with.
    """
    check_format(bits, group)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"Hessian is {tuple(hessian.shape)} for a matrix of {cols} columns")
    if not (math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    h = hessian.detach().to(torch.float64).clone()
    if not bool(torch.isfinite(h).all()):
        raise ValueError("the Hessian has non-finite entries")
    weight = w.detach().float().clone()
    dead = h.diagonal() <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h.diagonal()[dead] = 1.0  # decoupled from every other column: plain rounding, no error to spread

    kb = k_blocks(cols, group)
    diag = h.diagonal().float().clone()  # (K,) column importance for the scale search (dead columns: 1)
    scale = torch.zeros(rows, kb)
    zp = torch.zeros(rows, kb)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        blk = _blocks(weight, group)  # static: the original groups
        scale, zp = (search_params(blk, bits, symmetric, _blocks(diag[None, :], group)) if search
                     else block_params(blk, bits, symmetric))
        scale = stored_scale(scale)
    else:
        perm = torch.arange(cols)
        block = -(-block // group) * group  # a group never straddles two blocks, so it is up to date
    weight, h = weight[:, perm], h[perm][:, perm]
    hinv = _inverse_factor(h, damp)
    if hinv is None:
        warnings.warn(f"GPTQ: the Hessian of a ({rows}, {cols}) matrix is not positive definite even with "
                      f"damping raised to {damp if damp > 0 else 0.01 * 10 ** (DAMP_TRIES - 1):g}; rounded to nearest",
                      GPTQFallbackWarning, stacklevel=2)
        return quantize(w.float(), bits, group, symmetric, search)

    codes = torch.zeros(rows, cols)  # in the permuted order
    order = perm.tolist()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = weight[:, i1:i2].clone()  # (N, b) updated as we go
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // group
            if not act_order and col % group == 0:  # the group's columns are i .. i + group - 1 of w1
                cur = w1[:, i : i + group]
                cur = torch.nn.functional.pad(cur, (0, group - cur.shape[1]))  # the last group's padding
                if search:
                    imp = diag[col : col + group]
                    imp = torch.nn.functional.pad(imp, (0, group - imp.numel()))
                    scale[:, g], zp[:, g] = search_params(cur, bits, symmetric, imp)
                else:
                    scale[:, g], zp[:, g] = block_params(cur, bits, symmetric)
                scale[:, g] = stored_scale(scale[:, g])
            x = w1[:, i]
            s, z = scale[:, g], zp[:, g]
            q = round_codes(x[:, None], s, z, bits)[:, 0]  # (N,)
            deq = (q - z) * s
            codes[:, i1 + i] = q
            e = (x - deq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        weight[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    pad = kb * group - cols
    blk_codes = torch.cat([codes, zp.repeat_interleave(group, dim=1)[:, cols:]], dim=1) if pad else codes
    return from_codes(rows, cols, bits, group, blk_codes.reshape(rows, kb, group), scale, zp, symmetric)
