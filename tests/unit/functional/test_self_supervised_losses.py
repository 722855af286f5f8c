"""DINO, iBOT, the centre update, data2vec, BYOL and KoLeo against naive float64 loops.

The references at the end of this file are written from the papers' equations (and the official
codes' normalisations, as the docstrings say) with Python lists, loops and the math module only.
Then: the same-view pairs are excluded, masks, gradients (gradcheck), the distributed centre, and
the errors.
"""

import math
import zlib

import pytest
import torch

from distillery.functional import (
    byol_loss,
    data2vec_loss,
    data2vec_targets,
    dino_loss,
    dino_target_entropies,
    ibot_patch_loss,
    koleo_loss,
    update_center,
)


def _g(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------------------------
# Against the loops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "v_s,v_t,b,k", [(2, 2, 1, 3), (3, 2, 4, 5), (6, 2, 3, 8), (4, 1, 2, 4), (5, 3, 2, 6)]
)
@pytest.mark.parametrize("temps", [(0.1, 0.04), (1.0, 1.0), (0.5, 0.2)])
def test_dino_matches_the_loops(v_s, v_t, b, k, temps):
    g = _g("dino", v_s, v_t, b, k, temps)
    s, t, c = _randn(g, v_s, b, k, scale=2), _randn(g, v_t, b, k, scale=2), _randn(g, k, scale=0.3)
    got = dino_loss(s, t, c, student_temperature=temps[0], teacher_temperature=temps[1])
    want = naive_dino(s.tolist(), t.tolist(), c.tolist(), *temps)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("v,b,p,k", [(1, 1, 2, 2), (2, 3, 4, 5), (2, 2, 9, 3), (1, 4, 1, 6)])
def test_ibot_patch_loss_matches_the_loops(v, b, p, k):
    g = _g("ibot", v, b, p, k)
    s, t, c = _randn(g, v, b, p, k, scale=2), _randn(g, v, b, p, k, scale=2), _randn(g, k, scale=0.3)
    mask = torch.rand(v, b, p, generator=g) > 0.4
    mask[0, 0] = False  # an image with no masked patch adds 0 (and still counts in the mean)
    got = ibot_patch_loss(s, t, mask, c, student_temperature=0.1, teacher_temperature=0.07)
    want = naive_ibot(s.tolist(), t.tolist(), mask.tolist(), c.tolist(), 0.1, 0.07)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3), (2, 3, 4, 6)])
@pytest.mark.parametrize("momentum", [0.0, 0.9, 1.0])
def test_the_centre_update_matches_the_hand_computation(shape, momentum):
    g = _g("centre", shape, momentum)
    c, t = _randn(g, shape[-1]), _randn(g, *shape)
    rows = t.reshape(-1, shape[-1]).tolist()
    mean = [sum(r[d] for r in rows) / len(rows) for d in range(shape[-1])]
    want = [momentum * ci + (1 - momentum) * mi for ci, mi in zip(c.tolist(), mean)]
    got = update_center(c, t, momentum=momentum)
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert not got.requires_grad


