"""IFND: incremental false negative detection (Chen et al., ICLR 2022; SPEC §9).

Every `reassign_epochs` (--ifnd_reassign_epochs) the whole training set is
embedded (centre crop, no augmentation, l2-normalised projections of the key
encoder: the momentum encoder in memory mode, else the online network) under
the strategy (`features.FeatureExtractor`), and clustered on the host
(clustering.py) with k-means once per entry of `num_clusters` (one level per
granularity). Each example's pseudo label at a level is its cluster, but
only the round(r·N) most confident examples of the level keep it
(confidence = cosine to the own centroid, or the margin to the
second-nearest one); r, the acceptance rate, rises with training (linear
from 0 to 1 by default). The pseudo-label table (N × levels, −1 = no label)
lives in a replicated variable and checkpoints. `Reassigner`, a train
action, does this between host loops.

During training, for an anchor of image i, a column of image j ≠ i is a
false negative at level l when both are labelled there and table[i, l] =
table[j, l] (`pseudo_label_mask`, boolean). The loss is
`objective.cancellation_loss` (elimination by default: F leaves the
denominator; attraction: F joins the positives), every level from the same
logits (`objective.contrast_logits`: one matmul and exp a step), against
the in-batch views (memory_multiplier 0, NT-Xent base) or the momentum
keys + queue (memory mode, `objective.MemoryObjective`; queued keys carry
their example ids). Levels combine as the mean of the per-level losses
(`mean`, default) or one loss with the union of the masks (`any`). With an
empty table the loss equals the base loss exactly.

Choices not in the paper summary (SPEC §9): see clustering.py for the
k-means; the acceptance rate is applied at each re-assignment with r = the
fraction of training done at that step (schedule behind
--ifnd_acceptance), and nothing is clustered while r·N rounds to 0.
"""

import os
import time
from typing import NamedTuple

from absl import logging
import numpy as np
import tensorflow as tf

import actions
import clustering
import features
import objective

STRATEGIES = objective.CANCELLATION_STRATEGIES
LEVEL_COMBINES = ('mean', 'any')


# ---------------------------------------------------------------------------
# The pseudo-label table.
# ---------------------------------------------------------------------------


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
  anchor = tf.gather(table, anchor_ids)                            # [b, L]
  # No label: −2 for anchors, −1 for columns, so they never match.
  anchor = tf.transpose(tf.where(anchor >= 0, anchor, -2))         # [L, b]
  column = tf.transpose(tf.where(
      column_ids[:, tf.newaxis] >= 0,
      tf.gather(table, tf.maximum(column_ids, 0)), -1))            # [L, C]
  same = tf.equal(anchor[:, :, tf.newaxis], column[:, tf.newaxis, :])
  other = tf.not_equal(anchor_ids[:, tf.newaxis], column_ids[tf.newaxis, :])
  return tf.stop_gradient(tf.logical_and(same, other[tf.newaxis]))


class IFNDResult(NamedTuple):
  """Outputs of `ifnd_terms` (local rows; C = number of candidate columns)."""
  loss: tf.Tensor
  fn_mask: tf.Tensor                 # [L, b, C] bool, per level (analysis)
  metrics: dict


def ifnd_column_terms(views, columns, ids, column_ids, table, temperature,
                      strategy='elimination', level_combine='mean',
                      num_views=2, labels=None, column_labels=None,
                      unit_rows=False):
  """`ifnd_terms` against columns already gathered (`objective.
  contrast_columns`); column_ids [C] and, with labels, column_labels [C]
  are `objective.values_per_column` of ids and labels; unit_rows as
  `objective.contrast_logits`."""
  if level_combine not in LEVEL_COMBINES:
    raise ValueError(f'ifnd_level_combine must be one of {LEVEL_COMBINES}, '
                     f'got {level_combine!r}.')
  masks = pseudo_label_mask(ids, column_ids, table)            # [L, b, C]
  union = tf.reduce_any(masks, axis=0)
  level_masks = union[tf.newaxis] if level_combine == 'any' else masks
  loss, metrics = objective.cancellation_terms(
      views, columns, num_views, temperature, level_masks, strategy,
      unit_rows)
  removed = tf.math.count_nonzero(level_masks, axis=-1)        # [L', b]
  accepted = tf.gather(table, tf.cast(ids, tf.int32)) >= 0     # [b, L]
  metrics['fn_per_anchor'] = tf.reduce_mean(tf.cast(removed, tf.float32))
  metrics['accepted_fraction'] = tf.reduce_mean(tf.cast(accepted, tf.float32))
  if labels is not None:
    metrics.update(objective.false_negative_label_metrics(
        union, labels, column_labels))
  return IFNDResult(loss=loss, fn_mask=masks, metrics=metrics)


