"""Verifiers: is a generated response right? For task accuracy and PACED's pass rates on user data.

A verifier scores ``(prompt, response, reference) -> float`` in ``[0, 1]`` (a bool counts as 0 or 1).
The ``response`` is what the model generated, decoded up to its first ``<eos>`` without special
tokens; the ``reference`` is a field of the data (by default the completion, or the last assistant
message of a chat). Three kinds, named in the config by ``name``:

- ``exact_match``: the response equals the reference, both stripped of surrounding whitespace
  (``ignore_case`` compares them case-folded).
- ``regex``: the answer is extracted from the response by a regular expression (``re.search``; its
  first group if it has groups, else the whole match) and compared, stripped, to the reference; the
  reference goes through the same expression first when it matches (``reference_pattern``), so a
  completion ``"... the answer is 42."`` can be its own reference. No match in the response: 0.
- ``function``: a user function named by a dotted path, ``package.module:function`` or
  ``package.module.function``, called as ``function(prompt, response, reference)`` and returning a
  bool or a number in ``[0, 1]``. The module is imported from ``sys.path``, and from the working
  directory if it is not found there. A path that does not import is a ConfigError naming it.

Every example is scored against its own reference (a prompt given twice with two references is two
problems).

A string is a shorthand: ``verifier: exact_match``, or ``verifier: "mypkg.checks:is_right"`` (a path).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from distillery.configbase import StrictModel
from distillery.errors import ConfigError

Score = Callable[[str, str, str], float]


class ExactMatchVerifier(StrictModel):
    """The response equals the reference (both stripped of surrounding whitespace)."""

    name: Literal["exact_match"] = "exact_match"
    field: str | None = Field(
        None, description="the reference field of the data (null: the completion / last assistant message)"
    )
    ignore_case: bool = Field(False, description="compare case-folded")


class RegexVerifier(StrictModel):
    """The answer a regular expression extracts from the response equals the reference."""

    name: Literal["regex"] = "regex"
    pattern: str = Field(description="re.search pattern; its first group (if any) is the answer")
    field: str | None = Field(
        None, description="the reference field of the data (null: the completion / last assistant message)"
    )
    reference_pattern: bool = Field(
        True, description="extract the reference's answer with the same pattern when it matches"
    )
    ignore_case: bool = Field(False, description="match and compare case-insensitively")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return pattern


class FunctionVerifier(StrictModel):
    """A user function ``(prompt, response, reference) -> bool | float`` named by a dotted path."""

    name: Literal["function"] = "function"
    function: str = Field(
        pattern=r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$",
        description="package.module:function or package.module.function",
    )
    field: str | None = Field(
        None, description="the reference field of the data (null: the completion / last assistant message)"
    )


VerifierConfig = Annotated[ExactMatchVerifier | RegexVerifier | FunctionVerifier, Field(discriminator="name")]
VERIFIERS = ("exact_match", "function", "regex")


def verifier_shorthand(value: Any) -> Any:
    """``"exact_match"`` -> ``{name: exact_match}``; ``"pkg.mod:fn"`` -> ``{name: function, function: ...}``.

    Example:
        >>> verifier_shorthand("exact_match"), verifier_shorthand("checks:right")
        ({'name': 'exact_match'}, {'name': 'function', 'function': 'checks:right'})
    """
    if not isinstance(value, str):
        return value
    if value in ("exact_match", "regex"):
        if value == "regex":
            raise ValueError("a regex verifier needs a pattern: {name: regex, pattern: '...'}")
        return {"name": value}
    if ":" in value or "." in value:
        return {"name": "function", "function": value}
    raise ValueError(
        f"unknown verifier {value!r}; valid: {', '.join(VERIFIERS)} (a function is named by a dotted path, "
        "package.module:function)"
    )


def import_function(path: str, field: str) -> Callable[..., Any]:
    """The object a dotted path names: ``pkg.mod:attr`` or ``pkg.mod.attr``.

    Raises:
        ConfigError: the module does not import, has no such attribute, or it is not callable.

    Example:
        >>> import_function("os.path:join", "verifier")("a", "b")
        'a/b'
    """
    if ":" in path:
        module_name, attr = path.split(":", 1)
    elif "." in path:
        module_name, attr = path.rsplit(".", 1)
    else:
        raise ConfigError(f"{field}={path!r} is not a dotted path; write package.module:function")
    module = _import_module(module_name, path, field)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(
                f"{field}={path!r}: the module {module_name!r} has no attribute {part!r}; check the function name"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{field}={path!r} is a {type(fn).__name__}, not a function")
    return fn


def _import_module(name: str, path: str, field: str) -> Any:
    """``importlib.import_module(name)``, retried with the working directory on ``sys.path`` (which
    ``distillery run``, a console script, does not search; a module found there stays importable)."""
    cwd = os.getcwd()
    attempts = [False] if cwd in sys.path else [False, True]
    missing = name
    for with_cwd in attempts:
        if with_cwd:
            sys.path.insert(0, cwd)
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name or name
            if with_cwd:
                sys.path.remove(cwd)
            if not (name == missing or name.startswith(f"{missing}.")):
                break  # the module was found but imports something missing: no point in retrying
        except Exception as exc:  # the user's module raised while importing
            raise ConfigError(
                f"{field}={path!r} does not import: importing {name!r} raised {type(exc).__name__}: {exc}"
            ) from None
    raise ConfigError(
        f"{field}={path!r} does not import: no module named {missing!r} (searched sys.path and the working "
        f"directory {cwd}); check the path or install the module"
    )


def _strip(text: str, fold: bool) -> str:
    text = text.strip()
    return text.casefold() if fold else text


def build_verifier(cfg: ExactMatchVerifier | RegexVerifier | FunctionVerifier, field: str) -> Score:
    """The scoring function of a verifier config (a ``function`` verifier is imported now).

    Args:
        cfg: the config.
        field: its place in the run config (``data.verifier``), for messages.

    Returns:
        ``score(prompt, response, reference) -> float`` in ``[0, 1]``.

    Example:
        >>> score = build_verifier(RegexVerifier(pattern=r"answer is (\\d+)"), "data.verifier")
        >>> score("6*7?", "the answer is 42!", "so the answer is 42."), score("6*7?", "42", "42")
        (1.0, 0.0)
        >>> build_verifier(ExactMatchVerifier(), "data.verifier")("q", " 42 ", "42")
        1.0
    """
    if cfg.name == "exact_match":
        fold = cfg.ignore_case

        def exact(prompt: str, response: str, reference: str) -> float:
            return float(_strip(response, fold) == _strip(reference, fold))

        return exact
    if cfg.name == "regex":
        regex = re.compile(cfg.pattern, re.IGNORECASE if cfg.ignore_case else 0)
        fold, on_reference = cfg.ignore_case, cfg.reference_pattern

        def extract(text: str) -> str | None:
            m = regex.search(text)
            if m is None:
                return None
            return m.group(1) if regex.groups else m.group(0)

        def matches(prompt: str, response: str, reference: str) -> float:
            answer = extract(response)
            if answer is None:
                return 0.0
            expected = extract(reference) if on_reference else None
            expected = reference if expected is None else expected
            return float(_strip(answer, fold) == _strip(expected, fold))

        return matches
    where = f"{field}.function"
    fn = import_function(cfg.function, where)

    def call(prompt: str, response: str, reference: str) -> float:
        try:
            value = fn(prompt, response, reference)
        except Exception as exc:
            raise ConfigError(
                f"{where}={cfg.function!r} raised {type(exc).__name__}: {exc} (on the prompt {prompt[:60]!r})"
            ) from None
        if isinstance(value, bool) or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
        ):
            return float(value)
        try:  # numpy / torch scalars
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and 0.0 <= number <= 1.0:
            return number
        raise ConfigError(
            f"{where}={cfg.function!r} returned {value!r}; a verifier returns a bool or a number in [0, 1]"
        )

    return call


__all__ = [
    "VERIFIERS",
    "ExactMatchVerifier",
    "FunctionVerifier",
    "RegexVerifier",
    "Score",
    "VerifierConfig",
    "build_verifier",
    "import_function",
    "verifier_shorthand",
]
