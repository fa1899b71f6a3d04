"""Smoke test speech servers: whisper.cpp's whisper-server (speech to text) and piper's HTTP server (text to speech).

Both listen on the target host, so every request is a curl command run there through a
`CommandRunner` (over SSH for the deploy); the functions here build those commands and read what
they print, like `curl_command` / `parse_curl_output` in gpubox.smoke.

whisper-server (examples/server/server.cpp): `POST /inference` multipart, field `file` = a WAV,
`response_format=json` answers `{"text": " ..."}` (segment texts joined, leading space), errors
are `{"error": "..."}` (older builds answer them with HTTP 200). At start the pinned whisper-server
refuses connections until its model is loaded, then `GET /health` answers 200 `{"status":"ok"}` (503
`{"status":"loading model"}` only while `POST /load` swaps models): gpubox.smoke's `wait_until_healthy`
over `command_transport` polls it unchanged.

piper (piper.http_server): `POST /synthesize` (older releases: `POST /`) with the JSON body
`{"text": ...}` answers the WAV bytes; Flask sends them as `text/html`, so the content type is
shown but not judged: the WAV header is, and the smoke table's measured cell says what it read.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import unicodedata
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpubox.gpu import ComputeApp
from gpubox.quoting import shell_join
from gpubox.smoke import TransportError, _verdict, check_gpu_residency, parse_curl_output

if TYPE_CHECKING:  # rich is imported where a table is drawn: a no-op deploy draws none
    from rich.table import Table

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
STREAMING_DATA_SIZES = (0, 0xFFFFFFFF)
"""Data chunk sizes a writer leaves when it cannot seek back to patch them in."""
MIN_S_PER_WORD = 0.15
MAX_S_PER_WORD = 1.2
MIN_SPEECH_S = 0.3
_EXCERPT = 200
_FORM_REFUSED = (";", ",", '"')
# Apostrophes inside words stay ("don't"); dashes and slashes separate words; other punctuation goes.
_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'"}
_SEPARATORS = re.compile(r"[\s/\u2010-\u2015-]+")


class SpeechError(Exception):
    """The server answered, but not with a usable result (an error status or an unexpected body)."""


class WavError(ValueError):
    """The bytes are not a PCM WAV file this module can read."""


# -- words ------------------------------------------------------------------------------------------


def normalised_words(text: str) -> list[str]:
    """Lowercase words without punctuation; an apostrophe inside a word stays ("Don't," -> "don't")."""
    lowered = "".join(_APOSTROPHES.get(char, char) for char in text.lower())
    words = []
    for raw in _SEPARATORS.split(lowered):
        word = "".join(char for char in raw if char == "'" or unicodedata.category(char)[0] in "LNM").strip("'")
        if word:
            words.append(word)
    return words


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / reference words, on normalised words (an empty reference: 0 or 1)."""
    expected = normalised_words(reference)
    heard = normalised_words(hypothesis)
    if not expected:
        return 0.0 if not heard else 1.0
    previous = list(range(len(heard) + 1))
    for i, word in enumerate(expected, start=1):
        current = [i]
        for j, candidate in enumerate(heard, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != candidate)))
        previous = current
    return previous[-1] / len(expected)


# -- WAV --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WavInfo:
    sample_rate: int
    channels: int
    sample_width: int
    """Bytes per sample of one channel."""
    data_bytes: int

    @property
    def duration_s(self) -> float:
        return self.data_bytes / (self.sample_rate * self.channels * self.sample_width)


def _fmt_chunk(head: bytes, offset: int, size: int) -> tuple[int, int, int]:
    """(sample_rate, channels, sample_width) of the fmt chunk whose body starts at `offset`."""
    if size < 16 or offset + 16 > len(head):
        raise WavError(f"the fmt chunk is cut off ({size} bytes declared, {len(head) - offset} read)")
    tag, channels, sample_rate, _, _, bits = struct.unpack_from("<HHIIHH", head, offset)
    if tag == WAVE_FORMAT_EXTENSIBLE and size >= 40 and offset + 26 <= len(head):
        (tag,) = struct.unpack_from("<H", head, offset + 24)  # the sub-format GUID starts with the format tag
    if tag != WAVE_FORMAT_PCM:
        raise WavError(f"not PCM: the format tag is {tag:#06x} (1 is PCM; 3 is IEEE float)")
    if not channels or not sample_rate or not bits:
        raise WavError(f"unusable fmt chunk: {channels} channels, {sample_rate} Hz, {bits} bits per sample")
    return sample_rate, channels, (bits + 7) // 8


