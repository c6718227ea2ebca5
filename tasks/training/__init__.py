"""The training worker and what it stands on: the spec it reads, the rows it trains on, its checkpoints.

`python -m tasks.training.worker` trains one run (see worker.py); `python -m tasks.training.prebuild`
compiles DeepSpeed's CPU comm op ahead of the first run.
"""

import os
import shutil
import sys

# DeepSpeed's JIT-compiled ops are built once per virtual environment, in it, with its own ninja. Torch's shared cache
# (~/.cache/torch_extensions) was rebuilt (40-95 s) whenever a process of another environment loaded the op, or one
# that found another ninja first on PATH (Debian's 1.11 and the venv's 1.13 log builds differently).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
_BIN = os.path.dirname(sys.executable)
if shutil.which("ninja", path=_BIN) and not os.environ.get("PATH", "").startswith(_BIN + os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
