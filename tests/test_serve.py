"""The page (serve.py) in a real browser, its audio, and requests that must be refused."""

import contextlib
import html
import os
import http.client
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, one_error_line, run_main

import abc_form
import rendering
import serve
from judging import check_with_abc2midi

VALID_FORM = {"meter": "6/8", "key": "D", "temperature": "1.0", "seed": "0", "num": "2", "constrained": "on"}
needs = {tool: pytest.mark.skipif(not shutil.which(tool), reason=f"{tool} not installed (apt-get install {package})")
         for tool, package in [("abc2midi", "abcmidi"), ("abcm2ps", "abcm2ps"), ("fluidsynth", "fluidsynth"),
                               ("chromium", "chromium"), ("chromedriver", "chromium-driver")]}
needs_soundfont = pytest.mark.skipif(rendering.find_soundfont() is None,
                                     reason="no soundfont (apt-get install timgm6mb-soundfont)")


def start_server(model: Path, temp: Path) -> tuple[subprocess.Popen, str]:
    """serve.py in a process of its own, its temporary folder under `temp`, with torch made
    unimportable there: (the process, its address)."""
    code = "import sys; sys.modules['torch'] = None; import serve; sys.exit(serve.main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", str(model), "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(temp)})
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        pytest.fail("serve.py did not start: " + line + proc.stderr.read())
    return proc, line.split()[1].rstrip("/")


@pytest.fixture(scope="module")
def server(tiny_onnx, tmp_path_factory):
    proc, url = start_server(tiny_onnx, tmp_path_factory.mktemp("serve-temp"))
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_stopped_by_kill_the_server_removes_its_folder_of_tunes(tiny_onnx, tmp_path):
    proc, url = start_server(tiny_onnx, tmp_path)
    status, _, _ = request(url + "/generate", form(num="1"))
    assert status == 200 and len(list(tmp_path.glob("musicrnn-serve.*/**/*.abc"))) == 1
    proc.terminate()  # SIGTERM, as `kill` and service managers stop a server
    assert proc.wait(timeout=10) == 0
    assert list(tmp_path.glob("musicrnn-serve.*")) == []


def request(url: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, or of a POST when body is given."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def form(**change) -> bytes:
    fields = {**VALID_FORM, **change}
    return "&".join(f"{k}={urllib.request.quote(v)}" for k, v in fields.items() if v is not None).encode()


def error_on_page(page: bytes) -> str:
    m = re.search(rb"<p class=error id=error role=alert>([^<]*)</p>", page)
    return html.unescape(m.group(1).decode()) if m else ""


# --- a real browser


@needs["chromium"]
@needs["chromedriver"]
@needs["abcm2ps"]
@needs["abc2midi"]
@needs["fluidsynth"]
@needs_soundfont
def test_a_browser_writes_two_jigs_in_d_and_shows_plays_and_prints_them(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(server + "/")
        Select(driver.find_element(By.ID, "meter")).select_by_visible_text("6/8")
        Select(driver.find_element(By.ID, "key")).select_by_visible_text("D")
        num = driver.find_element(By.ID, "num")
        num.clear()
        num.send_keys("2")
        assert driver.find_element(By.ID, "constrained").is_selected()  # on by default
        driver.find_element(By.ID, "write").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "section.tune")) == 2)
        for tune in driver.find_elements(By.CSS_SELECTOR, "section.tune"):
            score = tune.find_element(By.CSS_SELECTOR, "img.score")
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", score) > 0
            source = tune.find_element(By.CSS_SELECTOR, "audio.player").get_attribute("src")
            status, kind, audio = request(source)
            assert status == 200 and kind == "audio/wav" and audio[:4] == b"RIFF" and len(audio) > 10_000
            text = tune.find_element(By.CSS_SELECTOR, "pre.abc").text
            assert "M:6/8" in text and "K:D" in text and check_with_abc2midi(text)["valid"], text
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        driver.quit()


# --- sound


