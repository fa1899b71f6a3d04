"""gpubox.quoting on a booted systemd: what a unit written with the escapers delivers, byte for byte.

One oneshot unit carries every nasty value three ways: as an `ExecStart=` word, as an
`Environment=` value and (as a directory name) as a `ReadOnlyPaths=` entry. Its program is a tiny
script that records its argv, its GPUBOX_* environment and which directories it can write to;
systemd's own view of the unit is read back over D-Bus. The offline checks of the parser are in
tests/test_quoting.py; this one adds what only a running manager does: `$` expansion at spawn time
and the read-only mounts.
"""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from gpubox.quoting import environment_assignment, exec_word, path_list_entry, shell_join, shell_word
from tests.test_quoting import PATH_VALUES, UNIT_VALUES, split_quoted_words
from tests.testbed import TestHost

pytestmark = pytest.mark.e2e

UNIT = "gpubox-quoting.service"
BUS_PATH = "/org/freedesktop/systemd1/unit/gpubox_2dquoting_2eservice"
ARGDUMP = "/usr/local/bin/gpubox-argdump"
DUMP = "/run/gpubox-argdump.json"
DIRS_FILE = "/etc/gpubox-argdump-dirs.json"
CONTROL_DIR = "/srv/q-control"

# Variables that are set in the service, named in ExecStart words that must NOT expand them.
VALUES = [*UNIT_VALUES, "$GPUBOX_T0", "${GPUBOX_T0}", "pre$GPUBOX_T0post", "$PATH", "%n"]

ARGDUMP_SCRIPT = f"""#!/usr/bin/python3
import json, os, sys

with open({DIRS_FILE!r}) as stream:
    directories = json.load(stream)
writable = {{}}
for directory in directories:
    probe = os.path.join(directory, ".gpubox-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o600))
        os.unlink(probe)
        writable[directory] = True
    except OSError as error:
        writable[directory] = os.strerror(error.errno)
environment = {{key: value for key, value in os.environ.items() if key.startswith("GPUBOX_")}}
with open({DUMP!r}, "w") as stream:
    json.dump({{"argv": sys.argv[1:], "environment": environment, "writable": writable}}, stream)
"""


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def _put(host: TestHost, path: str, data: str, mode: str = "0644") -> None:
    encoded = base64.b64encode(data.encode()).decode()
    _ok(host.run(f"echo {encoded} | base64 -d > {shell_word(path)} && chmod {mode} {shell_word(path)}"))


def _unit() -> str:
    environment = "".join(
        f"Environment={environment_assignment(f'GPUBOX_T{index}', value)}\n" for index, value in enumerate(VALUES)
    )
    return (
        "[Unit]\nDescription=gpubox quoting probe\n\n[Service]\nType=oneshot\n"
        f"{environment}"
        f"ReadOnlyPaths={' '.join(path_list_entry(path) for path in PATH_VALUES)}\n"
        f"ExecStart={ARGDUMP} {' '.join(exec_word(value) for value in VALUES)}\n"
    )


def _bus_property(host: TestHost, interface: str, name: str) -> object:
    out = _ok(host.run(f"busctl --json=short get-property org.freedesktop.systemd1 {BUS_PATH} {interface} {name}"))
    return json.loads(out)["data"]


@pytest.fixture(scope="module")
def probed(test_host: TestHost) -> dict[str, object]:
    """Write the directories, the program and the unit; start it; return the program's record."""
    directories = [*PATH_VALUES, CONTROL_DIR]
    _ok(test_host.run(f"mkdir -p {shell_join(directories)}"))
    _put(test_host, DIRS_FILE, json.dumps(directories))
    _put(test_host, ARGDUMP, ARGDUMP_SCRIPT, mode="0755")
    _put(test_host, f"/etc/systemd/system/{UNIT}", _unit())
    _ok(test_host.run(f"rm -f {DUMP} && systemctl daemon-reload"))
    started = test_host.run(f"systemctl start {UNIT}")
    if started.returncode != 0:
        journal = test_host.run(f"journalctl -u {UNIT} -n 50 --no-pager").stdout
        pytest.fail(f"{UNIT} failed to start:\n{started.stderr}\n{journal}")
    record: dict[str, object] = json.loads(_ok(test_host.run(f"cat {DUMP}")))
    return record


def test_systemd_loads_the_unit_without_a_warning(test_host: TestHost, probed: dict[str, object]) -> None:
    # PID 1 logs an ignored setting as "<file>:<line>: ...".
    unit_file = shell_word(f"/etc/systemd/system/{UNIT}:")
    warnings = test_host.run(f"journalctl -b --no-pager -o cat _PID=1 | grep -F {unit_file}")
    assert warnings.stdout == ""
    assert _ok(test_host.run(f"systemctl show -p LoadState --value {UNIT}")).strip() == "loaded"
    assert _ok(test_host.run(f"systemctl show -p Result --value {UNIT}")).strip() == "success"


def test_the_journal_shows_a_naive_unit_warned_about(test_host: TestHost) -> None:
    """The warning check above has teeth: an unquoted path with a space is warned about and split."""
    naive = "gpubox-quoting-naive.service"
    unit = "[Service]\nType=oneshot\nReadOnlyPaths=/srv/q/with space\nExecStart=/bin/true\n"
    _put(test_host, f"/etc/systemd/system/{naive}", unit)
    _ok(test_host.run("systemctl daemon-reload"))
    # Loading the unit (systemctl show) is what parses it and logs the warning.
    shown = _ok(test_host.run(f"systemctl show -p ReadOnlyPaths --value {naive}"))
    assert split_quoted_words(shown.removesuffix("\n")) == ["/srv/q/with"]
    unit_file = shell_word(f"/etc/systemd/system/{naive}:")
    warnings = test_host.run(f"journalctl -b --no-pager -o cat _PID=1 | grep -F {unit_file}").stdout
    assert "ReadOnlyPaths= path is not absolute, ignoring: space" in warnings


def test_every_exec_word_arrives_byte_exact(probed: dict[str, object]) -> None:
    assert probed["argv"] == VALUES


def test_every_environment_value_arrives_byte_exact(test_host: TestHost, probed: dict[str, object]) -> None:
    expected = {f"GPUBOX_T{index}": value for index, value in enumerate(VALUES)}
    assert probed["environment"] == expected
    assert _bus_property(test_host, "org.freedesktop.systemd1.Service", "Environment") == [
        f"{key}={value}" for key, value in expected.items()
    ]


def test_every_read_only_path_is_one_path(test_host: TestHost, probed: dict[str, object]) -> None:
    assert _bus_property(test_host, "org.freedesktop.systemd1.Service", "ReadOnlyPaths") == PATH_VALUES
    # systemctl quotes the list's words the way the manager's dump does.
    shown = _ok(test_host.run(f"systemctl show -p ReadOnlyPaths --value {UNIT}"))
    assert split_quoted_words(shown.removesuffix("\n")) == PATH_VALUES


def test_every_read_only_path_is_mounted_read_only(probed: dict[str, object]) -> None:
    writable = probed["writable"]
    assert isinstance(writable, dict)
    assert writable.pop(CONTROL_DIR) is True, "the control directory must be writable: the probe checks nothing"
    assert writable == {path: "Read-only file system" for path in PATH_VALUES}
