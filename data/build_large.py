"""
Build data/large.json: a corpus about 15x the default, for measuring training at scale.

    python -m data.build_large            # (what `make data-large` runs) after `make data`

Every training tune in each of the 12 keys (shifts -5..+6 by abc_music.transpose_tune; a
shift that would take a note outside MIDI 0..127 is skipped), then every essen tune: about
60,000 tunes. Not committed; it is for scale measurements (README), not for a better model:
essen is the out-of-collection test set, so a model trained on this file cannot be scored on it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import corpus
from abc_music import TransposeError, transpose_tune


def twelve_keys(tunes: list[str]) -> tuple[list[str], int]:
    """Each tune at every shift -5..+6, and how many shifts were refused."""
    out, refused = [], 0
    for tune in tunes:
        for shift in range(-5, 7):
            try:
                out.append(transpose_tune(tune, shift, 0, 127))
            except TransposeError:
                refused += 1
    return out, refused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build data/large.json (training tunes in 12 keys, and essen).")
    parser.add_argument("--data", default="data", help="folder with train.json and essen.json (default: data)")
    args = parser.parse_args(argv)
    folder = Path(args.data)
    start = time.time()
    train, essen = corpus.load_tunes(str(folder / "train.json")), corpus.load_tunes(str(folder / "essen.json"))
    tunes, refused = twelve_keys(train)
    corpus.write_irishman_json(folder / "large.json", tunes + essen)
    chars = sum(map(len, tunes)) + sum(map(len, essen))
    print(f"{len(tunes) + len(essen):,} tunes ({len(train):,} in 12 keys, {refused} shifts refused; "
          f"{len(essen):,} essen), {chars:,} characters in {folder / 'large.json'} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
