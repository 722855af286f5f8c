"""Small tokenizers trained on the fly, cached on disk, wrapped for Hugging Face models.

Two kinds, both byte-level (any string round-trips, no unknown token):

- ``"bpe"``: byte-level BPE (GPT-2 style ``ByteLevel`` pre-tokenizer and decoder) trained with the
  ``tokenizers`` library; ``vocab_size`` counts the 3 special tokens, the 256 byte symbols and the
  learned merges (at most ``vocab_size``: merges need a pair seen at least twice).
- ``"byte"``: the 256 byte symbols and the special tokens, no merges (259 ids; nothing to train).

Ids 0, 1, 2 are always ``<pad>``, ``<bos>``, ``<eos>``. Encoding adds no special tokens: the collators
place ``<bos>`` and ``<eos>`` themselves (see :mod:`distillery.data.text.collate`). The tokenizer saved
with a trained model (:func:`save_training_tokenizer`) adds ``<bos>`` exactly when training rows
start with it, so that ``AutoTokenizer.from_pretrained(saved)(text)`` gives the ids training gave.

Both kinds come with a small default chat template (:data:`DEFAULT_CHAT_TEMPLATE`), so that chat
``messages`` data works offline::

    system: You are terse.
    user: What is 2+2?
    assistant: 4<eos>user: And 3+3?
    assistant: 6<eos>

(each message is ``role: content``; a user or system message ends with a newline, an assistant
message with ``<eos>``, which is where generation stops; the generation prompt is ``assistant: ``).

The result is a ``transformers.PreTrainedTokenizerFast`` with ``pad``/``bos``/``eos`` set, so HF
``generate``, ``save_pretrained`` and ``AutoTokenizer.from_pretrained`` work with it. Trained
tokenizers are cached under ``$DISTILLERY_CACHE/tokenizers/<key>`` (default
``~/.cache/distillery/tokenizers``), the key hashing (text SHA-256, kind, vocab size, format version);
an entry is written to a temporary directory and renamed into place, so a crash never leaves a
half-written tokenizer that a later run would load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.fileio import first_line, is_local_source

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
DEFAULT_VOCAB_SIZE = 4096
MIN_FREQUENCY = 2
# Bump when a change here makes previously cached tokenizers differ from freshly trained ones.
CACHE_FORMAT = 1

TokenizerKind = Literal["bpe", "byte", "pretrained"]

# The chat template of the tokenizers distillery builds (see the module docstring).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' }}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


class TokenizerConfig(StrictModel):
    """Which tokenizer a text run trains (or loads from the cache), or the pretrained one it loads."""

    kind: TokenizerKind = Field(
        "bpe",
        description="bpe: byte-level BPE; byte: 256 bytes + specials; pretrained: AutoTokenizer.from_pretrained"
        "(tokenizer.pretrained), the tokenizer of pretrained teacher/student models",
    )
    vocab_size: int | None = Field(
        None,
        ge=BYTE_VOCAB_SIZE,
        description=f"bpe: total ids including specials (null = {DEFAULT_VOCAB_SIZE}); byte, pretrained: null",
    )
    pretrained: str | None = Field(None, description="kind=pretrained: hub id or directory of the tokenizer")

    @model_validator(mode="after")
    def _byte_has_fixed_size(self) -> TokenizerConfig:
        if self.kind == "byte" and self.vocab_size not in (None, BYTE_VOCAB_SIZE):
            raise ValueError(f"tokenizer.vocab_size must be null for kind=byte (always {BYTE_VOCAB_SIZE})")
        if self.kind == "pretrained":
            if self.pretrained is None:
                raise ValueError(
                    "tokenizer.kind=pretrained needs tokenizer.pretrained (a hub id or directory)"
                )
            if self.vocab_size is not None:
                raise ValueError(
                    "tokenizer.vocab_size must be null for kind=pretrained (the tokenizer's own)"
                )
        elif self.pretrained is not None:
            raise ValueError(
                f"tokenizer.pretrained is set, but tokenizer.kind={self.kind}; set kind=pretrained"
            )
        return self

    def build(self, text: str | Sequence[str], **kwargs: Any) -> PreTrainedTokenizerFast:
        """:func:`train_tokenizer` with these settings (``kwargs``: ``use_cache``, ``cache_dir``), or
        :func:`load_pretrained_tokenizer` for ``kind=pretrained`` (``text`` and ``kwargs`` unused)."""
        if self.kind == "pretrained":
            return load_pretrained_tokenizer(self.pretrained)
        return train_tokenizer(text, self.vocab_size, self.kind, **kwargs)


class TokenizerNotFoundError(ConfigError):
    """A pretrained model's directory (or hub id) comes without a tokenizer: nothing to compare with."""