@needs["abc2midi"]
@needs["fluidsynth"]
@needs_soundfont
def test_audio_is_sound_as_long_as_the_midi_says(fixture_tunes, tmp_path):
    made = rendering.render_tune(fixture_tunes[0], tmp_path, "jig")
    midi = rendering.midi_seconds(made["MIDI"].read_bytes())
    with wave.open(str(made["audio"])) as w:
        seconds = w.getnframes() / w.getframerate()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(float)
    assert np.sqrt(np.mean(samples ** 2)) > 0.01 * 32767   # not silence: RMS above 1% of full scale
    assert midi > 10 and abs(seconds - midi) <= 0.1 * midi, (seconds, midi)


@needs["abc2midi"]
def test_midi_seconds_reads_tempo_and_length(tmp_path):
    # 4 bars of 4/4 at 120 crotchets a minute last 8 seconds (abc2midi adds a few ms); at 60, twice that
    seconds = {}
    for tempo in (120, 60):
        abc = f"X:1\nM:4/4\nL:1/4\nQ:1/4={tempo}\nK:C\nCDEF|GABc|cBAG|FEDC|]\n"
        made = rendering.render_tune(abc, tmp_path, f"t{tempo}")
        seconds[tempo] = rendering.midi_seconds(made["MIDI"].read_bytes())
    assert seconds[120] == pytest.approx(8.0, rel=0.005) and seconds[60] == pytest.approx(2 * seconds[120])


def test_without_the_tools_the_page_still_shows_the_abc_and_names_the_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    missing = rendering.missing_tools()
    assert set(missing) == {"score", "MIDI", "audio"}
    made = rendering.render_tune("X:1\nM:4/4\nL:1/4\nK:C\nCDEF|]\n", tmp_path, "tune1")
    assert set(made) == {"abc"}
    page = serve.page(VALID_FORM, ("0" * 32, [made]), None, missing)
    assert "<pre class=abc>X:1\nM:4/4" in page and "<img" not in page and "<audio" not in page
    assert "apt-get install abcm2ps" in page and "apt-get install abcmidi" in page


# --- what the server refuses, and that it keeps serving


@pytest.mark.parametrize("body, status, message", [
    (form(temperature="0"), 400, "temperature: must be a number at least 0.01"),
    (form(num="1000"), 400, "num: must be a whole number from 1 to 8"),
    (form(key="H#"), 400, "key H#: not a key"),
    (form(seed=None), 400, "missing field: seed"),
    (form(meter="7/0"), 400, "meter 7/0: not a meter"),
    (form(tempo="fast"), 400, "unknown field: 'tempo'"),
    (form(sections="9", bars="8"), 400, "sections: must be a whole number from 1 to 8"),
    (form(sections="2", bars="40"), 400, "bars 40: bars per section must be 1 to 32"),
    (form(type="polka"), 400, "type polka: unknown to this model; it knows reel"),
    (b"\xff\xfe", 400, "not URL-encoded"),
    (form(sections="2", bars="\u00b2"), 400, "bars \u00b2: one number, or 2 numbers"),  # a digit to isdigit(), not to int()
    (form(constrained="true"), 400, "constrained: on (ticked) or empty"),
    (form() + b"&meter=3%2F4", 400, "meter is given 2 times"),
    (form() + b"&seed=1&seed=2&seed=3&num=1", 400, "seed is given 4 times"),
    (form(key="D\nM:3/4"), 400, "not a key"),
    (form(sections="8", bars="32"), 400, "the page writes at most 40 bars a tune: 256 are too many"),
    (b"x" * 10 * 1024**2, 413, "the form has 10,485,760 bytes"),
    (form(sections="1", bars="9" * 4400), 400, "bars per section must be 1 to 32"),  # int() refuses 4,300 digits
    (form(seed="9" * 5000), 400, "seed: '99999"),
    (form(temperature="1_0"), 400, "temperature: '1_0' is not a number"),  # Python's reading, no browser's
    (form(num="\u0663"), 400, "num: '\u0663' is not a whole number"),  # an Arabic-Indic 3
])
def test_a_bad_request_gets_a_clean_4xx_and_the_server_keeps_serving(server, body, status, message):
    got, kind, page = request(server + "/generate", body)
    assert (got, kind) == (status, "text/html; charset=utf-8") and message in error_on_page(page), page[-300:]
    assert request(server + "/")[0] == 200


