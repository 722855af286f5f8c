"""A fixed, pretrained teacher network."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from distillery.models.adapters import ClassifierAdapter
from distillery.models.hf import hf_task
from distillery.teachers.base import BaseTeacher, TeacherOutput


class FrozenTeacher(BaseTeacher):
    """Wraps a trained network: eval mode, no gradients, float32 outputs.

    Args:
        module: the teacher network. It is put in ``eval()`` mode, its parameters stop requiring
            gradients, and (unless ``keep_dtype``) it is cast to float32.
        adapter: how to call it on a batch (default: a classifier taking ``batch["x"]``).
        keep_dtype: keep the module's dtype (e.g. bf16 to save memory); outputs are still float32.

    Example:
        >>> import torch
        >>> teacher = FrozenTeacher(torch.nn.Linear(4, 3))
        >>> out = teacher({"x": torch.ones(2, 4)})
        >>> out.logits.shape, out.logits.requires_grad
        (torch.Size([2, 3]), False)
    """

    def __init__(self, module: nn.Module, adapter=None, *, keep_dtype: bool = False) -> None:
        self.module = module if keep_dtype else module.float()
        self.module.eval()
        self.module.requires_grad_(False)
        self.adapter = adapter or ClassifierAdapter()

    def __call__(self, batch: Mapping[str, Tensor], student_output=None) -> TeacherOutput:
        self.module.eval()  # in case user code flipped it
        with torch.no_grad():
            out = self.adapter.forward(self.module, batch)
        logits = None if out.logits is None else out.logits.float()
        return TeacherOutput(logits=logits, features={k: v.float() for k, v in out.features.items()})

    def to(self, device: torch.device | str) -> FrozenTeacher:
        self.module.to(device)
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, model: nn.Module, adapter=None) -> FrozenTeacher:
        """Load safetensors weights from ``path`` into ``model`` (the architecture) and freeze it."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
        model.load_state_dict(load_file(str(path)))
        return cls(model, adapter)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, task: str = "sequence-classification", **kwargs
    ) -> FrozenTeacher:
        """A Hugging Face model by hub id or local directory.

        ``task`` selects the auto class: ``"sequence-classification"``
        (``AutoModelForSequenceClassification``) or ``"causal-lm"`` (``AutoModelForCausalLM``).
        Keyword arguments go to ``from_pretrained``.
        """
        auto_cls, adapter_cls = hf_task(task)
        model = auto_cls.from_pretrained(name_or_path, **kwargs)
        return cls(model, adapter_cls())
