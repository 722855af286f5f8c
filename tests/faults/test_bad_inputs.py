"""The bad-input catalogue: mistakes a user can make, each through the real command line.

One table, :data:`CASES`: a row is one wrong input (a YAML file, an override, a damaged file, a
folder in the way, a wrong command) and what must come of it: exit code 2, one message on stderr
that names the problem (the row's phrase, case-insensitive) and no traceback, and nothing left
behind: no file in any run folder (or anywhere else under the test's folder, tokenizer caches
aside) and no teacher-cache entry. A few rows are valid controls (exit 0, a run folder written),
so that a row fails for the reason it names and not for a broken base config.

Every run is tiny (one seed, one step, 50 digits, a 16-wide one-layer LM), so that a row whose
validation wrongly passes still ends in seconds. Rows that need files first (damaged checkpoints,
fake Fashion-MNIST files, model directories) build them in a setup function.

Placeholders in a row's arguments: ``{tmp}`` is the test's folder; ``CLS``, ``LM`` and ``FM`` are
the tiny base configs (classification on digits, LM on arithmetic, classification on fake
Fashion-MNIST files in ``{tmp}/fm``). Every ``run`` gets ``output.root={tmp}/runs`` right after its
config (a row's own ``output.*`` overrides come later and win) and ``--no-progress``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import struct
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from distillery.cli import main
from tests.faults.conftest import TALLY

pytestmark = pytest.mark.integration

TALLY_KEY = "bad inputs with a clean exit 2"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_SKIP = "running as root: root reads and writes files whatever their permissions"

CLS_YAML = """\
name: tiny
seeds: [0]
data: {name: digits, validation: 0, labelled: 50, transfer: 0, test: 50}
teacher:
  model: {name: mlp, hidden: [8]}
  train: {steps: 1, batch_size: 16, eval_every: 0}
student: {name: mlp, hidden: [8]}
loss:
  ce: {weight: 0.5}
  forward_kl: {weight: 0.5, temperature: 2.0}
train: {steps: 1, batch_size: 16, eval_every: 0}
baseline: {enabled: false}
"""

LM_YAML = """\
task: lm
name: tiny-lm
seeds: [0]
data:
  name: arithmetic
  tokenizer: {kind: byte}
  seq_len: 16
  max_eval_blocks: 4
  arithmetic: {digits: [1, 2], train: 48, validation: 4, test: 4, reverse: true}
teacher:
  model: {hidden_size: 16, layers: 1, heads: 2, max_positions: 32}
  train: {steps: 1, batch_size: 8, eval_every: 0}
student: {hidden_size: 16, layers: 1, heads: 2, max_positions: 32}
loss:
  ce: {weight: 0.5}
  forward_kl: {weight: 0.5}
train: {steps: 1, batch_size: 8, eval_every: 0}
baseline: {enabled: false}
method: {max_new_tokens: 4}
"""

FM_YAML = """\
name: tiny-fm
seeds: [0]
data: {name: fashion_mnist, root: "{tmp}/fm", download: false, validation: 0, labelled: 20, transfer: 0, test: 10}
student: {name: mlp, hidden: [8]}
loss:
  ce: {weight: 1.0}
