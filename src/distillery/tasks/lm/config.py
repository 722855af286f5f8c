"""Pydantic models of a language-model distillation run (``task: lm``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from distillery.cache import OutputsConfig
from distillery.cache.config import outputs_for
from distillery.configbase import StrictModel
from distillery.data.tables import TableSource
from distillery.data.text.arithmetic import ArithmeticConfig
from distillery.data.text.context import available_fields, check_template
from distillery.data.text.facts import FactsConfig
from distillery.data.text.tokenizer import BYTE_VOCAB_SIZE, TokenizerConfig
from distillery.data.text.verifiers import VerifierConfig, verifier_shorthand
from distillery.functional import sparse_divergence_support
from distillery.losses import LOSSES, SignalTermConfig
from distillery.models.causal_lm import CausalLMConfig
from distillery.models.peft import PeftConfig
from distillery.tasks.base import DistillationConfigBase, EvalConfig, MembersConfigBase
from distillery.train.config import TrainConfig

BUILT_IN = ("austen", "arithmetic", "facts")
USER_FORMATS = ("text", "prompt_completion", "messages")
PROMPT_DATA = ("arithmetic", "facts", "prompt_completion", "messages")  # data the sampling methods can prompt


class LMFieldsConfig(StrictModel):
    """The field names of the user's data (``data.fields``)."""

    text: str = Field("text", min_length=1, description="text: the text of a row (a .txt file: `text`)")
    prompt: str = Field("prompt", min_length=1, description="prompt_completion: the prompt")
    completion: str = Field(
        "completion", min_length=1, description="prompt_completion: the completion learned"
    )
    messages: str = Field(
        "messages", min_length=1, description="messages: the list of {role, content} messages of a chat"
    )


