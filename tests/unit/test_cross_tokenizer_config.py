"""teacher.tokenizer: which loss terms accept a teacher with another tokenizer, and the errors otherwise."""

from __future__ import annotations

import pytest
import yaml

from distillery.config import load_config
from distillery.errors import ConfigError

RUN = {"task": "lm", "data": {"name": "austen", "tokenizer": {"kind": "bpe", "vocab_size": 300}},
       "teacher": {"tokenizer": {"kind": "byte"}, "train": {"steps": 1}}, "loss": {"ce": {}, "uld": {}},
       "train": {"steps": 1}}  # fmt: skip


def load(tmp_path, **changes):
    raw = {**RUN, **changes}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_the_cross_tokenizer_terms_accept_a_teacher_with_another_tokenizer(tmp_path):
    assert load(tmp_path).teacher.tokenizer.kind == "byte"
    load(tmp_path, loss={"span_likelihood": {}})
    load(tmp_path, teacher={"train": {"steps": 1}})  # uld with one tokenizer: also through the texts


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"loss": {"forward_kl": {}}}, r"compares the teacher and the student id by id, .* uld"),
        ({"loss": {"uld": {}, "reverse_kl": {}}}, r"loss.reverse_kl \(reverse_kl\) compares"),
        ({"loss": {"ce": {}, "forward_kl": {}}, "teacher": {"tokenizer": {"kind": "byte"}, "train": {"steps": 1},
                                                            "source": "frozen"}}, "span_likelihood, uld"),
        ({"teacher": {"tokenizer": {"kind": "bpe", "vocab_size": 300}, "train": {"steps": 1}}}, "equals data.tokenizer"),
        ({"teacher": {"tokenizer": {"kind": "byte"}, "train": {"steps": 1}, "source": "cache"}},
         "teacher.source=cache is not supported"),
    ],
)  # fmt: skip
def test_a_teacher_with_another_tokenizer_needs_the_terms_that_read_texts(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, **changes)
