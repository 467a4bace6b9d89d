"""
serve: a local page that writes, shows and plays tunes, backed by the exported ONNX model. Torch-free.

    make serve                                        # = python serve.py --model runs/musicrnn.onnx
    python serve.py --port 8080                       # then open http://127.0.0.1:8080/
    python serve.py --host 0.0.0.0                    # listen beyond this machine: only when asked

Pick a meter, a key, a temperature and a seed, press "Write tunes". Each tune comes back as
a score (abcm2ps SVG), a player (fluidsynth WAV, General MIDI soundfont), its ABC text, and
downloads of .abc, .svg, .mid and .wav, on a page with an address of its own (/tunes/<id>):
reloading it shows the same tunes, and writes none. Everything is made here; the page loads nothing from
elsewhere and runs no script. A missing tool costs only its part, and the page names the
Debian package that adds it.

Safe to leave running: it binds 127.0.0.1 unless --host says otherwise; every parameter is
checked (HTTP 400, the reason on the page); a request writes at most MAX_TUNES tunes of
MAX_TOKENS tokens and each tool gets RENDER_SECONDS; the server keeps the files of its last
KEEP_REQUESTS requests, at most KEEP_BYTES, in a folder of its own that it removes when it
stops, and serves nothing else; requests run in threads, at most MAX_ACTIVE at once, and one whose
client has closed its connection renders no more tunes.
"""

from __future__ import annotations

import cli  # first: Ctrl-C while the server's modules load is one line, as it is later
cli.quiet_interrupt_while_loading(__name__)

import argparse
import contextlib
import html
import re
import secrets
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
from argparse import ArgumentTypeError, Namespace
from decimal import Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import sampler
from abc_constraint import AbcConstraint, most_bars
from abc_music import playable_key
from cli import UserError
from exported_model import load_model, model_facts, onnx_step
from rendering import missing_tools, render_tune

MAX_TUNES = 8               # tunes per request
MAX_MESSAGE = 300           # characters of an error message on the page
MAX_TOKENS = 1000           # tokens per tune
MAX_FORM_BARS = most_bars(MAX_TOKENS, MAX_TOKENS)  # the bars of a form that MAX_TOKENS holds
MAX_BODY = 8 * 1024         # bytes of a form: its fields are a few dozen
MAX_DIGITS = 18             # of a size in a header: no file is larger, and int() refuses thousands of digits
MAX_DRAIN = 16 * 1024**2    # a larger body is read (and dropped) up to here, so the client sees the 413
RENDER_SECONDS = 20         # per tool and tune
KEEP_REQUESTS = 64          # requests whose pages and files are kept for their players and downloads
KEEP_BYTES = 256 * 1024**2  # and at most this many bytes of them
MAX_ACTIVE = 64             # requests in progress at once; more get 503
METERS = ["6/8", "4/4", "C|", "2/4", "3/4", "9/8", "12/8", "C", "3/2", "2/2", "3/8"]
KEYS = [root + mode for root in ("D", "G", "A", "E", "C", "F", "Bb", "B", "Eb", "F#", "C#")
        for mode in ("", "m", "dor", "mix") if playable_key(root + mode)]  # as the form's check reads them


def _ticked(text: str) -> bool:
    """A checkbox: a browser sends "on" when it is ticked and nothing when it is not."""
    if text not in ("on", ""):
        raise ArgumentTypeError(f"on (ticked) or empty, got {text[:40]}")
    return text == "on"


PLAIN_DIGITS = re.compile(r"-?\d+", re.ASCII)
BROWSER_NUMBER = re.compile(r"-?(\d+(\.\d+)?|\.\d+)([eE][-+]?\d+)?", re.ASCII)  # HTML's "valid floating-point number"


def _whole(read):
    """A whole-number field read as a browser's number input sends it: the text as typed, which
    HTML's number grammar lets be "1e3" or "8.0" for 1000 and 8, values the page's own check passes.
    Read exactly (a float would round 26 nines); plain digits go to read as typed, and one written
    with an exponent or a point is refused past 20 digits ("1e400") without writing them out."""
    def check(text: str):
        number = Decimal(text) if BROWSER_NUMBER.fullmatch(text) else None
        if number is not None and number == number.to_integral_value() and not PLAIN_DIGITS.fullmatch(text):
            if number and number.adjusted() >= 20:  # 0e400 is 0
                raise cli.too_many_digits(text, number.adjusted() + 1)
            text = str(int(number))
        return read(text)
    return check


