"""NT-Xent against NumPy, its gradient, cross-replica equivalence, registry."""

import numpy as np
import pytest
import tensorflow as tf

import objective as obj_lib

TAU = 0.5


def numpy_nt_xent(z1, z2, tau):
  """Independent NT-Xent: mean over i of (loss_a_i + loss_b_i)."""
  z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  n = len(z1)
  total = 0.0
  for a, b in ((z1, z2), (z2, z1)):
    for i in range(n):
      logits = [a[i] @ b[j] / tau for j in range(n)]
      logits += [a[i] @ a[j] / tau for j in range(n) if j != i]
      logits = np.array(logits)
      total += -logits[i] + np.log(np.sum(np.exp(logits)))
  return total / n


def numeric_grad(fn, x, eps=1e-6):
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[idx] += eps
    minus[idx] -= eps
    grad[idx] = (fn(plus) - fn(minus)) / (2 * eps)
  return grad


def _views(seed=0, n=6, d=5):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)), rng.normal(size=(n, d))


def test_nt_xent_loss_matches_numpy():
  z1, z2 = _views()
  loss, logits_ab, labels = obj_lib.add_contrastive_loss(
      tf.constant(np.concatenate([z1, z2])), hidden_norm=True,
      temperature=TAU)
  np.testing.assert_allclose(loss.numpy(), numpy_nt_xent(z1, z2, TAU),
                             rtol=1e-10)
  assert logits_ab.shape == (6, 6)
  assert labels.shape == (6, 12)
  np.testing.assert_array_equal(np.argmax(labels, 1), np.arange(6))


def test_nt_xent_gradient_matches_numeric():
  z1, z2 = _views(seed=1, n=4, d=3)
  hidden = tf.Variable(np.concatenate([z1, z2]))
  with tf.GradientTape() as tape:
    loss, _, _ = obj_lib.add_contrastive_loss(hidden, temperature=TAU)
  grad = tape.gradient(loss, hidden).numpy()
  expected = numeric_grad(
      lambda h: numpy_nt_xent(h[:4], h[4:], TAU), hidden.numpy())
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_no_normalisation_uses_raw_dot_products():
  z1, z2 = _views(seed=2, n=3, d=4)
  loss, logits_ab, _ = obj_lib.add_contrastive_loss(
      tf.constant(np.concatenate([z1, z2])), hidden_norm=False,
      temperature=1.0)
  np.testing.assert_allclose(logits_ab.numpy(), z1 @ z2.T, rtol=1e-12)
  del loss


def test_two_replicas_equal_one_replica_loss_and_gradients(two_replicas):
  z1, z2 = _views(seed=3, n=8, d=4)
  strategy = two_replicas
  b = 4

  def replica_fn(local_z1, local_z2):
    with tf.GradientTape() as tape:
      tape.watch([local_z1, local_z2])
      loss, _, _ = obj_lib.nt_xent_loss(
          tf.math.l2_normalize(local_z1, -1),
          tf.math.l2_normalize(local_z2, -1), TAU)
      scaled = loss / strategy.num_replicas_in_sync
    g1, g2 = tape.gradient(scaled, [local_z1, local_z2])
    return scaled, g1, g2

  def value_fn(ctx):
    r = ctx.replica_id_in_sync_group
    return (tf.constant(z1[r * b:(r + 1) * b]),
            tf.constant(z2[r * b:(r + 1) * b]))

  args = (strategy.experimental_distribute_values_from_function(
      lambda ctx: value_fn(ctx)[0]),
          strategy.experimental_distribute_values_from_function(
              lambda ctx: value_fn(ctx)[1]))
  scaled, g1, g2 = strategy.run(tf.function(replica_fn), args=args)
  total = strategy.reduce(tf.distribute.ReduceOp.SUM, scaled, axis=None)
  g1 = np.concatenate([t.numpy() for t in strategy.experimental_local_results(g1)])
  g2 = np.concatenate([t.numpy() for t in strategy.experimental_local_results(g2)])

  v1, v2 = tf.Variable(z1), tf.Variable(z2)
  with tf.GradientTape() as tape:
    loss, _, _ = obj_lib.nt_xent_loss(
        tf.math.l2_normalize(v1, -1), tf.math.l2_normalize(v2, -1), TAU)
  e1, e2 = tape.gradient(loss, [v1, v2])
  np.testing.assert_allclose(total.numpy(), loss.numpy(), rtol=1e-10)
  np.testing.assert_allclose(total.numpy(), numpy_nt_xent(z1, z2, TAU),
                             rtol=1e-10)
  np.testing.assert_allclose(g1, e1.numpy(), rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(g2, e2.numpy(), rtol=1e-8, atol=1e-12)


def test_cross_replica_concat_orders_rows_by_replica(two_replicas):
  strategy = two_replicas
  values = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.fill([2, 3], float(ctx.replica_id_in_sync_group + 1)))
  gathered = strategy.run(tf.function(obj_lib.cross_replica_concat),
                          args=(values,))
  for result in strategy.experimental_local_results(gathered):
    np.testing.assert_array_equal(result.numpy()[:, 0], [1, 1, 2, 2])


def test_simclr_objective_metrics():
  z1, z2 = _views(seed=4, n=5, d=3)
  # Make the positives the most similar pairs: z2 = z1 + small noise.
  z2 = z1 + 1e-3 * z2
  objective = obj_lib.SimCLR(temperature=TAU)
  loss, metrics = objective.loss(tf.constant(np.concatenate([z1, z2])), {})
  assert set(metrics) == set(obj_lib.SimCLR.metric_names)
  np.testing.assert_allclose(metrics['contrast_loss'].numpy(), loss.numpy())
  np.testing.assert_allclose(loss.numpy(), numpy_nt_xent(z1, z2, TAU),
                             rtol=1e-10)
  assert metrics['contrast_acc'].numpy() == 1.0
  assert metrics['contrast_entropy'].numpy() > 0


def test_registry():
  assert obj_lib.get_objective_class('simclr') is obj_lib.SimCLR
  assert 'simclr' in obj_lib.available_objectives()
  with pytest.raises(ValueError, match='Unknown --objective=.*available: '):
    obj_lib.get_objective_class('nope')
