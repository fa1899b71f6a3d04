"""Speech smoke pieces: WER, WAV headers, the curl commands (parsed as sh would, and run against a local server)."""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import os
import shlex
import shutil
import struct
import subprocess
import threading
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from gpubox.smoke import TransportError, command_transport, wait_until_healthy
from gpubox.speech import (
    SpeechCheck,
    SpeechError,
    TranscriptCheck,
    WavError,
    WavInfo,
    normalised_words,
    parse_synthesis,
    parse_transcription,
    parse_wav_header,
    parse_wav_probe,
    plausible_duration,
    speech_table,
    synthesize_command,
    transcribe_command,
    wav_probe_command,
    word_error_rate,
)

JFK = "And so, my fellow Americans, ask not what your country can do for you; ask what you can do for your country."
# A file name every quoting layer has to get right: sh (space, quote, $, backtick), curl -F (backslash).
AWKWARD_NAME = "it's $HOME `id` \\ a -b.wav"


def wav_bytes(frames: int = 16000, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(bytes(frames * channels * width))
    return buffer.getvalue()


def chunk(chunk_id: bytes, body: bytes) -> bytes:
    return chunk_id + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")


FMT_END = 36  # "RIFF" size "WAVE" + the 8-byte header and 16-byte body of wave's fmt chunk


def with_chunks_before_data(data: bytes, *chunks: bytes) -> bytes:
    return data[:FMT_END] + b"".join(chunks) + data[FMT_END:]


def run_sh(command: str) -> tuple[str, int]:
    """A CommandRunner running the command locally with /bin/sh (dash here), as the host's shell would."""
    env = {**os.environ, "no_proxy": "*", "NO_PROXY": "*"}
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=30, check=False)
    return done.stdout, done.returncode


# -- words ------------------------------------------------------------------------------------------


def test_normalised_words_drop_punctuation_and_case_but_keep_apostrophes_inside_words() -> None:
    assert normalised_words("And so, my fellow Americans,") == ["and", "so", "my", "fellow", "americans"]
    assert normalised_words("Don't stop — the U.S. 'quote' well-known and/or 3.5!") == [
        "don't", "stop", "the", "us", "quote", "well", "known", "and", "or", "35",
    ]  # fmt: skip
    assert normalised_words("don\u2019t  Ça   va?") == ["don't", "ça", "va"]
    assert normalised_words(" ... ") == []


def test_word_error_rate_counts_substitutions_deletions_and_insertions() -> None:
    assert word_error_rate(JFK, " and so my fellow americans ask not what your country can do for you ask what "
                                "you can do for your country") == 0.0  # fmt: skip
    assert word_error_rate("the cat sat down", "the bat sat down") == 0.25  # one substitution
    assert word_error_rate("the cat sat down", "the cat down") == 0.25  # one deletion
    assert word_error_rate("the cat sat down", "the cat sat right down") == 0.25  # one insertion
    assert word_error_rate("the cat sat down", "a cat sat") == 0.5  # substitution + deletion
    assert word_error_rate("one two three four five", "two three four five six") == 0.4  # shifted: 1 del + 1 ins
    assert word_error_rate("yes", "yes yes yes") == 2.0  # insertions can push it past 1
    assert word_error_rate("hello world", "") == 1.0
    assert word_error_rate("", "") == 0.0
    assert word_error_rate("...", "something") == 1.0


# -- WAV headers ------------------------------------------------------------------------------------


def test_header_written_by_pythons_wave_module() -> None:
    info = parse_wav_header(wav_bytes(frames=22050 * 2, rate=22050, channels=2))
    assert info == WavInfo(sample_rate=22050, channels=2, sample_width=2, data_bytes=22050 * 2 * 2 * 2)
    assert info.duration_s == pytest.approx(2.0)


def test_chunks_before_data_are_skipped_with_odd_sizes_padded() -> None:
    data = wav_bytes(frames=8000)
    odd_list = chunk(b"LIST", b"INFOISFT" + struct.pack("<I", 3) + b"ab\0")  # 15 bytes: one pad byte follows
    fact = chunk(b"fact", struct.pack("<I", 8000))
    info = parse_wav_header(with_chunks_before_data(data, odd_list, fact))
    assert (info.data_bytes, info.duration_s) == (16000, pytest.approx(0.5))
    # Without the pad byte the walk lands one byte off and never finds "data".
    unpadded = data[:FMT_END] + odd_list[:-1] + fact + data[FMT_END:]
    with pytest.raises(WavError, match="no data chunk"):
        parse_wav_header(unpadded)


