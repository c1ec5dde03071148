"""Test-wide settings (set before jax initialises). XLA flags stay at their defaults: a faster
compile setting (`--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1`) crashed
XLA's CPU compiler on a scan in this jax version, so the suite does not use it."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