train: {steps: 1, batch_size: 8, eval_every: 0}
baseline: {enabled: false}
"""

# ----------------------------------------------------------------------------------------------------
# Files the setups write
# ----------------------------------------------------------------------------------------------------

IDX = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def _idx(path: Path, dims: list[int], payload: bytes, magic: bytes = b"\x00\x00\x08") -> None:
    header = magic + bytes([len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as fh:
        fh.write(header + payload)


def fake_fashion(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Four small IDX files of the Fashion-MNIST layout (random pixels, balanced labels)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        _idx(root / IDX[f"{split}_images"], [n, 28, 28], images.numpy().tobytes())
        _idx(root / IDX[f"{split}_labels"], [n], labels.numpy().tobytes())
    return root


def _fm(damage: Callable[[Path], None]) -> Callable:
    def setup(tmp: Path, monkeypatch) -> None:
        damage(fake_fashion(tmp / "fm"))

    return setup


def _write(name: str, content: str | bytes) -> Callable:
    def setup(tmp: Path, monkeypatch) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{tmp}", str(tmp)))

    return setup


def _setups(*steps: Callable) -> Callable:
    def setup(tmp: Path, monkeypatch) -> None:
        for step in steps:
            step(tmp, monkeypatch)

    return setup


def _mkdir(name: str) -> Callable:
    return lambda tmp, mp: (tmp / name).mkdir(parents=True, exist_ok=True)


def _chmod(name: str, mode: int) -> Callable:
    return lambda tmp, mp: os.chmod(tmp / name, mode)


def _mlp_weights(name: str, hidden: list[int], classes: int = 10) -> Callable:
    def setup(tmp: Path, monkeypatch) -> None:
        from safetensors.torch import save_model

        from distillery.models import MLP

        save_model(MLP(64, classes, hidden), str(tmp / name))

    return setup


def _cnn_weights(tmp: Path, monkeypatch) -> None:
    from safetensors.torch import save_model

    from distillery.models import SmallCNN

    save_model(SmallCNN(1, 10, [4]), str(tmp / "cnn.safetensors"))


def _truncated_weights(tmp: Path, monkeypatch) -> None:
    _mlp_weights("full.safetensors", [8])(tmp, monkeypatch)
    data = (tmp / "full.safetensors").read_bytes()
    (tmp / "w.safetensors").write_bytes(data[: len(data) // 2])


def _pickle_weights(tmp: Path, monkeypatch) -> None:
    torch.save({"body.1.weight": torch.zeros(8, 64)}, tmp / "w.safetensors")  # a pickle, not safetensors


def _vit(name: str, weights: str | None = "keep") -> Callable:
    """A tiny ViT image classifier saved with save_pretrained; ``weights``: keep, None (removed), or
    bytes-like garbage written over them."""

    def setup(tmp: Path, monkeypatch) -> None:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, num_labels=10)  # fmt: skip
        ViTForImageClassification(config).save_pretrained(tmp / name)
        if weights is None:
            (tmp / name / "model.safetensors").unlink()
        elif weights != "keep":
            (tmp / name / "model.safetensors").write_bytes(weights.encode())

    return setup


def _llama(
    name: str, tokenizer: str | None = "byte", vocab: int | None = None, weights: str = "keep"
) -> Callable:
    """A tiny Llama saved with save_pretrained, with a byte or bpe tokenizer (or none)."""

    def setup(tmp: Path, monkeypatch) -> None:
        from distillery.data.text.tokenizer import train_tokenizer
        from distillery.models.causal_lm import CausalLMConfig, build_causal_lm

        tok = (
            train_tokenizer(["the cat sat on the mat " * 50], vocab_size=300, kind="bpe", use_cache=False)
            if tokenizer == "bpe"
            else train_tokenizer("", kind="byte", use_cache=False)
        )
        cfg = CausalLMConfig(hidden_size=16, layers=1, heads=2, max_positions=32)
        model = build_causal_lm(cfg, vocab or len(tok), tok if tokenizer else None)
        model.save_pretrained(tmp / name)
        if tokenizer is not None:
            tok.save_pretrained(tmp / name)
        if weights != "keep":
            (tmp / name / "model.safetensors").write_bytes(weights.encode())

    return setup


def _byte_tokenizer(name: str, damage: str | None = None) -> Callable:
    def setup(tmp: Path, monkeypatch) -> None:
        from distillery.data.text.tokenizer import train_tokenizer

        train_tokenizer("", kind="byte", use_cache=False).save_pretrained(tmp / name)
        if damage is not None:
            (tmp / name / "tokenizer.json").write_text(damage)

    return setup


def _billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nstudent: {name: mlp}\ntrain: {steps: 1}\n"


def _run_dir_with_bad_config(tmp: Path, monkeypatch) -> None:
    (tmp / "brokenrun" / "seed-0").mkdir(parents=True)
    (tmp / "brokenrun" / "config.yaml").write_text("student: [unclosed\n")


def _no_fashion_anywhere(tmp: Path, monkeypatch) -> None:
    monkeypatch.setattr("distillery.data.fashion_mnist.SYSTEM_DIR", tmp / "nowhere")


def _offline_download(tmp: Path, monkeypatch) -> None:
    _no_fashion_anywhere(tmp, monkeypatch)

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr("urllib.request.urlopen", refuse)


class _FakeResponse:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _tampered_download(tmp: Path, monkeypatch) -> None:
    """Every download serves bytes that are not the published file (a captive portal, a bad mirror)."""
    _no_fashion_anywhere(tmp, monkeypatch)
    monkeypatch.setattr(
        "urllib.request.urlopen", lambda url, timeout=None: _FakeResponse(b"<html>login</html>")
    )


def _seqkd_cache(damage: str) -> Callable:
    """A valid sequence-level KD run first (it caches the teacher and its responses), then the cached
    responses file damaged."""

    def setup(tmp: Path, monkeypatch) -> None:
        args = ["run", str(tmp / "lm.yaml"), "method.name=sequence", "loss={ce: {weight: 1.0}}",
                f"output.root={tmp / 'first'}", "--no-progress"]  # fmt: skip
        assert main(args) == 0
        (path,) = (tmp / "cache" / "sequences").glob("seqkd-*.jsonl")
        lines = path.read_text().splitlines()
        path.write_text({"garbage": lines[0] + "\n{not json\n", "missing": '{"prompt": "1+2="}\n'}[damage])

    return setup


# ----------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    phrase: str  # what the error message must contain (case-insensitive); "" for controls
    code: int = 2
    setup: Callable | None = None
    env: dict[str, str] = field(default_factory=dict)
    needs_non_root: bool = False


def bad(id: str, *argv: str, phrase: str, setup=None, env=None, needs_non_root=False) -> Case:
    return Case(id, argv, phrase, 2, setup, env or {}, needs_non_root)


def ok(id: str, *argv: str, setup=None) -> Case:
    return Case(id, argv, "", 0, setup)


def run_cls(*overrides: str) -> tuple[str, ...]:
    return ("run", "CLS", *overrides)


def run_lm(*overrides: str) -> tuple[str, ...]:
    return ("run", "LM", *overrides)


SELF = "teacher={source: self, context: 'answer {response}. {prompt}'}"
SELF_TEACHER = [
    bad("self-unknown-placeholder", *run_lm("teacher={source: self, context: '{hint} {prompt}'}"),
        phrase="unknown placeholder {hint}; valid here: {prompt}, {response}"),
    bad("self-context-too-long", *run_lm("teacher={source: self, context: '" + "x" * 40 + " {prompt}'}"),
        phrase="more than the model's maximum length 32; shorten teacher.context"),
    bad("self-ema-without-momentum", *run_lm(SELF, "teacher.weights=ema"), phrase="needs teacher.momentum"),
    bad("self-with-teacher-model", *run_lm(SELF, "teacher.model={hidden_size: 16}"),
        phrase="teacher.source=self teaches with the student's own weights"),
    ok("self-context-truncated", *run_lm("teacher={source: self, truncate_context: true, context: '"
                                         + "x" * 40 + " {prompt}'}")),
]  # fmt: skip

CKPT = ("teacher.train=null", "teacher.checkpoint={tmp}/w.safetensors")
LM_PRETRAINED_TEACHER = ("teacher.train=null", "teacher.model.pretrained={tmp}/teacher")

YAML = [
    bad("yaml-tab-indent", "run", "{tmp}/bad.yaml", phrase="not valid YAML",
        setup=_write("bad.yaml", "name: x\n\tseeds: [0]\n")),
    bad("yaml-unclosed-bracket", "run", "{tmp}/bad.yaml", phrase="not valid YAML",
        setup=_write("bad.yaml", "seeds: [0, 1\nname: x\n")),
    bad("yaml-unclosed-brace", "run", "{tmp}/bad.yaml", phrase="not valid YAML",
        setup=_write("bad.yaml", "data: {name: digits\n")),
    bad("yaml-list-at-top", "run", "{tmp}/bad.yaml", phrase="must hold a mapping",
        setup=_write("bad.yaml", "- name: x\n- seeds: [0]\n")),
    bad("yaml-scalar-at-top", "run", "{tmp}/bad.yaml", phrase="must hold a mapping",
        setup=_write("bad.yaml", "just a sentence\n")),
    bad("yaml-python-object-tag", "run", "{tmp}/bad.yaml", phrase="python/object",
        setup=_write("bad.yaml", "name: !!python/object/apply:os.system ['touch {tmp}/pwned']\n")),
    bad("yaml-python-name-tag", "run", "{tmp}/bad.yaml", phrase="python/name",
        setup=_write("bad.yaml", "name: !!python/name:os.system\n")),
    bad("yaml-two-documents", "run", "{tmp}/bad.yaml", phrase="single document",
        setup=_write("bad.yaml", "---\nname: a\n---\nname: b\n")),
    bad("yaml-duplicate-key", "run", "{tmp}/bad.yaml", phrase="duplicate",
        setup=_write("bad.yaml", CLS_YAML + "name: other\n")),
    bad("yaml-case-variant-key", "run", "{tmp}/bad.yaml", phrase="unknown key 'Train'",
        setup=_write("bad.yaml", CLS_YAML + "Train: {steps: 5}\n")),
    bad("yaml-empty-file", "run", "{tmp}/bad.yaml", phrase="missing required field",
        setup=_write("bad.yaml", "")),
    bad("yaml-comment-only", "run", "{tmp}/bad.yaml", phrase="missing required field",
        setup=_write("bad.yaml", "# nothing here yet\n")),
    bad("yaml-alias-bomb", "run", "{tmp}/bad.yaml", phrase="expands to",
        setup=_write("bad.yaml", _billion_laughs())),
    bad("yaml-not-utf8", "run", "{tmp}/bad.yaml", phrase="utf-8",
        setup=_write("bad.yaml", b"name: caf\xe9\xff\nseeds: [0]\n")),
    bad("yaml-path-is-directory", "run", "{tmp}/conf.yaml", phrase="is a directory", setup=_mkdir("conf.yaml")),
    bad("yaml-file-missing", "run", "{tmp}/absent.yaml", phrase="absent.yaml"),
    bad("yaml-unreadable", "run", "{tmp}/bad.yaml", phrase="permission", needs_non_root=True,
        setup=_setups(_write("bad.yaml", CLS_YAML), _chmod("bad.yaml", 0))),
    bad("yaml-base-cycle", "run", "{tmp}/a.yaml", phrase="cycle",
        setup=_setups(_write("a.yaml", "base: b.yaml\n"), _write("b.yaml", "base: a.yaml\n"))),
    bad("yaml-base-unknown", "run", "{tmp}/bad.yaml", phrase="no-such-recipe",
        setup=_write("bad.yaml", "base: no-such-recipe\n")),
    bad("yaml-base-not-a-name", "run", "{tmp}/bad.yaml", phrase="`base` must be",
        setup=_write("bad.yaml", "base: [digits-kd]\n")),
    bad("yaml-unknown-task", "run", "{tmp}/bad.yaml", phrase="unknown task",
        setup=_write("bad.yaml", CLS_YAML + "task: vision\n")),
    bad("yaml-task-not-a-name", "run", "{tmp}/bad.yaml", phrase="expected a task name",
        setup=_write("bad.yaml", CLS_YAML + "task: [lm]\n")),
]  # fmt: skip

UNKNOWN_KEYS = [
    bad("key-top", *run_cls("frobnicate=1"), phrase="unknown key 'frobnicate'"),
    bad("key-data", *run_cls("data.frob=1"), phrase="unknown key 'data.frob'"),
    bad("key-teacher", *run_cls("teacher.frob=1"), phrase="unknown key 'teacher.frob'"),
    bad("key-teacher-model", *run_cls("teacher.model.frob=1"), phrase="teacher.model.frob"),
    bad("key-teacher-train", *run_cls("teacher.train.frob=1"), phrase="teacher.train.frob"),
    bad("key-student", *run_cls("student.frob=1"), phrase="student.frob"),
    bad("key-loss-term", *run_cls("loss.forward_kl.frob=1"), phrase="loss.forward_kl.frob"),
    bad("key-loss-name", *run_cls("loss.frob={weight: 1}"), phrase="unknown loss 'frob'"),
    bad("key-train", *run_cls("train.frob=1"), phrase="unknown key 'train.frob'"),
    bad("key-train-optimizer", *run_cls("train.optimizer.frob=1"), phrase="train.optimizer.frob"),
    bad("key-train-schedule", *run_cls("train.schedule.frob=1"), phrase="train.schedule.frob"),
    bad("key-train-augment", *run_cls("train.augment.frob=1"), phrase="train.augment.frob"),
    bad("key-eval", *run_cls("eval.frob=1"), phrase="unknown key 'eval.frob'"),
    bad("key-output", *run_cls("output.frob=1"), phrase="unknown key 'output.frob'"),
    bad("key-baseline", *run_cls("baseline.frob=1"), phrase="baseline.frob"),
    bad("key-label-noise", *run_cls("data.label_noise={rate: 0.1, frob: 1}"), phrase="data.label_noise.frob"),
    bad("key-lm-section-in-classification", *run_cls("method.name=token"), phrase="belongs to task: lm"),
    bad("key-lm-method", *run_lm("method.frob=1"), phrase="unknown key 'method.frob'"),
    bad("key-lm-method-paced", *run_lm("method.paced.frob=1"), phrase="method.paced.frob"),
    bad("key-lm-arithmetic", *run_lm("data.arithmetic.frob=1"), phrase="data.arithmetic.frob"),
    bad("key-lm-tokenizer", *run_lm("data.tokenizer.frob=1"), phrase="data.tokenizer.frob"),
    bad("key-lm-chunked-loss", *run_lm("chunked_loss.frob=1"), phrase="chunked_loss.frob"),
    bad("key-lm-teacher-model", *run_lm("teacher.model.frob=1"), phrase="teacher.model.frob"),
    bad("key-classification-field-in-lm", *run_lm("data.root=/data"), phrase="unknown key 'data.root'"),
]  # fmt: skip

WRONG_TYPES = [
    bad("type-steps-word", *run_cls("train.steps=ten"), phrase="train.steps: expected an integer"),
    bad("type-batch-size-bool", *run_cls("train.batch_size=true"), phrase="boolean"),
    bad("type-seeds-scalar", *run_cls("seeds=0"), phrase="seeds"),
    bad("type-seeds-word", *run_cls("seeds=[a]"), phrase="seeds.0"),
    bad("type-lr-word", *run_cls("train.optimizer.lr=fast"), phrase="train.optimizer.lr: expected a number"),
    bad("type-hidden-scalar", *run_cls("student.hidden=64"), phrase="student.hidden: expected a list"),
    bad("type-hidden-bool-item", *run_cls("student.hidden=[true]"), phrase="boolean"),
    bad("type-dataset-name", *run_cls("data.name=cifar"), phrase="expected 'digits' or 'fashion_mnist'"),
    bad("type-weight-list", *run_cls("loss.forward_kl.weight=[1]"), phrase="loss.forward_kl.weight"),
    bad("type-teacher-source", *run_cls("teacher.source=magic"), phrase="magic"),
    bad("type-optimizer-name", *run_cls("train.optimizer.name=lion"), phrase="lion"),
    bad("type-student-architecture", *run_cls("student.name=resnet"), phrase="resnet"),
    bad("type-tensorboard-word", *run_cls("output.tensorboard=maybe"), phrase="true or false"),
    bad("type-name-list", *run_cls("name=[a]"), phrase="name"),
    bad("type-labelled-fraction", *run_cls("data.labelled=1.5"), phrase="data.labelled"),
    bad("type-section-scalar", *run_cls("train=5"), phrase="train"),
    bad("type-lm-seq-len-word", *run_lm("data.seq_len=long"), phrase="data.seq_len: expected an integer"),
    bad("type-lm-method-name", *run_lm("method.name=rl"), phrase="method.name"),
    bad("type-lm-digits-scalar", *run_lm("data.arithmetic.digits=3"), phrase="data.arithmetic.digits"),
]  # fmt: skip

BOUNDS = [
    bad("bound-hidden-negative", *run_cls("student.hidden=[-3]"), phrase="student.hidden.0"),
    bad("bound-hidden-zero", *run_cls("student.hidden=[0]"), phrase="student.hidden.0"),
    bad("bound-hidden-second-zero", *run_cls("student.hidden=[8, 0]"), phrase="student.hidden.1"),
    bad("bound-teacher-hidden-negative", *run_cls("teacher.model.hidden=[-1]"), phrase="teacher.model.hidden.0"),
    bad("bound-cnn-channels-zero", *run_cls("teacher.model={name: cnn, channels: [0]}"),
        phrase="teacher.model.channels.0"),
    bad("bound-cnn-channels-empty", *run_cls("teacher.model={name: cnn, channels: []}"),
        phrase="teacher.model.channels"),
    bad("bound-cnn-pool-every-zero", *run_cls("teacher.model={name: cnn, pool_every: 0}"),
        phrase="teacher.model.pool_every"),
    bad("bound-dropout-one", *run_cls("student.dropout=1.0"), phrase="student.dropout"),
    bad("bound-steps-zero", *run_cls("train.steps=0"), phrase="train.steps"),
    bad("bound-steps-negative", *run_cls("train.steps=-1"), phrase="train.steps"),
    bad("bound-batch-size-zero", *run_cls("train.batch_size=0"), phrase="train.batch_size"),
    bad("bound-grad-accum-zero", *run_cls("train.grad_accum=0"), phrase="train.grad_accum"),
    bad("bound-lr-zero", *run_cls("train.optimizer.lr=0"), phrase="train.optimizer.lr"),
    bad("bound-lr-negative", *run_cls("train.optimizer.lr=-0.1"), phrase="train.optimizer.lr"),
    bad("bound-lr-inf", *run_cls("train.optimizer.lr=.inf"), phrase="train.optimizer.lr"),
    bad("bound-lr-nan", *run_cls("train.optimizer.lr=.nan"), phrase="train.optimizer.lr"),
    bad("bound-teacher-lr-inf", *run_cls("teacher.train.optimizer.lr=.inf"), phrase="teacher.train.optimizer.lr"),
    bad("bound-loss-weight-nan", *run_cls("loss.forward_kl.weight=.nan"), phrase="loss.forward_kl.weight"),
    bad("bound-loss-weight-inf", *run_cls("loss.ce.weight=.inf"), phrase="loss.ce.weight"),
    bad("bound-temperature-zero", *run_cls("loss.forward_kl.temperature=0"), phrase="loss.forward_kl.temperature"),
    bad("bound-temperature-inf", *run_cls("loss.forward_kl.temperature=.inf"),
        phrase="loss.forward_kl.temperature"),
    bad("bound-augment-noise-inf", *run_cls("train.augment.noise=.inf"), phrase="train.augment.noise"),
    bad("bound-augment-noise-negative", *run_cls("train.augment.noise=-0.5"), phrase="train.augment.noise"),
    bad("bound-augment-shift-negative", *run_cls("train.augment.shift=-1"), phrase="train.augment.shift"),
    bad("bound-label-smoothing-above-one", *run_cls("loss.ce.label_smoothing=1.5"), phrase="label_smoothing"),
    bad("bound-label-noise-rate-one", *run_cls("data.label_noise={rate: 1.0}"), phrase="data.label_noise.rate"),
    bad("bound-ensemble-zero", *run_cls("teacher.ensemble=0"), phrase="teacher.ensemble"),
    bad("bound-eval-batch-zero", *run_cls("eval.batch_size=0"), phrase="eval.batch_size"),
    bad("bound-ece-bins-zero", *run_cls("eval.ece_bins=0"), phrase="eval.ece_bins"),
    bad("bound-validation-fraction", *run_cls("data.validation=1.5"), phrase="data.validation"),
    bad("bound-labelled-zero", *run_cls("data.labelled=0"), phrase="data.labelled"),
    bad("bound-labelled-too-many", *run_cls("data.labelled=100000"), phrase="data.labelled=100000 exceeds"),
    bad("bound-test-too-many", *run_cls("data.test=5000"), phrase="data.test=5000"),
    bad("bound-epochs-zero", *run_cls("train.steps=null", "train.epochs=0"), phrase="train.epochs"),
    bad("bound-clip-zero", *run_cls("train.clip_grad_norm=0"), phrase="train.clip_grad_norm"),
    bad("bound-warmup-ratio-one", *run_cls("train.schedule.warmup_ratio=1.0"), phrase="train.schedule.warmup_ratio"),
    bad("bound-ema-momentum", *run_cls("teacher={source: ema, momentum: 1.5}"), phrase="teacher.momentum"),
    bad("bound-lm-layers-zero", *run_lm("student.layers=0"), phrase="student.layers"),
    bad("bound-lm-heads-zero", *run_lm("student.heads=0"), phrase="student.heads"),
    bad("bound-lm-hidden-zero", *run_lm("student.hidden_size=0"), phrase="student.hidden_size"),
    bad("bound-lm-vocab-zero", *run_lm("student.vocab_size=0"), phrase="student.vocab_size"),
    bad("bound-lm-vocab-negative", *run_lm("teacher.model.vocab_size=-5"), phrase="teacher.model.vocab_size"),
    bad("bound-lm-intermediate-zero", *run_lm("student.intermediate_size=0"), phrase="student.intermediate_size"),
    bad("bound-lm-positions-zero", *run_lm("student.max_positions=0"), phrase="student.max_positions"),
    bad("bound-lm-seq-len-zero", *run_lm("data.seq_len=0"), phrase="data.seq_len"),
    bad("bound-lm-sampling-temperature", *run_lm("method.temperature=0"), phrase="method.temperature"),
    bad("bound-lm-student-lambda", *run_lm("method.student_lambda=1.5"), phrase="method.student_lambda"),
    bad("bound-lm-max-new-tokens", *run_lm("method.max_new_tokens=0"), phrase="method.max_new_tokens"),
    bad("bound-lm-tokenizer-vocab", *run_lm("data.tokenizer={kind: bpe, vocab_size: 10}"),
        phrase="data.tokenizer.vocab_size"),
    bad("bound-lm-arithmetic-no-training", *run_lm("data.arithmetic.train=0"), phrase="data.arithmetic.train"),
    bad("bound-lm-paced-exponent", *run_lm("method.paced.a=-1"), phrase="method.paced.a"),
]  # fmt: skip

COMBINATIONS = [
    bad("combo-teacher-train-and-checkpoint", *run_cls("teacher.checkpoint={tmp}/w.safetensors"),
        phrase="exactly one of"),
    bad("combo-checkpoint-without-model", *run_cls("teacher={checkpoint: '{tmp}/w.safetensors'}"),
        phrase="needs teacher.model"),
    bad("combo-kd-without-teacher", *run_cls("teacher=null"), phrase="needs a teacher"),
    bad("combo-teacher-unused", *run_cls("loss={ce: {weight: 1.0}}"), phrase="no loss term uses it"),
    bad("combo-transfer-unused", *run_cls("teacher=null", "loss={ce: {weight: 1.0}}", "data.transfer=10"),
        phrase="data.transfer=10"),
    bad("combo-snapshot-without-baseline", *run_cls("teacher={source: snapshot}"), phrase="baseline.enabled=true"),
    bad("combo-steps-and-epochs", *run_cls("train.epochs=1"), phrase="steps and epochs are both set"),
    bad("combo-no-length", *run_cls("train.steps=null"), phrase="set steps or epochs"),
    bad("combo-batch-not-divisible", *run_cls("train.grad_accum=3"), phrase="not divisible by grad_accum"),
    bad("combo-two-warmups", *run_cls("train.schedule={warmup_steps: 1, warmup_ratio: 0.1}"),
        phrase="warmup_steps and warmup_ratio"),
    bad("combo-pskd-with-transfer", *run_cls("teacher={source: past_predictions}", "data.transfer=10"),
        phrase="past_predictions"),
    bad("combo-seeds-repeated", *run_cls("seeds=[0, 0]"), phrase="distinct"),
    bad("combo-seeds-empty", *run_cls("seeds=[]"), phrase="seeds"),
    bad("combo-hint-without-exits", *run_cls("loss.hint={weight: 1.0}"), phrase="hint"),
    bad("combo-precompute-with-augment", *run_cls("teacher.precompute=true", "train.augment.shift=1"),
        phrase="teacher.precompute=true"),
    bad("combo-ensemble-from-checkpoint", *run_cls(*CKPT, "teacher.ensemble=2"), phrase="teacher.ensemble > 1"),
    bad("combo-lm-method-on-packed-text", *run_lm("data.name=austen", "method.name=on_policy"),
        phrase="use data.name=arithmetic"),
    bad("combo-lm-heads-do-not-divide", *run_lm("student.hidden_size=30", "student.heads=4"),
        phrase="must be a multiple of heads=4"),
    bad("combo-lm-odd-head-dim", *run_lm("student.hidden_size=12", "student.heads=4"), phrase="must be even"),
    bad("combo-lm-teacher-train-and-pretrained", *run_lm("teacher.model.pretrained={tmp}/teacher"),
        phrase="both set"),
    bad("combo-lm-teacher-neither", *run_lm("teacher.train=null"), phrase="teacher.train (train it first)"),
    bad("combo-lm-chunked-with-paced", *run_lm("chunked_loss.enabled=true", "method.name=paced"),
        phrase="chunked_loss.enabled=true"),
    bad("combo-lm-byte-vocab-size", *run_lm("data.tokenizer={kind: byte, vocab_size: 300}"),
        phrase="must be null for kind=byte"),
    bad("combo-lm-pretrained-tokenizer-without-source", *run_lm("data.tokenizer={kind: pretrained}"),
        phrase="needs tokenizer.pretrained"),
    bad("combo-lm-tokenizer-source-without-kind", *run_lm("data.tokenizer={kind: bpe, pretrained: x}"),
        phrase="set kind=pretrained"),
    bad("combo-lm-kd-without-teacher", *run_lm("teacher=null"), phrase="needs a teacher"),
    bad("combo-lm-hint-term", *run_lm("loss.hint={weight: 1.0}"), phrase="feature hints"),
]  # fmt: skip

CHECKPOINTS = [
    bad("ckpt-missing", *run_cls(*CKPT), phrase="does not exist"),
    bad("ckpt-empty", *run_cls(*CKPT), phrase="is empty", setup=_write("w.safetensors", b"")),
    bad("ckpt-garbage", *run_cls(*CKPT), phrase="is not a safetensors file",
        setup=_write("w.safetensors", b"\x89PNG garbage bytes " * 20)),
    bad("ckpt-truncated", *run_cls(*CKPT), phrase="truncated", setup=_truncated_weights),
    bad("ckpt-json-file", *run_cls(*CKPT), phrase="is not a safetensors file",
        setup=_write("w.safetensors", '{"body.1.weight": [[0.0]]}')),
    bad("ckpt-torch-pickle", *run_cls(*CKPT), phrase="is not a safetensors file", setup=_pickle_weights),
    bad("ckpt-directory", *run_cls(*CKPT), phrase="is a directory", setup=_mkdir("w.safetensors")),
    bad("ckpt-other-architecture", *run_cls("teacher.train=null", "teacher.checkpoint={tmp}/cnn.safetensors"),
        phrase="another architecture", setup=_cnn_weights),
    bad("ckpt-other-widths", *run_cls(*CKPT), phrase="shape of body.1.bias is [16] in the file but [8]",
        setup=_mlp_weights("w.safetensors", [16])),
    bad("ckpt-missing-layer", *run_cls(*CKPT), phrase="missing keys", setup=_mlp_weights("w.safetensors", [])),
    bad("ckpt-unreadable", *run_cls(*CKPT), phrase="permission denied", needs_non_root=True,
        setup=_setups(_mlp_weights("w.safetensors", [8]), _chmod("w.safetensors", 0))),
    ok("ckpt-valid-control", *run_cls(*CKPT), setup=_mlp_weights("w.safetensors", [8])),
]  # fmt: skip

PRETRAINED = [
    bad("pretrained-teacher-dir-missing", *run_cls("teacher={model: {pretrained: '{tmp}/absent'}}"),
        phrase="the directory does not exist"),
    bad("pretrained-teacher-dir-empty", *run_cls("teacher={model: {pretrained: '{tmp}/vit'}}"),
        phrase="holds no config.json", setup=_mkdir("vit")),
    bad("pretrained-teacher-is-a-file", *run_cls("teacher={model: {pretrained: '{tmp}/vit'}}"),
        phrase="is a file, not a directory", setup=_write("vit", "not a directory")),
    bad("pretrained-teacher-config-not-json", *run_cls("teacher={model: {pretrained: '{tmp}/vit'}}"),
        phrase="is not valid JSON", setup=_write("vit/config.json", "{model_type: vit")),
    bad("pretrained-teacher-no-weights", *run_cls("teacher={model: {pretrained: '{tmp}/vit'}}"),
        phrase="no weights", setup=_vit("vit", weights=None)),
    bad("pretrained-teacher-damaged-weights", *run_cls("teacher={model: {pretrained: '{tmp}/vit'}}"),
        phrase="cannot load the model", setup=_vit("vit", weights="garbage")),
    bad("pretrained-teacher-kind-given-dir-missing",
        *run_cls("teacher={model: {pretrained: '{tmp}/absent', kind: image}}"), phrase="does not exist"),
    bad("pretrained-student-dir-missing", *run_cls("student={pretrained: '{tmp}/absent'}"),
        phrase="student.pretrained"),
    bad("pretrained-teacher-hub-offline", *run_cls("teacher={model: {pretrained: some-org/no-such-model}}"),
        phrase="hugging face hub"),
    bad("pretrained-lm-teacher-missing", *run_lm(*LM_PRETRAINED_TEACHER), phrase="the directory does not exist"),
    bad("pretrained-lm-teacher-no-config", *run_lm(*LM_PRETRAINED_TEACHER), phrase="holds no config.json",
        setup=_mkdir("teacher")),
    bad("pretrained-lm-teacher-damaged-weights", *run_lm(*LM_PRETRAINED_TEACHER), phrase="cannot load the model",
        setup=_llama("teacher", weights="garbage")),
    bad("pretrained-lm-student-hub-offline", *run_lm("student.pretrained=some-org/no-such-model"),
        phrase="hugging face hub"),
    bad("pretrained-lm-tokenizer-missing", *run_lm("data.tokenizer={kind: pretrained, pretrained: '{tmp}/tok'}"),
        phrase="does not exist"),
    bad("pretrained-lm-tokenizer-empty-dir",
        *run_lm("data.tokenizer={kind: pretrained, pretrained: '{tmp}/tok'}"), phrase="no tokenizer files",
        setup=_mkdir("tok")),
    bad("pretrained-lm-tokenizer-damaged",
        *run_lm("data.tokenizer={kind: pretrained, pretrained: '{tmp}/tok'}"), phrase="damaged",
        setup=_byte_tokenizer("tok", damage="{not json")),
]  # fmt: skip

VOCABULARY = [
    bad("vocab-student-below-byte", *run_lm("student.vocab_size=100"), phrase="student.vocab_size=100"),
    bad("vocab-teacher-below-byte", *run_lm("teacher.model.vocab_size=258"), phrase="teacher.model.vocab_size=258"),
    bad("vocab-student-below-pretrained-tokenizer",
        *run_lm("data.tokenizer={kind: pretrained, pretrained: '{tmp}/tok'}", "student.vocab_size=200"),
        phrase="smaller than the tokenizer's 259 ids", setup=_byte_tokenizer("tok")),
    bad("vocab-pretrained-teacher-other-tokenizer", *run_lm(*LM_PRETRAINED_TEACHER),
        phrase="differs from the run's", setup=_llama("teacher", tokenizer="bpe")),
    bad("vocab-pretrained-student-too-small", *run_lm("student.pretrained={tmp}/student"),
        phrase="fewer than the tokenizer's", setup=_llama("student", tokenizer=None, vocab=100)),
]  # fmt: skip

DATA = [
    bad("fm-root-missing", *("run", "FM", "data.root={tmp}/absent"), phrase="does not exist"),
    bad("fm-root-empty", *("run", "FM"), phrase="lacks", setup=_mkdir("fm")),
    bad("fm-root-is-a-file", *("run", "FM"), phrase="is a file, not a folder", setup=_write("fm", "x")),
    bad("fm-one-file-missing", *("run", "FM"), phrase="lacks t10k-labels",
        setup=_fm(lambda d: (d / IDX["test_labels"]).unlink())),
    bad("fm-truncated-gzip", *("run", "FM"), phrase="truncated",
        setup=_fm(lambda d: (d / IDX["train_images"]).write_bytes((d / IDX["train_images"]).read_bytes()[:200]))),
    bad("fm-not-gzip", *("run", "FM"), phrase="not a readable gzip",
        setup=_fm(lambda d: (d / IDX["train_labels"]).write_bytes(b"PK\x03\x04 a zip, not gzip"))),
    bad("fm-empty-file", *("run", "FM"), phrase="magic", setup=_fm(lambda d: (d / IDX["test_images"]).write_bytes(b""))),
    bad("fm-wrong-magic", *("run", "FM"), phrase="bad magic number",
        setup=_fm(lambda d: _idx(d / IDX["train_images"], [40, 28, 28], bytes(40 * 784), magic=b"\x00\x00\x0d"))),
    bad("fm-header-longer-than-data", *("run", "FM"), phrase="truncated or corrupt",
        setup=_fm(lambda d: _idx(d / IDX["train_images"], [40, 28, 28], bytes(20 * 784)))),
    bad("fm-label-count-mismatch", *("run", "FM"), phrase="do not belong together",
        setup=_fm(lambda d: _idx(d / IDX["train_labels"], [30], bytes(30)))),
    bad("fm-wrong-image-size", *("run", "FM"), phrase="[N, 28, 28]",
        setup=_fm(lambda d: _idx(d / IDX["test_images"], [20, 27, 27], bytes(20 * 27 * 27)))),
    bad("fm-label-out-of-range", *("run", "FM"), phrase="labels are 0..9",
        setup=_fm(lambda d: _idx(d / IDX["test_labels"], [20], bytes([10] * 20)))),
    bad("fm-labelled-exceeds-pool", *("run", "FM", "data.labelled=1000"), phrase="data.labelled=1000 exceeds",
        setup=_fm(lambda d: None)),
    bad("fm-cache-copy-not-official", *("run", "FM", "data.root=null"), phrase="not the official Fashion-MNIST file",
        setup=lambda tmp, mp: fake_fashion(tmp / "xdg" / "distillery" / "fashion-mnist")),
    bad("fm-download-offline", *("run", "FM", "data.root=null", "data.download=true"), phrase="download failed",
        setup=_offline_download),
    bad("fm-download-checksum-mismatch", *("run", "FM", "data.root=null", "data.download=true"),
        phrase="does not match its published checksum", setup=_tampered_download),
    ok("fm-valid-control", "run", "FM", setup=_fm(lambda d: None)),
    bad("lm-seq-len-too-short-for-problems", *run_lm("data.seq_len=8", "data.arithmetic.digits=[5, 5]",
                                                     "data.arithmetic.train=20"),
        phrase="data.seq_len=8 is too short"),
    bad("lm-cached-responses-not-json", *run_lm("method.name=sequence", "loss={ce: {weight: 1.0}}"),
        phrase="not valid JSON", setup=_seqkd_cache("garbage")),
    bad("lm-cached-responses-missing-key", *run_lm("method.name=sequence", "loss={ce: {weight: 1.0}}"),
        phrase="missing key(s) 'response'", setup=_seqkd_cache("missing")),
]  # fmt: skip

LOCATIONS = [
    bad("out-root-is-a-file", *run_cls("output.root={tmp}/afile"), phrase="{tmp}/afile", setup=_write("afile", "x")),
    bad("out-root-under-a-file", *run_cls("output.root={tmp}/afile/runs"), phrase="{tmp}/afile",
        setup=_write("afile", "x")),
    bad("out-dir-is-a-file", *run_cls("output.dir={tmp}/afile"), phrase="{tmp}/afile", setup=_write("afile", "x")),
    bad("out-dir-holds-a-run", *run_cls("output.dir={tmp}/full"), phrase="already holds a run",
        setup=_write("full/config.yaml", "name: other\n")),
    bad("out-root-read-only", *run_cls("output.root={tmp}/ro/runs"), phrase="{tmp}/ro", needs_non_root=True,
        setup=_setups(_mkdir("ro"), _chmod("ro", stat.S_IRUSR | stat.S_IXUSR))),
    bad("out-name-dot-dot", *run_cls("name=.."), phrase="name"),
    bad("out-name-with-slash", *run_cls("name=a/b"), phrase="name"),
    bad("out-name-escaping-root", *run_cls("name=../../escaped"), phrase="name"),
    bad("cache-dir-is-a-file", *run_cls(), phrase="{tmp}/cachefile", setup=_write("cachefile", "x"),
        env={"DISTILLERY_CACHE": "{tmp}/cachefile"}),
    bad("cache-teacher-dir-is-a-file", *run_cls("teacher.cache_dir={tmp}/afile"), phrase="{tmp}/afile",
        setup=_write("afile", "x")),
    bad("cache-lm-tokenizer-cache-is-a-file", *run_lm(), phrase="tokenizer cache", setup=_write("cachefile", "x"),
        env={"DISTILLERY_CACHE": "{tmp}/cachefile"}),
]  # fmt: skip

CLI = [
    bad("cli-unknown-subcommand", "frobnicate", phrase="invalid choice"),
    bad("cli-unknown-flag", "run", "CLS", "--frobnicate", phrase="unrecognized arguments"),
    bad("cli-override-without-equals", "run", "CLS", "train.steps", phrase="not of the form key=value"),
    bad("cli-override-empty-key", "run", "CLS", "=5", phrase="not of the form key=value"),
    bad("cli-override-into-a-value", "run", "CLS", "train.steps.x=1", phrase="is a value, not a section"),
    bad("cli-override-bad-index", "run", "CLS", "seeds.5=1", phrase="not an index"),
    bad("cli-override-bad-yaml", "run", "CLS", "seeds=[0,", phrase="not valid YAML"),
    bad("cli-unknown-recipe", "run", "no-such-recipe", phrase="no recipe or config file named"),
    bad("cli-eval-folder-not-a-run", "eval", "{tmp}/notarun", phrase="not inside a run directory",
        setup=_write("notarun/notes.txt", "hello")),
    bad("cli-eval-missing-folder", "eval", "{tmp}/absent", phrase="does not exist"),
    bad("cli-eval-a-file", "eval", "{tmp}/afile", phrase="{tmp}/afile", setup=_write("afile", "x")),
    bad("cli-eval-damaged-run-config", "eval", "{tmp}/brokenrun", phrase="config.yaml",
        setup=_run_dir_with_bad_config),
    bad("cli-resume-without-a-run", "run", "CLS", "--resume", phrase="no earlier run"),
    bad("cli-recipes-extra-argument", "recipes", "extra", phrase="unrecognized arguments"),
    bad("cli-serve-teacher-missing-model", "serve-teacher", "{tmp}/absent", phrase="does not exist"),
    bad("cli-serve-teacher-open-without-token", "serve-teacher", "{tmp}/absent", "--host", "0.0.0.0",
        phrase="not a loopback address, and no token"),
]  # fmt: skip

# Several teachers (teacher.members): a trained member and a checkpoint one, as the CLS teacher.
MEMBER = "{model: {name: mlp, hidden: [8]}, train: {steps: 1, batch_size: 16, eval_every: 0}}"
LOADED = "{model: {name: mlp, hidden: [8]}, checkpoint: '{tmp}/w3.safetensors'}"


def members(*extra: str) -> tuple[str, ...]:
    return (f"teacher={{members: [{MEMBER}, {LOADED}]}}", *extra)


MULTI_TEACHER = [
    bad("multi-members-of-other-sizes", *run_cls(*members()), phrase="the members give outputs of different sizes",
        setup=_mlp_weights("w3.safetensors", [8], classes=3)),
    bad("multi-member-of-another-architecture", *run_cls(*members()), phrase="teacher.members.1.checkpoint",
        setup=_mlp_weights("w3.safetensors", [16])),
    bad("multi-one-member", *run_cls(f"teacher={{members: [{MEMBER}]}}"), phrase="need at least 2"),
    bad("multi-weights-length", *run_cls(*members("teacher.combine=weighted", "teacher.weights=[1]")),
        phrase="teacher.weights has 1 entries for 2 members"),
    bad("multi-weights-without-weighted", *run_cls(*members("teacher.weights=[1, 1]")),
        phrase="teacher.combine=weighted"),
    bad("multi-drop-every-member", *run_cls(*members("teacher.drop=2")), phrase="teacher.drop=2"),
    ok("multi-valid-control", *run_cls(*members()), setup=_mlp_weights("w3.safetensors", [8])),
]  # fmt: skip

# Real-size LM settings: dtypes, mixed precision, checkpointing, LoRA, placement of the teacher.
SCALE = [
    bad("scale-fp16-on-cpu", *run_lm("train.mixed_precision=fp16"), phrase="fp16 needs a CUDA GPU"),
    bad("scale-mixed-precision-conflict", *run_lm("train.mixed_precision=bf16", "teacher.train.mixed_precision=no"),
        phrase="teacher.train.mixed_precision=no"),
    bad("scale-unknown-dtype", *run_lm("student.dtype=float8"), phrase="student.dtype"),
    bad("scale-checkpointing-not-hf", *run_cls("train.gradient_checkpointing=true"),
        phrase="needs a Hugging Face model"),
    bad("scale-device-map-without-pretrained", *run_lm("teacher.model.device_map=auto"),
        phrase="device_map is for a pretrained model"),
    bad("scale-offload-with-cache", *run_lm("teacher.source=cache", "teacher.offload=true"),
        phrase="teacher.offload is for teacher.source=frozen"),
    bad("scale-peft-unmerged-without-base", *run_lm("student.peft={r: 2, merge: false}"),
        phrase="student.peft.merge=false"),
    bad("scale-peft-unknown-module", *run_lm("student.peft={r: 2, target_modules: [no_such_proj]}"),
        phrase="student.peft.target_modules"),
    bad("server-without-url", *run_lm("teacher={source: server}"), phrase="needs teacher.url"),
    bad("server-url-scheme", *run_lm("teacher={source: server, url: 'localhost:8000'}"), phrase="http://"),
    bad("server-with-a-model", *run_lm("teacher={source: server, url: 'http://127.0.0.1:9', model: {layers: 3}}"),
        phrase="teacher.source=server asks a model that runs on the server"),
    bad("server-sequence-method", *run_lm("teacher={source: server, url: 'http://127.0.0.1:9'}",
                                          "method.name=sequence"), phrase="method.name=sequence"),
    bad("server-top-k-temperature", *run_lm("teacher={source: server, url: 'http://127.0.0.1:9', server: {top_k: 4}}",
                                            "loss.forward_kl.temperature=2.0"), phrase="temperature 1"),
    bad("server-unreachable", *run_lm("teacher={source: server, url: 'http://127.0.0.1:9', server: {retries: 0}}"),
        phrase="http://127.0.0.1:9"),
    ok("scale-valid-control", *run_lm("student.peft={r: 2}", "train.gradient_checkpointing=true",
                                      "teacher.offload=true")),
]  # fmt: skip

CNN = "student={name: cnn, channels: [4], dropout: 0}"
COMPRESS = [
    bad("compress-unknown-backend", *run_cls(CNN, "compress={method: qat, backend: tpu}"),
        phrase="is not a quantized engine this CPU's PyTorch supports"),
    bad("compress-sparsity-one", *run_cls(CNN, "compress={method: prune, sparsity: 1.0}"), phrase="compress.prune.sparsity"),
    bad("compress-sparsity-negative", *run_cls(CNN, "compress={method: prune, sparsity: -0.1}"),
        phrase="compress.prune.sparsity"),
    bad("compress-window-reversed", *run_cls(CNN, "compress={method: prune, sparsity: 0.5, start: 0.8, end: 0.5}"),
        phrase="must be below compress.end"),
    bad("compress-unknown-method", *run_cls(CNN, "compress={method: distil}"), phrase="compress"),
    bad("compress-ema-teacher", *run_cls(CNN, "teacher={source: ema}", "compress={method: qat}"),
        phrase="not teacher.source=ema"),
    bad("compress-vit-student", *run_cls("student={name: vit}", "compress={method: qat}"),
        phrase="supports cnn and mlp students"),
    bad("data-free-teacher-without-batch-norm", *run_cls("teacher.model={name: cnn, channels: [4]}", CNN,
                                                         "data_free={images: 8, steps: 1}"),
        phrase="set teacher.model.batch_norm: true"),
    bad("data-free-mlp-teacher", *run_cls(CNN, "data_free={images: 8, steps: 1}"),
        phrase="set teacher.model.batch_norm: true"),
    bad("data-free-with-transfer", *run_cls("teacher.model={name: cnn, channels: [4], batch_norm: true}", CNN,
                                            "data.transfer=10", "data_free={images: 8, steps: 1}"),
        phrase="set data.transfer=0"),
    bad("data-free-ema-teacher", *run_cls("teacher={source: ema}", "data_free={images: 8, steps: 1}"),
        phrase="not teacher.source=ema"),
    bad("data-free-batch-of-one", *run_cls("teacher.model={name: cnn, channels: [4], batch_norm: true}", CNN,
                                           "data_free={images: 8, batch_size: 1}"), phrase="data_free.batch_size"),
    ok("data-free-valid-control", *run_cls("teacher.model={name: cnn, channels: [4], batch_norm: true}", CNN,
                                           "data_free={images: 8, batch_size: 4, steps: 2}")),
    ok("compress-valid-control", *run_cls(CNN, "compress={method: prune, sparsity: 0.5}")),
    ok("compress-qat-valid-control", *run_cls(CNN, "compress={method: qat}")),
]  # fmt: skip

CONTROLS = [
    ok("cls-valid-control", "run", "CLS"),
]

CASES = [*YAML, *SELF_TEACHER, *UNKNOWN_KEYS, *WRONG_TYPES, *BOUNDS, *COMBINATIONS, *CHECKPOINTS, *PRETRAINED, *VOCABULARY,
         *DATA, *LOCATIONS, *CLI, *MULTI_TEACHER, *SCALE, *COMPRESS, *CONTROLS]  # fmt: skip


def test_the_catalogue_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert sum(c.code == 2 for c in CASES) >= 110


# ----------------------------------------------------------------------------------------------------
# Running a row
# ----------------------------------------------------------------------------------------------------

# A valid cache of trained tokenizers, and the teacher store's lock files (they hold no teacher):
# not a run's output.
ALLOWED_NEW = ("cache/tokenizers", "cache/teachers/.locks")


def _expand(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def _argv(case: Case, tmp: Path) -> list[str]:
    sources = {"CLS": tmp / "cls.yaml", "LM": tmp / "lm.yaml", "FM": tmp / "fm.yaml"}
    argv = [str(sources.get(a, _expand(a, tmp))) for a in case.argv]
    if argv and argv[0] == "run":
        at = 2 if len(argv) > 1 and "=" not in argv[1] and not argv[1].startswith("-") else 1
        argv[at:at] = [f"output.root={tmp / 'runs'}"]
        argv.append("--no-progress")
    return argv


def _snapshot(tmp: Path) -> set[Path]:
    return {p for p in tmp.rglob("*") if p.is_file() or p.is_symlink()}


def _teacher_entries(tmp: Path) -> set[str]:
    root = tmp / "cache" / "teachers"
    return {p.name for p in root.iterdir() if p.name != ".locks"} if root.is_dir() else set()


def _release(tmp: Path) -> None:
    """Give back every permission a row took away, so the folder can be inspected and removed."""
    for p in [tmp, *tmp.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, stat.S_IRWXU)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch, capsys):
    if case.needs_non_root and IS_ROOT:
        pytest.skip(ROOT_SKIP)
    import huggingface_hub.constants

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # Fashion-MNIST's download cache
    monkeypatch.delenv("DISTILLERY_DATA", raising=False)
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # hub ids fail fast, never download
    for name, value in case.env.items():
        monkeypatch.setenv(name, _expand(value, tmp_path))
    (tmp_path / "cls.yaml").write_text(CLS_YAML)
    (tmp_path / "lm.yaml").write_text(LM_YAML)
    (tmp_path / "fm.yaml").write_text(_expand(FM_YAML, tmp_path))
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    capsys.readouterr()
    before, teachers_before = _snapshot(tmp_path), _teacher_entries(tmp_path)
    argv = _argv(case, tmp_path)
    try:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors
            code = exc.code
        out, err = capsys.readouterr()
    finally:
        _release(tmp_path)

    assert "Traceback" not in out + err, err
    assert code == case.code, f"exit {code}, expected {case.code}; stderr:\n{err}"
    if case.code != 0:
        phrase = _expand(case.phrase, tmp_path)
        assert phrase.lower() in err.lower(), f"{phrase!r} not in stderr:\n{err}"
        assert len(err.strip()) < 4000, "one message, not a dump"
        new = sorted(
            str(p.relative_to(tmp_path))
            for p in _snapshot(tmp_path) - before
            if not any(p.is_relative_to(tmp_path / a) for a in ALLOWED_NEW)
        )
        assert not new, f"left behind: {new}"
        assert _teacher_entries(tmp_path) == teachers_before, "a teacher-cache entry was left behind"
        assert not (tmp_path / "pwned").exists()
        TALLY[TALLY_KEY] += 1
    else:
        runs = [p for p in (tmp_path / "runs").rglob("config.yaml")]
        assert len(runs) == 1 and (runs[0].parent / "summary.json").is_file()


# ----------------------------------------------------------------------------------------------------
# The Fashion-MNIST download, without a network
# ----------------------------------------------------------------------------------------------------


def test_a_download_that_matches_the_published_md5_is_kept(tmp_path, monkeypatch):
    from distillery.data import fashion_mnist as fm

    payloads = {name: f"payload of {name}".encode() for name in fm.FILES.values()}
    monkeypatch.setattr(fm, "MD5", {name: hashlib.md5(p).hexdigest() for name, p in payloads.items()})
    urls = []

    def serve(url, timeout=None):
        urls.append(url)
        return _FakeResponse(payloads[url.rsplit("/", 1)[1]])

    monkeypatch.setattr("urllib.request.urlopen", serve)
    fm.download(tmp_path / "dl")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(payloads)  # no .part file left
    assert all(url.startswith("https://") for url in urls) and len(urls) == 4
    assert (tmp_path / "dl" / fm.FILES["train_images"]).read_bytes() == payloads[fm.FILES["train_images"]]


def test_a_download_that_fails_its_md5_is_deleted(tmp_path, monkeypatch):
    from distillery.data import fashion_mnist as fm
    from distillery.errors import DataNotFoundError

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: _FakeResponse(b"tampered"))
    with pytest.raises(DataNotFoundError, match="does not match its published checksum .* was deleted"):
        fm.download(tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == []


def test_the_pinned_hashes_are_those_of_the_installed_dataset():
    """The Debian package holds the official contents (recompressed): their SHA-256 are the pinned ones."""
    from distillery.data import fashion_mnist as fm

    if not all((fm.SYSTEM_DIR / f).is_file() for f in fm.FILES.values()):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    for name in fm.FILES.values():
        assert fm.read_idx(fm.SYSTEM_DIR / name, fm.SHA256[name]).size > 0  # raises on a mismatch


def test_damaged_weights_are_reported_without_running_anything(tmp_path):
    """A pickle named .safetensors is refused from its header: nothing in it is unpickled."""
    from distillery.errors import ConfigError
    from distillery.models import MLP
    from distillery.models.weights import load_weights

    class Boom:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    torch.save({"x": Boom()}, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        load_weights(MLP(64, 10, [8]), tmp_path / "w.safetensors", "teacher.checkpoint")
    assert (tmp_path / "victim").is_dir()
