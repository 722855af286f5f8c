"""WordNet 3.0 (Princeton University): synsets with their definitions, usage examples and lexicographer files.

Each synset of ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv`` becomes a :class:`Synset`:
its words, its definition (the gloss without its usage examples), the quoted usage examples, and its
lexicographer file (``noun.animal``, ``verb.motion``, ...: one of the 45 of :data:`LEXNAMES`), a
natural 45-class label for probing sentence embeddings. :func:`wordnet_sentences` gives every
definition and example once, as unlabelled training text.

Looked up in: an explicit ``root`` (then the files must be there); else, in order,
``$DISTILLERY_DATA/wordnet``, ``$DISTILLERY_DATA`` (when it holds ``data.noun``), and
``/usr/share/wordnet`` (the Debian/Ubuntu package ``wordnet-base``). Nothing is downloaded.

The data-file format is WordNet's ``wndb(5WN)``: one synset a line, ``offset lex_filenum ss_type
w_cnt word lex_id ... p_cnt pointers ... [frames] | gloss``; lines starting with two spaces are the
license header. The gloss is split at its first double quote: the text before it is the definition
(trailing ``;:,`` removed), each quoted span after it an example (an unterminated last quote runs to
the end of the line; attributions between examples, such as ``- Shakespeare``, are dropped). A few
dozen glosses of WordNet 3.0 have unbalanced quotes; they are read by the same rule.

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from distillery.errors import ConfigError, DataNotFoundError

SYSTEM_DIR = Path("/usr/share/wordnet")
POS = ("noun", "verb", "adj", "adv")
# The lexicographer files of WordNet 3.0 by number (lexnames(5WN)).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip
INSTALL_HINT = (
    "install the Debian/Ubuntu package wordnet-base (sudo apt-get install wordnet-base, which puts the files "
    "in /usr/share/wordnet), or set $DISTILLERY_DATA to a folder holding data.noun, data.verb, data.adj and "
    "data.adv (directly or in a wordnet/ sub-folder)"
)
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers of adjectives: galore(ip)
_EXAMPLE = re.compile(r'"([^"]*)(?:"|$)')


@dataclass(frozen=True)
class Synset:
    """One WordNet synset.

    Attributes:
        offset: the byte offset of its line in ``data.<pos>``: unique within a part of speech (the pair
            ``(pos, offset)`` is WordNet's synset key).
        pos: ``"noun"``, ``"verb"``, ``"adj"`` (satellites included) or ``"adv"``: the file it was read from.
        lex_filenum: the number of its lexicographer file, 0..44.
        lexname: the name of that file, ``LEXNAMES[lex_filenum]`` (e.g. ``"noun.animal"``).
        words: its words in file order, underscores as spaces, adjective markers (``(a)``, ``(p)``,
            ``(ip)``) removed.
        gloss: the definition, usage examples removed.
        examples: the quoted usage examples, quotes stripped.
    """

    offset: int
    pos: str
    lex_filenum: int
    lexname: str
    words: tuple[str, ...]
    gloss: str
    examples: tuple[str, ...]


def candidate_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Where the files are looked for: ``root`` alone when given, else the default places in order."""
    if root is not None:
        return [Path(root).expanduser()]
    dirs: list[Path] = []
    env = os.environ.get("DISTILLERY_DATA")
    if env:
        dirs += [Path(env).expanduser() / "wordnet", Path(env).expanduser()]
    dirs.append(SYSTEM_DIR)
    return dirs


def find_wordnet(root: str | os.PathLike | None = None) -> Path:
    """The folder holding WordNet's ``data.noun`` (and its other data files).

    Args:
        root: a folder to use instead of the default places (it must hold ``data.noun``).

    Raises:
        DataNotFoundError: no candidate folder holds ``data.noun``; the message lists where it looked and
            how to install the files.

    Example:
        >>> find_wordnet("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        distillery.errors.DataNotFoundError: WordNet 3.0 not found: no data.noun in /no/such/folder; ...
    """
    dirs = candidate_dirs(root)
    for d in dirs:
        if (d / "data.noun").is_file():
            return d
    looked = ", ".join(str(d) for d in dirs)
    raise DataNotFoundError(f"WordNet 3.0 not found: no data.noun in {looked}; {INSTALL_HINT}")


def split_gloss(text: str) -> tuple[str, tuple[str, ...]]:
    """``(definition, examples)`` of a gloss: the text before the first double quote, and the quoted spans.

    Args:
        text: the gloss of a data-file line (the text after ``|``).

    Example:
        >>> split_gloss('move fast; "He runs every morning"; "she ran to the store"')
        ('move fast', ('He runs every morning', 'she ran to the store'))
        >>> split_gloss('a feline mammal')
        ('a feline mammal', ())
    """
    head, quote, rest = text.partition('"')
    definition = _squeeze(head).strip(" ;:,")
    if not quote:
        return definition, ()
    examples = tuple(e for m in _EXAMPLE.finditer(quote + rest) if (e := _squeeze(m.group(1))))
    return definition, examples


def _squeeze(text: str) -> str:
    """``text`` with runs of whitespace as one space, stripped."""
    text = text.strip()
    return " ".join(text.split()) if "  " in text or "\t" in text or "\n" in text else text


def parse_line(line: str, pos: str) -> Synset:
    """The :class:`Synset` of one line of ``data.<pos>`` (not a license-header line).

    Args:
        line: the line, with or without its newline.
        pos: the part of speech of the file: ``noun``, ``verb``, ``adj`` or ``adv``.

    Raises:
        ValueError: the line does not follow the wndb(5WN) format.
    """
    head, bar, gloss = line.partition("|")
    if not bar:
        raise ValueError("no '|' before the gloss")
    fields = head.split(None, 4)  # offset, lex_filenum, ss_type, w_cnt, the rest
    offset, lex_filenum, w_cnt = int(fields[0]), int(fields[1]), int(fields[3], 16)
    if not 0 <= lex_filenum < len(LEXNAMES):
        raise ValueError(f"lexicographer file number {lex_filenum} is not in 0..{len(LEXNAMES) - 1}")
    raw = fields[4].split(None, 2 * w_cnt)[: 2 * w_cnt : 2]
    if len(raw) != w_cnt or w_cnt == 0:
        raise ValueError(f"{w_cnt} words declared, {len(raw)} found")
    if pos == "adj":
        raw = [_ADJ_MARKER.sub("", w) for w in raw]
    words = tuple(w.replace("_", " ") for w in raw)
    definition, examples = split_gloss(gloss)
    return Synset(offset, pos, lex_filenum, LEXNAMES[lex_filenum], words, definition, examples)


def read_data_file(path: Path, pos: str) -> list[Synset]:
    """Every synset of one WordNet data file, in file order.

    Args:
        path: a ``data.<pos>`` file.
        pos: its part of speech (``noun``, ``verb``, ``adj``, ``adv``).

    Raises:
        DataNotFoundError: the file is missing, unreadable, or has a line that is not a synset; the
            message names the file (and the line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataNotFoundError(
            f"{path} is missing: the WordNet folder {path.parent} holds data.noun but not data.{pos}; "
            f"{INSTALL_HINT}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataNotFoundError(f"{path} cannot be read ({exc}); {INSTALL_HINT}") from None
    out: list[Synset] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("  "):  # the license header
            continue
        try:
            out.append(parse_line(line, pos))
        except (ValueError, IndexError) as exc:
            raise DataNotFoundError(
                f"{path}, line {number}: not a WordNet synset line ({exc}); the file is damaged or not "
                f"WordNet 3.0's data.{pos}: reinstall wordnet-base, or point $DISTILLERY_DATA at intact files"
            ) from None
    return out


def load_synsets(root: str | os.PathLike | None = None, pos: Iterable[str] = POS) -> list[Synset]:
    """Every synset of the chosen parts of speech, deterministically: files in the order of ``pos``,
    synsets in file order.

    Args:
        root: the WordNet folder (None: looked up, see :func:`find_wordnet`).
        pos: parts of speech to read, from ``noun``, ``verb``, ``adj``, ``adv``.

    Raises:
        DataNotFoundError: the files are not found or are damaged.
        ConfigError: an unknown part of speech.

    Example (the real files hold 117,659 synsets)::

        synsets = load_synsets(pos=["noun"])
        synsets[0].words, synsets[0].lexname  # (('entity',), 'noun.Tops')
    """
    parts = [pos] if isinstance(pos, str) else list(pos)
    unknown = sorted(set(parts) - set(POS))
    if unknown:
        raise ConfigError(f"unknown WordNet part(s) of speech {unknown}; valid: {', '.join(POS)}")
    folder = find_wordnet(root)
    out: list[Synset] = []
    for p in parts:
        out += read_data_file(folder / f"data.{p}", p)
    return out


def wordnet_sentences(root: str | os.PathLike | None = None, pos: Iterable[str] = POS) -> list[str]:
    """Every definition and usage example, each once (first occurrence kept), in synset order: a
    synset's definition, then its examples.

    Args:
        root: the WordNet folder (None: looked up, see :func:`find_wordnet`).
        pos: parts of speech to read (default: all four).

    Raises:
        DataNotFoundError: the files are not found or are damaged.
    """
    seen: dict[str, None] = {}
    for s in load_synsets(root, pos):
        for text in (s.gloss, *s.examples):
            if text:
                seen.setdefault(text, None)
    return list(seen)


__all__ = [
    "LEXNAMES",
    "POS",
    "Synset",
    "find_wordnet",
    "load_synsets",
    "parse_line",
    "split_gloss",
    "wordnet_sentences",
]
