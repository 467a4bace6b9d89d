"""A tunebook's renders (generate --render): which files they write and replace, whatever the tunebook's name."""

import shutil
from pathlib import Path

import pytest
from conftest import one_error_line, run_main

import infer_onnx
import rendering
from safe_write import OutputError

needs = {tool: pytest.mark.skipif(not shutil.which(tool), reason=f"{tool} not installed (apt-get install {package})")
         for tool, package in [("abc2midi", "abcmidi"), ("abcm2ps", "abcm2ps"), ("fluidsynth", "fluidsynth")]}
needs_soundfont = pytest.mark.skipif(rendering.find_soundfont() is None,
                                     reason="no soundfont (apt-get install timgm6mb-soundfont)")
TUNE = "X:{n}\nT:Tune {n}\nM:4/4\nL:1/4\nQ:1/4=240\nK:C\nCDEF|GABc|]\n"


def all_tools(test):
    for mark in (needs["abc2midi"], needs["abcm2ps"], needs["fluidsynth"], needs_soundfont):
        test = mark(test)
    return test


def tunebook(path: Path, tunes: int) -> Path:
    path.write_text("\n".join(TUNE.format(n=n) for n in range(1, tunes + 1)), encoding="utf-8")
    return path


def plant(folder: Path, *names: str) -> dict[str, str]:
    """Files of the user's, or of another tunebook's render: name -> what they hold."""
    for name in names:
        (folder / name).write_text(f"precious {name}")
    return {name: f"precious {name}" for name in names}


def untouched(folder: Path, planted: dict[str, str]) -> bool:
    return all((folder / name).read_text() == text for name, text in planted.items())


# --- which names a render writes


def test_only_the_names_of_this_tunebooks_tunes_would_be_replaced(tmp_path):
    # set1.abc's first tune renders to set1-1.*, set.abc's tune 11 to set-11.*: without the "-" both would be set11.*
    plant(tmp_path, "set1-1.mid", "set1-1.wav", "set-2.svg", "set-02.svg", "set-0.mid", "set-1.mid.bak", "set.mid",
          "set-11.wav", "set11.mid")
    path = tmp_path / "set.abc"
    assert rendering.rendered_files(path, 1) == []
    assert [p.name for p in rendering.rendered_files(path, 2)] == ["set-2.svg"]
    assert [p.name for p in rendering.rendered_files(path, 11)] == ["set-11.wav", "set-2.svg"]
    assert rendering.rendered_files(path) == rendering.rendered_files(path, 11)  # every tune number
    assert [p.name for p in rendering.rendered_files(tmp_path / "set1.abc", 1)] == ["set1-1.mid", "set1-1.wav"]


def test_without_overwrite_a_render_refuses_before_writing_anything(tmp_path):
    planted = plant(tmp_path, "set-2.wav")
    with pytest.raises(OutputError, match="set-2.wav"):
        rendering.render_tunebook(tunebook(tmp_path / "set.abc", 2))
    assert untouched(tmp_path, planted) and sorted(p.name for p in tmp_path.iterdir()) == ["set-2.wav", "set.abc"]


@all_tools
def test_overwrite_replaces_this_tunebooks_renders_and_nothing_else(tmp_path):
    """An earlier render of a longer tunebook: its tune 2's files would play a tune this one no longer holds."""
    planted = plant(tmp_path, "set1-1.mid", "set1-1.wav", "set11.mid", "set2.mid", "set-1.mid.bak")
    (tmp_path / "set-1.mid").write_text("an earlier render of this tunebook")
    plant(tmp_path, "set-2.mid", "set-2.wav", "set-2.svg")
    lines = rendering.render_tunebook(tunebook(tmp_path / "set.abc", 1), overwrite=True)
    assert [line.split(" file")[0].split(" score")[0] for line in lines] == ["MIDI: 1", "audio: 1", "SVG: 1"]
    assert untouched(tmp_path, planted)
    assert (tmp_path / "set-1.mid").read_bytes().startswith(b"MThd")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*planted, "set.abc", "set-1.mid", "set-1.wav",
                                                                 "set-1.svg"])


@needs["abcm2ps"]
def test_a_score_abcm2ps_draws_is_shown_even_when_it_squeezed_a_line(tmp_path):
    """abcm2ps exits 1 on "Line too much shrunk", the score written all the same."""
    tune = ("X:7\nL:1/8\nM:4/4\nK:G\nGA2B2dc|B2AB/c/ d2cB |ABcd e2 dc |dfga b3 a|c'2fa ba/f/d'/c'/b/c'/ |"
            "c'2 d'2d'2 db |=c'bb_ag g2 g |a>abc'\ne'2g/b/2g/a/|]\n")
    made = rendering.render_tune(tune, tmp_path, "squeezed")
    assert made["score"] == tmp_path / "squeezed.svg" and made["score"].read_text().rstrip().endswith("</svg>")


