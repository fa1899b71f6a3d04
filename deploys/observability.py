"""Watch a fleet: node-exporter, GPU metrics and a Prometheus on every host, rules and alerts on the monitor.

    pyinfra inventory/home.py deploys/observability.py              # converge
    pyinfra inventory/home.py deploys/observability.py --dry --diff # show every generated file's change

Everything is derived from the inventory: each host's `box` (its services, GPUs, ports, smoke
thresholds) and the `monitoring` spec the hosts carry (gpubox.monitoring.Monitoring: which host runs
Prometheus, its address, intervals, retention, the Alertmanager webhook). A refused fleet (the
monitor not in the inventory, a port clash, a duplicate scrape job) stops before any operation runs.
`gpubox monitoring INVENTORY --out DIR` writes the same files without touching a host.
"""

from pyinfra import host

from operations import deploy_lock, monitoring
from operations.deploy_inputs import inventory_fleet

fleet = inventory_fleet()  # no `box` here (a wrong inventory path?) or a refused fleet: one message
deploy_lock.acquire()  # the box deploys' lock: one deploy at a time per host
monitoring.observe(fleet, host.name)
