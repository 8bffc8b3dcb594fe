"""IFND: acceptance, clustering, the mask and loss against NumPy, base-loss
equivalence, replica equivalence, the embedding pass, re-assignment timing,
validation, and run.py end to end (with a re-assignment inside the run)."""

import json
import os

from absl import flags
import numpy as np
import pytest
from sklearn import metrics as sk_metrics
import tensorflow as tf

import checkpoints
import data as data_lib
import fnc
import ifnd
import objective as obj_lib
import run
from conftest import assert_same_value_and_gradient

FLAGS = flags.FLAGS
TAU = 0.5


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def _views(seed, n, d=4, num_views=2):
  """[V·n, d] view-major unit vectors."""
  return _unit(np.random.default_rng(seed).normal(
      size=(num_views * n, d))).astype(np.float64)


# ---------------------------------------------------------------------------
# Acceptance, clustering, confidence, purity (host side).
# ---------------------------------------------------------------------------


def test_acceptance_schedules():
  assert ifnd.acceptance_rate(0.0) == 0.0
  assert ifnd.acceptance_rate(0.37) == pytest.approx(0.37)
  assert ifnd.acceptance_rate(1.5) == 1.0
  assert ifnd.acceptance_rate(0.9, 'constant', rate=0.3) == 0.3
  rates = [ifnd.acceptance_rate(p, 'step', stages=5)
           for p in (0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0)]
  assert rates == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
  with pytest.raises(ValueError, match='ifnd_acceptance must be one of'):
    ifnd.acceptance_rate(0.5, 'cosine')


@pytest.mark.parametrize('rate', [0.0, 0.1, 0.25, 0.55, 1.0])
def test_accept_labels_round_rn_most_confident(rate):
  rng = np.random.default_rng(3)
  n = 37
  assignments = rng.integers(0, 5, n).astype(np.int32)
  confidence = rng.uniform(size=n).astype(np.float32)
  labels = ifnd.accept(assignments, confidence, rate)
  labelled = labels >= 0
  assert labelled.sum() == int(round(rate * n))
  np.testing.assert_array_equal(labels[labelled], assignments[labelled])
  if 0 < labelled.sum() < n:  # every labelled one beats every unlabelled one
    assert confidence[labelled].min() > confidence[~labelled].max()


def test_accept_breaks_ties_by_index():
  labels = ifnd.accept(np.array([7, 8, 9, 6]), np.ones(4), 0.5)
  np.testing.assert_array_equal(labels, [7, 8, -1, -1])


def _planted(seed=0, per_cluster=40, k=5, d=8, spread=0.05):
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(k, d))) * 3
  truth = np.repeat(np.arange(k), per_cluster)
  x = centres[truth] + spread * rng.normal(size=(len(truth), d))
  return x.astype(np.float32), truth


def test_kmeans_recovers_planted_clusters_deterministically():
  x, truth = _planted()
  centroids, assignments = ifnd.kmeans(x, 5, seed=1)
  assert sk_metrics.adjusted_rand_score(truth, assignments) == 1.0
  assert centroids.shape == (5, 8)
  again = ifnd.kmeans(x, 5, seed=1)
  np.testing.assert_array_equal(again[1], assignments)
  np.testing.assert_array_equal(again[0], centroids)
  with pytest.raises(ValueError, match='Cannot make 500 clusters of 200'):
    ifnd.kmeans(x, 500)


def test_confidence_against_numpy():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  centroids = rng.normal(size=(3, 3)).astype(np.float32)
  assignments = np.array([0, 1, 2, 0, 1, 2])
  own = ifnd.cluster_confidence(x, centroids, assignments)
  margin = ifnd.cluster_confidence(x, centroids, assignments, 'margin')
  for i in range(6):
    cos = [x[i] @ c / np.linalg.norm(x[i]) / np.linalg.norm(c)
           for c in centroids]
    assert own[i] == pytest.approx(cos[assignments[i]], abs=1e-6)
    other = max(c for j, c in enumerate(cos) if j != assignments[i])
    assert margin[i] == pytest.approx(cos[assignments[i]] - other, abs=1e-6)
  with pytest.raises(ValueError, match='ifnd_confidence must be one of'):
    ifnd.cluster_confidence(x, centroids, assignments, 'entropy')


def test_purity():
  pseudo = np.array([0, 0, 0, 1, 1, -1])
  true = np.array([2, 2, 3, 1, 1, 0])
  assert ifnd.purity(pseudo, true) == pytest.approx(4 / 5)
  assert np.isnan(ifnd.purity(np.full(3, -1), np.zeros(3, int)))