# Files any kind of saved Hugging Face tokenizer has at least one of.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_pretrained_tokenizer(source: str, field: str = "data.tokenizer.pretrained") -> Any:
    """``AutoTokenizer.from_pretrained(source)`` with the special tokens distillation needs.

    Batches need a padding, a beginning and an end token. Many pretrained tokenizers lack a padding
    token (GPT-2, Llama); it is then set to the end token (padding positions are masked out of every
    loss and of attention, so the choice does not matter), and a missing beginning token likewise.
    Loading the same source twice gives the same tokenizer, so a model's own tokenizer compares equal.

    A local ``source`` (see :func:`distillery.fileio.is_local_source`) must be a directory; one
    that holds none of :data:`TOKENIZER_FILES` has no tokenizer. Any other source is a hub id.

    Args:
        source: a directory saved with ``save_pretrained``, or a hub id.
        field: the config field that named ``source``, for messages.

    Raises:
        TokenizerNotFoundError: no tokenizer there: a local path that does not exist or holds no
            tokenizer files, or a hub id that does not load.
        ConfigError: the path is a file, or its tokenizer files are damaged; or the tokenizer has no
            end token.
    """
    from transformers import AutoTokenizer

    local = is_local_source(source)
    if local:
        path = Path(source).expanduser()
        if not path.exists():
            raise TokenizerNotFoundError(
                f"cannot load a tokenizer from {field}={source}: the path does not exist; give a directory "
                "saved with save_pretrained, or a hub id"
            )
        if not path.is_dir():
            raise ConfigError(
                f"cannot load a tokenizer from {field}={source}: the path is a file, not a directory; give a "
                "directory saved with save_pretrained, or a hub id"
            )
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise TokenizerNotFoundError(
                f"cannot load a tokenizer from {field}={source}: the directory holds no tokenizer files "
                f"({', '.join(TOKENIZER_FILES[:2])}, ...); save the tokenizer there with save_pretrained"
            )
        source = str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # damaged JSON or vocab, unreachable hub
        if local:
            raise ConfigError(
                f"cannot load a tokenizer from {field}={source}: its files are damaged or incomplete "
                f"({first_line(exc)}); save the tokenizer again with save_pretrained"
            ) from None
        raise TokenizerNotFoundError(
            f"cannot load a tokenizer from {field}={source!r}: it is not a local directory, and loading it from "
            f"the Hugging Face hub failed ({first_line(exc)}); check the id and the network connection, or give "
            "a directory saved with save_pretrained"
        ) from None
    if tokenizer.eos_token is None:
        raise ConfigError(
            f"the tokenizer of {field}={source!r} has no end-of-sequence token; responses need one to end"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    return tokenizer


def tokenizer_cache_root() -> Path:
    """``$DISTILLERY_CACHE/tokenizers``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)``/distillery/tokenizers``."""
    env = os.environ.get("DISTILLERY_CACHE")
    if env:
        return Path(env).expanduser() / "tokenizers"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillery" / "tokenizers"


def text_sha256(text: str | Sequence[str]) -> str:
    """SHA-256 of a text, or of a sequence of texts (each length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    if isinstance(text, str):
        h.update(text.encode("utf-8"))
    else:
        for part in text:
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _resolve_size(kind: str, vocab_size: int | None) -> int:
    if kind == "byte":
        if vocab_size not in (None, BYTE_VOCAB_SIZE):
            raise ValueError(
                f"kind='byte' has a fixed vocabulary of {BYTE_VOCAB_SIZE}; got vocab_size={vocab_size}"
            )
        return BYTE_VOCAB_SIZE
    if kind == "bpe":
        size = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
        if size < BYTE_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={size} is below the {BYTE_VOCAB_SIZE} ids every byte-level tokenizer needs "
                "(256 bytes + 3 special tokens)"
            )
        return size
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid: bpe, byte")


def cache_key(text_sha: str, kind: str, vocab_size: int) -> str:
    """The cache directory name of a tokenizer: a short hash of what determines it."""
    payload = {"format": CACHE_FORMAT, "text_sha256": text_sha, "kind": kind, "vocab_size": vocab_size}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return f"{kind}-{vocab_size}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _byte_level_parts():
    from tokenizers import decoders, pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()


def _byte_stand_ins() -> list[str]:
    """GPT-2's printable stand-in character of each byte value 0..255 (what ``ByteLevel`` emits)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _build_byte() -> Tokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers

    stand_in = _byte_stand_ins()
    if set(stand_in) != set(pre_tokenizers.ByteLevel.alphabet()):  # guards the copy of GPT-2's table
        raise RuntimeError("the ByteLevel alphabet of this tokenizers version is not GPT-2's")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + b for b, ch in enumerate(stand_in)})  # id = 3 + byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = _byte_level_parts()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _paragraphs(texts: Sequence[str]):
    """Yield the texts in paragraph-sized pieces (blank lines kept), so training can use threads."""
    for text in texts:
        yield from (p for p in re.split(r"(?<=\n\n)", text) if p)


