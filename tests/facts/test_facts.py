"""pyinfra-testing fixtures: one folder per fact (``<module>.<Fact>``) of command/output/fact JSON files.

Most outputs were captured by running the fact's command on a real machine (see each file's
``_note`` where the output came from elsewhere).
"""

from pathlib import Path

from pyinfra_testing.facts import make_fact_tests

HERE = Path(__file__).parent

for folder in sorted(path for path in HERE.iterdir() if path.is_dir() and "." in path.name):
    test_case = make_fact_tests("facts", folder.name, folder)
    globals()[f"TestFact_{folder.name.replace('.', '_')}"] = test_case
del test_case
