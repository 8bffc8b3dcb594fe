"""IFND: the mask and loss against NumPy, base-loss equivalence, replica
equivalence, the objective's loss and queue, the table, re-assignment
(timing, the embedding pass, its record), validation, and run.py end to end
(with a re-assignment inside the run). The clustering itself is tested in
test_clustering.py."""

import collections
import contextlib
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import actions
import checkpoints
import config as config_lib
import data as data_lib
import experiment as experiment_lib
import features
import fnc
import ifnd
import objective as obj_lib
import run
from conftest import assert_same_value_and_gradient

TAU = 0.5


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def _views(seed, n, d=4, num_views=2):
  """[V·n, d] view-major unit vectors."""
  return _unit(np.random.default_rng(seed).normal(
      size=(num_views * n, d))).astype(np.float64)


# ---------------------------------------------------------------------------
# Mask and loss against NumPy.
# ---------------------------------------------------------------------------


def numpy_mask(anchor_ids, column_ids, table):
  num_levels = table.shape[1]
  mask = np.zeros((num_levels, len(anchor_ids), len(column_ids)), bool)
  for level in range(num_levels):
    for a, i in enumerate(anchor_ids):
      for c, j in enumerate(column_ids):
        if j < 0 or j == i:
          continue
        li, lj = table[i, level], table[j, level]
        mask[level, a, c] = li >= 0 and lj >= 0 and li == lj
  return mask


def numpy_ifnd(views, candidates, column_ids, valid, ids, table, strategy,
               combine, num_views=2, tau=TAU):
  """Loss straight from SPEC §9 + §7 with loops; views [V·n, d] (one
  replica, global batch n), candidates [C, d] whose first V·n are the
  current batch, column_ids [C]."""
  n = len(ids)
  masks = numpy_mask(ids, column_ids, table)
  if combine == 'any':
    masks = masks.any(axis=0, keepdims=True)
  losses = []
  for mask in masks:
    total = 0.0
    for a in range(num_views):
      for i in range(n):
        logits = candidates @ views[a * n + i] / tau
        self_col = a * n + i
        positives = [v * n + i for v in range(num_views) if v != a]
        false_neg = list(np.flatnonzero(mask[i]))
        keep = [c for c in range(len(candidates)) if c != self_col and
                valid[c]]
        if strategy == 'attraction':
          numerator = positives + false_neg
        else:
          numerator = positives
          keep = [c for c in keep if not mask[i, c]]
        total += (-np.mean(logits[numerator]) +
                  np.log(np.sum(np.exp(logits[keep]))))
    losses.append(2.0 / num_views * total / n)
  return np.mean(losses)


def _table(seed, n, num_levels=2, num_labels=3, unlabelled=0.3):
  rng = np.random.default_rng(seed)
  table = rng.integers(0, num_labels, size=(n, num_levels)).astype(np.int32)
  table[rng.uniform(size=table.shape) < unlabelled] = -1
  return table


def test_mask_against_numpy():
  table = _table(1, 12)
  anchor_ids = np.array([3, 0, 7, 11])
  column_ids = np.array([3, 0, 7, 11, 5, -1, 2, 3, 9])
  mask = ifnd.pseudo_label_mask(anchor_ids, column_ids, tf.constant(table))
  expected = numpy_mask(anchor_ids, column_ids, table)
  assert expected.any() and not expected.all()
  np.testing.assert_array_equal(mask.numpy(), expected)
  # An example is never its own false negative, whatever its label.
  assert not mask.numpy()[:, 0, [0, 7]].any()


