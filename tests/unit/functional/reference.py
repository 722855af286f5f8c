"""Independent naive implementations (float64, explicit loops) written from the papers' equations."""

from __future__ import annotations

import math
import zlib


def softmax(row, T=1.0):
    z = [x / T for x in row]
    finite = [x for x in z if x != -math.inf]
    m = max(finite)
    e = [0.0 if x == -math.inf else math.exp(x - m) for x in z]
    s = sum(e)
    return [v / s for v in e]


def kl(p, q):
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * (math.log(pi) - math.log(qi))
    return total


def forward_kl_row(s, t, T):
    return T * T * kl(softmax(t, T), softmax(s, T))


def ce_row(s, y):
    p = softmax(s)
    return -math.log(p[y])


def kd_row(s, t, y, T, alpha, T_teacher=None):
    """kd_loss's per-row value (its "none" and "sum" reductions)."""
    Tt = T if T_teacher is None else T_teacher
    value = alpha * T * T * kl(softmax(t, Tt), softmax(s, T))
    if y is not None and y != -100:
        value += (1 - alpha) * ce_row(s, y)
    return value


def kd_mean(students, teachers, targets, valid, T, alpha, T_teacher=None, num_valid=None, num_labelled=None):
    """kd_loss's "mean" (PyTorch's ignore_index convention): alpha T^2 KL summed over the valid rows
    and divided by their number, plus (1 - alpha) CE summed over the labelled valid rows and divided
    by theirs."""
    Tt = T if T_teacher is None else T_teacher
    kl_sum, ce_sum, n_valid, n_labelled = 0.0, 0.0, 0, 0
    for s, t, y, ok in zip(students, teachers, targets, valid):
        if not ok:
            continue
        n_valid += 1
        kl_sum += alpha * T * T * kl(softmax(t, Tt), softmax(s, T))
        if y is not None and y != -100:
            n_labelled += 1
            ce_sum += (1 - alpha) * ce_row(s, y)
    n_valid = n_valid if num_valid is None else num_valid
    n_labelled = n_labelled if num_labelled is None else num_labelled
    return kl_sum / max(n_valid, 1) + ce_sum / max(n_labelled, 1)


def reduce(values, valid, reduction, num_valid=None):
    kept = [v for v, ok in zip(values, valid) if ok]
    if reduction == "sum":
        return sum(kept)
    if reduction == "none":
        return [v if ok else 0.0 for v, ok in zip(values, valid)]
    denom = num_valid if num_valid is not None else len(kept)
    return sum(kept) / max(denom, 1)


def reverse_kl_row(s, t, T):
    return T * T * kl(softmax(s, T), softmax(t, T))


def jsd_row(s, t, T, beta):
    """GKD's JSD(beta); the ends follow the GKD/TRL convention (forward / reverse KL)."""
    p_t, p_s = softmax(t, T), softmax(s, T)
    if beta == 0:
        return T * T * kl(p_t, p_s)
    if beta == 1:
        return T * T * kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return T * T * (beta * kl(p_t, m) + (1 - beta) * kl(p_s, m))


def tv_row(s, t, T):
    p_t, p_s = softmax(t, T), softmax(s, T)
    total = 0.0
    for a, b in zip(p_t, p_s):
        total += abs(a - b)
    return T * T * 0.5 * total


def skew_kl_row(s, t, T, alpha):
    p_t, p_s = softmax(t, T), softmax(s, T)
    mix = [alpha * a + (1 - alpha) * b for a, b in zip(p_t, p_s)]
    return T * T * kl(p_t, mix)


def skew_reverse_kl_row(s, t, T, alpha):
    p_t, p_s = softmax(t, T), softmax(s, T)
    mix = [alpha * b + (1 - alpha) * a for a, b in zip(p_t, p_s)]
    return T * T * kl(p_s, mix)


def non_target_softmax(row, y, T):
    """Softmax over the classes k != y only (Zhao et al.'s p_hat, Yang et al.'s normalised q)."""
    others = [x / T for k, x in enumerate(row) if k != y]
    m = max(others)
    e = [math.exp(x - m) for x in others]
    s = sum(e)
    return [v / s for v in e]


def dkd_row(s, t, y, T, alpha, beta):
    """Decoupled KD (Zhao et al., CVPR 2022): T^2 * (alpha * KL(b_t || b_s) + beta * KL(p_hat_t || p_hat_s))."""
    p_t, p_s = softmax(t, T), softmax(s, T)
    rest_t = sum(p for k, p in enumerate(p_t) if k != y)
    rest_s = sum(p for k, p in enumerate(p_s) if k != y)
    tckd = kl([p_t[y], rest_t], [p_s[y], rest_s])
    nckd = kl(non_target_softmax(t, y, T), non_target_softmax(s, y, T))
    return T * T * (alpha * tckd + beta * nckd)


def nkd_row(s, t, y, T, gamma):
    """Normalized KD (Yang et al., ICCV 2023): -p_t[y] log p_s[y] - gamma T^2 sum_{k!=y} q_t log q_s."""
    p_t, p_s = softmax(t), softmax(s)
    q_t, q_s = non_target_softmax(t, y, T), non_target_softmax(s, y, T)
    non_target = 0.0
    for a, b in zip(q_t, q_s):
        if a > 0:
            non_target += a * math.log(b)
    return -p_t[y] * math.log(p_s[y]) - gamma * T * T * non_target


def divergence(p_t, p_s, name, beta=0.5):
    """forward_kl, reverse_kl or GKD's JSD(beta) ("jsd"; ends: forward / reverse KL) of probability lists."""
    if name == "forward_kl" or (name == "jsd" and beta == 0):
        return kl(p_t, p_s)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


def topk_tail_row(s, ids, logp, tail, T, name, beta=0.5):
    """T^2 D of the (k+1)-bucket coarsening: bucket j = id ids[j], bucket k = every other id. The
    teacher's buckets exp(logp) and tail are renormalised to sum to 1."""
    q = softmax(s, T)
    q_buckets = [q[i] for i in ids] + [sum(v for i, v in enumerate(q) if i not in ids)]
    p_buckets = [math.exp(x) for x in logp] + [tail]
    z = sum(p_buckets)
    return T * T * divergence([v / z for v in p_buckets], q_buckets, name, beta)


def sampled_forward_kl_row(s, ids, weights, logp, T):
    """T^2 sum_j w_j (log p_j - log q(id_j)) over the slots with nonzero weight."""
    q = softmax(s, T)
    return T * T * sum(w * (lp - math.log(q[i])) for i, w, lp in zip(ids, weights, logp) if w != 0)


# ---- shared by the tests' random cases --------------------------------------------------------------


def case_seed(*key) -> int:
    """A seed fixed per test case (``hash()`` of a string changes with every interpreter)."""
    return zlib.crc32(repr(key).encode())


def flat_rows(x) -> list:
    """``[..., C]`` as a list of float64 rows."""
    return x.reshape(-1, x.shape[-1]).double().tolist()


def random_mask(shape, g):
    """A random boolean mask with about 60% True, its first entry always True."""
    import torch

    mask = torch.rand(shape, generator=g) > 0.4
    mask.view(-1)[0] = True
    return mask
