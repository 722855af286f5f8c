"""The synthetic knowledge task: invented entities, passages, paraphrased questions, verification."""

import re
from collections import defaultdict

import pytest
from pydantic import ValidationError

from distillery.data.text.facts import (
    ATTRIBUTES,
    PHRASINGS,
    TEMPLATES,
    VALUES,
    FactsConfig,
    FactTask,
    question,
)
from distillery.data.text.jsonl import PromptResponse


@pytest.fixture(scope="module")
def task():
    return FactTask(n_entities=40, seed=3)


def test_the_seed_fixes_everything(task):
    again = FactTask(n_entities=40, seed=3)
    assert again.entities == task.entities and again.split() == task.split()
    assert again.passages() == task.passages()
    other = FactTask(n_entities=40, seed=4)
    assert [e.name for e in other.entities] != [e.name for e in task.entities]
    # entity i and its facts depend neither on the entity count nor on the attributes asked about
    assert FactTask(n_entities=10, seed=3).entities == task.entities[:10]
    few = FactTask(n_entities=40, attributes=("year", "colour"), seed=3)
    assert few.attributes == ("colour", "year")  # passage order, whatever the order given
    assert all(
        f["year"] == e["year"] and f["colour"] == e["colour"] for f, e in zip(few.entities, task.entities)
    )


def test_entity_names_are_unique_invented_and_not_answers():
    big = FactTask(n_entities=1500, attributes=("city",), train_phrasings=1, seed=0)
    names = [e.name for e in big.entities]
    assert len(set(names)) == len(names)
    answers = {v.lower() for values in VALUES.values() for v in values}
    for name in names:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name), name
        assert not any(part.lower() in answers for part in name.split())


def test_train_and_test_ask_the_same_facts_in_disjoint_phrasings(task):
    train, test = task.split()
    n_facts = 40 * len(ATTRIBUTES)
    assert (len(train), len(test)) == (4 * n_facts, n_facts)
    assert len({p.prompt for p in train + test}) == len(train) + len(test)
    asked = defaultdict(lambda: {"train": set(), "test": set()})
    for split, pairs in (("train", train), ("test", test)):
        for p in pairs:
            entity, attribute = task.entity_of(p.prompt), task.attribute_of(p.prompt)
            assert p.response == " " + entity[attribute]
            asked[entity.name, attribute][split].add(p.prompt)
    assert len(asked) == n_facts  # every fact is asked in both splits
    for phrased in asked.values():
        assert len(phrased["train"]) == 4 and len(phrased["test"]) == 1
        assert not phrased["train"] & phrased["test"]
    # each test phrasing is still trained on for other entities
    template_of = {
        question(e.name, a, k): (a, k) for e in task.entities for a in ATTRIBUTES for k in range(PHRASINGS)
    }
    trained = {template_of[p.prompt] for p in train}
    assert {template_of[p.prompt] for p in test} <= trained
    assert [p.prompt for p in train[:20]] != sorted(p.prompt for p in train[:20])  # shuffled


def test_phrasing_counts_follow_the_settings():
    t = FactTask(n_entities=6, attributes=("pet",), train_phrasings=2, test_phrasings=3, seed=1)
    train, test = t.split()
    assert (len(train), len(test)) == (12, 18)
    for i in range(6):
        held, trained = t.phrasings(i, "pet")
        assert len(held) == 3 and len(trained) == 2 and not set(held) & set(trained)


def test_every_answer_is_in_the_passage_and_the_context(task):
    train, test = task.split()
    for p in test + train[:50]:
        passage = task.context(p.prompt)
        entity = task.entity_of(p.prompt)
        assert passage == task.passage(entity) and entity.name in passage
        assert re.search(rf"\b{re.escape(p.response.strip())}\b", passage)
        assert task.teacher_prompt(p.prompt) == passage + "\n" + p.prompt
    assert all(other.name not in task.passages()[0] for other in task.entities[1:])


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        (" {a}", True),
        ("{a}", True),
        (" {a} ", True),
        ("{a}<eos><pad>", True),
        (" {a}\nQ: Where", True),
        ("{a}x", False),
        ("x{a}", False),
        ("{a} {a}", False),
        ("\n{a}", False),
        ("", False),
    ],
)
def test_verify_is_exact_match(task, completion, ok):
    p = task.split()[1][0]
    answer = p.response.strip()
    assert task.answer(p.prompt) == answer
    assert task.verify(p.prompt, completion.format(a=answer)) is ok


def test_verify_rejects_other_answers_and_unknown_prompts(task):
    test = task.split()[1]
    for p in test[:12]:
        wrong = next(v for v in VALUES[task.attribute_of(p.prompt)] if v != p.response.strip())
        assert not task.verify(p.prompt, " " + wrong)
        assert task.verify(p.prompt, p.response.upper()) == (p.response == p.response.upper())
    assert task.verify(test[0].prompt + " ", test[0].response)  # surrounding whitespace of the prompt
    assert task.verify(test[0].prompt, test[0].response.strip() + "</s>", eos="</s>")
    with pytest.raises(ValueError, match="not a question of this task"):
        task.verify("Q: Who is Nobody Atall?\nA:", " teal")
    with pytest.raises(ValueError, match="not a question of this task"):
        task.context(question("Nobody Atall", "city", 0))
    prompts = [p.prompt for p in test[:4]]
    assert task.accuracy(prompts, [p.response for p in test[:3]] + [" nothing"]) == 0.75
    with pytest.raises(ValueError, match="4 prompts but 1 completions"):
        task.accuracy(prompts, [" x"])


def test_question_templates():
    assert all(len(TEMPLATES[a]) == PHRASINGS for a in ATTRIBUTES)
    assert all(len(set(TEMPLATES[a])) == PHRASINGS for a in ATTRIBUTES)
    assert question("Velor Quint", "city", 0) == "Q: Where does Velor Quint live?\nA:"
    with pytest.raises(ValueError, match="unknown attribute 'height'"):
        question("Velor Quint", "height", 0)
    with pytest.raises(ValueError, match="phrasing=5"):
        question("Velor Quint", "city", PHRASINGS)


def test_config_builds_the_task_and_names_the_fix():
    cfg = FactsConfig()
    assert (cfg.entities, cfg.attributes, cfg.train_phrasings, cfg.test_phrasings) == (40, ATTRIBUTES, 4, 1)
    built = FactsConfig(entities=5, attributes=["year"], validation=3, seed=2).build()
    assert isinstance(built, FactTask) and built.entities == FactTask(5, ("year",), seed=2).entities
    assert all(isinstance(p, PromptResponse) for p in built.split()[0])
    assert FactsConfig(entities=5, attributes=["year"], validation=3).validation_count() == 3
    cases = [
        ({"attributes": ["height"]}, "unknown attribute"),
        ({"attributes": []}, "at least one"),
        ({"attributes": ["city", "city"]}, "repeats an attribute"),
        ({"train_phrasings": 4, "test_phrasings": 2}, "lower train_phrasings or test_phrasings"),
        ({"entities": 2, "attributes": ["pet"], "train_phrasings": 1, "validation": 2}, "lower validation"),
        ({"entities": 0}, "entities"),
        ({"test_phrasings": 0}, "test_phrasings"),
        ({"validation": True}, "validation: expected int"),
        ({"passages": 3}, "passages"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValidationError, match=message):
            FactsConfig(**kwargs)
    with pytest.raises(ValueError, match="train_phrasings=5 and test_phrasings=1"):
        FactTask(train_phrasings=5)
    with pytest.raises(ValueError, match="repeats an attribute"):
        FactTask(attributes=("pet", "pet"))
