"""
Build the default corpus from the ABC tunebooks that ship inside the music21 wheel.

    python -m data.build_corpus [--out data] [--overwrite]    # `make data` runs it, from the repository root

data/README.md comes with the repository, so rebuilding data/ itself needs --overwrite (as make data passes).

Steps: fetch music21==10.5.1 with `pip download --no-deps` (cached in data/cache/),
check its sha256, read the folk tunebooks straight out of the zip (nothing imports
music21), normalise each tune into the IrishMAN record form with musicrnn's own
reader, de-duplicate, split 95/5 by a hash of the text, compute each tune's control
code (abc_form), and write

    data/train.json, data/validation.json     the training corpus
    data/essen.json                           essenFolksong: never trained on, for out-of-collection scores
    data/README.md                            provenance and counts

An existing one of these four is replaced only with --overwrite (make data passes it: they are its targets).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python data/build_corpus.py): the modules it uses are a folder up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import corpus
from abc_form import control_code
from abc_music import read_tunebook
from cli import Parser, UserError, run_command
from safe_write import atomic_file, check_output, removed_if_failed

WHEEL = "music21==10.5.1"
WHEEL_FILE = "music21-10.5.1-py3-none-any.whl"
WHEEL_SHA256 = "dc3309498c4c95cebdf8d4f20c868deb6b63bce1d929cad4f51a7ccc982987b1"
TRAINING_BOOKS = ["oneills1850", "ryansMammoth", "airdsAirs", "miscFolk"]
OUT_OF_COLLECTION_BOOKS = ["essenFolksong"]
OUTPUTS = ["train.json", "validation.json", "essen.json", "README.md"]


def fetch_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL_FILE
    if cache.exists() and not cache.is_dir():
        raise UserError(f"{cache}: a file, where the download cache (a folder) goes: move it, or choose another --out")
    if not wheel.exists():
        with removed_if_failed(cache):  # a failed download leaves no empty folders behind
            cache.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(cache)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not wheel.exists():
                said = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"could not download {WHEEL} with pip (is PyPI reachable?): {said}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise UserError(f"{wheel}: sha256 {digest} differs from the expected {WHEEL_SHA256}; "
                                 f"delete it and run again")
    return wheel


def read_books(wheel: Path, books: list[str]) -> tuple[list[str], dict[str, int]]:
    """Normalised tunes of the given corpus folders, in file order, and a count per folder."""
    tunes, counts = [], {}
    with zipfile.ZipFile(wheel) as zf:
        for book in books:
            names = sorted(n for n in zf.namelist() if n.startswith(f"music21/corpus/{book}/") and n.endswith(".abc"))
            found = [t for n in names for t in read_tunebook(zf.read(n).decode("utf-8", errors="replace"))[0]]
            counts[book] = len(found)
            tunes += found
    return tunes, counts


def split_train_validation(tunes: list[str], val_percent: int = 5) -> tuple[list[str], list[str]]:
    """De-duplicate, then split by a hash of each tune's music: stable under reordering.

    The tune type (R:) is left out of both, so that two copies of a tune that differ only in
    it count once, and keeping R: moved no tune between the two files."""
    first = {}  # music -> the first tune that has it
    for t in tunes:
        first.setdefault(without_type(t), t)
    unique = list(first.values())
    in_val = [int(hashlib.sha256(music.encode()).hexdigest(), 16) % 100 < val_percent for music in first]
    return ([t for t, v in zip(unique, in_val) if not v], [t for t, v in zip(unique, in_val) if v])


def without_type(tune: str) -> str:
    return re.sub(r"(?m)^R:.*\n", "", tune, count=1)


def provenance(counts: dict[str, int], essen_counts: dict[str, int], n_all: int, train: list[str],
               val: list[str], essen: list[str]) -> str:
    rows = "\n".join(f"| `{book}` | {n:,} |" for book, n in counts.items())
    return f"""# Data

Built by `make data` (`python -m data.build_corpus --overwrite`: this file is committed, the JSON files are not).

**Source.** The ABC tunebooks inside the PyPI wheel `{WHEEL}` (sha256 `{WHEEL_SHA256}`),
folders `music21/corpus/{{{",".join(TRAINING_BOOKS)}}}/*.abc`. music21 itself is never imported.
The tunebooks are public-domain collections (O'Neill 1850, Ryan's Mammoth Collection,
Aird's Airs, two small folk books) transcribed by volunteers; see each file's `Z:` lines.

**Normalisation** (`abc_music.normalize_tune`): every tune becomes the IrishMAN record form,
`X:1`, then `R:` (the tune type), `L:` and `M:` when present, then `K:`, then the body. Titles, notes, sources,
comments, lyrics, annotations (`"^text"`) and fingerings (`"4"`) are dropped; chord symbols
and decorations are kept; mid-tune `K:`/`M:`/`L:` lines become inline fields. Multi-voice tunes
and tunes without notes are skipped. `"control code"` holds each tune's form as IrishMAN writes it
(sections, bars, similarities; `abc_form.control_code`, whose docstring gives the rules).

| folder | usable tunes |
|---|---:|
{rows}
| all, before de-duplication | {n_all:,} |

**Split.** After de-duplication (two tunes that differ only in `R:` count once), a tune goes to
validation when the sha256 of its text without its `R:` line is below 5 in 100: `train.json` **{len(train):,}** tunes ({sum(map(len, train)):,} characters),
`validation.json` **{len(val):,}** tunes ({sum(map(len, val)):,} characters).

**Out of collection.** `essen.json`: the `essenFolksong` tunebooks of the same wheel
({sum(essen_counts.values()):,} usable tunes, {len(essen):,} after de-duplication,
{sum(map(len, essen)):,} characters), German and other European songs transcribed by other
hands. Never trained on; used to score how well a model reads unfamiliar tunes.
"""


def build_parser() -> Parser:
    parser = Parser(prog="python -m data.build_corpus", description=(
        "Build the default corpus from the folk tunebooks inside the music21 wheel, which pip downloads "
        "once into OUT/cache/. Writes OUT/train.json and OUT/validation.json (the training corpus, split "
        "95/5), OUT/essen.json (out-of-collection tunes, never trained on) and OUT/README.md (where "
        "the tunes come from, and how many)."))
    parser.add_argument("--out", default="data", help="the folder to write the corpus in (default: data)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let the four files above replace existing ones (default: off, an existing one is refused)")
    return parser


def build(args) -> None:
    if not args.out.strip():  # Path("") is the current folder
        raise UserError("--out '' names no folder; give one (data, say)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is not a folder; give a folder")
    *jsons, readme = [check_output(out / name, "--out", args.overwrite, named_by="folder")  # before the download
                      for name in OUTPUTS]
    wheel = fetch_wheel(out / "cache")
    tunes, counts = read_books(wheel, TRAINING_BOOKS)
    essen_tunes, essen_counts = read_books(wheel, OUT_OF_COLLECTION_BOOKS)
    train, val = split_train_validation(tunes)
    essen = list(dict.fromkeys(essen_tunes))
    texts = [corpus.irishman_json(records, [control_code(t) for t in records]) for records in (train, val, essen)]
    texts.append(provenance(counts, essen_counts, len(tunes), train, val, essen).encode())
    with contextlib.ExitStack() as files:  # all four or none: each becomes its path only once every one is written
        for path, text in zip([*jsons, readme], texts):
            files.enter_context(atomic_file(path, args.overwrite)).write(text)
    print(f"{len(train):,} training and {len(val):,} validation tunes, {len(essen):,} out-of-collection tunes in {out}/")


def main(argv: list[str] | None = None) -> int:
    return run_command(build, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