def _train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = _byte_level_parts()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_paragraphs(texts), trainer=trainer)
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A ``tokenizers.Tokenizer`` with our special tokens as a ``transformers`` fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer written by :func:`train_tokenizer` (or any ``save_pretrained`` directory)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def train_tokenizer(
    text: str | Sequence[str],
    vocab_size: int | None = None,
    kind: TokenizerKind = "bpe",
    *,
    use_cache: bool = True,
    cache_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Train (or load from the cache) a byte-level tokenizer on ``text``.

    Args:
        text: the training text, or a sequence of documents.
        vocab_size: ``bpe``: total number of ids including the 3 specials (default 4096); the
            result has fewer when the text has too few repeated pairs. ``byte``: leave None (259).
        kind: ``"bpe"`` or ``"byte"``.
        use_cache: look up and store the result under ``cache_dir``.
        cache_dir: default :func:`tokenizer_cache_root`.

    Returns:
        a ``PreTrainedTokenizerFast`` with ``pad_token_id, bos_token_id, eos_token_id == 0, 1, 2``;
        when cached, ``tokenizer.name_or_path`` is its cache directory (a ``save_pretrained`` layout).

    Example:
        >>> tok = train_tokenizer("the cat sat on the mat. " * 20, vocab_size=270, use_cache=False)
        >>> len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
        (270, 0, 1, 2)
        >>> ids = tok.encode("the mat")
        >>> tok.convert_ids_to_tokens(ids), tok.decode(ids)
        (['the', 'Ġmat'], 'the mat')
    """
    size = _resolve_size(kind, vocab_size)
    texts = [text] if isinstance(text, str) else list(text)
    if kind == "bpe" and not any(texts):
        raise ValueError("cannot train a BPE tokenizer on empty text")
    if not use_cache:
        return _with_chat_template(
            wrap_tokenizer(_build_byte() if kind == "byte" else _train_bpe(texts, size))
        )

    root = Path(cache_dir) if cache_dir is not None else tokenizer_cache_root()
    sha = text_sha256(text)
    key = cache_key(sha, kind, size)
    final = root / key
    if (final / "tokenizer.json").is_file():
        return _with_chat_template(load_tokenizer(final))
    tok = wrap_tokenizer(_build_byte() if kind == "byte" else _train_bpe(texts, size))
    _save_atomic(tok, root, key, {"kind": kind, "vocab_size": size, "text_sha256": sha})
    return _with_chat_template(load_tokenizer(final))


def _with_chat_template(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """``tok`` with :data:`DEFAULT_CHAT_TEMPLATE` unless it has a chat template already (the template
    is not part of the cache key: entries written before it existed get it here)."""
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def save_training_tokenizer(tokenizer: Any, path: str | Path, add_bos: bool) -> None:
    """Save ``tokenizer`` (``save_pretrained``) so that it encodes text as training did.

    distillery encodes without special tokens and places ``<bos>`` itself: training rows of prompt
    data (and of user text) start with ``<bos>``, packed built-in corpora do not. The saved copy's
    ``add_bos_token`` (and its post-processor) says the same, and it adds no ``<eos>``: for every text,
    ``AutoTokenizer.from_pretrained(path)(text)["input_ids"]`` is ``[bos] + ids`` with ``add_bos``,
    else ``ids``, ``ids`` being ``tokenizer(text, add_special_tokens=False)["input_ids"]``. The run's
    own tokenizer is not changed. A tokenizer that cannot be made to do so is saved as it is, and a
    warning says so.

    Example:
        >>> import tempfile
        >>> from transformers import AutoTokenizer
        >>> tok = train_tokenizer("", kind="byte", use_cache=False)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_training_tokenizer(tok, d, add_bos=True)
        ...     AutoTokenizer.from_pretrained(d)("ab")["input_ids"], tok("ab")["input_ids"]
        ([1, 100, 101], [100, 101])
    """
    import copy
    import warnings

    from transformers import AutoTokenizer

    saved = copy.deepcopy(tokenizer)
    for name, value in (("add_bos_token", add_bos), ("add_eos_token", False)):
        if hasattr(saved, name):
            try:
                setattr(saved, name, value)  # fast tokenizers rebuild their post-processor
            except (AttributeError, ValueError, TypeError):
                pass
        if isinstance(getattr(saved, "init_kwargs", None), dict):
            saved.init_kwargs[name] = value  # written to tokenizer_config.json, applied on load
    saved.save_pretrained(str(path))
    probe = "Hello, world: 12 + 30 = 42."
    expected = ([tokenizer.bos_token_id] if add_bos else []) + list(
        tokenizer(probe, add_special_tokens=False)["input_ids"]
    )
    try:
        got = list(AutoTokenizer.from_pretrained(str(path))(probe)["input_ids"])
    except Exception as exc:  # a tokenizer class that does not load back: say so, keep the files
        got = f"not loadable ({type(exc).__name__})"
    if got != expected:
        warnings.warn(
            f"the tokenizer saved in {path} does not encode text as training did (expected ids {expected}, "
            f"got {got}); prepend <bos> yourself{'' if add_bos else ' (or rather: do not)'}",
            stacklevel=2,
        )


def _save_atomic(tok: PreTrainedTokenizerFast, root: Path, key: str, meta: dict[str, Any]) -> Path:
    """Write ``tok`` to ``root/key`` through a temporary sibling directory and a rename.

    Raises:
        ConfigError: ``root`` cannot be created or written (a file in the way, no permission).
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    except OSError as exc:
        raise ConfigError(
            f"the tokenizer cache {root} cannot be written ({exc.strerror or exc}); point $DISTILLERY_CACHE at "
            "a writable folder (tokenizers are cached in its tokenizers/ sub-folder)"
        ) from None
    final = root / key
    try:
        tok.save_pretrained(str(tmp))
        (tmp / "distillery.json").write_text(
            json.dumps({"format": CACHE_FORMAT, **meta, "length": len(tok)}, indent=2, sort_keys=True)
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "tokenizer.json").is_file():  # not a lost race: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process wrote it first; keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------------------------------------
# Comparing tokenizers
# ---------------------------------------------------------------------------------------------


def _describe(tok: Any) -> dict[str, Any]:
    """Everything that decides how text maps to ids and which ids are special."""
    specials = {name: getattr(tok, f"{name}_token_id", None) for name in ("pad", "bos", "eos", "unk")}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer: vocabulary and specials only
        return {"vocabulary": dict(sorted(tok.get_vocab().items())), "special tokens": specials}
    spec = json.loads(backend.to_str())
    model = dict(spec.get("model") or {})
    vocab = model.pop("vocab", None)
    merges = model.pop("merges", None)
    if merges is not None:
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or [])
    return {
        "vocabulary": vocab,
        "merges": merges,
        "model": model,
        "added tokens": added,
        "special tokens": specials,
        "normalizer": spec.get("normalizer"),
        "pre-tokenizer": spec.get("pre_tokenizer"),
        "post-processor": spec.get("post_processor"),
        "decoder": spec.get("decoder"),
    }


