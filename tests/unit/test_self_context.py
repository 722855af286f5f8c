"""The self-context teacher: its rows, their realignment onto the student's, its weights, its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillery.config import load_config
from distillery.data.text.context import check_template, split_template, template_fields
from distillery.errors import ConfigError
from distillery.models.causal_lm import CausalLMConfig, build_causal_lm
from distillery.models.hf import HFCausalLMAdapter
from distillery.teachers.self_context import SelfContextTeacher, context_batch, realign

PAD, BOS, EOS = 0, 1, 2


def batch_of(rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Right-padded rows ``(ids, response start)``, labels on the response."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for b, (row, start) in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        labels[b, start : len(row)] = torch.tensor(row[start:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(len(rows))}


# two rows of different prompt and response lengths; the second is padded
ROWS = [([BOS, 10, 11, 20, 21, EOS], 3), ([BOS, 12, 22, EOS], 2)]
CONTEXTS = [([30, 31, 32], [40]), ([33], [])]  # before, after {prompt}


def test_teacher_rows_put_the_context_around_the_prompt_and_keep_the_response_tokens():
    tb, shifts = context_batch(batch_of(ROWS), CONTEXTS, pad_id=PAD, bos_id=BOS)
    assert tb["input_ids"].tolist() == [
        [BOS, 30, 31, 32, 10, 11, 40, 20, 21, EOS],
        [BOS, 33, 12, 22, EOS, PAD, PAD, PAD, PAD, PAD],
    ]
    assert tb["attention_mask"].sum(1).tolist() == [10, 5]
    assert shifts.tolist() == [4, 1]  # the context's length in each row


def test_a_template_without_prompt_replaces_the_prompt():
    tb, shifts = context_batch(batch_of(ROWS[:1]), [([30, 31], None)], pad_id=PAD, bos_id=BOS)
    assert tb["input_ids"].tolist() == [[BOS, 30, 31, 20, 21, EOS]]
    assert shifts.tolist() == [0]


def test_realigned_teacher_logits_equal_the_model_run_on_each_teacher_row_alone():
    """Position by position: the student's position predicting response token j gets the teacher's
    distribution for the same token j, whatever the context length; padding does not leak."""
    torch.manual_seed(0)
    model = build_causal_lm(CausalLMConfig(hidden_size=16, layers=1, heads=2), 64).eval()
    adapter = HFCausalLMAdapter()
    batch = batch_of(ROWS)
    teacher = SelfContextTeacher(model, CONTEXTS, adapter, pad_id=PAD, bos_id=BOS)
    out = teacher(batch).logits  # (B, T-1, V), on the student's positions
    assert out.shape == (2, batch["input_ids"].shape[1] - 1, 64)
    tb, _ = context_batch(batch, CONTEXTS, pad_id=PAD, bos_id=BOS)
    for b, (row, start) in enumerate(ROWS):
        n = int(tb["attention_mask"][b].sum())
        with torch.no_grad():
            alone = model(input_ids=tb["input_ids"][b : b + 1, :n]).logits[0]  # (n, V), no padding
        t_start = n - (len(row) - start)  # the teacher row's response start
        for j in range(len(row) - start):  # the position predicting response token j
            torch.testing.assert_close(out[b, start - 1 + j], alone[t_start - 1 + j], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[b, len(row) - 1 :], torch.zeros_like(out[b, len(row) - 1 :]))  # padding: zeros


def test_realign_moves_every_trailing_dimension():
    v = torch.arange(24.0).reshape(2, 4, 3)
    out = realign(v, torch.tensor([1, 0]), 3)
    assert torch.equal(out[0], v[0, 1:4]) and torch.equal(out[1], v[1, :3])


def test_a_live_teacher_takes_no_gradient_costs_one_forward_and_restores_the_mode():
    torch.manual_seed(0)
    student = build_causal_lm(CausalLMConfig(hidden_size=16, layers=1, heads=2), 64).train()
    teacher = SelfContextTeacher(
        student, CONTEXTS, HFCausalLMAdapter(), weights="live", pad_id=PAD, bos_id=BOS
    )
    calls = []
    student.register_forward_hook(lambda *_: calls.append(student.training))
    out = teacher(batch_of(ROWS))
    assert calls == [False]  # one forward, in evaluation mode (no dropout)
    assert student.training and not out.logits.requires_grad
    assert all(p.grad is None for p in student.parameters())
    assert teacher.calls == 1 and teacher.module is student
    with torch.no_grad():  # the live teacher follows the student
        next(student.parameters()).add_(1.0)
    assert not torch.allclose(teacher(batch_of(ROWS)).logits, out.logits)


def test_initial_weights_stay_put_and_ema_follows_the_student_and_resumes():
    torch.manual_seed(0)
    student = build_causal_lm(CausalLMConfig(hidden_size=16, layers=1, heads=2), 64)
    initial = SelfContextTeacher(student, CONTEXTS, HFCausalLMAdapter(), pad_id=PAD, bos_id=BOS)
    ema = SelfContextTeacher(student, CONTEXTS, HFCausalLMAdapter(), weights="ema", momentum=0.5, pad_id=PAD)
    before_initial, before_ema = initial(batch_of(ROWS)).logits, ema(batch_of(ROWS)).logits
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.5)
    initial.update(student, 1)
    ema.update(student, 1)
    assert torch.equal(initial(batch_of(ROWS)).logits, before_initial)
    moved = ema(batch_of(ROWS)).logits
    assert not torch.allclose(moved, before_ema)
    fresh = SelfContextTeacher(
        student, CONTEXTS, HFCausalLMAdapter(), weights="ema", momentum=0.5, pad_id=PAD
    )
    fresh.load_state_dict(ema.state_dict())
    torch.testing.assert_close(fresh(batch_of(ROWS)).logits, moved)
    with pytest.raises(ValueError, match="momentum"):
        SelfContextTeacher(student, CONTEXTS, HFCausalLMAdapter(), weights="ema", pad_id=PAD)


def test_a_context_longer_than_the_model_is_refused_or_truncated_from_its_start():
    batch = batch_of(ROWS[:1])
    with pytest.raises(
        ValueError, match="2 tokens longer than its maximum length; set teacher.truncate_context"
    ):
        context_batch(batch, CONTEXTS, pad_id=PAD, bos_id=BOS, max_length=8)
    tb, shifts = context_batch(batch, CONTEXTS, pad_id=PAD, bos_id=BOS, max_length=8, truncate=True)
    assert tb["input_ids"].tolist() == [[BOS, 32, 10, 11, 40, 20, 21, EOS]] and shifts.tolist() == [2]


def test_templates_name_their_placeholders_and_split_at_the_prompt():
    assert template_fields("{passage}\n{prompt}") == ["passage", "prompt"]
    assert split_template("{passage}\n{prompt}?", {"passage": "P"}) == ("P\n", "?")
    for bad, why in [
        ("{}", "not a name"),
        ("{0}", "not a name"),
        ("{x!r}", "conversion"),
        ("{", "literal braces"),
    ]:
        with pytest.raises(ValueError, match=why):
            template_fields(bad)
    with pytest.raises(ValueError, match="more than once"):
        check_template("{prompt}{prompt}", ["prompt"])


OPSD = {"task": "lm", "data": {"name": "arithmetic", "tokenizer": {"kind": "byte"}},
        "teacher": {"source": "self", "context": "answer {response}. {prompt}"},
        "method": {"name": "on_policy"}, "loss": {"reverse_kl": {}}, "train": {"steps": 10}}  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teacher": {"context": "{hint} {prompt}"}}, r"unknown placeholder \{hint\}; valid here: \{prompt\}, \{response\}"),
        ({"teacher": {"weights": "ema"}}, "teacher.weights=ema needs teacher.momentum"),
        ({"teacher": {"model": {"hidden_size": 32}}}, "teacher.source=self teaches with the student's own weights"),
        ({"teacher": {"context": None}}, "needs teacher.context"),
        ({"data": {"name": "austen"}, "method": {"name": "token"}}, "packed text without prompts"),
        ({"method": {"name": "speculative"}}, "method.name=speculative"),
        ({"teacher": {"source": "frozen", "momentum": 0.9, "context": None}}, "teacher.momentum is for teacher.source=self"),
    ],
)  # fmt: skip
def test_bad_self_teacher_configs_name_the_field(tmp_path, change, message):
    import yaml

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in OPSD.items()}
    for key, value in change.items():
        raw[key] = {**raw[key], **value}
        raw[key] = {k: v for k, v in raw[key].items() if v is not None}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_fact_task_offers_the_passage_placeholder(tmp_path):
    import yaml

    raw = {**OPSD, "data": {"name": "facts", "tokenizer": {"kind": "byte"}}, "method": {"name": "token"},
           "teacher": {"source": "self", "context": "{passage}\n{prompt}"}}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).teacher.context == "{passage}\n{prompt}"


def test_a_toy_model_sees_the_prompt_through_the_context():
    class OneHot(nn.Module):  # logits at a position: one-hot of the token there
        def forward(self, input_ids, attention_mask=None):
            return type("O", (), {"logits": nn.functional.one_hot(input_ids, 64).float()})()

    out = SelfContextTeacher(OneHot(), CONTEXTS, HFCausalLMAdapter(), pad_id=PAD, bos_id=BOS)(batch_of(ROWS))
    # row 0: the position before the response reads the template's last token (40), then the response
    assert out.logits[0, 2:5].argmax(-1).tolist() == [40, 20, 21]
    assert out.logits[1, 1:3].argmax(-1).tolist() == [12, 22]  # row 1: no text after {prompt}


def test_a_runs_saved_config_loads_again(tmp_path):
    """config.yaml holds every field with its default; neither source reads them as choices."""
    import yaml

    for teacher in (
        {"source": "self", "context": "{response} {prompt}"},
        {"model": {}, "train": {"steps": 1}},
    ):
        raw = {**OPSD, "teacher": teacher, "method": {"name": "token"}}
        first = tmp_path / "a.yaml"
        first.write_text(yaml.safe_dump(raw))
        saved = tmp_path / "b.yaml"
        saved.write_text(yaml.safe_dump(load_config(first).model_dump(mode="json")))
        assert load_config(saved) == load_config(first)


def test_a_batchs_own_teacher_prompts_replace_the_fixed_contexts():
    """Self-revision: each row's reviser prompt travels with the batch; the response realigns after it."""
    from distillery.teachers.self_context import TEACHER_PROMPT_IDS, TEACHER_PROMPT_LENGTHS

    batch = batch_of(ROWS)
    batch[TEACHER_PROMPT_IDS] = torch.tensor([[BOS, 50, 51, 10, 11], [BOS, 52, 12, PAD, PAD]])
    batch[TEACHER_PROMPT_LENGTHS] = torch.tensor([5, 3])
    tb, shifts = context_batch(batch, CONTEXTS, pad_id=PAD, bos_id=BOS)
    assert tb["input_ids"][0].tolist() == [BOS, 50, 51, 10, 11, 20, 21, EOS]
    assert tb["input_ids"][1, :5].tolist() == [BOS, 52, 12, 22, EOS]
    assert shifts.tolist() == [2, 1]


def test_revision_needs_the_self_teacher_and_offers_attempt_and_reward(tmp_path):
    import yaml

    raw = {
        **OPSD,
        "method": {"name": "revision"},
        "teacher": {"source": "self", "context": "{attempt} {reward} {prompt}"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).method.name == "revision"
    raw["teacher"] = {"model": {}, "train": {"steps": 1}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="method.name=revision .* needs teacher.source=self"):
        load_config(path)
