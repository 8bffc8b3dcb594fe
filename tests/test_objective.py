"""NT-Xent against NumPy, its gradient, cross-replica equivalence; the shared
machinery (view-major gather, columns, per-column values, memory queue);
the Objective interface (loss preamble, from_config, memory mode) and the
registry."""

import dataclasses
import inspect

import numpy as np
import pytest
import tensorflow as tf

import config
import fnc  # noqa: F401  (registers fnc)
import ifnd  # noqa: F401  (registers ifnd)
import objective as obj_lib
import sogcl  # noqa: F401  (registers sogclr)

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


def test_gather_view_major_orders_rows_view_then_image(two_replicas):
  """Replica r holds views v of its images k as rows v·b + k (value
  100·v + 10·r + k); gathered, row v·B + r·b + k holds the same."""
  strategy, num_views, b = two_replicas, 3, 2

  def local(ctx):
    r = ctx.replica_id_in_sync_group
    return tf.constant([[100.0 * v + 10 * r + k] for v in range(num_views)
                        for k in range(b)])

  values = strategy.experimental_distribute_values_from_function(local)
  gathered = strategy.run(
      tf.function(lambda x: obj_lib.gather_view_major(x, num_views)),
      args=(values,))
  want = [100 * v + 10 * r + k for v in range(num_views) for r in range(2)
          for k in range(b)]
  for result in strategy.experimental_local_results(gathered):
    np.testing.assert_array_equal(result.numpy()[:, 0], want)


def test_contrast_columns_and_values_per_column():
  num_views, b, d = 3, 2, 4
  rng = np.random.default_rng(0)
  views = tf.constant(rng.normal(size=(num_views * b, d)))
  in_batch = obj_lib.contrast_columns(views, num_views)
  assert in_batch.valid is None and in_batch.current_keys is None
  np.testing.assert_array_equal(in_batch.candidates.numpy(), views.numpy())
  np.testing.assert_array_equal(
      in_batch.own_image.numpy(),
      [[c % b == i for c in range(num_views * b)] for i in range(b)])
  keys = tf.constant(rng.normal(size=(num_views * b, d)))
  queue = tf.constant(rng.normal(size=(5, d)))
  memory = obj_lib.contrast_columns(views, num_views, keys, queue,
                                    tf.constant([True, True, False, False,
                                                 False]))
  np.testing.assert_array_equal(memory.candidates.numpy(),
                                np.concatenate([keys.numpy(), queue.numpy()]))
  np.testing.assert_array_equal(memory.queries.numpy(), keys.numpy())
  np.testing.assert_array_equal(memory.valid.numpy(),
                                [True] * 8 + [False] * 3)
  assert not memory.own_image.numpy()[:, num_views * b:].any()
  ids = tf.constant([7, 3])
  np.testing.assert_array_equal(
      obj_lib.values_per_column(ids, num_views).numpy(), [7, 3] * 3)
  np.testing.assert_array_equal(
      obj_lib.values_per_column(ids, num_views, queue=queue).numpy(),
      [7, 3] * 3 + [-1] * 5)
  np.testing.assert_array_equal(
      obj_lib.values_per_column(ids, num_views, tf.range(5),
                                queue).numpy(), [7, 3] * 3 + list(range(5)))


def test_memory_queue_is_a_fifo_newest_first():
  queue = obj_lib.MemoryQueue(5, 2)
  assert not queue.valid().numpy().any()
  queue.push(tf.ones([2, 2]), ids=tf.constant([1, 2]))
  queue.push_batch(2 * tf.ones([4, 2]),
                   {'id': tf.constant([3, 4]), 'label': tf.constant([8, 9])},
                   num_views=2)
  np.testing.assert_array_equal(queue.keys.numpy()[:, 0], [2, 2, 2, 2, 1])
  np.testing.assert_array_equal(queue.ids.numpy(), [3, 4, 3, 4, 1])
  np.testing.assert_array_equal(queue.values('label').numpy(),
                                [8, 9, 8, 9, -1])
  assert queue.values('id') is queue.ids
  assert int(queue.count.numpy()) == 5 and queue.valid().numpy().all()
  with pytest.raises(ValueError, match='Cannot push 6 keys into a queue of 5'):
    queue.push(tf.ones([6, 2]))
  with pytest.raises(ValueError, match='size ≥ 1 and dim ≥ 1'):
    obj_lib.MemoryQueue(5, 0)


