"""
rendering: scores, MIDI and audio for ABC tunes, made by Debian's tools. Torch-free.

Holds:
- TOOLS: each tool, what it makes and the Debian package that brings it;
- render_tune: one tune -> score (abcm2ps SVG), MIDI (abc2midi), audio (fluidsynth WAV);
- render_tunebook, rendered_files, check_render: the same beside a tunebook (generate --render);
- find_soundfont, midi_seconds, trim_silence: what the audio step needs.

Every tool runs without a shell, on files in a folder of ours, with a timeout; a tool
that is missing costs its output only, and says which package would add it.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from abc_music import swung_as_hornpipe
from safe_write import OutputError, check_output

TOOLS = {  # what -> (program, Debian package)
    "score": ("abcm2ps", "abcm2ps"),
    "MIDI": ("abc2midi", "abcmidi"),
    "audio": ("fluidsynth", "fluidsynth timgm6mb-soundfont"),
}
SOUNDFONTS = ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/default-GM.sf2",
              "/usr/share/sounds/sf2/FluidR3_GM.sf2")
SCORE = ["abcm2ps", "-S", "-g"]  # SVG pages, in abcm2ps's secure mode
SAMPLE_RATE = 22050  # Hz: folk tunes lose nothing audible, and the files are half the size
TAIL = 0.5           # seconds kept after the last audible sample (the release of the last note)


def find_soundfont() -> str | None:
    """A General MIDI soundfont: $MUSICRNN_SOUNDFONT, else the first of Debian's that exists."""
    given = os.environ.get("MUSICRNN_SOUNDFONT")
    return next((p for p in ([given] if given else []) + list(SOUNDFONTS) if Path(p).is_file()), None)


def missing_tools() -> dict[str, str]:
    """what -> one line saying which package would add it, for each tool not installed."""
    missing = {what: package for what, (program, package) in TOOLS.items() if not shutil.which(program)}
    if "audio" not in missing and find_soundfont() is None:
        missing["audio"] = "timgm6mb-soundfont"
    if "MIDI" in missing:
        missing.setdefault("audio", TOOLS["MIDI"][1])  # audio is played from the MIDI file
    return {what: f"no {what}: apt-get install {package}" for what, package in missing.items()}


def run_tool(args: list[str], cwd: Path, timeout: float) -> bool:
    """Run one program (no shell) in cwd; False when it fails or runs out of time."""
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def for_abc2midi(abc: str) -> str:
    """The tune as abc2midi should read it: as written, without an R: line it reads as a hornpipe
    (abc_music.swung_as_hornpipe). abc2midi takes that line as an order to swing pairs of notes,
    then refuses every meter but 2/4 and 4/4 and miscounts bars (measured on the corpus: 33 of its
    first 80 hornpipes valid with the line, 79 without). Scores and downloads keep it."""
    lines = abc.splitlines(keepends=True)
    return "".join(line for line in lines if not (line.startswith("R:") and swung_as_hornpipe(line[2:])))


# -----------------------------------------------------------------------------
# one tune


def render_tune(abc: str, folder: Path, stem: str, timeout: float = 20.0) -> dict[str, Path]:
    """Write stem.abc and, where the tools are installed, stem.svg, stem.mid and stem.wav.

    Returns what -> path for the files made ("abc", "score", "MIDI", "audio").
    """
    made = {"abc": folder / f"{stem}.abc"}
    made["abc"].write_text(abc, encoding="utf-8")
    missing = missing_tools()
    if "score" not in missing:
        # its exit status is no guide: a line it had to squeeze ("Line too much shrunk") fails it, the score drawn
        run_tool([*SCORE, made["abc"].name, "-O", f"{stem}.svg"], folder, timeout)
        pages = sorted(folder.glob(f"{stem}[0-9][0-9][0-9].svg"))
        if pages:  # abcm2ps numbers its pages: the first holds a tune of a page or less
            made["score"] = pages[0].replace(folder / f"{stem}.svg")
    midi, played = folder / f"{stem}.mid", folder / f".{stem}.play.abc"
    played.write_text(for_abc2midi(abc), encoding="utf-8")
    if "MIDI" not in missing and run_tool(["abc2midi", played.name, "-o", midi.name], folder, timeout) \
            and midi.exists():
        made["MIDI"] = midi
        if "audio" not in missing and write_audio(midi, folder / f"{stem}.wav", timeout):
            made["audio"] = folder / f"{stem}.wav"
    played.unlink()
    return made