@pytest.mark.parametrize('strategy', ifnd.STRATEGIES)
@pytest.mark.parametrize('combine', ifnd.LEVEL_COMBINES)
def test_in_batch_loss_matches_numpy(strategy, combine):
  n = 6
  views = _views(2, n)
  ids = np.array([4, 9, 1, 0, 7, 3])
  table = _table(4, 10)
  loss, metrics = ifnd.ifnd_loss(tf.constant(views), ids, tf.constant(table),
                                 TAU, strategy, combine)
  column_ids = np.tile(ids, 2)
  expected = numpy_ifnd(views, views, column_ids, np.ones(2 * n, bool), ids,
                        table, strategy, combine)
  assert numpy_mask(ids, column_ids, table).any()
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)
  masks = numpy_mask(ids, column_ids, table)
  removed = (masks.any(0).sum(-1).mean() if combine == 'any'
             else masks.sum(-1).mean())
  assert float(metrics['fn_per_anchor']) == pytest.approx(removed)
  assert float(metrics['accepted_fraction']) == pytest.approx(
      (table[ids] >= 0).mean())


def _memory_case(seed, n, queue_size, filled, d=4):
  rng = np.random.default_rng(seed)
  views = _views(seed, n, d)
  keys = _unit(views + 0.3 * rng.normal(size=views.shape))
  queue = _unit(rng.normal(size=(queue_size, d)))
  queue_ids = rng.integers(0, 10, queue_size).astype(np.int32)
  queue_ids[filled:] = -1
  valid = np.arange(queue_size) < filled
  return views, keys, queue, queue_ids, valid


@pytest.mark.parametrize('strategy', ifnd.STRATEGIES)
@pytest.mark.parametrize('combine', ifnd.LEVEL_COMBINES)
def test_memory_loss_matches_numpy(strategy, combine):
  n = 4
  views, keys, queue, queue_ids, valid = _memory_case(6, n, 7, 5)
  ids = np.array([2, 5, 8, 0])
  table = _table(8, 10, unlabelled=0.2)
  loss, _ = ifnd.ifnd_loss(
      tf.constant(views), ids, tf.constant(table), TAU, strategy, combine,
      keys=tf.constant(keys), queue=tf.constant(queue),
      queue_valid=tf.constant(valid), queue_ids=tf.constant(queue_ids))
  candidates = np.concatenate([keys, queue])
  column_ids = np.concatenate([np.tile(ids, 2), queue_ids])
  all_valid = np.concatenate([np.ones(2 * n, bool), valid])
  assert numpy_mask(ids, column_ids, table)[:, :, 2 * n:].any()
  expected = numpy_ifnd(views, candidates, column_ids, all_valid, ids, table,
                        strategy, combine)
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize('strategy', ifnd.STRATEGIES)
def test_empty_table_is_nt_xent_loss_and_gradient(strategy):
  views = tf.Variable(_views(9, 5))
  table = tf.constant(np.full((8, 3), -1, np.int32))
  ids = tf.constant([0, 1, 2, 3, 4])

  def loss():
    return ifnd.ifnd_loss(views, ids, table, TAU, strategy)

  assert float(loss()[1]['fn_per_anchor']) == 0.0
  assert_same_value_and_gradient(
      views, lambda: loss()[0],
      lambda: obj_lib.nt_xent_loss(*tf.split(views, 2), TAU)[0])


def test_empty_table_is_the_memory_queue_loss():
  views, keys, queue, queue_ids, valid = _memory_case(12, 4, 6, 4)
  views = tf.Variable(views)
  table = tf.constant(np.full((10, 2), -1, np.int32))
  memory = dict(keys=tf.constant(keys), queue=tf.constant(queue),
                queue_valid=tf.constant(valid))
  assert_same_value_and_gradient(
      views,
      lambda: ifnd.ifnd_loss(views, [0, 1, 2, 3], table, TAU,
                             queue_ids=tf.constant(queue_ids), **memory)[0],
      lambda: fnc.fnc_loss(views, 2, TAU, fn_topk=0, fn_threshold=2.0,
                           **memory)[0])


# ---------------------------------------------------------------------------
# Every level from one set of logits.
# ---------------------------------------------------------------------------


def _numeric_gradient(fn, x, step=1e-6):
  """Central differences of the scalar fn at x."""
  grad = np.zeros_like(x)
  for index in np.ndindex(*x.shape):
    delta = np.zeros_like(x)
    delta[index] = step
    grad[index] = (fn(x + delta) - fn(x - delta)) / (2 * step)
  return grad


