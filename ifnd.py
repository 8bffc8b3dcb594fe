"""IFND: incremental false negative detection (Chen et al., ICLR 2022; SPEC §9).

Every `ifnd_reassign_epochs` the whole training set is embedded (centre
crop, no augmentation, l2-normalised projections of the key encoder: the
momentum encoder in memory mode, else the online network) under the
strategy (`evaluate.distributed_feature_step`), and clustered on the host with k-means once per entry of
`ifnd_num_clusters` (one level per granularity). Each example's pseudo
label at a level is its cluster, but only the round(r·N) most confident
examples of the level keep it (confidence = cosine to the own centroid, or
the margin to the second-nearest one); r, the acceptance rate, rises with
training (linear from 0 to 1 by default). The pseudo-label table
(N × levels, −1 = no label) lives in a replicated variable and checkpoints.

During training, for an anchor of image i, a column of image j ≠ i is a
false negative at level l when both are labelled there and table[i, l] =
table[j, l] (`pseudo_label_mask`). The loss is `fnc.cancellation_loss`
(elimination by default: F leaves the denominator; attraction: F joins the
positives) against the in-batch views (memory_multiplier 0, NT-Xent base)
or the momentum keys + queue (memory mode; queued keys carry their example
ids). Levels combine as the mean of the per-level losses (`mean`, default)
or one loss with the union of the masks (`any`). With an empty table the
loss equals the base loss exactly.

Choices not in the paper summary (SPEC §9): k-means with scikit-learn
(Lloyd, k-means++ seeding on a subsample, fixed seed, at most
`ifnd_kmeans_iters` iterations; benchmarks/ifnd_cost.py measures it against
faiss), the acceptance rate applied at each re-assignment with r = the
fraction of training done at that step (schedule behind
`ifnd_acceptance`), and no clustering while r·N rounds to 0 (nothing could
be accepted).
"""

import json
import os
import time
from typing import NamedTuple, Optional

from absl import logging
import numpy as np
import tensorflow as tf

import checkpoints
import evaluate
import fnc
import objective

STRATEGIES = fnc.STRATEGIES
LEVEL_COMBINES = ('mean', 'any')
SCHEDULES = ('linear', 'constant', 'step')
CONFIDENCES = ('centroid', 'margin')


# ---------------------------------------------------------------------------
# Acceptance schedule, clustering and the pseudo-label table (host side).
# ---------------------------------------------------------------------------


def acceptance_rate(progress, schedule='linear', rate=1.0, stages=5):
  """Acceptance rate r in [0, 1] at `progress` (fraction of training done).

  linear: r = progress (0 at the start, 1 at the end; the paper);
  constant: r = `rate` throughout;
  step: `stages` equal stages, r = stage / (stages − 1) (0, ¼, ½, ¾, 1 for 5).
  """
  progress = min(max(float(progress), 0.0), 1.0)
  if schedule == 'linear':
    return progress
  if schedule == 'constant':
    return float(rate)
  if schedule == 'step':
    stage = min(int(progress * stages), stages - 1)
    return stage / (stages - 1)
  raise ValueError(f'ifnd_acceptance must be one of {SCHEDULES}, got '
                   f'{schedule!r}.')


def kmeans(features, num_clusters, seed=0, max_iter=100, seed_sample=None):
  """Lloyd k-means (scikit-learn), one run, fixed seed.

  k-means++ seeding, which makes k passes over the points it seeds from,
  runs on a random subsample of `seed_sample` points (default
  max(20·k, 10 000); all of them when N is smaller); Lloyd then runs on all
  points (benchmarks/ifnd_cost.py: 144 s for 1.28 M × 128, k = 1000, on 2
  cores).

  Returns (centroids [k, d] float32, assignments [N] int32).
  """
  from sklearn import cluster  # pylint: disable=g-import-not-at-top
  features = np.asarray(features, np.float32)
  num = len(features)
  if num_clusters > num:
    raise ValueError(f'Cannot make {num_clusters} clusters of {num} '
                     'examples.')
  rng = np.random.default_rng(seed)
  seed_sample = seed_sample or max(20 * num_clusters, 10_000)
  sample = (features if num <= seed_sample else
            features[np.sort(rng.choice(num, seed_sample, replace=False))])
  init, _ = cluster.kmeans_plusplus(sample, num_clusters,
                                    random_state=seed)
  km = cluster.KMeans(n_clusters=num_clusters, init=init, n_init=1,
                      max_iter=max_iter, random_state=seed, algorithm='lloyd')
  assignments = km.fit_predict(features)
  return km.cluster_centers_.astype(np.float32), assignments.astype(np.int32)


