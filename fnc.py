"""FNC: false negative cancellation with support views (SPEC §7).

FNC (Huynh et al., WACV 2022) draws V = 2 + support_size views of every
image and, for every image i, finds the candidates (views of other images,
from the global batch or a memory queue) that look like another view of i,
then either pulls them in as extra positives (attraction, the released
code's only mode) or drops them from the negatives (elimination).

This module has two layers:

* pure functions (tensors in, tensors out, no flags, no state):
  `identify_false_negatives`, `fnc_terms` and `fnc_loss`, plus the layout
  helpers `gather_view_major` and `own_image_mask`;
* `MemoryQueue`, a FIFO of momentum-encoder keys (with their example ids and
  labels), and `FNC`, the registered objective (`--objective=fnc`).

Layout. Every tensor of views is view-major: row v·b + k is view v of local
image k ([V·b, d]); after the cross-replica gather, row v·B + i is view v of
the image with global index i. The candidate columns of the loss are

  in-batch (memory_multiplier = 0): the V·B online views of the global batch;
  memory mode: the V·B momentum-encoder keys of the global batch, then the
  queue's K = memory_multiplier·B earlier keys, newest first.

Either way, the first V·B columns are the current batch, so the columns of
the anchor's own image are v·B + i (`own_image_mask`).

Identification (`identify_false_negatives`), per local image with global
index i: score(c) = max over the V views v of i of cos(q_v, c), with q the
online views (in-batch) or the momentum keys (memory mode), raw cosine (no
τ, normalised here whatever --hidden_norm says). Columns of i itself and
unfilled queue rows are excluded; c is a false negative iff it is among the
fn_topk best scores AND score(c) > fn_threshold. The mask carries no
gradient. Every view of image i shares the same false negatives F(i).

Loss (`fnc_terms`), for anchor view a of image i (logits s/τ against the
columns, self = column a·B + i, P = the other V − 1 columns of i):

  attraction:  ℓ = −(1/(|P| + |F|)) Σ_{p∈P∪F} s_ap/τ
                   + log Σ_{k ≠ self, k valid} exp(s_ak/τ)
  elimination: ℓ = −(1/|P|) Σ_{p∈P} s_ap/τ
                   + log Σ_{k ≠ self, k valid, k ∉ F} exp(s_ak/τ)
  loss = (2/V) Σ_a mean_i ℓ = 2 · mean over the V·b local anchors of ℓ

With V = 2 and F = ∅ this is NT-Xent (`objective.nt_xent_loss`) exactly:
the same CE over the same 2B − 1 columns, and the same ×2 normalisation.

Memory mode (SPEC §7): anchors are the online projections; columns are the
current keys followed by the K queued keys. After the loss, the current
keys are pushed to the front of the queue (FIFO, the oldest dropped). The
queue needs K ≥ V·B so a whole batch of keys fits
(memory_multiplier ≥ V, the release's own check).

Differences from the released code (github.com/google-research/fnc), on
purpose:
* The release's memory holds memory_multiplier·B keys INCLUDING the current
  batch's V·B (so (memory_multiplier − V)·B earlier keys); here, as SPEC §7
  says, the K = memory_multiplier·B queued keys come on top of the current
  batch.
* Unfilled queue rows (zeros in the release, where they act as negatives
  with cosine 0) are excluded from the denominator and from identification.
* The release's memory path runs only on TPU (it reads the replica id from
  XLA); here the same code runs under any tf.distribute strategy.
* Elimination is offered next to the release's attraction.
* Queued keys of the anchor's own image from an earlier step (possible only
  when K approaches N) are treated like any queued key, as in the release:
  usually identified as false negatives, hence attracted or eliminated.
"""

from typing import NamedTuple, Optional

import tensorflow as tf

import objective

STRATEGIES = ('attraction', 'elimination')


# ---------------------------------------------------------------------------
# Layout helpers.
# ---------------------------------------------------------------------------


