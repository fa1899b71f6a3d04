"""pyinfra's config file: pyinfra runs it from the directory it is started in, before it loads the inventory.

gpubox reads the inventory here first (operations/preflight.py): an inventory path that names no file,
an inventory that is not valid Python or raises while it imports (a refused spec: a bad field value)
stop the run with one message naming what to fix, where pyinfra would print a traceback, or deploy
nothing and exit 0 for a path it took for a host name. Run pyinfra from this directory.
"""

from operations.preflight import check_inventory_argument

check_inventory_argument()