@pytest.mark.parametrize('strategy', ifnd.STRATEGIES)
@pytest.mark.parametrize('combine', ifnd.LEVEL_COMBINES)
def test_levels_from_shared_logits_match_numpy_with_gradients(strategy,
                                                              combine):
  """Three levels against one `objective.contrast_logits`: each level's row
  of `cancellation_loss` and the combined loss, value and gradient w.r.t.
  raw projections (normalised in the graph), against the NumPy loss and its
  central differences."""
  n, d = 6, 4
  rng = np.random.default_rng(60)
  projections = _views(60, n, d) * rng.uniform(0.5, 2.0, size=(2 * n, 1))
  ids = np.array([4, 9, 1, 0, 7, 3])
  table = _table(62, 10, num_levels=3)
  column_ids = np.tile(ids, 2)
  masks = numpy_mask(ids, column_ids, table)
  assert masks.any(axis=(1, 2)).all()  # every level has false negatives
  assert len({m.tobytes() for m in masks}) == 3  # and its own

  def numpy_loss(raw, levels):
    views = _unit(raw)
    return numpy_ifnd(views, views, column_ids, np.ones(2 * n, bool), ids,
                      table[:, levels], strategy, combine)

  labels = tf.constant(table)
  variable = tf.Variable(projections)
  values = []                                  # (levels, unit_rows, loss)
  with tf.GradientTape(persistent=True) as tape:
    views = tf.math.l2_normalize(variable, -1)
    columns = obj_lib.contrast_columns(views, 2)
    masks = ifnd.pseudo_label_mask(ids, column_ids, labels)
    for unit_rows in (False, True):  # unit rows: no underflow check
      shared = obj_lib.contrast_logits(views, columns, 2, TAU, unit_rows)
      assert shared.bounded == unit_rows
      per_level = 2.0 * tf.reduce_mean(
          obj_lib.cancellation_loss(shared, masks, strategy), axis=1)
      values += [((level,), unit_rows, per_level[level])
                 for level in range(3)]
      values.append(((0, 1, 2), unit_rows, ifnd.ifnd_column_terms(
          views, columns, ids, column_ids, labels, TAU, strategy, combine,
          unit_rows=unit_rows).loss))
  numeric = {levels: _numeric_gradient(
      lambda x, l=list(levels): numpy_loss(x, l), projections)
             for levels, _, _ in values}
  for levels, unit_rows, value in values:
    np.testing.assert_allclose(value.numpy(),
                               numpy_loss(projections, list(levels)),
                               rtol=1e-10)
    np.testing.assert_allclose(tape.gradient(value, variable).numpy(),
                               numeric[levels], rtol=0, atol=1e-5)


@pytest.mark.parametrize('strategy', ifnd.STRATEGIES)
@pytest.mark.parametrize('unit_rows', [False, True])
def test_one_matmul_and_one_exp_whatever_the_number_of_levels(strategy,
                                                              unit_rows):
  """Loss and gradient trace the same matmuls and exps with 1 or 3 levels
  (the logits are shared), and no one-hot (the masks are boolean)."""
  def op_counts(num_levels):
    table = tf.constant(_table(70, 10, num_levels=num_levels))
    ids = tf.range(6)

    @tf.function
    def loss_and_gradient(views):
      with tf.GradientTape() as tape:
        tape.watch(views)
        loss = ifnd.ifnd_column_terms(
            views, obj_lib.contrast_columns(views, 2), ids,
            obj_lib.values_per_column(ids, 2), table, TAU, strategy,
            unit_rows=unit_rows).loss
      return tape.gradient(loss, views)
    graph = loss_and_gradient.get_concrete_function(
        tf.TensorSpec([12, 4], tf.float32)).graph
    return collections.Counter(op.type for op in graph.get_operations())

  one, three = op_counts(1), op_counts(3)
  assert one['MatMul'] == 3  # the logits, and their gradient to both sides
  for kind in ('MatMul', 'BatchMatMulV2', 'Einsum', 'Exp', 'Softmax'):
    assert three[kind] == one[kind], kind
  assert not one['OneHot'] and not three['OneHot']


