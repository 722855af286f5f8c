"""Real-size language-model settings on tiny models: weight dtypes, mixed precision, gradient
checkpointing, LoRA students, a teacher offloaded to CPU memory.

On this CPU bf16 matmuls are slow, so the bf16 checks run a few steps of a model with a few thousand
weights: they check where float32 is kept, not speed (the benchmark measures memory and time).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distillery.cli import main
from distillery.config import load_config
from distillery.errors import ConfigError
from distillery.losses import Objective, build_objective
from distillery.losses.logit import CrossEntropyConfig, ForwardKLConfig
from distillery.models.causal_lm import CausalLMConfig, build_causal_lm
from distillery.models.hf import HFCausalLMAdapter
from distillery.models.placement import is_placed, offload_to_cpu
from distillery.teachers import FrozenTeacher
from distillery.train import TrainConfig, fit, make_accelerator
from tests.integration.test_lm import TINY, _batch_with_uneven_lengths

VOCAB = 40


class _Rows:
    """A fixed set of LM rows with the ``get_batch`` protocol of the loop."""

    def __init__(self, n: int = 16, length: int = 9, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def get_batch(self, indices):
        ids = self.ids[indices]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class _Spy(Objective):
    """An Objective that records the dtypes of what reaches the loss and of the loss parts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, torch.dtype]] = []

    def forward(self, inputs, counts):
        parts = super().forward(inputs, counts)
        self.seen.append(
            {
                "student": inputs.student_logits.dtype,
                "teacher": inputs.teacher_logits.dtype,
                **{k: v.dtype for k, v in parts.items()},
            }
        )
        return parts


def _kd_objective() -> _Spy:
    terms = build_objective({"ce": CrossEntropyConfig(weight=0.5), "kd": ForwardKLConfig(weight=0.5)})
    return _Spy(dict(terms.terms), {"ce": 0.5, "kd": 0.5})


def _tiny(dtype: str = "float32", seed: int = 0, hidden: int = 16):
    torch.manual_seed(seed)
    return build_causal_lm(CausalLMConfig(hidden_size=hidden, layers=1, heads=2, dtype=dtype), VOCAB)


@pytest.fixture
def fresh_accelerator():
    """Each test makes its accelerator; the state returns to fp32 afterwards for the tests that follow."""
    yield
    make_accelerator("no")


# ---- dtypes and mixed precision ----------------------------------------------------------------------


def test_a_bf16_student_and_teacher_train_and_their_loss_is_float32(fresh_accelerator):
    student, teacher = _tiny("bfloat16"), _tiny("bfloat16", seed=1, hidden=24)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    objective = _kd_objective()
    adapter = HFCausalLMAdapter()
    result = fit(student, _Rows(), objective, TrainConfig(steps=3, batch_size=4, eval_every=0),
                 teacher=FrozenTeacher(teacher, adapter, keep_dtype=True), adapter=adapter, progress=False)  # fmt: skip
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(v)) for v in result.last_losses.values())
    seen = objective.seen[0]
    # the logits arrive in the models' dtype (bf16 student, teacher outputs made float32 by FrozenTeacher)
    assert seen["student"] == torch.bfloat16 and seen["teacher"] == torch.float32
    assert seen["ce"] == seen["kd"] == torch.float32  # the maths ran in float32
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}  # the teacher was not cast


def test_the_float32_loss_of_bf16_logits_equals_the_loss_of_their_float32_copy():
    # "computed in float32": the bf16 logits are upcast before any reduction (not summed in bf16)
    batch = _batch_with_uneven_lengths(vocab=VOCAB)
    adapter = HFCausalLMAdapter()
    logits = adapter.forward(_tiny("bfloat16"), batch).logits
    teacher = adapter.forward(_tiny(seed=1), batch).logits.detach()
    target, mask = adapter.rows(batch)
    objective = build_objective({"kd": ForwardKLConfig(weight=1.0)})
    counts = objective.counts(target, mask)
    from distillery.losses import LossInputs

    def loss(s):
        return objective(
            LossInputs(student_logits=s, target=target, mask=mask, teacher_logits=teacher), counts
        )["kd"]

    assert loss(logits).dtype == torch.float32
    assert loss(logits).item() == loss(logits.float()).item()


def test_bf16_mixed_precision_autocasts_the_forward_and_keeps_float32_weights_and_loss(fresh_accelerator):
    student, teacher = _tiny(), _tiny(seed=1, hidden=24)
    inner: list[torch.dtype] = []
    student.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
    objective = _kd_objective()
    adapter = HFCausalLMAdapter()
    config = TrainConfig(steps=2, batch_size=4, eval_every=0, mixed_precision="bf16")
    fit(
        student,
        _Rows(),
        objective,
        config,
        teacher=FrozenTeacher(teacher, adapter),
        adapter=adapter,
        progress=False,
    )
    assert inner and set(inner) == {torch.bfloat16}  # the matmuls ran in bf16
    assert {p.dtype for p in student.parameters()} == {torch.float32}  # master weights stay float32
    seen = objective.seen[0]
    assert seen["student"] == torch.float32  # Accelerate returns the outputs in float32
    assert seen["ce"] == seen["kd"] == torch.float32


