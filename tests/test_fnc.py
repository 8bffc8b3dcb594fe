"""FNC: identification and loss against NumPy, NT-Xent equivalence, replica
equivalence, the memory queue, validation, and run.py end to end."""

import contextlib
import io
import os

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import config as config_lib
import data as data_lib
import experiment as experiment_lib
import fnc
import model as model_lib
import objective as obj_lib
import run
from conftest import assert_same_value_and_gradient

TAU = 0.5


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def _random_views(seed, num_views, n, d=4):
  """[V, n, d] unit vectors (low d: many high cosines, so F is not empty)."""
  return _unit(np.random.default_rng(seed).normal(size=(num_views, n, d)))


def _view_major(views):
  return views.reshape(-1, views.shape[-1])


# ---------------------------------------------------------------------------
# Independent NumPy reference (one replica, global batch of n images).
# ---------------------------------------------------------------------------


def numpy_fnc(views, candidates, queries, valid, topk, threshold, strategy,
              tau=TAU):
  """(loss, fn mask [n, C]) straight from SPEC §7, with explicit loops.

  views, queries: [V, n, d]; candidates: [C, d], the first V·n of which are
  the current batch (column v·n + j = view v of image j); valid: [C] bool.
  """
  num_views, n, _ = views.shape
  num_columns = len(candidates)
  cand = _unit(candidates)
  mask = np.zeros((n, num_columns), bool)
  for i in range(n):
    own = {v * n + i for v in range(num_views)}
    scored = []
    for c in range(num_columns):
      if c in own or not valid[c]:
        continue
      score = max(_unit(queries[v, i]) @ cand[c] for v in range(num_views))
      scored.append((score, c))
    scored.sort(key=lambda t: -t[0])
    for score, c in scored[:topk]:
      if score > threshold:
        mask[i, c] = True
  total = 0.0
  for a in range(num_views):
    for i in range(n):
      logits = candidates @ views[a, i] / tau
      self_col = a * n + i
      positives = [v * n + i for v in range(num_views) if v != a]
      negatives_f = list(np.flatnonzero(mask[i]))
      if strategy == 'attraction':
        numerator = positives + negatives_f
        denominator = [c for c in range(num_columns)
                       if c != self_col and valid[c]]
      else:
        numerator = positives
        denominator = [c for c in range(num_columns) if c != self_col and
                       valid[c] and not mask[i, c]]
      total += (-np.mean(logits[numerator]) +
                np.log(np.sum(np.exp(logits[denominator]))))
  return 2.0 / num_views * total / n, mask