def write_audio(midi: Path, out: Path, timeout: float) -> bool:
    """MIDI -> WAV through fluidsynth and a General MIDI soundfont: mono, silence trimmed from the end.

    WAV and not Ogg (which fluidsynth also writes, ten times smaller): the trailing silence can
    only be cut, and the sound only checked, in a format the standard library reads."""
    command = ["fluidsynth", "-ni", "-q", "-F", out.name, "-r", str(SAMPLE_RATE), "-g", "0.7",
               str(find_soundfont()), midi.name]
    if not (run_tool(command, out.parent, timeout) and out.exists()):
        return False
    trim_silence(out)
    return True


def trim_silence(path: Path, threshold: float = 0.01) -> None:
    """Rewrite a WAV file as mono, cut TAIL seconds after its last sample above threshold (of
    full scale): fluidsynth plays on for 3 s of near-silence after the last note, in stereo that
    a solo tune does not need (half the bytes)."""
    with wave.open(str(path)) as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    samples = np.frombuffer(frames, dtype=np.int16).reshape(-1, params.nchannels)   # (frames, channels)
    mono = samples.astype(np.int32).mean(axis=1).astype(np.int16)                   # (frames,)
    loud = np.flatnonzero(np.abs(mono) > threshold * 32767)
    end = min(len(mono), (loud[-1] + 1 if len(loud) else 0) + int(TAIL * params.framerate))
    with wave.open(str(path), "wb") as w:
        w.setparams(params._replace(nchannels=1, nframes=end))
        w.writeframes(mono[:end].tobytes())


def midi_seconds(data: bytes) -> float:
    """How long a standard MIDI file plays: its last event, through its tempo changes."""
    division = struct.unpack(">H", data[12:14])[0]  # ticks per quarter note
    tempos, end, i = [(0, 500_000)], 0, 14          # microseconds per quarter note (MIDI's default)
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i + 4:i + 8])[0]
        if data[i:i + 4] == b"MTrk":
            end = max(end, _read_track(data[i + 8:i + 8 + length], tempos))
        i += 8 + length
    seconds, last_tick, tempo = 0.0, 0, 500_000
    for tick, new_tempo in sorted(tempos):
        tick = min(tick, end)
        seconds += (tick - last_tick) * tempo / division / 1e6
        last_tick, tempo = tick, new_tempo
    return seconds + (end - last_tick) * tempo / division / 1e6


def _read_track(track: bytes, tempos: list) -> int:
    """The tick of a track's last event; its tempo changes are appended to tempos."""
    j, tick, status = 0, 0, 0
    while j < len(track):
        delta, j = _varlen(track, j)
        tick += delta
        if track[j] & 0x80:
            status, j = track[j], j + 1
        if status == 0xFF:                            # meta event: type, length, data
            meta = track[j]
            n, j = _varlen(track, j + 1)
            if meta == 0x51:
                tempos.append((tick, int.from_bytes(track[j:j + 3], "big")))
            j += n
        elif status in (0xF0, 0xF7):                  # system exclusive: length, data
            n, j = _varlen(track, j)
            j += n
        else:                                         # a channel message: program change and pressure have 1 data byte
            j += 1 if status & 0xF0 in (0xC0, 0xD0) else 2
    return tick


def _varlen(data: bytes, i: int) -> tuple[int, int]:
    value = 0
    while True:
        value, i = (value << 7) | (data[i] & 0x7F), i + 1
        if data[i - 1] < 0x80:
            return value, i


# -----------------------------------------------------------------------------
# a tunebook (generate --render)


