"""A built-in synthetic knowledge task: invented people, their facts, and questions about them.

For knowledge-injection experiments ("knowledge injection via prompt distillation"): a teacher that
reads a short passage about an entity answers questions about it, and a student that never sees the
passage is distilled on the teacher's answers until it answers closed-book.

Entities: names made of random syllables (``"Velor Quint"``), so no pretrained model can know them.
Each holds one value per attribute, drawn uniformly from a small closed vocabulary:

==============  =========================  ================================================
attribute       values                     stated in the passage as
==============  =========================  ================================================
``city``        12 invented city names     ``"Velor Quint lives in Tharnis."``
``colour``      12 colour words            ``"The favourite colour of Velor Quint is teal."``
``profession``  12 one-word trades         ``"Velor Quint works as a potter."``
``pet``         12 animals                 ``"Velor Quint keeps a pet owl."``
``siblings``    2..9                       ``"Velor Quint has 4 siblings."``
``year``        1800..1999                 ``"Velor Quint was born in 1873."``
==============  =========================  ================================================

Every answer is one word or number, written in the passage exactly as the response gives it (after
its leading space), so a small byte-level or BPE model can learn it. Everything is drawn from
``random.Random(seed)``: the seed and the settings fix the facts, the phrasings and the order of the
pairs. Entity ``i`` and its facts do not depend on how many entities there are or which attributes
are asked about: fewer entities give a prefix of the same list.

Questions: each attribute has :data:`PHRASINGS` paraphrase templates (``"Q: Where does Velor Quint
live?\\nA:"``, ``"Q: What is the home city of Velor Quint?\\nA:"``, ...), the response is the answer
after a space (``" Tharnis"``). For every (entity, attribute) the templates are split in two:
``test_phrasings`` of them ask the test questions and the next ``train_phrasings`` the training
questions. Training and test therefore ask about the *same* facts in *different* words, so closed-book
test accuracy measures whether a fact was internalised, not whether one question string was
memorised. Which templates a fact holds out rotates from one entity to the next (over a seeded order
of the templates), so each test phrasing is still trained on for other entities: a student knows how
to read it, only not with that fact.

Validation questions are carved from the front of the (shuffled) training pairs; they are further
phrasings of facts that stay in training through their other phrasings.

The teacher's privileged input is :meth:`FactTask.context` (the passage of the entity a question asks
about) followed by a newline and the question: :meth:`FactTask.teacher_prompt`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from distillery.configbase import StrictModel
from distillery.data.text.arithmetic import extract_answer
from distillery.data.text.jsonl import PromptResponse
from distillery.data.text.tokenizer import EOS

CITIES = tuple(
    "Tharnis Oskebar Mirelle Quorvin Daskett Pellimor Zuneth Varrow Ilvendra Corsk Brevanne Halloc".split()
)
COLOURS = tuple("red blue green teal amber violet grey olive crimson ivory indigo ochre".split())
PROFESSIONS = tuple(
    "baker pilot sculptor tailor chemist farmer glassblower surveyor beekeeper cartographer potter weaver".split()
)
PETS = tuple("cat owl goat ferret parrot tortoise hare lizard raven hedgehog crab donkey".split())

VALUES: dict[str, tuple[str, ...]] = {
    "city": CITIES,
    "colour": COLOURS,
    "profession": PROFESSIONS,
    "pet": PETS,
    "siblings": tuple(str(n) for n in range(2, 10)),
    "year": tuple(str(y) for y in range(1800, 2000)),
}
"""Each attribute's closed vocabulary."""

ATTRIBUTES = tuple(VALUES)
"""The attributes, in the order their sentences appear in a passage."""

STATEMENTS = {
    "city": "{name} lives in {value}.",
    "colour": "The favourite colour of {name} is {value}.",
    "profession": "{name} works as a {value}.",
    "pet": "{name} keeps a pet {value}.",
    "siblings": "{name} has {value} siblings.",
    "year": "{name} was born in {value}.",
}
"""The sentence of a passage that states each attribute."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": (
        "Where does {name} live?",
        "In which city does {name} live?",
        "What is the home city of {name}?",
        "Which city is home to {name}?",
        "Name the city where {name} lives.",
    ),
    "colour": (
        "What is the favourite colour of {name}?",
        "What is {name}'s favourite colour?",
        "Which colour does {name} like best?",
        "What colour does {name} prefer?",
        "Name the favourite colour of {name}.",
    ),
    "profession": (
        "What is the profession of {name}?",
        "What does {name} do for a living?",
        "What is {name}'s job?",
        "What does {name} work as?",
        "Which trade does {name} practise?",
    ),
    "pet": (
        "What pet does {name} keep?",
        "Which animal does {name} keep as a pet?",
        "What kind of animal is {name}'s pet?",
        "What is the pet of {name}?",
        "Name the animal that {name} keeps.",
    ),
    "siblings": (
        "How many siblings does {name} have?",
        "What is the number of siblings of {name}?",
        "How many brothers and sisters does {name} have?",
        "{name} has how many siblings?",
        "Count the siblings of {name}.",
    ),
    "year": (
        "In which year was {name} born?",
        "What is the birth year of {name}?",
        "When was {name} born?",
        "What year was {name} born in?",
        "{name} was born in which year?",
    ),
}
"""Each attribute's question paraphrases (``{name}``: the entity)."""

