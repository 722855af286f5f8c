"""A fixed, pretrained teacher network."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from distillery.errors import ConfigError
from distillery.models.adapters import ClassifierAdapter
from distillery.models.hf import hf_task
from distillery.models.hub import from_pretrained
from distillery.models.placement import is_placed
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

    fsdp = "shard"  # see BaseTeacher

    def __init__(self, module: nn.Module, adapter=None, *, keep_dtype: bool = False) -> None:
        self.module = module if keep_dtype or is_placed(module) else module.float()
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
        if not is_placed(self.module):  # offloaded or device_map: its placement is its own
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

        A teacher must be trained: a checkpoint that lacks weights its task needs (a sentence encoder
        saved without a classification head, which ``from_pretrained`` would complete with a random
        head) is refused, naming the architectures its config lists and the auto class that loads it.

        Raises:
            ConfigError: the source does not load, or loading it initialised weights at random.
        """
        auto_cls, adapter_cls = hf_task(task)
        kwargs.pop("output_loading_info", None)
        model, info = from_pretrained(
            auto_cls.from_pretrained,
            name_or_path,
            "FrozenTeacher.from_pretrained",
            output_loading_info=True,
            **kwargs,
        )
        new = sorted(
            set(info.get("missing_keys") or ())
            | {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()}
        )
        if new:
            raise ConfigError(untrained_weights_message(name_or_path, task, auto_cls.__name__, model, new))
        return cls(model, adapter_cls())


# architecture name suffix -> (auto class, what it is, the FrozenTeacher task that loads it or None)
_HEADS = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "a sequence classifier", "sequence-classification"),
    ("ForCausalLM", "AutoModelForCausalLM", "a causal LM", "causal-lm"),
    ("LMHeadModel", "AutoModelForCausalLM", "a causal LM", "causal-lm"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "a masked LM", None),
    ("ForTokenClassification", "AutoModelForTokenClassification", "a token classifier", None),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "an extractive QA model", None),
    ("ForImageClassification", "AutoModelForImageClassification", "an image classifier", None),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM", "a generation model with its own head", None),
    ("ForPreTraining", "AutoModelForPreTraining", "a pretraining model (its pretraining heads)", None),
    ("Model", "AutoModel", "a base model without a task head", None),
)  # fmt: skip


def _loads_with(architecture: str) -> str:
    for suffix, auto, what, task in _HEADS:
        if architecture.endswith(suffix):
            how = (
                f'FrozenTeacher.from_pretrained(..., task="{task}")'
                if task
                else f"{auto} (not a FrozenTeacher task)"
            )
            return f"{architecture}: {what}, loaded by {how}"
    return f"{architecture}: loaded by the auto class of that head"


def untrained_weights_message(
    source: str, task: str, auto_name: str, model: nn.Module, new: list[str]
) -> str:
    """Why a pretrained checkpoint cannot be a teacher for ``task``: the weights ``from_pretrained``
    initialised at random (``new``), the architectures the checkpoint's config lists, and what loads them."""
    config = getattr(model, "config", None)
    architectures = list(getattr(config, "architectures", None) or [])
    shown = ", ".join(new[:6]) + (f" and {len(new) - 6} more" if len(new) > 6 else "")
    found = (
        "; ".join(_loads_with(a) for a in architectures)
        if architectures
        else "none listed in its config.json"
    )
    return (
        f"FrozenTeacher.from_pretrained({source!r}, task={task!r}): the checkpoint lacks weights that "
        f"{auto_name} needs, so loading it would initialise {shown} at random; a teacher must be trained. "
        f"Architectures in the checkpoint: {found}. Load a checkpoint trained for {task} (its config's "
        f"architectures end in {'ForSequenceClassification' if task == 'sequence-classification' else 'ForCausalLM'}), "
        "or fine-tune this one first (e.g. as the student of a distillery run, model: {pretrained: <dir>, "
        "new_head: true})"
    )
