"""Test-wide settings. XLA CPU flags are set before jax initialises: the suite is dominated by
compiling many small programs, and these options compile 2-3x faster (numerics stay fp32; the
parity tolerances are unchanged). Subprocess tests set their own XLA_FLAGS."""

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
