"""`python -m flows` with 64x64-pixel frames: the product path for tests on the tiny checkpoint.

The tiny model (model/tiny.py) takes any frame size that is a multiple of 16, but at the 480p
bucket's ~400,000 pixels its VAE alone costs minutes a clip on a CPU. So the tests run the
command through this module, which shrinks the resolution buckets' area to 64x64 before the
command starts; every other line that runs (the CLI, the Prefect flow, the Ray pool and its
workers, the stage, stitching) is the product's own. Workers need no such change: they render
the frame size each segment job carries.

    python -m cli_small_frames run manifest.csv --out OUT --checkpoint TINY --device cpu
"""

from __future__ import annotations

import runpy

from tasks.records import Resolution

Resolution.max_area = property(lambda self: 64 * 64)
runpy.run_module("flows", run_name="__main__", alter_sys=True)