FIELDS = {  # name -> how its text is read ("" for an optional field left empty: None)
    "meter": str, "key": str, "temperature": sampler.TEMPERATURE, "seed": _whole(sampler.SEED),
    "num": _whole(cli.int_in(1, MAX_TUNES)), "constrained": _ticked,
    "type": lambda text: text or None,
    "sections": lambda text, read=_whole(sampler.SECTIONS): read(text) if text else None,
    "bars": lambda text: text or None,
}
OPTIONAL = {"constrained", "type", "sections", "bars"}  # a browser leaves out an unticked box
DEFAULTS = {"meter": "6/8", "key": "D", "temperature": "1.0", "seed": "0", "num": "2", "constrained": "on",
            "type": "", "sections": "", "bars": ""}
CONTENT_TYPES = {".abc": "text/vnd.abc; charset=utf-8", ".svg": "image/svg+xml", ".mid": "audio/midi",
                 ".wav": "audio/wav"}
FILE_PATH = re.compile(r"/files/([0-9a-f]{32})/(tune[1-9]\.(?:abc|svg|mid|wav))")
TUNES_PATH = re.compile(r"/tunes/([0-9a-f]{32})")  # a request's page of tunes, kept with its files
TUNES_PAGE = "page.html"


class HTTPError(Exception):
    """A request the server refuses: the status and one line for the page."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


# -----------------------------------------------------------------------------
# a request: its fields -> sampling options


def read_form(body: bytes) -> dict[str, str]:
    """The form's fields, each at most once; a missing one is named."""
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "the form is not URL-encoded text") from None
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"unknown field: {unknown[0][:40]!r}")
    repeated = [f"{name} is given {len(values)} times" for name, values in fields.items() if len(values) > 1]
    if repeated:  # which one was meant is not ours to guess
        raise HTTPError(HTTPStatus.BAD_REQUEST, repeated[0])
    missing = [name for name in FIELDS if name not in fields and name not in OPTIONAL]
    if missing:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "missing field: " + ", ".join(missing))
    return {name: values[0] for name, values in fields.items()}


def sampling_options(form: dict[str, str]) -> tuple[sampler.SamplingOptions, str | None]:
    """The same checks as the command line's flags (sampler.sampling_options); and the tune
    type asked for, which only the model can check."""
    values = {}
    for name, read in FIELDS.items():
        try:
            values[name] = read(form.get(name, ""))
        except ArgumentTypeError as e:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"{name}: {e}") from None
    args = Namespace(prompt=None, top_k=None, max_tokens=MAX_TOKENS, max_bars=None, form=None, **values)
    with user_errors_as_bad_requests():
        bars = sum(sampler.form_bars(sampler.requested_form(args)))
        if bars > MAX_FORM_BARS:  # the command line would ask for more --max-tokens, which the page does not offer
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the page writes at most {MAX_FORM_BARS} bars a tune: "
                                                    f"{bars} are too many")
        return sampler.sampling_options(args), args.type


@contextlib.contextmanager
def user_errors_as_bad_requests():
    """The command line's own checks, worded for a form: "--key H#: ..." -> 400 "key H#: ..."."""
    try:
        yield
    except UserError as e:
        raise HTTPError(HTTPStatus.BAD_REQUEST, for_the_page(str(e))) from None


def sent_form(body: bytes) -> dict[str, str]:
    """The page's fields as a form filled them in (an unticked box is left out: empty); HTTPError if
    it cannot be read."""
    return {**DEFAULTS, "constrained": "", **read_form(body)}


def as_sent(body: bytes) -> dict[str, str]:
    """sent_form, or DEFAULTS where the form cannot be read."""
    try:
        return sent_form(body)
    except HTTPError:
        return dict(DEFAULTS)