def parse_wav_header(head: bytes, file_size: int | None = None) -> WavInfo:
    """Format and data size of a PCM WAV from its first bytes; WavError for anything else.

    Chunks are walked from the RIFF header (each padded to an even size) to "fmt " and "data". With
    `file_size`, a data size a streaming writer left (0 or 0xFFFFFFFF) or one past the end of the
    file is replaced by what the file holds after the data chunk's header.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise WavError(f"not a RIFF/WAVE file: it starts with {head[:16]!r}")
    fmt: tuple[int, int, int] | None = None
    offset = 12
    while offset + 8 <= len(head):
        chunk_id = head[offset : offset + 4]
        (size,) = struct.unpack_from("<I", head, offset + 4)
        body = offset + 8
        if chunk_id == b"fmt ":
            fmt = _fmt_chunk(head, body, size)
        elif chunk_id == b"data":
            if fmt is None:
                raise WavError("the data chunk comes before any fmt chunk")
            if file_size is not None and (size in STREAMING_DATA_SIZES or body + size > file_size):
                size = max(0, file_size - body)
            sample_rate, channels, sample_width = fmt
            return WavInfo(sample_rate=sample_rate, channels=channels, sample_width=sample_width, data_bytes=size)
        offset = body + size + (size & 1)
    missing = "fmt" if fmt is None else "data"
    raise WavError(f"no {missing} chunk in the first {len(head)} bytes")


def wav_probe_command(path: str, head_bytes: int = 4096) -> str:
    """A shell command printing the file's size, then a line of base64 of its first `head_bytes` bytes."""
    if head_bytes < 12:
        raise ValueError(f"head_bytes must be at least 12 (a RIFF header), got {head_bytes}")
    size = shell_join(["stat", "-c", "%s", "--", path])
    head = shell_join(["head", "-c", str(head_bytes), "--", path])
    return f"{size} && {head} | base64 -w0 && echo"


def parse_wav_probe(stdout: str) -> WavInfo:
    """The WAV header read back by `wav_probe_command`; WavError when there is none."""
    words = stdout.split()
    if not words or not words[0].isdigit() or len(words) > 2:
        raise WavError(f"the probe printed no file size and base64 head (does the file exist?): {stdout[:_EXCERPT]!r}")
    try:
        head = base64.b64decode(words[1] if len(words) == 2 else "", validate=True)
    except binascii.Error as error:
        raise WavError(f"the probe's head is not base64: {error}") from error
    return parse_wav_header(head, file_size=int(words[0]))


# -- curl -------------------------------------------------------------------------------------------


def _url(base_url: str, path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"an HTTP path starts with '/', got {path!r}")
    return base_url.rstrip("/") + path


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise TransportError(f"curl printed no time_total (got {text!r})") from None


def _form_file(field: str, path: str) -> str:
    """`field=@"path"` for curl's -F, which splits an unquoted value at `;` (and file lists at `,`)."""
    if path in ("", "-"):
        raise ValueError(f"the WAV path {path!r} names no file (curl reads '-' as stdin)")
    for char in _FORM_REFUSED:
        if char in path:
            raise ValueError(f"the WAV path {path!r} contains {char!r}, which curl's -F reads specially; rename it")
    return f'{field}=@"' + path.replace("\\", "\\\\") + '"'


def transcribe_command(base_url: str, wav_path: str, timeout: float, *, language: str | None = None) -> str:
    """curl posting the WAV at `wav_path` (on the host) to whisper-server's `/inference`.

    It prints the body, then a line with the HTTP status and one with the seconds taken. Plain fields
    go through `--form-string`, which takes the value literally (no `@`, `<` or `;type=`).
    """
    words = [
        "curl", "-sS", "--globoff", "--max-time", f"{timeout:g}",
        "-F", _form_file("file", wav_path),
        "--form-string", "response_format=json",
        "--form-string", "temperature=0",
    ]  # fmt: skip
    if language is not None:
        words += ["--form-string", f"language={language}"]
    words += ["-w", "\n%{http_code}\n%{time_total}", _url(base_url, "/inference")]
    return shell_join(words)


def parse_transcription(stdout: str, exit_code: int) -> tuple[str, float]:
    """(text heard, on one line; seconds curl took) from `transcribe_command`'s output.

    whisper-server joins its segments with newlines (jfk.wav comes back as three lines): the text is
    returned with its whitespace collapsed.

    TransportError when curl got no HTTP answer; SpeechError for an error status or body.
    """
    answer, _, time_text = stdout.rstrip("\r\n").rpartition("\n")
    response = parse_curl_output(answer, exit_code)
    seconds = _seconds(time_text)
    if response.status != 200:
        raise SpeechError(f"/inference answered HTTP {response.status}: {response.body[:_EXCERPT]}")
    try:
        body = response.json_object()
    except ValueError as error:
        raise SpeechError(f"/inference answered no JSON object: {response.body[:_EXCERPT]!r}") from error
    if "error" in body:
        raise SpeechError(f"/inference answered an error: {body['error']}")
    text = body.get("text")
    if not isinstance(text, str):
        raise SpeechError(f"/inference answered no text: {response.body[:_EXCERPT]!r}")
    return " ".join(text.split()), seconds


