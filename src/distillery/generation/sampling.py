"""Sampling completions from causal LMs, and turning them back into training batches.

The token layout is the one of :mod:`distillery.data.text.collate`: a training row is
``[bos] prompt response [eos]`` (right padded), ``labels`` are -100 on ``<bos>``, the prompt and the
padding. Generation reads the *context* of each row (everything before its first trained position,
``<bos>`` included), left pads it, lets the model continue it, and :func:`build_batch` lays the
completion back out as a training row whose labels are exactly the generated tokens::

    training batch --split_prompts--> prompt rows --generate_completions--> completions
                   <----------------------- build_batch ------------------------'

Sequence-level distillation ("Sequence-Level Knowledge Distillation", Kim & Rush) trains the student
on the teacher's own outputs instead of the reference responses: :func:`sequence_level_pairs` has the
teacher answer every training prompt once (batched, greedy by default), stores the answers in a JSONL
file keyed by a hash of the teacher weights, the tokenizer, the prompts and the generation settings,
and reuses that file on later runs.

Generation runs under ``torch.no_grad()`` (not ``inference_mode``: the sampled ids become inputs of
a later forward pass with gradients) with the model in ``eval()`` mode, restored afterwards. A seed
makes the samples reproducible without touching the caller's global RNG stream (it is forked).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distillery.data.base import UNLABELLED
from distillery.data.text.collate import collate_prompts, pad_left, pad_right, special_ids
from distillery.data.text.jsonl import DataFormatError, PromptResponse, read_records

# Bump when a change here makes previously stored teacher generations stale.
GENERATIONS_FORMAT = 1


# ----------------------------------------------------------------------------------------------------
# Small helpers shared by the generation modules
# ----------------------------------------------------------------------------------------------------


def as_module(model: Any) -> nn.Module:
    """The network behind ``model``: itself, or the ``.module`` of a wrapper such as
    :class:`~distillery.teachers.FrozenTeacher`."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected an nn.Module or a teacher wrapping one in .module, got {type(model).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several integers/strings; independent streams for distinct ``parts``.

    Example:
        >>> mix_seed(0, 1) == mix_seed(0, 1), mix_seed(0, 1) == mix_seed(1, 0)
        (True, False)
    """
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tensor_digest(t: Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def special_token_ids(model: nn.Module, pad_id: int | None, eos_id: int | None) -> tuple[int, int]:
    """``(pad_id, eos_id)``: the given values, else the model's generation config / config."""
    resolved = {}
    for name, value in (("pad", pad_id), ("eos", eos_id)):
        if value is None:
            for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
                value = getattr(source, f"{name}_token_id", None) if source is not None else None
                if isinstance(value, (list, tuple)):
                    value = value[0] if value else None
                if value is not None:
                    break
        if value is None:
            raise ValueError(
                f"no {name}_id given and the model's config has no {name}_token_id; pass {name}_id= "
                "(distillery.data.text.special_ids(tokenizer) gives it)"
            )
        resolved[name] = int(value)
    return resolved["pad"], resolved["eos"]