def test_eliminating_a_far_larger_column_stays_exact():
  """τ = 0.005 in float32: image 1 (a false negative of image 0) sits 120
  logits above every column image 0's first view keeps, so the kept exps
  underflow against the shared row max; those rows are redone exactly,
  also through the objective (unit rows, but 2/τ is beyond float32)."""
  assert np.exp(np.float32(-120.0)) == 0.0
  e = np.eye(3)
  first, second = e[0], 0.4 * e[0] + np.sqrt(1 - 0.16) * e[1]
  views = np.stack([first, e[0], e[2], second, e[0], e[2]])
  table = np.array([[0], [0], [1]], np.int32)
  tau = 0.005
  expected = numpy_ifnd(views, views, np.tile([0, 1, 2], 2),
                        np.ones(6, bool), [0, 1, 2], table, 'elimination',
                        'mean', tau=tau)
  objective = ifnd.IFND(temperature=tau, num_clusters=(2,))
  objective.build(3, 3, projection_dim=3)
  objective.table.assign(table, 0, 1.0)
  variable = tf.Variable(views.astype(np.float32))
  for loss_fn in (
      lambda: ifnd.ifnd_loss(variable, [0, 1, 2], tf.constant(table), tau),
      lambda: objective.loss(variable, {'id': tf.range(3)})):
    with tf.GradientTape() as tape:
      loss, _ = loss_fn()
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-4)
    assert np.isfinite(tape.gradient(loss, variable).numpy()).all()


def test_two_replicas_equal_one_replica(two_replicas):
  strategy, b = two_replicas, 3
  views = _views(21, 2 * b).astype(np.float32)
  ids = np.array([5, 0, 3, 9, 2, 7], np.int32)
  table = tf.constant(_table(22, 10, unlabelled=0.1))

  def local_rows(array, r):  # view-major rows of replica r
    return np.concatenate([array[v * 2 * b + r * b:v * 2 * b + (r + 1) * b]
                           for v in range(2)])

  def replica_fn(local_views, local_ids):
    with tf.GradientTape() as tape:
      tape.watch(local_views)
      result = ifnd.ifnd_terms(local_views, local_ids, table, TAU)
      scaled = result.loss / strategy.num_replicas_in_sync
    return scaled, tape.gradient(scaled, local_views), result.fn_mask

  def per_replica(rows):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(rows(ctx.replica_id_in_sync_group)))

  scaled, grads, masks = strategy.run(
      tf.function(replica_fn),
      args=(per_replica(lambda r: local_rows(views, r)),
            per_replica(lambda r: ids[r * b:(r + 1) * b])))
  total = strategy.reduce(tf.distribute.ReduceOp.SUM, scaled, axis=None)
  grads = [g.numpy() for g in strategy.experimental_local_results(grads)]
  masks = np.concatenate(
      [m.numpy() for m in strategy.experimental_local_results(masks)], axis=1)

  variable = tf.Variable(views)
  with tf.GradientTape() as tape:
    single = ifnd.ifnd_terms(variable, ids, table, TAU)
  expected = tape.gradient(single.loss, variable).numpy()
  assert single.fn_mask.numpy().any()
  np.testing.assert_array_equal(masks, single.fn_mask.numpy())
  np.testing.assert_allclose(total.numpy(), single.loss.numpy(), rtol=1e-5)
  for r in range(2):
    np.testing.assert_allclose(grads[r], local_rows(expected, r), rtol=1e-4,
                               atol=1e-6)