def for_the_page(message: str) -> str:
    """A command line's message with its flags named as the page's fields: "--key" -> "key"; the page
    asks for a form by its sections and bars alone."""
    message = message.replace("--form or --sections/--bars", "sections and bars")
    message = re.sub(r"--form\b(?! [\"'S])", "the form asked for", message)  # not "--form 'S:2 ...'": a value
    return re.sub(r"--(?=(?:%s|form|max-tokens|prompt)\b)" % "|".join(FIELDS), "", message)


# -----------------------------------------------------------------------------
# the server: one model, one folder of files


class TuneServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = MAX_ACTIVE  # connections waiting to be accepted (the standard library's 5 drops bursts)

    def __init__(self, address: tuple[str, int], model: str, folder: Path):
        session, self.vocab, config = load_model(model)
        self.step, self.folder, self.facts = onnx_step(session, config), folder, model_facts(config)
        self.constraint = AbcConstraint(self.vocab, coded=self.facts.control_codes)  # its mask cache serves all
        self.generating = threading.Lock()            # one generation at a time: it holds the GIL anyway
        self.active = threading.BoundedSemaphore(MAX_ACTIVE)
        self.pruning = threading.Lock()               # guards busy, and the folders' removal
        self.busy: set[Path] = set()                  # folders of requests still rendering or sending
        self.keep_requests, self.keep_bytes = KEEP_REQUESTS, KEEP_BYTES
        self.missing = missing_tools()
        super().__init__(address, Handler)

    def handle_error(self, request, client_address) -> None:
        """A client that went away (a player dropping a WAV it had read enough of, a closed tab) is
        nothing to report; anything else is, as the standard library reports it."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, TimeoutError)):
            super().handle_error(request, client_address)

    def generate_tunes(self, opts: sampler.SamplingOptions, tune_type: str | None = None,
                       gone=lambda: False) -> list[str] | None:
        """The tunes; None where gone() says the client left while the request waited its turn (the
        first of a double click, say), so that no one waits for tunes nobody will see."""
        with self.generating, user_errors_as_bad_requests():
            if gone():
                return None
            opts, constraint = sampler.check_against_model(opts, self.vocab, self.facts, tune_type, self.constraint)
            return sampler.generate_tunes(self.step, self.vocab, opts, constraint, self.facts)

    @contextlib.contextmanager
    def request_folder(self):
        """A new folder for one request's files, (its name, its path): never pruned while the request
        renders into it and sends its page, and kept as the newest when it is done, whatever its size."""
        name = secrets.token_hex(16)
        folder = self.folder / name
        folder.mkdir()
        with self.pruning:
            self.busy.add(folder)
        try:
            yield name, folder
        finally:
            with self.pruning:
                self.busy.discard(folder)
                self.prune(newest=folder)

    def prune(self, newest: Path | None = None) -> None:
        """Keep newest and the newest keep_requests folders, within keep_bytes; folders of requests
        still at work are left alone (call with self.pruning held)."""
        done = [f for f in self.folder.iterdir() if f != newest and f not in self.busy]
        total = _bytes(newest) if newest else 0
        for n, folder in enumerate(sorted(done, key=lambda p: p.stat().st_mtime, reverse=True), start=bool(newest)):
            total += _bytes(folder)
            if n >= self.keep_requests or total > self.keep_bytes:
                shutil.rmtree(folder, ignore_errors=True)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """The one byte range a Range header asks for, as (first, last) within size; None: the whole
    file (no header, or one this server does not read: several ranges, a reversed one); False:
    a range that starts past the end (416)."""
    digits = rf"(\d{{0,{MAX_DIGITS}}})"
    m = re.fullmatch(f"bytes={digits}-{digits}", header.strip()) if header else None
    if not m or m.group(1) == m.group(2) == "":
        return None
    if m.group(1) == "":  # bytes=-N: the last N
        return (max(size - int(m.group(2)), 0), size - 1) if int(m.group(2)) and size else False
    first, last = int(m.group(1)), int(m.group(2)) if m.group(2) else size - 1
    if first >= size:
        return False
    return (first, min(last, size - 1)) if first <= last else None


def shown_size(digits: str) -> str:
    """A Content-Length as a message shows it: 12,345, or its number of digits past MAX_DIGITS."""
    return f"{int(digits):,}" if len(digits) <= MAX_DIGITS else f"a {len(digits):,}-digit number of"


def _bytes(folder: Path) -> int:
    """The size of a request's files; one being renamed by a tool right now counts as nothing."""
    total = 0
    for path in folder.iterdir():
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


