"""`gpubox check`: the seed's inventory passes; broken copies are refused by field name, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpubox.cli import main

ROOT = Path(__file__).resolve().parent.parent
HOME = (ROOT / "inventory" / "home.py").read_text()


def write_inventory(tmp_path: Path, text: str) -> str:
    path = tmp_path / "inventory.py"
    path.write_text(text)
    return str(path)


def test_home_inventory_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "inventory" / "home.py")]) == 0
    out = capsys.readouterr().out
    for cell in ("danarch4090", "gemma4", "8080", "draft-mtp", "262144", "q8_0/q8_0"):
        assert cell in out


def test_the_homes_monitoring_is_checked_with_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "inventory" / "home.py")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "monitoring: Prometheus on danarch4090 (http://danarch4090:9090), 1 host(s), 2 scrape jobs" in out
    broken = HOME.replace('Monitoring(monitor="danarch4090")', 'Monitoring(monitor="danarch4090", port=8080)')
    assert broken != HOME
    assert main(["check", write_inventory(tmp_path, broken)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "monitoring.port" in out and "port 8080 is taken on danarch4090 by service 'gemma4'" in out


@pytest.mark.parametrize(
    ("old", "new", "field", "advice"),
    [
        ("parallel=1,", "parallel=4,", "parallel", "parallel trap"),
        ('flash_attn="on"', 'flash_attn="off"', "flash_attn", "flash_attn='on'"),
        ('spec_type="draft-mtp"', 'spec_type="none"', "spec_type", "never drafts"),
    ],
)
def test_broken_home_is_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, field: str, advice: str
) -> None:
    assert old in HOME
    inventory = write_inventory(tmp_path, HOME.replace(old, new))
    assert main(["check", inventory]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert field in out
    assert advice in out


def test_dict_boxes_report_every_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = """
good = {"llama_cpp": {"commit": "a" * 40}, "services": [{"name": "s", "model": {
    "path": "/m.gguf", "sha256": "b" * 64, "architecture": "llama"}}]}
bad = {"llama_cpp": {"commit": "abc"}, "services": [{"name": "s", "port": 70000, "model": {
    "path": "m.gguf", "sha256": "b" * 64, "architecture": "llama"}}]}
boxes = [("one", {"box": good}), ("two", {"box": bad}), "plain-host"]
"""
    assert main(["check", write_inventory(tmp_path, text)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    for text_seen in ("two", "llama_cpp.commit", "services.0.port", "services.0.model.path"):
        assert text_seen in out
    assert "│ one " not in out
    assert "at least 1 item" not in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("import no_such_module\nhosts = ['a']\n", "does not import"),
        ("hosts = []\n", "no host lists"),
        ("hosts = ['a', 'b']\n", "no host carries a `box`"),
    ],
)
def test_unusable_inventory(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    assert main(["check", write_inventory(tmp_path, text)]) == 2
    assert message in " ".join(capsys.readouterr().out.split())


def test_missing_inventory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "/nonexistent/inventory.py"]) == 2
    assert "no such inventory file" in capsys.readouterr().out


# ----------------------------------------------------------------------------- group_data/, as pyinfra reads it

BOX_IN_GROUP_DATA = """
from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile
box = Box(
    llama_cpp=LlamaCppBuild(commit="a" * 40),
    services=(LlamaServer(name="grouped", port=8181, parallel=PARALLEL, model=ModelFile(
        path="/srv/models/m.gguf", sha256="b" * 64, architecture="llama")),),
)
"""


@pytest.mark.parametrize("data_file", ["all.py", "gpus.py", "inventory.py"])
def test_a_box_in_group_data_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str], data_file: str) -> None:
    """pyinfra merges group_data/<group>.py (all, a group, the inventory file's name) into the host's data."""
    inventory = write_inventory(tmp_path, 'gpus = ["gpu-box"]\n')
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / data_file).write_text(BOX_IN_GROUP_DATA.replace("PARALLEL", "1"))
    assert main(["check", inventory]) == 0
    out = capsys.readouterr().out
    assert "gpu-box" in out and "grouped" in out and "8181" in out


def test_a_refused_box_in_group_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory(tmp_path, 'gpus = ["gpu-box"]\n')
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / "gpus.py").write_text(
        'box = {"llama_cpp": {"commit": "abc"}, "services": [{"name": "s", "model": {'
        '"path": "/m.gguf", "sha256": "b" * 64, "architecture": "llama"}}]}\n'
    )
    assert main(["check", inventory]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "gpu-box" in out and "llama_cpp.commit" in out


def test_a_box_refused_while_group_data_imports_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = write_inventory(tmp_path, 'gpus = ["gpu-box"]\n')
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / "all.py").write_text(
        BOX_IN_GROUP_DATA.replace("PARALLEL", "4").replace("port=8181,", 'port=8181, spec_type="ngram-simple",')
    )
    assert main(["check", inventory]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "group_data/all.py" in out and "parallel trap" in out


def test_group_data_that_does_not_import_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory(tmp_path, 'gpus = ["gpu-box"]\n')
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / "all.py").write_text("import no_such_module\n")
    assert main(["check", inventory]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "group_data/all.py" in out and "does not import" in out and "no_such_module" in out


def test_host_data_overrides_group_data_as_in_pyinfra(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpubox.inventory import load_inventory

    inventory = write_inventory(tmp_path, 'gpus = [("gpu-box", {"port": 1}), "other"]\n')
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / "all.py").write_text("port = 2\nregion = 'home'\n")
    (tmp_path / "group_data" / "gpus.py").write_text("port = 3\n")
    hosts = {host.name: host for host in load_inventory(inventory)}
    assert hosts["gpu-box"].data["port"] == 1 and hosts["other"].data["port"] == 3
    assert hosts["other"].data["region"] == "home" and "gpus" in hosts["other"].groups