def test_two_processes_give_the_centre_of_the_whole_batch():
    """Each process holds half the batch (unequal halves); all_reduce sums over them."""
    g = _g("centre-ddp")
    c, whole = _randn(g, 5), _randn(g, 7, 5)
    parts = [whole[:3], whole[3:]]
    # simulate the all-reduce: every process's (sum, count) summed over processes
    sums = [p.sum(0) for p in parts]
    counts = [torch.tensor(float(len(p)), dtype=torch.float64) for p in parts]

    def all_reduce(x):
        return sum(sums) if x.dim() == 1 else sum(counts)

    local = [update_center(c, p, momentum=0.9, all_reduce=all_reduce) for p in parts]
    single = update_center(c, whole, momentum=0.9)
    for got in local:
        torch.testing.assert_close(got, single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layers,b,t,d", [(1, 1, 3, 2), (4, 2, 5, 3), (6, 3, 4, 8)])
@pytest.mark.parametrize("top_k", [1, 2, "all"])
@pytest.mark.parametrize("norms", [(True, False), (False, True), (True, True), (False, False)])
def test_data2vec_targets_match_the_loops(layers, b, t, d, top_k, norms):
    g = _g("d2v-targets", layers, b, t, d, top_k, norms)
    outs = [_randn(g, b, t, d, scale=1 + i) + i for i in range(layers)]
    k = layers if top_k == "all" else min(top_k, layers)
    got = data2vec_targets(outs, k, instance_norm=norms[0], layer_norm_target=norms[1])
    want = naive_data2vec_targets([o.tolist() for o in outs], k, *norms)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("b,t,d", [(1, 2, 1), (2, 5, 3), (3, 4, 8)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_data2vec_loss_matches_the_loops(b, t, d, beta, scale):
    g = _g("d2v-loss", b, t, d, beta, scale)
    f, y = _randn(g, b, t, d, scale=3), _randn(g, b, t, d)
    mask = torch.rand(b, t, generator=g) > 0.5
    mask[0, 0] = True
    got = data2vec_loss(f, y, mask, beta=beta, scale=scale)
    want = naive_data2vec_loss(f.tolist(), y.tolist(), mask.tolist(), beta, scale)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("b,d", [(1, 2), (4, 3), (9, 16)])
def test_byol_matches_the_loops(b, d):
    g = _g("byol", b, d)
    q, z = _randn(g, b, d), _randn(g, b, d, scale=4)
    assert byol_loss(q, z).item() == pytest.approx(naive_byol(q.tolist(), z.tolist()), rel=1e-10)


@pytest.mark.parametrize("b,d", [(2, 2), (5, 3), (12, 8)])
def test_koleo_matches_the_loops(b, d):
    g = _g("koleo", b, d)
    x = _randn(g, b, d, scale=2)
    assert koleo_loss(x).item() == pytest.approx(naive_koleo(x.tolist()), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# What the methods rely on
# ---------------------------------------------------------------------------------------------


def test_dino_skips_same_view_pairs():
    """The loss is the mean over cross-view pairs, computed here one pair at a time; counting the
    same-view pairs too would give another value."""
    g = _g("same-view")
    s, t = _randn(g, 4, 3, 5), _randn(g, 2, 3, 5)
    base = dino_loss(s, t, torch.zeros(5, dtype=torch.float64))
    cross = [_pair_ce(s[j], t[i]) for i in range(2) for j in range(4) if i != j]
    assert len(cross) == 6
    assert base.item() == pytest.approx(sum(cross) / len(cross), rel=1e-12)
    with_same = (sum(cross) + _pair_ce(s[0], t[0]) + _pair_ce(s[1], t[1])) / 8
    assert base.item() != pytest.approx(with_same, rel=1e-6)
    # a student whose global view 0 equals teacher view 0 (its own target) gains nothing from it
    s2 = s.clone()
    s2[0] = t[0]
    changed = dino_loss(s2, t, torch.zeros(5, dtype=torch.float64))
    only_cross = [_pair_ce(s2[j], t[i]) for i in range(2) for j in range(4) if i != j]
    assert changed.item() == pytest.approx(sum(only_cross) / 6, rel=1e-12)


def _pair_ce(s, t, ts=0.1, tt=0.04):
    p = torch.softmax(t / tt, -1)
    return -(p * torch.log_softmax(s / ts, -1)).sum(-1).mean().item()


def test_centring_and_sharpening_change_the_target():
    t = torch.tensor([[[3.0, 0.0, 0.0]], [[3.0, 0.0, 0.0]]])
    s = torch.zeros(3, 1, 3)
    plain = dino_loss(s, t, torch.zeros(3), teacher_temperature=1.0)
    # uniform student: the cross-entropy is log 3 whatever the target; use a non-uniform student
    s = torch.tensor([[[0.0, 1.0, 0.0]]] * 3)
    a = dino_loss(s, t, torch.zeros(3), teacher_temperature=1.0)
    b = dino_loss(s, t, torch.tensor([3.0, 0.0, 0.0]), teacher_temperature=1.0)  # centred: uniform target
    assert plain.item() == pytest.approx(math.log(3), rel=1e-6)
    assert b.item() == pytest.approx(
        -torch.log_softmax(s[0, 0] / 0.1, -1).mean().item(), rel=1e-6
    )  # the target became uniform
    assert a.item() != pytest.approx(b.item())


def test_ibot_unmasked_patches_change_nothing():
    g = _g("ibot-mask")
    s, t = torch.randn(2, 3, 6, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    mask = torch.rand(2, 3, 6, generator=g) > 0.5
    base = ibot_patch_loss(s, t, mask, torch.zeros(4))
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 100.0
    t2[~mask] = -100.0
    assert ibot_patch_loss(s2, t2, mask, torch.zeros(4)).item() == pytest.approx(base.item(), rel=1e-6)


def test_data2vec_unmasked_positions_change_nothing_and_no_mask_is_zero():
    g = _g("d2v-mask")
    f, y = torch.randn(2, 5, 3, generator=g, requires_grad=True), torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[True, False, True, False, False], [False, False, False, True, False]])
    base = data2vec_loss(f, y, mask)
    f2 = f.detach().clone()
    f2[~mask] = 1e3
    assert data2vec_loss(f2, y, mask).item() == pytest.approx(base.item(), rel=1e-6)
    none = data2vec_loss(f, y, torch.zeros(2, 5, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and f.grad is not None and torch.all(f.grad == 0)


def test_byol_is_scale_invariant_and_bounded():
    g = _g("byol-inv")
    q, z = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    v = byol_loss(q, z)
    assert byol_loss(3 * q, 0.2 * z).item() == pytest.approx(v.item(), rel=1e-5)
    assert byol_loss(q, q).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(q, -q).item() == pytest.approx(4.0, rel=1e-6)


def test_koleo_rewards_spread():
    tight = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.98, 0.02]])
    spread = torch.tensor([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    assert koleo_loss(spread) < koleo_loss(tight)


@pytest.mark.parametrize("name", ["dino", "ibot", "data2vec", "byol", "koleo"])
def test_gradcheck(name):
    g = _g("grad", name)
    if name == "dino":
        t, c = _randn(g, 2, 3, 4), _randn(g, 4, scale=0.1)
        s = _randn(g, 3, 3, 4).requires_grad_()
        assert torch.autograd.gradcheck(lambda a: dino_loss(a, t, c, student_temperature=0.5), (s,))
    elif name == "ibot":
        t, c = _randn(g, 2, 2, 3, 4), _randn(g, 4, scale=0.1)
        mask = torch.tensor([[[True, False, True], [False, True, True]], [[True, True, False], [False] * 3]])
        s = _randn(g, 2, 2, 3, 4).requires_grad_()
        assert torch.autograd.gradcheck(lambda a: ibot_patch_loss(a, t, mask, c), (s,))
    elif name == "data2vec":
        y = _randn(g, 2, 3, 4)
        mask = torch.tensor([[True, False, True], [False, True, True]])
        f = _randn(g, 2, 3, 4, scale=3).requires_grad_()
        for beta in (0.0, 2.0):
            assert torch.autograd.gradcheck(lambda a, beta=beta: data2vec_loss(a, y, mask, beta=beta), (f,))
    elif name == "byol":
        q, z = _randn(g, 4, 3).requires_grad_(), _randn(g, 4, 3).requires_grad_()
        assert torch.autograd.gradcheck(byol_loss, (q, z))
    else:
        x = _randn(g, 5, 3).requires_grad_()
        assert torch.autograd.gradcheck(koleo_loss, (x,))


def test_float32_inputs_compute_in_float32():
    s, t = torch.randn(3, 2, 4), torch.randn(2, 2, 4)
    assert dino_loss(s, t, torch.zeros(4)).dtype == torch.float32
    assert dino_loss(s.half(), t.half(), torch.zeros(4)).dtype == torch.float32


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: dino_loss(torch.randn(3, 2, 4), torch.randn(2, 2, 4), torch.zeros(4), teacher_temperature=0.0),
         "teacher_temperature must be > 0"),
        (lambda: dino_loss(torch.randn(1, 2, 4), torch.randn(2, 2, 4), torch.zeros(4)), "first views"),
        (lambda: dino_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.zeros(4)), "at least 2 views"),
        (lambda: dino_loss(torch.randn(6, 4), torch.randn(2, 4), torch.zeros(4)), r"\[V, B, K\]"),
        (lambda: ibot_patch_loss(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.ones(1, 2, 4).bool(),
                                 torch.zeros(4)), "mask"),
        (lambda: update_center(torch.zeros(2), torch.randn(3, 2), momentum=1.5), r"in \[0, 1\]"),
        (lambda: data2vec_targets([torch.randn(1, 2, 3)], top_k=2), "top_k"),
        (lambda: data2vec_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.ones(1, 2).bool(), beta=-1),
         "beta"),
        (lambda: byol_loss(torch.randn(2, 3), torch.randn(2, 4)), r"\[B, D\]"),
        (lambda: koleo_loss(torch.randn(1, 3)), "B >= 2"),
    ],
)  # fmt: skip
def test_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# Naive references: lists, loops, math
# ---------------------------------------------------------------------------------------------