class Handler(BaseHTTPRequestHandler):
    server: TuneServer
    timeout = 30                 # seconds a client may take to send its request
    protocol_version = "HTTP/1.1"

    def parse_request(self) -> bool:
        self.body_read, self.head_only = False, False  # each request on a kept-alive connection afresh
        if not super().parse_request():
            return False
        self.path = self.path.split("?", 1)[0]  # a query string (a bookmark's ?ref=) chooses nothing here
        return True

    def do_HEAD(self) -> None:
        self.head_only = True
        self.do_GET()

    def get_answer(self):
        """What a GET (or HEAD) of this path sends, as a call; None where this server has no such page."""
        if self.path in ("/", "/index.html"):
            return lambda: self.send_page(HTTPStatus.OK, DEFAULTS)
        if m := FILE_PATH.fullmatch(self.path):
            return lambda: self.send_file(self.server.folder / m.group(1) / m.group(2))
        if m := TUNES_PATH.fullmatch(self.path):
            return lambda: self.send_tunes_page(self.server.folder / m.group(1) / TUNES_PAGE)
        if self.path == "/favicon.ico":  # asked for by every browser: there is none
            return lambda: self.send_bytes(HTTPStatus.NO_CONTENT, "image/x-icon", b"")
        return None

    def do_GET(self) -> None:
        answer = self.get_answer()
        if answer is not None:
            answer()
        elif self.path == "/generate":  # the address bar after a form was sent: the form is posted, not got
            self.send_page(HTTPStatus.METHOD_NOT_ALLOWED, DEFAULTS, error="/generate answers the form: "
                                                                           "write the tunes from the page")
        else:
            self.no_such_page()

    def do_POST(self) -> None:
        if self.path != "/generate":
            if self.get_answer() is not None:  # a page to get, not to post to
                self.not_allowed()
            else:
                self.no_such_page()
            return
        try:  # read before taking a slot: clients slow to send their forms hold none
            body = self.read_body()
        except HTTPError as e:
            self.send_page(e.status, DEFAULTS, error=str(e))
            return
        if not self.server.active.acquire(blocking=False):  # the form as sent, to send again as it is
            self.send_page(HTTPStatus.SERVICE_UNAVAILABLE, as_sent(body), error="busy: try again in a moment")
            return
        try:
            self.generate(body)
        finally:
            self.server.active.release()

    def no_such_page(self) -> None:
        self.send_page(HTTPStatus.NOT_FOUND, DEFAULTS, error=f"no such page: {self.path[:80]}")

    def not_allowed(self) -> None:
        self.send_page(HTTPStatus.METHOD_NOT_ALLOWED, DEFAULTS, error=f"{self.command} is not a way to use this page")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = not_allowed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, an unknown method, headers
        too long) on this server's page, with its headers."""
        self.close_connection = True
        self.send_page(HTTPStatus(code), DEFAULTS, error=message or HTTPStatus(code).phrase)

    def generate(self, body: bytes) -> None:
        form = dict(DEFAULTS)
        try:
            form = sent_form(body)
            opts, tune_type = sampling_options(form)
            tunes = self.server.generate_tunes(opts, tune_type, gone=self.client_gone)
            if tunes is None:
                self.log_message("the client went away before its tunes were written")
                self.close_connection = True
                return
            note = sampler.form_note(opts, self.server.facts)
            with self.server.request_folder() as (name, folder):
                made = self.render(tunes, folder)
                if made is None:
                    self.close_connection = True
                    return
                tunes_page = self.page_text(form, tunes=(name, made), note=note and for_the_page(note))
                (folder / TUNES_PAGE).write_text(tunes_page, encoding="utf-8")
            # the tunes get an address of their own: a reload or the back button shows them again
            # instead of sending the form again, and the address can be kept (post, redirect, get)
            self.send_bytes(HTTPStatus.SEE_OTHER, "text/html; charset=utf-8",
                            f'<a href="/tunes/{name}">the tunes</a>'.encode(), {"Location": f"/tunes/{name}"})
        except HTTPError as e:
            self.send_page(e.status, form, error=str(e))
        except OSError as e:  # the server's own folder: a full disk, say
            self.send_page(HTTPStatus.INTERNAL_SERVER_ERROR, form, error=f"could not write the tunes' files: "
                                                                         f"{e.strerror or e}")

    def render(self, tunes: list[str], folder: Path) -> list[dict] | None:
        """Each tune's files, rendered while the client is there to see them; None once it has gone
        (a closed tab, say), so that the next request need not wait."""
        made = []
        for n, tune in enumerate(tunes, start=1):
            if self.client_gone():
                self.log_message("the client went away: %d of %d tunes rendered", n - 1, len(tunes))
                return None
            made.append(render_tune(sampler.tunebook([tune], first=n), folder, f"tune{n}", RENDER_SECONDS))
        return made

    def client_gone(self) -> bool:
        """The client has closed its end of the connection: what it sent is read, and the end of
        its stream (or a reset) is all that is left to read. A client that only stops sending
        (shutdown(SHUT_WR), nc -N) reads the same, and is taken as gone too, as nginx takes it."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:  # chunks are not read here; beside a length, it says where
            self.close_connection = True         # the body ends, and reading by the length would misread it
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "a form needs its Content-Length, without "
                                                        "Transfer-Encoding")
        if len(set(self.headers.get_all("Content-Length", []))) > 1:  # RFC 9112: which ends the body is unknown
            self.close_connection = True
            raise HTTPError(HTTPStatus.BAD_REQUEST, "a form needs one Content-Length, not two that differ")
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "a form needs its Content-Length")
        size = int(length) if len(length) <= MAX_DIGITS else None
        if size is None or size > MAX_BODY:
            if size is None:
                self.close_connection = True  # no body is that long: nothing to drain
            else:
                self.drain(size)
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the form has {shown_size(length)} bytes; "
                                                                  f"at most {MAX_BODY:,} are read")
        try:
            body = self.rfile.read(size)
        except TimeoutError:  # the client stopped sending within Handler.timeout
            body = b""
        if len(body) < size:
            self.close_connection = True
            raise HTTPError(HTTPStatus.REQUEST_TIMEOUT, f"the form did not arrive in full: {len(body):,} of "
                                                        f"{size:,} bytes")
        self.body_read = True
        return body

    def drain(self, length: int) -> None:
        """Read and drop a body too large to use, so the client reads the answer; past
        MAX_DRAIN, the connection is closed instead."""
        self.close_connection = True
        left = min(length, MAX_DRAIN)
        while left > 0:
            try:
                chunk = self.rfile.read(min(left, 1 << 16))
            except TimeoutError:  # the client stopped sending: it gets the 413 all the same
                break
            if not chunk:
                break
            left -= len(chunk)

    def send_file(self, path: Path) -> None:
        """The file, or the one byte range asked for (Range: bytes=a-b), so that a player can seek."""
        if not path.is_file():
            self.send_page(HTTPStatus.NOT_FOUND, DEFAULTS, error="that file is gone: write the tunes again")
            return
        data, kind = path.read_bytes(), CONTENT_TYPES[path.suffix]
        span = byte_range(self.headers.get("Range"), len(data))
        if span is None:
            self.send_bytes(HTTPStatus.OK, kind, data, {"Accept-Ranges": "bytes"})
        elif not span:
            self.send_bytes(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, kind, b"",
                            {"Content-Range": f"bytes */{len(data)}"})
        else:
            first, last = span
            self.send_bytes(HTTPStatus.PARTIAL_CONTENT, kind, data[first:last + 1],
                            {"Accept-Ranges": "bytes", "Content-Range": f"bytes {first}-{last}/{len(data)}"})

    def send_tunes_page(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError:  # pruned (or never written): its files went with it
            self.send_page(HTTPStatus.NOT_FOUND, DEFAULTS, error=f"those tunes are gone: the server keeps the "
                                                                 f"newest {self.server.keep_requests} requests' "
                                                                 f"tunes, within {self.server.keep_bytes >> 20:,} "
                                                                 f"MB; write them again")
            return
        self.send_bytes(HTTPStatus.OK, "text/html; charset=utf-8", data)

    def send_page(self, status: HTTPStatus, form: dict, tunes=None, error: str | None = None,
                  note: str | None = None) -> None:
        self.send_bytes(status, "text/html; charset=utf-8", self.page_text(form, tunes, error, note).encode())

    def page_text(self, form: dict, tunes=None, error: str | None = None, note: str | None = None) -> str:
        return page(form, tunes, error, self.server.missing, self.server.facts.tune_types, note)

    def send_bytes(self, status: HTTPStatus, content_type: str, data: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "POST" if self.path == "/generate" else "GET, HEAD")
        sent = getattr(self, "headers", None) or {}  # none where the request line itself was refused
        unread = not getattr(self, "body_read", False) and (sent.get("Content-Length", "0").strip() != "0"
                                                            or "Transfer-Encoding" in sent)
        if self.close_connection or unread:
            self.close_connection = True  # a body left unread would be read as the next request
            self.send_header("Connection", "close")
        self.end_headers()
        if not getattr(self, "head_only", False):
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client went away (a player that read
                self.close_connection = True                 # enough of a WAV): nothing to answer, no traceback


# -----------------------------------------------------------------------------
# the page: a form, then each tune's score, player, text and downloads


STYLE = """body{font-family:sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem}
form{display:flex;flex-wrap:wrap;gap:.8rem;align-items:end}label{display:flex;flex-direction:column;font-size:.9rem}
input{width:6rem}.error{color:#a00;font-weight:bold}.missing{color:#666}
.tune{border-top:1px solid #ccc;margin-top:1rem}.downloads{display:flex;gap:1rem;align-items:center}.score{max-width:100%;background:#fff}
pre{background:#f4f4f4;padding:.5rem;overflow-x:auto}"""


def page(form: dict, tunes, error: str | None, missing: dict[str, str], types: tuple = (),
         note: str | None = None) -> str:
    title = "musicrnn: refused" if error else "musicrnn"  # what a screen reader or a tab says first
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title}</title>"
             f'<meta name=viewport content="width=device-width,initial-scale=1">'  # a phone's width, not 980px
             f"<style>{STYLE}</style></head><body><h1>musicrnn: new folk tunes</h1>", form_html(form, types)]
    if error:  # a long message cut: a field's value comes back in it
        error = re.sub(r"\S{60,}", lambda m: m.group()[:40] + "...", error)  # a long value, not what is said of it
        error = error if len(error) <= MAX_MESSAGE else error[:MAX_MESSAGE] + "..."
        parts.append(f'<p class=error id=error role=alert>{shown(error)}</p>')
    if note:
        parts.append(f'<p class=note id=note>{html.escape(note)}</p>')
    if missing:
        parts.append("<p class=missing>" + "; ".join(html.escape(line) for line in missing.values()) + "</p>")
    if tunes:
        folder, made = tunes
        parts.append(f"<p class=made-with id=made-with>{html.escape(made_with(form))}</p>")
        parts += [tune_html(n, folder, files) for n, files in enumerate(made, start=1)]
    return "".join(parts) + "</body></html>"


def made_with(form: dict) -> str:
    """The settings that wrote the tunes shown, in words: the form above them may be changed since (or
    restored by the browser's back button with other values), the caption stays the tunes' own."""
    form = {**DEFAULTS, **form}
    words = [f"M:{form['meter']}", f"K:{form['key']}"] + [form["type"]] * bool(form["type"])
    if form["sections"]:
        words.append(f"{form['sections']} sections of {form['bars']} bars")
    words += [f"temperature {form['temperature']}", f"seed {form['seed']}",
              "constrained" if form.get("constrained") == "on" else "free"]
    return "written with " + ", ".join(words)


def shown(text: str) -> str:
    """Text as the page shows it: HTML-escaped, control characters as \\x00 (a value sent with them
    comes back in the message and the form; a raw NUL makes the page invalid HTML)."""
    return html.escape(re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text))