def cluster_confidence(features, centroids, assignments, kind='centroid'):
  """Confidence of each example's cluster label, [N] float32.

  centroid: cos(x_i, c_{a_i}) (default); margin: that minus the cosine to
  the most similar other centroid. Centroids are l2-normalised first.
  """
  unit = evaluate.l2_normalize(centroids)
  x = evaluate.l2_normalize(features)
  own = np.einsum('nd,nd->n', x, unit[assignments])
  if kind == 'centroid':
    return own.astype(np.float32)
  if kind == 'margin':
    if len(centroids) < 2:
      raise ValueError('Margin confidence needs at least 2 clusters.')
    cosines = x @ unit.T
    cosines[np.arange(len(x)), assignments] = -np.inf
    return (own - cosines.max(axis=1)).astype(np.float32)
  raise ValueError(f'ifnd_confidence must be one of {CONFIDENCES}, got '
                   f'{kind!r}.')


def accept(assignments, confidence, rate):
  """Pseudo labels [N] int32: the round(rate·N) most confident examples
  keep their cluster, the others get −1 (ties: lower index first)."""
  num = len(assignments)
  count = int(round(rate * num))
  order = np.lexsort((np.arange(num), -confidence))
  labels = np.full(num, -1, np.int32)
  keep = order[:count]
  labels[keep] = assignments[keep]
  return labels


def purity(pseudo_labels, true_labels):
  """Fraction of labelled examples whose cluster's majority true label is
  theirs (NaN when nothing is labelled or true labels are unknown)."""
  keep = (pseudo_labels >= 0) & (true_labels >= 0)
  if not keep.any():
    return float('nan')
  clusters, true = pseudo_labels[keep], true_labels[keep]
  counts = np.zeros((clusters.max() + 1, true.max() + 1), np.int64)
  np.add.at(counts, (clusters, true), 1)
  return float(counts.max(axis=1).sum() / keep.sum())


class Assignment(NamedTuple):
  """The outcome of `assign_pseudo_labels`."""
  table: np.ndarray           # [N, L] int32, −1 = no label
  rate: float
  purity: list                # per level
  cluster_sizes: list         # per level: (min, median, max) over clusters
  kmeans_seconds: float


def assign_pseudo_labels(features, num_clusters, rate, seed=0,
                         confidence='centroid', max_iter=100,
                         true_labels=None):
  """The pseudo-label table of `features` [N, d] at acceptance `rate`.

  One k-means per entry of `num_clusters`; nothing is clustered when the
  rate accepts no example.
  """
  num = len(features)
  table = np.full((num, len(num_clusters)), -1, np.int32)
  purities, sizes = [], []
  start = time.time()
  if int(round(rate * num)) > 0:
    for level, k in enumerate(num_clusters):
      centroids, assignments = kmeans(features, k, seed=seed + level,
                                      max_iter=max_iter)
      conf = cluster_confidence(features, centroids, assignments, confidence)
      table[:, level] = accept(assignments, conf, rate)
      counts = np.bincount(assignments, minlength=k)
      sizes.append((int(counts.min()), float(np.median(counts)),
                    int(counts.max())))
      if true_labels is not None:
        purities.append(purity(table[:, level], np.asarray(true_labels)))
  return Assignment(table=table, rate=float(rate), purity=purities,
                    cluster_sizes=sizes,
                    kmeans_seconds=time.time() - start)


class PseudoLabelTable(tf.Module):
  """The pseudo labels [N, L] (−1 = none), identical on every replica.

  Also holds the step of the last re-assignment (−1 = never) and its
  acceptance rate. Assign from the host (cross-replica context), which
  writes every replica's copy; all three are checkpointed.
  """

  def __init__(self, num_examples, num_levels, name='ifnd_table'):
    super().__init__(name=name)
    state = objective.replicated_state
    self.labels = state(-tf.ones([num_examples, num_levels], tf.int32),
                        'labels')
    self.assigned_step = state(tf.constant(-1, tf.int64), 'assigned_step')
    self.rate = state(tf.constant(0.0, tf.float32), 'rate')

  def assign(self, table, step, rate):
    self.labels.assign(tf.constant(table, tf.int32))
    self.assigned_step.assign(tf.constant(step, tf.int64))
    self.rate.assign(tf.constant(rate, tf.float32))


