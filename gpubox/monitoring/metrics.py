"""Every metric name gpubox's monitoring reads or writes, in one place.

llama-server's (``--metrics``, tools/server/server-task.cpp at the pinned commit): counters only for
rates. Its ``llamacpp:predicted_tokens_seconds`` gauge restarts its window on every ``/metrics``
read, so Prometheus and the smoke test would steal each other's window: never read it.

gpubox's own, written by the GPU textfile script on each host (node-exporter's textfile
collector publishes them under job ``node@<host>``):

| metric | type | labels | what |
| --- | --- | --- | --- |
| ``gpubox_gpu_memory_used_bytes`` | gauge | gpu, uuid, name | nvidia-smi memory.used |
| ``gpubox_gpu_memory_total_bytes`` | gauge | gpu, uuid, name | nvidia-smi memory.total |
| ``gpubox_gpu_utilization_ratio`` | gauge | gpu, uuid, name | utilization.gpu / 100 |
| ``gpubox_gpu_temperature_celsius`` | gauge | gpu, uuid, name | temperature.gpu |
| ``gpubox_gpu_power_watts`` | gauge | gpu, uuid, name | power.draw (absent when [N/A]) |
| ``gpubox_gpu_planned_memory_bytes`` | gauge | gpu | the VRAM plan's total for the GPU (services + reserve) |
| ``gpubox_gpu_service_info`` | gauge (1) | gpu, service, unit | which service is pinned to which GPU |
| ``gpubox_nvidia_smi_up`` | gauge | | 1 when nvidia-smi answered, 0 when it failed (driver gone) |
| ``gpubox_unit_active`` | gauge | service, unit | 1 when systemd says the unit is active |
| ``gpubox_unit_restarts_total`` | counter | service, unit | systemd's NRestarts of the unit |
| ``gpubox_textfile_updated_timestamp_seconds`` | gauge | | when the script last wrote the file |

The blackbox exporter's ``probe_success`` (1 when the TCP connect succeeded) of each RPC probe, labelled
``host`` (the client host), ``kind="rpc-probe"``, ``service`` (the llama-server), ``rpc`` and ``endpoint``.

HAProxy 2.6's own exporter on a gateway host (``job="gateway@<host>"``, ``kind="gateway"``), as recorded in
tests/fixtures/haproxy/exporter-metrics.txt: ``proxy`` is a model group's backend (``group_<name>``) and
``server`` a backend llama-server (``<host>:<service>``). Its states are state sets: one series per ``state``,
1 for the current one (``haproxy_server_status{state="UP"}`` is 1 while the server takes requests; a drained
one is ``DRAIN``, a failed one ``DOWN``, one in maintenance ``MAINT``). A backend's ``current_queue`` holds the
requests waiting for a free slot (``maxconn``: the llama-server's ``parallel``) with no server chosen yet, a
server's those waiting for it.
"""

from __future__ import annotations

# llama-server's counters (names as exposed, with the ``llamacpp:`` prefix).
LLAMA_TOKENS_PREDICTED = "llamacpp:tokens_predicted_total"
LLAMA_TOKENS_PREDICTED_SECONDS = "llamacpp:tokens_predicted_seconds_total"
LLAMA_DRAFT_TOKENS = "llamacpp:spec_decode_num_draft_tokens_total"
LLAMA_ACCEPTED_TOKENS = "llamacpp:spec_decode_num_accepted_tokens_total"
LLAMA_REQUESTS_PROCESSING = "llamacpp:requests_processing"
LLAMA_REQUESTS_DEFERRED = "llamacpp:requests_deferred"

# gpubox's textfile metrics.
GPU_MEMORY_USED = "gpubox_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL = "gpubox_gpu_memory_total_bytes"
GPU_UTILIZATION = "gpubox_gpu_utilization_ratio"
GPU_TEMPERATURE = "gpubox_gpu_temperature_celsius"
GPU_POWER = "gpubox_gpu_power_watts"
GPU_PLANNED_MEMORY = "gpubox_gpu_planned_memory_bytes"
GPU_SERVICE_INFO = "gpubox_gpu_service_info"
NVIDIA_SMI_UP = "gpubox_nvidia_smi_up"
UNIT_ACTIVE = "gpubox_unit_active"
UNIT_RESTARTS = "gpubox_unit_restarts_total"
TEXTFILE_UPDATED = "gpubox_textfile_updated_timestamp_seconds"

# The blackbox exporter's (its TCP probes of RPC servers, under jobs ``rpc-probe:...``).
PROBE_SUCCESS = "probe_success"

# HAProxy's exporter (a gateway host's ``frontend stats``, gpubox.haproxy).
HAPROXY_SERVER_STATUS = "haproxy_server_status"
HAPROXY_SERVER_SESSIONS = "haproxy_server_current_sessions"
HAPROXY_SERVER_QUEUE = "haproxy_server_current_queue"
HAPROXY_BACKEND_QUEUE = "haproxy_backend_current_queue"
HAPROXY_SERVER_RESPONSES = "haproxy_server_http_responses_total"
HAPROXY_SERVER_CONNECTION_ERRORS = "haproxy_server_connection_errors_total"
HAPROXY_SERVER_RESPONSE_ERRORS = "haproxy_server_response_errors_total"
HAPROXY_SERVER_RESPONSE_TIME = "haproxy_server_response_time_average_seconds"
HAPROXY_STATE_UP = "UP"

TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
"""Where Debian's prometheus-node-exporter reads ``*.prom`` files (its textfile collector's default)."""
TEXTFILE_NAME = "gpubox.prom"