def form_html(form: dict, types: tuple = ()) -> str:
    form = {**DEFAULTS, **form}  # the optional fields a request left out, shown empty
    def select(name, options, label=None):
        if form[name] not in options:  # a value the page does not list, but took: shown as sent
            options = (*options, form[name])
        items = "".join(f"<option value=\"{shown(o)}\"{' selected' * (o == form[name])}>"
                        f"{shown(label(o) if label else o)}</option>" for o in options)
        return f"<label>{name}<select name={name} id={name}>{items}</select></label>"

    def number(name, low, high, step):
        return (f'<label>{name}<input type=number name={name} id={name} min={low} max={high} step={step} '
                f'value="{shown(form[name])}"></label>')

    checked = " checked" * (form.get("constrained") == "on")
    bars = (f'<label>bars<input name=bars id=bars maxlength=100 placeholder="8, or 8,16 a section each" '
            f'value="{shown(form["bars"])}"></label>')
    return (f"<form method=post action=/generate>{select('meter', METERS)}{select('key', KEYS)}"
            f"{select('type', ('',) + tuple(types), lambda o: o or 'any')}"
            f"{number('sections', 1, sampler.MAX_SECTIONS, 1)}{bars}"
            f"{number('temperature', 0.01, 100, 'any')}{number('seed', 0, 2**32 - 1, 1)}"
            f"{number('num', 1, MAX_TUNES, 1)}<label>constrained<input type=checkbox name=constrained "
            f"id=constrained{checked}></label><button id=write>Write tunes</button></form>")


