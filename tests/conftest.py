"""Shared test setup: quiet TensorFlow, two logical CPU devices for distribution tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The test processes (pytest-xdist) share a GPU when there is one: each takes only what
# it uses instead of nearly all of its memory.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

import tensorflow as tf  # noqa: E402

# Split the CPU into two logical devices before anything initialises the runtime, so the
# distribution tests can run MirroredStrategy with two replicas in the same process.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # runtime already initialised by an earlier import
    pass


import pytest  # noqa: E402

_TWO_REPLICAS = []


@pytest.fixture(scope="session")
def two_replicas():
    """One MirroredStrategy over the two logical CPUs, shared by every test.

    Separate MirroredStrategy objects in one process reuse collective instance keys, and
    their all-reduces can then be matched with each other's; one shared strategy avoids it.
    """
    if not _TWO_REPLICAS:
        _TWO_REPLICAS.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _TWO_REPLICAS[0]


@pytest.fixture(autouse=True)
def clean_gin():
    """Every test starts and ends with no gin bindings (tests parse their own configs)."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()
