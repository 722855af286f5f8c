"""Base class of every configuration model: unknown keys are errors, never silently ignored, and
values are never silently coerced into something else."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def _allows_bool(annotation: Any) -> bool:
    """Whether a field's type accepts ``true``/``false`` (bool itself, Any, or a union/container
    that holds one of them at the top level)."""
    if annotation is bool or annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _allows_bool(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return any(_allows_bool(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    return False


def _item_type(annotation: Any) -> Any | None:
    """The element type of a list/tuple field (``list[int]`` -> ``int``), else None."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _item_type(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        for a in typing.get_args(annotation):
            if (item := _item_type(a)) is not None:
                return item
        return None
    if origin in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return args[0] if args else Any
    return None


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys, non-finite numbers (``.inf``, ``.nan``) in every
    float field, and ``true``/``false`` given where a number is expected (pydantic would read them as
    1 and 0); it validates defaults and assignments."""

    model_config = ConfigDict(
        extra="forbid", validate_default=True, validate_assignment=True, allow_inf_nan=False
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None:
                continue
            annotation = field.annotation
            if isinstance(value, bool) and not _allows_bool(annotation):
                raise ValueError(
                    f"{name}: expected {_type_name(annotation)}, got the boolean {str(value).lower()}"
                )
            if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
                item = _item_type(annotation)
                if item is not None and not _allows_bool(item):
                    raise ValueError(
                        f"{name}: expected a list of {_type_name(item)}, got a boolean in {list(value)!r}"
                    )
        return data


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    return name if isinstance(name, str) and typing.get_origin(annotation) is None else str(annotation)