def test_assign_pseudo_labels_on_planted_clusters():
  x, truth = _planted(per_cluster=20, k=4)
  result = ifnd.assign_pseudo_labels(x, (4, 8), 0.5, seed=0,
                                     true_labels=truth)
  assert result.table.shape == (80, 2)
  assert [(result.table[:, level] >= 0).sum() for level in range(2)] == [40,
                                                                        40]
  assert result.purity[0] == 1.0 and result.purity[1] == 1.0
  assert result.cluster_sizes[0] == (20, 20.0, 20)
  empty = ifnd.assign_pseudo_labels(x, (4, 8), 0.0)
  assert (empty.table == -1).all() and empty.purity == []


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
# The embedding pass, the table and re-assignment timing.
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


def test_reassignment_happens_at_the_right_steps(tmp_path):
  objective = ifnd.IFND(ifnd_reassign_epochs=2)
  objective.build(10, 2)
  step = tf.Variable(0, dtype=tf.int64)
  context = obj_lib.TrainContext(
      strategy=tf.distribute.get_strategy(), global_step=step,
      train_steps=25, steps_per_epoch=5, key_encoder=None,
      train_pass_dataset_fn=None, model_dir=str(tmp_path))
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
  fresh = ifnd.IFND(ifnd_reassign_epochs=2)
  fresh.build(10, 2)
  stale = _Recorder(fresh, context, 10)
  stale.start()
  assert stale.steps == [15]


# ---------------------------------------------------------------------------
# Validation and registration.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('kwargs, message', [
    (dict(ifnd_num_clusters='10,3000'), 'cannot make 3000 clusters of the '
     '1000 training examples'),
    (dict(ifnd_num_clusters='0'), 'cluster counts ≥ 1'),
    (dict(ifnd_reassign_epochs=0), '--ifnd_reassign_epochs=0 must be ≥ 1'),
    (dict(ifnd_acceptance_rate=1.5), '--ifnd_acceptance_rate=1.5'),
    (dict(ifnd_strategy='both'), "--ifnd_strategy='both' must be one of"),
    (dict(memory_multiplier=1), '--memory_multiplier=1: the queue holds'),
    (dict(ifnd_confidence='margin', ifnd_num_clusters='1,5'),
     'margin needs ≥ 2 clusters'),
])
def test_validate_rejects_what_cannot_work(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ifnd.IFND(**kwargs).validate(64, 1000)


def test_parse_num_clusters():
  assert ifnd.parse_num_clusters('10,30,100') == (10, 30, 100)
  assert ifnd.parse_num_clusters(['100', '300']) == (100, 300)
  with pytest.raises(ValueError, match='comma-separated list of integers'):
    ifnd.parse_num_clusters('ten')


def test_objective_registration_and_defaults():
  cls = obj_lib.get_objective_class('ifnd')
  assert cls is ifnd.IFND and cls.needs_example_ids
  objective = cls(memory_multiplier=None)   # unset flag: in-batch
  assert objective.num_views == 2 and not objective.uses_momentum_encoder
  assert objective.fn_strategy == 'elimination'
  assert objective.level_combine == 'mean'
  assert cls(memory_multiplier=4).momentum_decay == 0.999
  assert fnc.FNC(memory_multiplier=None).memory_multiplier == 16


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


def _set_flags(**overrides):
  FLAGS.unparse_flags()
  FLAGS(['run.py'] + [f'--{k}={v}' for k, v in {**TINY, **overrides}.items()])


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
  _set_flags(model_dir=model_dir, train_steps=0)
  run.run()
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
  _set_flags(model_dir=ifnd_run, train_steps=0, train_epochs=5)
  experiment = run.Experiment(tf.distribute.get_strategy())
  experiment.checkpoint_manager.restore_or_initialize()
  table = experiment.objective.table
  np.testing.assert_array_equal(table.labels.numpy(), saved['labels'])
  assert int(table.assigned_step.numpy()) == int(saved['assigned_step'])
  controller = experiment.controller(True, False)
  del controller
  reassigner = [a for a in experiment.train_actions
                if isinstance(a, ifnd.Reassigner)]
  assert len(reassigner) == 1
  reassigner[0].start()  # step 23 of 29, table from step 12: not due
  np.testing.assert_array_equal(table.labels.numpy(), saved['labels'])


def test_bad_ifnd_flags_exit_before_training(tmp_path):
  _set_flags(model_dir=str(tmp_path / 'bad'), ifnd_num_clusters='10,5000')
  with pytest.raises(SystemExit) as exit_info:
    run.main(['run.py'])
  assert 'cannot make 5000 clusters' in str(exit_info.value.code)
  assert not os.path.exists(tmp_path / 'bad' / 'checkpoint')


def test_end_to_end_memory_mode_with_constant_acceptance(tmp_path):
  """Memory mode: the momentum encoder embeds the set at step 0 (constant
  rate 0.5, so it clusters at once) and the queue keeps the keys' ids."""
  model_dir = str(tmp_path / 'memory')
  _set_flags(model_dir=model_dir, memory_multiplier=2, train_steps=2,
             checkpoint_steps=2, train_batch_size=64, ifnd_reassign_epochs=1,
             ifnd_acceptance='constant', ifnd_acceptance_rate=0.5)
  run.run()
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
