"""The CUDA dwconv_ln kernels' index maths, run on the CPU: a numpy transcription of each kernel
(csrc/include/dwconv_cuda.cuh, csrc/cuda/dwconv_ln_cuda.cu, csrc/cuda/dwconv_ln_bwd_cuda.cu)
against the fp64 reference.

The transcription follows the kernels step by step: the host tilings (ln_tiling, dx_tiling), the
block -> tile mapping, the rolling windows (slot (ih - h0 + P) % S, staged rows, zero padding),
thread -> (row, strip, channel vectors) ownership, the per-pixel partials and the warp reductions
over channel groups (lane-strided sums, then the xor butterfly), the partial-buffer layouts and
the fixed-order reduce kernel. The threads of a block are vectorised with numpy; everything else is
the kernels' own loops. It computes in fp64, so any index error shows as a large difference; shared
memory and scratch start as NaN, so reading something never staged or written fails too. The
tiling constants are read from the headers, so the transcription follows the shipped values.

What it cannot check: the CUDA code itself (races, alignment, register use), which needs a GPU
(tests/ops/test_dwconv_ln.py runs the kernels there).
"""
import os
import re

import numpy as np
import pytest
import torch

from convnext_fast import reference

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _constants():
    """constexpr ints of the two headers, evaluated in order (later ones may use earlier ones)."""
    env = {}
    for name in ("dwconv_limits.h", "dwconv_cuda.cuh"):
        with open(os.path.join(ROOT, "csrc", "include", name)) as f:
            for m in re.finditer(r"constexpr\s+(?:int|int64_t)\s+(k[A-Z]\w*)\s*=\s*([^;\[\]{}]+);", f.read()):
                env[m.group(1)] = eval(m.group(2), {}, dict(env))  # our own header's constant expressions
    return env


K_ = _constants()
VEC, PX = K_["kVec"], K_["kPx"]
MAX_THREADS, TARGET = K_["kMaxThreads"], K_["kTargetThreads"]
BUDGET = K_["kSharedBudget"]
WARP = 32