def test_a_long_value_comes_back_cut_and_a_control_character_escaped(server):
    _, _, page = request(server + "/generate", form(temperature="7" * 5000))
    assert error_on_page(page).startswith("temperature: '77777") and len(error_on_page(page)) < 100
    _, _, page = request(server + "/generate", form(meter="6/8\x00"))
    assert "\\x00" in error_on_page(page) and b"\x00" not in page  # the form shows the value it refused so too
    assert b'<option value="6/8\\x00" selected>' in page
    _, _, page = request(server + "/generate", form(type="\x1b\x07", bars="8\x00"))
    assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", page)


@pytest.mark.parametrize("header", ["Content-Length: " + "9" * 5000, "Range: bytes=0-" + "9" * 5000])
def test_a_number_of_thousands_of_digits_in_a_header_is_answered_not_a_traceback(tiny_onnx, tmp_path, capfd,
                                                                                   header):
    with in_process(tiny_onnx, tmp_path) as (_, url):
        _, _, page = request(url + "/generate", form(num="1"))
        file = re.search(rb'href="(/files/[0-9a-f]{32}/tune1\.abc)"', page).group(1).decode()
        method, path = ("POST", "/generate") if "Length" in header else ("GET", file)
        received = raw_exchange(url, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode())
        assert statuses(received) == ([413] if "Length" in header else [200]), received[:300]
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_slow_to_send_its_form_holds_no_slot(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "MAX_ACTIVE", 1)
    with in_process(tiny_onnx, tmp_path) as (tune_server, url):
        with socket.create_connection(tune_server.server_address[:2], timeout=5) as slow:
            slow.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nmeter=6")
            time.sleep(0.5)  # its handler waits for the rest of the form
            status, _, page = request(url + "/generate", form(num="1"))
            assert status == 200, error_on_page(page)


@pytest.mark.parametrize("method, path, allow", [("PUT", "/generate", "POST"), ("DELETE", "/", "GET, HEAD"),
                                                 ("OPTIONS", "/", "GET, HEAD"), ("POST", "/", "GET, HEAD"),
                                                 ("POST", "/tunes/" + "0" * 32, "GET, HEAD"),
                                                 ("POST", "/files/" + "0" * 32 + "/tune1.abc", "GET, HEAD")])
def test_another_method_gets_405_on_the_servers_own_page(server, method, path, allow):
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=10)
    connection.request(method, path, body=b"x")
    answer = connection.getresponse()
    assert (answer.status, answer.getheader("Allow")) == (405, allow)
    assert answer.getheader("Content-Security-Policy") and b"not a way to use this page" in answer.read()