# ---------------------------------------------------------------------------
# The objective: loss, example ids, queue.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('memory', [False, True])
def test_objective_loss_matches_numpy_and_fills_the_queue(memory):
  """Two steps through IFND.loss (hidden_norm on raw projections, in-batch
  or keys + queue with ids), against the NumPy loss of the same columns."""
  n, d = 4, 4
  table = _table(30, 10, unlabelled=0.2)
  objective = ifnd.IFND(temperature=TAU, num_clusters=(3, 3),
                        memory_multiplier=4 if memory else 0)
  objective.build(10, n, projection_dim=d)
  objective.table.assign(table, 0, 0.5)
  rng = np.random.default_rng(31)
  queue_keys, queue_ids = np.zeros((0, d)), np.zeros(0, np.int64)
  for step, ids in enumerate((np.array([2, 5, 8, 0]), np.array([1, 5, 9, 3]))):
    projections = 3.0 * rng.normal(size=(2 * n, d))
    keys = projections + 0.5 * rng.normal(size=(2 * n, d))
    batch = {'id': tf.constant(ids, tf.int32),
             'label': tf.constant(ids % 3, tf.int32)}
    loss, metrics = objective.loss(
        tf.constant(projections), batch,
        keys=tf.constant(keys) if memory else None)
    views = _unit(projections)
    if memory:
      size = 4 * 2 * n
      filled = len(queue_ids)
      queue = np.zeros((size, d))
      queue[:filled] = queue_keys.astype(np.float32)  # the queue's dtype
      candidates = np.concatenate([_unit(keys), queue])
      column_ids = np.concatenate([np.tile(ids, 2), queue_ids,
                                   -np.ones(size - filled, np.int64)])
      valid = np.concatenate([np.ones(2 * n, bool),
                              np.arange(size) < filled])
    else:
      candidates, column_ids = views, np.tile(ids, 2)
      valid = np.ones(2 * n, bool)
    expected = numpy_ifnd(views, candidates, column_ids, valid, ids, table,
                          'elimination', 'mean')
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)
    assert set(metrics) == set(ifnd.IFND.metric_names)
    assert float(metrics['acceptance_rate']) == 0.5
    if step == 1:
      assert numpy_mask(ids, column_ids, table)[:, :, 2 * n:].any() == memory
    queue_keys = np.concatenate([_unit(keys), queue_keys])
    queue_ids = np.concatenate([np.tile(ids, 2), queue_ids])
  if memory:
    np.testing.assert_array_equal(objective.queue.ids.numpy(), queue_ids)
    np.testing.assert_allclose(objective.queue.keys.numpy(), queue_keys,
                               rtol=1e-6)
    assert set(objective.checkpoint_items()) == {'ifnd_table', 'ifnd_queue'}
  else:
    assert objective.queue is None
    assert set(objective.checkpoint_items()) == {'ifnd_table'}


def test_objective_loss_reads_example_ids():
  objective = ifnd.IFND(temperature=TAU)
  objective.build(10, 3, projection_dim=4)
  with pytest.raises(KeyError, match='id'):
    objective.loss(tf.constant(_views(40, 3)), {'label': tf.range(3)})


# ---------------------------------------------------------------------------
# The table and re-assignment: timing, the embedding pass, the record.
# ---------------------------------------------------------------------------


def test_table_assign_writes_every_replica(two_replicas):
  with two_replicas.scope():
    table = ifnd.PseudoLabelTable(5, 2)
  values = np.arange(10, dtype=np.int32).reshape(5, 2)
  table.assign(values, 40, 0.5)
  for copy in two_replicas.experimental_local_results(table.labels):
    np.testing.assert_array_equal(copy.numpy(), values)
  assert int(table.assigned_step.numpy()) == 40
  assert float(table.rate.numpy()) == 0.5


class _Recorder(ifnd.Reassigner):
  """Records the steps at which a re-assignment happens."""

  def __init__(self, objective, context, period):
    super().__init__(objective, context, period)
    self.steps = []

  def reassign(self, step):
    self.steps.append(step)
    self.ifnd.table.assign(self.ifnd.table.labels.numpy(), step, 0.0)


def _context(tmp_path, step, train_steps=25, steps_per_epoch=5,
             key_encoder=None, train_pass=None):
  return obj_lib.TrainContext(
      strategy=tf.distribute.get_strategy(), global_step=step,
      train_steps=train_steps, steps_per_epoch=steps_per_epoch,
      key_encoder=key_encoder, train_pass=train_pass,
      output_dir=str(tmp_path))


