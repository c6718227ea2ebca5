"""Compile DeepSpeed's CPU shared-memory comm op ahead of time: `python -m tasks.training.prebuild`.

DeepSpeed JIT-compiles this op (40-95 s) the first time a process group starts on the CPU accelerator;
doing it at setup keeps that out of the first training run. The result is cached in the virtual environment
(TORCH_EXTENSIONS_DIR, set by tasks.training), so a second call only loads it. This never fails: where the op does
not apply, DeepSpeed uses plain gloo; where it cannot be built, this says why and leaves it to run time.
"""

import sys
import time
from pathlib import Path


def main() -> int:
    started = time.time()
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory

        accelerator = get_accelerator()
        if accelerator.device_name() != "cpu":
            print(f"prebuild: the accelerator is {accelerator.device_name()}: the CPU comm op is not used")
            return 0
        builder = accelerator.create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            print("prebuild: DeepSpeed's shared-memory comm op does not fit this machine; training will use plain gloo")
            return 0
        build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
        builder.load(verbose=False)  # compiles unless this DeepSpeed's build is cached already
    except Exception as e:  # must not stop `make setup`; the first training run will show the same error
        print(f"prebuild: could not build DeepSpeed's shared-memory comm op ({type(e).__name__}: {e}); "
              "DeepSpeed will try again when the first CPU training run starts")
        return 0
    print(f"prebuild: DeepSpeed's shared-memory comm op ready in {time.time() - started:.1f} s ({build_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