def test_streaming_data_size_is_taken_from_the_file_size() -> None:
    data = bytearray(wav_bytes(frames=16000))
    data_offset = 44
    for unknown in (0xFFFFFFFF, 0):
        struct.pack_into("<I", data, 4, unknown)  # the RIFF size is left unknown too
        struct.pack_into("<I", data, data_offset - 4, unknown)
        head = bytes(data[:4096])
        assert parse_wav_header(head, file_size=len(data)).data_bytes == 32000
        assert parse_wav_header(head, file_size=len(data)).duration_s == pytest.approx(1.0)
        assert parse_wav_header(head).data_bytes == unknown  # without the file size: what the header says


def test_data_size_past_the_end_of_a_truncated_file_is_cut_to_the_file() -> None:
    data = wav_bytes(frames=16000)
    assert parse_wav_header(data[:1000], file_size=1000).data_bytes == 1000 - 44
    assert parse_wav_header(data[:1000]).data_bytes == 32000  # the header alone can't tell


def fmt_body(tag: int, *, extensible_subformat: int | None = None, bits: int = 16) -> bytes:
    body = struct.pack("<HHIIHH", tag, 1, 16000, 16000 * bits // 8, bits // 8, bits)
    if extensible_subformat is not None:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        body += struct.pack("<HHI", 22, bits, 0x4) + struct.pack("<H", extensible_subformat) + guid_tail
    return body


def riff(*chunks: bytes) -> bytes:
    inner = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(inner)) + inner


def test_wave_format_extensible_pcm_is_read_and_float_refused() -> None:
    pcm = riff(chunk(b"fmt ", fmt_body(0xFFFE, extensible_subformat=1)), chunk(b"data", bytes(3200)))
    assert parse_wav_header(pcm) == WavInfo(sample_rate=16000, channels=1, sample_width=2, data_bytes=3200)
    float_ext = riff(chunk(b"fmt ", fmt_body(0xFFFE, extensible_subformat=3, bits=32)), chunk(b"data", bytes(64)))
    with pytest.raises(WavError, match="not PCM.*0x0003"):
        parse_wav_header(float_ext)
    with pytest.raises(WavError, match="not PCM"):
        parse_wav_header(riff(chunk(b"fmt ", fmt_body(3, bits=32)), chunk(b"data", bytes(64))))


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"", "not a RIFF/WAVE file"),
        (b"<html><body>500 Internal Server Error</body></html>", "not a RIFF/WAVE file"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(100), "not a RIFF/WAVE file"),
        (b"RIFF\x24\x00\x00\x00AVI LIST", "not a RIFF/WAVE file"),
        (riff(chunk(b"LIST", b"INFO")), "no fmt chunk in the first 24 bytes"),
        (riff(chunk(b"fmt ", fmt_body(1))), "no data chunk"),
        (riff(chunk(b"data", bytes(8)), chunk(b"fmt ", fmt_body(1))), "data chunk comes before any fmt"),
        (riff(chunk(b"fmt ", fmt_body(1)))[:30], "fmt chunk is cut off"),
        (riff(chunk(b"fmt ", struct.pack("<HHIIHH", 1, 0, 16000, 0, 0, 16)), chunk(b"data", b"")), "0 channels"),
    ],
)
def test_what_is_not_a_pcm_wav_is_a_wav_error(head: bytes, message: str) -> None:
    with pytest.raises(WavError, match=message):
        parse_wav_header(head, file_size=len(head))


def test_wav_probe_reads_size_and_head_through_sh(tmp_path: Path) -> None:
    data = bytearray(wav_bytes(frames=16000))
    struct.pack_into("<I", data, 40, 0xFFFFFFFF)  # as a streaming writer leaves it
    path = tmp_path / AWKWARD_NAME
    path.write_bytes(data)
    command = wav_probe_command(str(path), head_bytes=64)
    stdout, exit_code = run_sh(command)
    assert exit_code == 0
    size_line, head_line = stdout.splitlines()
    assert (int(size_line), len(head_line)) == (len(data), 88)  # 64 bytes of base64
    assert parse_wav_probe(stdout) == WavInfo(sample_rate=16000, channels=1, sample_width=2, data_bytes=32000)


