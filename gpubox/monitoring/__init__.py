"""Fleet monitoring derived from the inventory: Prometheus configs, alert rules, GPU metrics, dashboards.

Nothing here is written by hand per fleet: every target, label, threshold and planned VRAM figure
comes from the hosts' ``Box`` specs and the fleet's ``Monitoring`` spec (:mod:`.spec`), gathered in a
:class:`~gpubox.monitoring.fleet.Fleet`.
"""
