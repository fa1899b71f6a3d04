"""pyinfra-testing fixtures: one folder per fact (``<module>.<Fact>``) of command/output/fact JSON files.

Most outputs were captured by running the fact's command on a real machine (see each file's
``_note`` where the output came from elsewhere).
"""

import json
from pathlib import Path

from pyinfra_testing.facts import make_fact_tests

HERE = Path(__file__).parent

for folder in sorted(path for path in HERE.iterdir() if path.is_dir() and "." in path.name):
    test_case = make_fact_tests("facts", folder.name, folder)
    globals()[f"TestFact_{folder.name.replace('.', '_')}"] = test_case
del test_case


def test_the_llama_server_help_fixture_is_the_captured_help() -> None:
    """The pinned llama-server's ``--help`` is in the fact fixture (whose ``fact`` the operation fixtures
    name) and in ``tests/fixtures/llamacpp`` (which the unit tests parse): the same lines, both places."""
    captured = (HERE.parent / "fixtures" / "llamacpp" / "server-help-0c1e57098.txt").read_text().splitlines()
    fixture = json.loads((HERE / "llamacpp.LlamaServerFlags" / "help_0c1e57098.json").read_text())
    assert fixture["output"] == captured