PHRASINGS = 5
"""Question templates per attribute: ``train_phrasings + test_phrasings`` may not exceed it."""

_ONSETS = tuple("b d f g h k l m n p r s t v z br dr kr st qu".split())
_INNER = ("d", "l", "m", "n", "r", "s", "t", "v", "z")  # onsets after the first syllable of a word
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("n", "r", "l", "s", "x", "nt", "rn", "sk", "th")
_TAKEN = {v.lower() for values in VALUES.values() for v in values}  # no name part is also an answer


def question(name: str, attribute: str, phrasing: int) -> str:
    """The prompt that asks, in template ``phrasing`` of ``attribute``, about the entity ``name``.

    Example:
        >>> question("Velor Quint", "colour", 0)
        'Q: What is the favourite colour of Velor Quint?\\nA:'
    """
    if attribute not in TEMPLATES:
        raise ValueError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTES)}")
    if not 0 <= phrasing < PHRASINGS:
        raise ValueError(f"phrasing={phrasing} must be in 0..{PHRASINGS - 1}")
    return f"Q: {TEMPLATES[attribute][phrasing].format(name=name)}\nA:"


@dataclass(frozen=True)
class Entity:
    """An invented entity: its name and its ``(attribute, value)`` facts.

    Example:
        >>> e = Entity("Velor Quint", (("colour", "teal"), ("year", "1873")))
        >>> e["colour"], e.passage()
        ('teal', 'The favourite colour of Velor Quint is teal. Velor Quint was born in 1873.')
    """

    name: str
    facts: tuple[tuple[str, str], ...]

    def __getitem__(self, attribute: str) -> str:
        for key, value in self.facts:
            if key == attribute:
                return value
        raise KeyError(f"{self.name} has no attribute {attribute!r} (it has {[k for k, _ in self.facts]})")

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.facts)

    def passage(self) -> str:
        """The entity's facts in plain sentences, one per attribute."""
        return " ".join(STATEMENTS[k].format(name=self.name, value=v) for k, v in self.facts)


def _word(rng: random.Random, syllables: int, coda: bool) -> str:
    word = rng.choice(_ONSETS) + rng.choice(_VOWELS)
    for _ in range(syllables - 1):
        word += rng.choice(_INNER) + rng.choice(_VOWELS)
    return (word + rng.choice(_CODAS) if coda else word).capitalize()


def _name(rng: random.Random) -> str:
    """A first name of two syllables and a surname of one or two, ending in a consonant."""
    return f"{_word(rng, 2, rng.random() < 0.7)} {_word(rng, rng.choice((1, 2)), True)}"


