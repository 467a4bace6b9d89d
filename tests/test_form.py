"""abc_form: sections, bars and similarity of tunes whose form is known by hand."""

from fractions import Fraction

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
    (f"{A}| % a|b|c\n% d|e:|\nT:Part two\n{B}|]", [8]),        # comments and a title line are no bars
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


# -----------------------------------------------------------------------------
# requests: the two spellings of a form, and what is out of range


@pytest.mark.parametrize("text", ["S:2 B:8 E:3 B:8", "S:2\nB:8\nE:3\nB:8\n", "S:2\\nB:8\\nE:3\\nB:8", "S:2,B:8,E:3,B:8"])
def test_a_control_code_is_read_in_any_of_its_spellings(text):
    assert abc_form.parse_control_code(text) == ((8, 8), "S:2\nB:8\nE:3\nB:8\n")


def test_a_short_spelling_makes_the_same_code_as_the_long_one():
    assert abc_form.form_code([8, 8, 16]) == "S:3\nB:8\nE:3\nB:8\nE:3\nE:3\nB:16\n"
    assert abc_form.parse_control_code(abc_form.form_code([8, 8, 16]))[0] == (8, 8, 16)
    # and a computed code reads back as the tune's own form
    code = abc_form.control_code(tune(f"|:{A}:|\n|:{B}:|\n|:{A}:|"))
    assert abc_form.parse_control_code(code) == ((4, 4, 4), code)


@pytest.mark.parametrize("text, says", [
    ("S:0 B:8", "sections must be 1 to 8"), ("S:9", "sections must be 1 to 8"),
    ("S:2 B:40 E:3 B:8", "bars in a section must be 1 to 32"), ("S:1 B:0", "bars in a section must be 1 to 32"),
    ("S:2 B:8 E:11 B:8", "similarity levels must be 0 to 10"), ("S:2 B:8", "incomplete"),
    ("S:2 B:8 B:8", "expected E:"), ("S:1 B:8 E:3", "expected no more lines"), ("", "incomplete"),
    ("two parts", "expected S:"), ("S:1 B:\u0664", "expected B:"), ("S:\uff11 B:\uff14", "expected S:"),  # digits
    ("S:1 B:" + "9" * 5000, "bars in a section must be 1 to 32"),  # that int() would not read (ASCII only, any length)
])
def test_an_impossible_code_is_refused_with_its_reason(text, says):
    with pytest.raises(abc_form.PromptError, match=says):
        abc_form.parse_control_code(text)


def test_the_code_lines_come_in_irishmans_order():
    order = []
    for _ in range(8):
        letter = abc_form.next_code_field(order)
        if letter == "X":
            break
        order.append(letter + ":1" if letter != "S" else "S:3")
    assert [line[0] for line in order] == list("SBEBEEB")


def test_a_generated_code_is_taken_off_the_tune():
    assert abc_form.strip_control_code("S:1\nB:8\nX:1\nK:D\nS:1 is no code here\n") == "X:1\nK:D\nS:1 is no code here\n"


@pytest.mark.parametrize("token, meter, timing", [
    ("(3", "6/8", (3, Fraction(2, 3))), ("(3:2:3", "2/4", (3, Fraction(2, 3))), ("(3::", "4/4", (3, Fraction(2, 3))),
    ("(2", "6/8", (2, Fraction(3, 2))), ("(6", "6/8", (6, Fraction(1, 3))), ("(5", "6/8", (5, Fraction(2, 5))),
    ("(5", "4/4", (5, Fraction(3, 5))), ("(3:2:2", "4/4", (2, Fraction(2, 3))), ("(9", "9/8", (9, Fraction(2, 9)))])
def test_a_tuplet_takes_the_time_the_standard_gives_it(token, meter, timing):
    """(p:q:r: the next r notes (p unless given) in the time of q, q by the standard's table where left out."""
    assert abc_form.tuplet_timing(token, meter) == timing


def test_a_sextuplet_pickup_counts_as_the_pickup_it_sounds_like():
    """abc2midi plays (6ABcdef in 2 units of L: a pickup, as AB| is, not a full 6/8 bar."""
    head, rest = "X:1\nL:1/8\nM:6/8\nK:D\n", "|ABc def|ABc def|ABc def|ABc d|]\n"
    assert [s.bars for s in abc_form.sections(head + "(6ABcdef" + rest)] == \
        [s.bars for s in abc_form.sections(head + "AB" + rest)] == [4]