def test_mixed_precision_is_one_setting_per_process(fresh_accelerator):
    acc = make_accelerator("no")
    with pytest.raises(ConfigError, match="one setting per process"):
        fit(_tiny(), _Rows(), _kd_objective(), TrainConfig(steps=1, batch_size=4, mixed_precision="bf16"),
            teacher=FrozenTeacher(_tiny(seed=1), HFCausalLMAdapter()), adapter=HFCausalLMAdapter(), accelerator=acc,
            progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        make_accelerator("fp16")


def test_a_run_in_bf16_writes_a_bf16_student_that_loads(tmp_path, monkeypatch, fresh_accelerator):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    code = main(["run", "lm-kd", *TINY, "train.steps=3", "teacher.train.steps=3", "student.dtype=bfloat16",
                 "teacher.model.dtype=bfloat16", "baseline.enabled=false", f"output.root={out}"])  # fmt: skip
    assert code == 0
    saved = next(out.glob("lm-kd/*/seed-0/distilled/model"))
    weights = load_file(str(saved / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    result = json.loads((saved.parent / "result.json").read_text())
    assert torch.isfinite(torch.tensor(result["metrics"]["perplexity"]))


# ---- gradient checkpointing ---------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_gradients_and_the_training_of_the_plain_model(fresh_accelerator):
    # recomputing the forward in the backward pass is the same arithmetic on CPU: equal to 1e-6
    finals = []
    for checkpointing in (False, True):
        student = _tiny(hidden=32)
        seen: list[bool] = []
        mlp = student.model.layers[0].mlp  # inside the checkpointed layer: recomputed in the backward pass
        mlp.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(torch.is_grad_enabled()))
        config = TrainConfig(steps=4, batch_size=4, eval_every=0, gradient_checkpointing=checkpointing)
        adapter = HFCausalLMAdapter()
        fit(student, _Rows(), _kd_objective(), config, teacher=FrozenTeacher(_tiny(seed=1), adapter),
            adapter=adapter, progress=False, seed=3)  # fmt: skip
        # with checkpointing the layer's inside runs twice per step: the forward (activations dropped), the backward
        assert len(seen) == (8 if checkpointing else 4)
        assert not student.is_activation_checkpointing  # fit leaves the model as it came
        finals.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.allclose(finals[0], finals[1], rtol=0, atol=1e-6)


def test_one_gradient_with_and_without_checkpointing_matches():
    batch = _batch_with_uneven_lengths(vocab=VOCAB)
    adapter = HFCausalLMAdapter()
    grads = []
    for on in (False, True):
        model = _tiny(hidden=32)
        model.train()
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out = adapter.forward(model, batch).logits
        target, mask = adapter.rows(batch)
        torch.nn.functional.cross_entropy(out[mask], target[mask]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-7)


# ---- LoRA students -----------------------------------------------------------------------------------

peft = pytest.importorskip("peft", reason="the peft extra (pip install 'distillery[peft]') is not installed")


def test_a_lora_student_trains_only_its_adapters_and_the_merged_export_is_base_plus_adapter(
    fresh_accelerator,
):
    from distillery.models.peft import PeftConfig, apply_peft, merged_copy

    base = _tiny(hidden=32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    student = apply_peft(base, PeftConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapter = HFCausalLMAdapter()
    fit(student, _Rows(), _kd_objective(), TrainConfig(steps=4, batch_size=4, eval_every=0),
        teacher=FrozenTeacher(_tiny(seed=1), adapter), adapter=adapter, progress=False)  # fmt: skip
    base_now = student.get_base_model()
    lora_b = {n: p for n, p in student.named_parameters() if "lora_B" in n}
    assert any(p.abs().sum() > 0 for p in lora_b.values())  # B starts at zero: it trained
    # every base weight is unchanged (the adapted layers' base weights included)
    for name, tensor in base_now.state_dict().items():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(tensor, before[original]), name
    # the merged weight of an adapted layer is W + (alpha / r) B A, by hand
    q = base_now.model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + (8.0 / 4) * q.lora_B["default"].weight @ q.lora_A["default"].weight
    merged = merged_copy(student)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)
    batch = _batch_with_uneven_lengths(vocab=VOCAB)
    student.eval()
    assert torch.allclose(
        adapter.forward(merged, batch).logits, adapter.forward(student, batch).logits, atol=1e-5
    )


def test_a_lora_run_saves_the_adapter_and_a_merged_model_that_loads_without_peft(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    code = main(["run", "lm-kd", *TINY, "train.steps=3", "teacher.train.steps=3", "student.peft={r: 2, alpha: 4}",
                 "train.gradient_checkpointing=true", f"output.root={out}"])  # fmt: skip
    assert code == 0
    arm = next(out.glob("lm-kd/*/seed-0/distilled"))
    assert (arm / "adapter" / "adapter_config.json").is_file()
    assert json.loads((arm / "adapter" / "adapter_config.json").read_text())["r"] == 2
    merged = AutoModelForCausalLM.from_pretrained(arm / "model")
    assert not any("lora" in k for k in merged.state_dict())
    # the baseline (SFT) arm is a LoRA student too, from the same initial adapter weights
    assert (arm.parent / "baseline" / "adapter" / "adapter_model.safetensors").is_file()
    # the exported merged model is the one the run evaluated
    result = json.loads((arm / "result.json").read_text())
    cfg = load_config(str(next(out.glob("lm-kd/*/config.yaml"))))
    from distillery.experiment.evaluate import evaluate_run

    again = evaluate_run(arm)  # distillery eval: the merged model, reloaded
    assert cfg.student.peft.r == 2
    got = again.arms["distilled"][0]["metrics"]["perplexity"]
    assert got == pytest.approx(result["metrics"]["perplexity"], rel=1e-5)


# ---- a teacher offloaded to CPU memory ------------------------------------------------------------------


def test_an_offloaded_teacher_holds_no_weights_and_gives_the_same_outputs():
    teacher = _tiny(seed=1, hidden=24)
    batch = _batch_with_uneven_lengths(vocab=VOCAB)
    adapter = HFCausalLMAdapter()
    expected = FrozenTeacher(teacher, adapter)(batch).logits
    offload_to_cpu(teacher, "cpu")
    offload_to_cpu(teacher, "cpu")  # idempotent
    assert is_placed(teacher)
    assert {p.device.type for p in teacher.parameters()} == {"meta"}  # the weights live in the offload map
    wrapped = FrozenTeacher(teacher, adapter).to("cpu")  # not moved: its placement is its own
    assert torch.equal(wrapped(batch).logits, expected)


def test_a_run_with_an_offloaded_teacher_trains_the_same_student(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    results = []
    for offload in ("false", "true"):
        out = tmp_path / f"runs-{offload}"
        code = main(["run", "lm-kd", *TINY, "train.steps=3", "teacher.train.steps=3", "baseline.enabled=false",
                     f"teacher.offload={offload}", f"output.root={out}"])  # fmt: skip
        assert code == 0
        arm = next(out.glob("lm-kd/*/seed-0/distilled"))
        results.append(load_file(str(arm / "model" / "model.safetensors")))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_scale_fields_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="device_map is for a pretrained model"):
        load_config("lm-kd", ["student.device_map=auto"])
    with pytest.raises(ConfigError, match="teacher.offload is for teacher.source=frozen"):
        load_config("lm-kd", ["teacher.source=cache", "teacher.offload=true"])
    cfg = load_config("lm-kd", ["train.mixed_precision=no"])  # YAML's bare `no` is the string
    assert cfg.train.mixed_precision == "no"


def test_a_lora_student_teaches_itself_from_the_shared_starting_model(tmp_path, monkeypatch):
    """teacher.source=self with student.peft: both arms put their adapters on the same starting model (the
    teacher's weights), so every weight without an adapter is the same in both exported models."""
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "opsd"
    code = main(["run", "lm-opsd", "teacher.train.steps=6", "train.steps=4", "train.eval_every=0",
                 "data.arithmetic.train=64", "data.arithmetic.validation=4", "data.arithmetic.test=8",
                 "student.peft={r: 2}", f"output.dir={out}", "--no-progress"])  # fmt: skip
    assert code == 0
    sft, kd = (
        load_file(str(out / "seed-0" / arm / "model" / "model.safetensors"))
        for arm in ("baseline", "distilled")
    )
    frozen = [k for k in sft if not any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    assert frozen and all(torch.equal(sft[k], kd[k]) for k in frozen)
    assert any(not torch.equal(sft[k], kd[k]) for k in sft if "q_proj" in k)  # the adapters trained apart
    # and those weights are the starting model's (the one cached teacher entry: the shared starting model)
    (entry,) = (tmp_path / "cache" / "teachers").glob("*/model.safetensors")
    start = load_file(str(entry))
    assert all(torch.equal(start[k], kd[k]) for k in frozen if k in start)
    assert sum(k in start for k in frozen) >= len(frozen) - 1  # lm_head is tied to embed_tokens
