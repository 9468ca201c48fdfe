"""Test-session set-up: 8 simulated CPU devices for the sharding tests, and
no GPU memory preallocation in pytest-xdist workers.

XLA reads both settings when a backend starts (the first jax.devices() or
computation), so they are set here, before any test runs.

* --xla_force_host_platform_device_count=8: single-device tests are
  unaffected (arrays live on device 0 unless a test shards them); on a GPU
  machine the flag only adds CPU devices, the default backend stays the GPU.
* XLA_PYTHON_CLIENT_PREALLOCATE=false in an xdist worker (the README's
  `pytest -n 2`): each JAX process otherwise takes 75% of the GPU's memory
  when it starts, so a second worker on the same card runs out of memory
  (JAX's "GPU memory allocation" page lists concurrent processes as the
  first cause). A value the user set is kept. No effect on CPU.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

if "PYTEST_XDIST_WORKER" in os.environ:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
