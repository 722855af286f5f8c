"""Probes of frozen representations: a linear classifier and DINO's weighted k-nearest neighbours.

Both take embeddings ``[N, D]`` and labels ``[N]`` of a training set and of a test set, and return the
test accuracy as a fraction in [0, 1]. They are pure: tensors in, a number out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def linear_probe(
    train_emb: Tensor,
    train_labels: Tensor,
    test_emb: Tensor,
    test_labels: Tensor,
    seed: int = 0,
    max_iter: int = 2000,
    C: float = 1.0,
) -> float:
    """Test accuracy (a fraction in [0, 1]) of a logistic regression trained on frozen embeddings.

    Features are standardised with the training set's mean and standard deviation
    (``StandardScaler``), then scikit-learn's ``LogisticRegression`` (L-BFGS, multinomial over all
    classes, L2 penalty ``C``) is fitted; ``max_iter`` is enough for 45 classes on standardised
    features.

    Args:
        train_emb: ``[N, H]`` training embeddings.
        train_labels: ``[N]`` integer (or string) class labels.
        test_emb: ``[M, H]`` test embeddings.
        test_labels: ``[M]`` their labels.
        seed: the classifier's ``random_state``.
        max_iter: L-BFGS iterations at most.
        C: inverse regularisation strength.

    Example:
        >>> x = torch.cat([torch.randn(40, 4) - 3, torch.randn(40, 4) + 3])
        >>> y = torch.tensor([0] * 40 + [1] * 40)
        >>> linear_probe(x[::2], y[::2], x[1::2], y[1::2])
        1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels_train = (
        train_labels.cpu().numpy() if isinstance(train_labels, Tensor) else np.asarray(train_labels)
    )
    labels_test = test_labels.cpu().numpy() if isinstance(test_labels, Tensor) else np.asarray(test_labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=C, random_state=seed))
    probe.fit(_numpy(train_emb), labels_train)
    return float((probe.predict(_numpy(test_emb)) == labels_test).mean())


def knn_accuracy(
    train_emb: Tensor,
    train_labels: Tensor,
    test_emb: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    r"""Test accuracy of the weighted k-NN classifier on L2-normalised embeddings (DINO's protocol).

    For a test embedding :math:`z`, the k training embeddings of largest cosine similarity
    :math:`s_i` vote for their labels with weights :math:`\exp(s_i / T)`; the class of largest total
    weight wins. From "Emerging Properties in Self-Supervised Vision Transformers" (Caron et al., 2021),
    after "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (Wu et al., 2018):
    k = 20, T = 0.07. Ties go to the smaller class index.

    Args:
        train_emb: ``[N, D]`` training embeddings.
        train_labels: ``[N]`` integer labels.
        test_emb: ``[M, D]`` test embeddings.
        test_labels: ``[M]`` integer labels.
        k: neighbours (at most N are used).
        temperature: :math:`T`.
        num_classes: number of classes (default: the largest label + 1).
        chunk: test rows per similarity block (memory).

    Example:
        >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> knn_accuracy(train, torch.tensor([0, 0, 1]), torch.tensor([[0.1, 1.0]]), torch.tensor([1]), k=1)
        1.0
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    train = F.normalize(train_emb.detach().float(), dim=-1)
    test = F.normalize(test_emb.detach().float(), dim=-1)
    y_train, y_test = train_labels.long().cpu(), test_labels.long().cpu()
    c = int(num_classes or max(int(y_train.max()), int(y_test.max())) + 1)
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk):
        sims = test[start : start + chunk] @ train.T  # [m, N]
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], c).scatter_add_(1, y_train[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == y_test[start : start + chunk]).sum())
    return correct / max(1, test.shape[0])


def embedding_spread(embeddings: Tensor) -> float:
    """The mean over dimensions of the standard deviation of the L2-normalised ``embeddings`` across
    images: near 0 when every image maps to one point (SimSiam's collapse sign).

    Example:
        >>> embedding_spread(torch.ones(4, 3))  # every image at one point
        0.0
    """
    return float(F.normalize(embeddings, dim=-1).std(0).mean())


__all__ = ["embedding_spread", "knn_accuracy", "linear_probe"]