def test_the_standard_librarys_own_refusals_come_on_the_servers_page(server):
    received = raw_exchange(server, b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(received) == [501] and b"Content-Security-Policy" in received and b"<h1>musicrnn" in received


def raw_exchange(server: str, data: bytes, wait: float = 10) -> bytes:
    """Send these bytes as they are, then read what comes back until the server closes or goes quiet."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(1 << 16):
                received += chunk
    return received


def statuses(received: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"^HTTP/1.1 (\d{3}) ", received, re.M)]


@pytest.mark.parametrize("first, status", [
    (b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\nmeter=6%2F8&x", 404),  # no such page
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\nmeter=6%2F8&x", 200),       # a GET with a body
    (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1\xb2\r\n\r\nmeter=6%2F8&x", 411),  # no length
    (b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 23\r\n\r\n"
     b"d\r\nmeter=6%2F8&x\r\n0\r\n\r\n", 411),  # chunked beside a length: read by the length, it misreads
    (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 35\r\n\r\n"
     b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # two lengths: which one ends the body is unknown
])
def test_a_body_the_server_does_not_read_is_never_read_as_the_next_request(server, first, status):
    received = raw_exchange(server, first + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(received) == [status] and b"Connection: close" in received, received[:300]


def test_a_length_that_is_not_ascii_digits_gets_a_411(server):
    received = raw_exchange(server, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n")
    assert statuses(received) == [411] and b"Content-Length" in received


@contextlib.contextmanager
def in_process(tiny_onnx, folder):
    """(a TuneServer serving from a thread of this process, its URL): a test can reach into it."""
    tune_server = serve.TuneServer(("127.0.0.1", 0), str(tiny_onnx), folder)
    threading.Thread(target=tune_server.serve_forever, daemon=True).start()
    try:
        yield tune_server, "http://%s:%d" % tune_server.server_address[:2]
    finally:
        tune_server.shutdown()
        tune_server.server_close()


def test_a_body_shorter_than_its_length_gets_a_4xx_not_a_500(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(serve.Handler, "timeout", 1)  # seconds a client may take to send its request
    with in_process(tiny_onnx, tmp_path) as (_, url):
        body = form()
        request_text = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) + 100}\r\n\r\n"
        received = raw_exchange(url, request_text.encode() + body)
        assert statuses(received) == [408] and b"did not arrive" in received, received[-300:]


def test_a_large_form_whose_body_never_comes_gets_its_413_not_a_500(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(serve.Handler, "timeout", 1)  # seconds a client may take to send its request
    with in_process(tiny_onnx, tmp_path) as (_, url):
        request_text = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * serve.MAX_BODY}\r\n\r\n"
        received = raw_exchange(url, request_text.encode())
        assert statuses(received) == [413] and b"the form has" in received, received[-300:]


def test_a_player_can_seek_a_file_by_its_byte_ranges(server):
    _, _, page = request(server + "/generate", form(num="1"))
    link = re.findall(rb'href="(/files/[^"]+\.abc)"', page)[0].decode()
    whole = urllib.request.urlopen(server + link, timeout=30)
    data = whole.read()
    assert whole.headers["Accept-Ranges"] == "bytes" and len(data) > 20

    def ranged(spec):
        req = urllib.request.Request(server + link, headers={"Range": spec})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers["Content-Range"], r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Range"], e.read()

    assert ranged("bytes=5-14") == (206, f"bytes 5-14/{len(data)}", data[5:15])
    assert ranged("bytes=-4") == (206, f"bytes {len(data) - 4}-{len(data) - 1}/{len(data)}", data[-4:])
    assert ranged(f"bytes={len(data)}-")[:2] == (416, f"bytes */{len(data)}")
    assert ranged("bytes=9-3")[0] == 200  # a reversed range is ignored: the whole file


def test_a_client_that_goes_away_mid_request_leaves_no_traceback(tiny_onnx, tmp_path, capfd):
    with in_process(tiny_onnx, tmp_path) as (tune_server, url):
        host, port = tune_server.server_address[:2]
        for _ in range(3):  # a reset while the server waits for the request line
            sock = socket.create_connection((host, port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            sock.sendall(b"GET / HT")
            sock.close()
        assert request(url + "/favicon.ico")[0] == 204  # and the server still answers
    assert "Traceback" not in capfd.readouterr().err


def send_form(address: tuple, body: bytes) -> socket.socket:
    """A connection that has sent this form to /generate, as a browser does; the caller closes it."""
    sock = socket.create_connection(address[:2], timeout=5)
    sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def server_log_until(capfd, words: str) -> str:
    """The server's log (stderr) read until it holds these words, or for 10 s."""
    log = ""
    for _ in range(100):
        log += capfd.readouterr().err
        if words in log:
            break
        time.sleep(0.1)
    return log


def test_a_request_whose_client_went_away_renders_nothing_more(tiny_onnx, tmp_path, monkeypatch, capfd):
    rendered = []
    real_render = serve.render_tune
    monkeypatch.setattr(serve, "render_tune", lambda abc, folder, stem, timeout: rendered.append(stem)
                        or real_render(abc, folder, stem, timeout))
    generating, closed = threading.Event(), threading.Event()
    real_generate = serve.sampler.generate_tunes

    def generate(*args, **kwargs):  # the first request's client leaves while its tunes are written
        if not generating.is_set():
            generating.set()
            closed.wait(10)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(serve.sampler, "generate_tunes", generate)
    with in_process(tiny_onnx, tmp_path) as (tune_server, url):
        with send_form(tune_server.server_address, form(num="4")):
            assert generating.wait(30)
        closed.set()  # as a closed tab closes it
        status, _, page = request(url + "/generate", form(num="2"))
        assert status == 200 and page.count(b"<pre class=abc>") == 2
        log = server_log_until(capfd, "went away")
    assert "the client went away: 0 of 4 tunes rendered" in log
    assert rendered == ["tune1", "tune2"]  # the second request's two; none of the first's four


def test_the_page_shows_that_a_form_is_held_only_when_constrained(server):
    _, _, page = request(server + "/generate", form(constrained=None, sections="2", bars="8", num="1"))
    assert "only constrained holds it to the form asked for" in html.unescape(page.decode())


def test_the_page_names_its_own_fields_in_a_note_not_the_command_lines_flags():
    note = "it reads S:2 B:8 E:3 B:8 (--form or --sections/--bars for another); only --constrained holds it to --form"
    assert serve.for_the_page(note) == ("it reads S:2 B:8 E:3 B:8 (sections and bars for another); only constrained "
                                        "holds it to the form asked for")


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/files/../../etc/passwd", "/files/%2e%2e/serve.py",
                                  "/serve.py", "/files/" + "0" * 32 + "/tune1.wav"])