def _softmax(row, T):
    m = max(x / T for x in row)
    e = [math.exp(x / T - m) for x in row]
    z = sum(e)
    return [v / z for v in e]


def _log_softmax(row, T):
    m = max(x / T for x in row)
    lse = m + math.log(sum(math.exp(x / T - m) for x in row))
    return [x / T - lse for x in row]


def naive_dino(s, t, c, ts, tt):
    total, pairs = 0.0, 0
    for i in range(len(t)):
        for j in range(len(s)):
            if i == j:
                continue
            value = 0.0
            for b in range(len(s[j])):
                p = _softmax([x - ci for x, ci in zip(t[i][b], c)], tt)
                q = _log_softmax(s[j][b], ts)
                value += -sum(pk * qk for pk, qk in zip(p, q))
            total += value / len(s[j])
            pairs += 1
    return total / pairs


def naive_ibot(s, t, mask, c, ts, tt):
    total = 0.0
    for v in range(len(s)):
        per_view = 0.0
        for b in range(len(s[v])):
            num, den = 0.0, 0
            for p in range(len(s[v][b])):
                if not mask[v][b][p]:
                    continue
                pt = _softmax([x - ci for x, ci in zip(t[v][b][p], c)], tt)
                qs = _log_softmax(s[v][b][p], ts)
                num += -sum(a * q for a, q in zip(pt, qs))
                den += 1
            per_view += num / max(den, 1)
        total += per_view / len(s[v])
    return total / len(s)


