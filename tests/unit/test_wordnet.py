"""WordNet 3.0 reader: a small fake WordNet folder written here, and (when installed) the real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.data.text import wordnet
from distillery.data.text.wordnet import (
    LEXNAMES,
    Synset,
    find_wordnet,
    load_synsets,
    parse_line,
    split_gloss,
    wordnet_sentences,
)
from distillery.errors import ConfigError, DataNotFoundError

HEADER = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    '  2 Princeton University under the following license.  THIS SOFTWARE IS PROVIDED "AS IS"  \n'
)
FILES = {
    "noun": [
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is "
        "perceived or known or inferred to have its own distinct existence (living or nonliving)  ",
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 002 @ 02083346 n 0000 #m 02083863 n 0000 | "
        'a member of the genus Canis; "the dog barked all night"  ',
        '07711569 13 n 01 potato 0 000 | an edible tuber; "she peeled the potato" - Shakespeare; "a potato"',
    ],
    "verb": [
        "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 001 * 00005041 v 0000 02 + 02 00 + 08 00 | "
        'draw air into, and expel out of, the lungs; "I can breathe better when the air is clean"; '
        '"The patient is respiring"  ',
    ],
    "adj": [
        "00001740 00 a 01 able 0 001 ! 00002098 a 0101 | (usually followed by `to') having the necessary means; "
        '"able to swim"  ',
        "00003553 00 s 02 emergent(a) 0 emerging 0 001 & 00003356 a 0000 | coming into existence; "
        '"an emergent republic"  ',
    ],
    "adv": [
        "00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; "
        '"they performed a cappella"; "the potato"; "a member of the genus Canis"',
    ],
}


def write_wordnet(folder: Path, parts: dict[str, list[str]] = FILES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for pos, lines in parts.items():
        (folder / f"data.{pos}").write_text(HEADER + "".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake WordNet in $DISTILLERY_DATA/wordnet; the system folder is hidden."""
    write_wordnet(tmp_path / "wordnet")
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path))
    monkeypatch.setattr(wordnet, "SYSTEM_DIR", tmp_path / "no-system-wordnet")
    return tmp_path / "wordnet"


def test_lexnames_table():
    assert len(LEXNAMES) == 45
    assert (LEXNAMES[0], LEXNAMES[3], LEXNAMES[5], LEXNAMES[18], LEXNAMES[29], LEXNAMES[44]) == (
        "adj.all",
        "noun.Tops",
        "noun.animal",
        "noun.person",
        "verb.body",
        "adj.ppl",
    )


def test_parse_fake_folder(fake):
    assert find_wordnet() == fake
    synsets = load_synsets()
    assert [(s.pos, s.offset) for s in synsets] == [
        ("noun", 1740),
        ("noun", 2084071),
        ("noun", 7711569),
        ("verb", 1740),
        ("adj", 1740),
        ("adj", 3553),
        ("adv", 1740),
    ]
    dog = synsets[1]
    assert dog == Synset(
        offset=2084071,
        pos="noun",
        lex_filenum=5,
        lexname="noun.animal",
        words=("dog", "domestic dog", "Canis familiaris"),
        gloss="a member of the genus Canis",
        examples=("the dog barked all night",),
    )
    entity = synsets[0]
    assert entity.examples == () and entity.gloss.endswith("(living or nonliving)")
    assert entity.lexname == "noun.Tops"
    potato = synsets[2]
    assert potato.examples == ("she peeled the potato", "a potato")  # the attribution is dropped
    breathe = synsets[3]
    assert breathe.words == ("breathe", "take a breath", "respire", "suspire")
    assert breathe.gloss == "draw air into, and expel out of, the lungs"
    assert breathe.examples == ("I can breathe better when the air is clean", "The patient is respiring")
    assert breathe.lexname == "verb.body"
    assert synsets[4].gloss == "(usually followed by `to') having the necessary means"
    assert synsets[5].words == ("emergent", "emerging")  # the (a) marker is removed
    assert synsets[6].lexname == "adv.all" and synsets[6].words == ("a cappella",)
    with pytest.raises(AttributeError):
        dog.gloss = "changed"  # frozen


def test_parts_of_speech_and_order(fake):
    assert [s.pos for s in load_synsets(pos=["verb", "noun"])] == ["verb", "noun", "noun", "noun"]
    assert [s.pos for s in load_synsets(pos="adv")] == ["adv"]
    with pytest.raises(ConfigError, match="nouns"):
        load_synsets(pos=["nouns"])


def test_sentences_deduplicated_in_order(fake):
    sentences = wordnet_sentences()
    assert sentences[:4] == [
        load_synsets()[0].gloss,
        "a member of the genus Canis",
        "the dog barked all night",
        "an edible tuber",
    ]
    assert len(sentences) == len(set(sentences))
    # the adverb's last example repeats the dog's gloss: only the new texts are added, at the end
    assert sentences[-3:] == ["without musical accompaniment", "they performed a cappella", "the potato"]
    assert sentences.count("a member of the genus Canis") == 1


def test_distillery_data_itself_and_explicit_root(tmp_path, monkeypatch):
    write_wordnet(tmp_path, {"noun": FILES["noun"]})
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path))
    assert find_wordnet() == tmp_path
    other = write_wordnet(tmp_path / "elsewhere", {"noun": FILES["noun"][:1]})
    assert len(load_synsets(root=other, pos=["noun"])) == 1


def test_missing_folder_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path))
    monkeypatch.setattr(wordnet, "SYSTEM_DIR", tmp_path / "no-system-wordnet")
    with pytest.raises(DataNotFoundError) as err:
        find_wordnet()
    message = str(err.value)
    assert "wordnet-base" in message and "$DISTILLERY_DATA" in message and str(tmp_path) in message
    with pytest.raises(DataNotFoundError, match="wordnet-base"):
        load_synsets()


def test_missing_and_damaged_files(tmp_path):
    write_wordnet(tmp_path, {"noun": FILES["noun"]})
    with pytest.raises(DataNotFoundError, match=r"data\.verb"):
        load_synsets(root=tmp_path)
    (tmp_path / "data.noun").write_text(HEADER + "00001740 03 n 01 entity 0 000 no gloss bar\n")
    with pytest.raises(DataNotFoundError, match=r"line 3"):
        load_synsets(root=tmp_path, pos=["noun"])


def test_gloss_edge_cases():
    assert split_gloss('close in; "an unterminated example') == ("close in", ("an unterminated example",))
    assert split_gloss('a stray quote at the end"') == ("a stray quote at the end", ())
    assert split_gloss("  spaced   out ;  ") == ("spaced out", ())
    with pytest.raises(ValueError):
        parse_line("00001740 77 n 01 entity 0 000 | a gloss", "noun")  # no such lexicographer file


REAL = Path("/usr/share/wordnet/data.noun")


@pytest.mark.skipif(
    not REAL.is_file(), reason="WordNet is not installed (Debian/Ubuntu package wordnet-base)"
)
def test_real_wordnet():
    synsets = load_synsets(root=REAL.parent)
    assert len(synsets) > 100_000
    assert {s.lexname for s in synsets} == set(LEXNAMES)
    assert synsets[0].words == ("entity",) and synsets[0].lexname == "noun.Tops"
    assert all(s.gloss for s in synsets)
    assert sum(len(s.examples) for s in synsets) > 40_000