def test_nothing_outside_its_own_files_is_served(server, path):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)  # sent as written: no client-side clean-up of ..
    response = conn.getresponse()
    assert response.status == 404 and b"root:" not in response.read()
    conn.close()
    assert request(server + "/")[0] == 200


def test_a_value_the_page_does_not_list_is_shown_as_sent(server):
    status, _, page = request(server + "/generate", form(meter="12/16", key="Emin", num="1"))
    assert status == 200, error_on_page(page)
    assert b'<option value="12/16" selected>' in page and b'<option value="Emin" selected>' in page


def test_getting_the_forms_address_is_405_with_allow_post(server):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/generate")  # the address bar, after a form was sent
    response = conn.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST"
    assert b"write the tunes from the page" in response.read()
    conn.close()


def test_concurrent_requests_each_get_their_own_tunes(server):
    results = [None] * 6

    def write(i):
        results[i] = request(server + "/generate", form(seed=str(i), num="1"))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 for status, _, _ in results)
    texts = {re.search(rb"<pre class=abc>(.*?)</pre>", page, re.S).group(1) for _, _, page in results}
    assert len(texts) == len(results)  # six seeds, six different tunes


def test_a_type_and_a_form_on_the_page_give_tunes_of_that_type_and_form(server):
    status, _, page = request(server + "/generate", form(type="reel", sections="2", bars="4", meter="C|"))
    assert status == 200, error_on_page(page)
    texts = [html.unescape(t.decode()) for t in re.findall(rb"<pre class=abc>(.*?)</pre>", page, re.S)]
    assert len(texts) == 2 and all(t.split("\n")[1] == "R:reel" for t in texts)
    assert all([s.bars for s in abc_form.sections(t)] == [4, 4] for t in texts)
    assert b'<option value="reel">reel</option>' in request(server + "/")[2]  # the model's types, offered


def test_a_whole_number_as_a_browser_may_send_it_is_read_as_that_number():
    """A number input sends what was typed: "1e3" passes the page's own check for seed (step 1)."""
    opts, _ = serve.sampling_options({**VALID_FORM, "seed": "1e3", "num": "2.0", "sections": "2", "bars": "4"})
    assert (opts.seed, opts.num) == (1000, 2)
    assert serve.sampling_options({**VALID_FORM, "seed": "0e400"})[0].seed == 0  # long only in its exponent
    assert serve.sampling_options({**VALID_FORM, "sections": "2E0", "bars": "4"})[0].form.startswith("S:2\nB:4\n")
    for field, text, says in [("seed", "1.5", "not a whole number"), ("seed", "1e400", "'1e400' has 401 digits, far past"),
                              ("seed", "9" * 26, "got '" + "9" * 26 + "'"),  # as typed, not rounded through a float
                              ("num", "9e0", "from 1 to 8"), ("seed", "-1e0", "from 0")]:
        with pytest.raises(serve.HTTPError, match=says):
            serve.sampling_options({**VALID_FORM, field: text})


def test_the_same_form_gives_the_same_tunes(server):
    pages = [request(server + "/generate", form(seed="7"))[2] for _ in range(2)]
    abc = [re.findall(rb"<pre class=abc>(.*?)</pre>", page, re.S) for page in pages]
    assert len(abc[0]) == 2 and abc[0] == abc[1]