@all_tools
@pytest.mark.parametrize("stem", ["t[1]", "-a", "--help", "a b*?", "averyveryverylongnameforatunebook"])
def test_any_tunebook_name_gets_its_midi_audio_and_scores(tmp_path, stem):
    lines = rendering.render_tunebook(tunebook(tmp_path / f"{stem}.abc", 2))
    assert [line.split(" files")[0].split(" scores")[0] for line in lines] == ["MIDI: 2", "audio: 2", "SVG: 2"]
    made = [f"{stem}-{n}.{kind}" for n in (1, 2) for kind in ("mid", "wav", "svg")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{stem}.abc", *made])


@needs["abcm2ps"]
@needs["abc2midi"]
def test_a_tune_a_tool_fails_on_costs_only_that_tune_its_file_and_its_old_one_goes(tmp_path):
    """abcm2ps aborts on a 640-bar tune ("Output buffer overflow"): rendered as one book, no tune would get
    a score. Tune by tune, the short tune gets one; with overwrite, the old score under the long
    tune's name, which this render does not make anew, is removed (it shows another tune)."""
    long = "X:1\nM:4/4\nL:1/4\nK:C\n" + "\n".join(["CDEF|GABc|" * 8] * 40) + "|]\n"
    path = tmp_path / "set.abc"
    path.write_text(long + "\n" + TUNE.format(n=2), encoding="utf-8")
    plant(tmp_path, "set-1.svg")
    lines = rendering.render_tunebook(path, overwrite=True)
    assert lines[0].startswith("MIDI: 2 files") and lines[2].startswith("SVG: 1 score ")
    assert not (tmp_path / "set-1.svg").exists() and (tmp_path / "set-2.svg").read_text().rstrip().endswith("</svg>")


# --- through the command line


def test_the_command_line_refuses_only_what_its_render_would_replace(tiny_onnx, tmp_path):
    args = ["--model", tiny_onnx, "--num", "1", "--constrained", "--max-tokens", "120", "--render"]
    planted = plant(tmp_path, "set1-1.mid", "set1-1.wav", "set-11.mid")
    code, _, err = run_main(infer_onnx.main, *args, "--out", tmp_path / "set.abc")
    assert code == 0 and untouched(tmp_path, planted), err
    plant(tmp_path, "other-1.mid")
    code, _, err = run_main(infer_onnx.main, *args, "--out", tmp_path / "other.abc")
    assert one_error_line(code, err) and "other-1.mid" in err and not (tmp_path / "other.abc").exists()


def test_not_even_overwrite_lets_a_render_replace_the_model(tiny_onnx, tmp_path):
    model = tmp_path / "set-1.mid"
    shutil.copy(tiny_onnx, model)
    args = ["--model", model, "--constrained", "--max-tokens", "120", "--render", "--overwrite", "--num", "1"]
    code, _, err = run_main(infer_onnx.main, *args, "--out", tmp_path / "set.abc")
    assert one_error_line(code, err) and "set-1.mid" in err and "reads" in err, err
    assert model.read_bytes() == Path(tiny_onnx).read_bytes() and not (tmp_path / "set.abc").exists()


def test_the_command_line_with_overwrite_deletes_nothing_it_does_not_write(tiny_onnx, tmp_path):
    args = ["--model", tiny_onnx, "--constrained", "--max-tokens", "120", "--render", "--overwrite"]
    planted = plant(tmp_path, "set11.mid", "set1-1.wav", "a9.mid", "a-2024x.wav", "a003.svg", "a1-1.svg")
    assert run_main(infer_onnx.main, *args, "--num", "1", "--out", tmp_path / "set.abc")[0] == 0
    assert run_main(infer_onnx.main, *args, "--num", "2", "--out", tmp_path / "a.abc")[0] == 0
    assert untouched(tmp_path, planted)


def test_a_render_into_a_folder_out_makes_is_not_refused(tiny_onnx, tmp_path):
    """--out makes its folder, and --render writes into it: it must not refuse the folder as missing ("No such
    file or directory")."""
    out = tmp_path / "new" / "sub" / "set.abc"
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--num", "1", "--max-tokens", "20", "--render",
                            "--out", out)
    assert code == 0 and out.exists(), err


@needs["abc2midi"]
def test_the_summary_names_the_tunes_a_tool_made_no_file_for(tmp_path):
    """K:cm: abc2midi refuses the tune ("First K: field must specify key signature"); the count alone
    (MIDI: 1 file) would not say which of the two tunes has none, so the summary names it."""
    path = tmp_path / "u.abc"
    path.write_text("X:1\nL:1/8\nM:6/8\nK:cm\nABc def|\n\n" + TUNE.format(n=2), encoding="utf-8")
    lines = rendering.render_tunebook(path)
    assert lines[0] == f"MIDI: 1 file {tmp_path / 'u'}-N.mid (none for tune 1: the tool refused it or ran out of time)"
    assert not (tmp_path / "u-1.mid").exists() and (tmp_path / "u-2.mid").exists()