class FactTask:
    """Invented entities with closed-vocabulary facts, their passages and paraphrased questions.

    Args:
        n_entities: how many entities.
        attributes: which of :data:`ATTRIBUTES` the passages state and the questions ask about.
        train_phrasings: training questions per (entity, attribute), each in another template.
        test_phrasings: test questions per (entity, attribute), in templates its training ones do not use.
        seed: the facts, phrasings and pair order are a function of the seed and the settings alone.

    Example:
        >>> task = FactTask(n_entities=2, attributes=("colour", "year"), train_phrasings=2, seed=0)
        >>> [e.name for e in task.entities]
        ['Laivoth Daidern', 'Renous Haisk']
        >>> task.passage(task.entities[0])
        'The favourite colour of Laivoth Daidern is indigo. Laivoth Daidern was born in 1885.'
        >>> train, test = task.split()
        >>> len(train), len(test)
        (8, 4)
        >>> test[0]
        PromptResponse(prompt='Q: What colour does Laivoth Daidern prefer?\\nA:', response=' indigo')
        >>> task.verify(test[0].prompt, "indigo<eos>"), task.verify(test[0].prompt, " teal")
        (True, False)
        >>> task.entity_of(test[0].prompt).name, task.attribute_of(test[0].prompt)
        ('Laivoth Daidern', 'colour')
        >>> print(task.teacher_prompt(test[0].prompt))
        The favourite colour of Laivoth Daidern is indigo. Laivoth Daidern was born in 1885.
        Q: What colour does Laivoth Daidern prefer?
        A:
        >>> task.accuracy([p.prompt for p in test], [p.response for p in test[:3]] + [" 1900"])
        0.75
    """

    def __init__(
        self,
        n_entities: int = 40,
        attributes: Sequence[str] = ATTRIBUTES,
        train_phrasings: int = 4,
        test_phrasings: int = 1,
        seed: int = 0,
    ) -> None:
        attributes = tuple(attributes)
        unknown = [a for a in attributes if a not in VALUES]
        if unknown or not attributes:
            raise ValueError(
                f"attributes={attributes}: each must be one of {', '.join(ATTRIBUTES)} (at least one)"
            )
        if len(set(attributes)) != len(attributes):
            raise ValueError(f"attributes={attributes} repeats an attribute")
        if n_entities < 1:
            raise ValueError(f"n_entities={n_entities} must be >= 1")
        if train_phrasings < 1 or test_phrasings < 1 or train_phrasings + test_phrasings > PHRASINGS:
            raise ValueError(
                f"train_phrasings={train_phrasings} and test_phrasings={test_phrasings} must each be >= 1 "
                f"and together at most the {PHRASINGS} templates of an attribute"
            )
        self.n_entities = int(n_entities)
        self.attributes = tuple(a for a in ATTRIBUTES if a in attributes)  # passage order
        self.train_phrasings = int(train_phrasings)
        self.test_phrasings = int(test_phrasings)
        self.seed = int(seed)

        rng = random.Random(self.seed)
        # Draw order (all attributes, whatever is selected): template orders, then entity by entity.
        self._order = {a: rng.sample(range(PHRASINGS), PHRASINGS) for a in ATTRIBUTES}
        self.entities: list[Entity] = []
        names: set[str] = set()
        for _ in range(self.n_entities):
            name = _name(rng)
            while name in names or any(part.lower() in _TAKEN for part in name.split()):
                name = _name(rng)
            names.add(name)
            drawn = {a: rng.choice(VALUES[a]) for a in ATTRIBUTES}
            self.entities.append(Entity(name, tuple((a, drawn[a]) for a in self.attributes)))

        self._index: dict[str, tuple[Entity, str]] = {}
        for entity in self.entities:
            for a in self.attributes:
                for k in range(PHRASINGS):
                    self._index[question(entity.name, a, k)] = (entity, a)
        self._train: list[PromptResponse] = []
        self._test: list[PromptResponse] = []
        for i, entity in enumerate(self.entities):
            for a in self.attributes:
                test_k, train_k = self.phrasings(i, a)
                self._test += [PromptResponse(question(entity.name, a, k), " " + entity[a]) for k in test_k]
                self._train += [PromptResponse(question(entity.name, a, k), " " + entity[a]) for k in train_k]
        rng.shuffle(self._train)

    def phrasings(self, index: int, attribute: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(test, train)`` template numbers of entity ``index``'s ``attribute`` (disjoint).

        Example:
            >>> task = FactTask(n_entities=3, seed=0)
            >>> task.phrasings(0, "city"), task.phrasings(1, "city")
            (((3,), (4, 0, 1, 2)), ((4,), (0, 1, 2, 3)))
        """
        order = self._order[attribute]
        rotated = [order[(index + k) % PHRASINGS] for k in range(PHRASINGS)]
        n = self.test_phrasings
        return tuple(rotated[:n]), tuple(rotated[n : n + self.train_phrasings])

    def passage(self, entity: Entity) -> str:
        """The entity's facts in plain sentences (see :meth:`Entity.passage`)."""
        return entity.passage()

    def passages(self) -> list[str]:
        """The passages of all entities, in entity order."""
        return [e.passage() for e in self.entities]

    def split(self) -> tuple[list[PromptResponse], list[PromptResponse]]:
        """``(train, test)`` question/answer pairs: the same facts in disjoint phrasings.

        ``train`` is shuffled (carve validation pairs from its front); ``test`` is in entity order.
        """
        return list(self._train), list(self._test)

    def _lookup(self, prompt: str) -> tuple[Entity, str]:
        found = self._index.get(prompt.strip())
        if found is None:
            raise ValueError(
                f"not a question of this task: {prompt!r} (expected like {question('Name', 'city', 0)!r})"
            )
        return found

    def __contains__(self, prompt: object) -> bool:
        """Whether ``prompt`` is one of this task's questions."""
        return isinstance(prompt, str) and prompt.strip() in self._index

    def entity_of(self, prompt: str) -> Entity:
        """The entity a question asks about."""
        return self._lookup(prompt)[0]

    def attribute_of(self, prompt: str) -> str:
        """The attribute a question asks about."""
        return self._lookup(prompt)[1]

    def answer(self, prompt: str) -> str:
        """The exact answer to a question (without the response's leading space)."""
        entity, attribute = self._lookup(prompt)
        return entity[attribute]

    def context(self, prompt: str) -> str:
        """The privileged passage for a question: the passage of the entity it asks about."""
        return self.entity_of(prompt).passage()

    def teacher_prompt(self, prompt: str) -> str:
        """What the teacher reads: ``context(prompt) + "\\n" + prompt``."""
        return self.context(prompt) + "\n" + prompt

    @property
    def longest_answer(self) -> int:
        """Characters in the longest answer any question of the task can have."""
        return max(len(v) for a in self.attributes for v in VALUES[a])

    def verify(self, prompt: str, completion: str, eos: str | None = EOS) -> bool:
        """Whether ``completion`` (after :func:`~distillery.data.text.arithmetic.extract_answer`) is
        exactly the answer to ``prompt``; raises ``ValueError`` for a prompt that is not a question of
        this task.

        Example:
            >>> task = FactTask(n_entities=1, attributes=("siblings",), seed=0)
            >>> q = task.split()[1][0].prompt
            >>> q, task.answer(q)
            ('Q: How many siblings does Laivoth Daidern have?\\nA:', '9')
            >>> task.verify(q, " 9<eos>"), task.verify(q, "9\\nQ:"), task.verify(q, "90"), task.verify(q, "nine")
            (True, True, False, False)
        """
        return extract_answer(completion, eos) == self.answer(prompt)

    def accuracy(self, prompts: Sequence[str], completions: Sequence[str], eos: str | None = EOS) -> float:
        """Fraction of completions that :meth:`verify` accepts."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if len(prompts) == 0:
            raise ValueError("accuracy of an empty set of completions is undefined")
        return sum(self.verify(p, c, eos) for p, c in zip(prompts, completions)) / len(prompts)

    def __repr__(self) -> str:
        return (
            f"FactTask(n_entities={self.n_entities}, attributes={self.attributes}, "
            f"train_phrasings={self.train_phrasings}, test_phrasings={self.test_phrasings}, seed={self.seed})"
        )


class FactsConfig(StrictModel):
    """The synthetic knowledge task of a run: its entities, attributes, phrasings and splits.

    Example:
        >>> cfg = FactsConfig(entities=10, attributes=("city", "pet"), train_phrasings=3, validation=6)
        >>> cfg.train_count(), cfg.validation_count(), len(cfg.build().split()[1])
        (60, 6, 20)
    """

    entities: int = Field(40, ge=1, le=10_000, description="invented entities")
    attributes: tuple[str, ...] = Field(
        ATTRIBUTES, description=f"the attributes stated and asked about, from {', '.join(ATTRIBUTES)}"
    )
    train_phrasings: int = Field(
        4, ge=1, description="training questions per (entity, attribute), each in another phrasing"
    )
    test_phrasings: int = Field(
        1,
        ge=1,
        description="test questions per (entity, attribute), in phrasings its training questions do not use "
        f"(train_phrasings + test_phrasings <= {PHRASINGS})",
    )
    validation: int = Field(
        40,
        ge=0,
        description="question/answer pairs carved from the training pairs for evaluation during training",
    )
    seed: int = Field(0, description="seed of the entities, facts and phrasings (independent of run seeds)")
    base_entities: int = Field(
        200,
        ge=1,
        le=10_000,
        description="other invented people (drawn with seed + 1) whose passages and questions a model can first "
        "learn to read from (the starting model of a self-context teacher), never the people tested",
    )

    @field_validator("attributes")
    @classmethod
    def _known_attributes(cls, attributes: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in attributes if a not in VALUES]
        if bad or not attributes:
            raise ValueError(f"unknown attribute(s) {bad}; valid: {', '.join(ATTRIBUTES)} (at least one)")
        if len(set(attributes)) != len(attributes):
            raise ValueError(f"attributes={list(attributes)} repeats an attribute; list each once")
        return attributes

    @model_validator(mode="after")
    def _fits(self) -> FactsConfig:
        if self.train_phrasings + self.test_phrasings > PHRASINGS:
            raise ValueError(
                f"train_phrasings={self.train_phrasings} + test_phrasings={self.test_phrasings} exceeds the "
                f"{PHRASINGS} phrasings of each attribute; lower train_phrasings or test_phrasings"
            )
        if self.validation >= self.train_count():
            raise ValueError(
                f"validation={self.validation} pairs must be fewer than the {self.train_count()} training pairs "
                f"(entities x attributes x train_phrasings) they are carved from; lower validation"
            )
        return self

    def train_count(self) -> int:
        """How many training pairs the task has (validation included)."""
        return self.entities * len(self.attributes) * self.train_phrasings

    def validation_count(self) -> int:
        """How many of the training pairs the validation split takes."""
        return self.validation

    def build(self) -> FactTask:
        return FactTask(self.entities, self.attributes, self.train_phrasings, self.test_phrasings, self.seed)
