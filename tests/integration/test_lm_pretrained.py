"""Pretrained teacher/student directories: their tokenizers must be the run's."""

import json

import pytest

from distillery.cli import main
from distillery.data.text.tokenizer import TokenizerConfig, load_pretrained_tokenizer, train_tokenizer
from distillery.errors import ConfigError
from distillery.models.causal_lm import CausalLMConfig, build_causal_lm
from tests.integration.test_lm import ARITH, TINY


def _save(path, tokenizer, hidden=32):
    model = build_causal_lm(CausalLMConfig(hidden_size=hidden, layers=1, heads=2), len(tokenizer), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_pretrained_tokenizer_is_loaded_with_the_special_tokens_batches_need(tmp_path):
    byte = train_tokenizer("", kind="byte", use_cache=False)
    byte.save_pretrained(tmp_path / "tok")
    loaded = TokenizerConfig(kind="pretrained", pretrained=str(tmp_path / "tok")).build("ignored")
    assert loaded.pad_token_id is not None and loaded.bos_token_id is not None and len(loaded) == len(byte)
    assert loaded("hello")["input_ids"] == byte("hello")["input_ids"]
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        load_pretrained_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs tokenizer.pretrained"):
        TokenizerConfig(kind="pretrained")
    with pytest.raises(ValueError, match="set kind=pretrained"):
        TokenizerConfig(kind="byte", pretrained="x")


def test_pretrained_models_with_the_run_tokenizer_distil(tmp_path):
    byte = train_tokenizer("", kind="byte", use_cache=False)
    teacher = _save(tmp_path / "teacher", byte, hidden=48)
    student = _save(tmp_path / "student", byte)
    out = tmp_path / "run"
    args = [*TINY, *ARITH, "teacher.train=null", f"teacher.model.pretrained={teacher}",
            f"student.pretrained={student}", f"data.tokenizer={{kind: pretrained, pretrained: {teacher}}}",
            f"output.dir={out}"]  # fmt: skip
    assert main(["run", "lm-kd", *args]) == 0
    assert json.loads((out / "summary.json").read_text())["models"]["distilled"]["perplexity"]["mean"] > 1.0


def test_a_pretrained_model_with_another_tokenizer_is_refused(tmp_path, capsys):
    byte = train_tokenizer("", kind="byte", use_cache=False)
    bpe = train_tokenizer(["the cat sat on the mat " * 50], vocab_size=300, kind="bpe", use_cache=False)
    teacher = _save(tmp_path / "teacher", bpe)
    args = [
        *TINY,
        *ARITH,
        "teacher.train=null",
        f"teacher.model.pretrained={teacher}",
        f"output.dir={tmp_path / 'run'}",
    ]
    assert main(["run", "lm-kd", *args]) == 2  # the run's tokenizer is the byte one of ARITH
    err = capsys.readouterr().err
    assert "the teacher model" in err and "differs from the run's" in err and "kind: pretrained" in err
    assert len(byte) != len(bpe)
