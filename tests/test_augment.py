"""Augmentation checked against abc2midi, an independent ABC parser: transposition moves every
pitch by exactly the shift, unit-length rewrites keep the MIDI identical, rhythm scaling
scales every duration and keeps the bars full."""

import json
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import abc_music
import musicrnn
from abc_tokens import tokenize_abc

ROOT = Path(__file__).resolve().parent.parent
needs_abcmidi = pytest.mark.skipif(not (shutil.which("abc2midi") and shutil.which("mftext")),
                                   reason="abc2midi/mftext not installed (apt-get install abcmidi)")


def midi_notes(tune: str, tmp_path: Path, *flags: str) -> tuple[list[tuple[int, int, int]], list[str]]:
    """(onset, duration, pitch) of every melody note, in ticks, and abc2midi's bar warnings.

    abc2midi starts each note one tick after its beat; onsets are counted from the beat.
    """
    src, mid = tmp_path / "t.abc", tmp_path / "t.mid"
    src.write_text(tune)
    mid.unlink(missing_ok=True)
    log = subprocess.run(["abc2midi", str(src), "-o", str(mid), *flags], capture_output=True, text=True).stdout
    assert "Error" not in log, log
    text = subprocess.run(["mftext", str(mid)], capture_output=True, text=True).stdout
    started, notes = {}, []
    for time, kind, pitch in re.findall(r"Time=(\d+)\s+Note (on|off), chan=1 pitch=(\d+)", text):
        time, pitch = int(time), int(pitch)
        if kind == "on":
            started[pitch] = time
        elif pitch in started:
            beat = started.pop(pitch) - 1
            notes.append((beat, time, pitch))
    # abc2midi spreads a chord's notes 10 ticks apart: count them from the chord's onset
    first = {}
    for beat, end, _ in sorted(notes):
        key = (end, beat // 100)
        first.setdefault(key, beat)
    notes = [(first[(end, beat // 100)], end - first[(end, beat // 100)], p) for beat, end, p in notes]
    return sorted(notes), [line for line in log.splitlines() if "time units" in line]


def without_ornaments(tune: str) -> str:
    """abc2midi plays rolls and trills as runs of notes whose lengths are fractions of L."""
    return tune.replace("~", "").replace("!trill!", "")


def durations(notes):
    return [(on, dur) for on, dur, _ in notes]


@pytest.mark.slow
@needs_abcmidi
@pytest.mark.parametrize("shift", range(-6, 7))
def test_transposition_moves_every_pitch_by_the_shift(fixture_tunes, tmp_path, shift):
    for tune in fixture_tunes:
        before, _ = midi_notes(tune, tmp_path)
        moved = abc_music.transpose_tune(tune, shift, low=0, high=127)  # the guard has its own test
        after, _ = midi_notes(moved, tmp_path)
        assert durations(after) == durations(before), (shift, moved)
        assert [p for *_, p in after] == [p + shift for *_, p in before], (shift, tune, moved)
        assert "".join(tokenize_abc(moved)) == moved


@needs_abcmidi
@pytest.mark.parametrize("body, in_a", [("^C =c C c z4 |", "^D =d =D d"), ("^C c z6 |", "^D ^d"),
                                        ("d>e=fe dcA^F | ^F4 f4 |", "e>f=gf edB^G")])
def test_an_accidental_holds_for_its_letter_in_every_octave_as_abc2midi_plays_it(tmp_path, body, in_a):
    """abc2midi carries a bar's accidental to the letter's other octaves (^C c: C# c#), the standard to
    that octave alone: a transposition writes an accidental wherever either reading needs one; written
    only where its own reading needs it, abc2midi would play 25 corpus tunes a semitone off somewhere."""
    tune = f"X:1\nL:1/8\nM:4/4\nK:G\n{body}\n"
    for shift in (2, -5):
        moved = abc_music.transpose_tune(tune, shift, 0, 127)
        assert midi_notes(moved, tmp_path)[0] == [(on, d, p + shift) for on, d, p in midi_notes(tune, tmp_path)[0]]
    assert in_a in abc_music.transpose_tune(tune, 2)  # in K:A, the notes both readings agree on


@pytest.mark.slow
@needs_abcmidi
@pytest.mark.parametrize("shift", [1, 5, -4, 6])
def test_there_and_back_gives_the_same_midi(fixture_tunes, tmp_path, shift):
    for tune in fixture_tunes:
        back = abc_music.transpose_tune(abc_music.transpose_tune(tune, shift, 0, 127), -shift, 0, 127)
        assert midi_notes(back, tmp_path)[0] == midi_notes(tune, tmp_path)[0]


@needs_abcmidi
@pytest.mark.parametrize("unit", ["1/4", "1/8", "1/16"])
def test_unit_length_rewrite_keeps_the_music_identical(fixture_tunes, tmp_path, unit):
    """abc2midi plays rolls and trills as runs of notes in fractions of L, so those are left out of
    the comparison (~ !trill! removed from both); a grace group's notes are lengths of L and are
    rewritten with the rest (L:1/8 -> L:1/16: {c}B4 -> {c2}B8; {c}B8 would halve the grace). All else must match."""
    for tune in fixture_tunes:
        rewritten = abc_music.set_unit_length(tune, unit)
        assert f"L:{unit}" in rewritten and rewritten.count("~") == tune.count("~")
        plain_before, plain_after = without_ornaments(tune), without_ornaments(rewritten)
        assert midi_notes(plain_after, tmp_path) == midi_notes(plain_before, tmp_path), rewritten


@needs_abcmidi
@pytest.mark.parametrize("header", ["X:1\nM:4/4\nK:C\n", "X:1\nL:1/8\nM:4/4\nK:C\n"], ids=["no L:", "L:1/8"])
def test_a_unit_length_line_in_the_body_is_read_where_it_stands(tmp_path, header):
    """A JSON record is used as written: its body may change L: with an L: line of its own."""
    tune = header + "CDEF GABc|\nL:1/4\nC D E F|\n"
    for unit in ("1/16", "1/4"):
        rewritten = abc_music.set_unit_length(tune, unit)
        assert midi_notes(rewritten, tmp_path)[0] == midi_notes(tune, tmp_path)[0], rewritten


def test_a_header_unit_spelled_without_a_denominator_is_rewritten_once():
    """L:1 (a whole note) is L:1/1 to the arithmetic of lengths (readable_lengths reads both): the rewrite
    replaces that line as it does L:1/1, never adds a second."""
    body = "M:4/4\nK:C\nC/8D/8E/8F/8 G/4A/4 B/2|\n"
    rewritten = abc_music.set_unit_length("X:1\nL:1\n" + body, "1/16")
    assert rewritten == abc_music.set_unit_length("X:1\nL:1/1\n" + body, "1/16") == "X:1\nL:1/16\n" + body.replace(
        "C/8D/8E/8F/8 G/4A/4 B/2", "C2D2E2F2 G4A4 B8")


@needs_abcmidi
@pytest.mark.parametrize("key", ["G clef=bass", "Gm clef=bass", "G middle=d", "G minor", "Ador clef=treble"])
def test_a_key_with_a_clef_or_a_middle_moves_and_keeps_them(tmp_path, key):
    tune = f"X:1\nL:1/8\nM:4/4\nK:{key}\nABcd efga|\n"
    moved = abc_music.transpose_tune(tune, 2, low=0, high=127)
    rest = key.split(" ", 1)[1]
    assert f" {rest}\n" in moved  # a word apart, as written: not glued to the new tonic
    assert [p for *_, p in midi_notes(moved, tmp_path)[0]] == [p + 2 for *_, p in midi_notes(tune, tmp_path)[0]]


@pytest.mark.parametrize("key", ["D exp _b", "D ^c", "G exp"])
def test_a_key_that_writes_out_its_accidentals_is_not_transposed(key):
    with pytest.raises(abc_music.RewriteError, match="accidentals are written out"):
        abc_music.transpose_tune(f"X:1\nL:1/8\nM:4/4\nK:{key}\nABcd|\n", 2, low=0, high=127)


@needs_abcmidi
def test_rhythm_doubling_doubles_every_duration_and_keeps_bars_full(fixture_tunes, tmp_path):
    """Rolls and trills aside, as above; grace notes double with the rest."""
    for tune in fixture_tunes:
        tune = without_ornaments(tune)
        before, warnings_before = midi_notes(tune, tmp_path)
        doubled = abc_music.change_rhythm(tune, 2)
        after, warnings_after = midi_notes(doubled, tmp_path)
        assert [(2 * on, 2 * dur) for on, dur, _ in before] == durations(after), doubled
        assert [p for *_, p in after] == [p for *_, p in before]
        assert len(warnings_after) <= len(warnings_before), warnings_after


def test_key_spelling_prefers_the_new_keys_letters():
    tune = "X:1\nL:1/8\nM:4/4\nK:D\nDEFG ABcd|^c=cBA G2F2|]\n"
    # ^c is C# (in the key already): it becomes D#, in E major's signature, so no accidental
    assert abc_music.transpose_tune(tune, 2) == "X:1\nL:1/8\nM:4/4\nK:E\nEFGA Bcde|d=dcB A2G2|]\n"
    assert abc_music.transpose_tune(tune, -2).startswith("X:1\nL:1/8\nM:4/4\nK:C\nCDEF GABc|")
    assert "K:Bb" in abc_music.transpose_tune(tune, -4)   # not A#
    assert "K:F#m" in abc_music.transpose_tune("X:1\nK:Em\nEFG|\n", 2)
    assert "K:Bdor" in abc_music.transpose_tune("X:1\nK:Ador\nABc|\n", 2)
    assert "K:Amix" in abc_music.transpose_tune("X:1\nK:Gmix\nGAB|\n", 2)


def test_chord_symbols_and_inline_keys_move_too():
    out = abc_music.transpose_tune('X:1\nL:1/8\nM:2/4\nK:G\n"Am"A2 "G/B"B2|[K:D] "D"d4|]\n', 2)
    assert '"Bm"' in out and '"A/C#"' in out and "[K:E]" in out and '"E"e4' in out


def test_headers_other_than_the_key_are_untouched():
    out = abc_music.transpose_tune("X:3\nL:1/8\nM:6/8\nK:D\nd2f|\n", 5)
    assert out.startswith("X:3\nL:1/8\nM:6/8\nK:G\n")


def test_the_range_guard_refuses_notes_out_of_reach():
    with pytest.raises(abc_music.RewriteError, match="outside"):
        abc_music.transpose_tune("X:1\nK:C\nc''c'''|\n", 6)
    with pytest.raises(abc_music.RewriteError):
        abc_music.transpose_tune("X:1\nK:C\nG,A,B,|\n", -1)


def test_rhythm_change_scales_lengths_not_numbers_elsewhere():
    tune = 'X:1\nL:1/8\nM:6/8\nK:D\n"D7"A>B (3cde !trill!f2 [Ace]2 z|\n'
    out = abc_music.change_rhythm(tune, 2)
    assert out == 'X:1\nL:1/8\nM:6/4\nK:D\n"D7"A2>B2 (3c2d2e2 !trill!f4 [Ace]4 z2|\n'
    assert abc_music.change_rhythm(out, Fraction(1, 2)) == tune


@pytest.mark.parametrize("meter, factor", [("2/4", 2), ("2/4", Fraction(1, 2)), ("4/4", 2), ("C", Fraction(1, 2))])
def test_a_hornpipe_keeps_its_rhythm_where_abc2midi_would_refuse_the_scaled_meter(meter, factor):
    """abc2midi plays R:hornpipe in 2/4 and 4/4 alone: scaled to 2/2 or 4/8, it fails ("Hornpipe must be
    in 2/4 or 4/4 time"), so the rewrite is refused and training keeps the tune as written."""
    tune = f"X:1\nR:hornpipe\nL:1/16\nM:{meter}\nK:D\nABcd efga|\n"
    with pytest.raises(abc_music.RewriteError, match="hornpipe"):
        abc_music.change_rhythm(tune, factor)
    assert musicrnn.rewrite_tune(tune, (None, factor, None))[0] == tune
    assert abc_music.change_rhythm(tune.replace("R:hornpipe", "R:reel"), factor) != tune


@pytest.mark.parametrize("length, text", [(Fraction(1), ""), (Fraction(2), "2"), (Fraction(1, 2), "/"),
                                          (Fraction(1, 4), "/4"), (Fraction(3, 2), "3/"), (Fraction(3, 4), "3/4")])
def test_length_format_round_trips(length, text):
    assert abc_music.format_length(length) == text
    assert abc_music.parse_length(text) == length


@pytest.mark.slow
def test_transposition_never_fails_on_corpus_tunes():
    """Every shift of a sample of the default corpus (all of it: README) either works,
    tokenizing losslessly, or is refused: by the range guard, or for a key that writes out its accidentals."""
    path = ROOT / "data" / "train.json"
    tunes = [r["abc notation"] for r in json.loads(path.read_text())] if path.exists() else []
    if not tunes:
        pytest.skip("data/train.json not built (make data)")
    rng = np.random.default_rng(0)
    for tune in [tunes[i] for i in rng.choice(len(tunes), 150, replace=False)]:
        for shift in range(-6, 7):
            try:
                out = abc_music.transpose_tune(tune, shift)
            except abc_music.RewriteError as e:
                assert "outside" in str(e) or "cannot transpose the key" in str(e) or "written out" in str(e)
                continue
            assert "".join(tokenize_abc(out)) == out
            assert len(abc_music.note_tokens(out)) == len(abc_music.note_tokens(tune))


def augment_tune(tune, rng, key_share=1.0, unit_share=1.0, rhythm_share=0.0):
    return musicrnn.rewrite_tune(tune, musicrnn.augmentation_draws(rng, key_share, unit_share, rhythm_share))


def test_augment_tune_applies_each_change_with_its_share(fixture_tunes):
    tune = next(t for t in fixture_tunes if "L:1/8" in t and abc_music._midi_range(t)[1] <= 84)
    rng = np.random.default_rng(0)
    assert augment_tune(tune, rng, key_share=0.0, unit_share=0.0) == (tune, None)  # none drawn
    keyed = {augment_tune(tune, rng, key_share=1.0, unit_share=0.0)[0] for _ in range(40)}
    assert keyed <= {abc_music.transpose_tune(tune, s) for s in range(-5, 7)} and len(keyed) > 6
    united = {augment_tune(tune, rng, key_share=0.0, unit_share=1.0)[0] for _ in range(40)}
    assert united == {abc_music.set_unit_length(tune, u) for u in ("1/8", "1/16", "1/4")}
    changed = sum(augment_tune(tune, rng, key_share=0.5, unit_share=0.0)[0] != tune for _ in range(400))
    assert 150 < changed < 220  # half are drawn, and 1 in 12 of those draws the shift 0
    rhythmed = {augment_tune(tune, rng, 0.0, 0.0, rhythm_share=1.0)[0] for _ in range(40)}
    assert rhythmed == {abc_music.change_rhythm(tune, f) for f in (2, Fraction(1, 2))}
    rng, reference = np.random.default_rng(3), np.random.default_rng(3)
    augment_tune(tune, rng, 0.0, 0.0, rhythm_share=0.0)
    reference.random(2)  # the key and the unit draws: a rhythm share of 0 draws nothing
    assert rng.random() == reference.random()
    a = [augment_tune(t, np.random.default_rng(7), 0.5, 0.5) for t in fixture_tunes]
    b = [augment_tune(t, np.random.default_rng(7), 0.5, 0.5) for t in fixture_tunes]
    assert a == b  # seeded, so --resume replays the same epochs


@needs_abcmidi
@pytest.mark.parametrize("shift", [13, 24, -13, -30])
def test_a_shift_of_more_than_an_octave_moves_every_pitch_by_it(tmp_path, shift):
    """transpose_key takes the key of the shift within an octave, the rest as whole octaves: a search of
    letter steps within one octave alone finds no key for 13 semitones (a bare KeyError)."""
    tune = "X:1\nL:1/8\nM:4/4\nK:G\nABcd ^c=fed|\n"
    moved = abc_music.transpose_tune(tune, shift, low=0, high=127)
    assert [p for *_, p in midi_notes(moved, tmp_path)[0]] == [p + shift for *_, p in midi_notes(tune, tmp_path)[0]]


@needs_abcmidi
@pytest.mark.parametrize("header, factor", [("X:1\nM:6/8\nK:G\n", Fraction(1, 2)), ("X:1\nM:2/4\nK:G\n", 2)])
def test_a_rhythm_change_keeps_the_default_unit_of_a_tune_without_l(tmp_path, header, factor):
    """M:6/8 -> M:6/16 would change the default L: from 1/8 to 1/16, halving every note a second time so that
    no bar is full: the rewrite writes the old default out as an L: line."""
    tune = header + ("GAB cde|d3 B3|\n" if "6/8" in header else "GABc defg|a4 g4|\n")  # full bars: 6/8, 8/16
    changed = abc_music.change_rhythm(tune, factor)
    before, after = midi_notes(tune, tmp_path), midi_notes(changed, tmp_path)
    scaled = [(on * factor, d * factor) for on, d, _ in before[0]]
    assert before[1] == after[1] == [] and scaled == durations(after[0]), changed


def test_chord_symbols_with_a_lowercase_bass_or_in_parentheses_move_with_the_tune():
    """CHORD_SYMBOL reads "G/b" and "(D7)" as chords, and the transposition moves them: read as text, they
    would stay in D."""
    moved = abc_music.transpose_tune('X:1\nL:1/8\nM:4/4\nK:D\n"G/b"d2 "Am/c"c2 "(D7)"d2 "F#m7/A"f2|\n', 2)
    assert '"A/C#"e2 "Bm/D"d2 "(E7)"e2 "G#m7/B"g2|' in moved
