"""abc_form: sections, bars and similarity of tunes whose form is known by hand."""

import pytest

import abc_form


def tune(body: str, meter: str = "6/8", unit: str = "1/8") -> str:
    return f"X:1\nL:{unit}\nM:{meter}\nK:D\n{body}\n"


A = "DFA dFA|GBd gfe|dcB AFD|EFG A3"
B = "f2g2a2|b2a2g2|f2e2d2|c2B2A2"  # no token in common with A


@pytest.mark.parametrize("number, form", [
    (1, [8, 4]),    # jig: a pickup before each part (A| and |:f/g/|), short closing bars counted
    (2, [8, 4]),    # reel: first and second endings count as one bar, played the last time through
    (3, [16]),      # waltz: a pickup, no repeats, one section, ends with |]
    (4, [4, 4]),    # hornpipe: a triplet pickup, then |:c>d| opening the second part
    (5, [8, 4]),    # polka: || between parts, an inline key change
    (6, [4]),       # slide in 12/16: a pickup and a short closing bar
    (7, [7]),       # air: no pickup, no repeats
    (8, [4]),       # K:none
])
def test_the_fixture_tunes_have_the_forms_written_in_them(fixture_tunes, number, form):
    assert [s.bars for s in abc_form.sections(fixture_tunes[number - 1])] == form


def test_the_control_code_is_irishmans_text_form():
    code = abc_form.control_code(tune(f"|:{A}:|\n|:{B}:|\n|:{A}:|"))
    assert code == "S:3\nB:4\nE:0\nB:4\nE:10\nE:0\nB:4\n"  # the third part repeats the first


@pytest.mark.parametrize("body, form", [
    (f"{A}|{B}|]", [8]),                                     # no repeats at all
    (f"{A}|{B}", [8]),                                       # and no final bar line
    (f"|:{A}|1 fga e3:|2 fga d3||", [5]),                    # one-bar endings: 4 common bars + the second
    (f"|:{A}|1 {B}:|2 fga d3||", [5]),                       # a long first ending is not played last
    (f"|:{A}[1 fga e3:|[2 fga d3|]", [5]),                   # the [1 ... :|[2 spelling
    (f"{A}::{B}:|", [4, 4]),                                 # :: ends one part and opens the next
    (f"{A}|\n|:{B}:|", [4, 4]),                              # |: after bars opens a new section
    (f"A|{A}:|\n|:e|{B}:|", [4, 4]),                         # pickups open both sections
    (f"{A}|[M:9/8] DFA dFA dFA|]", [5]),                     # a meter change mid-tune
    (f"{A}||\n|| z|{B}||", [4, 4]),                           # a double bar repeated on the next line
])
def test_sections_follow_the_documented_rules(body, form):
    assert [s.bars for s in abc_form.sections(tune(body))] == form


def test_without_a_numeric_meter_every_bar_counts():
    assert [s.bars for s in abc_form.sections(tune(f"A|{A}|]", meter="none"))] == [5]


def test_similarity_levels_run_from_unrelated_to_identical():
    a, b, c = abc_form.sections(tune(f"|:{A}:|\n|:{B}:|\n|:{A.replace('EFG A3', 'EFG F3')}:|"))
    assert abc_form.similarity_level(a, a) == 10
    assert abc_form.similarity_level(a, b) == 0
    assert abc_form.similarity_level(a, c) == 10  # one note of 22 changed: 0.95, rounded
    assert abc_form.similarity_level(a, abc_form.sections(tune("DFA dFA|GBd gfe"))[0]) == 5  # half of it
    assert abc_form.levenshtein(list("kitten"), list("sitting")) == 3
