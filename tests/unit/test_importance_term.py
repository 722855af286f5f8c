"""The importance_reverse_kl loss term: the student's own detached policy as the behaviour policy."""

from __future__ import annotations

import torch

from distillery.losses import build_objective
from distillery.losses.base import LossInputs
from distillery.losses.logit import ImportanceReverseKLConfig


def test_the_term_is_the_k3_estimate_at_the_targets_with_the_score_function_gradient():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=torch.float64)
    target = torch.tensor([[1, 4, -100], [0, -100, -100]])
    term = build_objective({"irkl": ImportanceReverseKLConfig()}).terms["irkl"]
    value = term(
        LossInputs(student_logits=s, teacher_logits=t, target=target, mask=torch.ones(2, 3, dtype=torch.bool))
    )
    value.backward()
    # by hand: over the labelled rows, rho * (e^-l - 1 + l), rho = p(y) / stop_grad(p(y)) (value 1)
    s2 = s.detach().clone().requires_grad_(True)
    total, n = 0.0, 0
    for b in range(2):
        for i in range(3):
            y = int(target[b, i])
            if y < 0:
                continue
            logp = torch.log_softmax(s2[b, i], -1)[y]
            ell = logp - torch.log_softmax(t[b, i], -1)[y]
            rho = torch.exp(logp - logp.detach())
            total = total + rho * (torch.exp(-ell) - 1 + ell)
            n += 1
    (total / n).backward()
    torch.testing.assert_close(value, (total / n).detach())
    torch.testing.assert_close(s.grad, s2.grad)
    assert term.rows(target, torch.ones(2, 3, dtype=torch.bool)).sum() == 3


def test_row_weights_scale_each_token():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    target = torch.tensor([[1, 4, 2], [0, 3, -100]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    term = build_objective({"irkl": ImportanceReverseKLConfig()}).terms["irkl"]
    plain = term(LossInputs(student_logits=s, teacher_logits=t, target=target, mask=mask))
    halved = term(LossInputs(student_logits=s, teacher_logits=t, target=target, mask=mask,
                             row_weight=torch.full((2,), 0.5)))  # fmt: skip
    torch.testing.assert_close(halved, 0.5 * plain)