class LMDataConfig(StrictModel):
    """Text for language modelling (packed blocks) or prompt data: built in, or the user's own files."""

    name: Literal["austen", "arithmetic", "facts", "text", "prompt_completion", "messages"] = Field(
        "austen",
        description="austen: the built-in corpus (packed); arithmetic: the built-in verifiable task; facts: the "
        "built-in knowledge task (invented people, passages of their facts, questions); text: the "
        "user's plain text (packed); prompt_completion: the user's prompt/completion pairs; messages: the user's "
        "chats ({role, content} lists, rendered with the chat template)",
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    seq_len: int = Field(
        128, ge=8, description="tokens per block (packed text) or maximum length (prompt data)"
    )
    max_train_blocks: int | None = Field(None, ge=1, description="use at most this many training blocks")
    max_eval_blocks: int | None = Field(
        64,
        ge=1,
        description="evaluate on at most this many validation and test blocks (prompt data: examples)",
    )
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig)
    facts: FactsConfig = Field(default_factory=FactsConfig, description="facts: the entities and questions")
    # ---- the user's data (text, prompt_completion, messages) ----
    train: TableSource | None = Field(
        None, description="text, prompt_completion, messages: the training data (a file, folder or hub id)"
    )
    validation: TableSource | int | float | None = Field(
        None,
        description="user data: a file, or rows carved from data.train: a count or a fraction (< 1), drawn with "
        "split_seed (null: 5% of the rows; when streaming, a count from the head of the stream)",
    )
    test: TableSource | int | float | None = Field(
        None, description="user data: like validation (a file, a count or a fraction of data.train)"
    )
    split_seed: int = Field(0, description="user data: seed of the rows carved for validation and test")
    fields: LMFieldsConfig = Field(default_factory=LMFieldsConfig)
    chat_template: str | None = Field(
        None,
        description="messages: a Jinja chat template replacing the tokenizer's (null: the tokenizer's; "
        "distillery's bpe/byte tokenizers have a default one)",
    )
    train_on: Literal["all", "last"] | None = Field(
        None,
        description="messages: the assistant turns learned (null: all of them for method.name=token, the last "
        "for the methods that sample a response)",
    )
    verifier: VerifierConfig | None = Field(
        None,
        description="prompt_completion, messages: how task accuracy and PACED judge a generated response: "
        "exact_match, {name: regex, pattern: ...} or a function path package.module:function (null: "
        "exact_match against the completion)",
    )
    shuffle_buffer: int = Field(
        1024, ge=1, description="text with data.train.streaming=true: blocks held and shuffled at a time"
    )
    tokenizer_rows: int = Field(
        10_000, ge=1, description="text with data.train.streaming=true: rows a bpe tokenizer is trained on"
    )

    @field_validator("verifier", mode="before")
    @classmethod
    def _verifier_shorthand(cls, value):
        return verifier_shorthand(value)

    @model_validator(mode="after")
    def _user_data(self) -> LMDataConfig:
        user = self.name in USER_FORMATS
        if user and self.train is None:
            raise ValueError(
                f"data.name={self.name} reads the user's data: set data.train (e.g. {{path: train.jsonl}})"
            )
        if not user:
            given = [f for f in ("train", "validation", "test", "chat_template", "train_on", "verifier")
                     if getattr(self, f) is not None]  # fmt: skip
            if given:
                raise ValueError(
                    f"data.{given[0]} is for the user's data (data.name=text, prompt_completion or messages), but "
                    f"data.name={self.name} is built in"
                    + (
                        f"; its splits are set in data.{self.name}"
                        if self.name in ("arithmetic", "facts")
                        else ""
                    )
                )
            return self
        for split in ("validation", "test"):
            value = getattr(self, split)
            if isinstance(value, float) and not 0.0 < value < 1.0:
                raise ValueError(
                    f"data.{split}={value}: a fraction of data.train must be in (0, 1); or give a count"
                )
            if isinstance(value, int) and value < 1:
                raise ValueError(f"data.{split}={value}: give at least 1 row (a count), a fraction or a file")
        if self.name != "messages":
            for f in ("chat_template", "train_on"):
                if getattr(self, f) is not None:
                    raise ValueError(f"data.{f} is for chats (data.name=messages), not data.name={self.name}")
        if self.name == "text" and self.verifier is not None:
            raise ValueError("data.verifier judges answers to prompts; data.name=text has no prompts")
        if self.streaming:
            if self.name != "text":
                raise ValueError(
                    f"data.train.streaming=true is supported for plain text (data.name=text) only; "
                    f"data.name={self.name} is read into memory: set data.train.streaming=false"
                )
            for split in ("validation", "test"):
                value = getattr(self, split)
                if value is None or isinstance(value, float):
                    raise ValueError(
                        f"data.{split}: with data.train.streaming=true the number of rows is unknown; give "
                        f"data.{split} as a file or as a count of rows taken from the head of the stream"
                    )
                if isinstance(value, TableSource) and value.streaming and self.max_eval_blocks is None:
                    raise ValueError(
                        f"data.{split}.streaming=true needs data.max_eval_blocks (validation and test must be finite)"
                    )
        return self

    @property
    def streaming(self) -> bool:
        """Whether the training data is streamed."""
        return self.train is not None and self.train.streaming

    def cache_dump(self) -> dict:
        """What of this section determines a teacher trained on it (the teacher cache key): all but the
        evaluation caps; for built-in data exactly the fields it had before user data existed, so that
        cached teachers stay valid."""
        if self.name in BUILT_IN:
            fields = {"name", "tokenizer", "seq_len", "max_train_blocks", "arithmetic"}
            return self.model_dump(
                mode="json", include=fields | ({"facts"} if self.name == "facts" else set())
            )
        return self.model_dump(mode="json", exclude={"max_eval_blocks", "verifier", "arithmetic", "facts"})


# the loss terms that compare a teacher and a student through their texts, not id by id
CROSS_TOKENIZER_TERMS = tuple(
    sorted(k for k, (_, cls) in LOSSES.items() if getattr(cls, "cross_tokenizer", False))
)
SELF_FIELDS = ("context", "momentum", "weights", "truncate_context", "train_context")  # source=self only


class ServerConfig(StrictModel):
    """How a teacher server is asked (``teacher.source: server``)."""

    top_k: int | None = Field(
        None,
        ge=1,
        description="log-probabilities per token (vLLM's prompt_logprobs): null: the full vocabulary (dense "
        "terms, exactly the local teacher's distribution); k: the top-k + a tail (the sparse terms forward_kl, "
        "reverse_kl, jsd at temperature 1; a vLLM server needs --max-logprobs >= k)",
    )
    model: str | None = Field(
        None, description="the served model's name (null: the only one /v1/models lists)"
    )
    token_env: str = Field(
        "DISTILLERY_TEACHER_TOKEN",
        description="the environment variable holding the bearer token (kept out of config files); unset: none",
    )
    timeout_s: float = Field(120.0, gt=0.0, description="seconds one request may take")
    retries: int = Field(
        5, ge=0, description="retries of a failed request (exponential backoff) before stopping"
    )
    backoff_s: float = Field(0.5, gt=0.0, description="the first retry's wait; doubled at each retry")
    concurrency: int = Field(4, ge=1, description="requests in flight at once")
    batch_rows: int = Field(16, ge=1, description="rows per request")
    prefetch: bool = Field(
        True,
        description="send each step's rows (and the next step's, for fixed data) before the student's forward, so "
        "that the server works while the student trains",
    )