def gather_view_major(local, num_views, replica_context=None):
  """All-gathers view-major rows, keeping them view-major.

  Args:
    local: [V·b, ...] rows of this replica, row v·b + k = view v of image k.
    num_views: V.
    replica_context: as `objective.cross_replica_concat`.

  Returns:
    [V·B, ...] with row v·B + r·b + k = view v of image k of replica r, i.e.
    view v of the image with global index i = r·b + k. One (differentiable)
    all-reduce, whatever V.
  """
  gathered = objective.cross_replica_concat(local, replica_context)
  rows = tf.shape(local)[0]
  num_replicas = tf.shape(gathered)[0] // rows
  inner = tf.shape(local)[1:]
  rank = len(local.shape)
  blocks = tf.reshape(gathered, tf.concat(
      [[num_replicas, num_views, rows // num_views], inner], axis=0))
  blocks = tf.transpose(blocks, [1, 0] + list(range(2, rank + 2)))
  return tf.reshape(blocks, tf.concat([[-1], inner], axis=0))


def own_image_mask(global_index, global_batch, num_views, num_columns):
  """[b, C] bool: column c is a view of image i (c < V·B and c mod B = i)."""
  columns = tf.range(num_columns)[tf.newaxis, :]
  same = tf.equal(columns % global_batch, global_index[:, tf.newaxis])
  return tf.logical_and(same, columns < num_views * global_batch)


# ---------------------------------------------------------------------------
# Identification and loss.
# ---------------------------------------------------------------------------


def identify_false_negatives(queries, candidates, own_columns, num_views,
                             fn_topk, fn_threshold, candidate_valid=None):
  """False-negative mask of each local image (SPEC §7), without gradient.

  Args:
    queries: [V·b, d] view-major views of the local images used for scoring
      (normalised here: raw cosine, no temperature).
    candidates: [C, d] candidate columns (normalised here).
    own_columns: [b, C] bool, the columns of the anchor's own image
      (`own_image_mask`); never false negatives.
    num_views: V.
    fn_topk: keep at most this many best-scoring candidates per image.
    fn_threshold: and only those whose score is > this.
    candidate_valid: [C] bool, False for columns that are not candidates at
      all (unfilled queue rows); None = all valid.

  Returns:
    (mask [b, C] bool, scores [b, C]) with score(c) = max_v cos(q_v, c) and
    excluded columns at −1e9 (fn_topk = 0 skips the scoring: all −1e9).
  """
  if isinstance(fn_topk, int) and fn_topk == 0:  # nothing to identify
    shape = tf.shape(own_columns)
    return (tf.zeros(shape, tf.bool),
            tf.fill(shape, tf.cast(-objective.LARGE_NUM, candidates.dtype)))
  queries = tf.math.l2_normalize(tf.stop_gradient(queries), -1)
  candidates = tf.math.l2_normalize(tf.stop_gradient(candidates), -1)
  per_view = tf.stack(tf.split(queries, num_views, axis=0))     # [V, b, d]
  scores = tf.reduce_max(
      tf.einsum('vbd,cd->vbc', per_view, candidates), axis=0)  # [b, C]
  excluded = own_columns
  if candidate_valid is not None:
    excluded = tf.logical_or(excluded,
                             tf.logical_not(candidate_valid)[tf.newaxis, :])
  scores = tf.where(excluded, tf.cast(-objective.LARGE_NUM, scores.dtype),
                    scores)
  _, top_index = tf.math.top_k(scores, k=fn_topk)               # [b, k]
  rows = tf.broadcast_to(tf.range(tf.shape(scores)[0])[:, tf.newaxis],
                         tf.shape(top_index))
  in_top = tf.scatter_nd(
      tf.stack([tf.reshape(rows, [-1]), tf.reshape(top_index, [-1])], 1),
      tf.ones([tf.size(top_index)], tf.int32), tf.shape(scores)) > 0
  mask = tf.logical_and(in_top, scores > fn_threshold)
  mask = tf.logical_and(mask, tf.logical_not(excluded))
  return tf.stop_gradient(mask), tf.stop_gradient(scores)


class FNCResult(NamedTuple):
  """Outputs of `fnc_terms` (local rows; C = number of candidate columns)."""
  loss: tf.Tensor            # scalar, 2·mean of per_anchor
  per_anchor: tf.Tensor      # [V·b] ℓ of every local anchor view
  fn_mask: tf.Tensor         # [b, C] bool, false negatives of each image
  logits: tf.Tensor          # [V·b, C] s/τ of anchors against the columns
  current_keys: Optional[tf.Tensor]  # [V·B, d] gathered keys (memory mode)
  metrics: dict              # scalars, see `fnc_terms`


def _masked_logsumexp(logits, keep):
  return tf.reduce_logsumexp(
      tf.where(keep, logits, tf.cast(-float('inf'), logits.dtype)), axis=1)


class Columns(NamedTuple):
  """The candidate columns of one replica's anchors (`contrast_columns`)."""
  candidates: tf.Tensor      # [C, d]: the batch's V·B views or keys (+ queue)
  valid: Optional[tf.Tensor]  # [C] bool, False for unfilled queue rows
  current_keys: Optional[tf.Tensor]  # [V·B, d] gathered keys (memory mode)
  queries: tf.Tensor         # [V·b, d] local views that score candidates
  index: tf.Tensor           # [b] global index of the local images
  global_batch: tf.Tensor    # B
  own: tf.Tensor             # [b, C] bool, the columns of the image itself


def contrast_columns(views, num_views, keys=None, queue=None,
                     queue_valid=None, replica_context=None):
  """Gathers the columns every anchor is contrasted against.

  In-batch (keys None): the V·B online views of the global batch, and the
  local online views as queries. Memory mode: the V·B momentum keys of the
  global batch followed by the K queued keys, and the local keys as
  queries. No gradient flows into keys or queue.
  """
  local_images = tf.shape(views)[0] // num_views
  index = objective.global_row_indices(local_images, replica_context)
  current_keys = None
  valid = None
  if keys is None:
    candidates = gather_view_major(views, num_views, replica_context)
    queries = views
  else:
    keys = tf.stop_gradient(tf.cast(keys, views.dtype))
    current_keys = gather_view_major(keys, num_views, replica_context)
    candidates = current_keys
    queries = keys
    if queue is not None:
      queue = tf.stop_gradient(tf.cast(queue, views.dtype))
      candidates = tf.concat([current_keys, queue], axis=0)
      if queue_valid is not None:
        valid = tf.concat([tf.ones([tf.shape(current_keys)[0]], tf.bool),
                           tf.cast(queue_valid, tf.bool)], axis=0)
  global_batch = tf.shape(current_keys if keys is not None
                          else candidates)[0] // num_views
  own = own_image_mask(index, global_batch, num_views,
                       tf.shape(candidates)[0])
  return Columns(candidates=candidates, valid=valid,
                 current_keys=current_keys, queries=queries, index=index,
                 global_batch=global_batch, own=own)


def cancellation_loss(views, columns, num_views, temperature, fn_mask,
                      strategy='attraction'):
  """Per-anchor contrastive loss with false negatives F cancelled.

  For anchor row r = a·b + k (view a of local image k; self = column
  a·B + i, P = the other V − 1 columns of image i, F = fn_mask[k]):

    attraction:  ℓ = −(1/(|P| + |F|)) Σ_{p∈P∪F} s_ap/τ
                     + log Σ_{c ≠ self, c valid} exp(s_ac/τ)
    elimination: ℓ = −(1/|P|) Σ_{p∈P} s_ap/τ
                     + log Σ_{c ≠ self, c valid, c ∉ F} exp(s_ac/τ)

  With V = 2 and F = ∅ both are NT-Xent's per-anchor term.

  Args:
    views: [V·b, d] online anchors, view-major.
    columns: `contrast_columns(views, ...)`.
    num_views: V.
    temperature: τ.
    fn_mask: [b, C] bool (no gradient), never true on own or invalid columns.
    strategy: 'attraction' or 'elimination'.

  Returns:
    (per_anchor [V·b], logits [V·b, C], positives [V·b, C] bool,
     contrast [V·b, C] bool: the columns of the denominator before
     elimination, i.e. every valid column but self).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f'strategy must be one of {STRATEGIES}, got '
                     f'{strategy!r}.')
  local_images = tf.shape(views)[0] // num_views
  num_columns = tf.shape(columns.candidates)[0]
  logits = tf.matmul(views, columns.candidates, transpose_b=True) / temperature
  view_of_row = tf.repeat(tf.range(num_views), local_images)
  index_of_row = tf.tile(columns.index, [num_views])
  own_rows = tf.tile(columns.own, [num_views, 1])
  fn_rows = tf.tile(fn_mask, [num_views, 1])
  not_self = tf.logical_not(tf.cast(tf.one_hot(
      view_of_row * columns.global_batch + index_of_row, num_columns),
                                    tf.bool))
  positives = tf.logical_and(own_rows, not_self)
  contrast = not_self
  if columns.valid is not None:
    contrast = tf.logical_and(contrast, columns.valid[tf.newaxis, :])
  if strategy == 'attraction':
    numerator = tf.logical_or(positives, fn_rows)
    denominator = contrast
  else:
    numerator = positives
    denominator = tf.logical_and(contrast, tf.logical_not(fn_rows))
  numerator_size = tf.reduce_sum(tf.cast(numerator, logits.dtype), axis=1)
  mean_positive = tf.reduce_sum(
      tf.where(numerator, logits, tf.zeros_like(logits)),
      axis=1) / numerator_size
  per_anchor = -mean_positive + _masked_logsumexp(logits, denominator)
  return per_anchor, logits, positives, contrast


def cancellation_metrics(logits, positives, contrast):
  """contrast_acc (the best column, self excluded, is another view of the
  anchor's image) and contrast_entropy (of the softmax over those columns).
  """
  contrast_logits = tf.where(contrast, logits,
                             tf.cast(-float('inf'), logits.dtype))
  best = tf.argmax(contrast_logits, axis=1, output_type=tf.int32)
  hits = tf.gather(positives, best, axis=1, batch_dims=1)
  prob = tf.nn.softmax(contrast_logits)
  entropy = -tf.reduce_mean(
      tf.reduce_sum(prob * tf.math.log(prob + 1e-8), axis=-1))
  return {'contrast_acc': tf.reduce_mean(tf.cast(hits, tf.float32)),
          'contrast_entropy': entropy}


def column_values(values, num_views, queue_values=None, queue=None,
                  replica_context=None):
  """[C] per-column value (label, id) of the columns of `contrast_columns`:
  the gathered batch `values` [b] tiled over the V views, then the queue's
  `queue_values` [K] (−1 when None) in memory mode with a queue."""
  values = tf.cast(values, tf.int32)
  column = tf.tile(objective.cross_replica_concat(values, replica_context),
                   [num_views])
  if queue is not None:
    if queue_values is None:
      queue_values = -tf.ones([tf.shape(queue)[0]], tf.int32)
    column = tf.concat([column, tf.cast(queue_values, tf.int32)], axis=0)
  return column


def false_negative_label_metrics(fn_mask, labels, column_labels):
  """fn_true_per_anchor (false negatives sharing the image's true label,
  per image) and fn_label_acc (their fraction of all false negatives of the
  replica's batch; 0 when none)."""
  labels = tf.cast(labels, tf.int32)
  same_label = tf.equal(labels[:, tf.newaxis], column_labels[tf.newaxis, :])
  true_count = tf.reduce_sum(
      tf.cast(tf.logical_and(fn_mask, same_label), tf.float32), axis=1)
  fn_count = tf.reduce_sum(tf.cast(fn_mask, tf.float32), axis=1)
  return {'fn_true_per_anchor': tf.reduce_mean(true_count),
          'fn_label_acc': tf.math.divide_no_nan(tf.reduce_sum(true_count),
                                                tf.reduce_sum(fn_count))}


def fnc_terms(views, num_views, temperature, fn_topk, fn_threshold,
              strategy='attraction', keys=None, queue=None, queue_valid=None,
              labels=None, queue_labels=None, replica_context=None):
  """FNC loss of one replica's anchors, and what the objective needs.

  Args:
    views: [V·b, d] online projections (l2-normalise them first for
      cosines, as `--hidden_norm` does), view-major.
    num_views: V ≥ 2.
    temperature: τ.
    fn_topk, fn_threshold: identification (`identify_false_negatives`).
    strategy: 'attraction' or 'elimination'.
    keys: None for in-batch mode; in memory mode the momentum encoder's
      projections [V·b, d] of the same local images (no gradient flows).
    queue: [K, d] queued keys (memory mode; None = no queue yet).
    queue_valid: [K] bool, filled queue rows (None = all).
    labels: [b] true labels of the local images, only for the
      identification-accuracy metrics (None = not reported).
    queue_labels: [K] labels of the queued keys (−1 = unknown).
    replica_context: as `objective.cross_replica_concat`.

  Returns:
    FNCResult. metrics: contrast_loss; contrast_acc, contrast_entropy
    (`cancellation_metrics`); fn_per_anchor (mean |F| per image); with
    labels also fn_true_per_anchor and fn_label_acc
    (`false_negative_label_metrics`).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f'fn_strategy must be one of {STRATEGIES}, got '
                     f'{strategy!r}.')
  if keys is None:
    queue = None
  columns = contrast_columns(views, num_views, keys, queue, queue_valid,
                             replica_context)
  fn_mask, _ = identify_false_negatives(
      columns.queries, columns.candidates, columns.own, num_views, fn_topk,
      fn_threshold, columns.valid)
  per_anchor, logits, positives, contrast = cancellation_loss(
      views, columns, num_views, temperature, fn_mask, strategy)
  loss = 2.0 * tf.reduce_mean(per_anchor)
  fn_count = tf.reduce_sum(tf.cast(fn_mask, tf.float32), axis=1)
  metrics = {'contrast_loss': loss,
             **cancellation_metrics(logits, positives, contrast),
             'fn_per_anchor': tf.reduce_mean(fn_count)}
  if labels is not None:
    metrics.update(false_negative_label_metrics(
        fn_mask, labels, column_values(labels, num_views, queue_labels,
                                       queue, replica_context)))
  return FNCResult(loss=loss, per_anchor=per_anchor, fn_mask=fn_mask,
                   logits=logits, current_keys=columns.current_keys,
                   metrics=metrics)


def fnc_loss(views, num_views, temperature, fn_topk, fn_threshold,
             strategy='attraction', keys=None, queue=None, queue_valid=None,
             labels=None, queue_labels=None, replica_context=None):
  """(loss, metrics) of `fnc_terms` (same arguments): the FNC loss of one
  replica's V-view batch, in-batch (keys=None) or against momentum keys and
  a queue. Divide by the number of replicas before summing gradients, as for
  NT-Xent."""
  result = fnc_terms(views, num_views, temperature, fn_topk, fn_threshold,
                     strategy=strategy, keys=keys, queue=queue,
                     queue_valid=queue_valid, labels=labels,
                     queue_labels=queue_labels,
                     replica_context=replica_context)
  return result.loss, result.metrics


# ---------------------------------------------------------------------------
# Memory queue.
# ---------------------------------------------------------------------------


class MemoryQueue(tf.Module):
  """FIFO of K keys, newest first, with their example ids and labels.

  Variables (all checkpointed): keys [K, d], ids [K] and labels [K] (int32,
  −1 = unfilled or unknown), count (number of filled rows, ≤ K). Rows
  ≥ count were never written and must not be used (`valid()`).

  `push(keys [n, d], ids, labels)` puts the n new rows first and drops the n
  oldest; n ≤ K. Call it with the all-gathered (global) keys, on every
  replica, so every copy holds the same queue.
  """

  def __init__(self, size, dim, dtype=tf.float32, name='memory_queue'):
    super().__init__(name=name)
    if size < 1 or dim < 1:
      raise ValueError(f'MemoryQueue needs size ≥ 1 and dim ≥ 1, got '
                       f'{size} and {dim}.')
    self.size = int(size)
    self.dim = int(dim)
    state = objective.replicated_state
    self.keys = state(tf.zeros([self.size, self.dim], dtype), 'keys')
    self.ids = state(-tf.ones([self.size], tf.int32), 'ids')
    self.labels = state(-tf.ones([self.size], tf.int32), 'labels')
    self.count = state(tf.constant(0, tf.int32), 'count')

  def valid(self):
    """[K] bool: the rows written so far."""
    return tf.range(self.size) < self.count

  def push_batch(self, keys, batch, num_views):
    """Enqueues the global batch's keys [V·B, d] (`Columns.current_keys`)
    with the ids and labels of the local `batch`, gathered and tiled over
    the V views to match."""
    def column(name):
      value = batch.get(name)
      return None if value is None else column_values(value, num_views)
    return self.push(keys, column('id'), column('label'))

  def push(self, keys, ids=None, labels=None):
    """Enqueues `keys` [n, d] (and their ids / labels [n]) at the front."""
    num_new = keys.shape[0]
    if num_new is not None and num_new > self.size:
      raise ValueError(f'Cannot push {num_new} keys into a queue of '
                       f'{self.size}.')
    num_new = tf.shape(keys)[0]
    keep = self.size - num_new
    if ids is None:
      ids = -tf.ones([num_new], tf.int32)
    if labels is None:
      labels = -tf.ones([num_new], tf.int32)
    new_keys = tf.concat([tf.cast(tf.stop_gradient(keys), self.keys.dtype),
                          self.keys[:keep]], axis=0)
    new_ids = tf.concat([tf.cast(ids, tf.int32), self.ids[:keep]], axis=0)
    new_labels = tf.concat([tf.cast(labels, tf.int32), self.labels[:keep]],
                           axis=0)
    return tf.group(
        self.keys.assign(tf.ensure_shape(new_keys, self.keys.shape)),
        self.ids.assign(tf.ensure_shape(new_ids, self.ids.shape)),
        self.labels.assign(tf.ensure_shape(new_labels, self.labels.shape)),
        self.count.assign(tf.minimum(self.count + num_new, self.size)))


# ---------------------------------------------------------------------------
# The objective.
# ---------------------------------------------------------------------------


class MemoryObjective(objective.Objective):
  """An objective with an optional memory mode: memory_multiplier > 0 means
  a momentum encoder (EMA decay moving_average_decay) and a `MemoryQueue`
  of memory_multiplier·B keys; 0 means in-batch negatives. Shared by FNC
  and IFND."""
  memory_multiplier = 0
  moving_average_decay = 0.999

  @property
  def uses_momentum_encoder(self):
    return self.memory_multiplier > 0

  @property
  def momentum_decay(self):
    return self.moving_average_decay if self.uses_momentum_encoder else None

  def make_queue(self, global_batch_size, name):
    """The queue of memory mode (None in-batch); call from `build`."""
    if self.memory_multiplier <= 0:
      return None
    if not self.projection_dim:
      raise ValueError(f'{type(self).__name__} memory mode needs '
                       'projection_dim (the width of the projections) '
                       'before build().')
    return MemoryQueue(self.memory_multiplier * global_batch_size,
                       self.projection_dim, name=name)


@objective.register('fnc')
class FNC(MemoryObjective):
  """False negative cancellation, in-batch or with a momentum-key queue.

  memory_multiplier = 0: in-batch mode, online projections only (as the
  release). memory_multiplier > 0: memory mode with a momentum encoder
  (EMA decay moving_average_decay) and a queue of memory_multiplier·B keys,
  created in `build` and saved in checkpoints as `fnc_queue`.
  RandAugment (n = 2, m = 7) is on by default (`default_randaugment`).

  Metrics: see `fnc_terms` (labels come from batch['label'] and are used
  for the identification metrics only).
  """
  flag_names = ('temperature', 'hidden_norm', 'support_size',
                'memory_multiplier', 'moving_average_decay', 'fn_topk',
                'fn_threshold', 'fn_strategy')
  metric_names = ('contrast_loss', 'contrast_acc', 'contrast_entropy',
                  'fn_per_anchor', 'fn_true_per_anchor', 'fn_label_acc')
  default_randaugment = True

  def __init__(self, temperature=0.1, hidden_norm=True, support_size=8,
               memory_multiplier=16, moving_average_decay=0.999, fn_topk=10,
               fn_threshold=0.7, fn_strategy='attraction',
               projection_dim=None, name=None):
    super().__init__(temperature=temperature, hidden_norm=hidden_norm,
                     name=name)
    self.support_size = support_size
    self.memory_multiplier = (16 if memory_multiplier is None
                              else memory_multiplier)
    self.moving_average_decay = moving_average_decay
    self.fn_topk = fn_topk
    self.fn_threshold = fn_threshold
    self.fn_strategy = fn_strategy
    if projection_dim is not None:
      self.projection_dim = projection_dim
    self.queue = None

  @property
  def num_views(self):
    return 2 + self.support_size

  def num_candidates(self, global_batch_size):
    """Candidates per image: other images' views (+ the queue)."""
    count = self.num_views * (global_batch_size - 1)
    if self.memory_multiplier > 0:
      count += self.memory_multiplier * global_batch_size
    return count

  def validate(self, global_batch_size, num_train_examples):
    del num_train_examples
    errors = []
    if self.support_size < 0:
      errors.append(f'--support_size={self.support_size} must be ≥ 0 (views '
                    'per image = 2 + support_size).')
    if self.fn_strategy not in STRATEGIES:
      errors.append(f'--fn_strategy={self.fn_strategy!r} must be one of '
                    f'{", ".join(STRATEGIES)}.')
    if self.memory_multiplier < 0:
      errors.append(f'--memory_multiplier={self.memory_multiplier} must be '
                    '≥ 0 (0 = in-batch mode, no queue).')
    if not 0.0 <= self.moving_average_decay <= 1.0:
      errors.append(f'--moving_average_decay={self.moving_average_decay} '
                    'must be in [0, 1].')
    if self.fn_topk < 0:
      errors.append(f'--fn_topk={self.fn_topk} must be ≥ 0.')
    views = self.num_views
    if 0 < self.memory_multiplier and self.memory_multiplier < views:
      errors.append(
          f'--memory_multiplier={self.memory_multiplier}: the queue holds '
          f'{self.memory_multiplier}·B = '
          f'{self.memory_multiplier * global_batch_size} keys, fewer than one'
          f' batch of keys (V·B = (2 + --support_size={self.support_size})·'
          f'{global_batch_size} = {views * global_batch_size}); use '
          f'--memory_multiplier ≥ {views}, or 0 for in-batch mode.')
    elif self.support_size >= 0 and self.memory_multiplier >= 0:
      candidates = self.num_candidates(global_batch_size)
      if self.fn_topk > candidates:
        where = (f' + {self.memory_multiplier}·{global_batch_size} queued '
                 'keys' if self.memory_multiplier else '')
        errors.append(
            f'--fn_topk={self.fn_topk} exceeds the {candidates} candidates '
            f'of each image (V·(B − 1) = {views}·{global_batch_size - 1} '
            f'views of the other images{where}, with '
            f'--support_size={self.support_size}, '
            f'--train_batch_size={global_batch_size}, '
            f'--memory_multiplier={self.memory_multiplier}).')
    if errors:
      raise ValueError('\n  '.join(errors))

  def build(self, num_train_examples, global_batch_size):
    del num_train_examples
    self.queue = self.make_queue(global_batch_size, 'fnc_queue')

  def checkpoint_items(self):
    return {} if self.queue is None else {'fnc_queue': self.queue}

  def loss(self, projections, batch, keys=None):
    if projections.dtype != tf.float64:
      projections = tf.cast(projections, tf.float32)
    if self.hidden_norm:
      projections = tf.math.l2_normalize(projections, -1)
    labels = batch.get('label')
    if self.memory_multiplier == 0:
      result = fnc_terms(projections, self.num_views, self.temperature,
                         self.fn_topk, self.fn_threshold, self.fn_strategy,
                         labels=labels)
      return result.loss, result.metrics
    if keys is None:
      raise ValueError('FNC memory mode (memory_multiplier > 0) needs the '
                       'momentum encoder projections as `keys`.')
    if self.queue is None:
      raise ValueError('FNC.build(...) must be called before loss() in '
                       'memory mode.')
    keys = tf.cast(keys, projections.dtype)
    if self.hidden_norm:
      keys = tf.math.l2_normalize(keys, -1)
    result = fnc_terms(
        projections, self.num_views, self.temperature, self.fn_topk,
        self.fn_threshold, self.fn_strategy, keys=keys,
        queue=self.queue.keys, queue_valid=self.queue.valid(),
        labels=labels, queue_labels=self.queue.labels)
    self.queue.push_batch(result.current_keys, batch, self.num_views)
    return result.loss, result.metrics
