"""Loading a safetensors weights file a user names into a model, with errors that say what is wrong.

A config that points at a weights file (``teacher.checkpoint``) can point at the wrong thing: a
missing path, a directory, an empty or truncated file, a file in another format, or the weights of
another architecture. :func:`load_weights` checks the file's header against the model's state
before loading anything and raises one :class:`~distillery.errors.ConfigError` that names the field,
the file and the problem (for another architecture: the missing and unexpected keys and the shapes
that differ). safetensors holds tensors only: reading one never executes code.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from torch import nn

from distillery.errors import ConfigError

SHOWN = 5  # keys listed per kind of mismatch


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _aliases(model: nn.Module) -> dict[str, set[str]]:
    """Each state-dict key -> the keys sharing its storage (tied weights are saved once)."""
    groups: dict[tuple[int, int], set[str]] = {}
    state = model.state_dict()
    for key, tensor in state.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            groups.setdefault((id(tensor), 0), set()).add(key)
            continue
        groups.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), set()).add(key)
    return {key: group for group in groups.values() for key in group}


def read_header(path: str | Path, field: str) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of the safetensors file at ``path``.

    Raises:
        ConfigError: the path does not exist, is a directory, cannot be read, is empty, or is not a
            complete safetensors file.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{field} {path} does not exist; give the path of a .safetensors weights file")
    if path.is_dir():
        raise ConfigError(
            f"{field} {path} is a directory, not a safetensors file; give the path of the weights file"
        )
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except PermissionError:
        raise ConfigError(f"{field} {path} cannot be read (permission denied); fix its permissions") from None
    except OSError as exc:
        raise ConfigError(f"{field} {path} cannot be read ({exc})") from None
    if size == 0:
        raise ConfigError(f"{field} {path} is empty, not a safetensors file; write the weights again")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{field} {path} is not a safetensors file, or it is truncated or damaged ({exc}); give weights "
            "saved with safetensors (e.g. a run's student.safetensors)"
        ) from None


def load_weights(model: nn.Module, path: str | Path, field: str) -> nn.Module:
    """Load the safetensors file at ``path`` into ``model`` (in place) and return ``model``.

    Args:
        model: the architecture the weights are for.
        path: a ``.safetensors`` file.
        field: the config field that named the file (``teacher.checkpoint``), for the message.

    Raises:
        ConfigError: see :func:`read_header`; or the file holds the weights of another architecture
            (missing keys, unexpected keys, different shapes: each listed).
    """
    shapes = read_header(path, field)
    state = model.state_dict()
    aliases = _aliases(model)
    missing = sorted(k for k in state if not any(a in shapes for a in aliases.get(k, {k})))
    unexpected = sorted(k for k in shapes if k not in state)
    differ = [
        f"{k} is {list(shapes[k])} in the file but {list(state[k].shape)} in the model"
        for k in sorted(shapes)
        if k in state and tuple(state[k].shape) != shapes[k]
    ]
    if missing or unexpected or differ:
        problems = []
        if missing:
            problems.append(f"missing keys {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_listed(unexpected)}")
        if differ:
            problems.append("shape of " + "; ".join(differ[:SHOWN]) + (" ..." if len(differ) > SHOWN else ""))
        raise ConfigError(
            f"{field} {path} holds weights of another architecture than the configured one: "
            + "; ".join(problems)
            + "; set the model section to the architecture the weights were saved from"
        )
    try:
        load_model(model, str(path), strict=True)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{field} {path} is damaged: its tensors cannot be read ({exc})") from None
    return model
