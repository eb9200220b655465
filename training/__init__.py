"""torch: backbones, the dual-head model with its frozen simplex-ETF projector, losses and the trainer."""

import os

# OpenMP threads that spin while waiting (libgomp's default) collapse when the cores are shared:
# measured on 2 busy cores, a training step took 1.7 s with spinning threads and 0.3 s with
# passive ones. Only takes effect if torch is not imported yet; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
