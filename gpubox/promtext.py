"""Parse Prometheus text exposition (llama-server's `GET /metrics`) into sample values.

Only what gpubox reads is supported: `# HELP`/`# TYPE` comments are skipped, and each sample
line `name{labels} value [timestamp]` becomes one entry keyed by `name` or `name{labels}` exactly
as written. llama-server prints values with C++ stream formatting (`12`, `0.5`, `1.2e+06`).
"""

from __future__ import annotations


class PrometheusTextError(ValueError):
    """A sample line that is not `name value`."""


def _sample_key_and_rest(line: str) -> tuple[str, str]:
    """Split a sample line after its name (and its `{labels}`, which may contain spaces)."""
    brace = line.find("{")
    space = line.find(" ")
    if brace >= 0 and (space < 0 or brace < space):
        closing = line.find("}", brace)
        if closing < 0:
            raise PrometheusTextError(f"unterminated labels in metrics line {line!r}")
        return line[: closing + 1], line[closing + 1 :]
    key, _, rest = line.partition(" ")
    return key, rest


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Sample values by name (with labels when present); later duplicates win."""
    samples: dict[str, float] = {}
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        key, rest = _sample_key_and_rest(line)
        fields = rest.split()
        if not fields:
            raise PrometheusTextError(f"metrics line without a value: {line!r}")
        try:
            samples[key] = float(fields[0])
        except ValueError as error:
            raise PrometheusTextError(f"metrics value is not a number in {line!r}") from error
    return samples
