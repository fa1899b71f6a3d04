"""pyinfra's floor: a deploy with no operations (tests.testbed.bench_noop times the CLI, the SSH
connection and this file against the demo box's no-op on the same host)."""