def test_wav_probe_of_a_missing_or_odd_file_is_a_wav_error(tmp_path: Path) -> None:
    stdout, exit_code = run_sh(wav_probe_command(str(tmp_path / "missing.wav")))
    assert (stdout, exit_code) == ("", 1)
    with pytest.raises(WavError, match="does the file exist"):
        parse_wav_probe(stdout)
    with pytest.raises(WavError, match="not base64"):
        parse_wav_probe("44\n!!!!\n")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(WavError, match="not a RIFF/WAVE file"):
        parse_wav_probe(run_sh(wav_probe_command(str(empty)))[0])
    with pytest.raises(ValueError, match="at least 12"):
        wav_probe_command("/x.wav", head_bytes=4)


# -- commands, as sh splits them ---------------------------------------------------------------------


def test_transcribe_command_argv() -> None:
    command = transcribe_command("http://127.0.0.1:8080/", "/srv/speech/jfk.wav", 30)
    assert shlex.split(command) == [
        "curl", "-sS", "--globoff", "--max-time", "30",
        "-F", 'file=@"/srv/speech/jfk.wav"',
        "--form-string", "response_format=json",
        "--form-string", "temperature=0",
        "-w", "\n%{http_code}\n%{time_total}",
        "http://127.0.0.1:8080/inference",
    ]  # fmt: skip
    with_language = shlex.split(transcribe_command("http://h:1", "a.wav", 2.5, language="de"))
    assert with_language[with_language.index("temperature=0") + 1 :][:2] == ["--form-string", "language=de"]
    assert with_language[4] == "2.5"


def test_transcribe_command_keeps_awkward_paths_one_word() -> None:
    argv = shlex.split(transcribe_command("http://h:1", f"/tmp/a dir/{AWKWARD_NAME}", 5))
    # sh hands curl the path as is; inside -F's double quotes only the backslash is escaped.
    assert argv[6] == 'file=@"/tmp/a dir/it\'s $HOME `id` \\\\ a -b.wav"'
    assert len(argv) == 14


@pytest.mark.parametrize("path", ["/tmp/a;type=text/plain.wav", "/tmp/a,b.wav", '/tmp/a".wav', "-", ""])
def test_transcribe_command_refuses_what_curl_form_would_misread(path: str) -> None:
    with pytest.raises(ValueError, match="WAV path"):
        transcribe_command("http://h:1", path, 5)


def test_synthesize_command_argv() -> None:
    text = 'She said "hi" — it\'s $5 `now`\nnext line; ünïcode'
    argv = shlex.split(synthesize_command("http://127.0.0.1:5000", "/synthesize", text, "/tmp/out dir/a.wav", 20))
    assert argv == [
        "curl", "-sS", "--globoff", "--max-time", "20",
        "-H", "Content-Type: application/json",
        "--data-binary", argv[8],
        "-o", "/tmp/out dir/a.wav",
        "-w", "%{http_code}\n%{time_total}\n%{content_type}",
        "http://127.0.0.1:5000/synthesize",
    ]  # fmt: skip
    assert json.loads(argv[8]) == {"text": text}
    assert argv[8].startswith("{")  # never "@file" to curl
    assert shlex.split(synthesize_command("http://h:5000/", "/", "x", "o.wav", 1))[-1] == "http://h:5000/"
    with pytest.raises(ValueError, match="stdout"):
        synthesize_command("http://h:1", "/", "x", "-", 1)
    with pytest.raises(ValueError, match="starts with '/'"):
        synthesize_command("http://h:1", "synthesize", "x", "o.wav", 1)


# -- parsing what curl printed -------------------------------------------------------------------------