class LMStudentConfig(CausalLMConfig):
    """The student LM: a causal LM (see :class:`~distillery.models.causal_lm.CausalLMConfig`), optionally
    trained through LoRA adapters (``peft``)."""

    peft: PeftConfig | None = Field(
        None,
        description="train LoRA adapters on the student instead of all its weights (peft): {r, alpha, "
        "target_modules, dropout, merge}",
    )

    @model_validator(mode="after")
    def _adapter_base(self) -> LMStudentConfig:
        if self.peft is not None and not self.peft.merge and self.pretrained is None:
            raise ValueError(
                "conflicting fields: student.peft.merge=false saves the adapter alone, but the student's base "
                "(a model built from a config, student.pretrained=null) cannot be loaded again without its "
                "weights; set student.peft.merge=true, or give student.pretrained"
            )
        return self


class LMTeacherConfig(StrictModel):
    """A frozen teacher LM: trained first by this run (cached by config hash), or loaded. With
    ``source: cache`` its outputs over the training data are computed once into an on-disk cache
    (``distillery cache``, or the run when it is missing) and read from it during training."""

    source: Literal["frozen", "cache", "self", "server"] = Field(
        "frozen",
        description="frozen: the teacher runs on every batch; cache: its outputs are read from disk; self: the "
        "student's own weights, shown the privileged context teacher.context (the teacher section then has no "
        "model: teacher.train trains the shared starting model first); server: a teacher behind a vLLM-compatible "
        "server at teacher.url",
    )
    url: str | None = Field(
        None,
        description="source=server: the server's base URL (e.g. http://127.0.0.1:8000, without /v1): a vLLM "
        "OpenAI-compatible server or `distillery serve-teacher`",
    )
    server: ServerConfig | None = Field(None, description="source=server: how the teacher server is asked")
    model: CausalLMConfig = Field(default_factory=CausalLMConfig)
    tokenizer: TokenizerConfig | None = Field(
        None,
        description="the teacher's own tokenizer (null: the run's, data.tokenizer); a teacher with another "
        "tokenizer is trained and evaluated on the same rows in its tokens and distils through the "
        "cross-tokenizer terms (uld, span_likelihood) only",
    )
    seq_len: int | None = Field(
        None,
        ge=8,
        description="with teacher.tokenizer: the teacher's block length in its own tokens (null: data.seq_len); a "
        "byte-level teacher of a BPE student needs several times the student's",
    )
    train: TrainConfig | None = Field(None, description="train the teacher on the training split first")
    cache: bool = True
    cache_dir: str | None = None
    outputs: OutputsConfig | None = Field(
        None, description="source=cache: what the cache holds (dense, topk + tail, sampled) and where"
    )
    offload: bool = Field(
        False,
        description="source=frozen: keep the teacher's weights in CPU memory and bring each layer to the "
        "training device only for its forward (accelerate's cpu_offload): a teacher that does not fit beside "
        "the student, at the price of a copy per layer per step",
    )
    # ---- source: self ----
    weights: Literal["initial", "live", "ema"] = Field(
        "initial",
        description="source=self: the teacher's weights: a frozen copy of the initial student, the live student "
        "(no gradient), or an EMA of it (teacher.momentum)",
    )
    momentum: float | None = Field(
        None, ge=0.0, le=1.0, description="source=self, weights=ema: the EMA momentum"
    )
    context: str | None = Field(
        None,
        description="source=self: the teacher's prompt, a template over {prompt} (the student's prompt tokens), "
        "{response} (the reference response) and, for data.name=facts, {passage}; e.g. 'Answer: {response}\\n{prompt}'",
    )
    truncate_context: bool = Field(
        False,
        description="source=self: drop a context's first tokens when the teacher's input would exceed the model's "
        "maximum length (false: such a row is an error)",
    )
    train_context: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="source=self with teacher.train: the share of the starting model's training rows shown in the "
        "teacher's format (context + prompt), so that it learns to read the context",
    )

    def _self_source(self) -> LMTeacherConfig:
        """source=self: the student's own weights, a context template, no model of its own."""
        if self.model != CausalLMConfig():  # a saved config.yaml holds the default: that is not a choice
            raise ValueError(
                "conflicting fields: teacher.model is set, but teacher.source=self teaches with the student's own "
                "weights (the student section); drop teacher.model (a pretrained start: student.pretrained)"
            )
        if self.context is None:
            raise ValueError(
                "teacher.source=self needs teacher.context, the template of the teacher's prompt, e.g. "
                "'Answer: {response}\\n{prompt}' (the gold answer as privileged context)"
            )
        if self.outputs is not None:
            raise ValueError("teacher.outputs is for teacher.source=cache; drop it with teacher.source=self")
        if self.url is not None or self.server is not None:
            raise ValueError("teacher.url and teacher.server are for teacher.source=server, not source=self")
        if self.weights == "ema" and self.momentum is None:
            raise ValueError(
                "teacher.weights=ema needs teacher.momentum, the EMA momentum (e.g. 0.99: the share the teacher "
                "keeps per step)"
            )
        if self.weights != "ema" and self.momentum is not None:
            raise ValueError(
                f"conflicting fields: teacher.momentum is for teacher.weights=ema, not {self.weights}"
            )
        return self

    def _server_source(self) -> LMTeacherConfig:
        """source=server: a URL, no model, training or cache of its own."""
        if self.url is None:
            raise ValueError(
                "teacher.source=server needs teacher.url, the server's base URL (e.g. http://127.0.0.1:8000); "
                "start one with `distillery serve-teacher MODEL_DIR` or vLLM's `vllm serve`"
            )
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"teacher.url={self.url!r} must start with http:// or https://")
        own = [f for f in ("train", "outputs", "tokenizer", "seq_len") if getattr(self, f) is not None]
        if own or self.model != CausalLMConfig():
            raise ValueError(
                f"conflicting fields: teacher.{own[0] if own else 'model'} is set, but teacher.source=server asks a "
                "model that runs on the server; drop it"
            )
        if self.server is None:
            self.server = ServerConfig()
        return self

    @model_validator(mode="after")
    def _one_source(self) -> LMTeacherConfig:
        if self.source == "self":
            return self._self_source()
        if (self.url is not None or self.server is not None) and self.source != "server":
            raise ValueError(
                f"teacher.{'url' if self.url is not None else 'server'} is for teacher.source=server, not "
                f"source={self.source}"
            )
        # compared with the defaults, not with the fields given: a run's saved config.yaml holds them all
        defaults = {f: type(self).model_fields[f].default for f in SELF_FIELDS}
        given = [f for f in SELF_FIELDS if getattr(self, f) != defaults[f]]
        if given:
            raise ValueError(
                f"teacher.{given[0]} is for teacher.source=self (the student teaching itself), not source={self.source}"
            )
        if self.source == "server":
            return self._server_source()
        if self.offload and self.source != "frozen":
            raise ValueError(
                f"teacher.offload is for teacher.source=frozen (a teacher that runs on every batch), not "
                f"source={self.source}"
            )
        if self.offload and self.model.device_map is not None:
            raise ValueError(
                "conflicting fields: teacher.offload and teacher.model.device_map both place the teacher's "
                "weights; give one of them"
            )
        resolved = outputs_for(self.source, self.outputs)
        if resolved is not self.outputs:  # assigned only when it changes: assignment validates again
            self.outputs = resolved
        if self.outputs is not None and self.outputs.features:
            raise ValueError(
                "teacher.outputs.features: language-model caches store token distributions only (stored "
                "features are for classification and encoder caches); drop teacher.outputs.features"
            )
        if self.train is None and self.model.pretrained is None:
            raise ValueError(
                "conflicting fields: the teacher needs teacher.train (train it first) or "
                "teacher.model.pretrained (load it)"
            )
        if self.train is not None and self.model.pretrained is not None:
            raise ValueError(
                "conflicting fields: teacher.train and teacher.model.pretrained are both set (a recipe's "
                "teacher.train is inherited by an override of teacher.model.pretrained); a pretrained teacher is used "
                "as it is: add teacher.train=null, or drop teacher.model.pretrained to train the teacher"
            )
        return self