def _instance_norm(x, eps=1e-5):  # x: [T][D] of one sample; normalise each channel over T
    t_len, d_len = len(x), len(x[0])
    out = [[0.0] * d_len for _ in range(t_len)]
    for d in range(d_len):
        col = [x[t][d] for t in range(t_len)]
        mu = sum(col) / t_len
        var = sum((v - mu) ** 2 for v in col) / t_len
        for t in range(t_len):
            out[t][d] = (x[t][d] - mu) / math.sqrt(var + eps)
    return out


def _layer_norm(row, eps=1e-5):
    mu = sum(row) / len(row)
    var = sum((v - mu) ** 2 for v in row) / len(row)
    return [(v - mu) / math.sqrt(var + eps) for v in row]


def naive_data2vec_targets(layers, k, instance_norm, layer_norm_target):
    chosen = layers[-k:]
    b_len, t_len, d_len = len(chosen[0]), len(chosen[0][0]), len(chosen[0][0][0])
    out = []
    for b in range(b_len):
        acc = [[0.0] * d_len for _ in range(t_len)]
        for layer in chosen:
            x = _instance_norm(layer[b]) if instance_norm else layer[b]
            for t in range(t_len):
                for d in range(d_len):
                    acc[t][d] += x[t][d] / k
        if layer_norm_target:
            acc = [_layer_norm(row) for row in acc]
        out.append(acc)
    return out


