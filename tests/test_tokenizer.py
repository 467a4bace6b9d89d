"""The ABC tokenizer is lossless, finds musical tokens, and the vocabulary reads unseen symbols."""

import json
from pathlib import Path

import pytest

import abc_tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from abc_tokens import Vocabulary, tokenize_abc

ROOT = Path(__file__).resolve().parent.parent


def test_round_trip_on_fixture_tunes(fixture_tunes):
    for tune in fixture_tunes:
        assert "".join(tokenize_abc(tune)) == tune


@pytest.mark.parametrize("name", ["train.json", "validation.json", "essen.json"])
def test_round_trip_on_every_corpus_tune(name):
    path = ROOT / "data" / name
    if not path.exists():
        pytest.skip(f"{path} not built (make data)")
    tunes = [r["abc notation"] for r in json.loads(path.read_text())]
    broken = [t for t in tunes if "".join(tokenize_abc(t)) != t]
    assert tunes and not broken


ABC_ALPHABET = st.sampled_from(list("ABCDEFGabcdefgzxZ^_=,'/0123456789|:[]()<>{}!\"+-~. \nKLMXT#bm"))


@settings(max_examples=400, deadline=None)
@given(st.text(ABC_ALPHABET, max_size=80) | st.text(max_size=40))
def test_round_trip_on_random_strings(text):
    tokens = tokenize_abc(text)
    assert "".join(tokens) == text
    assert all(tokens)  # no empty tokens


@pytest.mark.parametrize("text, expected", [
    ("^c'3/2", ["^c'3/2"]),
    ("__B,,/", ["__B,,/"]),
    ("z2 x/ Z4", ["z2", " ", "x/", " ", "Z4"]),
    ("A>B", ["A", ">", "B"]),
    ("A<<B", ["A", "<<", "B"]),
    ("(3abc", ["(3", "a", "b", "c"]),
    ("(3:2:3abc", ["(3:2:3", "a", "b", "c"]),
    ("|:A:|2B||", ["|:", "A", ":|2", "B", "||"]),
    ("|1 A :: B |]", ["|1", " ", "A", " ", "::", " ", "B", " ", "|]"]),
    ("[1A[2B", ["[1", "A", "[2", "B"]),
    ("[CEG]2", ["[", "C", "E", "G", "]2"]),
    ('"Am"A "G/B"B', ['"Am"', "A", " ", '"G/B"', "B"]),
    ("!trill!A ~B", ["!trill!", "A", " ", "~", "B"]),
    ("{ag}A", ["{ag}", "A"]),
    ("A[K:G]B", ["A", "[K:G]", "B"]),
    ("X:1\nK:Dmix\nA", ["X:1", "\n", "K:Dmix", "\n", "A"]),
    ("A2-A", ["A2", "-", "A"]),
])
def test_musical_tokens(text, expected):
    assert tokenize_abc(text) == expected


def test_body_line_starting_with_note_and_repeat_is_not_a_header():
    assert tokenize_abc("G:|") == ["G", ":|"]


def test_token_kinds_come_from_context():
    kinds = dict(abc_tokens.tokenize_abc_kinds("(3^c'3/2 z2 :|2 \"Am\"[CE]2 [K:G]"))
    assert kinds["^c'3/2"] == "note" and kinds[":|2"] == "bar" and kinds["(3"] == "tuplet"
    assert kinds["z2"] == "rest" and kinds['"Am"'] == "chord_symbol" and kinds["[K:G]"] == "inline_field"
    assert kinds["["] == "chord_open" and kinds["]2"] == "chord_close"


def test_vocabulary_reads_unseen_whole_tokens_from_their_parts():
    # every character of K:F#dor and "Em7" appears in training; the whole tokens never do
    vocab = Vocabulary.build(['X:1\nK:D\n"D"d2 f#\n"E"m7 F dor|\n'] * 5, "abc")
    assert "K:D" in vocab.index and "K:F#dor" not in vocab.index
    for unseen in ("K:F#dor", '"Em7"'):
        ids = vocab.encode(unseen)
        assert vocab.unk_id not in ids and len(ids) == len(unseen) and vocab.decode(ids) == unseen
    assert vocab.encode('"D"') == [vocab.index['"D"']]  # a seen chord symbol stays one token


def test_unseen_character_becomes_unk_and_a_prompt_with_it_is_refused():
    vocab = Vocabulary.build(["ABC|"], "char")
    assert vocab.encode("AQ") == [vocab.index["A"], vocab.unk_id]
    with pytest.raises(abc_tokens.PromptError, match="'Q'"):
        abc_tokens.encode_prompt(vocab, "AQ")


def test_vocabulary_round_trips_through_json():
    vocab = Vocabulary.build(["X:1\nK:G\nG2 B|\n"] * 3, "abc")
    again = Vocabulary.from_json(vocab.to_json())
    assert again.tokens == vocab.tokens and again.kind == "abc"


def test_char_vocabulary_is_sorted_char_to_idx_shifted_by_the_specials():
    """What the lesson's vocabulary section says: ids 0-2 are <pad>, <eos>, <unk>, then the
    sorted characters, so a character's id is plain char_to_idx plus 3."""
    import musicrnn

    texts = ["abc|", "cab"]
    vocab = musicrnn.build_vocabulary(texts, musicrnn.Config())
    char_to_idx = {ch: i for i, ch in enumerate(sorted({ch for t in texts for ch in t}))}
    assert vocab.tokens[:3] == ["<pad>", "<eos>", "<unk>"] and (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.encode("cab|") == [char_to_idx[ch] + 3 for ch in "cab|"] == [5, 3, 4, 6]
    assert vocab.decode([1, 5, 3, 4, 0]) == "cab"
    assert musicrnn.pad_or_truncate([1, 2, 3], 5, 0).tolist() == [1, 2, 3, 0, 0]
    assert musicrnn.pad_or_truncate([1, 2, 3], 2, 0).tolist() == [1, 2]


def test_a_header_prompt_holds_meter_and_key_as_abc_writes_them():
    """Flags come from shells and forms with stray spaces: the header lines must not carry them."""
    assert abc_tokens.header_prompt(" 6/8 ", "D ") == "X:1\nL:1/8\nM:6/8\nK:D\n"
    assert abc_tokens.header_prompt(None, None) == "" and abc_tokens.header_prompt(None, "Ador") == "X:1\nL:1/8\nK:Ador\n"