_SEEN = []


class _Recording(obj_lib.Objective):
  """Records what `contrast` receives in _SEEN."""

  def contrast(self, views, batch, keys):
    _SEEN.append((views, batch, keys))
    return tf.reduce_sum(views), {}


@pytest.mark.parametrize('dtype, want', [
    (tf.float16, tf.float32), (tf.float32, tf.float32),
    (tf.float64, tf.float64)])
@pytest.mark.parametrize('hidden_norm', [False, True])
def test_loss_preamble_casts_and_normalises_views_and_keys(dtype, want,
                                                           hidden_norm):
  rows = np.array([[3.0, 4.0], [0.5, 0.0]])
  objective = _Recording(hidden_norm=hidden_norm)
  batch = {'id': tf.constant([0])}
  objective.loss(tf.constant(rows, dtype), batch,
                 keys=tf.constant(2 * rows, dtype))
  views, seen_batch, keys = _SEEN.pop()
  assert views.dtype == want and keys.dtype == want
  assert seen_batch is batch
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  np.testing.assert_allclose(views.numpy(), unit if hidden_norm else rows,
                             rtol=1e-6)
  np.testing.assert_allclose(keys.numpy(),
                             unit if hidden_norm else 2 * rows, rtol=1e-6)
  objective.loss(tf.constant(rows, dtype), batch)
  assert _SEEN.pop()[2] is None


def test_from_config_passes_the_fields_as_arguments():
  @dataclasses.dataclass(frozen=True)
  class Config:
    temperature: float = 0.3
    hidden_norm: bool = False

  objective = obj_lib.SimCLR.from_config(Config())
  assert objective.temperature == 0.3 and objective.hidden_norm is False


@pytest.mark.parametrize('name, config_class, changes', [
    ('simclr', config.SimCLRConfig, dict(temperature=0.2)),
    ('sogclr', config.SogCLRConfig,
     dict(hidden_norm=False, gamma=0.9, u_store='mean')),
    ('fnc', config.FNCConfig,
     dict(support_size=2, memory_multiplier=4, momentum_decay=0.9, topk=3,
          threshold=0.5, strategy='elimination')),
    ('ifnd', config.IFNDConfig,
     dict(memory_multiplier=4, num_clusters=(5, 7), reassign_epochs=3,
          acceptance_schedule='step', constant_rate=0.5, step_stages=3,
          confidence='margin', strategy='attraction', level_combine='any',
          kmeans_iters=7, seed=3)),
])
def test_every_objective_is_built_from_its_config(name, config_class,
                                                  changes):
  """Constructor arguments (and their defaults) are the config's fields, and
  each lands in the attribute of the same name."""
  cls = obj_lib.get_objective_class(name)
  fields = {f.name: f.default for f in dataclasses.fields(config_class)}
  arguments = {k: p.default for k, p in
               inspect.signature(cls.__init__).parameters.items()
               if k not in ('self', 'name')}
  assert arguments == fields
  cfg = config_class(**changes)
  objective = cls.from_config(cfg)
  for field, value in dataclasses.asdict(cfg).items():
    assert getattr(objective, field) == value, field


class _Memory(obj_lib.MemoryObjective):
  """Sums the similarity of every anchor to every valid column."""

  def loss_on_columns(self, views, columns, batch):
    logits = tf.matmul(views, columns.candidates, transpose_b=True)
    if columns.valid is not None:
      logits = tf.where(columns.valid[tf.newaxis, :], logits, 0.0)
    return tf.reduce_sum(logits), {
        'ids': self.batch_values_per_column(batch, 'id'),
        'labels': self.batch_values_per_column(batch, 'label')}