def synthesize_command(base_url: str, path: str, text: str, out_path: str, timeout: float) -> str:
    """curl posting `{"text": text}` to the TTS server's `path`, the answer saved at `out_path` (on the host).

    It prints the HTTP status, the seconds taken and the content type, a line each.
    """
    if out_path == "-":
        raise ValueError("out_path '-' would make curl write the audio to stdout; give a file")
    words = [
        "curl", "-sS", "--globoff", "--max-time", f"{timeout:g}",
        "-H", "Content-Type: application/json",
        "--data-binary", json.dumps({"text": text}),  # starts with "{", so never read as @file
        "-o", out_path,
        "-w", "%{http_code}\n%{time_total}\n%{content_type}",
        _url(base_url, path),
    ]  # fmt: skip
    return shell_join(words)


def parse_synthesis(stdout: str, exit_code: int) -> tuple[int, float, str]:
    """(HTTP status, seconds, content type or "") from `synthesize_command`'s output; TransportError as curl's."""
    lines = stdout.replace("\r", "").split("\n")
    status = parse_curl_output(lines[0], exit_code).status
    seconds = _seconds(lines[1] if len(lines) > 1 else "")
    return status, seconds, lines[2].strip() if len(lines) > 2 else ""


# -- verdicts ---------------------------------------------------------------------------------------