@contextmanager
def sampling_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``eval()`` and ``torch.no_grad()`` for the block; every submodule's train/eval flag is restored
    afterwards (a partly frozen model keeps its frozen parts in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block on a private RNG stream seeded with ``seed`` (None: the global stream).

    The global CPU (and, for a CUDA ``device``, that device's) RNG state is saved and restored, so
    seeding generation does not change the caller's later random numbers (dropout, augmentation).
    """
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:  # only this device: other devices' streams are neither saved nor touched
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------------
# Prompts in, completions out, training batches back
# ----------------------------------------------------------------------------------------------------


def split_prompts(batch: Mapping[str, Tensor]) -> list[list[int]]:
    """The context of every row of a training batch: the tokens before its first trained position.

    A row's first trained position is the first ``i >= 1`` with ``labels[i] != -100`` (position 0 is
    never a target in the causal-LM convention), so for the ``[bos] prompt response [eos]`` layout the
    context is ``[bos] prompt``. Padding (``attention_mask == 0``) is never part of it.

    Args:
        batch: ``input_ids [B, T]``, ``labels [B, T]`` and optionally ``attention_mask [B, T]``
            (right padded, as :class:`~distillery.data.text.TokenDataset` returns them).

    Returns:
        ``B`` lists of token ids (left-pad them with :func:`~distillery.data.text.pad_left`).

    Raises:
        ValueError: a row has no trained position after position 0 (there is no response to replace).

    Example:
        >>> batch = {"input_ids": torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]]),
        ...          "labels": torch.tensor([[-100, -100, -100, 7, 2], [-100, -100, 9, 2, -100]])}
        >>> split_prompts(batch)
        [[1, 5, 6], [1, 8]]
    """
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    mask = batch.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
    trained = (labels != UNLABELLED) & valid  # (B, T)
    trained[:, 0] = False
    rows = []
    for i in range(ids.shape[0]):
        where = trained[i].nonzero()
        if len(where) == 0:
            raise ValueError(
                f"row {i} of the batch has no labelled position after the first token, so it has no "
                "response to replace; on-policy sampling needs prompt/response rows"
            )
        first = int(where[0])
        rows.append(ids[i, :first][valid[i, :first]].tolist())
    return rows


def generate_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]] | Mapping[str, Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    seed: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> list[list[int]]:
    """Continue every prompt with Hugging Face ``model.generate`` (batched, KV cache on).

    Sampling draws ``y_t ~ softmax(z_t / temperature)`` restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling; 1.0 keeps every token); ``do_sample=False`` is
    greedy decoding (``argmax z_t``). Nothing from the model's own ``generation_config`` (top-k,
    repetition penalty...) changes the distribution: those fields are set to neutral values.

    Args:
        model: an HF causal LM (``AutoModelForCausalLM``) or a wrapper with ``.module``. It is put in
            ``eval()`` for generation and restored to its previous mode; no gradient is recorded.
        prompts: ``B`` token-id lists (left padded here with ``pad_id``), or a left-padded batch
            ``{"input_ids": [B, P], "attention_mask": [B, P]}``.
        max_new_tokens: at most this many tokens per row.
        temperature: softmax temperature of sampling (> 0; ignored when greedy).
        top_p: nucleus mass in ``(0, 1]``.
        do_sample: sample (True) or decode greedily (False).
        seed: seeds a private RNG stream (the global one is left as it was); None uses the global stream.
        eos_id: end-of-sequence id (default: the model config's).
        pad_id: padding id (default: the model config's).

    Returns:
        ``B`` lists of generated ids, each cut after its first ``eos_id`` (kept); a row that hit
        ``max_new_tokens`` first has no ``eos_id``.

    Example:
        >>> import transformers
        >>> lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=12, hidden_size=8,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        >>> out = generate_completions(lm, [[1, 5, 6], [1, 7]], max_new_tokens=4, seed=0, eos_id=2, pad_id=0)
        >>> len(out), all(1 <= len(c) <= 4 for c in out)
        (2, True)
    """
    import transformers

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    module = as_module(model)
    pad_id, eos_id = special_token_ids(module, pad_id, eos_id)
    enc = pad_left(prompts, pad_id) if not isinstance(prompts, Mapping) else dict(prompts)
    device = model_device(module)
    input_ids = enc["input_ids"].to(device)  # (B, P)
    attention_mask = enc.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,  # no implicit top-50
        num_beams=1,
        repetition_penalty=1.0,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        use_cache=True,
    )
    with sampling_mode(module), seeded(seed if do_sample else None, device):
        out = module.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    new = out[:, input_ids.shape[1] :].cpu()  # (B, N)
    return [_cut_at_eos(row.tolist(), eos_id) for row in new]


def _cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def build_batch(
    prompt_rows: Sequence[Sequence[int]],
    completion_rows: Sequence[Sequence[int]],
    *,
    pad_id: int,
    bos_id: int | None = None,
    index: Tensor | None = None,
) -> dict[str, Tensor]:
    """A training batch (the :class:`~distillery.data.text.TokenDataset` layout) of prompts + completions.

    Each row is ``prompt + completion``; ``labels`` are -100 on the prompt and the padding and equal
    to the completion tokens elsewhere, so the completion (its ``<eos>`` included, if it has one) is
    exactly what the causal-LM loss trains on. A completion without ``<eos>`` (it hit the length cap)
    gets none appended: a truncated answer must not teach the model to stop.

    Args:
        prompt_rows: ``B`` contexts as fed to generation (usually ``[bos] prompt``).
        completion_rows: ``B`` generated id lists (at least one token each).
        pad_id: id written into the right padding.
        bos_id: if given, prepended to every prompt row that does not already start with it.
        index: ``[B]`` sample ids, copied into the batch.

    Returns:
        ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B, T]`` (and ``index [B]``).

    Example:
        >>> b = build_batch([[1, 5, 6], [1, 7]], [[9, 2], [8, 8, 8]], pad_id=0)
        >>> b["input_ids"].tolist()
        [[1, 5, 6, 9, 2], [1, 7, 8, 8, 8]]
        >>> b["labels"].tolist()
        [[-100, -100, -100, 9, 2], [-100, -100, 8, 8, 8]]
    """
    if len(prompt_rows) != len(completion_rows):
        raise ValueError(f"{len(prompt_rows)} prompts but {len(completion_rows)} completions")
    rows, labels = [], []
    for i, (prompt, completion) in enumerate(zip(prompt_rows, completion_rows)):
        prompt, completion = [int(t) for t in prompt], [int(t) for t in completion]
        if not completion:
            raise ValueError(f"completion {i} is empty; every row needs at least one trained token")
        if bos_id is not None and (not prompt or prompt[0] != bos_id):
            prompt = [bos_id, *prompt]
        if not prompt:
            raise ValueError(f"prompt {i} is empty: the first completion token would have no context")
        rows.append(prompt + completion)
        labels.append([UNLABELLED] * len(prompt) + completion)
    batch = pad_right(rows, labels, pad_id)
    if index is not None:
        batch["index"] = torch.as_tensor(index).reshape(-1).clone()
    return batch


# ----------------------------------------------------------------------------------------------------
# Sequence-level KD: the teacher's answers, generated once and stored
# ----------------------------------------------------------------------------------------------------


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (hex) over the model's state dict (names, dtypes, shapes, bytes) and its config."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_digest(tensor).encode())
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [getattr(tokenizer, f"{n}_token_id", None) for n in ("pad", "bos", "eos")]
    return hashlib.sha256((text + json.dumps(extra)).encode()).hexdigest()


def sequence_level_pairs(
    teacher: nn.Module | Any,
    prompts: Sequence[Any],
    tokenizer: Any,
    *,
    cache_dir: str | Path,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    max_prompt_length: int | None = None,
    drop_unfinished: bool = False,
) -> list[Any]:
    """The teacher's response to every prompt, generated once and cached as JSONL.

    Sequence-level KD ("Sequence-Level Knowledge Distillation", Kim & Rush, 2016) replaces the
    reference response ``y`` of each training prompt ``x`` by the teacher's approximate mode
    ``y_hat = argmax_y p_T(y | x)`` (greedy decoding here; or a sample with ``do_sample=True``) and
    trains the student with ordinary cross-entropy on ``(x, y_hat)``.

    The file ``cache_dir/seqkd-<key>.jsonl`` holds one ``{"prompt", "response", "finished"}`` object
    per prompt, in order; ``<key>`` hashes the teacher's weights and config, the tokenizer, the prompts
    and every generation setting, so a change to any of them generates afresh. The file is written to
    a temporary name and renamed into place, so a crash never leaves a partial file that a later run
    would reuse.

    Responses are decoded to text (``skip_special_tokens=True``); :meth:`TokenDataset.from_pairs`
    re-tokenizes them and appends ``<eos>``. Re-tokenization of decoded BPE text can differ from the
    generated ids, and a response that hit ``max_new_tokens`` (``finished: false``) would be taught to
    stop there: ``drop_unfinished=True`` leaves those out.

    Args:
        teacher: an HF causal LM, or a wrapper with ``.module`` (e.g. :class:`~distillery.teachers.FrozenTeacher`).
        prompts: prompt strings, :class:`~distillery.data.text.PromptResponse` objects or
            ``(prompt, response)`` tuples (only the prompt is read).
        tokenizer: an HF tokenizer with pad, bos and eos tokens (the teacher's).
        cache_dir: directory of the JSONL files.
        max_new_tokens: cap on each response.
        do_sample, temperature, top_p, seed: see :func:`generate_completions`.
        batch_size: prompts per ``generate`` call.
        max_prompt_length: passed to :func:`~distillery.data.text.collate_prompts` (keeps the last tokens).
        drop_unfinished: leave out responses without ``<eos>``.

    Returns:
        :class:`~distillery.data.text.PromptResponse` pairs for :meth:`TokenDataset.from_pairs`.
    """
    module = as_module(teacher)
    texts = [p if isinstance(p, str) else p[0] if isinstance(p, tuple) else p.prompt for p in prompts]
    _, _, eos_id = special_ids(tokenizer)
    settings = {
        "format": GENERATIONS_FORMAT,
        "teacher": weights_digest(module),
        "tokenizer": _tokenizer_digest(tokenizer),
        "prompts": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature if do_sample else None,
        "top_p": top_p if do_sample else None,
        "seed": seed if do_sample else None,
        "batch_size": batch_size if do_sample else None,  # samples depend on how prompts are batched
        "max_prompt_length": max_prompt_length,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"seqkd-{key}.jsonl"

    if path.is_file():
        try:
            records = read_records(path, {"prompt": str, "response": str, "finished": bool})
        except DataFormatError as exc:
            raise DataFormatError(
                f"{exc}; the cached teacher responses are damaged: delete the file to generate them again"
            ) from None
        if [r.get("prompt") for r in records] != texts:
            raise DataFormatError(
                f"{path}: the stored prompts do not match this call's prompts (the file is damaged or was "
                "edited); delete it to generate the responses again"
            )
    else:
        records = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = collate_prompts(chunk, tokenizer, max_length=max_prompt_length)
            completions = generate_completions(
                module,
                enc,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                do_sample=do_sample,
                seed=mix_seed(seed, start) if do_sample else None,
                eos_id=eos_id,
                pad_id=tokenizer.pad_token_id,
            )
            for prompt, ids in zip(chunk, completions):
                finished = bool(ids) and ids[-1] == eos_id
                body = ids[:-1] if finished else ids
                response = tokenizer.decode(body, skip_special_tokens=True)
                records.append({"prompt": prompt, "response": response, "finished": finished})
        _write_jsonl_atomic(path, records)

    return [
        PromptResponse(r["prompt"], r["response"]) for r in records if r["finished"] or not drop_unfinished
    ]


def _write_jsonl_atomic(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "as_module",
    "build_batch",
    "generate_completions",
    "mix_seed",
    "model_device",
    "sampling_mode",
    "seeded",
    "sequence_level_pairs",
    "special_token_ids",
    "split_prompts",
    "tensor_digest",
    "weights_digest",
]