class LMMemberConfig(StrictModel):
    """One of several teacher LMs (``teacher.members``): trained first on the training split (and cached,
    under the key it would have as the run's only teacher), or loaded (``model.pretrained``)."""

    name: str | None = Field(
        None, description="the member's name in logs and teacher.json (default: member <k>)"
    )
    model: CausalLMConfig = Field(default_factory=CausalLMConfig)
    train: TrainConfig | None = Field(None, description="train this teacher on the training split first")

    @model_validator(mode="after")
    def _one_source(self) -> LMMemberConfig:
        if (self.train is None) == (self.model.pretrained is None):
            raise ValueError(
                "conflicting fields: a member needs exactly one of train (train it first) or model.pretrained (load it)"
            )
        return self


class LMMembersTeacherConfig(MembersConfigBase):
    """Several frozen teacher LMs whose next-token distributions are combined per token
    (:class:`~distillery.teachers.multi.MultiTeacher`): ``combine`` ``mean``, ``weighted``,
    ``confidence`` (per token, a softmax over the members of their negative entropy, or of their
    log-probability of the target token with ``confidence: label``), ``agreement`` (the teacher's
    terms learn only the tokens whose top-1 every member shares), ``drop`` members per step."""

    source: Literal["members"] = "members"
    members: list[LMMemberConfig] = Field(
        description="the teachers: each a model with train, or model.pretrained"
    )
    cache: bool = True
    cache_dir: str | None = None