def test_the_page_fits_a_phone_announces_a_refusal_and_names_each_download_apart(server):
    assert '<meta name=viewport content="width=device-width' in serve.page(VALID_FORM, None, None, {})
    status, _, page = request(server + "/generate", form(sections="2", bars="eight"))
    assert status == 400 and b"<title>musicrnn: refused</title>" in page and b"id=error role=alert>" in page
    pages = [request(server + "/generate", form(seed="7"))[2].decode() for _ in range(2)]
    names = [re.findall(r'<a download="([^"]+)"', page) for page in pages]
    assert len(names[0]) >= 2 and all(n.startswith("musicrnn-") and n.endswith(Path(n).suffix) for n in names[0])
    assert not set(names[0]) & set(names[1])  # a second request's tune1.abc is saved beside the first's
    assert 'aria-label="tune 1 as .abc"' in pages[0] and 'aria-label="tune 2 as .abc"' in pages[0]
    assert {"F#m", "C#m", "Eb", "Edor"} <= set(serve.KEYS)  # the keys the form's check takes, offered
    caption = re.search(r"<p class=made-with id=made-with>([^<]*)</p>", pages[0]).group(1)
    assert caption == "written with M:6/8, K:D, temperature 1.0, seed 7, constrained"  # the tunes' own settings

def test_serve_refuses_a_bad_port_and_a_busy_one_in_one_line(server, tiny_onnx):
    assert one_error_line(*run_main(serve.main, "--model", str(tiny_onnx), "--port", "70000")[::2])
    port = server.rsplit(":", 1)[1]
    code, _, err = run_main(serve.main, "--model", str(tiny_onnx), "--port", port)
    assert one_error_line(code, err) and f"cannot listen on 127.0.0.1:{port}" in err, err


def test_serve_never_listens_beyond_this_machine_unless_asked(tiny_onnx):
    assert serve.build_parser().parse_args([]).host == "127.0.0.1"
    code, _, err = run_main(serve.main, "--model", str(tiny_onnx), "--host", "")  # "" would mean every interface
    assert one_error_line(code, err) and "give an address" in err


def test_the_page_runs_no_script_and_loads_nothing_from_elsewhere():
    page = serve.page(VALID_FORM, None, None, {})
    assert "<script" not in page and "http" not in page.replace('http-equiv', '')
    assert Path(ROOT / "serve.py").read_text().count("Content-Security-Policy") == 1


def test_the_server_keeps_only_its_newest_requests_files_within_the_byte_bound(tiny_onnx, tmp_path):
    import os

    server = serve.TuneServer(("127.0.0.1", 0), str(tiny_onnx), tmp_path)
    try:
        for i in range(6):
            folder = tmp_path / f"{i:032x}"
            folder.mkdir()
            (folder / "tune1.wav").write_bytes(b"x" * 1000)
            os.utime(folder, (i, i))  # older first
        server.keep_requests = 4
        server.prune()
        assert sorted(p.name[-1] for p in tmp_path.iterdir()) == ["2", "3", "4", "5"]
        server.keep_bytes = 2500
        server.prune()
        assert sorted(p.name[-1] for p in tmp_path.iterdir()) == ["4", "5"]
    finally:
        server.server_close()


def test_a_request_over_the_byte_bound_keeps_its_own_files_and_spares_one_at_work(tiny_onnx, tmp_path):
    with in_process(tiny_onnx, tmp_path) as (tune_server, url):
        tune_server.keep_bytes = 1  # every request's files are over it
        with tune_server.request_folder() as (_, at_work):  # another request, still rendering
            (at_work / "tune1.abc").write_text("X:1\n")
            pages = [request(url + "/generate", form(num="2", seed=str(seed))) for seed in (1, 2)]
            assert [status for status, _, _ in pages] == [200, 200], error_on_page(pages[0][2])
            first, second = [re.findall(rb'href="(/files/[^"]+)"', body) for _, _, body in pages]
            assert all(request(url + link.decode())[0] == 200 for link in second)  # the newest done: all there
            assert all(request(url + link.decode())[0] == 404 for link in first)   # pruned when the next was done
            assert at_work.exists()                                                # spared while at work
        assert at_work.exists()  # once done it is the newest, kept whatever its size
        assert all(request(url + link.decode())[0] == 404 for link in second)


