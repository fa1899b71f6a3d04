"""End to end: a gated model from a Hugging Face reference, downloaded on a real host with a token that never leaks.

A local HTTPS hub (tests.testbed.hf_hub, its test CA installed in the test host as a host trusts the
real hub's) serves SmolLM2 at a pinned revision to a bearer token only, answers 401/403 to a wrong or
revoked one, and cuts a download short on demand. The whole box is deployed from `hf://` sources.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpubox.hf import GATED
from tests.e2e.conftest import CCACHE_MOUNT, LLAMA_REPO_MOUNT
from tests.e2e.test_deploy import FULL, Deployer, make_deployer, record
from tests.testbed import TestHost, booted_host
from tests.testbed.hf_hub import FakeHub, make_certificates

pytestmark = pytest.mark.e2e

REPO = "google/gemma-gated-test"
REVISION = "3f1c2a775b0e4c1d9a8e2d6f0b7c9e41aa55bb66"
OTHER_REVISION = "9a8e2d6f0b7c9e41aa55bb663f1c2a775b0e4c1d"
TOKEN = "hf_e2eGatedToken0123456789"
REVOKED = "hf_e2eRevokedToken01234567"
MODEL = "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DRAFTER = "/srv/models/drafter/SmolLM2-135M-Instruct.Q4_1.gguf"
# Where a leaked token would be: every place the download touched, and the usual suspects.
SEARCHED = "/srv /tmp /var/tmp /var/lib/gpubox /etc /root /home"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    fake = FakeHub(make_certificates(tmp_path_factory.mktemp("certs")))
    fake.tokens.update({TOKEN, REVOKED})
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def gated_host(
    can_boot_hosts: None, llama_repo: tuple[Path, str], shared_ccache: Path, hub: FakeHub
) -> Iterator[TestHost]:
    with booted_host(binds_ro=[(llama_repo[0], LLAMA_REPO_MOUNT)], binds=[(shared_ccache, CCACHE_MOUNT)]) as host:
        ca = hub.ca_certificate.read_text()
        host.run(f"cat > /usr/local/share/ca-certificates/gpubox-test-hub.crt <<'EOF'\n{ca}EOF\nupdate-ca-certificates",
                 check=True)  # fmt: skip
        yield host


def token_file(directory: Path, token: str, mode: int = 0o600) -> str:
    path = directory / f"token-{mode:o}-{token[-4:]}"
    path.write_text(f"{token}\n")
    path.chmod(mode)
    return str(path)


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests write token files on the controller."""
    return tmp_path_factory.mktemp("tokens")


