"""The Triton kernels of :mod:`forgetless.kernels` (imported by it only where Triton is installed and asked for).

They live at module level, so every Triton version finds the helpers they call in the module's globals (a kernel
defined inside a function sees them only in the Triton versions that read closures). ``s_*`` are strides, ``m`` the
module of a stack, ``rows`` / ``cols`` / ``ks`` the indices of a tile.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(ptr, i, j, s_i, s_j, in_i, in_j):
    """The ``[len(i), len(j)]`` tile of a matrix at ``ptr`` (strides ``s_i``, ``s_j``), 0 outside ``in_i, in_j``."""
    return tl.load(ptr + i[:, None] * s_i + j[None, :] * s_j, mask=in_i[:, None] & in_j[None, :], other=0.0)


@triton.jit
def _weighted(left, right, w, rows, cols, s_wi, s_wj, in_rows, in_cols, PRECISION: tl.constexpr):
    """``W * (left @ right)`` on one tile: the rank-2r difference formed in registers, the weight read in float32."""
    weight = _tile(w, rows, cols, s_wi, s_wj, in_rows, in_cols).to(tl.float32)
    return tl.dot(left, right, input_precision=PRECISION) * weight


@triton.jit
def lowrank_product_accumulate(l1, r1, l2, r2, out, n_rows, n_cols, k1, k2,
                               s_l1m, s_l1i, s_l1k, s_r1m, s_r1k, s_r1j,
                               s_l2m, s_l2i, s_l2k, s_r2m, s_r2k, s_r2j,
                               s_om, s_oi, s_oj,
                               MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK1: tl.constexpr,
                               BK2: tl.constexpr):
    # out[m] (+)= (L1 @ R1) * (L2 @ R2) on one tile per program (MODE: forgetless.kernels.MODES)
    tile = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    tiles_j = tl.cdiv(n_cols, BN)
    rows = (tile // tiles_j) * BM + tl.arange(0, BM)
    cols = (tile % tiles_j) * BN + tl.arange(0, BN)
    in_rows, in_cols = rows < n_rows, cols < n_cols
    k_1, k_2 = tl.arange(0, BK1), tl.arange(0, BK2)
    p1 = tl.dot(_tile(l1 + m * s_l1m, rows, k_1, s_l1i, s_l1k, in_rows, k_1 < k1),
                _tile(r1 + m * s_r1m, k_1, cols, s_r1k, s_r1j, k_1 < k1, in_cols), input_precision="ieee")
    p2 = tl.dot(_tile(l2 + m * s_l2m, rows, k_2, s_l2i, s_l2k, in_rows, k_2 < k2),
                _tile(r2 + m * s_r2m, k_2, cols, s_r2k, s_r2j, k_2 < k2, in_cols), input_precision="ieee")
    product = p1 * p2
    if MODE == 1:  # NaN stays NaN, as torch's clamp keeps it (a diverged step must not read as finite importance)
        product = tl.maximum(product, 0.0, propagate_nan=tl.PropagateNan.ALL)
    where = out + m * s_om + rows[:, None] * s_oi + cols[None, :] * s_oj
    inside = in_rows[:, None] & in_cols[None, :]
    total = tl.load(where, mask=inside, other=0.0) + product
    if MODE == 2:
        total = tl.maximum(total, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(where, total, mask=inside)


@triton.jit
def weighted_projection(l, rt, w, out, n_rows, n_cols, k, s_lm, s_li, s_lk, s_rm, s_rk, s_rj, s_wm, s_wi, s_wj,
                        s_om, s_oi, s_ok, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        PRECISION: tl.constexpr):
    # out[m, rows, :] = sum over columns of (W * (L @ Rt))[rows, cols] @ Rt[:, cols]^T: a block of rows per program
    m = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ks = tl.arange(0, BK)
    in_rows, in_k = rows < n_rows, ks < k
    left = _tile(l + m * s_lm, rows, ks, s_li, s_lk, in_rows, in_k)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for start in range(0, n_cols, BN):
        cols = start + tl.arange(0, BN)
        in_cols = cols < n_cols
        right = _tile(rt + m * s_rm, ks, cols, s_rk, s_rj, in_k, in_cols)
        g = _weighted(left, right, w + m * s_wm, rows, cols, s_wi, s_wj, in_rows, in_cols, PRECISION)
        acc += tl.dot(g, tl.trans(right), input_precision=PRECISION)
    tl.store(out + m * s_om + rows[:, None] * s_oi + ks[None, :] * s_ok, acc, mask=in_rows[:, None] & in_k[None, :])


@triton.jit
def weighted_left_product(b, l, rt, w, out, n_rows, n_cols, k, r, s_bm, s_bi, s_br, s_lm, s_li, s_lk,
                          s_rm, s_rk, s_rj, s_wm, s_wi, s_wj, s_om, s_or, s_oj,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                          PRECISION: tl.constexpr):
    # out[m, :, cols] = sum over rows of B[rows, :]^T @ (W * (L @ Rt))[rows, cols]: a block of columns per program
    m = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    ks, rs = tl.arange(0, BK), tl.arange(0, BR)
    in_cols, in_k, in_r = cols < n_cols, ks < k, rs < r
    right = _tile(rt + m * s_rm, ks, cols, s_rk, s_rj, in_k, in_cols)
    acc = tl.zeros((BR, BN), dtype=tl.float32)
    for start in range(0, n_rows, BM):
        rows = start + tl.arange(0, BM)
        in_rows = rows < n_rows
        left = _tile(l + m * s_lm, rows, ks, s_li, s_lk, in_rows, in_k)
        g = _weighted(left, right, w + m * s_wm, rows, cols, s_wi, s_wj, in_rows, in_cols, PRECISION)
        bt = _tile(b + m * s_bm, rs, rows, s_br, s_bi, in_r, in_rows)  # B^T's tile
        acc += tl.dot(bt, g, input_precision=PRECISION)
    tl.store(out + m * s_om + rs[:, None] * s_or + cols[None, :] * s_oj, acc, mask=in_r[:, None] & in_cols[None, :])


KERNELS = {"accumulate": lowrank_product_accumulate, "projection": weighted_projection,
           "left_product": weighted_left_product}
