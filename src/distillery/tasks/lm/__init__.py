"""Language models (``task: lm``): causal LMs from Hugging Face ``transformers``, distilled token by token.

The data (tokenizer, training and test sequences) is prepared once for all seeds. Per seed: the
teacher LM (trained first and cached by config hash, or loaded), then the same student from the
same initial weights trained as a plain SFT student (cross-entropy) and with the configured
distillation terms on the data regime of ``method`` (fixed data, teacher responses, on-policy or
speculative samples, PACED weights), through the one training loop. Every term averages over the
valid (unmasked) tokens of the global batch. Students are saved with ``save_pretrained`` (and the
tokenizer, which adds ``<bos>`` exactly when training rows start with it) in ``<arm>/model/``.

Data: the built-in Austen corpus and arithmetic task, or the user's own (``data.name`` text,
prompt_completion, messages: :mod:`distillery.tasks.lm.user_data`). Every method runs on any prompt
data; task accuracy and PACED judge answers with the arithmetic checker or ``data.verifier``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from distillery import functional as DF
from distillery.cache import OutputCache, OutputSource, weights_sha256
from distillery.data.text import TokenDataset, lm_datasets, split_austen
from distillery.data.text.arithmetic import verify
from distillery.data.text.collate import encode_texts, special_ids
from distillery.data.text.context import REWARD_TEXT, split_template
from distillery.data.text.stream import TextStream
from distillery.data.text.tokenizer import (
    TokenizerNotFoundError,
    load_pretrained_tokenizer,
    save_training_tokenizer,
    tokenizer_differences,
    tokenizer_sha256,
)
from distillery.errors import ConfigError
from distillery.eval.lm import lm_metrics, task_accuracy
from distillery.fileio import is_local_source
from distillery.generation import (
    SAMPLED_KEY,
    OnPolicyBatches,
    PacedBatches,
    SpeculativeBatches,
    sequence_level_pairs,
)
from distillery.generation.revision import RevisionBatches
from distillery.losses import LOSSES, build_objective
from distillery.losses.logit import CrossEntropyConfig
from distillery.models.causal_lm import build_causal_lm
from distillery.models.ensemble import CausalLMEnsemble
from distillery.models.hf import HFCausalLMAdapter, chunked_loss_support
from distillery.models.hub import check_model_dir, from_pretrained
from distillery.models.peft import (
    apply_peft,
    check_peft_targets,
    load_peft_student,
    save_peft_student,
)
from distillery.models.placement import offload_to_cpu
from distillery.tasks.base import BASELINE, DISTILLED, ArmJob, BaseTask, Metric, RunContext, TeacherSpec
from distillery.tasks.lm.config import CROSS_TOKENIZER_TERMS, USER_FORMATS, LMRunConfig
from distillery.tasks.lm.self_context import (
    base_rows,
    build_contexts,
    check_lengths,
    default_fields,
    keep_verified,
    revision_fields,
    self_prompts,
)
from distillery.tasks.lm.user_data import prepare_user_data
from distillery.tasks.outputs import teacher_outputs
from distillery.teachers import FrozenTeacher, OutputCacheTeacher
from distillery.teachers.cross_tokenizer import CrossTokenizerTeacher
from distillery.teachers.multi import MultiTeacher
from distillery.teachers.self_context import SelfContextTeacher, teacher_prompt
from distillery.teachers.server import ServerTeacher, TeacherClient
from distillery.teachers.store import default_cache_root
from distillery.train import TrainConfig, fit
from distillery.train.batches import BatchPlan

# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def prepare_data(cfg: LMRunConfig) -> dict[str, Any]:
    """Tokenizer, training, validation and test sets (and the validation and test problems of a task).

    Austen: the corpus' fixed split (5% of each novel for validation, 5% for test). Arithmetic: the
    validation problems are carved from the training problems (``data.arithmetic.validation``), the
    test problems are disjoint from both. ``data.max_eval_blocks`` caps validation and test alike.
    The user's data: :func:`distillery.tasks.lm.user_data.prepare_user_data`.

    Keys: ``tokenizer``, ``train``, ``validation``, ``test`` (token datasets; streamed text: ``train``
    is a :class:`~distillery.data.text.stream.TextStream`), ``problems`` (None for text, else the
    validation and test problems), ``score(problem, generated_ids) -> float`` (prompt data),
    ``bos_in_rows`` (whether rows start with ``<bos>``), and for arithmetic ``check(prompt,
    completion_text)`` and ``train_pairs``.
    """
    d = cfg.data
    if d.name in USER_FORMATS:
        return prepare_user_data(cfg)
    if d.name == "austen":
        splits = split_austen()
        tokenizer = d.tokenizer.build(list(splits.train))
        sets = lm_datasets(splits, tokenizer, d.seq_len, names=("train", "validation", "test"))
        for name, rows in sets.items():
            if len(rows) == 0:
                raise ConfigError(
                    f"data.seq_len={d.seq_len}: the {name} text of {d.name} holds fewer tokens than one block; "
                    "lower data.seq_len"
                )
        train = sets["train"]
        g = torch.Generator().manual_seed(0)
        if d.max_train_blocks is not None and len(train) > d.max_train_blocks:
            train = train.subset(torch.randperm(len(train), generator=g)[: d.max_train_blocks].sort().values)
        return {"tokenizer": tokenizer, "train": train, "validation": _cap(sets["validation"], d.max_eval_blocks),
                "test": _cap(sets["test"], d.max_eval_blocks), "problems": None, "bos_in_rows": False}  # fmt: skip
    if d.name == "facts":
        return _prepare_facts(cfg)
    a = d.arithmetic
    task = a.build()
    pairs, test_pairs = task.split(a.train, a.test)
    n_val = a.validation_count()
    val_pairs, train_pairs = pairs[:n_val], pairs[n_val:]
    text = [p.prompt + p.response for p in train_pairs]
    tokenizer = d.tokenizer.build(text)
    try:
        sets = {
            name: TokenDataset.from_pairs(rows, tokenizer, d.seq_len)
            for name, rows in (("train", train_pairs), ("validation", val_pairs), ("test", test_pairs))
        }
    except ValueError as exc:  # a prompt that fills the whole sequence
        raise ConfigError(
            f"data.seq_len={d.seq_len} is too short for the arithmetic problems of data.arithmetic.digits="
            f"{list(a.digits)}: {str(exc).split('; raise')[0]}; raise data.seq_len"
        ) from None
    check = functools.partial(verify, eos=tokenizer.eos_token, reverse=task.reverse)

    def score(pair: Any, ids: list[int]) -> float:  # the completion as text, special tokens kept
        return float(check(pair.prompt, tokenizer.decode(ids, skip_special_tokens=False)))

    return {"tokenizer": tokenizer, "train": sets["train"], "validation": _cap(sets["validation"], d.max_eval_blocks),
            "test": _cap(sets["test"], d.max_eval_blocks), "problems": {"validation": val_pairs, "test": test_pairs},
            "train_pairs": train_pairs, "check": check, "score": score, "bos_in_rows": True}  # fmt: skip


def _prepare_facts(cfg: LMRunConfig) -> dict[str, Any]:
    """The fact task: closed-book questions (train and test phrasings of the same facts); validation
    questions carved from the training ones. ``contexts`` gives each question's passage (the
    ``{passage}`` of a self-context teacher); ``base_pairs`` are the questions about *other* invented
    people (the task with the next seed), on which a model first learns to read passages
    (``teacher.train`` with ``teacher.source: self``) without being told the facts it is tested on."""
    d, f = cfg.data, cfg.data.facts
    task = f.build()
    pairs, test_pairs = task.split()
    n_val = f.validation_count()
    val_pairs, train_pairs = pairs[:n_val], pairs[n_val:]
    base = f.model_copy(update={"seed": f.seed + 1, "entities": f.base_entities, "validation": 0}).build()
    base_pairs = base.split()[0]
    text = [p.prompt + p.response for p in train_pairs] + task.passages() + base.passages()
    tokenizer = d.tokenizer.build(text)
    try:
        sets = {
            name: TokenDataset.from_pairs(rows, tokenizer, d.seq_len)
            for name, rows in (("train", train_pairs), ("validation", val_pairs), ("test", test_pairs))
        }
    except ValueError as exc:
        raise ConfigError(f"data.seq_len={d.seq_len} is too short for the fact questions: {exc}") from None
    eos = tokenizer.eos_token

    def score(pair: Any, ids: list[int]) -> float:
        return float(task.verify(pair.prompt, tokenizer.decode(ids, skip_special_tokens=False), eos=eos))

    def contexts(pair: Any) -> dict[str, str]:
        owner = task if pair.prompt in task else base
        return {"response": pair.response, "passage": owner.context(pair.prompt)}

    answers = encode_texts(tokenizer, [p.response for p in train_pairs + test_pairs])
    return {"tokenizer": tokenizer, "train": sets["train"], "validation": _cap(sets["validation"], d.max_eval_blocks),
            "test": _cap(sets["test"], d.max_eval_blocks), "problems": {"validation": val_pairs, "test": test_pairs},
            "train_pairs": train_pairs, "base_pairs": base_pairs, "contexts": contexts,
            "check": lambda prompt, text: task.verify(prompt, text, eos=eos), "score": score, "bos_in_rows": True,
            "max_answer_tokens": max(len(a) for a in answers) + 1}  # fmt: skip


def _cap(dataset: TokenDataset, limit: int | None) -> TokenDataset:
    if limit is not None and len(dataset) > limit:
        return dataset.subset(torch.arange(limit))
    return dataset


def method_data(cfg: LMRunConfig, data: dict, teacher: nn.Module, seed: int, console: Console):
    """``(training set, batch transform)`` of the distilled arm for ``cfg.method``."""
    m, tokenizer = cfg.method, data["tokenizer"]
    pad_id, _, eos_id = special_ids(tokenizer)
    if m.name == "token":
        return data["train"], None
    if m.name == "sequence":
        cache = default_cache_root().parent / "sequences"
        own = cfg.teacher.source == "self"
        prompts = self_prompts(cfg.teacher.context, data) if own else data["train_pairs"]
        pairs = sequence_level_pairs(
            teacher, prompts, tokenizer, cache_dir=cache, max_new_tokens=m.max_new_tokens
        )
        console.print(
            f"  seed {seed}: {len(pairs)} teacher responses for sequence-level KD (cached in {cache})"
        )
        if own:  # SDFT: the model's rewrites, each kept when still correct, else the reference response
            pairs, kept = keep_verified(data, pairs, tokenizer)
            console.print(
                f"  seed {seed}: {kept:.0%} of the rewrites pass the verifier; the rest keep the reference"
            )
        return TokenDataset.from_pairs(pairs, tokenizer, cfg.data.seq_len), None
    common = {"max_new_tokens": m.max_new_tokens, "temperature": m.temperature, "seed": seed}
    if m.name == "on_policy":
        return data["train"], OnPolicyBatches(m.student_lambda, pad_id=pad_id, eos_id=eos_id, **common)
    if m.name == "paced":  # fixed responses; each problem weighted by the student's pass rate on it
        p = m.paced
        check, by_example = data["check"], None
        if check is None:  # the user's data: each example scored against its own reference
            examples, score = data["train_examples"], data["score"]

            def by_example(index: int, ids: list[int]) -> float:
                return score(examples[index], ids)

        return data["train"], PacedBatches(
            check,
            tokenizer,
            samples=p.samples,
            a=p.a,
            b=p.b,
            normalize=p.normalize,
            every=p.every,
            from_step=p.from_step,
            pad_id=pad_id,
            eos_id=eos_id,
            score_example=by_example,
            **common,
        )
    return data["train"], SpeculativeBatches(
        teacher, top_k=m.top_k, student_lambda=m.student_lambda, pad_id=pad_id, eos_id=eos_id, **common
    )


def _aligned_loss(cfg: LMRunConfig, shared_vocab: int, padded: bool) -> dict:
    """The loss section with ``vocab_size`` set to the shared tokenizer size when vocabularies are padded."""
    if not padded:
        return cfg.loss
    out = {}
    for label, term in cfg.loss.items():
        if "vocab_size" in type(term).model_fields and term.vocab_size is None:
            term = term.model_copy(update={"vocab_size": shared_vocab})
        out[label] = term
    return out


def check_model_tokenizers(cfg: LMRunConfig, tokenizer: Any, teacher_tokenizer: Any = None) -> list[str]:
    """Refuse pretrained models saved with a tokenizer other than the run's; return notes for the log.

    Token-level distillation compares distributions id by id, so the teacher, the student and the
    data must share one tokenizer (a model whose vocabulary is padded beyond it is fine). A pretrained
    model directory (or hub id) without a tokenizer is assumed to use the run's, with a note. With
    ``teacher.tokenizer`` (the cross-tokenizer terms) the teacher is checked against its own,
    ``teacher_tokenizer``.
    """

    notes = []
    sides = [("teacher", f, m) for f, m in cfg.teacher_models()] + [("student", "student", cfg.student)]
    for who, where, model in sides:
        if model.pretrained is None:
            continue
        field = f"{where}.pretrained" if who == "teacher" else "student.pretrained"
        try:
            own = load_pretrained_tokenizer(model.pretrained, field)
        except TokenizerNotFoundError:
            notes.append(
                f"no tokenizer saved with the {who} {model.pretrained!r}; assuming it uses the run's"
            )
            continue
        # the post-processor (which special tokens a plain tokenizer(text) adds) does not matter: rows
        # are encoded without it; a model saved by distillery has one that adds <bos>
        expected = teacher_tokenizer if who == "teacher" and teacher_tokenizer is not None else tokenizer
        diffs = tokenizer_differences(own, expected, post_processor=False)
        if diffs and expected is not tokenizer:
            raise ConfigError(
                f"the teacher model {model.pretrained!r} comes with a tokenizer that differs from teacher.tokenizer "
                f"(its vs teacher.tokenizer's: {'; '.join(diffs)}); set teacher.tokenizer={{kind: pretrained, "
                f"pretrained: {model.pretrained}}}"
            )
        if diffs:
            raise ConfigError(
                f"the {who} model {model.pretrained!r} comes with a tokenizer that differs from the run's "
                f"(its vs the run's: {'; '.join(diffs)}). Teacher, student and data must share one tokenizer: "
                f"set data.tokenizer={{kind: pretrained, pretrained: {model.pretrained}}}, or for a teacher with "
                f"another tokenizer teacher.tokenizer={{kind: pretrained, pretrained: {model.pretrained}}} with the "
                f"cross-tokenizer loss terms ({', '.join(CROSS_TOKENIZER_TERMS)})"
            )
    return notes


def check_vocab_sizes(
    cfg: LMRunConfig, n_vocab: int, pretrained_student: bool = False, teacher_vocab: int | None = None
) -> None:
    """Refuse a model whose vocabulary is smaller than the tokenizer's ``n_vocab`` ids.

    A model's embedding rows may exceed the tokenizer (a padded vocabulary) but never fall short:
    the data would hold ids the model has no row for. Checked from the config (``vocab_size``), and
    for a pretrained teacher (and, with ``pretrained_student``, a pretrained student) from its saved
    config, which is loaded here: a directory that does not hold a model, or a hub id that cannot be
    reached, fails before anything is trained. ``teacher_vocab``: the teacher's own tokenizer's size
    (``teacher.tokenizer``), default ``n_vocab``.
    """
    sides = [*cfg.teacher_models(), ("student", cfg.student)]
    run_vocab = n_vocab
    for field, model in sides:
        n_vocab = teacher_vocab if field != "student" and teacher_vocab is not None else run_vocab
        if model.pretrained is None:
            if model.vocab_size is not None and model.vocab_size < n_vocab:
                raise ConfigError(
                    f"{field}.vocab_size={model.vocab_size} is smaller than the tokenizer's {n_vocab} ids "
                    f"(data.tokenizer: {cfg.data.tokenizer.kind}); use null (the tokenizer's size) or at least "
                    f"{n_vocab}"
                )
            continue
        if field == "student" and not pretrained_student:
            continue
        import transformers

        where = f"{field}.pretrained"
        if is_local_source(model.pretrained):
            check_model_dir(model.pretrained, where)
        config = from_pretrained(transformers.AutoConfig.from_pretrained, model.pretrained, where, "config")
        rows = getattr(config, "vocab_size", None)
        if isinstance(rows, int) and rows < n_vocab:
            raise ConfigError(
                f"{where}={model.pretrained}: the model has {rows} vocabulary rows, fewer than the "
                f"tokenizer's {n_vocab} ids: it was trained with another tokenizer; set data.tokenizer="
                f"{{kind: pretrained, pretrained: {model.pretrained}}}"
            )


def chunked_loss_plan(cfg: LMRunConfig, student: nn.Module, teacher: nn.Module | None) -> tuple[bool, str]:
    """Whether the training loss is computed chunk by chunk from hidden states, and why (for the log).

    ``chunked_loss.enabled``: ``false`` never; ``true`` always (a model that cannot is an error:
    the configuration already refused loss terms and methods that cannot); ``auto`` when every term
    and both models support it and one micro-batch's logits (``batch_size / grad_accum`` sequences of
    ``data.seq_len`` tokens times the student's vocabulary) exceed ``chunked_loss.threshold`` values.
    """

    c = cfg.chunked_loss
    if c.enabled is False:
        return False, "off (chunked_loss.enabled=false)"
    reasons = [
        f"loss.{label} ({term.name}) needs full logits"
        for label, term in cfg.loss.items()
        if not LOSSES[term.name][1].supports_hidden
    ]
    if cfg.method.name == "paced":
        reasons.append("method.name=paced weights each row")
    server = getattr(cfg.teacher, "source", None) == "server"
    if server and cfg.teacher.server.top_k is None:
        reasons.append(
            "teacher.source=server with the full vocabulary answers with logits, not hidden states"
        )
    if cfg.train.parallel == "fsdp":
        reasons.append(
            "train.parallel=fsdp shards the output heads, which the chunked loss reads outside the forward"
        )
    if getattr(cfg.teacher, "offload", False):
        reasons.append(
            "teacher.offload=true keeps the teacher's head off the device between its layers' forwards"
        )
    for who, model in (("student", student), ("teacher", teacher)):
        why = None if model is None else chunked_loss_support(model)
        if why is not None:
            reasons.append(f"the {who}: {why}")
    if reasons:
        if c.enabled is True:
            raise ConfigError(
                f"chunked_loss.enabled=true, but {'; '.join(reasons)}; set chunked_loss.enabled=auto"
            )
        return False, f"off ({'; '.join(reasons)})"
    vocab = student.get_output_embeddings().weight.shape[0]
    tokens = cfg.train.batch_size // cfg.train.grad_accum * cfg.data.seq_len
    if c.enabled == "auto" and not DF.should_chunk(tokens, vocab, c.threshold):
        return False, f"off (auto: {tokens:,} tokens x {vocab:,} vocabulary <= threshold {c.threshold:,})"
    return (
        True,
        f"on, {c.chunk_size} tokens per chunk ({tokens:,} tokens x {vocab:,} vocabulary per micro-batch)",
    )


# ----------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------


class LMTask(BaseTask):
    config = LMRunConfig
    metrics = (
        Metric(
            "perplexity", "perplexity", 2, higher_is_better=False,
            doc="exp of the mean next-token NLL over the test tokens",
        ),
        Metric("nll", "NLL / token", 3, higher_is_better=False),
        Metric(
            "agreement", "agreement %", 1, paired=False, unit="%", doc="top-1 next-token agreement with the teacher"
        ),
        Metric(
            "task_accuracy", "task accuracy %", 1, unit="%", doc="exact match of greedy answers to the test problems"
        ),
        Metric(
            "context_accuracy", "with context %", 1, paired=False, unit="%",
            doc="teacher.source=self: task accuracy of the starting model given the teacher's privileged context",
        ),
    )  # fmt: skip

    def __init__(self, cfg: LMRunConfig, context: RunContext) -> None:
        import transformers

        super().__init__(cfg, context)
        transformers.utils.logging.disable_progress_bar()  # our own progress display only
        self.data = prepare_data(cfg)
        self.tokenizer = self.data["tokenizer"]
        self.n_vocab = len(self.tokenizer)
        special_ids(self.tokenizer)  # a clear error now if pad, bos or eos is missing
        t = cfg.teacher
        self.cross = getattr(t, "tokenizer", None) is not None  # a teacher with its own tokenizer
        # the cross-tokenizer terms take their teacher's outputs realigned through the texts
        self.cross_terms = any(term.name in CROSS_TOKENIZER_TERMS for term in cfg.loss.values())
        # the teacher's data: the same rows tokenized with its tokenizer (trains and evaluates it)
        self.teacher_data = prepare_data(cfg.model_copy(update={"data": self._teacher_data_config()})) \
            if self.cross else self.data  # fmt: skip
        self.teacher_tokenizer = self.teacher_data["tokenizer"]
        self.teacher_vocab = len(self.teacher_tokenizer)
        if self.cross:
            special_ids(self.teacher_tokenizer)
        # the config's sizes and a pretrained teacher, before anything runs
        check_vocab_sizes(cfg, self.n_vocab, teacher_vocab=self.teacher_vocab)
        for note in check_model_tokenizers(
            cfg, self.tokenizer, self.teacher_tokenizer if self.cross else None
        ):
            context.console.print(f"  note: {note}")
        if t is not None and t.source == "cache" and t.outputs.k is not None and t.model.pretrained is None:
            vocab = t.model.vocab_size or self.n_vocab  # checked now, not after the teacher has trained
            if t.outputs.k > vocab:
                raise ConfigError(
                    f"teacher.outputs.k={t.outputs.k} must be between 1 and the vocabulary size {vocab} (the "
                    "teacher's ids per token); lower teacher.outputs.k, or use teacher.outputs.kind=dense"
                )
        if t is not None and t.source == "self" and cfg.student.pretrained is None:
            # checked now, before anything is trained (a pretrained student: when its arm is built)
            bos_id = special_ids(self.tokenizer)[1]
            check_lengths(
                cfg, self.data["train"], self._contexts(self.data), cfg.student.max_positions, bos_id
            )
        # a teacher server: reached, its model named and its tokenizer compared now, before anything trains
        self.server_teacher = self._connect_server() if t is not None and t.source == "server" else None
        if cfg.student.peft is not None:  # adapters on layers the student has, checked before anything trains
            check_peft_targets(self._student_skeleton, cfg.student.peft)
        if cfg.eval.max_new_tokens is not None:
            self.max_new = cfg.eval.max_new_tokens
        elif cfg.data.name in (*USER_FORMATS, "facts"):
            self.max_new = min(self.data.get("max_answer_tokens", 1), cfg.data.seq_len)
        else:
            self.max_new = cfg.data.arithmetic.digits[1] + 2
        self._chunk_plan: tuple[bool, str] | None = None

    def prepare(self, seed: int) -> dict[str, Any]:
        return {**self.data, "seed": seed}  # the same text for every seed

    def describe(self, data: dict[str, Any]) -> str:
        d = self.cfg.data
        train = data["train"]
        where = f"{d.name} ({d.train.describe()})" if d.train is not None else d.name
        if isinstance(train, TextStream):
            amount = "streamed training blocks (read on the fly)"
        else:
            amount = f"{len(train)} training"
        tail = "" if isinstance(train, TextStream) else f" ({train.num_targets():,} training targets)"
        return (
            f"data: {where}, tokenizer {d.tokenizer.kind} ({self.n_vocab} tokens), {amount} / "
            f"{len(data['validation'])} validation / {len(data['test'])} test sequences of <= {d.seq_len} tokens"
            + tail
        )

    def train_set(self, data: dict[str, Any], train: TrainConfig, seed: int) -> Any:
        """The training set a ``fit`` of ``train`` with ``seed`` reads: the data's, or for streamed text a
        view of ``train.steps`` batches in the loop's batch order (see :mod:`distillery.data.text.stream`)."""
        dataset = data["train"]
        if not isinstance(dataset, TextStream):
            return dataset
        n = train.steps * train.batch_size
        order = BatchPlan(n, n, seed).indices(0)  # the loop's order of the n indices (one epoch)
        return dataset.view(train.steps, train.batch_size, seed, order)

    def _connect_server(self) -> ServerTeacher:
        """The teacher behind ``teacher.url``: its model listed, the tokenization of a probe string compared
        with the run's tokenizer (a server with another vocabulary is refused here)."""
        t, s = self.cfg.teacher, self.cfg.teacher.server
        token = os.environ.get(s.token_env) or None
        client = TeacherClient(
            t.url, top_k=s.top_k or self.n_vocab, vocab_size=self.n_vocab, model=s.model, token=token,
            timeout_s=s.timeout_s, retries=s.retries, backoff_s=s.backoff_s, max_concurrency=s.concurrency,
            batch_rows=s.batch_rows,
        )  # fmt: skip
        name = client.model  # GET /v1/models: an unreachable URL fails here
        client.check_tokenizer(self.tokenizer)
        how = "the full vocabulary" if s.top_k is None else f"top-{s.top_k} + tail"
        self.context.console.print(f"  teacher server: {t.url} ({name}), {how} per token")
        return ServerTeacher(client, prefetch=s.prefetch)

    def _student_skeleton(self) -> nn.Module:
        """The student's architecture without its weights (to be built on the meta device)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        s = self.cfg.student
        if s.pretrained is None:
            return build_causal_lm(s, self.n_vocab, None, "student")
        config = from_pretrained(AutoConfig.from_pretrained, s.pretrained, "student.pretrained", "config")
        return AutoModelForCausalLM.from_config(config)

    def new_student(self, data: dict[str, Any]) -> nn.Module:
        """The student as configured; with ``student.peft``, its base wrapped with LoRA adapters (only they
        train: the runner's initial weights then include the base, the same in every arm)."""
        model = build_causal_lm(self.cfg.student, self.n_vocab, self.tokenizer, "student")
        return model if self.cfg.student.peft is None else apply_peft(model, self.cfg.student.peft)

    # ---- teacher ----------------------------------------------------------------------------------

    def teacher(self, data: dict[str, Any]) -> TeacherSpec | None:
        t = self.cfg.teacher
        if t is None:
            return None
        if t.source == "self":
            return self._self_base(data)
        if t.source == "server":  # nothing to train, cache or evaluate here: it runs on its server
            return None
        if t.source == "members":  # each member obtained and cached as it would be alone, then combined
            names = t.member_names()
            specs = [
                self._frozen_spec(m.model, m.train, data, f"teacher.members.{i}.model", t.cache, t.cache_dir, names[i])
                for i, m in enumerate(t.members)
            ]  # fmt: skip
            weights = t.weights if t.combine == "weighted" else None
            return TeacherSpec(members=specs, combine=lambda modules: CausalLMEnsemble(modules, weights))
        return self._frozen_spec(t.model, t.train, data, "teacher.model", t.cache, t.cache_dir)

    def _frozen_spec(
        self, model_cfg: Any, train_cfg: TrainConfig | None, data: dict[str, Any], where: str, cache: bool,
        cache_dir: str | None, label: str | None = None,
    ) -> TeacherSpec:  # fmt: skip
        """A frozen teacher LM: loaded (``model.pretrained``), or trained on the training rows (in its own
        tokens with ``teacher.tokenizer``) and cached by everything that determines it."""

        def build() -> nn.Module:
            return build_causal_lm(model_cfg, self.teacher_vocab, self.teacher_tokenizer, where)

        if train_cfg is None:
            return TeacherSpec(load=lambda: (build(), model_cfg.pretrained), label=label)
        seed = data["seed"]
        rows = {**self.teacher_data, "seed": seed} if self.cross else data

        def train() -> nn.Module:
            # a pretrained student that cannot be loaded fails now, not after the teacher's training
            check_vocab_sizes(
                self.cfg, self.n_vocab, pretrained_student=True, teacher_vocab=self.teacher_vocab
            )
            torch.manual_seed(1000 + seed)
            model = build()
            rows_set = self.train_set(rows, train_cfg, 1000 + seed)
            return self._train_ce(
                model, rows_set, train_cfg, 1000 + seed, f"seed {seed} {label or 'teacher'}"
            )

        import transformers

        key = {
            "kind": "lm-teacher",
            "transformers": transformers.__version__,
            "model": model_cfg.model_dump(mode="json"),
            "train": train_cfg.model_dump(mode="json"),
            # the data as the teacher reads it: with teacher.tokenizer, the key of a run whose tokenizer it is
            "data": (self._teacher_data_config() if self.cross else self.cfg.data).cache_dump(),
            "seed": seed,
        }
        if "digest" in rows:  # the user's data: what it holds, not only where it is
            key["data_digest"] = rows["digest"]
        return TeacherSpec(
            build=build, train=train, cache_key=key, cache=cache, cache_dir=cache_dir, label=label
        )

    def _train_ce(self, model: nn.Module, rows: Any, train: TrainConfig, seed: int, label: str) -> nn.Module:
        """``model`` trained with cross-entropy on ``rows`` (a teacher, or a self-context starting model)."""
        fit(
            model,
            rows,
            build_objective({"ce": CrossEntropyConfig()}),
            train,
            adapter=HFCausalLMAdapter(),
            seed=seed,
            accelerator=self.context.accelerator,
            progress=self.context.progress,
            label=label,
        )
        return model

    def _teacher_data_config(self) -> Any:
        """The data section as a teacher with its own tokenizer reads it (its tokenizer, its block length)."""
        t = self.cfg.teacher
        return self.cfg.data.model_copy(
            update={"tokenizer": t.tokenizer, "seq_len": t.seq_len or self.cfg.data.seq_len}
        )

    def _self_base(self, data: dict[str, Any]) -> TeacherSpec:
        """``teacher.source: self``: the shared starting model, which is both arms' initial weights and the
        teacher's. The student as configured (``student.pretrained``, or a fresh model), trained first on
        :func:`~distillery.tasks.lm.self_context.base_rows` when ``teacher.train`` is set (cached like a
        teacher)."""
        cfg, t, seed = self.cfg, self.cfg.teacher, data["seed"]

        def build() -> nn.Module:
            return build_causal_lm(cfg.student, self.n_vocab, self.tokenizer, "student")

        if t.train is None:
            return TeacherSpec(
                load=lambda: (build(), cfg.student.pretrained or "the student's initial weights")
            )

        def train() -> nn.Module:
            torch.manual_seed(1000 + seed)
            model = build()
            pad_id, bos_id, _ = special_ids(self.tokenizer)
            base = data.get("base_pairs")
            rows = (
                data["train"]
                if base is None
                else TokenDataset.from_pairs(base, self.tokenizer, cfg.data.seq_len)
            )
            contexts = self._contexts(data, base)
            rows = base_rows(rows, contexts, t.train_context, bos_id=bos_id, pad_id=pad_id,
                             max_length=self._max_length(model), truncate=t.truncate_context, seed=1000 + seed)  # fmt: skip
            return self._train_ce(model, rows, t.train, 1000 + seed, f"seed {seed} starting model")

        import transformers

        key = {
            "kind": "lm-self-base",
            "transformers": transformers.__version__,
            # the starting model is the student's base: its adapters (student.peft) do not change it
            "model": cfg.student.model_dump(mode="json", exclude={"peft"}),
            "train": t.train.model_dump(mode="json"),
            "data": cfg.data.cache_dump(),
            "context": t.context,
            "train_context": t.train_context,
            "truncate_context": t.truncate_context,
            "seed": seed,
        }
        if "digest" in data:
            key["data_digest"] = data["digest"]
        return TeacherSpec(build=build, train=train, cache_key=key, cache=t.cache, cache_dir=t.cache_dir)

    def _contexts(self, data: dict[str, Any], pairs: list | None = None) -> list:
        """The context table of ``pairs`` (default: the training pairs), indexed like their rows."""
        fields = data.get("contexts", default_fields)
        pairs = pairs or data["train_pairs"]
        if (
            self.cfg.method.name == "revision"
        ):  # fixed rows: a correct or a wrong attempt (another row's answer)
            fields = revision_fields(pairs, fields, data.get("check"))
        return build_contexts(self.cfg.teacher.context, pairs, self.tokenizer, fields)

    def _revision(self, teacher: SelfContextTeacher, data: dict[str, Any]) -> RevisionBatches:
        """SD-Zero's data step: the student's attempt judged by the task's verifier, revised by ``teacher``."""
        m, tokenizer, pairs = self.cfg.method, self.tokenizer, data["train_pairs"]
        pad_id, bos_id, eos_id = special_ids(tokenizer)
        fields = data.get("contexts", default_fields)

        def judge(index: int, ids: list[int]) -> bool:
            return data["score"](pairs[index], ids) > 0

        def context(index: int, prompt: list[int], attempt: list[int], reward: bool) -> list[int]:
            text = tokenizer.decode(attempt, skip_special_tokens=True)
            values = {**fields(pairs[index]), "attempt": text, "reward": REWARD_TEXT[reward]}
            before, after = split_template(self.cfg.teacher.context, values)
            ids = encode_texts(tokenizer, [before, after or ""])
            return teacher_prompt(prompt, (ids[0], None if after is None else ids[1]), bos_id, None, False)

        return RevisionBatches(
            lambda: teacher.module, judge=judge, context=context, max_new_tokens=m.max_new_tokens,
            temperature=m.temperature, seed=data["seed"], pad_id=pad_id, eos_id=eos_id,
        )  # fmt: skip

    @staticmethod
    def _max_length(model: nn.Module) -> int:
        return int(getattr(model.config, "max_position_embeddings", None) or 2**31)

    def _self_teacher(self, student: nn.Module, data: dict[str, Any], adapter: Any) -> SelfContextTeacher:
        t = self.cfg.teacher
        pad_id, bos_id, _ = special_ids(self.tokenizer)
        contexts = self._contexts(data)
        check_lengths(self.cfg, data["train"], contexts, self._max_length(student), bos_id)
        return SelfContextTeacher(
            student,
            contexts,
            adapter,
            weights=t.weights,
            momentum=t.momentum,
            pad_id=pad_id,
            bos_id=bos_id,
            max_length=self._max_length(student),
            truncate=t.truncate_context,
        )

    # ---- teacher outputs (teacher.source: cache) ----------------------------------------------------

    def output_source(self, data: dict[str, Any], teacher: nn.Module) -> OutputSource:
        """The teacher's next-token distributions at every position of every training row (padded to the
        longest row); positions without a target are stored as zeros."""
        train = data["train"]
        if isinstance(train, TextStream):
            raise ConfigError(
                "teacher.source=cache needs the training rows ahead of training; streamed text has none"
            )
        return OutputSource(
            dataset=train,
            forward=FrozenTeacher(teacher, HFCausalLMAdapter()),
            keys=("input_ids", "attention_mask"),
            vocab_size=int(teacher.get_output_embeddings().weight.shape[0]),
            identity={
                "task": "lm",
                "teacher": weights_sha256(teacher),
                "tokenizer": tokenizer_sha256(self.tokenizer),
            },
            positions=int(train.lengths().max()) - 1,
            valid=lambda batch: batch["labels"][:, 1:] != -100,
            device=self.context.accelerator.device,
        )

    def teacher_outputs(
        self, data: dict[str, Any], teacher: nn.Module, write: bool | None = None
    ) -> OutputCache:
        """The seed's cache of the teacher's outputs over the training rows, written when missing."""
        outputs = self.cfg.teacher.outputs
        return teacher_outputs(
            outputs,
            self.output_source(data, teacher),
            data["seed"],
            self.context,
            batch_size=outputs.batch_size or self.cfg.eval.batch_size,
            tokens=data["train"].num_targets(),
            write=write,
        )

    # ---- evaluation -------------------------------------------------------------------------------

    def evaluate(
        self, model: nn.Module, data: dict[str, Any], split: str, teacher: nn.Module | None
    ) -> dict[str, float]:
        if self.cross:  # agreement needs one vocabulary; the teacher itself (teacher=None) reads its own rows
            if teacher is None:
                return self._evaluate_rows(
                    model, {**self.teacher_data, "seed": data.get("seed")}, split, None
                )
            teacher = None
        return self._evaluate_rows(model, data, split, teacher)

    def _evaluate_rows(
        self, model: nn.Module, data: dict[str, Any], split: str, teacher: nn.Module | None
    ) -> dict[str, float]:
        device = self.context.accelerator.device
        vocab = len(data["tokenizer"])
        out = lm_metrics(model, data[split], self.cfg.eval.batch_size, device, teacher, vocab)
        if data["problems"] is not None and hasattr(
            model, "generate"
        ):  # an ensemble of teachers: likelihoods only
            out["task_accuracy"] = task_accuracy(
                model, data["tokenizer"], data["problems"][split], device, self.max_new, data["score"]
            )
            t = self.cfg.teacher
            # the starting model, as the teacher (a reviser's context needs an attempt: not measured)
            if (
                teacher is None
                and t is not None
                and t.source == "self"
                and self.cfg.method.name != "revision"
            ):
                problems = self_prompts(t.context, {**data, "train_pairs": data["problems"][split]})
                longest = max(len(ids) for ids in encode_texts(self.tokenizer, [p.prompt for p in problems]))
                if longest + 1 + self.max_new > self._max_length(model):  # would not fit: not measured
                    return out
                originals = dict(zip(map(id, problems), data["problems"][split]))
                out["context_accuracy"] = task_accuracy(
                    model, self.tokenizer, problems, device, self.max_new,
                    lambda p, ids: data["score"](originals[id(p)], ids),
                )  # fmt: skip
        return out

    # ---- arms -------------------------------------------------------------------------------------

    def _chunked(self, student: nn.Module, teacher: nn.Module | None) -> bool:
        """Whether the loss is computed chunk by chunk (decided once, from the first seed's models)."""
        if self._chunk_plan is None:
            self._chunk_plan = chunked_loss_plan(self.cfg, student, teacher)
            self.context.console.print(f"  chunked loss: {self._chunk_plan[1]}")
        return self._chunk_plan[0]

    def arm(
        self,
        name: str,
        data: dict[str, Any],
        teacher: nn.Module | None,
        init_state: dict[str, Any],
        trained: dict[str, nn.Module],
    ) -> ArmJob:
        cfg = self.cfg
        own = cfg.teacher is not None and cfg.teacher.source == "self"
        # source=self: both arms start from the shared starting model, which is also the teacher (with
        # student.peft, the base under the adapters, whose initial weights are the same in every arm)
        if own and cfg.student.peft is not None:
            base = build_causal_lm(cfg.student, self.n_vocab, self.tokenizer, "student")
            base.load_state_dict(teacher.state_dict())
            student = apply_peft(base, cfg.student.peft)
            student.load_state_dict({k: v for k, v in init_state.items() if "lora_" in k}, strict=False)
        else:
            student = self.new_student(data)
            student.load_state_dict(teacher.state_dict() if own else init_state)
        cached = cfg.teacher is not None and cfg.teacher.source == "cache"
        # a cached teacher's forward runs only on on-policy batches: whether its head supports the
        # chunked loss matters then only
        chunked = self._chunked(student, None if cached and cfg.method.name != "on_policy" else teacher)
        adapter = HFCausalLMAdapter(hidden_states=chunked)
        transform = None
        if name == BASELINE:
            objective = build_objective({"ce": CrossEntropyConfig()})
            train_cfg, arm_teacher = cfg.baseline.train or cfg.train, None
            train_set = self.train_set(data, train_cfg, data["seed"])
        else:
            first = (
                teacher.members[0] if isinstance(teacher, CausalLMEnsemble) else teacher
            )  # members: one size
            student_rows = student.get_output_embeddings().weight.shape[0]
            padded = (
                teacher is not None
                and not self.cross
                and first.get_output_embeddings().weight.shape[0] != student_rows
            ) or (self.server_teacher is not None and student_rows != self.n_vocab)  # fmt: skip
            objective = build_objective(_aligned_loss(cfg, self.n_vocab, padded))
            train_cfg = cfg.train
            arm_teacher = None if teacher is None else self._frozen_teacher(teacher, adapter)
            if (
                cfg.teacher is not None and cfg.teacher.source == "members"
            ):  # combined per token; the ensemble's members run one by one
                t = cfg.teacher
                arm_teacher = MultiTeacher(
                    [(m, adapter) for m in teacher.members], t.combine, weights=t.weights,
                    confidence=t.confidence or "entropy", temperature=1.0 if t.temperature is None else t.temperature,
                    drop=t.drop, seed=data["seed"], names=t.member_names(), adapter=adapter,
                )  # fmt: skip
            if (
                self.cross_terms
            ):  # another tokenizer (or the cross-tokenizer terms): texts realigned per batch
                arm_teacher = CrossTokenizerTeacher(
                    teacher, self.teacher_tokenizer, self.tokenizer, max_length=self._max_length(teacher)
                )
            if self.server_teacher is not None:
                arm_teacher = self.server_teacher
            if own:  # None when no term asks the teacher (SDFT: the teacher only generates)
                arm_teacher = self._self_teacher(student, data, adapter) if objective.needs_teacher else None
            if cached:
                arm_teacher = OutputCacheTeacher(
                    self.teacher_outputs(data, teacher),
                    positions=lambda batch: batch["input_ids"].shape[1] - 1,
                    live=arm_teacher if cfg.method.name == "on_policy" else None,
                    use_live=lambda batch: SAMPLED_KEY in batch,
                )
            if cfg.method.name == "revision":
                train_set, transform = data["train"], self._revision(arm_teacher, data)
            else:
                train_set, transform = method_data(cfg, data, teacher, data["seed"], self.context.console)
            train_set = self.train_set({**data, "train": train_set}, train_cfg, data["seed"])
        for term in objective.terms.values():
            term.chunk_size = cfg.chunked_loss.chunk_size

        def record(model: nn.Module, final: dict[str, float]) -> dict[str, Any]:
            out: dict[str, Any] = {"chunked_loss": chunked}
            if isinstance(arm_teacher, OutputCacheTeacher):
                out["teacher_calls"] = {"cache": arm_teacher.cache_calls, "live": arm_teacher.live_calls}
            if isinstance(arm_teacher, MultiTeacher):
                out["multi_teacher"] = {"combine": cfg.teacher.combine, **arm_teacher.metrics(),
                                        "members": arm_teacher.member_metrics()}  # fmt: skip
            if isinstance(arm_teacher, ServerTeacher):
                out["teacher_server"] = arm_teacher.metrics()
            if isinstance(arm_teacher, (SelfContextTeacher, CrossTokenizerTeacher)):
                out["teacher_calls"] = {
                    "calls": arm_teacher.calls,
                    "weights": getattr(arm_teacher, "weights", "frozen"),
                }
            if transform is not None:
                out["sampling"] = transform.metrics()
            return out

        return ArmJob(
            model=student,
            train_set=train_set,
            objective=objective,
            train=train_cfg,
            teacher=arm_teacher,
            adapter=adapter,
            evaluate=lambda model: self.evaluate(model, data, "validation", teacher),
            test=lambda model: self.evaluate(model, data, "test", teacher),
            batch_transform=transform,
            record=record,
        )

    def _frozen_teacher(self, teacher: nn.Module, adapter: Any) -> FrozenTeacher:
        """The arm's frozen teacher in its own dtype (``teacher.model.dtype``; its outputs float32), with
        ``teacher.offload`` kept in CPU memory and brought to the device layer by layer."""
        t = self.cfg.teacher
        if getattr(t, "offload", False):
            offload_to_cpu(teacher, self.context.accelerator.device)
        return FrozenTeacher(teacher, adapter, keep_dtype=True)

    # ---- saving -----------------------------------------------------------------------------------

    def save(self, student: nn.Module, arm_dir: Path, data: dict[str, Any]) -> None:
        """``save_pretrained`` of the student and the tokenizer in ``<arm>/model``; the tokenizer adds
        ``<bos>`` when the training rows start with it (prompt data, the user's text), so that
        ``AutoTokenizer.from_pretrained`` encodes a text as training did. A LoRA student (``student.peft``):
        its adapter in ``<arm>/adapter`` (with the tokenizer) and, with ``peft.merge``, the merged model in
        ``<arm>/model``."""
        peft = self.cfg.student.peft
        if peft is not None:
            save_peft_student(student, arm_dir, peft.merge)
        else:
            student.save_pretrained(arm_dir / "model")
        for folder in ("model", "adapter"):
            if (arm_dir / folder).is_dir():
                save_training_tokenizer(self.tokenizer, arm_dir / folder, add_bos=data["bos_in_rows"])

    def load(self, arm_dir: Path, data: dict[str, Any]) -> nn.Module:
        from transformers import AutoModelForCausalLM

        if not (arm_dir / "model" / "config.json").is_file() and (arm_dir / "adapter").is_dir():
            base = build_causal_lm(self.cfg.student, self.n_vocab, self.tokenizer, "student")
            return load_peft_student(base.float(), arm_dir / "adapter")
        return AutoModelForCausalLM.from_pretrained(arm_dir / "model", dtype=torch.float32)

    def saved(self, arm_dir: Path) -> bool:
        return (arm_dir / "model" / "config.json").is_file() or (
            arm_dir / "adapter" / "adapter_config.json"
        ).is_file()

    # ---- report -----------------------------------------------------------------------------------

    def label(self, arm: str) -> str:
        if arm == DISTILLED and self.cfg.teacher is None:  # e.g. lm-teacher: trained alone, not distilled
            return f"student ({' + '.join(self.cfg.loss)})"
        return {BASELINE: "student SFT", DISTILLED: "student KD"}.get(arm, arm)

    def description(self, arm: str) -> str:
        if arm == BASELINE:
            return "the student trained with cross-entropy on the training data"
        terms = " + ".join(f"{k} (weight {v.weight:g})" for k, v in self.cfg.loss.items())
        return f"the same student (same initial weights and steps) trained with {terms}"
