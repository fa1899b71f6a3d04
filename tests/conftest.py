"""The whole suite: pyinfra's CLI package is imported without its gevent ``patch_all()``.

pyinfra_testing (the fact and operation fixtures) imports ``pyinfra_cli``, whose package ``__init__``
monkey-patches the stdlib for gevent; by then the e2e modules have imported requests (and its ssl),
which gevent warns may break. Nothing in the tests runs pyinfra's CLI in this process (deploys run in a
subprocess), so the package is imported here first, unpatched, as ``gpubox check`` imports it.
"""

from gpubox.inventory import import_pyinfra_cli_without_gevent_patching

import_pyinfra_cli_without_gevent_patching()