def ceil_div(a, b):
    return -(-a // b)


def align16(b):
    return ceil_div(b, 16) * 16


def window_bytes(K, r, q, chans, elem):
    return align16((K + r - 1) * (q * PX + K - 1) * chans * elem)


def ln_smem_bytes(K, r, q, G, cp, elem, staged, bwd):
    return ((window_bytes(K, r, q, cp, elem) if staged else 0) + align16(2 * r * q * PX * G * 4)
            + align16(2 * r * q * PX * 4) + (3 * r * q * cp * 4 if bwd else 0))


def rows_computed(H, band, r):
    bands = ceil_div(H, band)
    last = H - (bands - 1) * band
    return (bands - 1) * band + ceil_div(last, r) * r


def useful_threads(threads, H, W, q, r, band):
    tw = q * PX
    return float(threads * W * H) / (float(ceil_div(W, tw) * tw) * float(rows_computed(H, band, r)))


def band_rows(H, r, target):
    return r * ceil_div(min(H, target), r)


def ln_tiling(K, C, H, W, elem, bwd):
    cv = ceil_div(C, VEC)
    ncv = ceil_div(cv, MAX_THREADS)
    G = ceil_div(cv, ncv)
    cp = cv * VEC
    q_max = min(ceil_div(W, PX), K_["kMaxStrips"], max(1, TARGET // G))
    r_max = min(H, K_["kMaxStepRows"])
    best, best_u = (0, 0, 0), 0.0  # (threads, q, r), useful threads
    if ncv == 1:
        for q in range(1, q_max + 1):
            r = 1
            while r <= r_max and r * q * G <= TARGET:
                if ln_smem_bytes(K, r, q, G, cp, elem, True, bwd) > BUDGET:
                    break
                u = useful_threads(r * q * G, H, W, q, r, band_rows(H, r, K_["kBandRows"]))
                if u >= best_u:
                    best, best_u = (r * q * G, q, r), u
                r += 1
    reachable = min(TARGET, max(G, q_max * r_max * G))
    staged = best[0] >= min(K_["kMinStagedThreads"], reachable)
    if staged:
        q, r = best[1], best[2]
    else:
        q = q_max
        r = max(1, min(r_max, TARGET // (q * G)))
    band = band_rows(H, r, K_["kBandRows"])
    return {"cv": cv, "ncv": ncv, "G": G, "cp": cp, "q": q, "r": r, "band": band, "staged": staged,
            "threads": ceil_div(r * q * G, WARP) * WARP, "tiles_w": ceil_div(W, q * PX),
            "bands": ceil_div(H, band), "smem": ln_smem_bytes(K, r, q, G, cp, elem, staged, bwd)}


def dx_tiling(K, C, H, W, elem):
    cv = ceil_div(C, VEC)
    max_groups = K_["kDxMaxGroups"]
    gc = min(cv, max_groups)
    while cv % gc != 0 and gc > max_groups // 2:
        gc -= 1
    if cv % gc != 0:
        gc = min(cv, max_groups)
    q_cap = min(ceil_div(W, PX), K_["kMaxStrips"])
    r_cap = min(H, K_["kDxMaxStepRows"])
    while True:
        best, best_u = (0, 0, 0), 0.0
        for q in range(1, q_cap + 1):
            for r in range(1, r_cap + 1):
                threads = max(r * q, K) * gc
                if threads > max(TARGET, K * gc):
                    break
                if 2 * window_bytes(K, r, q, gc * VEC, elem) > BUDGET:
                    break
                u = useful_threads(r * q * gc, H, W, q, r, band_rows(H, r, K_["kDxBandRows"]))
                if u >= best_u:
                    best, best_u = (threads, q, r), u
        if best[0] > 0 or gc == 1:
            q, r = max(best[1], 1), max(best[2], 1)
            break
        gc = max(1, gc // 2)
    band = band_rows(H, r, K_["kDxBandRows"])
    return {"cv": cv, "gc": gc, "chunks": ceil_div(cv, gc), "q": q, "r": r, "band": band,
            "threads": ceil_div(max(r * q, K) * gc, WARP) * WARP, "tiles_w": ceil_div(W, q * PX),
            "bands": ceil_div(H, band), "smem": 2 * window_bytes(K, r, q, gc * VEC, elem)}


def warp_sum(per_group):
    """A warp's sum of per-group values: lane l adds groups l, l + 32, ... in order, then the xor
    butterfly of warp_sum (v += shfl_xor(v, off), off = 16 .. 1)."""
    lanes = np.zeros(WARP)
    for j, v in enumerate(per_group):
        lanes[j % WARP] += v
    for off in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[np.arange(WARP) ^ off]
    return lanes[0]


def stage_row(slot, img, ih, iw0, cols, c_begin, chans, C, H, W):
    """stage_row: columns iw0 .. iw0 + cols of row ih, channels c_begin .. c_begin + chans, zeros
    outside the image and from C on."""
    slot[:] = 0.0
    if not 0 <= ih < H:
        return
    lo, hi = max(iw0, 0), min(iw0 + cols, W)
    c_hi = min(c_begin + chans, C)
    if lo < hi and c_begin < c_hi:
        slot[lo - iw0:hi - iw0, :c_hi - c_begin] = img[ih, lo:hi, c_begin:c_hi]


def conv_row(acc, rows_in, taps_kh, K):
    """conv_row for every thread at once: acc [T, PX, VEC] += in[j] * taps[kw] with p = j - kw;
    rows_in [T, PX + K - 1, VEC] (what each thread loads, zeros where the kernel reads zero),
    taps_kh [T, K, VEC]."""
    for j in range(PX + K - 1):
        v = rows_in[:, j]
        for kw in range(K):
            p = j - kw
            if 0 <= p < PX:
                acc[:, p] += v * taps_kh[:, kw]


def ln_tile_kernel(x, prm, K, eps, t, bwd, grad_y=None, mean_in=None, rstd_in=None):
    """dwconv_ln_tile_kernel over the whole grid. x, grad_y [N, H, W, C] fp64; prm [K*K + 3, cp].
    Forward: (y, mean, rstd). Backward: (dz, part [tiles, 3, cp])."""
    N, H, W, C = x.shape
    P = K // 2
    ncv, G, cp, q, r = t["ncv"], t["G"], t["cp"], t["q"], t["r"]
    TW, S = q * PX, K + r - 1
    cols = TW + K - 1
    taps, bias, ln_w, ln_b = prm[:K * K], prm[K * K], prm[K * K + 1], prm[K * K + 2]
    out = np.full(x.shape, np.nan)
    mean_out, rstd_out = np.full((N, H, W), np.nan), np.full((N, H, W), np.nan)
    grid_x = t["tiles_w"] * t["bands"]
    part = np.full((N * grid_x, 3, cp), np.nan) if bwd else None

    T = r * q * G  # the active threads
    tid = np.arange(T)
    rr, qq, g = tid // (q * G), (tid // G) % q, tid % G
    vidx = g[:, None] + np.arange(ncv)[None, :] * G  # [T, ncv] channel vector of (thread, i)
    nvec = np.clip(C - vidx * VEC, 0, VEC)
    n_thread = nvec.sum(1)
    chan = vidx[..., None] * VEC + np.arange(VEC)  # [T, ncv, VEC]
    ch_ok = chan < np.minimum(C, cp)
    chan_c = np.minimum(chan, cp - 1)

    for n in range(N):
        for bx in range(grid_x):
            tw, band = bx % t["tiles_w"], bx // t["tiles_w"]
            w0, h0 = tw * TW, band * t["band"]
            h_end = min(h0 + t["band"], H)
            window = np.full((S, cols, cp), np.nan)
            sums = np.zeros((3, T, ncv, VEC))  # (dz, grad_y * xhat, grad_y) per thread and channel
            next_row = h0 - P
            for hs in range(h0, h_end, r):
                if t["staged"]:
                    last = min(hs + r, h_end) - 1 + P
                    while next_row <= last:
                        stage_row(window[(next_row - h0 + P) % S], x[n], next_row, w0 - P, cols, 0,
                                  cp, C, H, W)
                        next_row += 1
                h = hs + rr
                row_active = h < h_end
                b0 = np.where(nvec[:, :, None] > 0, bias[chan_c], 0.0)
                acc = np.broadcast_to(b0[:, :, None, :], (T, ncv, PX, VEC)).copy()
                for kh in range(K):
                    if t["staged"]:
                        slot = (h + kh - h0) % S
                        cols_idx = qq[:, None] * PX + np.arange(PX + K - 1)[None, :]
                    else:
                        ih = h + kh - P
                        iw = w0 + qq[:, None] * PX - P + np.arange(PX + K - 1)[None, :]
                        ok = ((ih >= 0) & (ih < H))[:, None] & (iw >= 0) & (iw < W)
                    for i in range(ncv):
                        live = row_active & (nvec[:, i] > 0)
                        if t["staged"]:
                            rows_in = window[slot[:, None, None], cols_idx[:, :, None],
                                             chan_c[:, i][:, None, :]]
                        else:
                            rows_in = x[n, np.clip(ih, 0, H - 1)[:, None, None],
                                        np.clip(iw, 0, W - 1)[:, :, None],
                                        np.minimum(chan[:, i], C - 1)[:, None, :]]
                            rows_in = np.where(ok[:, :, None] & ch_ok[:, i][:, None, :], rows_in, 0.0)
                        taps_kh = taps[kh * K + np.arange(K)[None, :, None], chan_c[:, i][:, None, :]]
                        a = acc[:, i].copy()
                        conv_row(a, rows_in, taps_kh, K)
                        acc[:, i] = np.where(live[:, None, None], a, acc[:, i])

                red = np.full((r * TW, G, 2), np.nan)
                rs = np.zeros((T, PX))
                valid_ch = ch_ok & (nvec[..., None] > 0)
                for p in range(PX):
                    w = w0 + qq * PX + p
                    live = row_active & (w < W)
                    z = acc[:, :, p, :]  # [T, ncv, VEC]
                    if not bwd:
                        s1 = np.where(valid_ch, z, 0.0).sum((1, 2))
                        m = s1 / n_thread
                        s2 = np.where(valid_ch, (z - m[:, None, None]) ** 2, 0.0).sum((1, 2))
                    else:
                        hc, wc = np.minimum(h, H - 1), np.minimum(w, W - 1)
                        mu, rs[:, p] = mean_in[n, hc, wc], rstd_in[n, hc, wc]
                        xh = (z - mu[:, None, None]) * rs[:, p, None, None]
                        acc[:, :, p, :] = np.where(live[:, None, None], xh, z)
                        gy = np.where(valid_ch, grad_y[n, hc[:, None, None], wc[:, None, None],
                                                       np.minimum(chan, C - 1)], 0.0)
                        gg = gy * ln_w[chan_c]
                        s1 = np.where(valid_ch, gg, 0.0).sum((1, 2))
                        s2 = np.where(valid_ch, gg * xh, 0.0).sum((1, 2))
                    pix = rr * TW + qq * PX + p
                    red[pix[live], g[live], 0] = s1[live]
                    red[pix[live], g[live], 1] = s2[live]

                stat = np.full((r * TW, 2), np.nan)
                for pix in range(r * TW):
                    ph, pw = hs + pix // TW, w0 + pix % TW
                    if ph >= h_end or pw >= W:
                        continue
                    s1 = warp_sum(red[pix, :, 0])
                    if not bwd:
                        mean = s1 / C
                        nj = np.clip(C - (np.arange(G)[:, None] + np.arange(ncv)[None, :] * G) * VEC,
                                     0, VEC).sum(1)
                        d = red[pix, :, 0] - nj * mean
                        rstd = 1.0 / np.sqrt(warp_sum(red[pix, :, 1] + d * d / nj) / C + eps)
                        stat[pix] = (mean, rstd)
                        mean_out[n, ph, pw], rstd_out[n, ph, pw] = mean, rstd
                    else:
                        stat[pix] = (s1 / C, warp_sum(red[pix, :, 1]) / C)

                step_sums = np.zeros((3, T, ncv, VEC))
                for p in range(PX):
                    w = w0 + qq * PX + p
                    live = row_active & (w < W)
                    st = stat[rr * TW + qq * PX + p]  # [T, 2]
                    v = acc[:, :, p, :]
                    if not bwd:
                        res = (v - st[:, 0, None, None]) * st[:, 1, None, None] * ln_w[chan_c] + ln_b[chan_c]
                    else:
                        hc, wc = np.minimum(h, H - 1), np.minimum(w, W - 1)
                        gy = np.where(valid_ch, grad_y[n, hc[:, None, None], wc[:, None, None],
                                                       np.minimum(chan, C - 1)], 0.0)
                        res = rs[:, p, None, None] * (gy * ln_w[chan_c] - st[:, 0, None, None]
                                                      - v * st[:, 1, None, None])
                        upd = live[:, None, None] & (nvec[..., None] > 0)
                        step_sums += np.where(upd, np.stack([res, gy * v, gy]), 0.0)
                    store = live[:, None, None] & valid_ch
                    ti, ii, ee = np.nonzero(store)
                    out[n, h[ti], w[ti], chan[ti, ii, ee]] = res[ti, ii, ee]
                sums += step_sums  # the step's sums added to the thread's elements of its slot

            if bwd:
                slots = np.full((r * q, 3, cp), np.nan)  # the kernel's `sums`: [(row, strip), 3, cp]
                for k in range(3):
                    ti, ii = np.nonzero(nvec > 0)
                    for e in range(VEC):
                        slots[rr[ti] * q + qq[ti], k, chan[ti, ii, e]] = sums[k, ti, ii, e]
                tile = n * grid_x + bx
                part[tile] = 0.0
                for slot in range(r * q):  # slot order, as the kernel's final loop
                    part[tile] += slots[slot]
    return (out, part) if bwd else (out, mean_out, rstd_out)


def dx_dw_kernel(x, dz, taps_flip, K, t):
    """dwconv_ln_bwd_dx_dw_kernel over the whole grid: (dx, part [tiles, K*K, cp])."""
    N, H, W, C = x.shape
    P = K // 2
    cv, gc, q, r = t["cv"], t["gc"], t["q"], t["r"]
    cp = cv * VEC
    TW, S, chans = q * PX, K + r - 1, gc * VEC
    cols = TW + K - 1
    dx = np.full(x.shape, np.nan)
    grid_x = t["tiles_w"] * t["bands"]
    part = np.full((N * grid_x, K * K, cp), np.nan)
    T = t["threads"]
    tid = np.arange(T)
    rr, qq, g = tid // (q * gc), (tid // gc) % q, tid % gc
    kh_w = tid // gc
    for n in range(N):
        for bx in range(grid_x):
            for chunk in range(t["chunks"]):
                tw, band = bx % t["tiles_w"], bx // t["tiles_w"]
                w0, h0 = tw * TW, band * t["band"]
                h_end = min(h0 + t["band"], H)
                c_begin = chunk * chans
                c0 = c_begin + g * VEC
                nv = np.where(tid < r * q * gc, np.clip(C - c0, 0, VEC), 0)
                nw = np.where(tid < K * gc, np.clip(C - c0, 0, VEC), 0)
                win_dz = np.full((S, cols, chans), np.nan)
                win_x = np.full((S, cols, chans), np.nan)
                dw = np.zeros((T, K, VEC))
                next_row = h0 - P
                for hs in range(h0, h_end, r):
                    last = min(hs + r, h_end) - 1 + P
                    while next_row <= last:
                        slot = (next_row - h0 + P) % S
                        stage_row(win_dz[slot], dz[n], next_row, w0 - P, cols, c_begin, chans, C, H, W)
                        stage_row(win_x[slot], x[n], next_row, w0 - P, cols, c_begin, chans, C, H, W)
                        next_row += 1
                    h = hs + rr
                    dx_live = (nv > 0) & (h < h_end)
                    lc = g[:, None] * VEC + np.arange(VEC)[None, :]  # [T, VEC] local channel
                    cc = np.minimum(c0[:, None] + np.arange(VEC)[None, :], cp - 1)
                    acc = np.zeros((T, PX, VEC))
                    for kh in range(K):
                        slot = (h + kh - h0) % S
                        cols_idx = qq[:, None] * PX + np.arange(PX + K - 1)[None, :]
                        rows_in = win_dz[slot[:, None, None], cols_idx[:, :, None],
                                         np.minimum(lc, chans - 1)[:, None, :]]
                        taps_kh = taps_flip[kh * K + np.arange(K)[None, :, None], cc[:, None, :]]
                        rows_in = np.where(dx_live[:, None, None], rows_in, 0.0)
                        conv_row(acc, rows_in, taps_kh, K)
                    for p in range(PX):
                        w = w0 + qq * PX + p
                        for e in range(VEC):
                            m = dx_live & (w < W) & (e < nv)
                            dx[n, h[m], w[m], c0[m] + e] = acc[m, p, e]

                    dw_live = nw > 0
                    for hh in range(hs, min(hs + r, h_end)):
                        ih = hh + kh_w - P
                        ok = dw_live & (ih >= 0) & (ih < H)
                        dz_slot = (hh - h0 + P) % S
                        x_slot = (np.clip(ih, 0, H - 1) - h0 + P) % S
                        for s in range(q):
                            d = win_dz[dz_slot, P + s * PX + np.arange(PX)[None, :, None],
                                       np.minimum(lc, chans - 1)[:, None, :]]  # [T, PX, VEC]
                            for j in range(PX + K - 1):
                                v = win_x[x_slot, s * PX + j, np.minimum(lc, chans - 1).T].T  # [T, VEC]
                                for kw in range(K):
                                    p = j - kw
                                    if 0 <= p < PX:
                                        dw[:, kw] += np.where(ok[:, None], d[:, p] * v, 0.0)
                tile = n * grid_x + bx
                for ti in np.nonzero(nw > 0)[0]:
                    for kw in range(K):
                        part[tile, kh_w[ti] * K + kw, c0[ti]:c0[ti] + VEC] = dw[ti, kw]
    return dx, part


def reduce_partials(part, slices=16):
    """reduce_partials_kernel: slice s sums tiles s, s + 16, ... in order; then the slices in order."""
    sums = np.zeros((slices,) + part.shape[1:])
    for i in range(part.shape[0]):
        sums[i % slices] += part[i]
    total = np.zeros(part.shape[1:])
    for s in range(slices):
        total += sums[s]
    return total


def params(w, b, lw, lb, K, C, cp, bwd):
    prm = np.zeros((2 * K * K + 3 if bwd else K * K + 3, cp))
    w2 = w.reshape(C, K, K)
    prm[:K * K, :C] = w2.reshape(C, K * K).T
    if b is not None:
        prm[K * K, :C] = b
    prm[K * K + 1, :C] = lw
    if not bwd:
        prm[K * K + 2, :C] = lb
    else:
        prm[K * K + 3:, :C] = w2[:, ::-1, ::-1].reshape(C, K * K).T
    return prm


def cuda_forward(x, w, b, lw, lb, eps, elem):
    """dwconv_ln_cuda on numpy: x [N, C, H, W] torch -> (y NCHW, mean, rstd) as fp64 tensors."""
    _, C, H, W = x.shape
    K = w.shape[-1]
    t = ln_tiling(K, C, H, W, elem, False)
    prm = params(w.double().numpy(), None if b is None else b.double().numpy(), lw.double().numpy(),
                 lb.double().numpy(), K, C, t["cp"], False)
    xn = x.double().permute(0, 2, 3, 1).numpy()
    y, mean, rstd = ln_tile_kernel(xn, prm, K, eps, t, False)
    return torch.from_numpy(y).permute(0, 3, 1, 2), torch.from_numpy(mean), torch.from_numpy(rstd)


def cuda_backward(gy, x, w, b, lw, mean, rstd, elem):
    """dwconv_ln_bwd_cuda on numpy: (dx, dw, db, dlw, dlb) as fp64 tensors."""
    _, C, H, W = x.shape
    K = w.shape[-1]
    t1 = ln_tiling(K, C, H, W, elem, True)
    cp = t1["cp"]
    prm = params(w.double().numpy(), None if b is None else b.double().numpy(), lw.double().numpy(),
                 None, K, C, cp, True)
    xn = x.double().permute(0, 2, 3, 1).numpy()
    gn = gy.double().permute(0, 2, 3, 1).numpy()
    dz, part_ln = ln_tile_kernel(xn, prm, K, 0.0, t1, True, gn, mean.double().numpy(),
                                 rstd.double().numpy())
    t2 = dx_tiling(K, C, H, W, elem)
    dx, part_dw = dx_dw_kernel(xn, dz, prm[K * K + 3:], K, t2)
    grads = np.concatenate([reduce_partials(part_dw), reduce_partials(part_ln)])[:, :C]
    dw = torch.from_numpy(np.ascontiguousarray(grads[:K * K].T)).reshape(C, 1, K, K)
    rest = [torch.from_numpy(grads[K * K + i].copy()) for i in range(3)]
    return (torch.from_numpy(dx).permute(0, 3, 1, 2), dw, *rest)


def inputs(N, C, H, W, K, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64) + 0.5
    w = torch.randn(C, 1, K, K, generator=gen, dtype=torch.float64) / K
    b = torch.randn(C, generator=gen, dtype=torch.float64) if bias else None
    lw = 1 + 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)
    lb = 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)
    return x, w, b, lw, lb


# (N, C, H, W, k, elem): C not a multiple of 4 or of a warp, H and W not multiples of the tile,
# N = 1, H or W below k, k = 3/5/7, the staged and the direct tilings (elem = 4 moves large C to
# direct loads), 2, 3 and 4 channel vectors a thread, bands and row windows that wrap, and dx/dW
# channel chunks that do and do not divide C.
CASES = [
    (1, 40, 5, 9, 7, 2),
    (2, 96, 9, 13, 7, 2),
    (1, 160, 3, 4, 5, 4),
    (2, 13, 6, 5, 3, 4),
    (1, 7, 2, 9, 5, 2),
    (1, 24, 20, 37, 3, 2),
    (1, 148, 5, 6, 3, 2),
    (1, 768, 4, 3, 7, 4),
    (1, 1100, 2, 3, 3, 4),
    (1, 2900, 1, 2, 3, 2),
    (1, 3300, 2, 1, 3, 4),
    (1, 1, 3, 3, 3, 4),
]


def _id(c):
    return "N{}C{}H{}W{}k{}e{}".format(*c)


def test_cases_cover_both_tilings():
    kinds = {(ln_tiling(k, C, H, W, e, False)["staged"], ln_tiling(k, C, H, W, e, False)["ncv"])
             for _, C, H, W, k, e in CASES}
    assert {(True, 1), (False, 1), (False, 2), (False, 3), (False, 4)} <= kinds
    assert any(dx_tiling(k, C, H, W, e)["chunks"] > 1 for _, C, H, W, k, e in CASES)
    assert any(ln_tiling(k, C, H, W, e, False)["bands"] > 1 for _, C, H, W, k, e in CASES)


def reference_dtype(C):
    """fp64 for the reference, except from hundreds of channels on, where PyTorch's fp64 depthwise
    conv on the CPU takes seconds a call: fp32 there (an index error still shows as an O(1) error)."""
    return (torch.float64, 1e-9) if C <= 256 else (torch.float32, 2e-4)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_transcription_matches_reference(case):
    N, C, H, W, K, elem = case
    x, w, b, lw, lb = inputs(N, C, H, W, K, bias=C % 2 == 0)
    y, mean, rstd = cuda_forward(x, w, b, lw, lb, 1e-6, elem)
    dt, tol = reference_dtype(C)
    x_, w_, b_, lw_, lb_ = (None if v is None else v.to(dt) for v in (x, w, b, lw, lb))
    ref = reference.dwconv_ln(x_, w_, b_, lw_, lb_, 1e-6)
    torch.testing.assert_close(y, ref.double(), rtol=tol, atol=tol)
    z = torch.nn.functional.conv2d(x_, w_, b_, padding=K // 2, groups=C).double()
    var, mu = torch.var_mean(z, dim=1, unbiased=False)
    torch.testing.assert_close(mean, mu, rtol=tol, atol=tol)
    torch.testing.assert_close(rstd, (var + 1e-6).rsqrt(), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_backward_transcription_matches_reference(case):
    N, C, H, W, K, elem = case
    bias = C % 2 == 0
    x, w, b, lw, _ = inputs(N, C, H, W, K, bias=bias, seed=1)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = torch.nn.functional.conv2d(x.float(), w.float(), None if b is None else b.float(),
                                   padding=K // 2, groups=C).double()
    var, mu = torch.var_mean(z, dim=1, unbiased=False)
    rstd = (var + 1e-6).rsqrt()
    got = cuda_backward(gy, x, w, b, lw, mu, rstd, elem)
    # The op always returns d_conv_bias (the sum of dz): with no bias, the reference's from a zero one.
    dt, tol = reference_dtype(C)
    want = reference.dwconv_ln_bwd(gy.to(dt), x.to(dt), w.to(dt),
                                   (b if bias else torch.zeros(C, dtype=x.dtype)).to(dt), lw.to(dt),
                                   mu, rstd)
    for name, g, r in zip(("dx", "d_conv_weight", "d_conv_bias", "d_ln_weight", "d_ln_bias"), got, want):
        torch.testing.assert_close(g, r.double(), rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# Every ConvNeXt width (timm's V1 and V2 variants, through xxlarge and huge) at its stage's size
# for 224 and 384 inputs, and a few more.
TIMM_C = sorted({40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 352, 384, 512, 640, 704, 768, 1024,
                 1280, 1408, 1536, 2048, 2816, 3072, 4096})


@pytest.mark.parametrize("elem", [2, 4])
@pytest.mark.parametrize("K", [3, 5, 7])
def test_tilings_fit_every_width(K, elem):
    """Both tilings, for every width at each stage size: within the thread and shared-memory
    budgets, full warps, partial buffers of bounded size; small widths staged."""
    for C in TIMM_C:
        for HW in (56, 28, 14, 7, 96, 48, 24, 12, 1, 3):
            for bwd in (False, True):
                t = ln_tiling(K, C, HW, HW, elem, bwd)
                assert t["threads"] <= MAX_THREADS and t["threads"] % WARP == 0
                assert t["r"] * t["q"] * t["G"] * t["ncv"] >= t["cv"] or t["G"] * t["ncv"] >= t["cv"]
                assert t["smem"] <= BUDGET, (C, HW, t)
                assert t["band"] % t["r"] == 0 and t["bands"] * t["band"] >= HW
            if C <= 96 and HW >= 14:
                assert ln_tiling(K, C, HW, HW, elem, False)["staged"], (C, HW)
            d = dx_tiling(K, C, HW, HW, elem)
            assert d["threads"] <= MAX_THREADS and d["threads"] % WARP == 0
            assert d["smem"] <= BUDGET and d["gc"] * d["chunks"] >= d["cv"]
            assert max(d["r"] * d["q"], K) * d["gc"] <= MAX_THREADS