def _teacher_kind(value: Any) -> str:
    """Which teacher section a value is: several members, or one teacher (tagged ``frozen``, its default
    source, whatever its source: the tag only picks the model, and error paths drop it)."""
    if isinstance(value, dict):
        several = value.get("source", "members" if "members" in value else None) == "members"
    else:
        several = isinstance(value, LMMembersTeacherConfig)
    return "members" if several else "frozen"


TeacherSection = Annotated[
    Annotated[LMTeacherConfig, Tag("frozen")] | Annotated[LMMembersTeacherConfig, Tag("members")],
    Discriminator(_teacher_kind),
]


class PacedConfig(StrictModel):
    """PACED's pass-rate weights ("PACED: Distillation at the Frontier of Student Competence").

    Each problem's loss is scaled by ``w(p) = p^a (1-p)^b`` (divided by its maximum when ``normalize``),
    ``p`` the share of ``samples`` student completions the task's verifier accepts.
    """

    samples: int = Field(4, ge=1, description="student completions per prompt to estimate its pass rate")
    a: float = Field(1.0, ge=0.0, description="exponent of p (larger: weight moves to easier problems)")
    b: float = Field(1.0, ge=0.0, description="exponent of 1 - p (larger: weight moves to harder problems)")
    normalize: bool = Field(True, description="divide w by its maximum (at p = a/(a+b)), so w is in [0, 1]")
    every: int = Field(
        1, ge=1, description="re-estimate a prompt's pass rate once it is this many steps old (1: always)"
    )
    from_step: int = Field(
        0,
        ge=0,
        description="train without weights for this many steps first (a student that solves nothing has "
        "weight 0 everywhere and would never learn)",
    )


class LMMethodConfig(StrictModel):
    """Which data the distilled student trains on (the data-regime axis)."""

    name: Literal["token", "sequence", "on_policy", "speculative", "paced", "revision"] = Field(
        "token",
        description="token: the fixed training data; sequence: the teacher's responses, generated once "
        "(sequence-level KD); on_policy: with probability student_lambda, responses sampled from the student "
        "(GKD); speculative: student proposals, replaced by the teacher outside its top-k (SKD); paced: the "
        "fixed training data, each problem's loss weighted by the student's pass rate on it (PACED); revision: "
        "the student answers, the verifier judges, the same model shown both ({attempt}, {reward} in "
        "teacher.context) revises, and the student learns the reviser's distributions over the revision "
        "(SD-Zero; teacher.source=self)",
    )
    student_lambda: float = Field(
        0.5, ge=0.0, le=1.0, description="on_policy / speculative: share of sampled batches"
    )
    max_new_tokens: int = Field(8, ge=1, description="length cap of sampled responses")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature")
    top_k: int = Field(25, ge=1, description="speculative: the teacher's top-k that keeps a student proposal")
    paced: PacedConfig = Field(
        default_factory=PacedConfig, description="paced: the pass-rate weights (samples use temperature)"
    )


class ChunkedLossConfig(StrictModel):
    """Compute the loss from final hidden states and LM heads, a chunk of tokens at a time.

    The ``[tokens, vocab]`` logits of the student and the teacher are then never materialised
    (:func:`distillery.functional.chunked_kd_from_hidden`, :func:`~distillery.functional.chunked.
    chunked_cross_entropy_from_hidden`); values and gradients are those of the plain loss.
    """

    enabled: Literal["auto"] | bool = Field(
        "auto",
        description="auto: when a micro-batch's logits exceed `threshold` values (should_chunk) and every "
        "loss term supports it; true: always (an error if a term or the model cannot); false: never",
    )
    chunk_size: int = Field(256, ge=1, description="tokens per chunk")
    threshold: int = Field(
        2**24, ge=1, description="auto: chunk when micro-batch tokens x vocabulary exceeds this many values"
    )


class LMEvalConfig(EvalConfig):
    batch_size: int = Field(32, ge=1, description="sequences per evaluation batch")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="task accuracy: tokens generated per answer at most (null: arithmetic: the longest answer "
        "and <eos>; the user's prompt data: the longest training answer, at most data.seq_len)",
    )


