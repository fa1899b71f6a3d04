"""Services a deploy put live whose smoke test has not passed yet (`gpubox.unverified`).

pyinfra @host fact facts.unverified.UnverifiedServices
"""

from __future__ import annotations

from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox.unverified import MARK_DIR, Mark, marks_command, parse_marks


class UnverifiedServices(FactBase[list[Mark]]):
    """
    Every mark under ``/var/lib/gpubox/unverified`` (``gpubox.unverified.Mark``): a service restarted
    or started by a run that did not see its smoke test pass (it was cut). ``[]`` when there is none.
    """

    @override
    def command(self, mark_dir: str = MARK_DIR) -> str:
        return marks_command(mark_dir)

    @override
    def process(self, output: list[str]) -> list[Mark]:
        return parse_marks(output)

    @staticmethod
    @override
    def default() -> list[Mark]:
        return []
