"""Write or change the config inventory/testbed.py reads, for the test host `python -m tests.testbed up` booted.

    scripts/testbed_config.py --fresh            a new config (new free ports) for the host `up` booted
    scripts/testbed_config.py KEY=VALUE ...      change the existing config: ports and earlier changes kept
                                                 (VALUE as JSON, e.g. spec_draft_n_max=2)

The file is $GPUBOX_TESTBED_CONFIG, else .cache/testbed.json; a wrong key or value is refused by name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests.testbed

from tests.testbed.config import TestbedConfig, config_path, parse_assignments  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/testbed_config.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fresh", action="store_true", help="a new config for the host `up` booted")
    parser.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    path = config_path()
    try:
        overrides = parse_assignments(args.assignments)
        if args.fresh:
            from tests.testbed.demo import fresh_config  # the assets: only for a new config

            before = None
            config = fresh_config().changed(**overrides)
        elif not path.exists():
            print(f"no test-host config at {path}: write one with `{parser.prog} --fresh`", file=sys.stderr)
            return 2
        else:
            before = TestbedConfig.read(path)
            config = before.changed(**overrides)
    except ValueError as error:  # pydantic's ValidationError is one
        print(f"{path}: {error}", file=sys.stderr)
        return 2
    config.write(path)
    if before is None:
        print(f"wrote {path} for {config.host_name}")
    for key in overrides:
        old = "(unset)" if before is None else getattr(before, key)
        print(f"{key}: {old} -> {getattr(config, key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