# ---------------------------------------------------------------------------
# The loss (pure functions).
# ---------------------------------------------------------------------------


def pseudo_label_mask(anchor_ids, column_ids, table):
  """False negatives from pseudo labels, [L, b, C] bool (no gradient).

  Column c is a false negative of anchor image i at level l iff c shows an
  example j ≠ i, both have a label at l (≥ 0) and the labels agree.
  `column_ids` < 0 (unknown, e.g. unfilled queue rows) are never false
  negatives.
  """
  anchor_ids = tf.cast(anchor_ids, tf.int32)
  column_ids = tf.cast(column_ids, tf.int32)
  known = column_ids >= 0
  anchor = tf.transpose(tf.gather(table, anchor_ids))             # [L, b]
  column = tf.transpose(tf.where(
      known[:, tf.newaxis], tf.gather(table, tf.maximum(column_ids, 0)),
      -1))                                                         # [L, C]
  same = tf.equal(anchor[:, :, tf.newaxis], column[:, tf.newaxis, :])
  labelled = tf.logical_and(anchor[:, :, tf.newaxis] >= 0,
                            column[:, tf.newaxis, :] >= 0)
  other = tf.not_equal(anchor_ids[:, tf.newaxis], column_ids[tf.newaxis, :])
  return tf.stop_gradient(tf.logical_and(tf.logical_and(same, labelled),
                                         other[tf.newaxis]))


class IFNDResult(NamedTuple):
  loss: tf.Tensor
  fn_mask: tf.Tensor                 # [L, b, C] bool, per level
  current_keys: Optional[tf.Tensor]  # [V·B, d] gathered keys (memory mode)
  metrics: dict


def ifnd_terms(views, ids, table, temperature, strategy='elimination',
               level_combine='mean', num_views=2, keys=None, queue=None,
               queue_valid=None, queue_ids=None, labels=None,
               queue_labels=None, replica_context=None):
  """IFND loss of one replica's anchors.

  Args:
    views: [V·b, d] online projections (normalised for cosines), view-major.
    ids: [b] example ids of the local images.
    table: [N, L] int32 pseudo labels (−1 = none).
    temperature: τ.
    strategy: 'elimination' (default) or 'attraction' (`fnc.
      cancellation_loss`).
    level_combine: 'mean': loss = (1/L) Σ_l loss(F_l); 'any': loss(∪_l F_l).
    num_views: V.
    keys, queue, queue_valid: memory mode, as `fnc.contrast_columns`.
    queue_ids: [K] example ids of the queued keys (−1 = unfilled).
    labels, queue_labels: true labels, for metrics only.
    replica_context: as `objective.cross_replica_concat`.

  Returns:
    IFNDResult; loss = 2·mean over the V·b anchors of ℓ, as NT-Xent (which
    it equals, with V = 2 in-batch, when no pair shares a label). metrics:
    contrast_loss, contrast_acc, contrast_entropy, fn_per_anchor (removed
    per image: mean over levels of |F_l|, or |∪F_l| for 'any'),
    accepted_fraction (local images with a label, mean over levels),
    acceptance_rate is added by the objective; with labels also
    fn_true_per_anchor and fn_label_acc over ∪F_l.
  """
  if level_combine not in LEVEL_COMBINES:
    raise ValueError(f'ifnd_level_combine must be one of {LEVEL_COMBINES}, '
                     f'got {level_combine!r}.')
  if keys is None:
    queue = None
  columns = fnc.contrast_columns(views, num_views, keys, queue, queue_valid,
                                 replica_context)
  column_ids = fnc.column_values(ids, num_views, queue_ids, queue,
                                 replica_context)
  masks = pseudo_label_mask(ids, column_ids, table)            # [L, b, C]
  union = tf.reduce_any(masks, axis=0)
  if level_combine == 'any':
    level_masks = [union]
  else:
    level_masks = tf.unstack(masks, num=table.shape[1], axis=0)
  losses = []
  for mask in level_masks:
    per_anchor, logits, positives, contrast = fnc.cancellation_loss(
        views, columns, num_views, temperature, mask, strategy)
    losses.append(2.0 * tf.reduce_mean(per_anchor))
  loss = tf.add_n(losses) / len(losses)
  removed = tf.stack([tf.reduce_sum(tf.cast(m, tf.float32), axis=1)
                      for m in level_masks])                   # [L', b]
  accepted = tf.gather(table, tf.cast(ids, tf.int32)) >= 0     # [b, L]
  metrics = {'contrast_loss': loss,
             **fnc.cancellation_metrics(logits, positives, contrast),
             'fn_per_anchor': tf.reduce_mean(removed),
             'accepted_fraction': tf.reduce_mean(
                 tf.cast(accepted, tf.float32))}
  if labels is not None:
    metrics.update(fnc.false_negative_label_metrics(
        union, labels, fnc.column_values(labels, num_views, queue_labels,
                                         queue, replica_context)))
  return IFNDResult(loss=loss, fn_mask=masks,
                    current_keys=columns.current_keys, metrics=metrics)


