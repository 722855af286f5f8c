"""Independent naive implementations (float64, explicit loops) written from the papers' equations."""

from __future__ import annotations

import math


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
    Tt = T if T_teacher is None else T_teacher
    value = alpha * T * T * kl(softmax(t, Tt), softmax(s, T))
    if y is not None and y != -100:
        value += (1 - alpha) * ce_row(s, y)
    return value


def reduce(values, valid, reduction, num_valid=None):
    kept = [v for v, ok in zip(values, valid) if ok]
    if reduction == "sum":
        return sum(kept)
    if reduction == "none":
        return [v if ok else 0.0 for v, ok in zip(values, valid)]
    denom = num_valid if num_valid is not None else len(kept)
    return sum(kept) / max(denom, 1)