def ifnd_terms(views, ids, table, temperature, strategy='elimination',
               level_combine='mean', num_views=2, keys=None, queue=None,
               queue_valid=None, queue_ids=None, labels=None,
               queue_labels=None, replica_context=None):
  """IFND loss of one replica's anchors.

  For anchor view a of image i and each level l (F_l = the columns whose
  example shares i's pseudo label at l, `pseudo_label_mask`), ℓ_l is
  `objective.cancellation_loss` with F_l, all levels from one
  `objective.contrast_logits` (the loss is `objective.cancellation_terms`
  of the level masks):

    elimination: ℓ = −(1/|P|) Σ_{p∈P} s_ap/τ
                     + log Σ_{c ≠ self, c valid, c ∉ F_l} exp(s_ac/τ)
    attraction:  ℓ = −(1/(|P| + |F_l|)) Σ_{p∈P∪F_l} s_ap/τ
                     + log Σ_{c ≠ self, c valid} exp(s_ac/τ)
    loss = (1/L) Σ_l 2·mean_anchors ℓ_l ('mean'), or the same with the one
    mask ∪_l F_l ('any').

  Args:
    views: [V·b, d] online projections (normalised for cosines), view-major.
    ids: [b] example ids of the local images.
    table: [N, L] int32 pseudo labels (−1 = none).
    temperature: τ.
    strategy: 'elimination' (default) or 'attraction'.
    level_combine: 'mean': loss = (1/L) Σ_l loss(F_l); 'any': loss(∪_l F_l).
    num_views: V.
    keys, queue, queue_valid: memory mode, as `objective.contrast_columns`.
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
  if keys is None:
    queue = None
  columns = objective.contrast_columns(views, num_views, keys, queue,
                                       queue_valid, replica_context)
  column_ids = objective.values_per_column(ids, num_views, queue_ids, queue,
                                           replica_context)
  column_labels = None
  if labels is not None:
    column_labels = objective.values_per_column(
        labels, num_views, queue_labels, queue, replica_context)
  return ifnd_column_terms(views, columns, ids, column_ids, table,
                           temperature, strategy, level_combine, num_views,
                           labels, column_labels)


def ifnd_loss(views, ids, table, temperature, strategy='elimination',
              level_combine='mean', **kwargs):
  """(loss, metrics) of `ifnd_terms` (same arguments)."""
  result = ifnd_terms(views, ids, table, temperature, strategy,
                      level_combine, **kwargs)
  return result.loss, result.metrics


# ---------------------------------------------------------------------------
# Re-assignment (train action) and the objective.
# ---------------------------------------------------------------------------


def _inside(directory, name):
  return os.path.join(directory, name) if directory else None


class Reassigner(actions.PeriodicAction):
  """Re-assigns the pseudo labels every `period_steps` steps.

  A `actions.PeriodicAction`: after a host loop that reaches a multiple of
  the period (and before that step's checkpoint is written), it embeds the
  training set (`features.FeatureExtractor` over `context.train_pass()`
  with `context.key_encoder`), clusters it (`clustering.
  assign_pseudo_labels`) and fills the table, unless the step is the last
  one (step ≥ train_steps) or the table is already from this step.
  `start()` does it at once when the table is stale: never assigned (a new
  run, or a resumed run whose checkpoint has no table) or older than the
  last multiple of the period. Each re-assignment logs a line with its
  time, writes TensorBoard scalars (`model_dir/ifnd`) and appends its record
  to `model_dir/ifnd_assignments.json` (the chief only: no files when
  `context.output_dir` is None).
  """

  def __init__(self, ifnd, context, period_steps):
    super().__init__(
        context.global_step, period_steps,
        history_path=_inside(context.output_dir, 'ifnd_assignments.json'),
        summary_dir=_inside(context.output_dir, 'ifnd'))
    self.ifnd = ifnd
    self.context = context
    self._extract = None

  def _assigned_step(self):
    return int(self.ifnd.table.assigned_step.numpy())

  def due_at_start(self, step):
    last_due = (step // self.period_steps) * self.period_steps
    return (step < self.context.train_steps and
            self._assigned_step() < last_due)

  def run(self, step, outputs):
    del outputs
    if step >= self.context.train_steps or self._assigned_step() >= step:
      return None
    return self.reassign(step)

  def embed(self):
    """(l2-normalised key-encoder features [N, d], true labels [N]) of the
    training set."""
    if self._extract is None:
      self._extract = features.FeatureExtractor(self.context.strategy,
                                                self.context.key_encoder)
    embeddings, true_labels = self._extract(self.context.train_pass())
    if len(embeddings) != self.ifnd.num_examples:
      raise ValueError(f'The embedding pass saw {len(embeddings)} training '
                       f'examples, the pseudo-label table has '
                       f'{self.ifnd.num_examples}.')
    return clustering.l2_normalize(embeddings), true_labels

  def reassign(self, step):
    """Fills the table at `step` now; returns the history record."""
    start = time.time()
    ifnd = self.ifnd
    rate = clustering.acceptance_rate(
        step / self.context.train_steps, ifnd.acceptance_schedule,
        ifnd.constant_rate, ifnd.step_stages)
    num = ifnd.num_examples
    embed_seconds = 0.0
    if int(round(rate * num)) > 0:
      embeddings, true_labels = self.embed()
      embed_seconds = time.time() - start
      result = clustering.assign_pseudo_labels(
          embeddings, ifnd.num_clusters, rate, seed=ifnd.seed,
          confidence=ifnd.confidence, max_iter=ifnd.kmeans_iters,
          true_labels=true_labels if (true_labels >= 0).any() else None)
    else:
      result = clustering.assign_pseudo_labels(
          np.zeros((num, 1), np.float32), ifnd.num_clusters, rate)
    # The chief's table is the table, whatever another host's k-means gave.
    table = objective.broadcast_from_first_replica(self.context.strategy,
                                                   result.table)
    ifnd.table.assign(table, step, rate)
    seconds = time.time() - start
    record = {'step': step,
              'epoch': step / self.context.steps_per_epoch,
              'acceptance_rate': rate,
              'accepted_per_level': int(round(rate * num)),
              'num_clusters': list(ifnd.num_clusters),
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
    scalars = {'ifnd/acceptance_rate': rate,
               'ifnd/reassign_seconds': seconds}
    for level, value in enumerate(result.purity):
      scalars[f'ifnd/purity_level_{level}'] = value
    for level, (low, _, high) in enumerate(result.cluster_sizes):
      scalars[f'ifnd/cluster_size_min_level_{level}'] = low
      scalars[f'ifnd/cluster_size_max_level_{level}'] = high
    self.write_scalars(step, scalars)
    return record


@objective.register('ifnd')
class IFND(objective.MemoryObjective):
  """Incremental false negative detection on top of NT-Xent or a memory
  queue (memory_multiplier > 0: momentum encoder + queue as FNC's).

  State (checkpointed): the pseudo-label table `ifnd_table` and, in memory
  mode, the queue `ifnd_queue`. The re-assignment (`Reassigner`) runs as a
  train action every `reassign_epochs` epochs: acceptance rate from
  `acceptance_schedule` ('linear', 'constant' at `constant_rate`, or 'step'
  in `step_stages` stages), one k-means level per entry of `num_clusters`
  (at most `kmeans_iters` iterations, seeds seed + level), confidence
  'centroid' or 'margin'. The loss (`ifnd_terms`) reads batch['id'];
  `strategy` and `level_combine` as there.
  """
  metric_names = ('contrast_loss', 'contrast_acc', 'contrast_entropy',
                  'fn_per_anchor', 'accepted_fraction', 'acceptance_rate',
                  'fn_true_per_anchor', 'fn_label_acc')
  queue_name = 'ifnd_queue'

  def __init__(self, temperature=0.1, hidden_norm=True, memory_multiplier=0,
               momentum_decay=0.999, num_clusters=(10, 30, 100),
               reassign_epochs=20, acceptance_schedule='linear',
               constant_rate=1.0, step_stages=5, confidence='centroid',
               strategy='elimination', level_combine='mean',
               kmeans_iters=100, seed=0, name=None):
    super().__init__(temperature=temperature, hidden_norm=hidden_norm,
                     memory_multiplier=memory_multiplier,
                     momentum_decay=momentum_decay, name=name)
    self.num_clusters = tuple(num_clusters)
    self.reassign_epochs = reassign_epochs
    self.acceptance_schedule = acceptance_schedule
    self.constant_rate = constant_rate
    self.step_stages = step_stages
    self.confidence = confidence
    self.strategy = strategy
    self.level_combine = level_combine
    self.kmeans_iters = kmeans_iters
    self.seed = seed
    self.num_examples = None
    self.table = None

  def validation_errors(self, global_batch_size, num_train_examples):
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
        ('ifnd_acceptance', self.acceptance_schedule, clustering.SCHEDULES),
        ('ifnd_confidence', self.confidence, clustering.CONFIDENCES),
        ('ifnd_strategy', self.strategy, STRATEGIES),
        ('ifnd_level_combine', self.level_combine, LEVEL_COMBINES)):
      if value not in allowed:
        errors.append(f'--{name}={value!r} must be one of '
                      f'{", ".join(allowed)}.')
    if not 0.0 <= self.constant_rate <= 1.0:
      errors.append(f'--ifnd_acceptance_rate={self.constant_rate} must be '
                    'in [0, 1].')
    if self.step_stages < 2:
      errors.append(f'--ifnd_acceptance_stages={self.step_stages} must be '
                    '≥ 2.')
    if self.kmeans_iters < 1:
      errors.append(f'--ifnd_kmeans_iters={self.kmeans_iters} must be ≥ 1.')
    errors += super().validation_errors(global_batch_size,
                                        num_train_examples)
    if global_batch_size < 2:
      errors.append(f'--train_batch_size={global_batch_size}: IFND needs '
                    'at least 2 images per batch.')
    return errors

  def build(self, num_train_examples, global_batch_size, projection_dim):
    super().build(num_train_examples, global_batch_size, projection_dim)
    self.num_examples = int(num_train_examples)
    self.table = PseudoLabelTable(num_train_examples, len(self.num_clusters))

  def checkpoint_items(self):
    items = super().checkpoint_items()
    if self.table is not None:
      items['ifnd_table'] = self.table
    return items

  def action_period_steps(self, steps_per_epoch):
    return self.reassign_epochs * steps_per_epoch

  def train_actions(self, context):
    return [Reassigner(self, context,
                       self.action_period_steps(context.steps_per_epoch))]

  def loss_on_columns(self, views, columns, batch):
    if self.table is None:
      raise ValueError('IFND.build(...) must be called before loss().')
    result = ifnd_column_terms(
        views, columns, batch['id'],
        self.batch_values_per_column(batch, 'id'), self.table.labels,
        self.temperature, self.strategy, self.level_combine, self.num_views,
        labels=batch.get('label'),
        column_labels=self.batch_values_per_column(batch, 'label'),
        unit_rows=self.hidden_norm)
    metrics = dict(result.metrics, acceptance_rate=tf.identity(
        self.table.rate))
    return result.loss, metrics
