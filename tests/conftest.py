"""Test-session set-up: 8 simulated CPU devices for the sharding tests.

XLA reads the flag when the CPU backend starts (the first jax.devices() or
computation), so it is set here, before any test runs. Single-device tests
are unaffected: arrays live on device 0 unless a test shards them. On a GPU
machine the flag only adds CPU devices; the default backend stays the GPU.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