# ---------------------------------------------------------------------------
# NT-Xent equivalence.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('strategy', fnc.STRATEGIES)
def test_two_views_no_false_negatives_is_nt_xent(strategy):
  views = tf.Variable(_view_major(_random_views(0, 2, 6, d=5)))

  def loss():
    return fnc.fnc_loss(views, 2, TAU, fn_topk=4, fn_threshold=1.01,
                        strategy=strategy)

  assert float(loss()[1]['fn_per_anchor']) == 0.0
  assert_same_value_and_gradient(
      views, lambda: loss()[0],
      lambda: obj_lib.nt_xent_loss(*tf.split(views, 2), TAU)[0])
  # The registered objective (V = 2, in-batch) equals SimCLR's loss too.
  projections = tf.constant(np.random.default_rng(1).normal(size=(12, 5)),
                            tf.float32)
  objective = fnc.FNC(temperature=TAU, support_size=0, memory_multiplier=0,
                      threshold=1.01, strategy=strategy)
  simclr = obj_lib.SimCLR(temperature=TAU)
  np.testing.assert_allclose(
      objective.loss(projections, {})[0].numpy(),
      simclr.loss(projections, {})[0].numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------
# Identification on planted cases.
# ---------------------------------------------------------------------------


def _planted(cosines, columns, num_views=3, n=6, d=32):
  """Views whose image 0 scores exactly `cosines` at `columns`.

  Every view of image 0 is e0; every other view is a distinct basis vector
  orthogonal to e0, except that the view at column c gets cosine
  cosines[c] with e0.
  """
  eye = np.eye(d)
  views = np.zeros((num_views, n, d))
  views[:, 0] = eye[0]
  basis = iter(range(1, d))
  for v in range(num_views):
    for j in range(1, n):
      views[v, j] = eye[next(basis)]
  for cos, c in zip(cosines, columns):
    v, j = divmod(c, n)
    views[v, j] = cos * eye[0] + np.sqrt(1 - cos**2) * views[v, j]
  return views


def _identify(views, topk, threshold, queries=None, candidates=None,
              valid=None):
  num_views, n, _ = views.shape
  candidates = _view_major(views) if candidates is None else candidates
  own = obj_lib.own_image_mask(tf.range(n), n, num_views, len(candidates))
  mask, _ = fnc.identify_false_negatives(
      tf.constant(_view_major(views if queries is None else queries)),
      tf.constant(candidates), own, num_views, topk, threshold,
      None if valid is None else tf.constant(valid))
  return mask.numpy()


def test_identification_finds_near_duplicate_and_matches_numpy():
  views = _planted([0.999], [2 * 6 + 4])  # view 2 of image 4
  mask = _identify(views, topk=10, threshold=0.7)
  assert np.flatnonzero(mask[0]).tolist() == [2 * 6 + 4]
  # Symmetric: image 4 finds image 0's views (all three are e0).
  assert np.flatnonzero(mask[4]).tolist() == [0, 6, 12]
  _, want = numpy_fnc(views, _view_major(views), views,
                      np.ones(18, bool), 10, 0.7, 'attraction')
  np.testing.assert_array_equal(mask, want)


def test_identification_top_k_cut_off():
  cosines = [0.95, 0.9, 0.85, 0.8, 0.75]
  columns = [7, 14, 3, 16, 10]
  mask = _identify(_planted(cosines, columns), topk=3, threshold=0.7)
  assert sorted(np.flatnonzero(mask[0])) == sorted(columns[:3])


def test_identification_threshold_cut_off():
  cosines = [0.95, 0.9, 0.85, 0.8, 0.75]
  columns = [7, 14, 3, 16, 10]
  mask = _identify(_planted(cosines, columns), topk=5, threshold=0.87)
  assert sorted(np.flatnonzero(mask[0])) == sorted(columns[:2])


def test_identification_uses_max_over_views_of_the_image():
  views = _planted([0.9], [8])
  # Only view 1 of image 0 points at the candidate's direction.
  views[0, 0] = np.eye(32)[31]
  views[2, 0] = np.eye(32)[30]
  mask = _identify(views, topk=2, threshold=0.7)
  assert np.flatnonzero(mask[0]).tolist() == [8]


def test_identification_over_queue_skips_unfilled_rows():
  num_views, n, d = 2, 4, 32
  eye = np.eye(d)
  keys = np.stack([[eye[1 + v * n + j] for j in range(n)]
                   for v in range(num_views)])
  keys[:, 0] = eye[0]
  queue = np.stack([eye[20 + k] for k in range(6)])
  queue[1] = 0.8 * eye[0] + 0.6 * eye[21]   # a false negative
  queue[4] = eye[0]                          # unfilled row: ignored
  valid = np.array([True, True, True, True, False, False])
  candidates = np.concatenate([_view_major(keys), queue])
  all_valid = np.concatenate([np.ones(num_views * n, bool), valid])
  mask = _identify(keys, topk=3, threshold=0.7, candidates=candidates,
                   valid=all_valid)
  assert np.flatnonzero(mask[0]).tolist() == [num_views * n + 1]
  _, want = numpy_fnc(keys, candidates, keys, all_valid, 3, 0.7,
                      'attraction')
  np.testing.assert_array_equal(mask, want)


# ---------------------------------------------------------------------------
# Loss against NumPy.
# ---------------------------------------------------------------------------


def _memory_case(seed, num_views=3, n=5, d=4, queue_size=12, filled=9):
  views = _random_views(seed, num_views, n, d)
  keys = _unit(views + 0.3 * _random_views(seed + 1, num_views, n, d))
  queue = _unit(np.random.default_rng(seed + 2).normal(size=(queue_size, d)))
  queue[filled:] = 0.0
  valid = np.arange(queue_size) < filled
  return views, keys, queue, valid


@pytest.mark.parametrize('strategy', fnc.STRATEGIES)
@pytest.mark.parametrize('memory', [False, True])
def test_loss_matches_numpy(strategy, memory):
  labels = np.array([0, 1, 0, 2, 1])
  if memory:
    views, keys, queue, valid = _memory_case(seed=3)
    queue_labels = np.arange(len(queue)) % 3
    result = fnc.fnc_terms(
        tf.constant(_view_major(views)), 3, TAU, 4, 0.5, strategy,
        keys=tf.constant(_view_major(keys)), queue=tf.constant(queue),
        queue_valid=tf.constant(valid), labels=tf.constant(labels),
        queue_labels=tf.constant(queue_labels))
    candidates = np.concatenate([_view_major(keys), queue])
    all_valid = np.concatenate([np.ones(15, bool), valid])
    want, mask = numpy_fnc(views, candidates, keys, all_valid, 4, 0.5,
                           strategy)
    column_labels = np.concatenate([np.tile(labels, 3), queue_labels])
  else:
    views = _random_views(4, 3, 5)
    result = fnc.fnc_terms(tf.constant(_view_major(views)), 3, TAU, 4, 0.5,
                           strategy, labels=tf.constant(labels))
    want, mask = numpy_fnc(views, _view_major(views), views,
                           np.ones(15, bool), 4, 0.5, strategy)
    column_labels = np.tile(labels, 3)
  assert mask.sum() > 0, 'the case must have false negatives'
  np.testing.assert_array_equal(result.fn_mask.numpy(), mask)
  np.testing.assert_allclose(result.loss.numpy(), want, rtol=1e-10)
  metrics = {k: float(v) for k, v in result.metrics.items()}
  true = mask & (labels[:, None] == column_labels[None, :])
  np.testing.assert_allclose(metrics['fn_per_anchor'], mask.sum(1).mean())
  np.testing.assert_allclose(metrics['fn_true_per_anchor'],
                             true.sum(1).mean())
  np.testing.assert_allclose(metrics['fn_label_acc'],
                             true.sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(metrics['contrast_loss'], want, rtol=1e-10)


def test_attraction_and_elimination_differ_only_with_false_negatives():
  views = tf.constant(_view_major(_random_views(5, 3, 5)))
  losses = [fnc.fnc_loss(views, 3, TAU, 4, 0.5, s)[0].numpy()
            for s in fnc.STRATEGIES]
  assert abs(losses[0] - losses[1]) > 1e-3
  none = [fnc.fnc_loss(views, 3, TAU, 4, 1.5, s)[0].numpy()
          for s in fnc.STRATEGIES]
  np.testing.assert_allclose(none[0], none[1], rtol=1e-12)


def test_no_gradient_through_keys_or_mask():
  views, keys, queue, valid = _memory_case(seed=6)
  views, keys = tf.Variable(_view_major(views)), tf.Variable(
      _view_major(keys))
  with tf.GradientTape() as tape:
    loss, _ = fnc.fnc_loss(views, 3, TAU, 4, 0.5, keys=keys,
                           queue=tf.constant(queue),
                           queue_valid=tf.constant(valid))
  grad_views, grad_keys = tape.gradient(loss, [views, keys])
  assert grad_keys is None
  assert np.all(np.isfinite(grad_views.numpy()))
  assert np.abs(grad_views.numpy()).sum() > 0


# ---------------------------------------------------------------------------
# 2 replicas × b == 1 replica × 2b.
# ---------------------------------------------------------------------------


def _local_rows(global_views, replica, b):
  """View-major rows of `replica` from global [V, B, d]."""
  return _view_major(global_views[:, replica * b:(replica + 1) * b])


@pytest.mark.parametrize('memory', [False, True])
def test_two_replicas_equal_one_replica(two_replicas, memory):
  strategy, b, num_views = two_replicas, 3, 3
  views, keys, queue, valid = _memory_case(seed=11, num_views=num_views,
                                           n=2 * b, queue_size=10, filled=7)
  views, keys = views.astype(np.float32), keys.astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  kwargs = dict(fn_topk=5, fn_threshold=0.4, strategy='attraction')
  if memory:
    kwargs.update(queue=tf.constant(queue, tf.float32),
                  queue_valid=tf.constant(valid),
                  queue_labels=tf.constant(np.arange(10) % 3, tf.int32))

  def replica_fn(local_views, local_keys, local_labels):
    with tf.GradientTape() as tape:
      tape.watch(local_views)
      result = fnc.fnc_terms(local_views, num_views, TAU,
                             keys=local_keys if memory else None,
                             labels=local_labels, **kwargs)
      scaled = result.loss / strategy.num_replicas_in_sync
    return (scaled, tape.gradient(scaled, local_views), result.fn_mask,
            result.metrics['fn_label_acc'])

  def per_replica(array, rows):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(rows(array, ctx.replica_id_in_sync_group)))

  local_views = per_replica(views, lambda a, r: _local_rows(a, r, b))
  local_keys = per_replica(keys, lambda a, r: _local_rows(a, r, b))
  local_labels = per_replica(labels, lambda a, r: a[r * b:(r + 1) * b])
  scaled, grads, masks, _ = strategy.run(
      tf.function(replica_fn), args=(local_views, local_keys, local_labels))
  total = strategy.reduce(tf.distribute.ReduceOp.SUM, scaled, axis=None)
  grads = [g.numpy() for g in strategy.experimental_local_results(grads)]
  masks = np.concatenate(
      [m.numpy() for m in strategy.experimental_local_results(masks)])

  variable = tf.Variable(_view_major(views))
  with tf.GradientTape() as tape:
    single = fnc.fnc_terms(
        variable, num_views, TAU,
        keys=tf.constant(_view_major(keys)) if memory else None,
        labels=tf.constant(labels), **kwargs)
  expected = tape.gradient(single.loss, variable).numpy().reshape(
      num_views, 2 * b, -1)
  assert single.fn_mask.numpy().sum() > 0
  np.testing.assert_array_equal(masks, single.fn_mask.numpy())
  np.testing.assert_allclose(total.numpy(), single.loss.numpy(), rtol=1e-5)
  for r in range(2):
    np.testing.assert_allclose(grads[r], _local_rows(expected, r, b),
                               rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Score metrics (distribution of the identification scores).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('seed, shape, spread', [
    (0, (7, 31), 0.3), (1, (64, 200), 0.05), (2, (3, 5), 0.9)])
def test_histogram_quantiles_match_numpy_within_a_bin(seed, shape, spread):
  rng = np.random.default_rng(seed)
  values = np.clip(0.6 + spread * rng.normal(size=shape), -1, 1)
  valid = rng.random(shape) > 0.3
  values[~valid] = -1e9  # excluded entries must not count
  quantiles = (0.01, 0.5, 0.9, 0.99)
  got = fnc.histogram_quantiles(tf.constant(values, tf.float32),
                                tf.constant(valid), quantiles).numpy()
  expected = np.quantile(values[valid], quantiles, method='inverted_cdf')
  np.testing.assert_allclose(got, expected, atol=2.0 / fnc.SCORE_BINS)


def test_histogram_quantiles_edges():
  # Out-of-range values count in the end bins; nothing valid is NaN.
  values = tf.constant([-3.0, 0.25, 0.25, 5.0])
  # Bins of 0.5 over [−1, 1]; counts 1, 0, 2, 1 (−3 in the first, 5 in the
  # last); the median is half-way through bin [0, 0.5).
  got = fnc.histogram_quantiles(values, tf.constant([True] * 4),
                                (0.25, 0.5, 1.0), num_bins=4).numpy()
  np.testing.assert_allclose(got, [-0.5, 0.25, 1.0])
  assert np.isnan(fnc.histogram_quantiles(
      values, tf.zeros([4], tf.bool), (0.5,)).numpy()).all()


@pytest.mark.parametrize('memory', [False, True])
def test_score_metrics_match_numpy(memory):
  num_views, n, topk, threshold = 3, 8, 4, 0.3
  views = _random_views(5, num_views, n, d=6)
  rng = np.random.default_rng(6)
  queue = _unit(rng.normal(size=(10, 6)))
  valid = np.r_[np.ones(num_views * n, bool), np.arange(10) < 7]
  candidates = np.concatenate([_view_major(views), queue])
  kwargs = {}
  if memory:
    kwargs = dict(keys=tf.constant(_view_major(views)),
                  queue=tf.constant(queue), queue_valid=tf.constant(
                      valid[num_views * n:]))
  else:
    candidates, valid = candidates[:num_views * n], valid[:num_views * n]
  metrics = fnc.fnc_terms(tf.constant(_view_major(views)), num_views, TAU,
                          topk, threshold, **kwargs).metrics
  scores = []  # per image, the scores of its candidates (NumPy, loops)
  for i in range(n):
    own = {v * n + i for v in range(num_views)}
    scores.append(sorted(
        (max(views[v, i] @ candidates[c] for v in range(num_views))
         for c in range(len(candidates)) if c not in own and valid[c]),
        reverse=True))
  flat = np.concatenate(scores)
  for q in (50, 90, 99):
    np.testing.assert_allclose(metrics[f'fn_score_p{q}'].numpy(),
                               np.quantile(flat, q / 100,
                                           method='inverted_cdf'),
                               atol=2.0 / fnc.SCORE_BINS)
  np.testing.assert_allclose(metrics['fn_score_max'].numpy(), flat.max(),
                             rtol=1e-6)
  np.testing.assert_allclose(
      metrics['fn_kth_margin'].numpy(),
      np.mean([row[topk - 1] for row in scores]) - threshold, rtol=1e-5)


@pytest.mark.parametrize('num_views', [2, 4])
def test_positive_score_matches_numpy(num_views):
  views = np.random.default_rng(8).normal(size=(num_views, 5, 3)) * 3
  unit = _unit(views)
  expected = np.mean([max(unit[v, i] @ unit[w, i] for v in range(num_views)
                          if v != w)
                      for i in range(5) for w in range(num_views)])
  np.testing.assert_allclose(
      fnc.positive_score(tf.constant(_view_major(views)), num_views).numpy(),
      expected, rtol=1e-6)


def test_no_score_metrics_without_identification():
  views = tf.constant(_view_major(_random_views(0, 2, 6)))
  metrics = fnc.fnc_loss(views, 2, TAU, fn_topk=0, fn_threshold=0.7)[1]
  assert not [name for name in metrics if name.startswith('fn_score')]
  assert 'fn_kth_margin' not in metrics


# ---------------------------------------------------------------------------
# Warm-up (--fnc_warmup_epochs).
# ---------------------------------------------------------------------------


def test_warmup_steps_round_up_and_are_checkpointed():
  objective = fnc.FNC(support_size=0, memory_multiplier=0, topk=2,
                      warmup_epochs=0.5)
  objective.build(10, 4, projection_dim=8)
  assert objective.warmup_steps == 2  # ⌈0.5·10 / 4⌉
  assert set(objective.checkpoint_items()) == {'fnc_steps'}
  memory = fnc.FNC(support_size=0, memory_multiplier=2, topk=2,
                   warmup_epochs=3)
  memory.build(10, 4, projection_dim=8)
  assert memory.warmup_steps == 8
  assert set(memory.checkpoint_items()) == {'fnc_queue', 'fnc_steps'}
  with pytest.raises(ValueError, match='build'):
    fnc.FNC(memory_multiplier=0, warmup_epochs=1).loss(
        tf.zeros([20, 4]), {})


@pytest.mark.parametrize('support_size', [0, 1])
def test_warmup_is_the_plain_loss_then_fnc(support_size):
  """Before the warm-up step the loss (value and gradient) is the base loss
  (FNC with no identification; NT-Xent with V = 2), from then on today's
  FNC loss, step by step."""
  num_views, n = 2 + support_size, 6
  views = tf.Variable(_view_major(_random_views(3, num_views, n, d=3)))
  labels = {'label': tf.constant([0, 1, 2, 0, 1, 2])}
  common = dict(temperature=TAU, support_size=support_size,
                memory_multiplier=0, topk=3, threshold=0.2)
  warm = fnc.FNC(warmup_epochs=1.0, **common)
  warm.build(2 * n, n, projection_dim=3)  # 2 steps of warm-up
  today = fnc.FNC(**common)
  plain = fnc.FNC(**{**common, 'topk': 0})
  assert float(today.loss(views, labels)[1]['fn_per_anchor']) > 0
  for step in range(5):
    reference = plain if step < 2 else today
    with tf.GradientTape(persistent=True) as tape:
      value, metrics = warm.loss(views, labels)
      expected = reference.loss(views, labels)[0]
    assert float(value) == float(expected), step
    np.testing.assert_array_equal(tape.gradient(value, views).numpy(),
                                  tape.gradient(expected, views).numpy())
    assert (float(metrics['fn_per_anchor']) == 0) == (step < 2)
    assert 'fn_score_p50' in metrics  # scores are reported in the warm-up
    assert int(warm.steps_trained.numpy()) == step + 1
  if support_size == 0:
    fresh = fnc.FNC(warmup_epochs=1.0, **common)
    fresh.build(2 * n, n, projection_dim=3)
    np.testing.assert_allclose(
        fresh.loss(views, labels)[0].numpy(),
        obj_lib.nt_xent_loss(*tf.split(tf.math.l2_normalize(views, -1), 2),
                             TAU)[0].numpy(), rtol=1e-6)


def test_warmup_in_a_compiled_function_and_memory_mode():
  n, d = 4, 3
  views = tf.constant(_view_major(_random_views(4, 2, n, d=d)))
  common = dict(temperature=TAU, support_size=0, memory_multiplier=2,
                topk=3, threshold=0.0)
  warm, today = fnc.FNC(warmup_epochs=0.25, **common), fnc.FNC(**common)
  plain = fnc.FNC(**{**common, 'topk': 0})
  for objective in (warm, today, plain):
    objective.build(4 * n, n, projection_dim=d)  # warm-up: 1 step
  step = tf.function(lambda o: o.loss(views, {}, keys=views))
  losses = {name: [float(step(o)[0]) for _ in range(3)]
            for name, o in (('warm', warm), ('today', today),
                            ('plain', plain))}
  assert losses['warm'][0] == losses['plain'][0]
  assert losses['warm'][1:] == losses['today'][1:]
  assert losses['today'][1] != losses['plain'][1]


# ---------------------------------------------------------------------------
# The objective: queue, validation, registry.
# ---------------------------------------------------------------------------


def test_queue_holds_the_expected_keys_in_order(two_replicas):
  """3 steps on 2 replicas: K = 2·V·B, newest first, unfilled rows unused,
  every replica's copy identical and equal to the expected keys."""
  strategy, b, num_views, d = two_replicas, 2, 2, 8
  global_batch = 2 * b
  with strategy.scope():
    objective = fnc.FNC(temperature=TAU, support_size=0, memory_multiplier=4,
                        topk=3)
    objective.validate(global_batch, 100)
    objective.build(100, global_batch, projection_dim=d)
  queue = objective.queue
  assert queue.size == 4 * global_batch

  @tf.function
  def step(local_views, local_keys, ids, labels):
    def replica_fn(v, k, i, l):
      return objective.loss(v, {'id': i, 'label': l}, keys=k)[0]
    return strategy.run(replica_fn, args=(local_views, local_keys, ids,
                                          labels))

  rng = np.random.default_rng(2)
  pushed = []
  for t in range(3):
    views = rng.normal(size=(num_views, global_batch, d)).astype(np.float32)
    keys = rng.normal(size=(num_views, global_batch, d)).astype(np.float32)
    ids = np.arange(global_batch, dtype=np.int32) + 10 * t
    labels = (ids % 3).astype(np.int32)
    dist = lambda a, rows: strategy.experimental_distribute_values_from_function(  # noqa: E731,E501
        lambda ctx: tf.constant(rows(a, ctx.replica_id_in_sync_group)))
    step(dist(views, lambda a, r: _local_rows(a, r, b)),
         dist(keys, lambda a, r: _local_rows(a, r, b)),
         dist(ids, lambda a, r: a[r * b:(r + 1) * b]),
         dist(labels, lambda a, r: a[r * b:(r + 1) * b]))
    pushed.insert(0, (_unit(_view_major(keys)), np.tile(ids, num_views),
                      np.tile(labels, num_views)))
    filled = min((t + 1) * num_views * global_batch, queue.size)
    want_keys = np.zeros((queue.size, d), np.float32)
    want_ids = -np.ones(queue.size, np.int32)
    want_labels = -np.ones(queue.size, np.int32)
    stacked = [np.concatenate(x) for x in zip(*pushed)]
    want_keys[:filled] = stacked[0][:filled]
    want_ids[:filled] = stacked[1][:filled]
    want_labels[:filled] = stacked[2][:filled]
    for replica in range(2):
      np.testing.assert_allclose(queue.keys.values[replica].numpy(),
                                 want_keys, rtol=1e-6, atol=1e-7)
      np.testing.assert_array_equal(queue.ids.values[replica].numpy(),
                                    want_ids)
      np.testing.assert_array_equal(queue.labels.values[replica].numpy(),
                                    want_labels)
      assert int(queue.count.values[replica].numpy()) == filled
    assert queue.valid().numpy().sum() == filled


def test_loss_reads_the_queue_before_pushing():
  objective = fnc.FNC(temperature=TAU, support_size=1, memory_multiplier=6,
                      topk=4, threshold=0.3)
  objective.build(100, 4, projection_dim=4)
  rng = np.random.default_rng(8)
  first_keys = None
  for step in range(2):
    views = _unit(rng.normal(size=(12, 4)))
    keys = _unit(rng.normal(size=(12, 4)))
    queue_before = objective.queue.keys.numpy().copy()
    valid_before = objective.queue.valid().numpy()
    loss, _ = objective.loss(tf.constant(views, tf.float32),
                             {'id': tf.range(4)}, keys=tf.constant(
                                 keys, tf.float32))
    want, _ = numpy_fnc(views.reshape(3, 4, 4),
                        np.concatenate([keys, queue_before]),
                        keys.reshape(3, 4, 4),
                        np.concatenate([np.ones(12, bool), valid_before]),
                        4, 0.3, 'attraction')
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)
    if step == 0:
      assert not valid_before.any()
      first_keys = keys
  np.testing.assert_allclose(objective.queue.keys.numpy()[:12], keys,
                             rtol=1e-6)
  np.testing.assert_allclose(objective.queue.keys.numpy()[12:24], first_keys,
                             rtol=1e-6)


@pytest.mark.parametrize('kwargs, batch, message', [
    (dict(memory_multiplier=2, support_size=2), 16,
     r'--memory_multiplier=2: the queue holds 2·B = 32 keys, fewer than one '
     r'batch of keys \(V·B'),
    (dict(memory_multiplier=0, support_size=0, topk=7), 4,
     '--fn_topk=7 exceeds the 6 candidates'),
    (dict(memory_multiplier=2, support_size=0, topk=15), 4,
     r'--fn_topk=15 exceeds the 14 candidates .*queued keys'),
    (dict(strategy='repulsion'), 16, "--fn_strategy='repulsion'"),
    (dict(support_size=-1, memory_multiplier=0), 16, '--support_size=-1'),
    (dict(momentum_decay=1.5), 16, '--moving_average_decay=1.5'),
    (dict(memory_multiplier=-1), 16, '--memory_multiplier=-1 must be ≥ 0'),
    (dict(topk=-1), 16, '--fn_topk=-1 must be ≥ 0'),
    (dict(warmup_epochs=-1.0), 16, '--fnc_warmup_epochs=-1.0 must be ≥ 0'),
])
def test_validate_rejects_what_cannot_work(kwargs, batch, message):
  with pytest.raises(ValueError, match=message):
    fnc.FNC(**kwargs).validate(batch, 1000)


def test_validate_accepts_the_published_recipe_and_edge_cases():
  fnc.FNC().validate(4096, 1281167)
  fnc.FNC(memory_multiplier=0, support_size=0, topk=6).validate(4, 100)
  fnc.FNC(memory_multiplier=2, support_size=0, topk=14).validate(4, 100)


def test_objective_registration_and_properties():
  cls = obj_lib.get_objective_class('fnc')
  assert cls is fnc.FNC
  assert cls.default_randaugment and not obj_lib.SimCLR.default_randaugment
  default = cls()
  assert default.num_views == 10 and default.memory_multiplier == 16
  assert default.uses_momentum_encoder and default.momentum_decay == 0.999
  in_batch = cls(memory_multiplier=0)
  # No momentum encoder, so nobody reads momentum_decay.
  assert not in_batch.uses_momentum_encoder
  in_batch.build(100, 16, projection_dim=8)
  assert in_batch.checkpoint_items() == {}
  assert not obj_lib.SimCLR().uses_momentum_encoder
  assert obj_lib.SimCLR().momentum_decay is None
  with pytest.raises(ValueError, match='projection_dim'):
    cls().build(100, 16, projection_dim=None)
  memory = cls(support_size=0, memory_multiplier=2)
  memory.build(100, 16, projection_dim=8)
  assert memory.queue.keys.shape == (32, 8)
  assert set(memory.checkpoint_items()) == {'fnc_queue'}


# ---------------------------------------------------------------------------
# End to end through run.py (one replica; digits, 16×16, ResNet-18 × 0.25).
# ---------------------------------------------------------------------------

TINY = {
    'dataset': 'digits', 'image_size': 16, 'resnet_depth': 18,
    'width_multiplier': 0.25, 'proj_out_dim': 16, 'train_batch_size': 16,
    'warmup_epochs': 0, 'learning_rate': 0.5, 'checkpoint_steps': 2,
    'use_blur': False, 'train_summary_steps': 0, 'objective': 'fnc',
    'support_size': 2, 'train_steps': 2, 'mode': 'train',
}


def _argv(**overrides):
  return [f'--{k}={v}' for k, v in {**TINY, **overrides}.items()]


def _config(**overrides):
  return config_lib.from_argv(_argv(**overrides))


def _experiment(**overrides):
  return experiment_lib.Experiment(_config(**overrides),
                                   tf.distribute.get_strategy())


def _read(path):
  reader = tf.train.load_checkpoint(path)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


def _values(values, prefix):
  return {k[len(prefix):]: v for k, v in values.items()
          if k.startswith(prefix) and k.endswith(checkpoints.VALUE_SUFFIX)
          and '.OPTIMIZER_SLOT' not in k}


@pytest.fixture(scope='module')
def fnc_runs(tmp_path_factory):
  """2 steps in-batch (RandAugment on, FNC's default) and 2 in memory mode
  (RandAugment off: tracing it for V views is a third of a run's time)."""
  dirs = {}
  for name, multiplier, randaugment in (('in_batch', 0, True),
                                        ('memory', 4, False)):
    dirs[name] = str(tmp_path_factory.mktemp(name))
    run.run(_config(model_dir=dirs[name], memory_multiplier=multiplier,
                    use_randaugment=randaugment))
  return dirs


def test_end_to_end_in_batch(fnc_runs):
  latest = tf.train.latest_checkpoint(fnc_runs['in_batch'])
  assert latest.endswith('ckpt-2')
  values = _read(latest)
  assert not [k for k in values if 'momentum_encoder' in k or 'fnc_queue' in k]
  assert values['optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE'] == 2


def test_end_to_end_memory_mode_checkpoint(fnc_runs):
  values = _read(tf.train.latest_checkpoint(fnc_runs['memory']))
  queue = _values(values, 'fnc_queue/')
  num_views, batch = 4, 16
  size = 4 * batch
  assert queue['count' + checkpoints.VALUE_SUFFIX] == size
  keys = queue['keys' + checkpoints.VALUE_SUFFIX]
  ids = queue['ids' + checkpoints.VALUE_SUFFIX]
  labels = queue['labels' + checkpoints.VALUE_SUFFIX]
  assert keys.shape == (size, 16)
  np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, rtol=1e-5)
  # The last step's V·B keys fill the queue: ids repeat per view, labels are
  # the digits labels of those ids.
  per_view = ids.reshape(num_views, batch)
  assert np.all(per_view == per_view[0]) and len(set(per_view[0])) == batch
  digit_labels = data_lib.get_data_source('digits').arrays('train')[1]
  np.testing.assert_array_equal(labels, digit_labels[ids])
  # The momentum encoder is saved, mirrors the model's variables, and has
  # moved only a little from the online network (EMA, decay 0.999).
  encoder = _values(values, 'momentum_encoder/')
  online = _values(values, 'model/')
  shared = [k for k in encoder if k.startswith(('base_model', 'head_con'))]
  assert shared and all(k in online for k in shared)
  assert not [k for k in encoder if 'head_supervised' in k]
  assert any(not np.array_equal(encoder[k], online[k]) for k in shared)