@pytest.fixture(scope="module")
def deployer(
    gated_host: TestHost, hub: FakeHub, smollm2: Path, tokens_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Deployer:
    content = smollm2.read_bytes()
    reference = hub.add(REPO, REVISION, smollm2.name, content)
    deployer = make_deployer(
        gated_host,
        tmp_path_factory,
        model_source=reference,
        drafter_source=reference,
        drafter_sha256=hashlib.sha256(content).hexdigest(),  # its own: the tests change the target's
        hf_endpoint=hub.endpoint,
        hf_token_file=token_file(tokens_dir, TOKEN),
    )
    return deployer


def leaks(deployer: Deployer, token: str) -> str:
    """Files on the host that hold the token (none, when it was cleaned up)."""
    return deployer.host.run(f"grep -rlsF {token} {SEARCHED} 2>/dev/null || true").stdout.strip()


def test_a_wrong_token_is_refused_as_gated_and_nothing_is_placed(deployer: Deployer, tokens_dir: Path) -> None:
    wrong = token_file(tokens_dir, "hf_notTheRightToken00000")
    result, _ = deployer.run(FULL, "-y", hf_token_file=wrong)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{GATED} (HTTP 401 from" in output, output[-3000:]
    assert deployer.host.run(f"test -e {MODEL}").returncode != 0
    assert deployer.host.run(f"ls -d {MODEL}.auth {MODEL}.auth-upload 2>/dev/null").stdout == ""
    assert leaks(deployer, "hf_notTheRightToken00000") == ""


def test_a_token_file_others_can_read_is_refused_before_the_host_is_touched(
    deployer: Deployer, hub: FakeHub, tokens_dir: Path
) -> None:
    loose = token_file(tokens_dir, TOKEN, mode=0o644)
    requests_before = len(hub.requests)
    result, _ = deployer.run(FULL, "-y", hf_token_file=loose)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "huggingface.token_file:" in output and "`chmod 600" in output, output[-3000:]
    assert len(hub.requests) == requests_before  # no download was tried
    assert deployer.host.run(f"ls -d {MODEL}.auth 2>/dev/null").stdout == ""


def test_a_cut_download_resumes_and_the_token_never_shows(deployer: Deployer, hub: FakeHub) -> None:
    size = len(hub.files[f"/{REPO}/resolve/{REVISION}/SmolLM2-135M-Instruct.Q4_1.gguf"])
    hub.cut_next_after = size // 3
    first, _ = deployer.run(FULL, "-y")
    assert first.returncode != 0  # curl: transfer closed with bytes remaining
    assert deployer.host.run(f"stat -c %s {MODEL}.part").stdout.strip() == str(size // 3)
    assert deployer.host.run(f"ls -d {MODEL}.auth 2>/dev/null").stdout == ""  # removed even on failure

    # Resume, slowly enough to sample every process's argv on the host while curl runs.
    hub.bytes_per_second = 24 << 20
    samples: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(deployer.host.run("ps -eo args", timeout=10).stdout)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        second, elapsed = deployer.run(FULL, "-y", "-vvv")
    finally:
        done.set()
        sampler.join()
        hub.bytes_per_second = None
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    resumed = [request for request in hub.requests if request.range == f"bytes={size // 3}-"]
    assert resumed and resumed[0].status == 206
    model_sha = deployer.sh(f"sha256sum {MODEL}").split()[0]
    assert model_sha == deployer.base["model_sha256"]
    # the token: in no argv while curl ran, in none of pyinfra's -vvv output, on no file afterwards
    during = [snapshot for snapshot in samples if "curl" in snapshot and "resolve" in snapshot]
    assert during, f"no ps sample caught curl ({len(samples)} samples)"
    assert not any(TOKEN in snapshot for snapshot in samples)
    assert TOKEN not in output and "Authorization" not in output
    assert leaks(deployer, TOKEN) == ""
    assert deployer.host.run(f"ls -d {MODEL}.auth {DRAFTER}.auth 2>/dev/null").stdout == ""
    record("gated download + converge s (resumed, throttled to 24 MiB/s)", round(elapsed, 1))
    record("gated download ps samples during curl", len(during))


def test_a_revoked_token_is_refused_and_the_placed_model_stays(
    deployer: Deployer, hub: FakeHub, tokens_dir: Path
) -> None:
    before = deployer.file_state(MODEL)
    pid = deployer.main_pid()
    other = hub.add(REPO, OTHER_REVISION, "SmolLM2-135M-Instruct.Q4_1.gguf", b"not served to a revoked token")
    hub.tokens.discard(REVOKED)
    hub.revoked.add(REVOKED)
    result, _ = deployer.run(
        FULL, "-y", model_source=other, model_sha256=hashlib.sha256(b"x").hexdigest(),
        hf_token_file=token_file(tokens_dir, REVOKED),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{GATED} (HTTP 403 from" in output, output[-3000:]
    assert deployer.file_state(MODEL) == before and deployer.main_pid() == pid
    assert leaks(deployer, REVOKED) == ""


def test_a_download_whose_sha256_differs_is_deleted_and_the_old_file_kept(deployer: Deployer, hub: FakeHub) -> None:
    before = deployer.file_state(MODEL)
    other = hub.add(REPO, OTHER_REVISION, "SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF but not the model the spec says")
    result, _ = deployer.run(FULL, "-y", model_source=other, model_sha256=hashlib.sha256(b"x").hexdigest())
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "sha256 mismatch for /srv/models/SmolLM2-135M-Instruct.Q4_1.gguf" in output, output[-3000:]
    assert deployer.file_state(MODEL) == before
    assert deployer.host.run(f"test -e {MODEL}.part").returncode != 0
    assert deployer.sh("systemctl is-active gemma4.service") == "active"
