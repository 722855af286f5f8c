"""The chunked loss inside language-model runs: the hidden-state adapter, the terms computed from it,
and the automatic choice."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillery.cli import main
from distillery.config import load_config
from distillery.errors import ConfigError
from distillery.losses import LossInputs, build_objective
from distillery.losses.logit import (
    CrossEntropyConfig,
    DKDConfig,
    ForwardKLConfig,
    JSDConfig,
    ReverseKLConfig,
    SkewKLConfig,
    SkewReverseKLConfig,
    TVDConfig,
)
from distillery.models.adapters import LM_HEAD_WEIGHT, LM_HIDDEN
from distillery.models.causal_lm import build_causal_lm
from distillery.models.hf import HFCausalLMAdapter, chunked_loss_support
from distillery.tasks.lm import chunked_loss_plan
from tests.integration.test_lm import TINY, _batch_with_uneven_lengths


def _llama(hidden, vocab=40, tied=False, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(config)


def test_hidden_state_adapter_returns_the_states_the_head_turns_into_the_logits():
    model = _llama(16)
    batch = _batch_with_uneven_lengths()
    full = HFCausalLMAdapter().forward(model, batch).logits  # (B, T-1, V)
    out = HFCausalLMAdapter(hidden_states=True).forward(model, batch)
    assert out.logits is None
    assert out.features[LM_HEAD_WEIGHT] is model.lm_head.weight
    assert torch.allclose(out.features[LM_HIDDEN] @ model.lm_head.weight.T, full, atol=1e-5)
    assert not any(m._forward_hooks for m in model.modules())  # the capture hook is gone


TERMS = {
    "forward_kl": ForwardKLConfig(temperature=2.0),
    "reverse_kl": ReverseKLConfig(),
    "jsd": JSDConfig(beta=0.3, temperature=1.5),
    "tvd": TVDConfig(),
    "skew_kl": SkewKLConfig(alpha=0.2),
    "skew_reverse_kl": SkewReverseKLConfig(alpha=0.2),
}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", sorted(TERMS))
def test_chunked_terms_equal_the_full_logit_terms_in_value_and_gradient(name, tied):
    student, teacher = _llama(16, tied=tied), _llama(24, seed=1)
    batch = _batch_with_uneven_lengths()
    objective = build_objective(
        {"ce": CrossEntropyConfig(weight=0.5, label_smoothing=0.1), name: TERMS[name]}
    )
    for term in objective.terms.values():
        term.chunk_size = 5  # several chunks, the last one short
    results = []
    for hidden in (False, True):
        adapter = HFCausalLMAdapter(hidden_states=hidden)
        student.zero_grad(set_to_none=True)
        s_out = adapter.forward(student, batch)
        with torch.no_grad():
            t_out = adapter.forward(teacher, batch)
        target, mask = adapter.rows(batch)
        count = torch.tensor([float(mask.sum())] * 2) + 3  # a global count larger than this batch's
        inputs = LossInputs(s_out.logits, target, mask, t_out.logits, s_out.features, t_out.features)
        parts = objective(inputs, count)
        objective.total(parts, 0.0).backward()
        results.append(
            ({k: v.item() for k, v in parts.items()}, {n: p.grad for n, p in student.named_parameters()})
        )
    (full, full_grads), (chunked, chunked_grads) = results
    assert chunked == pytest.approx(full, rel=1e-5, abs=1e-7)
    for key, grad in full_grads.items():
        assert torch.allclose(chunked_grads[key], grad, atol=1e-6), key


def test_terms_without_a_chunked_form_say_so():
    objective = build_objective({"dkd": DKDConfig()})
    adapter = HFCausalLMAdapter(hidden_states=True)
    batch = _batch_with_uneven_lengths()
    out = adapter.forward(_llama(16), batch)
    inputs = LossInputs(None, *adapter.rows(batch), None, out.features, out.features)
    with pytest.raises(ValueError, match="needs logits.*chunked_loss off"):
        objective(inputs)


def test_model_support_check_names_what_is_missing():
    assert chunked_loss_support(_llama(16)) is None
    gemma_like = _llama(16)
    gemma_like.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in chunked_loss_support(gemma_like)

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    assert "logits_to_keep" in chunked_loss_support(NoKeep())


def test_automatic_choice_follows_the_threshold_and_explicit_settings():
    cfg = load_config("lm-kd", [])
    student = build_causal_lm(cfg.student, 300)
    on, why = chunked_loss_plan(cfg, student, None)
    assert not on and "threshold" in why  # 32 x 64 tokens x 300 vocabulary: small
    small = load_config("lm-kd", ["chunked_loss.threshold=1000"])
    assert chunked_loss_plan(small, student, None)[0]
    assert not chunked_loss_plan(
        load_config("lm-kd", ["chunked_loss.enabled=false", "chunked_loss.threshold=1"]), student, None
    )[0]
    forced = load_config("lm-kd", ["chunked_loss.enabled=true"])
    capped = build_causal_lm(cfg.student, 300)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="the student: .*softcapping"):
        chunked_loss_plan(forced, capped, None)
    assert (
        "loss.kd (kd) needs full logits"
        in chunked_loss_plan(
            load_config("lm-kd", ["loss={kd: {alpha: 0.5}}", "chunked_loss.threshold=1"]), student, None
        )[1]
    )


def test_config_refuses_forced_chunking_with_terms_that_cannot(capsys):
    assert main(["run", "lm-kd", "chunked_loss.enabled=true", "loss={ce: {}, kd: {alpha: 0.5}}"]) == 2
    assert "loss.kd (kd) is computed from full logits only" in capsys.readouterr().err


def test_a_chunked_run_trains_the_same_student_as_an_unchunked_one(tmp_path, capsys):
    finals = {}
    for enabled in ("true", "false"):
        out = tmp_path / enabled
        args = [*TINY, f"chunked_loss.enabled={enabled}", "chunked_loss.chunk_size=16", f"output.dir={out}"]
        assert main(["run", "lm-kd", *args]) == 0
        record = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())
        assert record["chunked_loss"] is (enabled == "true")
        finals[enabled] = record["metrics"]["perplexity"]
    assert "chunked loss: on, 16 tokens per chunk" in capsys.readouterr().out
    assert finals["true"] == pytest.approx(finals["false"], rel=1e-3)