def test_memory_objective_flow_and_checks():
  objective = _Memory(hidden_norm=False, memory_multiplier=2)
  assert objective.uses_momentum_encoder
  objective.build(100, 2, projection_dim=3)
  assert objective.queue.size == 4
  assert set(objective.checkpoint_items()) == {'memory_queue'}
  views = tf.ones([4, 3])
  batch = {'id': tf.constant([5, 6])}
  with pytest.raises(ValueError, match='needs the momentum encoder'):
    objective.loss(views, batch)
  keys = tf.reshape(tf.range(12, dtype=tf.float32), [4, 3])
  loss, values = objective.loss(views, batch, keys=keys)
  # Columns: the 4 keys, then the (empty) queue; the keys are pushed after.
  assert float(loss) == 4 * float(tf.reduce_sum(keys))
  np.testing.assert_array_equal(values['ids'].numpy(), [5, 6, 5, 6] + [-1] * 4)
  assert values['labels'] is None
  np.testing.assert_array_equal(objective.queue.keys.numpy(), keys.numpy())
  np.testing.assert_array_equal(objective.queue.ids.numpy(), [5, 6, 5, 6])
  loss, values = objective.loss(views, batch, keys=keys)
  assert float(loss) == 8 * float(tf.reduce_sum(keys))
  np.testing.assert_array_equal(values['ids'].numpy(), [5, 6] * 4)
  with pytest.raises(ValueError, match=r'_Memory.build\(...\) must be called'):
    _Memory(memory_multiplier=2).loss(views, batch, keys=keys)
  in_batch = _Memory(hidden_norm=False)
  in_batch.build(100, 2, projection_dim=3)
  assert in_batch.queue is None and in_batch.checkpoint_items() == {}
  loss, values = in_batch.loss(views, batch, keys=keys)  # keys unused
  assert float(loss) == 4 * 4 * 3
  np.testing.assert_array_equal(values['ids'].numpy(), [5, 6, 5, 6])


@pytest.mark.parametrize('kwargs, message', [
    (dict(memory_multiplier=-1), r'--memory_multiplier=-1 must be ≥ 0'),
    (dict(memory_multiplier=1), r'--memory_multiplier=1: the queue holds '
     r'1·B = 8 keys, fewer than one batch of keys \(V·B = 2·8 = 16\); use '
     r'--memory_multiplier ≥ 2'),
    (dict(momentum_decay=-0.1), r'--moving_average_decay=-0.1 must be in'),
])
def test_memory_objective_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _Memory(**kwargs).validate(8, 100)
  _Memory(memory_multiplier=2).validate(8, 100)


def test_registry():
  assert obj_lib.get_objective_class('simclr') is obj_lib.SimCLR
  assert 'simclr' in obj_lib.available_objectives()
  with pytest.raises(ValueError, match='Unknown --objective=.*available: '):
    obj_lib.get_objective_class('nope')


def test_broadcast_from_first_replica_gives_every_replica_replica_0s_value(
    two_replicas):
  values = {0: np.array([[3, -1], [7, 2]], np.int32),
            1: np.array([[9, 9], [9, 9]], np.int32)}
  per_replica = two_replicas.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(values[ctx.replica_id_in_sync_group]))
  result = obj_lib.broadcast_from_first_replica(two_replicas, per_replica)
  np.testing.assert_array_equal(result, values[0])
  assert result.dtype == np.int32
  floats = np.array([0.1, -2.5e-7, 3e5], np.float32)
  np.testing.assert_array_equal(
      obj_lib.broadcast_from_first_replica(two_replicas, floats), floats)
  one = obj_lib.broadcast_from_first_replica(tf.distribute.get_strategy(),
                                             values[1])
  np.testing.assert_array_equal(one, values[1])