def _excerpt(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True)
class TranscriptCheck:
    """One transcription judged: how well it heard the expected text, and how fast."""

    expected: str
    heard: str
    wer: float
    max_wer: float
    audio_s: float
    seconds: float
    max_rtf: float

    @classmethod
    def judge(
        cls, expected: str, heard: str, audio_s: float, seconds: float, *, max_wer: float, max_rtf: float
    ) -> TranscriptCheck:
        """The check of `heard` against `expected`, its word error rate computed here."""
        wer = word_error_rate(expected, heard)
        return cls(expected, heard, wer, max_wer, audio_s, seconds, max_rtf)

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds the request took (upload included) per second of audio."""
        return self.seconds / self.audio_s if self.audio_s > 0 else float("inf")

    @property
    def failures(self) -> list[str]:
        failures: list[str] = []
        if self.wer > self.max_wer:
            failures.append(
                f"word error rate {self.wer:.2f} > max {self.max_wer:g}: heard {_excerpt(self.heard)}, "
                f"expected {_excerpt(self.expected)}"
            )
        if self.rtf > self.max_rtf:
            failures.append(
                f"real-time factor {self.rtf:.2f} > max {self.max_rtf:g} "
                f"({self.seconds:.1f} s for {self.audio_s:.1f} s of audio)"
            )
        return failures

    @property
    def passed(self) -> bool:
        return not self.failures


def plausible_duration(text: str) -> tuple[float, float]:
    """(min, max) seconds of speech for `text`: 0.15 to 1.2 s per word, at least 0.3 s; ValueError with no word."""
    words = len(normalised_words(text))
    if not words:
        raise ValueError(f"no word to speak in {text!r}")
    return max(MIN_SPEECH_S, MIN_S_PER_WORD * words), max(MIN_SPEECH_S, MAX_S_PER_WORD * words)


@dataclass(frozen=True)
class SpeechCheck:
    """One synthesis judged: HTTP 200, a PCM WAV, lasting what the text plausibly takes to say."""

    text: str
    wav: WavInfo | None
    """None when the answer was no readable WAV (`wav_error` says why)."""
    seconds: float
    status: int
    content_type: str
    min_s: float
    max_s: float
    wav_error: str = ""
    gpu_failures: tuple[str, ...] | None = None
    """A piper service with ``cuda``: what `piper_gpu_failures` found (empty: on its GPU); None: not checked."""

    @classmethod
    def judge(
        cls,
        text: str,
        wav: WavInfo | None,
        seconds: float,
        status: int,
        content_type: str,
        wav_error: str = "",
        gpu_failures: Sequence[str] | None = None,
    ) -> SpeechCheck:
        """The check of one answer, the duration bounds from `plausible_duration(text)`."""
        min_s, max_s = plausible_duration(text)
        gpu = None if gpu_failures is None else tuple(gpu_failures)
        return cls(text, wav, seconds, status, content_type, min_s, max_s, wav_error, gpu)

    @property
    def failures(self) -> list[str]:
        return self._answer_failures() + list(self.gpu_failures or ())

    def _answer_failures(self) -> list[str]:
        content = self.content_type or "no content type"
        if self.status != 200:
            return [f"the TTS server answered HTTP {self.status} ({content}) for {_excerpt(self.text)}"]
        if self.wav is None:
            why = f": {self.wav_error}" if self.wav_error else ""
            return [f"the TTS server's answer ({content}) is no PCM WAV{why}"]
        duration = self.wav.duration_s
        if not self.min_s <= duration <= self.max_s:
            return [
                f"the audio lasts {duration:.2f} s, outside the plausible {self.min_s:.2f}-{self.max_s:.2f} s "
                f"for {len(normalised_words(self.text))} word(s) ({_excerpt(self.text)}); "
                f"{self.wav.sample_rate} Hz, {self.wav.channels} channel(s), {self.wav.data_bytes} bytes"
            ]
        return []

    @property
    def passed(self) -> bool:
        return not self.failures


PIPER_ON_CPU_HINT = (
    "onnxruntime fell back to the CPU: onnxruntime-gpu's CUDA provider did not load; are the CUDA/cuDNN "
    "libraries of piper's venv there (gpubox.piper_install's cuda flavor)?"
)


def piper_gpu_failures(pid: int, expected_gpu_uuids: Set[str], compute_apps: Iterable[ComputeApp]) -> list[str]:
    """Failures when a piper service with ``--cuda`` holds no memory on its GPU (or holds some on another).

    onnxruntime falls back to the CPU without failing when its CUDA provider cannot load (a missing
    libcublas or libcudnn: only a warning in the log), and piper still answers, slower; nvidia-smi's
    compute apps tell, as they do for llama-server (gpubox.smoke.check_gpu_residency).
    """
    return check_gpu_residency(pid, expected_gpu_uuids, compute_apps, program="piper", hint=PIPER_ON_CPU_HINT)


def wav_summary(wav: WavInfo) -> str:
    """What the WAV check read from the header, e.g. ``RIFF/WAVE PCM, 16-bit mono, 22050 Hz``."""
    channels = {1: "mono", 2: "stereo"}.get(wav.channels, f"{wav.channels} channels")
    return f"RIFF/WAVE PCM, {wav.sample_width * 8}-bit {channels}, {wav.sample_rate} Hz"


def _answer_measured(spoken: SpeechCheck) -> str:
    """The answer row's measured cell: what was judged (the status, the body's WAV header), then the
    content type, which is shown but not judged (piper's Flask sends its WAV as ``text/html``)."""
    content = spoken.content_type or "no content type"
    if spoken.status != 200:
        judged = f"HTTP {spoken.status}, {content}"
    elif spoken.wav is not None:
        judged = f"HTTP 200, body {wav_summary(spoken.wav)} (sent as {content}: not judged)"
    else:
        why = _excerpt(spoken.wav_error, 80) if spoken.wav_error else "unreadable"
        judged = f"HTTP 200, body no PCM WAV: {why} (sent as {content})"
    from rich.markup import escape

    return escape(f"{judged}, in {spoken.seconds:.2f} s")


def speech_table(transcripts: Sequence[TranscriptCheck] = (), syntheses: Sequence[SpeechCheck] = ()) -> Table:
    """One row per check: what was measured, the threshold, pass or fail."""
    passed = all(check.passed for check in transcripts) and all(check.passed for check in syntheses)
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="speech smoke test: " + ("[green]passed[/]" if passed else "[bold red]failed[/]"))
    for column in ("check", "measured", "threshold", "result"):
        table.add_column(column)
    for index, heard in enumerate(transcripts, start=1):
        table.add_row(
            f"transcript {index}: words",
            f"WER {heard.wer:.2f}: {escape(_excerpt(heard.heard, 60))}",
            f"<= {heard.max_wer:g}",
            _verdict(heard.wer <= heard.max_wer),
        )
        table.add_row(
            f"transcript {index}: speed",
            f"RTF {heard.rtf:.2f} ({heard.seconds:.1f} s for {heard.audio_s:.1f} s)",
            f"<= {heard.max_rtf:g}",
            _verdict(heard.rtf <= heard.max_rtf),
        )
    for index, spoken in enumerate(syntheses, start=1):
        answer_ok = spoken.status == 200 and spoken.wav is not None
        wav = spoken.wav
        table.add_row(
            f"speech {index}: answer",
            _answer_measured(spoken),
            "HTTP 200, a RIFF/WAVE PCM body",
            _verdict(answer_ok),
        )
        table.add_row(
            f"speech {index}: duration",
            "-" if wav is None else f"{wav.duration_s:.2f} s ({wav.sample_rate} Hz)",
            f"{spoken.min_s:.2f}-{spoken.max_s:.2f} s",
            _verdict(None if wav is None else spoken.min_s <= wav.duration_s <= spoken.max_s),
        )
        if spoken.gpu_failures is not None:
            table.add_row(
                f"speech {index}: GPU",
                escape("; ".join(spoken.gpu_failures)) if spoken.gpu_failures else "on its GPU only",
                "memory on its GPU (nvidia-smi)",
                _verdict(not spoken.gpu_failures),
            )
    return table
