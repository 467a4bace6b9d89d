"""
Build data/large.json: a corpus about 15x the default, for measuring training at scale.

    python -m data.build_large [--data data] [--overwrite]    # `make data-large` runs it, after `make data`

Every training tune in each of the 12 keys (shifts -5..+6 by abc_music.transpose_tune; a
shift that would take a note outside MIDI 0..127 is skipped), then every essen tune: about
60,000 tunes. Not committed; it is for scale measurements (README), not for a better model:
essen is the out-of-collection test set, so a model trained on this file cannot be scored on it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python data/build_large.py): the modules it uses are a folder up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import corpus
from abc_music import RewriteError, transpose_tune
from cli import Parser, UserError, run_command
from safe_write import check_output


def twelve_keys(tunes: list[str]) -> tuple[list[str], int]:
    """Each tune at every shift -5..+6, and how many shifts were refused."""
    out, refused = [], 0
    for tune in tunes:
        for shift in range(-5, 7):
            try:
                out.append(transpose_tune(tune, shift, 0, 127))
            except RewriteError:
                refused += 1
    return out, refused


def build_parser() -> Parser:
    parser = Parser(prog="python -m data.build_large", description=(
        "Build DATA/large.json from DATA/train.json (every tune in 12 keys) and DATA/essen.json "
        "(every tune as it is), for measuring training at scale."))
    parser.add_argument("--data", default="data",
                        help="the folder that holds train.json and essen.json, and gets large.json (default: data)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let large.json replace an existing one (default: off, an existing one is refused)")
    return parser


def build(args) -> None:
    if not args.data.strip():  # Path("") is the current folder
        raise UserError("--data '' names no folder; give one (data, say)")
    folder = Path(args.data)
    if not folder.is_dir():  # checked first, to say what the folder should hold
        raise UserError(f"--data {folder}: not a folder (it should hold train.json and essen.json; `make data` writes them)")
    inputs = [folder / "train.json", folder / "essen.json"]
    out = check_output(folder / "large.json", "--data", args.overwrite, inputs=inputs, named_by="folder")
    start = time.time()
    train, essen = (corpus.load_tunes(str(path)) for path in inputs)
    tunes, refused = twelve_keys(train)
    corpus.write_irishman_json(out, tunes + essen, overwrite=args.overwrite)
    chars = sum(map(len, tunes)) + sum(map(len, essen))
    print(f"{len(tunes) + len(essen):,} tunes ({len(train):,} in 12 keys, {refused} shifts refused; "
          f"{len(essen):,} essen), {chars:,} characters in {out} ({time.time() - start:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    return run_command(build, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
