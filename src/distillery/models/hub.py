"""Pretrained Hugging Face models from a local directory or a hub id, with errors a user can act on.

A source that exists on disk, or looks like a path (absolute, ``./``, ``../``, ``~``, a trailing
``/``, more than one ``/``, or ``a/b`` where ``a`` is a local folder), is a *local directory*: it must
be a folder holding ``config.json`` (valid JSON) and, for a model, its weights
(:data:`WEIGHT_FILES`); anything else is a :class:`~distillery.errors.ConfigError` that names the
config field, the directory and what is missing or damaged. Any other source is a *hub id*, loaded
by ``from_pretrained`` as usual (the hub cache, then the network); a failure there (offline, no such
repository) is a ConfigError that says so, instead of a traceback from the hub client.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from distillery.errors import ConfigError
from distillery.fileio import first_line, is_local_source

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# What transformers raises for a damaged or incomplete directory, or an unreachable hub.
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def check_model_dir(source: str, field: str, weights: bool = True) -> Path:
    """``source`` as a local model directory: a folder with a readable ``config.json`` (and weights).

    Raises:
        ConfigError: naming ``field``, the directory and what is missing or unreadable.
    """
    path = Path(source).expanduser()
    hint = "give a directory saved with save_pretrained, or a hub id"
    if not path.exists():
        raise ConfigError(
            f"{field}={source}: no model config found there: the directory does not exist; {hint}"
        )
    if not path.is_dir():
        raise ConfigError(f"{field}={source} is a file, not a directory saved with save_pretrained; {hint}")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"{field}={source}: no model config found there: the directory holds no config.json, so it is not "
            f"a model saved with save_pretrained; {hint}"
        )
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except PermissionError:
        raise ConfigError(f"{field}={source}: {config} cannot be read (permission denied)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{field}={source}: {config} is not valid JSON ({first_line(exc)}); the directory is damaged: save "
            "the model again with save_pretrained"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{field}={source}: {config} holds a {type(data).__name__}, not a model config")
    if weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(
            f"{field}={source}: the directory holds a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
            "save the model again with save_pretrained"
        )
    return path


def from_pretrained(
    loader: Callable[..., Any], source: str, field: str, what: str = "model", **kwargs: Any
) -> Any:
    """``loader(source, **kwargs)`` (a ``from_pretrained``), with user errors for bad sources.

    Args:
        loader: e.g. ``AutoModelForCausalLM.from_pretrained`` or ``AutoConfig.from_pretrained``.
        source: a local directory or a hub id.
        field: the config field that named ``source``, for the message (``teacher.model.pretrained``).
        what: ``"model"`` (config and weights needed) or ``"config"`` (config.json only).

    Raises:
        ConfigError: the directory is missing, incomplete or damaged, or the hub id cannot be loaded.
    """
    local = is_local_source(source)
    if local:
        path = check_model_dir(source, field, weights=what == "model")
        source = str(path)
    try:
        return loader(source, **kwargs)
    except LOAD_ERRORS as exc:
        if local:
            raise ConfigError(
                f"{field}={source}: cannot load the {what} saved there ({first_line(exc)}); the files are damaged "
                "or incomplete: save the model again with save_pretrained"
            ) from None
        raise ConfigError(
            f"{field}={source!r} is not a local directory, and loading it from the Hugging Face hub failed "
            f"({first_line(exc)}); check the id and the network connection (offline, only models already in "
            "the hub cache load), or give a directory saved with save_pretrained"
        ) from None
