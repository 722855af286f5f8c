"""Fully sharded data parallelism for the loop (``train.parallel: fsdp``), on PyTorch's ``fully_shard``.

Under several processes each one holds a 1/P shard of the student's parameters, gradients and
optimizer state, and of a frozen teacher's parameters; a layer's full weights exist only while its
forward (or backward) runs, all-gathered then freed again (``reshard_after_forward``). The units are
the transformer blocks (a Hugging Face model's ``_no_split_modules``) or, for other models, the
children of the root that hold parameters, plus the root itself.

Accelerate's FSDP plugin needs a GPU; PyTorch's ``fully_shard`` works on CPU with gloo, so the loop
calls it directly. What this module gives the loop:

- :func:`shard` -- shard a module in place, returning a :class:`Sharded` that can rebuild an ordinary
  (unsharded) module with the trained values (:meth:`Sharded.consolidate`): the exported student and
  the teacher after training are plain modules that load and run on one process;
- :func:`all_finite` -- the finiteness of local shards agreed over all processes;
- :func:`save_sharded` / :func:`load_sharded` -- the model and optimizer state written with
  ``torch.distributed.checkpoint`` (each process its own shard file), read back into the shards.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from distillery.errors import ConfigError
from distillery.fileio import HOOKS, is_finite_tree

SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint folder inside a checkpoint


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard; any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def local_numel(module: nn.Module) -> int:
    """Parameters this process holds of ``module`` (its shards under FSDP, all of them otherwise)."""
    return sum(_local(p).numel() for p in module.parameters())


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every tensor (each process's local shards) is finite on every process."""
    ok = is_finite_tree(_local(t) for t in tensors if t is not None)
    flag = torch.tensor([float(ok)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units to shard one by one (the root is sharded too, last)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    if names:
        return [m for m in model.modules() if type(m).__name__ in names and m is not model]
    children = [c for c in model.children() if any(True for _ in c.parameters())]
    seen: set[int] = set()
    for child in children:  # a weight shared by two children (tied) must stay in one unit: the root
        ids = {id(p) for p in child.parameters()}
        if ids & seen:
            return []
        seen |= ids
    return children


def _meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (no memory) and whose buffers are
    real copies (non-persistent ones, such as rotary frequencies, are in no state dict)."""
    memo: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(module, memo)


def _aliases(module: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _set_param(module: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


@dataclass
class Sharded:
    """A module sharded in place, and what is needed to rebuild it unsharded."""

    module: nn.Module
    skeleton: nn.Module
    aliases: list[list[str]]

    def consolidate(self) -> nn.Module:
        """An ordinary module with the sharded one's current values (collective: every process calls it,
        and every process gets the full module)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        plain = self.skeleton
        plain.load_state_dict(full, strict=False, assign=True)
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"the consolidated state lacks parameters {missing[:5]}")
        for names in self.aliases:  # assign=True loaded each name separately: tie them again
            first = plain.get_parameter(names[0])
            for name in names[1:]:
                _set_param(plain, name, first)
        plain.train(self.module.training)
        return plain


def shard(module: nn.Module, *, mixed_precision: str = "no", frozen: bool = False) -> Sharded:
    """Shard ``module`` over all processes with ``fully_shard`` (in place), block by block then the root.

    ``mixed_precision="bf16"`` all-gathers the parameters in bfloat16 for the forward and reduces
    gradients in float32 (FSDP's ``MixedPrecisionPolicy``). ``frozen`` (a teacher): no gradients.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision == "fp16":
        raise ConfigError(
            "train.parallel=fsdp with train.mixed_precision=fp16: fp16 needs loss scaling, which the sharded "
            "loop does not do; use bf16"
        )
    skeleton = _meta_skeleton(module)
    aliases = _aliases(module)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16" and not frozen
        else MixedPrecisionPolicy()
    )
    for block in _blocks(module):
        fully_shard(block, mp_policy=policy, reshard_after_forward=True)
    fully_shard(module, mp_policy=policy, reshard_after_forward=True)
    return Sharded(module, skeleton, aliases)


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the model's and the optimizer's sharded state to ``folder / SHARDED_DIR`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    for hook in HOOKS["after_shard"]:  # the fault suite stops a process here
        hook(Path(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what :func:`save_sharded` wrote back into the shards of ``model`` and ``optimizer``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


__all__ = ["SHARDED_DIR", "Sharded", "all_finite", "load_sharded", "local_numel", "save_sharded", "shard"]