def tokenizer_differences(a: Any, b: Any, post_processor: bool = True) -> list[str]:
    """Human-readable differences between two tokenizers, each as ``what (a's vs b's)`` (empty: the same).

    ``post_processor=False`` ignores the post-processor, which only decides the special tokens a plain
    ``tokenizer(text)`` call adds: distillery encodes without them and places ``<bos>``/``<eos>``
    itself, so tokenizers that differ only there give the same training ids (a model saved by
    distillery carries a tokenizer that adds ``<bos>``, :func:`save_training_tokenizer`).
    """
    da, db = _describe(a), _describe(b)
    if not post_processor:
        da.pop("post-processor", None)
        db.pop("post-processor", None)
    out = []
    for field in dict.fromkeys([*da, *db]):
        va, vb = da.get(field), db.get(field)
        if va == vb:
            continue
        if field in ("vocabulary", "merges") and va is not None and vb is not None:
            out.append(f"{field} ({len(va)} vs {len(vb)} entries)" if len(va) != len(vb) else field)
        elif field == "special tokens":
            diff = {k: (va.get(k), vb.get(k)) for k in va if va.get(k) != vb.get(k)}
            out.append("special token ids " + ", ".join(f"{k}: {x} vs {y}" for k, (x, y) in diff.items()))
        else:
            out.append(field)
    return out


