"""Pure tensor -> tensor maths of distillation: no state, no configuration, no I/O.

Conventions shared by every logit function are documented in :mod:`distillery.functional._rows`.
"""

from distillery.functional.classification import cross_entropy
from distillery.functional.divergences import forward_kl
from distillery.functional.ensemble import mean_probability_logits
from distillery.functional.kd import kd_loss

__all__ = ["cross_entropy", "forward_kl", "kd_loss", "mean_probability_logits"]