def test_parse_transcription() -> None:
    assert parse_transcription('{"text":" hello"}\n200\n0.530112', 0) == ("hello", pytest.approx(0.530112))
    assert parse_transcription('{"text":" hello"}\n200\n0.53\n', 0) == ("hello", 0.53)
    pretty = '{\n  "text": " And so my fellow Americans,\\n ask not."\n}\n200\n1.250000'
    assert parse_transcription(pretty, 0) == ("And so my fellow Americans, ask not.", 1.25)  # segments on one line


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ('{"error":"failed to read audio data"}\n400\n0.01', "HTTP 400: .*failed to read audio data"),
        ('{"error":"no \'file\' field in the request"}\n200\n0.01', "answered an error: no 'file' field"),
        ("File Not Found (/inferenc)\n404\n0.001", "HTTP 404"),
        ("Load was successful!\n200\n0.2", "no JSON object"),
        ('{"status":"ok"}\n200\n0.2', "no text"),
        ('{"status":"loading model"}\n503\n0.001', "HTTP 503"),
    ],
)
def test_parse_transcription_error_answers(stdout: str, message: str) -> None:
    with pytest.raises(SpeechError, match=message):
        parse_transcription(stdout, 0)


@pytest.mark.parametrize(
    ("stdout", "exit_code", "message"),
    [
        ("\n000\n0.000127", 7, "connection refused"),
        ("\n000\n30.001", 28, "timed out"),
        ("\n000\n0.0", 26, "exit code 26"),  # curl could not read the WAV file
        ('{"text":"x"}\n200', 0, "no HTTP status"),
        ('{"text":"x"}\n200\nsoon', 0, "no time_total"),
    ],
)
def test_parse_transcription_without_an_http_answer(stdout: str, exit_code: int, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        parse_transcription(stdout, exit_code)


def test_parse_synthesis() -> None:
    assert parse_synthesis("200\n0.412345\ntext/html; charset=utf-8", 0) == (200, 0.412345, "text/html; charset=utf-8")
    assert parse_synthesis("200\r\n0.4\r\naudio/wav\r\n", 0) == (200, 0.4, "audio/wav")
    assert parse_synthesis("500\n0.1\n", 0) == (500, 0.1, "")
    with pytest.raises(TransportError, match="connection refused"):
        parse_synthesis("000\n0.000\n", 7)
    with pytest.raises(TransportError, match="no HTTP status"):
        parse_synthesis("", 0)
    with pytest.raises(TransportError, match="no time_total"):
        parse_synthesis("200\n", 0)


def test_whisper_health_goes_through_the_llama_smoke_transport() -> None:
    """whisper-server's /health answers 503 {"status":"loading model"}, then 200 {"status":"ok"}."""
    answers = iter([('{"status":"loading model"}\n503', 0), ('{"status":"ok"}\n200', 0)])
    commands: list[str] = []

    def runner(command: str) -> tuple[str, int]:
        commands.append(command)
        return next(answers)

    wait = wait_until_healthy(command_transport(runner, "http://127.0.0.1:8080"), 10, sleep=lambda _: None)
    assert (wait.healthy, wait.polls) == (True, 2)
    assert shlex.split(commands[0])[-1] == "http://127.0.0.1:8080/health"


# -- verdicts -----------------------------------------------------------------------------------------


def test_transcript_check_messages_carry_the_numbers() -> None:
    good = TranscriptCheck.judge(JFK, JFK.upper(), audio_s=11.0, seconds=1.1, max_wer=0.2, max_rtf=0.5)
    assert (good.wer, good.rtf, good.passed, good.failures) == (0.0, pytest.approx(0.1), True, [])
    bad = TranscriptCheck.judge("the cat sat down", "the bat", audio_s=11.0, seconds=10.1, max_wer=0.2, max_rtf=0.5)
    assert not bad.passed
    assert bad.failures == [
        "word error rate 0.75 > max 0.2: heard 'the bat', expected 'the cat sat down'",
        "real-time factor 0.92 > max 0.5 (10.1 s for 11.0 s of audio)",
    ]
    silent = TranscriptCheck.judge("x", "x", audio_s=0.0, seconds=0.1, max_wer=0.2, max_rtf=0.5)
    assert silent.rtf == float("inf") and not silent.passed


def test_plausible_duration() -> None:
    assert plausible_duration("Hi.") == (0.3, 1.2)
    assert plausible_duration(JFK) == (pytest.approx(0.15 * 22), pytest.approx(1.2 * 22))
    with pytest.raises(ValueError, match="no word"):
        plausible_duration(" ?! ")


def test_speech_check() -> None:
    second = WavInfo(sample_rate=22050, channels=1, sample_width=2, data_bytes=44100)
    good = SpeechCheck.judge("Hello there, world.", second, 0.4, 200, "text/html; charset=utf-8")
    assert (good.min_s, good.max_s, good.passed) == (pytest.approx(0.45), pytest.approx(3.6), True)
    too_long = SpeechCheck.judge("Hi.", WavInfo(22050, 1, 2, 44100 * 30), 0.4, 200, "audio/wav")
    assert too_long.failures == [
        "the audio lasts 30.00 s, outside the plausible 0.30-1.20 s for 1 word(s) ('Hi.'); "
        "22050 Hz, 1 channel(s), 1323000 bytes"
    ]
    empty = SpeechCheck.judge("Hi.", WavInfo(22050, 1, 2, 0), 0.4, 200, "audio/wav")
    assert "lasts 0.00 s" in empty.failures[0]
    error = SpeechCheck.judge("Hi.", None, 0.1, 500, "text/html; charset=utf-8")
    assert error.failures == ["the TTS server answered HTTP 500 (text/html; charset=utf-8) for 'Hi.'"]
    not_wav = SpeechCheck.judge("Hi.", None, 0.1, 200, "", wav_error="not a RIFF/WAVE file: it starts with b'{'")
    assert not_wav.failures == [
        "the TTS server's answer (no content type) is no PCM WAV: not a RIFF/WAVE file: it starts with b'{'"
    ]


def test_speech_table_rows_and_markup_in_heard_text() -> None:
    heard = TranscriptCheck.judge("hello world", "[bold]hello[/] world", 2.0, 0.5, max_wer=0.2, max_rtf=0.5)
    spoken = SpeechCheck.judge("Hello.", WavInfo(22050, 1, 2, 22050), 0.3, 200, "audio/wav")
    failed = SpeechCheck.judge("Hello.", None, 0.3, 500, "")
    console = Console(record=True, width=200)
    console.print(speech_table([heard], [spoken, failed]))
    text = console.export_text()
    assert "speech smoke test: failed" in text
    assert "'[bold]hello[/] world'" in text  # shown, not read as rich markup
    for row in ("transcript 1: words", "transcript 1: speed", "speech 1: duration", "speech 2: answer"):
        assert row in text
    assert text.count("pass") == 3 and text.count("FAIL") == 2
    assert "RTF 0.25 (0.5 s for 2.0 s)" in text and "HTTP 500, no content type" in text
    console = Console(record=True, width=200)
    good = TranscriptCheck.judge("hello world", "Hello, world!", 2.0, 0.5, max_wer=0.2, max_rtf=0.5)
    console.print(speech_table([good], [spoken]))
    assert "speech smoke test: passed" in console.export_text()


def _answer_cell(spoken: SpeechCheck) -> str:
    console = Console(record=True, width=300)
    console.print(speech_table([], [spoken]))
    line = next(line for line in console.export_text().splitlines() if "speech 1: answer" in line)
    return line.split("│")[2].strip()


def test_speech_table_answer_shows_the_wav_header_it_judged_not_only_the_content_type() -> None:
    # piper's Flask sends its WAV as text/html: the row passes on the RIFF/WAVE header, and says so
    piper = SpeechCheck.judge("Hello there.", WavInfo(22050, 1, 2, 44100), 0.42, 200, "text/html; charset=utf-8")
    assert _answer_cell(piper) == (
        "HTTP 200, body RIFF/WAVE PCM, 16-bit mono, 22050 Hz (sent as text/html; charset=utf-8: not judged), in 0.42 s"
    )
    stereo = SpeechCheck.judge("Hello there.", WavInfo(16000, 2, 3, 96000 * 2), 0.1, 200, "audio/wav")
    assert "RIFF/WAVE PCM, 24-bit stereo, 16000 Hz" in _answer_cell(stereo)
    not_wav = SpeechCheck.judge(
        "Hi.", None, 0.1, 200, "text/html", wav_error="not a RIFF/WAVE file: it starts with b'{'"
    )
    assert _answer_cell(not_wav) == (
        "HTTP 200, body no PCM WAV: \"not a RIFF/WAVE file: it starts with b'{'\" (sent as text/html), in 0.10 s"
    )


# -- the commands against a local HTTP server ----------------------------------------------------------


@dataclass
class Received:
    path: str = ""
    content_type: str = ""
    parts: dict[str, tuple[str | None, bytes]] = field(default_factory=dict)
    """Multipart field -> (filename, content)."""
    body: bytes = b""


@dataclass
class FakeSpeechServer:
    url: str
    received: list[Received]
    answer_wav: bytes


@pytest.fixture
def speech_server() -> Iterator[FakeSpeechServer]:
    """whisper-server's /inference and piper's /synthesize, as far as the smoke sees them."""
    received: list[Received] = []
    answer_wav = wav_bytes(frames=22050, rate=22050)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = Received(path=self.path, content_type=self.headers["Content-Type"], body=body)
            received.append(request)
            if self.path == "/inference":
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + request.content_type.encode() + b"\r\n\r\n" + body
                )
                for part in message.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    payload = part.get_payload(decode=True)
                    assert isinstance(name, str) and isinstance(payload, bytes)
                    request.parts[name] = (part.get_filename(), payload)
                self.answer(200, "application/json", json.dumps({"text": " And so my fellow Americans."}).encode())
            elif self.path == "/synthesize":
                self.answer(200, "text/html; charset=utf-8", answer_wav)  # what Flask sends for bytes
            else:
                self.answer(404, "text/plain", f"File Not Found ({self.path})".encode())

        def answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FakeSpeechServer(f"http://127.0.0.1:{server.server_address[1]}", received, answer_wav)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@needs_curl