def test_reassignment_happens_at_the_right_steps(tmp_path):
  objective = ifnd.IFND(reassign_epochs=2)
  objective.build(10, 2, projection_dim=4)
  step = tf.Variable(0, dtype=tf.int64)
  context = _context(tmp_path, step)
  assert objective.action_period_steps(5) == 10
  recorder = _Recorder(objective, context, 10)
  recorder.start()                        # new run: at once
  for s in range(5, 30, 5):               # loops of 5 steps up to 25
    step.assign(min(s, 25))
    recorder()
  assert recorder.steps == [0, 10, 20]    # not at 25 = train_steps
  # Resuming at 15 with the table of step 10: nothing due until 20.
  step.assign(15)
  resumed = _Recorder(objective, context, 10)
  resumed.start()
  assert resumed.steps == []
  # Resuming at 15 without a table (never assigned): at once.
  fresh = ifnd.IFND(reassign_epochs=2)
  fresh.build(10, 2, projection_dim=4)
  stale = _Recorder(fresh, context, 10)
  stale.start()
  assert stale.steps == [15]


def test_reassigner_is_a_periodic_action():
  assert issubclass(ifnd.Reassigner, actions.PeriodicAction)


def _clusters(per_cluster=10, k=4, d=8, seed=0):
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(k, d))) * 3
  truth = np.repeat(np.arange(k), per_cluster)
  x = centres[truth] + 0.05 * rng.normal(size=(len(truth), d))
  return x.astype(np.float32), truth.astype(np.int32)


def test_reassign_embeds_clusters_and_records(tmp_path, monkeypatch):
  """The feature pass (a stand-in extractor), k-means at two levels, the
  table, the JSON history, TensorBoard scalars; one extractor for all
  re-assignments."""
  x, truth = _clusters()
  made, passes = [], []

  class FakeExtractor:
    def __init__(self, strategy, encode):
      made.append((strategy, encode))

    def __call__(self, dataset):
      passes.append(dataset)
      return x, truth

  monkeypatch.setattr(features, 'FeatureExtractor', FakeExtractor)
  objective = ifnd.IFND(num_clusters=(4, 8), reassign_epochs=1,
                        acceptance_schedule='constant', constant_rate=0.5)
  objective.build(len(x), 4, projection_dim=8)
  step = tf.Variable(0, dtype=tf.int64)
  context = _context(tmp_path, step, train_steps=20, key_encoder='encoder',
                     train_pass=lambda: 'train pass')
  [reassigner] = objective.train_actions(context)
  reassigner.start()                      # stale table: at step 0
  step.assign(5)
  reassigner()                            # one epoch later
  assert made == [(context.strategy, 'encoder')]
  assert passes == ['train pass', 'train pass']
  labels = objective.table.labels.numpy()
  assert ((labels >= 0).sum(axis=0) == [20, 20]).all()
  assert labels[:, 0].max() < 4 and labels[:, 1].max() < 8
  assert int(objective.table.assigned_step.numpy()) == 5
  assert float(objective.table.rate.numpy()) == 0.5
  with open(tmp_path / 'ifnd_assignments.json') as f:
    history = json.load(f)
  assert [h['step'] for h in history] == [0, 5]
  assert history[1]['epoch'] == 1.0
  assert history[1]['accepted_per_level'] == 20
  assert history[1]['num_clusters'] == [4, 8]
  assert history[1]['purity'] == [1.0, 1.0]
  assert history[1]['cluster_sizes_min_median_max'][0] == [10, 10.0, 10]
  assert tf.io.gfile.glob(str(tmp_path / 'ifnd' / 'events.out.tfevents.*'))
  # A restarted action reads the history back; a pass that misses examples
  # is an error.
  again = objective.train_actions(context)[0]
  assert [h['step'] for h in again.history] == [0, 5]
  monkeypatch.setattr(FakeExtractor, '__call__',
                      lambda self, dataset: (x[:-1], truth[:-1]))
  with pytest.raises(ValueError, match='The embedding pass saw 39 training '
                     'examples, the pseudo-label table has 40'):
    again.reassign(10)


