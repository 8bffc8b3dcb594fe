"""FNC: false negative cancellation with support views (SPEC §7).

FNC (Huynh et al., WACV 2022) draws V = 2 + support_size views of every
image and, for every image i, finds the candidates (views of other images,
from the global batch or a memory queue) that look like another view of i,
then either pulls them in as extra positives (attraction, the released
code's only mode) or drops them from the negatives (elimination).

What is FNC's own lives here: the identification of false negatives by
similarity (`identify_false_negatives`), the FNC loss as pure functions
(tensors in, tensors out, no flags, no state: `fnc_terms`, `fnc_loss`,
`fnc_column_terms`) and `FNC`, the registered objective
(`--objective=fnc`). The machinery it shares with IFND is in objective.py:
the column layout (`objective.contrast_columns`: the V·B views or keys of
the global batch, then the queue; view v of image i at column v·B + i), the
loss with false negatives cancelled (`objective.cancellation_loss`) and its
metrics, `objective.MemoryQueue` and `objective.MemoryObjective` (memory
mode: momentum keys, the queue, pushing the keys after the loss).

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

import math
from typing import NamedTuple

import tensorflow as tf

import objective

STRATEGIES = objective.CANCELLATION_STRATEGIES


# ---------------------------------------------------------------------------
# Identification and loss (pure functions).
# ---------------------------------------------------------------------------


def identify_false_negatives(queries, candidates, own_columns, num_views,
                             fn_topk, fn_threshold, candidate_valid=None):
  """False-negative mask of each local image (SPEC §7), without gradient.

  Args:
    queries: [V·b, d] view-major views of the local images used for scoring
      (normalised here: raw cosine, no temperature).
    candidates: [C, d] candidate columns (normalised here).
    own_columns: [b, C] bool, the columns of the anchor's own image
      (`objective.own_image_mask`); never false negatives.
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


# Candidate-score statistics (metrics): quantiles from a histogram of
# SCORE_BINS equal bins over the cosine range [−1, 1] (resolution 0.002).
SCORE_QUANTILES = (0.5, 0.9, 0.99)
SCORE_BINS = 1000


def histogram_quantiles(values, valid, quantiles, num_bins=SCORE_BINS,
                        value_range=(-1.0, 1.0)):
  """Quantiles of the valid entries of `values` from a fixed-width histogram.

  O(n) (one segment sum, no sort): the q-quantile is interpolated linearly
  inside the bin where the cumulative count reaches q·n, so it is within one
  bin width (value_range / num_bins) of the exact quantile of the empirical
  distribution (the smallest value with at least q·n values ≤ it: NumPy's
  method='inverted_cdf'). Values outside value_range count in the end bins.

  Args:
    values: float tensor of any shape.
    valid: bool tensor of the same shape (False = ignored).
    quantiles: python floats in [0, 1].
    num_bins, value_range: the histogram.

  Returns:
    [len(quantiles)] float32; NaN when no entry is valid.
  """
  low, high = value_range
  width = (high - low) / num_bins
  values = tf.reshape(tf.cast(values, tf.float32), [-1])
  valid = tf.reshape(valid, [-1])
  index = tf.clip_by_value(
      tf.cast(tf.floor((values - low) / width), tf.int32), 0, num_bins - 1)
  index = tf.where(valid, index, num_bins)  # the dropped extra segment
  counts = tf.math.unsorted_segment_sum(
      tf.ones_like(index), index, num_bins + 1)[:num_bins]
  counts = tf.cast(counts, tf.float32)
  cumulative = tf.cumsum(counts)
  total = cumulative[-1]
  target = tf.constant(quantiles, tf.float32) * total        # [Q]
  # The first bin whose cumulative count reaches the target.
  bin_index = tf.reduce_sum(tf.cast(
      cumulative[tf.newaxis, :] < target[:, tf.newaxis], tf.int32), axis=1)
  bin_index = tf.minimum(bin_index, num_bins - 1)
  before = tf.gather(cumulative - counts, bin_index)
  inside = tf.math.divide_no_nan(target - before,
                                 tf.gather(counts, bin_index))
  result = low + width * (tf.cast(bin_index, tf.float32) + inside)
  return tf.where(total > 0, result, float('nan'))


def score_metrics(scores, fn_topk, fn_threshold):
  """Scalars of the identification scores of `identify_false_negatives`
  ([b, C], excluded columns at −1e9), for the metrics: fn_score_p50 / p90
  / p99 (`histogram_quantiles` over every valid (image, candidate) pair),
  fn_score_max (exact) and fn_kth_margin, the mean over images of (the
  fn_topk-th best score − fn_threshold): > 0 means the top-k cap, not the
  threshold, decides how many false negatives an image gets."""
  valid = scores > -objective.LARGE_NUM / 2
  quantiles = histogram_quantiles(scores, valid, SCORE_QUANTILES)
  top = tf.cast(tf.reduce_max(scores), tf.float32)
  # (interpolation may pass the largest score by less than a bin: capped)
  metrics = {f'fn_score_p{round(100 * q)}': tf.minimum(quantiles[i], top)
             for i, q in enumerate(SCORE_QUANTILES)}
  metrics['fn_score_max'] = top
  kth = tf.math.top_k(scores, k=fn_topk).values[:, -1]
  metrics['fn_kth_margin'] = tf.cast(
      tf.reduce_mean(kth) - fn_threshold, tf.float32)
  return metrics