def naive_data2vec_loss(f, y, mask, beta, scale):
    s = 1 / math.sqrt(len(f[0][0])) if scale is None else scale
    total, n = 0.0, 0
    for b in range(len(f)):
        for t in range(len(f[b])):
            if not mask[b][t]:
                continue
            value = 0.0
            for fd, yd in zip(f[b][t], y[b][t]):
                z = abs(fd - yd)
                if beta == 0:
                    value += z * z
                else:
                    value += 0.5 * z * z / beta if z < beta else z - 0.5 * beta
            total += s * value
            n += 1
    return total / n


def naive_byol(q, z):
    total = 0.0
    for qb, zb in zip(q, z):
        nq, nz = math.sqrt(sum(v * v for v in qb)), math.sqrt(sum(v * v for v in zb))
        total += sum((a / nq - c / nz) ** 2 for a, c in zip(qb, zb))
    return total / len(q)


def naive_koleo(x, eps=1e-8):
    xs = []
    for row in x:
        n = max(math.sqrt(sum(v * v for v in row)), eps)
        xs.append([v / n for v in row])
    total = 0.0
    for i, a in enumerate(xs):
        best, best_dot = None, -math.inf
        for j, b in enumerate(xs):
            if i != j and sum(p * q for p, q in zip(a, b)) > best_dot:
                best, best_dot = j, sum(p * q for p, q in zip(a, b))
        rho = math.sqrt(sum((p - q + eps) ** 2 for p, q in zip(a, xs[best])))
        total += -math.log(rho + eps)
    return total / len(xs)


@pytest.mark.parametrize("n,k", [(1, 2), (5, 3), (12, 8)])
@pytest.mark.parametrize("temperature", [0.04, 1.0])
def test_target_entropies_match_the_loops(n, k, temperature):
    g = _g("entropies", n, k, temperature)
    t, c = _randn(g, n, k, scale=0.2), _randn(g, k, scale=0.1)
    got = dino_target_entropies(t, c, temperature)
    rows = [_softmax([x - ci for x, ci in zip(row, c.tolist())], temperature) for row in t.tolist()]

    def h(p):
        return -sum(q * math.log(q) for q in p if q > 0)

    mean = [sum(r[j] for r in rows) / n for j in range(k)]
    want = (sum(h(r) for r in rows) / n / math.log(k), h(mean) / math.log(k))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got[1] >= got[0] - 1e-12  # the mean target is never less spread than one image's


def test_target_entropies_over_two_processes_are_those_of_the_whole_batch():
    g = _g("entropies-ddp")
    t, c = _randn(g, 7, 5), _randn(g, 5, scale=0.1)
    parts = [t[:3], t[3:]]

    def stats(x):  # what each process contributes before the all-reduce
        p = ((x - c) / 0.5).softmax(-1)
        return torch.cat([-(p * p.log()).sum(-1).sum()[None], p.sum(0), p.new_tensor([len(x)])])

    total = sum(stats(p) for p in parts)
    for part in parts:
        got = dino_target_entropies(part, c, 0.5, all_reduce=lambda x: total)
        assert got == pytest.approx(dino_target_entropies(t, c, 0.5), rel=1e-12)