def rendered_files(path: Path, tunes: int | None = None) -> list[Path]:
    """The files beside this tunebook named as renders of its tunes, those that exist already:
    stem-N.mid, stem-N.wav and stem-N.svg for its tune X:N (N in 1..tunes, or any N). The "-" keeps
    each tunebook's names its own: set.abc's tune 11 and set1.abc's tune 1 would both be set11.mid."""
    number = re.compile(rf"{re.escape(path.stem)}-([1-9]\d*)\.(mid|wav|svg)")

    def written(name: str) -> bool:
        m = number.fullmatch(name)
        return m is not None and (tunes is None or int(m[1]) <= tunes)

    return sorted(p for p in path.parent.iterdir() if written(p.name)) if path.parent.is_dir() else []  # --out's
    # folder is made with the tunebook


def check_render(path: Path, tunes: int, overwrite: bool, inputs=()) -> list[Path]:
    """A render of this many tunes beside tunebook path replaces no file unless overwrite, and never
    one of the command's inputs (a model named tunes-2.mid, say), not even with overwrite. Returns
    the files an overwrite replaces or removes: every earlier render of this tunebook, a longer one's
    later tunes too (they would play tunes it no longer holds)."""
    old = rendered_files(path, tunes)
    if old and not overwrite:
        raise OutputError(f"--render would replace {old[0]}: pass --overwrite, or choose another --out")
    old = rendered_files(path) if overwrite else old
    for p in old:
        check_output(p, "--render", overwrite=True, inputs=inputs)
    return old


def render_tunebook(path: Path, overwrite: bool = False, timeout: float = 20.0, inputs=()) -> list[str]:
    """MIDI files (abc2midi), audio (fluidsynth) and SVG scores (abcm2ps, in its secure mode -S)
    beside a tunebook, where the tools are installed: stem-N.mid, stem-N.wav and stem-N.svg for its
    tune X:N. Returns one line per kind of file to show the user.

    Each tune is rendered alone (render_tune, timeout seconds a tool): a tune that a tool refuses, or
    aborts on, costs only that tune its file (a book rendered whole loses every later tune's MIDI when
    abc2midi aborts on one, and every score when abcm2ps overflows on one long tune).
    What a render may write is known before it runs (rendered_files): a file of one of those names
    that exists stops it (unless overwrite) before anything is written. The tools work in a scratch
    folder under names of their own, so that no name of the user's reaches their command lines (a
    leading "-" reads as an option); what they made then moves in under the tunebook's name. With
    overwrite, an earlier render's file that this one does not make anew (a tune now refused, or past
    the tunebook's end) is removed: it belonged to another tune. Nothing else beside the tunebook is
    touched."""
    folder, stem = path.parent, path.stem
    tunes = re.split(r"(?m)^(?=X:)", path.read_text(encoding="utf-8"))[1:]
    old = check_render(path, len(tunes), overwrite, inputs)
    made = {"MIDI": {}, "audio": {}, "score": {}}  # what -> {tune number: its file}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".render.") as scratch:
        for n, tune in enumerate(tunes, start=1):
            names = {"MIDI": f"{stem}-{n}.mid", "audio": f"{stem}-{n}.wav", "score": f"{stem}-{n}.svg"}
            (own := Path(scratch) / str(n)).mkdir()  # a folder a tune: no page of one is taken for the next's
            for what, file in render_tune(tune, own, "tune", timeout).items():
                if what in names:
                    made[what][n] = Path(file).replace(folder / names[what])
    for stale in set(old) - {p for files in made.values() for p in files.values()}:
        stale.unlink()
    missing = missing_tools()
    kinds = [("MIDI", "MIDI", "file", "-N.mid"), ("audio", "audio", "file", "-N.wav"),
             ("score", "SVG", "score", "-N.svg")]
    return [missing.get(what, f"{label}: {len(made[what])} {noun}{'s' * (len(made[what]) != 1)} {folder / stem}{names}"
                        + _none_for(made[what], len(tunes)))
            for what, label, noun, names in kinds]


def _none_for(files: dict[int, Path], tunes: int) -> str:
    """" (none for tunes 2, 5: ...)": the tunes a tool refused or ran out of time on, if any."""
    lacking = [str(n) for n in range(1, tunes + 1) if n not in files]
    them = "them" if len(lacking) > 1 else "it"
    return f" (none for tune{'s' * (len(lacking) > 1)} {', '.join(lacking)}: the tool refused {them} or ran out " \
           f"of time)" if lacking else ""
