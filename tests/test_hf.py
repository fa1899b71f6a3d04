"""Hugging Face sources: references pinned to a commit, the token file's checks, and the download script
run by the real curl against a local HTTPS hub (tests.testbed.hf_hub) that wants a bearer token."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from gpubox import Box, HuggingFace, LlamaCppBuild, LlamaServer, ModelFile
from gpubox.hf import GATED, TokenFileError, download_script, header_file_text, parse_reference, read_token, token_file
from gpubox.spec import problems_from
from tests.testbed.hf_hub import FakeHub, make_certificates

REVISION = "3f1c2a775b0e4c1d9a8e2d6f0b7c9e41aa55bb66"
TOKEN = "hf_goodToken0123456789"


def test_a_reference_resolves_to_the_hubs_resolve_url_at_its_commit() -> None:
    reference = parse_reference(f"hf://google/gemma-4-12b-it-qat-q4_0-gguf/dir/gemma 4.gguf@{REVISION}")
    assert (reference.repo, reference.file, reference.revision) == (
        "google/gemma-4-12b-it-qat-q4_0-gguf", "dir/gemma 4.gguf", REVISION
    )  # fmt: skip
    assert reference.url() == (
        f"https://huggingface.co/google/gemma-4-12b-it-qat-q4_0-gguf/resolve/{REVISION}/dir/gemma%204.gguf"
    )
    assert reference.url("https://127.0.0.1:8443/") == (
        f"https://127.0.0.1:8443/google/gemma-4-12b-it-qat-q4_0-gguf/resolve/{REVISION}/dir/gemma%204.gguf"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("hf://google/gemma/m.gguf@main", "pin the revision to a full 40-hex commit"),
        ("hf://google/gemma/m.gguf", "hf://<org>/<repo>/<file in the repo>@<40-hex commit>"),
        ("hf://gemma/m.gguf@" + REVISION, "hf://<org>/<repo>/<file in the repo>@"),  # no org: no file left
        (f"hf://google/gemma/../etc/passwd@{REVISION}", "'..' part"),
    ],
)
def test_a_reference_that_is_not_pinned_or_not_a_file_is_refused_by_field(source: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ModelFile(path="/srv/m.gguf", sha256="a" * 64, architecture="llama", source=source)
    problems = {problem.field: problem.message for problem in problems_from(caught.value)}
    assert message in problems["source"]


def test_the_endpoint_must_be_https() -> None:
    with pytest.raises(ValidationError, match="endpoint must be an https URL"):
        HuggingFace(endpoint="http://127.0.0.1:8080")


def test_check_flags_a_placeholder_revision() -> None:
    model = ModelFile(
        path="/srv/m.gguf", sha256="a" * 64, architecture="llama", source=f"hf://google/gemma/m.gguf@{'0' * 40}"
    )
    server = LlamaServer(name="gemma4", model=model, port=8080, parallel=1)
    box = Box(llama_cpp=LlamaCppBuild(commit="0" * 40), services=(server,))
    warnings = dict(box.services[0].warnings())
    assert "fill in the commit of m.gguf on https://huggingface.co/google/gemma" in warnings["model.source"]


def write_token(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_token_file_must_be_readable_by_its_owner_only(tmp_path: Path) -> None:
    assert read_token(write_token(tmp_path / "t", f"{TOKEN}\n", 0o600)) == TOKEN
    assert read_token(write_token(tmp_path / "r", TOKEN, 0o400)) == TOKEN
    with pytest.raises(TokenFileError, match=r"readable by others \(mode 0644\): `chmod 600"):
        read_token(write_token(tmp_path / "o", TOKEN, 0o644))
    with pytest.raises(TokenFileError, match="holds no token"):
        read_token(write_token(tmp_path / "e", "\n", 0o600))
    with pytest.raises(TokenFileError, match="holds no token"):  # a header line break can't be smuggled in
        read_token(write_token(tmp_path / "h", "abc\r\nX-Evil: 1", 0o600))
    with pytest.raises(TokenFileError, match="No such file"):
        read_token(tmp_path / "missing")


def test_the_token_file_comes_from_the_box_else_hf_token_file() -> None:
    assert token_file("/a/token", {"HF_TOKEN_FILE": "/b"}) == Path("/a/token")
    assert token_file(None, {"HF_TOKEN_FILE": "/b"}) == Path("/b")
    assert token_file(None, {}) is None


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    fake = FakeHub(make_certificates(tmp_path_factory.mktemp("certs")))
    fake.tokens.add(TOKEN)
    yield fake
    fake.close()


def run(script: str, hub: FakeHub) -> subprocess.CompletedProcess[str]:
    """The download script under /bin/sh, trusting the test CA as a host that installed it does."""
    env = {**os.environ, "CURL_CA_BUNDLE": str(hub.ca_certificate)}
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, check=False)


def auth_dir_with(tmp_path: Path, token: str) -> Path:
    auth = tmp_path / "m.gguf.auth"
    auth.mkdir(mode=0o700)
    (auth / "header").write_text(header_file_text(token))
    return auth


def test_a_cut_download_resumes_and_the_header_file_is_gone_after_each_try(hub: FakeHub, tmp_path: Path) -> None:
    content = os.urandom(400_000)
    url = parse_reference(hub.add("google/gated", REVISION, "m.gguf", content)).url(hub.endpoint)
    part = tmp_path / "m.gguf.part"
    hub.cut_next_after = 150_000
    auth = auth_dir_with(tmp_path, TOKEN)
    first = run(download_script(url, str(part), str(auth)), hub)
    assert first.returncode == 18, first.stderr  # curl: transfer closed with bytes remaining
    assert part.stat().st_size == 150_000 and not auth.exists()
    auth = auth_dir_with(tmp_path, TOKEN)
    second = run(download_script(url, str(part), str(auth)), hub)
    assert second.returncode == 0, second.stderr
    assert part.read_bytes() == content and not auth.exists()
    assert [request.range for request in hub.requests[-2:]] == [None, "bytes=150000-"]


@pytest.mark.parametrize(
    ("token", "status"), [(None, 401), ("hf_wrongToken0000000", 401), ("hf_revokedToken000000", 403)]
)
def test_a_refused_token_says_gated_and_leaves_the_part_alone(
    hub: FakeHub, tmp_path: Path, token: str | None, status: int
) -> None:
    hub.revoked.add("hf_revokedToken000000")
    url = parse_reference(hub.add("google/gated", REVISION, "g.gguf", b"x" * 1000)).url(hub.endpoint)
    part = tmp_path / "g.gguf.part"
    part.write_bytes(b"x" * 10)  # a cut run's .part: kept for the resume
    auth = auth_dir_with(tmp_path, token) if token else None
    result = run(download_script(url, str(part), str(auth) if auth else None), hub)
    assert result.returncode == 1
    assert f"{GATED} (HTTP {status} from {url}); kept the existing file" in result.stderr
    assert part.read_bytes() == b"x" * 10
    assert auth is None or not auth.exists()


def test_a_missing_file_says_not_found(hub: FakeHub, tmp_path: Path) -> None:
    url = f"{hub.endpoint}/google/gated/resolve/{REVISION}/nope.gguf"
    result = run(download_script(url, str(tmp_path / "n.part"), str(auth_dir_with(tmp_path, TOKEN))), hub)
    assert result.returncode == 1 and f"not found (HTTP 404): {url}" in result.stderr


def test_the_token_is_in_no_argv_of_the_download(hub: FakeHub, tmp_path: Path) -> None:
    """The script names the header file; the token itself is only in that file."""
    script = download_script(f"{hub.endpoint}/x", str(tmp_path / "p"), str(tmp_path / "auth"))
    assert TOKEN not in script and f"@{tmp_path / 'auth'}/header" in script
