"""Test set-up: two logical CPU devices so MirroredStrategy can be tested on CPU.

The logical devices must be configured before TensorFlow initialises its
runtime, which is why this happens at import time of the conftest.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices('CPU')
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_TWO_REPLICAS = None


def two_replica_strategy():
  """The one MirroredStrategy over the two logical CPUs of this process.

  Several MirroredStrategy instances in one process reuse collective keys and
  then clash ("Collective instance ... expected data_type"), so every test
  shares this one.
  """
  global _TWO_REPLICAS
  if _TWO_REPLICAS is None:
    _TWO_REPLICAS = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  return _TWO_REPLICAS


@pytest.fixture(name='two_replicas')
def two_replicas_fixture():
  return two_replica_strategy()


def assert_same_value_and_gradient(variable, loss_fn, reference_fn):
  """loss_fn() and reference_fn(), scalars computed from the float64
  `variable`, agree to rounding in value and in gradient."""
  with tf.GradientTape(persistent=True) as tape:
    value = loss_fn()
    expected = reference_fn()
  np.testing.assert_allclose(value.numpy(), expected.numpy(), rtol=1e-12)
  np.testing.assert_allclose(tape.gradient(value, variable).numpy(),
                             tape.gradient(expected, variable).numpy(),
                             rtol=1e-10, atol=1e-14)