def test_reassign_at_rate_zero_clusters_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(features, 'FeatureExtractor', None)  # never called
  objective = ifnd.IFND(num_clusters=(4,), reassign_epochs=1)
  objective.build(40, 4, projection_dim=8)
  context = _context(tmp_path, tf.Variable(0, dtype=tf.int64),
                     train_steps=20)
  record = objective.train_actions(context)[0].reassign(0)
  assert record['acceptance_rate'] == 0.0 and record['purity'] == []
  assert (objective.table.labels.numpy() == -1).all()


# ---------------------------------------------------------------------------
# Validation and registration.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_clusters=(10, 3000)), 'cannot make 3000 clusters of the '
     '1000 training examples'),
    (dict(num_clusters=(0,)), 'cluster counts ≥ 1'),
    (dict(reassign_epochs=0), '--ifnd_reassign_epochs=0 must be ≥ 1'),
    (dict(constant_rate=1.5), '--ifnd_acceptance_rate=1.5'),
    (dict(strategy='both'), "--ifnd_strategy='both' must be one of"),
    (dict(memory_multiplier=1), '--memory_multiplier=1: the queue holds'),
    (dict(memory_multiplier=-1), '--memory_multiplier=-1 must be ≥ 0'),
    (dict(momentum_decay=1.5), '--moving_average_decay=1.5'),
    (dict(confidence='margin', num_clusters=(1, 5)),
     'margin needs ≥ 2 clusters'),
])
def test_validate_rejects_what_cannot_work(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ifnd.IFND(**kwargs).validate(64, 1000)


def test_objective_registration_and_defaults():
  cls = obj_lib.get_objective_class('ifnd')
  assert cls is ifnd.IFND
  objective = cls()                        # config default: in-batch
  assert objective.num_views == 2 and not objective.uses_momentum_encoder
  assert objective.strategy == 'elimination'
  assert objective.level_combine == 'mean'
  assert cls(memory_multiplier=4).momentum_decay == 0.999
  assert cls(memory_multiplier=4).uses_momentum_encoder


# ---------------------------------------------------------------------------
# End to end through run.py (one replica; digits, 16×16, ResNet-18 × 0.25).
# ---------------------------------------------------------------------------

TINY = {
    'dataset': 'digits', 'image_size': 16, 'resnet_depth': 18,
    'width_multiplier': 0.25, 'proj_out_dim': 16, 'train_batch_size': 256,
    'eval_batch_size': 512, 'warmup_epochs': 0, 'learning_rate': 0.5,
    'use_blur': False, 'train_summary_steps': 0, 'objective': 'ifnd',
    'ifnd_num_clusters': '10,20', 'ifnd_reassign_epochs': 2,
    'train_epochs': 4, 'checkpoint_epochs': 1, 'mode': 'train', 'seed': 0,
}


def _argv(**overrides):
  return [f'--{k}={v}' for k, v in {**TINY, **overrides}.items()]


def _config(**overrides):
  return config_lib.from_argv(_argv(**overrides))


def _table_of(path):
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(f'ifnd_table/{name}' +
                                  checkpoints.VALUE_SUFFIX)
          for name in ('labels', 'assigned_step', 'rate')}


@pytest.fixture(scope='module')
def ifnd_run(tmp_path_factory):
  """4 epochs of 6 steps (1437 digits / 256), re-assignment every 2 epochs:
  at step 0 (rate 0, nothing clustered) and step 12 (rate 12/23)."""
  model_dir = str(tmp_path_factory.mktemp('ifnd'))
  run.run(_config(model_dir=model_dir, train_steps=0))
  return model_dir