def tokenizer_sha256(tok: Any) -> str:
    """A hash of everything that decides how text maps to ids (the post-processor aside, as in
    ``tokenizer_differences(..., post_processor=False)``): a teacher-output cache's tokenizer identity."""
    described = _describe(tok)
    described.pop("post-processor", None)
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every text to the same ids and agree on the special tokens.

    Compares vocabulary, merges, added/special tokens, normaliser, pre-tokenizer, post-processor
    and decoder; ignores padding/truncation settings and paths.

    Example:
        >>> a = train_tokenizer("abc", kind="byte", use_cache=False)
        >>> same_tokenizer(a, train_tokenizer("xyz", kind="byte", use_cache=False))
        True
    """
    return not tokenizer_differences(a, b)


def check_tokenizers(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    teacher_vocab_size: int | None = None,
    student_vocab_size: int | None = None,
) -> int:
    """Refuse a teacher/student pair whose tokenizers differ; return the shared number of token ids.

    Token-level distillation compares the two models' distributions id by id, so both must use one
    tokenizer. The models' output widths may exceed the tokenizer's length (embeddings padded to a
    multiple of 64, say): slice both models' logits to ``[..., :n]`` with the returned ``n``.

    Args:
        teacher_tokenizer, student_tokenizer: HF tokenizers.
        teacher_vocab_size, student_vocab_size: the models' output widths (``config.vocab_size``), if
            known; each must be at least the tokenizer's length.

    Raises:
        ConfigError: the tokenizers differ (the message says how), or a model's vocabulary is too small.

    Example:
        >>> tok = train_tokenizer("", kind="byte", use_cache=False)
        >>> check_tokenizers(tok, tok, teacher_vocab_size=320, student_vocab_size=259)
        259
    """
    diffs = tokenizer_differences(teacher_tokenizer, student_tokenizer)
    if diffs:
        raise ConfigError(
            "the teacher and student tokenizers differ (teacher vs student): " + "; ".join(diffs) + ". "
            "Cross-tokenizer distillation is not supported yet: give both models the same tokenizer "
            "(a model vocab_size padded beyond the tokenizer's length is fine)"
        )
    n = len(teacher_tokenizer)
    for who, size in (("teacher", teacher_vocab_size), ("student", student_vocab_size)):
        if size is not None and size < n:
            raise ConfigError(
                f"the {who} model's vocab_size={size} is smaller than its tokenizer's {n} ids; "
                f"build the model with vocab_size >= {n}"
            )
    return n