class LMRunConfig(DistillationConfigBase):
    """A language-model distillation run: token-level KD of a causal LM student from a teacher LM,
    against a paired SFT (cross-entropy) student."""

    task: Literal["lm"] = "lm"
    name: str = Field("lm-run", pattern=r"^[A-Za-z0-9_.-]+$")
    data: LMDataConfig = Field(default_factory=LMDataConfig)
    teacher: TeacherSection | None = None
    student: LMStudentConfig = Field(default_factory=LMStudentConfig)
    method: LMMethodConfig = Field(default_factory=LMMethodConfig)
    eval: LMEvalConfig = Field(default_factory=LMEvalConfig)
    chunked_loss: ChunkedLossConfig = Field(default_factory=ChunkedLossConfig)

    def _cache_fits(self) -> None:
        """A cached teacher serves the fixed training rows, with the divergences its kind allows."""
        out, method = self.teacher.outputs, self.method.name
        if self.data.streaming:
            raise ValueError(
                "conflicting fields: teacher.source=cache stores the teacher's outputs per training row, but "
                "data.train.streaming=true reads rows on the fly; use teacher.source=frozen"
            )
        if method not in ("token", "on_policy"):
            why = {"sequence": "trains on responses the teacher generates", "speculative": "lets the teacher "
                   "replace the student's proposals as they are sampled", "paced": "weights each row"}[method]  # fmt: skip
            if method != "paced" or out.kind != "dense":
                raise ValueError(
                    f"conflicting fields: method.name={method} {why}, which a cache of the teacher's outputs "
                    "cannot serve; use method.name=token or on_policy (on-policy batches use the live teacher)"
                    + (", or a dense cache (teacher.outputs.kind=dense)" if method == "paced" else "")
                )
        if out.kind == "dense":
            return
        self._sparse_terms_fit(
            out.kind, out.temperature, f"teacher.outputs.kind={out.kind} keeps {out.k} ids per token",
            "teacher.outputs.kind=dense", f"the {out.kind} cache stores the teacher's distribution at "
            f"teacher.outputs.temperature={out.temperature:g}",
        )  # fmt: skip

    def _sparse_terms_fit(self, kind: str, temperature: float, what: str, dense: str, stored: str) -> None:
        """Every teacher term can use a sparse teacher (top-k + tail, or sampled ids) at its temperature."""
        for label, term in self.loss.items():
            cls = LOSSES[term.name][1]
            if not cls.needs_teacher:
                continue
            if cls.sparse_name is None:
                raise ValueError(
                    f"conflicting fields: loss.{label} ({term.name}) needs the teacher's full logits, but "
                    f"{what}; use forward_kl, reverse_kl or jsd, or {dense}"
                )
            why = sparse_divergence_support(kind, cls.sparse_name)
            if why is not None:
                raise ValueError(f"loss.{label}: {why}")
            t = getattr(term, "temperature", 1.0)
            if t != temperature:
                raise ValueError(
                    f"conflicting fields: loss.{label}.temperature={t:g}, but {stored}; set "
                    f"loss.{label}.temperature={temperature:g}"
                )

    def _server_fits(self) -> None:
        """A teacher server scores any rows (fixed or sampled by the student), top-k at temperature 1."""
        if self.method.name not in ("token", "on_policy"):
            raise ValueError(
                f"conflicting fields: method.name={self.method.name} needs the teacher to generate or weights rows "
                "by it, which a teacher server's log-probabilities do not serve; use method.name=token or on_policy"
            )
        k = self.teacher.server.top_k
        if k is not None:
            self._sparse_terms_fit(
                "topk", 1.0, f"teacher.server.top_k={k} asks {k} log-probabilities per token",
                "teacher.server.top_k=null (the full vocabulary)",
                "a server's prompt log-probabilities are at temperature 1",
            )  # fmt: skip

    def teacher_models(self) -> list[tuple[str, CausalLMConfig]]:
        """``(field, model)`` of every teacher LM of the run: the teacher's, or each member's."""
        t = self.teacher
        if t is None or t.source in ("self", "server"):
            return []
        if t.source == "members":
            return [(f"teacher.members.{i}.model", m.model) for i, m in enumerate(t.members)]
        return [("teacher.model", t.model)]

    def teacher_trains(self) -> list[tuple[str, TrainConfig | None]]:
        """``(field of the model, train section)`` of every teacher LM of the run."""
        t = self.teacher
        if t is None or t.source == "server":
            return []
        if t.source == "self":
            return [("teacher.model", t.train)]
        if t.source == "members":
            return [(f"teacher.members.{i}.model", m.train) for i, m in enumerate(t.members)]
        return [("teacher.model", t.train)]

    def _members_fit(self) -> None:
        """Several teachers are scored on every token: the methods that make a teacher generate refuse them."""
        if self.method.name in ("sequence", "speculative"):
            raise ValueError(
                f"conflicting fields: method.name={self.method.name} has the teacher generate, which several teachers "
                "(teacher.members) do not; use token, on_policy or paced"
            )
        sizes = {m.model.vocab_size for m in self.teacher.members if m.model.pretrained is None}
        if len(sizes) > 1:
            shown = ", ".join(
                f"members.{i}: {m.model.vocab_size}" for i, m in enumerate(self.teacher.members)
            )
            raise ValueError(
                f"teacher.members give outputs of different sizes (model.vocab_size {shown}); the members' "
                "distributions are combined token id by token id and compared with the student's: give every member "
                "the same vocab_size (null: the tokenizer's)"
            )
        cross = [label for label, term in self.loss.items() if term.name in CROSS_TOKENIZER_TERMS]
        if cross:
            raise ValueError(
                f"loss.{cross[0]}: the cross-tokenizer terms take one teacher, not teacher.members"
            )
        if self.teacher.combine == "agreement":
            unweighted = [
                label
                for label in self._terms_without("supports_row_weight")
                if LOSSES[self.loss[label].name][1].needs_teacher
            ]
            if unweighted:
                raise ValueError(
                    f"conflicting fields: teacher.combine=agreement leaves out of the teacher's terms the tokens its "
                    f"members disagree on, but loss.{unweighted[0]} cannot weight its rows; use forward_kl, reverse_kl, jsd, ..."
                )

    def _self_fits(self) -> None:
        """A self-context teacher reads each prompt's context: prompt data, a template it can fill."""
        if self.data.name not in PROMPT_DATA:
            raise ValueError(
                f"conflicting fields: teacher.source=self shows the teacher a context before each prompt, but "
                f"data.name={self.data.name} is packed text without prompts; use prompt data ("
                f"{', '.join(PROMPT_DATA)})"
            )
        try:
            check_template(
                self.teacher.context, available_fields(self.data.name, self.method.name == "revision")
            )
        except ValueError as exc:
            raise ValueError(f"teacher.context: {exc}") from None
        if self.method.name == "speculative":
            raise ValueError(
                "conflicting fields: method.name=speculative lets the teacher replace the student's tokens while "
                "they are sampled, which a self-context teacher does not support; use token, sequence, on_policy "
                "or paced"
            )

    def _cross_fits(self, users: list[str]) -> None:
        """The cross-tokenizer terms read a frozen teacher through texts; id-by-id terms need one tokenizer."""
        cross = [label for label in users if self.loss[label].name in CROSS_TOKENIZER_TERMS]
        t = self.teacher
        if t is not None and t.tokenizer is not None and t.tokenizer == self.data.tokenizer:
            raise ValueError(
                "teacher.tokenizer equals data.tokenizer; drop teacher.tokenizer (the run's is used)"
            )
        other = t is not None and t.tokenizer is not None
        if t is not None and t.seq_len is not None and not other:
            raise ValueError(
                "teacher.seq_len is the block length of a teacher with its own tokenizer (teacher.tokenizer)"
            )
        if not cross and not other:
            return
        same = [label for label in users if label not in cross]
        if same:
            why = (
                "teacher.tokenizer differs from the student's"
                if other
                else f"loss.{cross[0]} reads the teacher"
            )
            raise ValueError(
                f"conflicting fields: loss.{same[0]} ({self.loss[same[0]].name}) compares the teacher and the student "
                f"id by id, but {why} through the texts; the terms that accept a teacher with another tokenizer: "
                f"{', '.join(CROSS_TOKENIZER_TERMS)} (ce needs no teacher)"
            )
        if other and not cross:
            raise ValueError(
                "conflicting fields: teacher.tokenizer gives the teacher its own tokenizer, but no loss term compares "
                f"through the texts; use {' or '.join(CROSS_TOKENIZER_TERMS)}"
            )
        if t.source != "frozen":
            raise ValueError(
                f"conflicting fields: loss.{cross[0]} ({self.loss[cross[0]].name}) reads a frozen teacher's outputs "
                f"through the texts; teacher.source={t.source} is not supported with it: use teacher.source=frozen"
            )
        if self.method.name not in ("token", "on_policy"):
            raise ValueError(
                f"conflicting fields: loss.{cross[0]} ({self.loss[cross[0]].name}) works with method.name=token or "
                f"on_policy, not {self.method.name}"
            )

    def _terms_without(self, capability: str) -> list[str]:
        """Labels of the loss terms whose module class lacks ``capability`` (a ClassVar flag)."""
        return [label for label, term in self.loss.items() if not getattr(LOSSES[term.name][1], capability)]

    @model_validator(mode="after")
    def _consistent(self) -> LMRunConfig:
        users = [label for label, term in self.loss.items() if LOSSES[term.name][1].needs_teacher]
        if users and self.teacher is None:
            raise ValueError(
                f"conflicting fields: loss.{users[0]} needs a teacher, but `teacher` is not set; add a teacher "
                "section (a teacher to train first: see configs/lm-teacher.yaml) or train with `ce` only"
            )
        signals = [label for label, term in self.loss.items() if isinstance(term, SignalTermConfig)]
        if signals:
            raise ValueError(
                f"loss.{signals[0]} ({self.loss[signals[0]].name}) is a representation term, read from the layers of "
                "a classifier (task: classification) or an encoder (task: encoder); language-model runs distil over "
                "token logits (ce, forward_kl, reverse_kl, jsd, ...)"
            )
        hints = [label for label, term in self.loss.items() if term.name == "hint"]
        if hints:
            raise ValueError(
                f"loss.{hints[0]}: feature hints are for multi-exit classifiers (teacher.source=exits); "
                "language-model runs distil over token logits (ce, forward_kl, reverse_kl, jsd, ...)"
            )
        kind = self.data.tokenizer.kind
        sides = [("student", self.student), *self.teacher_models()]
        for field, model in sides:
            if kind == "pretrained" or model is None or model.pretrained is not None:
                continue
            if model.vocab_size is not None and model.vocab_size < BYTE_VOCAB_SIZE:
                raise ValueError(
                    f"{field}.vocab_size={model.vocab_size} is smaller than any {kind} tokenizer of "
                    f"data.tokenizer (at least {BYTE_VOCAB_SIZE} ids: 256 bytes + 3 special tokens); use null "
                    "(the tokenizer's size) or a larger (padded) size"
                )
        method = self.method.name
        if self.teacher is not None and not users and method != "sequence":
            raise ValueError(
                f"conflicting fields: `teacher` is set but no loss term uses it (loss: {', '.join(self.loss)})"
            )
        if method != "token" and self.data.name not in PROMPT_DATA:
            raise ValueError(
                f"conflicting fields: method.name={method} samples responses to prompts, but data.name="
                f"{self.data.name} is packed text without prompts; use data.name=arithmetic (the built-in task) or "
                "your own prompt data (data.name=prompt_completion or messages)"
            )
        if self.teacher is not None and self.teacher.source == "self":
            self._self_fits()
        if self.teacher is not None and self.teacher.source == "members":
            self._members_fit()
        else:
            self._cross_fits(users)
        if self.data.streaming:
            lengths = [("train", self.train), *[(f.replace("model", "train"), t) for f, t in self.teacher_trains()],
                       ("baseline.train", None if self.baseline is None else self.baseline.train)]  # fmt: skip
            for field, train in lengths:
                if train is not None and train.epochs is not None:
                    raise ValueError(
                        f"conflicting fields: {field}.epochs={train.epochs:g}, but data.train.streaming=true: the "
                        f"number of training blocks is unknown; set {field}.steps instead"
                    )
        if self.teacher is not None and self.teacher.source == "cache":
            self._cache_fits()
        if self.teacher is not None and self.teacher.source == "server":
            self._server_fits()
        if method == "revision" and (self.teacher is None or self.teacher.source != "self"):
            raise ValueError(
                "conflicting fields: method.name=revision has the model revise its own answers (SD-Zero): it needs "
                "teacher.source=self with {attempt} and {reward} in teacher.context"
            )
        if method != "token" and self.teacher is None:
            raise ValueError(f"conflicting fields: method.name={method} needs a teacher section")
        if self.chunked_loss.enabled is True:
            unchunked = self._terms_without("supports_hidden")
            if unchunked:
                raise ValueError(
                    f"conflicting fields: chunked_loss.enabled=true, but loss.{unchunked[0]} "
                    f"({self.loss[unchunked[0]].name}) is computed from full logits only; chunked terms: "
                    f"{', '.join(sorted(k for k, (_, cls) in LOSSES.items() if cls.supports_hidden))}"
                )
            if method == "paced":
                raise ValueError(
                    "conflicting fields: chunked_loss.enabled=true, but method.name=paced weights each row, "
                    "which the chunked loss cannot; set chunked_loss.enabled=auto or false"
                )
        if method == "paced":
            unweighted = self._terms_without("supports_row_weight")
            if unweighted:
                raise ValueError(
                    f"conflicting fields: method.name=paced weights every loss term per problem, but "
                    f"loss.{unweighted[0]} cannot weight its rows; use terms over logits (ce, forward_kl, kd, ...)"
                )
        return self