def test_transcribe_command_posts_the_file_and_fields(speech_server: FakeSpeechServer, tmp_path: Path) -> None:
    folder = tmp_path / "a dir"
    folder.mkdir()
    wav = folder / AWKWARD_NAME
    wav.write_bytes(wav_bytes(frames=4000))
    stdout, exit_code = run_sh(transcribe_command(speech_server.url, str(wav), 10, language="en"))
    text, seconds = parse_transcription(stdout, exit_code)
    assert text == "And so my fellow Americans."
    assert 0 < seconds < 10
    (request,) = speech_server.received
    assert request.path == "/inference" and request.content_type.startswith("multipart/form-data; boundary=")
    assert request.parts == {
        "file": (request.parts["file"][0], wav.read_bytes()),
        "response_format": (None, b"json"),
        "temperature": (None, b"0"),
        "language": (None, b"en"),
    }
    # curl opened the file by its exact name (email's parser would read the backslash as an escape).
    assert f'name="file"; filename="{AWKWARD_NAME}"'.encode() in request.body


@needs_curl
def test_transcribe_of_a_missing_file_is_a_transport_error(speech_server: FakeSpeechServer, tmp_path: Path) -> None:
    stdout, exit_code = run_sh(transcribe_command(speech_server.url, str(tmp_path / "missing.wav"), 10))
    assert exit_code == 26  # curl: read error
    with pytest.raises(TransportError, match="exit code 26"):
        parse_transcription(stdout, exit_code)
    assert speech_server.received == []