def test_end_to_end_reassigns_inside_the_run(ifnd_run):
  with open(os.path.join(ifnd_run, 'ifnd_assignments.json')) as f:
    history = json.load(f)
  num = data_lib.get_data_source('digits').num_examples('train')
  steps = [h['step'] for h in history]
  train_steps = -(-4 * num // 256)
  epoch = round(num / 256)
  assert steps == [0, 2 * epoch]
  assert history[0]['accepted_per_level'] == 0
  rate = 2 * epoch / train_steps
  assert history[1]['acceptance_rate'] == pytest.approx(rate)
  assert len(history[1]['purity']) == 2
  table = _table_of(tf.train.latest_checkpoint(ifnd_run))
  assert table['labels'].shape == (num, 2)
  assert int(table['assigned_step']) == 2 * epoch
  for level, k in enumerate((10, 20)):
    labels = table['labels'][:, level]
    assert (labels >= 0).sum() == int(round(rate * num))
    assert labels.max() < k
  # The checkpoint before the re-assignment still has the empty table.
  before = _table_of(os.path.join(ifnd_run, f'ckpt-{epoch}'))
  assert (before['labels'] == -1).all()


def test_resume_restores_the_table_without_reassigning(ifnd_run):
  latest = tf.train.latest_checkpoint(ifnd_run)
  saved = _table_of(latest)
  experiment = experiment_lib.Experiment(
      _config(model_dir=ifnd_run, train_steps=0, train_epochs=5),
      tf.distribute.get_strategy())
  experiment.checkpoint_manager.restore_or_initialize()
  table = experiment.objective.table
  np.testing.assert_array_equal(table.labels.numpy(), saved['labels'])
  assert int(table.assigned_step.numpy()) == int(saved['assigned_step'])
  controller = experiment.controller(True, False)
  del controller
  reassigner = [a for a in experiment.actions
                if isinstance(a, ifnd.Reassigner)]
  assert len(reassigner) == 1
  reassigner[0].start()  # step 23 of 29, table from step 12: not due
  np.testing.assert_array_equal(table.labels.numpy(), saved['labels'])


def test_bad_ifnd_flags_exit_before_training(tmp_path):
  stderr = io.StringIO()
  with pytest.raises(SystemExit) as exit_info, \
      contextlib.redirect_stderr(stderr):
    run.run_from_flags(config_lib.parse_argv(_argv(
        model_dir=str(tmp_path / 'bad'), ifnd_num_clusters='10,5000')))
  assert exit_info.value.code == 2
  assert 'cannot make 5000 clusters' in stderr.getvalue()
  assert not os.path.exists(tmp_path / 'bad' / 'checkpoint')


def test_end_to_end_memory_mode_with_constant_acceptance(tmp_path):
  """Memory mode: the momentum encoder embeds the set at step 0 (constant
  rate 0.5, so it clusters at once) and the queue keeps the keys' ids."""
  model_dir = str(tmp_path / 'memory')
  run.run(_config(model_dir=model_dir, memory_multiplier=2, train_steps=2,
                  checkpoint_steps=2, train_batch_size=64,
                  ifnd_reassign_epochs=1, ifnd_acceptance='constant',
                  ifnd_acceptance_rate=0.5))
  latest = tf.train.latest_checkpoint(model_dir)
  num = data_lib.get_data_source('digits').num_examples('train')
  table = _table_of(latest)
  assert int(table['assigned_step']) == 0
  assert ((table['labels'] >= 0).sum(axis=0) == round(0.5 * num)).all()
  reader = tf.train.load_checkpoint(latest)
  ids = reader.get_tensor('ifnd_queue/ids' + checkpoints.VALUE_SUFFIX)
  count = reader.get_tensor('ifnd_queue/count' + checkpoints.VALUE_SUFFIX)
  assert ids.shape == (128,) and count == 128  # the last step's 2 × 64 keys
  per_view = ids.reshape(2, 64)
  assert (per_view == per_view[0]).all() and len(set(per_view[0])) == 64
  assert ids.min() >= 0
  assert any('momentum_encoder' in k
             for k in reader.get_variable_to_shape_map())