def positive_score(views, num_views):
  """What a real other view scores under identification's rule, to read the
  candidate scores against (metric fn_positive_score): for every view w of
  every image, max over the image's other views v ≠ w of cos(view_v,
  view_w), averaged ([V·b, d] view-major: identification's queries, the
  online views or in memory mode the keys; normalised here, no gradient).
  With V = 2: the mean cosine of the two views."""
  views = tf.math.l2_normalize(tf.stop_gradient(views), -1)
  per_view = tf.stack(tf.split(views, num_views, axis=0))        # [V, b, d]
  gram = tf.einsum('vbd,wbd->bvw', per_view, per_view)           # [b, V, V]
  gram -= tf.eye(num_views, dtype=gram.dtype) * 3.0  # never the view itself
  return tf.cast(tf.reduce_mean(tf.reduce_max(gram, axis=1)), tf.float32)


class FNCResult(NamedTuple):
  """Outputs of `fnc_terms` (local rows; C = number of candidate columns)."""
  loss: tf.Tensor            # scalar FNC loss of the replica
  fn_mask: tf.Tensor         # [b, C] bool, false negatives of each image
  #   (for analysis: which candidates were cancelled)
  metrics: dict              # scalars, see `fnc_terms`


def fnc_column_terms(views, columns, num_views, temperature, fn_topk,
                     fn_threshold, strategy='attraction', labels=None,
                     column_labels=None, unit_rows=False, cancel=None):
  """`fnc_terms` against columns already gathered (`objective.
  contrast_columns`); column_labels [C] (`objective.values_per_column`)
  with labels, for the metrics only; unit_rows as `objective.
  contrast_logits`. cancel: None (always) or a bool scalar tensor; False
  cancels nothing (F = ∅: the loss is the plain multi-view contrastive loss,
  NT-Xent with V = 2; the FNC warm-up), the scores are still computed and
  reported."""
  if strategy not in STRATEGIES:
    raise ValueError(f'fn_strategy must be one of {STRATEGIES}, got '
                     f'{strategy!r}.')
  fn_mask, scores = identify_false_negatives(
      columns.queries, columns.candidates, columns.own_image, num_views,
      fn_topk, fn_threshold, columns.valid)
  if cancel is not None:
    fn_mask = tf.logical_and(fn_mask, cancel)
  loss, metrics = objective.cancellation_terms(
      views, columns, num_views, temperature, fn_mask[tf.newaxis], strategy,
      unit_rows)
  fn_count = tf.reduce_sum(tf.cast(fn_mask, tf.float32), axis=1)
  metrics['fn_per_anchor'] = tf.reduce_mean(fn_count)
  if not (isinstance(fn_topk, int) and fn_topk == 0):  # else not scored
    metrics.update(score_metrics(scores, fn_topk, fn_threshold))
  metrics['fn_positive_score'] = positive_score(columns.queries, num_views)
  if labels is not None:
    metrics.update(objective.false_negative_label_metrics(
        fn_mask, labels, column_labels))
  return FNCResult(loss=loss, fn_mask=fn_mask, metrics=metrics)


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
    FNCResult (loss: `objective.cancellation_terms` with the one mask F).
    metrics: contrast_loss; contrast_acc, contrast_entropy
    (`objective.cancellation_metrics`); fn_per_anchor (mean |F| per image);
    fn_score_p50 / p90 / p99 / max and fn_kth_margin (`score_metrics`, the
    distribution of the identification scores; not when fn_topk = 0);
    fn_positive_score (`positive_score`, what another view of the same
    image scores);
    with labels also fn_true_per_anchor and fn_label_acc
    (`objective.false_negative_label_metrics`).
  """
  if keys is None:
    queue = None
  columns = objective.contrast_columns(views, num_views, keys, queue,
                                       queue_valid, replica_context)
  column_labels = None
  if labels is not None:
    column_labels = objective.values_per_column(
        labels, num_views, queue_labels, queue, replica_context)
  return fnc_column_terms(views, columns, num_views, temperature, fn_topk,
                          fn_threshold, strategy, labels, column_labels)


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
# The objective.
# ---------------------------------------------------------------------------


@objective.register('fnc')
class FNC(objective.MemoryObjective):
  """False negative cancellation, in-batch or with a momentum-key queue.

  memory_multiplier = 0: in-batch mode, online projections only (as the
  release). memory_multiplier > 0: memory mode with a momentum encoder
  (EMA decay momentum_decay) and a queue of memory_multiplier·B keys,
  created in `build` and saved in checkpoints as `fnc_queue`.
  RandAugment (n = 2, m = 7) is on by default (`default_randaugment`).
  topk, threshold, strategy: identification and loss (`fnc_terms`'s
  fn_topk, fn_threshold, strategy).
  warmup_epochs: cancel nothing (F = ∅, the plain multi-view contrastive
  loss) until warmup_epochs·N examples have been trained on: the first
  ⌈warmup_epochs·N / B⌉ steps (N training examples, global batch B); 0 =
  from the first step. The steps trained are counted in `fnc_steps`
  (created in `build` when warmup_epochs > 0, saved in checkpoints).

  Metrics: see `fnc_terms` (labels come from batch['label'] and are used
  for the identification metrics only).
  """
  metric_names = ('contrast_loss', 'contrast_acc', 'contrast_entropy',
                  'fn_per_anchor', 'fn_true_per_anchor', 'fn_label_acc',
                  'fn_score_p50', 'fn_score_p90', 'fn_score_p99',
                  'fn_score_max', 'fn_kth_margin', 'fn_positive_score')
  default_randaugment = True
  queue_name = 'fnc_queue'

  def __init__(self, temperature=0.1, hidden_norm=True, support_size=8,
               memory_multiplier=16, momentum_decay=0.999, topk=10,
               threshold=0.7, strategy='attraction', warmup_epochs=0.0,
               name=None):
    super().__init__(temperature=temperature, hidden_norm=hidden_norm,
                     memory_multiplier=memory_multiplier,
                     momentum_decay=momentum_decay, name=name)
    self.support_size = support_size
    self.topk = topk
    self.threshold = threshold
    self.strategy = strategy
    self.warmup_epochs = warmup_epochs
    self.warmup_steps = 0
    self.steps_trained = None

  def build(self, num_train_examples, global_batch_size, projection_dim):
    super().build(num_train_examples, global_batch_size, projection_dim)
    if self.warmup_epochs > 0:
      self.warmup_steps = math.ceil(
          self.warmup_epochs * num_train_examples / global_batch_size)
      self.steps_trained = objective.replicated_state(
          tf.constant(0, tf.int64), 'fnc_steps')

  def checkpoint_items(self):
    items = dict(super().checkpoint_items())
    if self.steps_trained is not None:
      items['fnc_steps'] = self.steps_trained
    return items

  @property
  def num_views(self):
    return 2 + self.support_size

  def describe_num_views(self):
    return f'(2 + --support_size={self.support_size})'

  def num_candidates(self, global_batch_size):
    """Candidates per image: other images' views (+ the queue)."""
    count = self.num_views * (global_batch_size - 1)
    if self.memory_multiplier > 0:
      count += self.memory_multiplier * global_batch_size
    return count

  def validation_errors(self, global_batch_size, num_train_examples):
    errors = []
    if self.support_size < 0:
      errors.append(f'--support_size={self.support_size} must be ≥ 0 (views '
                    'per image = 2 + support_size).')
    if self.strategy not in STRATEGIES:
      errors.append(f'--fn_strategy={self.strategy!r} must be one of '
                    f'{", ".join(STRATEGIES)}.')
    if self.topk < 0:
      errors.append(f'--fn_topk={self.topk} must be ≥ 0.')
    if not self.warmup_epochs >= 0:
      errors.append(f'--fnc_warmup_epochs={self.warmup_epochs} must be '
                    '≥ 0.')
    errors += super().validation_errors(global_batch_size,
                                        num_train_examples)
    multiplier, views = self.memory_multiplier, self.num_views
    if self.support_size >= 0 and (multiplier == 0 or multiplier >= views):
      candidates = self.num_candidates(global_batch_size)
      if self.topk > candidates:
        where = (f' + {multiplier}·{global_batch_size} queued keys'
                 if multiplier else '')
        errors.append(
            f'--fn_topk={self.topk} exceeds the {candidates} candidates '
            f'of each image (V·(B − 1) = {views}·{global_batch_size - 1} '
            f'views of the other images{where}, with '
            f'--support_size={self.support_size}, '
            f'--train_batch_size={global_batch_size}, '
            f'--memory_multiplier={multiplier}).')
    return errors

  def loss_on_columns(self, views, columns, batch):
    cancel = None
    if self.warmup_epochs > 0:
      if self.steps_trained is None:
        raise ValueError('FNC.build(...) must be called before loss() with '
                         'warmup_epochs > 0.')
      cancel = self.steps_trained.read_value() >= self.warmup_steps
    result = fnc_column_terms(
        views, columns, self.num_views, self.temperature, self.topk,
        self.threshold, self.strategy, labels=batch.get('label'),
        column_labels=self.batch_values_per_column(batch, 'label'),
        unit_rows=self.hidden_norm, cancel=cancel)
    if cancel is not None:
      with tf.control_dependencies([cancel]):
        self.steps_trained.assign_add(1)
    return result.loss, result.metrics