def test_a_client_that_goes_away_mid_file_leaves_no_traceback(tiny_onnx, tmp_path, capsys):
    with in_process(tiny_onnx, tmp_path) as (tune_server, url):
        with tune_server.request_folder() as (name, folder):
            (folder / "tune1.wav").write_bytes(bytes(32 << 20))  # far more than a socket buffers
            client = socket.create_connection(tune_server.server_address[:2], timeout=10)
            client.sendall(f"GET /files/{name}/tune1.wav HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            client.recv(1000)  # the headers have come: the body is being written
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset, as a player that has read enough does
            time.sleep(1)
        assert request(url + "/")[0] == 200  # still serving
    assert "Traceback" not in capsys.readouterr().err


def test_a_query_string_chooses_nothing_the_page_and_the_form_are_served_as_without_it(server):
    status, kind, page = request(server + "/?ref=bookmark")
    assert status == 200 and kind.startswith("text/html") and b"<form" in page
    status, _, page = request(server + "/generate?x=1", form(num="1"))
    assert status == 200 and error_on_page(page) == "", error_on_page(page)


def test_a_busy_server_sends_the_form_back_as_it_was_filled_in(tiny_onnx, tmp_path):
    with in_process(tiny_onnx, tmp_path) as (tune_server, url):
        while tune_server.active.acquire(blocking=False):  # every slot taken
            pass
        status, _, page = request(url + "/generate", form(meter="9/8", key="Am", seed="42", num="3"))
    text = page.decode()
    assert status == 503 and "busy" in error_on_page(page)
    assert re.search(r'name=seed[^>]*value="?42', text) and re.search(r'value="?9/8"? selected', text), text[:3000]


def test_the_tunes_get_an_address_of_their_own_so_a_reload_shows_them_without_writing_again(server):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/generate", form(num="2"), {"Content-Type": "application/x-www-form-urlencoded"})
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 303 and re.fullmatch(r"/tunes/[0-9a-f]{32}", answer.getheader("Location"))
    pages = [request(server + answer.getheader("Location")) for _ in range(2)]  # shown, then reloaded
    assert [(status, kind) for status, kind, _ in pages] == [(200, "text/html; charset=utf-8")] * 2
    assert pages[0][2] == pages[1][2] and pages[0][2].count(b"<section class=tune") == 2
    assert f"/files/{answer.getheader('Location')[7:]}/tune1.abc".encode() in pages[0][2]  # its own files
    conn.close()


def test_a_page_of_tunes_pruned_since_says_they_are_gone_instead_of_showing_broken_files(tiny_onnx, tmp_path):
    with in_process(tiny_onnx, tmp_path) as (tune_server, url):
        tune_server.keep_requests = 1
        first = urllib.request.urlopen(urllib.request.Request(url + "/generate", form(seed="1")), timeout=60).url
        assert request(url + "/generate", form(seed="2"))[0] == 200  # the newest: the first is pruned
        status, _, page = request(first)
    assert status == 404 and error_on_page(page) == ("those tunes are gone: the server keeps the newest 1 "
                                                     "requests' tunes, within 256 MB; write them again")
    assert b"<section class=tune" not in page


def test_a_request_whose_client_left_while_it_waited_its_turn_writes_no_tunes(tiny_onnx, tmp_path, monkeypatch,
                                                                              capfd):
    written = []
    real_generate = serve.sampler.generate_tunes
    monkeypatch.setattr(serve.sampler, "generate_tunes", lambda *a, **k: written.append(1) or real_generate(*a, **k))
    with in_process(tiny_onnx, tmp_path) as (tune_server, url):
        with tune_server.generating:  # another request is generating: this one waits its turn
            send_form(tune_server.server_address, form(num="4")).close()  # and closed while it waits, as the
            time.sleep(1)                                                  # first of a double click is
        log = server_log_until(capfd, "went away")
        assert request(url + "/generate", form(num="1"))[0] == 200  # the server goes on
    assert "the client went away before its tunes were written" in log and written == [1]
