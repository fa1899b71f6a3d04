"""pyinfra deploy used by scripts/gpu-validate: the real `source_build.build` on @local, no apt.

The LlamaCppBuild comes as JSON in the file named by GPUBOX_VALIDATE_BUILD (the script pins the
commit it read on the machine there). Run: pyinfra -y @local scripts/gpu_validate/build_deploy.py
"""

import json
import os
from pathlib import Path

from gpubox.spec import LlamaCppBuild
from operations.source_build import build

spec = LlamaCppBuild.model_validate(json.loads(Path(os.environ["GPUBOX_VALIDATE_BUILD"]).read_text()))
build(spec, with_dependencies=False)
