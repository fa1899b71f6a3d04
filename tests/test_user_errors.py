"""Bad input gets one message naming what to fix and a non-zero exit, never a traceback.

The messages gpubox makes are tested as functions; the ones pyinfra's CLI prints are tested by
running the real `pyinfra` (no host is needed: each error stops the run before it connects, or on
`@local` before anything runs there).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile
from gpubox.cli import main
from gpubox.inventory import (
    HostBox,
    InventoryError,
    box_from_host_data,
    load_inventory,
    missing_inventory_file,
    refusal_text,
    with_missing_sources,
)
from gpubox.models import controller_source, missing_sources
from gpubox.spec import problems_from
from operations.preflight import inventory_problem

ROOT = Path(__file__).resolve().parent.parent
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
SHA = "a" * 64
DEBUG_LOG = ROOT / "pyinfra-debug.log"


def pyinfra(*arguments: str) -> tuple[int, str]:
    """The real pyinfra CLI from the repository root (where its config.py is), output without color."""
    result = subprocess.run(
        [PYINFRA, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYINFRA_PROGRESS": "off"},
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def assert_one_clean_message(code: int, output: str) -> None:
    assert code != 0, output
    for noise in ("Traceback", "An internal exception occurred", "Unexpected error in Python callback", "bug report"):
        assert noise not in output, output


def box(**server: Any) -> Box:
    model = ModelFile(path="/srv/models/m.gguf", sha256=SHA, architecture="llama", source=server.pop("source", None))
    return Box(llama_cpp=LlamaCppBuild(commit=COMMIT), services=(LlamaServer(name="gemma4", model=model, **server),))


def inventory_file(tmp_path: Path, text: str, name: str = "inv.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


LLM = """
from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile
model = ModelFile(path="/srv/models/m.gguf", sha256="{sha}", architecture="llama", source={source!r})
llm = LlamaServer(name="gemma4", model=model{extra})
hosts = [("box1", {{"box": Box(llama_cpp=LlamaCppBuild(commit="{commit}"), services=(llm,))}})]
"""


def llm_inventory(tmp_path: Path, source: str | None = None, extra: str = "") -> Path:
    return inventory_file(tmp_path, LLM.format(sha=SHA, source=source, extra=extra, commit=COMMIT))


# --- a path with '..' is refused by its field, where the deploy crashed without naming it ---------------


def test_a_key_file_path_with_dot_dot_is_refused_by_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:
        box(api_key_file="/etc/gpubox/keys/relative/../x.key")
    problems = problems_from(error.value)  # type: ignore[arg-type]
    assert [problem.field for problem in problems] == ["api_key_file"]
    assert "must not have a '..' part" in problems[0].message and "'/etc/gpubox/keys/x.key'" in problems[0].message
    inventory = llm_inventory(tmp_path, extra=', api_key_file="/etc/gpubox/keys/relative/../x.key"')
    assert main(["check", str(inventory)]) == 2
    output = capsys.readouterr().out
    assert "api_key_file" in output and "'..'" in output


def test_a_model_path_with_dot_dot_is_refused_by_field() -> None:
    with pytest.raises(ValueError) as error:
        ModelFile(path="/srv/models/../m.gguf", sha256=SHA, architecture="llama")
    assert [problem.field for problem in problems_from(error.value)] == ["path"]  # type: ignore[arg-type]


# --- a model's controller source that is not there ------------------------------------------------------


def test_a_missing_controller_source_is_found_by_field(tmp_path: Path) -> None:
    present = tmp_path / "m.gguf"
    present.write_bytes(b"GGUF")
    assert missing_sources(box(source=str(present)), tmp_path) == []
    assert missing_sources(box(source="m.gguf"), tmp_path) == []  # relative: from the inventory file's directory
    assert missing_sources(box(source="https://example.com/m.gguf"), tmp_path) == []  # downloaded on the host
    assert missing_sources(box(), tmp_path) == []  # no source: the host must have it
    [(field, model, where)] = missing_sources(box(source="models/gone.gguf"), tmp_path)
    assert (field, model.path, where) == ("services.0.model", "/srv/models/m.gguf", tmp_path / "models/gone.gguf")
    assert controller_source(model, tmp_path) == where
    host_box = with_missing_sources(HostBox(host="box1", box=box(source="gone.gguf"), problems=[]), tmp_path)
    [problem] = host_box.problems
    assert problem.field == "services.0.model.source"
    assert f"{tmp_path / 'gone.gguf'} is not a file on this machine" in problem.message
    assert "fix the path" in problem.message


@pytest.mark.parametrize("command", ["check", "plan"])
def test_check_and_plan_refuse_a_missing_controller_source(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = llm_inventory(tmp_path, source=str(tmp_path / "nowhere.gguf"))
    assert main([command, str(inventory)]) == 2
    output = capsys.readouterr().out
    assert "services.0.model.source" in output and "nowhere.gguf" in output


# --- `gpubox smoke --api-key-file` ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["smoke", "bench"])
def test_a_missing_api_key_file_is_refused(command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    thresholds = ["--min-tok-s", "1"] if command == "smoke" else []
    url = ["http://127.0.0.1:9"] if command == "smoke" else ["--url", "http://127.0.0.1:9"]
    assert main([command, *url, *thresholds, "--api-key-file", str(tmp_path / "none.key")]) == 2
    output = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert f"refused: --api-key-file {tmp_path / 'none.key'}: No such file or directory" in output
    (tmp_path / "empty.key").write_text("\n")
    assert main([command, *url, *thresholds, "--api-key-file", str(tmp_path / "empty.key")]) == 2
    assert "the first line holds no key" in " ".join(capsys.readouterr().out.split())


# --- what an inventory can get wrong, as gpubox's loader words it ---------------------------------------


def test_an_inventory_path_that_names_no_file_is_no_host_name() -> None:
    missing = missing_inventory_file("inventory/nosuch.py")
    assert missing is not None and "no such inventory file" in missing and "host name" in missing
    assert missing_inventory_file("nosuch.py") is not None
    assert missing_inventory_file("gobierno.gov.py", is_host=lambda name: True) is None  # a host in Paraguay
    for host_names in ("@local", "a.example.com", "host1,host2", "root@10.0.0.1", "inventory/home.py"):
        assert missing_inventory_file(host_names) is None


def test_an_inventory_that_is_no_python_names_its_line(tmp_path: Path) -> None:
    inventory = inventory_file(tmp_path, "hosts = [\n    ('a', {)]\n")
    with pytest.raises(InventoryError, match=rf"^{inventory} line 2: the inventory is not valid Python: "):
        load_inventory(inventory)


def test_a_spec_refused_while_the_inventory_imports_names_its_line_and_field(tmp_path: Path) -> None:
    inventory = llm_inventory(tmp_path, extra=", parallel=0")
    with pytest.raises(InventoryError) as error:
        load_inventory(inventory)
    text = refusal_text(error.value)
    assert text.startswith(f"{inventory} line 4: LlamaServer is refused while the inventory imports\n    parallel: ")


def test_a_host_without_a_box_is_said_to_be_a_likely_wrong_inventory_path() -> None:
    with pytest.raises(InventoryError) as error:
        box_from_host_data(None, "inventory/nosuch.py")
    message = str(error.value)
    assert message.startswith("inventory/nosuch.py: no `box` in the host's data")
    assert "Is the inventory path right?" in message


def test_the_preflight_refuses_what_pyinfra_would_print_as_a_traceback(tmp_path: Path) -> None:
    assert inventory_problem("@local") is None and inventory_problem("a.example.com,b.example.com") is None
    assert inventory_problem(str(llm_inventory(tmp_path))) is None
    assert "no such inventory file" in (inventory_problem("inventory/nosuch.py") or "")
    broken = inventory_file(tmp_path, "hosts = [(\n", name="broken.py")
    assert "is not valid Python" in (inventory_problem(str(broken)) or "")


# --- the real pyinfra CLI ----------------------------------------------------------------------------------


@pytest.fixture
def no_debug_log() -> Any:
    existed = DEBUG_LOG.exists()
    yield
    assert existed or not DEBUG_LOG.exists(), "pyinfra wrote pyinfra-debug.log: an error escaped as internal"


@pytest.mark.parametrize("deploy", ["deploys/danarch4090.py", "deploys/observability.py"])
def test_pyinfra_with_an_inventory_path_that_names_no_file_stops(deploy: str, no_debug_log: None) -> None:
    code, output = pyinfra("-y", "inventory/nosuch.py", deploy)
    assert_one_clean_message(code, output)
    assert "inventory/nosuch.py: no such inventory file (pyinfra would take it for a host name" in output
    assert "Connecting to hosts" not in output


def test_pyinfra_with_an_inventory_that_is_no_python_stops(tmp_path: Path, no_debug_log: None) -> None:
    inventory = inventory_file(tmp_path, "hosts = [\n    ('a', {)]\n")
    code, output = pyinfra("-y", str(inventory), "deploys/danarch4090.py")
    assert_one_clean_message(code, output)
    assert f"{inventory} line 2: the inventory is not valid Python" in output


def test_pyinfra_with_a_bad_field_value_stops_with_the_field(tmp_path: Path, no_debug_log: None) -> None:
    inventory = llm_inventory(tmp_path, extra=', api_key_file="/etc/gpubox/keys/relative/../x.key"')
    code, output = pyinfra("-y", str(inventory), "deploys/danarch4090.py")
    assert_one_clean_message(code, output)
    assert f"{inventory} line 4: LlamaServer is refused while the inventory imports" in output
    assert "\n    api_key_file: Value error, api_key_file must not have a '..' part" in output
    assert "Connecting to hosts" not in output


@pytest.mark.parametrize("deploy", ["deploys/danarch4090.py", "deploys/gemma4_mtp.py", "deploys/observability.py"])
def test_pyinfra_on_a_host_without_a_box_says_the_inventory_path_may_be_wrong(deploy: str, no_debug_log: None) -> None:
    code, output = pyinfra("--dry", "@local", deploy)  # a host pyinfra reaches, with no `box`
    assert_one_clean_message(code, output)
    assert "@local: no `box` in the host's data, so it is no gpubox host. Is the inventory path right?" in output


FAILING_DEPLOY = """
from pyinfra.api import OperationError, operation
from operations.failures import python_step, refusals_fail_cleanly

def smoke_missed():
    print("rolled back: the previous unit runs")
    raise OperationError("gemma4.service failed its smoke test: 3.1 tok/s < 100. The previous unit was restored")

@operation()
def step():
    yield python_step(smoke_missed)

@operation()
@refusals_fail_cleanly
def body():
    raise OperationError("model source /nowhere/m.gguf of /srv/m.gguf is not a file on the controller")
    yield "true"

{call}
"""


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("step()", "gemma4.service failed its smoke test: 3.1 tok/s < 100. The previous unit was restored"),
        ("body()", "model source /nowhere/m.gguf of /srv/m.gguf is not a file on the controller"),
    ],
)
def test_an_operation_failing_while_it_executes_prints_its_message_only(
    call: str, message: str, tmp_path: Path, no_debug_log: None
) -> None:
    """What the smoke test's rollback (python_step) and a model's placement (refusals_fail_cleanly) use:
    with -y the operation fails with its message, the run exits 1, and no traceback is printed."""
    deploy = inventory_file(tmp_path, FAILING_DEPLOY.format(call=call), name="deploy.py")
    code, output = pyinfra("-y", "@local", str(deploy))
    assert_one_clean_message(code, output)
    assert f"[@local] {message}" in output
    assert "<Greenlet" not in output
