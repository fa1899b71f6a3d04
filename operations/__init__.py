"""gpubox's pyinfra operations. Importing them makes two of pyinfra's per-operation steps cheaper, with
the same results (``pyinfra_internals``): its CLI orders operations by walking the call stack's frames
rather than through ``inspect.stack()`` (~3 ms an operation less), and its global arguments' types are
worked out once rather than for every operation (~0.5 ms)."""

from .pyinfra_internals import use_global_arguments_once, use_operation_order

use_operation_order()
use_global_arguments_once()