def tune_html(n: int, folder: str, files: dict[str, Path]) -> str:
    """Heading, player and downloads, then the score, then the ABC text."""
    url = {what: f"/files/{folder}/{path.name}" for what, path in files.items()}
    text = files["abc"].read_text(encoding="utf-8")
    parts = [f"<section class=tune id=tune-{n}><h2>Tune {n}</h2><p class=downloads>"]
    if "audio" in url:
        parts.append(f'<audio class=player controls preload=metadata aria-label="tune {n}" src="{url["audio"]}">'
                     f'</audio> ')
    # saved as musicrnn-<request>-tune1.abc: one request's downloads never take another's names
    parts += [f'<a download="musicrnn-{folder[:8]}-{path.name}" href="{url[what]}" '
              f'aria-label="tune {n} as {path.suffix}">{path.suffix}</a> ' for what, path in files.items()]
    parts.append("</p>")
    if "score" in url:
        parts.append(f'<img class=score src="{url["score"]}" alt="score of tune {n}">')
    return "".join(parts) + f"<pre class=abc>{html.escape(text)}</pre></section>"


# -----------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="serve.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="runs/musicrnn.onnx",
                        help="the exported model, made by export.py (default: runs/musicrnn.onnx)")
    parser.add_argument("--host", default="127.0.0.1", type=_address,
                        help="the address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=cli.int_in(0, 65535), default=8000,
                        help="the port to listen on (default 8000; 0: any free port, printed at start)")
    return parser


def _address(text: str) -> str:
    """--host: an empty one would listen on every interface, which only 0.0.0.0 should ask for."""
    if not text.strip():
        raise ArgumentTypeError("give an address: 127.0.0.1 for this machine, 0.0.0.0 for every interface")
    return text


def serve(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, _stop)
    with tempfile.TemporaryDirectory(prefix="musicrnn-serve.") as folder:
        try:
            server = TuneServer((args.host, args.port), args.model, Path(folder))
        except OSError as e:
            raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
        host, port = server.server_address[:2]
        print(f"serving http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        with server:
            server.serve_forever()


def _stop(signum, frame) -> None:
    """SIGTERM (`kill`, a service manager) stops the server as Ctrl-C does, through the with blocks,
    so that its folder of tunes is removed: the default action would leave it behind."""
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    return cli.run_command(serve, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