def ifnd_loss(views, ids, table, temperature, strategy='elimination',
              level_combine='mean', **kwargs):
  """(loss, metrics) of `ifnd_terms` (same arguments)."""
  result = ifnd_terms(views, ids, table, temperature, strategy,
                      level_combine, **kwargs)
  return result.loss, result.metrics


# ---------------------------------------------------------------------------
# Re-assignment (orbit train action) and the objective.
# ---------------------------------------------------------------------------


class Reassigner:
  """Re-assigns the pseudo labels every `period_steps` steps.

  An orbit train action: after a host loop that reaches a multiple of the
  period (and before that step's checkpoint is written), it embeds the
  training set, clusters it and fills the table. `start()` does it at once
  when the table is stale: never assigned (a new run, or a resumed run
  whose checkpoint has no table) or older than the last multiple of the
  period. Each re-assignment logs a line with its time, writes TensorBoard
  scalars (`model_dir/ifnd`) and appends to `model_dir/ifnd_assignments.json`.
  """

  def __init__(self, ifnd, context, period_steps):
    self.ifnd = ifnd
    self.context = context
    self.period_steps = int(period_steps)
    self.history = []
    self._path = os.path.join(context.model_dir, 'ifnd_assignments.json')
    if tf.io.gfile.exists(self._path):
      with tf.io.gfile.GFile(self._path) as f:
        self.history = json.load(f)
    self._writer = None
    self._embed_step = None

  def _due_step(self, step):
    return (step // self.period_steps) * self.period_steps

  def start(self):
    step = int(self.context.global_step.numpy())
    if (step < self.context.train_steps and
        int(self.ifnd.table.assigned_step.numpy()) < self._due_step(step)):
      self.reassign(step)

  def __call__(self, outputs=None):
    del outputs
    step = int(self.context.global_step.numpy())
    if (step < self.context.train_steps and step % self.period_steps == 0 and
        int(self.ifnd.table.assigned_step.numpy()) < step):
      self.reassign(step)

  def reassign(self, step):
    start = time.time()
    rate = acceptance_rate(step / self.context.train_steps,
                           self.ifnd.acceptance, self.ifnd.acceptance_value,
                           self.ifnd.acceptance_stages)
    num = self.ifnd.num_examples
    embed_seconds = 0.0
    if int(round(rate * num)) > 0:
      if self._embed_step is None:
        self._embed_step = evaluate.distributed_feature_step(
            self.context.strategy, self.context.key_encoder)
      embeddings, true_labels = evaluate.collect_features(
          self._embed_step, self.context.train_pass_dataset_fn())
      if len(embeddings) != num:
        raise ValueError(f'The embedding pass saw {len(embeddings)} training '
                         f'examples, the pseudo-label table has {num}.')
      embeddings = evaluate.l2_normalize(embeddings)
      embed_seconds = time.time() - start
      result = assign_pseudo_labels(
          embeddings, self.ifnd.num_clusters, rate, seed=self.ifnd.seed,
          confidence=self.ifnd.confidence, max_iter=self.ifnd.kmeans_iters,
          true_labels=true_labels if (true_labels >= 0).any() else None)
    else:
      result = assign_pseudo_labels(np.zeros((num, 1), np.float32),
                                    self.ifnd.num_clusters, rate)
    self.ifnd.table.assign(result.table, step, rate)
    seconds = time.time() - start
    record = {'step': step,
              'epoch': step / self.context.steps_per_epoch,
              'acceptance_rate': rate,
              'accepted_per_level': int(round(rate * num)),
              'num_clusters': list(self.ifnd.num_clusters),
              'purity': result.purity,
              'cluster_sizes_min_median_max': result.cluster_sizes,
              'embed_seconds': round(embed_seconds, 2),
              'kmeans_seconds': round(result.kmeans_seconds, 2),
              'seconds': round(seconds, 2)}
    purities = ', '.join(f'{p:.3f}' for p in result.purity) or 'n/a'
    logging.info(
        'IFND re-assignment at step %d (epoch %.1f): acceptance rate %.3f, '
        '%d of %d examples labelled per level, clusters %s, purity %s; '
        '%.1f s (embedding %.1f s, k-means %.1f s).', step,
        record['epoch'], rate, record['accepted_per_level'], num,
        record['num_clusters'], purities, seconds, embed_seconds,
        result.kmeans_seconds)
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(
          os.path.join(self.context.model_dir, 'ifnd'))
    with self._writer.as_default():
      tf.summary.scalar('ifnd/acceptance_rate', rate, step=step)
      tf.summary.scalar('ifnd/reassign_seconds', seconds, step=step)
      for level, value in enumerate(result.purity):
        tf.summary.scalar(f'ifnd/purity_level_{level}', value, step=step)
      for level, (low, median, high) in enumerate(result.cluster_sizes):
        tf.summary.scalar(f'ifnd/cluster_size_min_level_{level}', low,
                          step=step)
        tf.summary.scalar(f'ifnd/cluster_size_max_level_{level}', high,
                          step=step)
    self._writer.flush()
    self.history = [h for h in self.history if h['step'] != step] + [record]
    checkpoints.write_json(self._path, self.history)
    return record


def parse_num_clusters(value):
  """'10,30,100' (or a list) → (10, 30, 100)."""
  if isinstance(value, str):
    value = [v for v in value.split(',') if v.strip()]
  try:
    return tuple(int(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'--ifnd_num_clusters={value!r} must be a comma-'
                     'separated list of integers, e.g. 10,30,100.') from e


@objective.register('ifnd')
class IFND(fnc.MemoryObjective):
  """Incremental false negative detection on top of NT-Xent or a memory
  queue (memory_multiplier > 0: momentum encoder + queue as FNC's).

  State (checkpointed): the pseudo-label table `ifnd_table` and, in memory
  mode, the queue `ifnd_queue`. The re-assignment runs as a train action
  every `reassign_epochs` epochs.
  """
  flag_names = ('temperature', 'hidden_norm', 'memory_multiplier',
                'moving_average_decay', 'ifnd_num_clusters',
                'ifnd_reassign_epochs', 'ifnd_acceptance',
                'ifnd_acceptance_rate', 'ifnd_acceptance_stages',
                'ifnd_confidence', 'ifnd_strategy', 'ifnd_level_combine',
                'ifnd_kmeans_iters', 'seed')
  needs_example_ids = True
  metric_names = ('contrast_loss', 'contrast_acc', 'contrast_entropy',
                  'fn_per_anchor', 'accepted_fraction', 'acceptance_rate',
                  'fn_true_per_anchor', 'fn_label_acc')

  def __init__(self, temperature=0.1, hidden_norm=True, memory_multiplier=0,
               moving_average_decay=0.999, ifnd_num_clusters='10,30,100',
               ifnd_reassign_epochs=20, ifnd_acceptance='linear',
               ifnd_acceptance_rate=1.0, ifnd_acceptance_stages=5,
               ifnd_confidence='centroid', ifnd_strategy='elimination',
               ifnd_level_combine='mean', ifnd_kmeans_iters=100, seed=None,
               projection_dim=None, name=None):
    super().__init__(temperature=temperature, hidden_norm=hidden_norm,
                     name=name)
    self.memory_multiplier = (0 if memory_multiplier is None
                              else memory_multiplier)
    self.moving_average_decay = moving_average_decay
    self.num_clusters = parse_num_clusters(ifnd_num_clusters)
    self.reassign_epochs = ifnd_reassign_epochs
    self.acceptance = ifnd_acceptance
    self.acceptance_value = ifnd_acceptance_rate
    self.acceptance_stages = ifnd_acceptance_stages
    self.confidence = ifnd_confidence
    self.fn_strategy = ifnd_strategy
    self.level_combine = ifnd_level_combine
    self.kmeans_iters = ifnd_kmeans_iters
    self.seed = 0 if seed is None else seed
    if projection_dim is not None:
      self.projection_dim = projection_dim
    self.num_examples = None
    self.table = None
    self.queue = None

  def validate(self, global_batch_size, num_train_examples):
    errors = []
    if not self.num_clusters or min(self.num_clusters) < 1:
      errors.append(f'--ifnd_num_clusters={self.num_clusters} needs one or '
                    'more cluster counts ≥ 1.')
    elif max(self.num_clusters) > num_train_examples:
      errors.append(f'--ifnd_num_clusters={self.num_clusters}: cannot make '
                    f'{max(self.num_clusters)} clusters of the '
                    f'{num_train_examples} training examples.')
    if self.confidence == 'margin' and min(self.num_clusters or [2]) < 2:
      errors.append('--ifnd_confidence=margin needs ≥ 2 clusters per level.')
    if self.reassign_epochs < 1:
      errors.append(f'--ifnd_reassign_epochs={self.reassign_epochs} must be '
                    '≥ 1.')
    for name, value, allowed in (
        ('ifnd_acceptance', self.acceptance, SCHEDULES),
        ('ifnd_confidence', self.confidence, CONFIDENCES),
        ('ifnd_strategy', self.fn_strategy, STRATEGIES),
        ('ifnd_level_combine', self.level_combine, LEVEL_COMBINES)):
      if value not in allowed:
        errors.append(f'--{name}={value!r} must be one of '
                      f'{", ".join(allowed)}.')
    if not 0.0 <= self.acceptance_value <= 1.0:
      errors.append(f'--ifnd_acceptance_rate={self.acceptance_value} must be '
                    'in [0, 1].')
    if self.acceptance_stages < 2:
      errors.append(f'--ifnd_acceptance_stages={self.acceptance_stages} must '
                    'be ≥ 2.')
    if self.kmeans_iters < 1:
      errors.append(f'--ifnd_kmeans_iters={self.kmeans_iters} must be ≥ 1.')
    if self.memory_multiplier < 0:
      errors.append(f'--memory_multiplier={self.memory_multiplier} must be '
                    '≥ 0 (0 = in-batch negatives).')
    elif 0 < self.memory_multiplier < self.num_views:
      errors.append(
          f'--memory_multiplier={self.memory_multiplier}: the queue holds '
          f'fewer keys than one batch ({self.num_views}·B); use ≥ '
          f'{self.num_views}, or 0 for in-batch negatives.')
    if not 0.0 <= self.moving_average_decay <= 1.0:
      errors.append(f'--moving_average_decay={self.moving_average_decay} '
                    'must be in [0, 1].')
    if global_batch_size < 2:
      errors.append(f'--train_batch_size={global_batch_size}: IFND needs '
                    'at least 2 images per batch.')
    if errors:
      raise ValueError('\n  '.join(errors))

  def build(self, num_train_examples, global_batch_size):
    self.num_examples = int(num_train_examples)
    self.table = PseudoLabelTable(num_train_examples, len(self.num_clusters))
    self.queue = self.make_queue(global_batch_size, 'ifnd_queue')

  def checkpoint_items(self):
    items = {}
    if self.table is not None:
      items['ifnd_table'] = self.table
    if self.queue is not None:
      items['ifnd_queue'] = self.queue
    return items

  def action_period_steps(self, steps_per_epoch):
    return self.reassign_epochs * steps_per_epoch

  def train_actions(self, context):
    return [Reassigner(self, context,
                       self.action_period_steps(context.steps_per_epoch))]

  def loss(self, projections, batch, keys=None):
    if self.table is None:
      raise ValueError('IFND.build(...) must be called before loss().')
    if projections.dtype != tf.float64:
      projections = tf.cast(projections, tf.float32)
    if self.hidden_norm:
      projections = tf.math.l2_normalize(projections, -1)
    kwargs = {'num_views': self.num_views, 'labels': batch.get('label')}
    if self.memory_multiplier > 0:
      if keys is None:
        raise ValueError('IFND memory mode needs the momentum encoder '
                         'projections as `keys`.')
      keys = tf.cast(keys, projections.dtype)
      if self.hidden_norm:
        keys = tf.math.l2_normalize(keys, -1)
      kwargs.update(keys=keys, queue=self.queue.keys,
                    queue_valid=self.queue.valid(), queue_ids=self.queue.ids,
                    queue_labels=self.queue.labels)
    result = ifnd_terms(projections, batch['id'], self.table.labels,
                        self.temperature, self.fn_strategy,
                        self.level_combine, **kwargs)
    if self.queue is not None:
      self.queue.push_batch(result.current_keys, batch, self.num_views)
    metrics = dict(result.metrics, acceptance_rate=tf.identity(
        self.table.rate))
    return result.loss, metrics