@needs_curl
def test_synthesize_command_saves_the_wav_and_the_probe_reads_it(
    speech_server: FakeSpeechServer, tmp_path: Path
) -> None:
    text = 'Say "don\'t" for $5 — `now`.'
    out = tmp_path / "out dir" / AWKWARD_NAME
    out.parent.mkdir()
    stdout, exit_code = run_sh(synthesize_command(speech_server.url, "/synthesize", text, str(out), 10))
    status, seconds, content_type = parse_synthesis(stdout, exit_code)
    assert (status, content_type) == (200, "text/html; charset=utf-8") and 0 < seconds < 10
    (request,) = speech_server.received
    assert (request.path, request.content_type) == ("/synthesize", "application/json")
    assert json.loads(request.body) == {"text": text}
    assert out.read_bytes() == speech_server.answer_wav
    wav = parse_wav_probe(run_sh(wav_probe_command(str(out)))[0])
    check = SpeechCheck.judge(text, wav, seconds, status, content_type)
    assert wav.duration_s == pytest.approx(1.0) and check.passed, check.failures

    stdout, exit_code = run_sh(synthesize_command(speech_server.url, "/nowhere", text, str(out), 10))
    assert parse_synthesis(stdout, exit_code)[::2] == (404, "text/plain")
    with pytest.raises(WavError, match="not a RIFF/WAVE file: it starts with b'File Not Found"):
        parse_wav_probe(run_sh(wav_probe_command(str(out)))[0])