def test_resume_restores_encoder_and_queue_exactly(fnc_runs):
  model_dir = fnc_runs['memory']
  values = _read(tf.train.latest_checkpoint(model_dir))
  experiment = _experiment(model_dir=model_dir, memory_multiplier=4,
                           train_steps=3)
  experiment.checkpoint_manager.restore_or_initialize()
  assert int(experiment.global_step.numpy()) == 2
  saved = model_lib.variable_paths(experiment.momentum_encoder)
  for path, variable in saved.items():
    key = 'momentum_encoder/' + path + checkpoints.VALUE_SUFFIX
    np.testing.assert_array_equal(variable.numpy(), values[key], err_msg=path)
  queue = experiment.objective.queue
  for name in ('keys', 'ids', 'labels', 'count'):
    np.testing.assert_array_equal(
        getattr(queue, name).numpy(),
        values[f'fnc_queue/{name}' + checkpoints.VALUE_SUFFIX])
  # Not re-initialised from the model on resume.
  pairs = experiment.momentum_encoder._variable_pairs(experiment.model)  # pylint: disable=protected-access
  assert any(not np.array_equal(e.numpy(), m.numpy()) for e, m in pairs)


def test_new_run_starts_encoder_equal_to_warm_started_model(fnc_runs,
                                                            tmp_path):
  experiment = _experiment(model_dir=str(tmp_path / 'warm'),
                           memory_multiplier=4,
                           checkpoint=fnc_runs['in_batch'])
  experiment.checkpoint_manager.restore_or_initialize()
  source = _values(_read(tf.train.latest_checkpoint(fnc_runs['in_batch'])),
                   'model/')
  pairs = experiment.momentum_encoder._variable_pairs(experiment.model)  # pylint: disable=protected-access
  paths = {id(v): k for k, v in
           model_lib.variable_paths(experiment.model).items()}
  for own, online in pairs:
    np.testing.assert_array_equal(own.numpy(), online.numpy())
    np.testing.assert_array_equal(
        own.numpy(), source[paths[id(online)] + checkpoints.VALUE_SUFFIX])


def test_randaugment_follows_objective_default_and_flag(tmp_path):
  for overrides, expected in (({}, True), ({'use_randaugment': False}, False),
                              ({'objective': 'simclr'}, False),
                              ({'objective': 'simclr',
                                'use_randaugment': True}, True)):
    experiment = _experiment(model_dir=str(tmp_path), memory_multiplier=0,
                             **overrides)
    augment = experiment.randaugment()
    assert (augment is not None) == expected, overrides
    if augment is not None:  # constants scaled to 16-pixel images
      assert augment.translate_const == round(100 * 16 / 224)
      assert augment.cutout_const == round(40 * 16 / 224)


def test_queue_smaller_than_a_batch_of_keys_exits_clearly(tmp_path):
  stderr = io.StringIO()
  with pytest.raises(SystemExit) as exit_info, \
      contextlib.redirect_stderr(stderr):
    run.run_from_flags(config_lib.parse_argv(_argv(
        model_dir=str(tmp_path / 'small'), memory_multiplier=2)))
  assert exit_info.value.code == 2
  assert '--memory_multiplier=2' in stderr.getvalue()
  assert 'fewer than one batch of keys' in stderr.getvalue()
  assert not os.path.exists(tmp_path / 'small' / 'checkpoint')
