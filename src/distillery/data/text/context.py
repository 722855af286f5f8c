"""Privileged-context templates: what a self-context teacher reads before a prompt's response.

A template is a Python format string over named placeholders, for example
``"Answer: {response}\\n{prompt}"`` (the gold answer as a demonstration) or
``"{passage}\\n{prompt}"`` (a knowledge passage). The student reads the bare prompt; the teacher
(the same weights) reads the rendered template followed by the same response tokens.

``{prompt}`` is special: it is not rendered as text but stands for the student's own prompt
tokens, copied into the teacher's row unchanged, so that the prompt (and a chat's rendering of it)
is never tokenized a second time; the template text before and after it is tokenized on its own.
A template without ``{prompt}`` replaces the prompt altogether.

The placeholders a run offers depend on its data (:func:`available_fields`): every prompt dataset
has ``prompt`` and ``response`` (the reference response, as text); the fact task adds ``passage``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

PROMPT = "prompt"

FIELD_DOCS = {
    "prompt": "the student's prompt, as its own tokens",
    "response": "the reference response of the example (the gold answer), as text",
    "passage": "the fact task: the passage stating the facts of the entity a question asks about",
    "attempt": "method.name=revision: the student's own answer to the prompt, as text",
    "reward": "method.name=revision: the verifier's verdict on that answer, `correct` or `wrong`",
}
REWARD_TEXT = {True: "correct", False: "wrong"}


def template_fields(template: str) -> list[str]:
    """The placeholder names of ``template``, in order (repeats kept).

    Example:
        >>> template_fields("Answer: {response}\\n{prompt}")
        ['response', 'prompt']

    Raises:
        ValueError: a positional (``{}``) or indexed placeholder, a format spec or conversion, or a
            malformed template (an unmatched brace: write ``{{`` for a literal one).
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name == "" or not name.isidentifier():
            raise ValueError(
                f"placeholder {{{name}}} is not a name; use named placeholders such as {{prompt}}"
            )
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} has a format spec or conversion; write it plainly")
        names.append(name)
    return names


def check_template(template: str, available: Sequence[str]) -> None:
    """Refuse placeholders outside ``available`` and a repeated ``{prompt}``, naming the valid ones.

    Example:
        >>> check_template("{passage}\\n{prompt}", ["prompt", "response"])
        Traceback (most recent call last):
        ...
        ValueError: unknown placeholder {passage}; valid here: {prompt}, {response}
    """
    names = template_fields(template)
    unknown = [n for n in names if n not in available]
    if unknown:
        valid = ", ".join(f"{{{n}}}" for n in available)
        raise ValueError(f"unknown placeholder {{{unknown[0]}}}; valid here: {valid}")
    if names.count(PROMPT) > 1:
        raise ValueError("{prompt} appears more than once; the student's prompt is copied in once")


def split_template(template: str, fields: Mapping[str, str]) -> tuple[str, str | None]:
    """``(text before {prompt}, text after it)`` rendered with ``fields``; ``(whole text, None)`` when the
    template has no ``{prompt}``.

    Example:
        >>> split_template("Answer: {response}\\n{prompt}", {"response": "357"})
        ('Answer: 357\\n', '')
        >>> split_template("Fix: {response}", {"response": "12"})
        ('Fix: 12', None)
    """
    marker = "\x00PROMPT\x00"
    text = template.format(**{**fields, PROMPT: marker})
    if marker not in text:
        return text, None
    before, after = text.split(marker, 1)
    return before, after


def available_fields(data_name: str, revision: bool = False) -> list[str]:
    """The placeholders a template may use for ``data.name`` (prompt data only); with ``revision``
    (SD-Zero's reviser) also the student's attempt and its reward.

    Example:
        >>> available_fields("facts"), available_fields("arithmetic", revision=True)
        (['prompt', 'response', 'passage'], ['prompt', 'response', 'attempt', 'reward'])
    """
    names = ["prompt", "response", "passage"] if data_name == "facts" else ["prompt", "response"]
    return names + (["attempt", "reward"] if revision else [])
