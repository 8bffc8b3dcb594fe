"""Contrastive objectives: the shared machinery, NT-Xent and the registry.

Every objective (SimCLR here; FNC, SogCLR and IFND in their own modules)
plugs into one small interface, `Objective`, and registers itself by name
(`register`, `get_objective_class`). It is built from its config dataclass
(`Objective.from_config`): constructor arguments and config fields are the
same names.

What more than one objective needs lives here, once:

* cross-replica primitives: the differentiable gather
  (`cross_replica_concat`), its view-major form (`gather_view_major`), the
  global indices of the local rows, replicated non-trainable state;
* NT-Xent (`nt_xent_loss`, `add_contrastive_loss`) and its metrics;
* the candidate columns of multi-view and memory-queue objectives (FNC,
  IFND): `contrast_columns`, the own-image mask, per-column ids / labels
  (`values_per_column`), the loss with false negatives cancelled
  (`cancellation_loss`: every mask from one `contrast_logits`) and its
  metrics, `MemoryQueue`, and `MemoryObjective`, the base of objectives
  with an optional momentum-key queue.

Column layout. Every tensor of views is view-major: row v·b + k is view v of
local image k ([V·b, d]); after the cross-replica gather, row v·B + i is view
v of the image with global index i. The candidate columns are

  in-batch: the V·B online views of the global batch;
  memory mode: the V·B momentum-encoder keys of the global batch, then the
  queue's K earlier keys, newest first.

Either way the first V·B columns are the current batch, so the columns of
the anchor's own image are v·B + i (`own_image_mask`).
"""

import dataclasses
from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

LARGE_NUM = 1e9

# How `cancellation_loss` treats false negatives F: as extra positives
# (attraction) or removed from the denominator (elimination).
CANCELLATION_STRATEGIES = ('attraction', 'elimination')


class _LocalOnly:
  """A replica context stand-in that makes the primitives replica-local."""
  num_replicas_in_sync = 1
  replica_id_in_sync_group = 0


LOCAL_ONLY = _LocalOnly()


def replicated_state(initial, name):
  """A non-trainable variable that every replica updates identically.

  ON_WRITE + aggregation NONE: an assignment in a replica context writes
  that replica's copy only, with no all-reduce. Objectives keep their state
  (SogCLR's u, a memory queue, IFND's pseudo labels) identical on every
  replica by applying the same all-gathered update on each; an assignment
  in the cross-replica context writes every copy.
  """
  return tf.Variable(initial, trainable=False, name=name,
                     synchronization=tf.VariableSynchronization.ON_WRITE,
                     aggregation=tf.VariableAggregation.NONE)


# ---------------------------------------------------------------------------
# Cross-replica primitives.
# ---------------------------------------------------------------------------


def _replica_context(replica_context=None):
  """The replica context to gather over, or None when there is one replica."""
  if replica_context is None:
    replica_context = tf.distribute.get_replica_context()
  if replica_context is None or replica_context.num_replicas_in_sync == 1:
    return None
  return replica_context


def cross_replica_concat(tensor, replica_context=None):
  """Concatenates `tensor` along axis 0 over all replicas, differentiably.

  Each replica writes its rows into its own slot of a zero tensor of shape
  [R, b, ...] and the slots are summed with an all-reduce. The gradient of a
  SUM all-reduce is the SUM all-reduce of the gradients, so every replica
  receives the gradient of the rows it produced from every replica's loss.

  Args:
    tensor: [b, ...] local rows (same b on every replica).
    replica_context: defaults to the current one; with one replica (or none)
      the tensor is returned as is.

  Returns:
    [R·b, ...], rows of replica r at [r·b, (r+1)·b).
  """
  ctx = _replica_context(replica_context)
  if ctx is None:
    return tensor
  with tf.name_scope('cross_replica_concat'):
    num_replicas = ctx.num_replicas_in_sync
    slots = tf.scatter_nd(
        indices=[[ctx.replica_id_in_sync_group]],
        updates=[tensor],
        shape=tf.concat([[num_replicas], tf.shape(tensor)], axis=0))
    slots = ctx.all_reduce(tf.distribute.ReduceOp.SUM, slots)
    return tf.reshape(slots, tf.concat([[-1], tf.shape(tensor)[1:]], axis=0))


def gather_view_major(local, num_views, replica_context=None):
  """All-gathers view-major rows, keeping them view-major.

  Args:
    local: [V·b, ...] rows of this replica, row v·b + k = view v of image k.
    num_views: V.
    replica_context: as `cross_replica_concat`.

  Returns:
    [V·B, ...] with row v·B + r·b + k = view v of image k of replica r, i.e.
    view v of the image with global index i = r·b + k. One (differentiable)
    all-reduce, whatever V.
  """
  gathered = cross_replica_concat(local, replica_context)
  rows = tf.shape(local)[0]
  num_replicas = tf.shape(gathered)[0] // rows
  inner = tf.shape(local)[1:]
  rank = len(local.shape)
  blocks = tf.reshape(gathered, tf.concat(
      [[num_replicas, num_views, rows // num_views], inner], axis=0))
  blocks = tf.transpose(blocks, [1, 0] + list(range(2, rank + 2)))
  return tf.reshape(blocks, tf.concat([[-1], inner], axis=0))


def broadcast_from_first_replica(strategy, value):
  """`value` as replica 0 (on the chief host) holds it, on every host.

  For host-side results that every host computes but must agree on bit for
  bit (IFND's pseudo labels: k-means threads may round differently on
  different machines). `value`: a tensor or array (each host passes its own)
  or a per-replica value. One SUM all-reduce of replica 0's value and zeros
  elsewhere, so integers and floats come through exactly. Returns a NumPy
  array.
  """
  def replica_fn(local):
    ctx = tf.distribute.get_replica_context()
    local = tf.convert_to_tensor(local)
    keep = tf.equal(ctx.replica_id_in_sync_group, 0)
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                          tf.where(keep, local, tf.zeros_like(local)))
  result = strategy.run(replica_fn, args=(value,))
  return strategy.experimental_local_results(result)[0].numpy()


def global_row_indices(local_batch_size, replica_context=None):
  """Global indices i = replica_id·b + k of the local rows k = 0..b-1."""
  ctx = _replica_context(replica_context)
  replica_id = 0 if ctx is None else ctx.replica_id_in_sync_group
  return tf.range(local_batch_size) + replica_id * local_batch_size


def split_views(projections, num_views):
  """Splits [V·b, d] view-major rows into a list of V [b, d] views."""
  return tf.split(projections, num_views, axis=0)


# ---------------------------------------------------------------------------
# NT-Xent.
# ---------------------------------------------------------------------------


def contrastive_metrics(logits_ab, positive_index):
  """contrast_acc (argmax of logits_ab is the positive) and contrast_entropy."""
  hits = tf.equal(tf.argmax(logits_ab, axis=1, output_type=tf.int32),
                  tf.cast(positive_index, tf.int32))
  prob = tf.nn.softmax(logits_ab)
  entropy = -tf.reduce_mean(
      tf.reduce_sum(prob * tf.math.log(prob + 1e-8), axis=-1))
  return {
      'contrast_acc': tf.reduce_mean(tf.cast(hits, tf.float32)),
      'contrast_entropy': entropy,
  }


def nt_xent_loss(z1, z2, temperature, replica_context=None):
  """NT-Xent over the global batch (SPEC §4).

  With local views z1, z2 [b, d] (already normalised if wanted) and their
  global versions Z1, Z2 [B, d], for local row k with global index i:

    logits_ab = z1 Z2ᵀ/τ,  logits_aa = z1 Z1ᵀ/τ − 1e9·onehot(i)
    loss_a = CE(onehot(i), [logits_ab | logits_aa]),  loss_b symmetric
    loss = mean_k (loss_a + loss_b)

  (twice the paper's 1/(2N) normalisation, as the original code).

  Returns:
    (loss, logits_ab [b, B], labels [b, 2B] one-hot).
  """
  z1_large = cross_replica_concat(z1, replica_context)
  z2_large = cross_replica_concat(z2, replica_context)
  global_batch = tf.shape(z1_large)[0]
  index = global_row_indices(tf.shape(z1)[0], replica_context)
  labels = tf.one_hot(index, global_batch * 2, dtype=z1.dtype)
  self_mask = tf.one_hot(index, global_batch, dtype=z1.dtype)

  logits_aa = tf.matmul(z1, z1_large, transpose_b=True) / temperature
  logits_aa -= self_mask * LARGE_NUM
  logits_bb = tf.matmul(z2, z2_large, transpose_b=True) / temperature
  logits_bb -= self_mask * LARGE_NUM
  logits_ab = tf.matmul(z1, z2_large, transpose_b=True) / temperature
  logits_ba = tf.matmul(z2, z1_large, transpose_b=True) / temperature

  loss_a = tf.nn.softmax_cross_entropy_with_logits(
      labels, tf.concat([logits_ab, logits_aa], axis=1))
  loss_b = tf.nn.softmax_cross_entropy_with_logits(
      labels, tf.concat([logits_ba, logits_bb], axis=1))
  loss = tf.reduce_mean(loss_a + loss_b)
  return loss, logits_ab, labels


def add_contrastive_loss(hidden, hidden_norm=True, temperature=1.0,
                         strategy=None):
  """The original SimCLR entry point, kept for notebooks written against it.

  Args:
    hidden: [2b, d], the two views stacked along the batch axis.
    hidden_norm: l2-normalise the rows first.
    temperature: τ.
    strategy: when given (and with more than one replica), negatives come
      from every replica (must be called in a replica context).

  Returns:
    (loss, logits_ab, labels) as `nt_xent_loss`.
  """
  if hidden_norm:
    hidden = tf.math.l2_normalize(hidden, -1)
  z1, z2 = tf.split(hidden, 2, axis=0)
  if strategy is None:
    # Without a strategy the original contrasts the local rows only.
    return nt_xent_loss(z1, z2, temperature, replica_context=LOCAL_ONLY)
  return nt_xent_loss(z1, z2, temperature, tf.distribute.get_replica_context())


# ---------------------------------------------------------------------------
# Candidate columns and the loss with false negatives cancelled (FNC, IFND).
# ---------------------------------------------------------------------------


def own_image_mask(global_index, global_batch, num_views, num_columns):
  """[b, C] bool: column c is a view of image i (c < V·B and c mod B = i)."""
  columns = tf.range(num_columns)[tf.newaxis, :]
  same = tf.equal(columns % global_batch, global_index[:, tf.newaxis])
  return tf.logical_and(same, columns < num_views * global_batch)


class Columns(NamedTuple):
  """The candidate columns of one replica's anchors (`contrast_columns`)."""
  candidates: tf.Tensor      # [C, d]: the batch's V·B views or keys (+ queue)
  valid: Optional[tf.Tensor]  # [C] bool, False for unfilled queue rows
  current_keys: Optional[tf.Tensor]  # [V·B, d] gathered keys (memory mode)
  queries: tf.Tensor         # [V·b, d] local views that score candidates
  index: tf.Tensor           # [b] global index of the local images
  global_batch: tf.Tensor    # B
  own_image: tf.Tensor       # [b, C] bool, the columns of the image itself


def contrast_columns(views, num_views, keys=None, queue=None,
                     queue_valid=None, replica_context=None):
  """Gathers the columns every anchor is contrasted against.

  In-batch (keys None): the V·B online views of the global batch, and the
  local online views as queries. Memory mode: the V·B momentum keys of the
  global batch followed by the K queued keys ([K, d], `queue_valid` [K]
  bool marks the filled rows), and the local keys as queries. No gradient
  flows into keys or queue.
  """
  local_images = tf.shape(views)[0] // num_views
  index = global_row_indices(local_images, replica_context)
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
  own_image = own_image_mask(index, global_batch, num_views,
                             tf.shape(candidates)[0])
  return Columns(candidates=candidates, valid=valid,
                 current_keys=current_keys, queries=queries, index=index,
                 global_batch=global_batch, own_image=own_image)


def values_per_column(values, num_views, queue_values=None, queue=None,
                      replica_context=None):
  """[C] int32: a per-image value (id, label) of every column of
  `contrast_columns`.

  The local images' `values` [b] are gathered over replicas and tiled over
  the V views (the V·B batch columns); in memory mode with a `queue` [K, d]
  the queued columns follow with `queue_values` [K] (−1 when None).
  """
  values = tf.cast(values, tf.int32)
  column = tf.tile(cross_replica_concat(values, replica_context),
                   [num_views])
  if queue is not None:
    if queue_values is None:
      queue_values = -tf.ones([tf.shape(queue)[0]], tf.int32)
    column = tf.concat([column, tf.cast(queue_values, tf.int32)], axis=0)
  return column


class ContrastLogits(NamedTuple):
  """The logits of one replica's anchors, shared by every false-negative mask
  (`contrast_logits`). Anchor (a, k) = view a of local image k."""
  logits: tf.Tensor        # [V, b, C] s/τ, −inf on self and invalid columns
  shift: tf.Tensor         # [V, b] row max of logits (no gradient)
  exp: tf.Tensor           # [V, b, C] exp(logits − shift), 0 where −inf
  total: tf.Tensor         # [V, b] Σ_c exp, the denominator before any F
  positive_sum: tf.Tensor  # [V, b] Σ_{p∈P} s_ap/τ
  bounded: bool            # (Python) no kept sum can underflow: unchecked


def contrast_logits(views, columns, num_views, temperature, unit_rows=False):
  """The [V·b, C] logits and their mask-independent reductions, once a step.

  For anchor a·b + k (global index i): self = column a·B + i, P = the other
  V − 1 columns of image i (v·B + i, v ≠ a), contrast = every valid column
  but self (compared, no one-hot); Σ_P s/τ = a·(Σ_{v≠a} own rows)/τ.
  unit_rows: views and candidates are unit vectors (|s/τ| ≤ 1/τ); with 2/τ
  within the dtype's exponent range the shared exp is then `bounded` and
  nothing is checked.
  """
  local_images = tf.shape(views)[0] // num_views
  num_columns = tf.shape(columns.candidates)[0]
  raw = tf.reshape(
      tf.matmul(views, columns.candidates, transpose_b=True) / temperature,
      [num_views, local_images, num_columns])
  own = (tf.range(num_views)[:, tf.newaxis] * columns.global_batch +
         columns.index[tf.newaxis, :])                          # [V, b]
  contrast = tf.not_equal(tf.range(num_columns), own[:, :, tf.newaxis])
  if columns.valid is not None:
    contrast = tf.logical_and(contrast, columns.valid)
  logits = tf.where(contrast, raw, tf.cast(-float('inf'), raw.dtype))
  # The columns v·B + i are the local queries (views or keys) themselves.
  own_rows = tf.reshape(columns.queries, [num_views, local_images, -1])
  positives = tf.reduce_sum(own_rows, axis=0) - own_rows      # Σ_{v≠a}
  positive_sum = tf.reduce_sum(
      tf.reshape(views, [num_views, local_images, -1]) * positives,
      axis=-1) / temperature
  shift = tf.stop_gradient(tf.reduce_max(logits, axis=-1))
  exp = tf.exp(logits - shift[:, :, tf.newaxis])
  bounded = (unit_rows and isinstance(temperature, (int, float)) and
             2.0 / temperature < -np.log(_underflow(views.dtype)) - 1.0)
  return ContrastLogits(logits=logits, shift=shift, exp=exp,
                        total=tf.reduce_sum(exp, axis=-1),
                        positive_sum=positive_sum, bounded=bounded)


def _underflow(dtype):
  """Below this a sum of exps has lost precision (tiny / eps)."""
  info = np.finfo(tf.as_dtype(dtype).as_numpy_dtype)
  return info.tiny / info.eps


def _masked_sums(values, fn_masks, inside):
  """[M, V, b]: Σ_c values[v, k, c] over c ∈ F_m(k) (inside) or c ∉ F_m(k),
  F_m = fn_masks[m] [b, C]. The gradient selects the upstream directly
  (no [V, b, C] zeros or broadcasts per mask)."""
  zero = tf.zeros([], values.dtype)

  def select(fn_mask, x):
    return tf.where(fn_mask, x, zero) if inside else tf.where(fn_mask, zero, x)

  @tf.custom_gradient
  def sums(values):
    def grad(upstream):
      return tf.add_n([select(m, g[:, :, tf.newaxis])
                       for m, g in zip(fn_masks, tf.unstack(upstream))])
    return tf.stack([tf.reduce_sum(select(m, values), axis=-1)
                     for m in fn_masks]), grad
  return sums(values)


def _log_kept(shared, kept, fn_masks):
  """log Σ_{c ∉ F_m} exp(logits) = shift + log kept, [M, V, b]. Unless
  `shared.bounded`, rows whose kept max lies so far below the row max that
  kept underflows are redone exactly (one cond for all masks)."""
  if shared.bounded:
    return shared.shift + tf.math.log(kept)
  safe = kept >= _underflow(kept.dtype)
  fast = shared.shift + tf.math.log(tf.where(safe, kept, tf.ones_like(kept)))
  minus_inf = tf.cast(-float('inf'), kept.dtype)

  def exact():
    return tf.where(safe, fast, tf.stack(
        [tf.reduce_logsumexp(tf.where(m, minus_inf, shared.logits), axis=-1)
         for m in fn_masks]))
  return tf.cond(tf.reduce_all(safe), lambda: fast, exact)


def cancellation_loss(shared, fn_masks, strategy='attraction'):
  """Per-anchor loss with false negatives F cancelled, one row per mask.

  For anchor a of image i (shared = `contrast_logits`, F = fn_masks[m, k]):

    attraction:  ℓ = −(1/(|P| + |F|)) Σ_{p∈P∪F} s_ap/τ
                     + log Σ_{c ≠ self, c valid} exp(s_ac/τ)
    elimination: ℓ = −(1/|P|) Σ_{p∈P} s_ap/τ
                     + log Σ_{c ≠ self, c valid, c ∉ F} exp(s_ac/τ)

  Each mask only selects from the shared logits / exp (no matmul, no exp).
  With V = 2 and F = ∅ both are NT-Xent's per-anchor term.

  Args:
    shared: `contrast_logits(...)`.
    fn_masks: [M, b, C] bool (no gradient), never true on own or invalid
      columns.
    strategy: one of CANCELLATION_STRATEGIES.

  Returns:
    [M, V·b] per-anchor losses, row a·b + k.
  """
  if strategy not in CANCELLATION_STRATEGIES:
    raise ValueError(f'strategy must be one of {CANCELLATION_STRATEGIES}, '
                     f'got {strategy!r}.')
  fn_masks = tf.unstack(tf.convert_to_tensor(fn_masks, tf.bool))
  dtype = shared.logits.dtype
  num_positives = tf.cast(tf.shape(shared.logits)[0] - 1, dtype)
  if strategy == 'attraction':
    fn_sums = _masked_sums(shared.logits, fn_masks, inside=True)
    fn_counts = tf.cast(tf.math.count_nonzero(fn_masks, axis=-1), dtype)
    per_anchor = (-(shared.positive_sum + fn_sums) /
                  (num_positives + fn_counts[:, tf.newaxis]) +
                  shared.shift + tf.math.log(shared.total))
  else:
    kept = _masked_sums(shared.exp, fn_masks, inside=False)
    per_anchor = (-shared.positive_sum / num_positives +
                  _log_kept(shared, kept, fn_masks))
  return tf.reshape(per_anchor, [len(fn_masks), -1])


def cancellation_terms(views, columns, num_views, temperature, fn_masks,
                       strategy='attraction', unit_rows=False):
  """The loss of one replica's anchors, averaged over masks, and metrics.

    loss = (1/M) Σ_m 2·mean over the V·b anchors of ℓ(F_m)

  with ℓ(F) the per-anchor `cancellation_loss` and fn_masks [M, b, C] bool
  (M = 1 for one mask), all from one `contrast_logits` (unit_rows as
  there). The ×2 is NT-Xent's normalisation: with V = 2 and F = ∅ the loss
  is `nt_xent_loss`.

  Returns:
    (loss, metrics): contrast_loss, and contrast_acc and contrast_entropy
    (`cancellation_metrics`, which do not depend on the masks).
  """
  shared = contrast_logits(views, columns, num_views, temperature, unit_rows)
  loss = 2.0 * tf.reduce_mean(cancellation_loss(shared, fn_masks, strategy))
  return loss, {'contrast_loss': loss,
                **cancellation_metrics(shared, columns, num_views)}


def cancellation_metrics(shared, columns, num_views):
  """contrast_acc (the best column, self excluded, is another view of the
  anchor's image) and contrast_entropy (of the softmax over those columns).
  """
  best = tf.argmax(shared.logits, axis=-1, output_type=tf.int32)  # [V, b]
  hits = tf.logical_and(best < num_views * columns.global_batch,
                        tf.equal(best % columns.global_batch,
                                 columns.index[tf.newaxis, :]))
  prob = shared.exp / shared.total[:, :, tf.newaxis]
  entropy = -tf.reduce_mean(
      tf.reduce_sum(prob * tf.math.log(prob + 1e-8), axis=-1))
  return {'contrast_acc': tf.reduce_mean(tf.cast(hits, tf.float32)),
          'contrast_entropy': entropy}


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

  # Batch key -> the variable that records it for the queued keys.
  BATCH_VALUES = {'id': 'ids', 'label': 'labels'}

  def __init__(self, size, dim, dtype=tf.float32, name='memory_queue'):
    super().__init__(name=name)
    if size < 1 or dim < 1:
      raise ValueError(f'MemoryQueue needs size ≥ 1 and dim ≥ 1, got '
                       f'{size} and {dim}.')
    self.size = int(size)
    self.dim = int(dim)
    self.keys = replicated_state(tf.zeros([self.size, self.dim], dtype),
                                 'keys')
    self.ids = replicated_state(-tf.ones([self.size], tf.int32), 'ids')
    self.labels = replicated_state(-tf.ones([self.size], tf.int32), 'labels')
    self.count = replicated_state(tf.constant(0, tf.int32), 'count')

  def valid(self):
    """[K] bool: the rows written so far."""
    return tf.range(self.size) < self.count

  def values(self, batch_key):
    """[K] what the queue records of batch[batch_key] ('id' or 'label')."""
    return getattr(self, self.BATCH_VALUES[batch_key])

  def push_batch(self, keys, batch, num_views):
    """Enqueues the global batch's keys [V·B, d] (`Columns.current_keys`)
    with the ids and labels of the local `batch`, gathered and tiled over
    the V views to match."""
    return self.push(keys, **{
        name: values_per_column(batch[key], num_views)
        for key, name in self.BATCH_VALUES.items() if key in batch})

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
# Objective interface.
# ---------------------------------------------------------------------------


class Objective(tf.Module):
  """What an experiment needs from a contrastive objective.

  The constructor's keyword arguments are the fields of the objective's
  config dataclass (`from_config`). `loss` prepares the projections once
  for every objective (float32 unless float64, l2-normalised when
  `hidden_norm`; keys alike) and hands them to the subclass's `contrast`.
  Objectives with state (queues, per-example averages, pseudo labels)
  create it in `build` and return it from `checkpoint_items` so it is saved
  with the model.

  Class attributes:
    metric_names: the keys of the metrics dict that `loss` returns.
    uses_momentum_encoder: the experiment builds a `model.MomentumEncoder`
      (EMA twin of ResNet + projection head, decay `momentum_decay`, read
      only then) and the trainer passes its projections of the batch to
      `loss` as `keys`.
    momentum_decay: None here (no momentum encoder).
    default_randaugment: whether pretraining views get RandAugment when
      `--use_randaugment` is not given.
  """
  metric_names = ('contrast_loss', 'contrast_acc', 'contrast_entropy')
  uses_momentum_encoder = False
  momentum_decay = None
  default_randaugment = False

  def __init__(self, temperature=0.1, hidden_norm=True, name=None):
    super().__init__(name=name)
    self.temperature = temperature
    self.hidden_norm = hidden_norm

  @classmethod
  def from_config(cls, config):
    """The objective of a config dataclass (its fields are our arguments)."""
    return cls(**dataclasses.asdict(config))

  @property
  def num_views(self):
    """Views per image in a pretraining batch."""
    return 2

  def validate(self, global_batch_size, num_train_examples):
    """Raises ValueError naming the flags when a setting cannot work
    (every problem of `validation_errors`, one per line)."""
    errors = self.validation_errors(global_batch_size, num_train_examples)
    if errors:
      raise ValueError('\n  '.join(errors))

  def validation_errors(self, global_batch_size, num_train_examples):
    """The messages of the settings that cannot work (none here)."""
    del global_batch_size, num_train_examples
    return []

  def build(self, num_train_examples, global_batch_size, projection_dim):
    """Creates the objective's state; called inside `strategy.scope()`.

    projection_dim: the width d of the projections (for state that stores
    them, such as memory queues).
    """
    del num_train_examples, global_batch_size, projection_dim

  def checkpoint_items(self):
    """Trackables to save in every checkpoint (name -> trackable)."""
    return {}

  def action_period_steps(self, steps_per_epoch):
    """Steps between the objective's host-side train actions (0 = none);
    they run at the first host-loop boundary at or after each multiple."""
    del steps_per_epoch
    return 0

  def train_actions(self, context):
    """orbit train actions (called after every host loop with its outputs;
    `start()`, when an action has it, is called once before training), for
    host-side work between steps such as re-clustering. `context` is a
    `TrainContext`."""
    del context
    return []

  def loss(self, projections, batch, keys=None):
    """Contrastive loss of one replica's batch.

    Args:
      projections: [V·b, d] projection-head outputs, view-major (row v·b + k
        is view v of local image k).
      batch: the input dict ('label' [b], 'id' [b]).
      keys: [V·b, d] the momentum encoder's projections of the same batch
        (same layout, no gradient); given only when uses_momentum_encoder.

    Returns:
      (loss, metrics): the replica's loss (not yet divided by the number of
      replicas) and a dict of scalar metrics.
    """
    dtype = tf.float64 if projections.dtype == tf.float64 else tf.float32
    views = self._prepare(projections, dtype)
    if keys is not None:
      keys = self._prepare(keys, dtype)
    return self.contrast(views, batch, keys)

  def _prepare(self, rows, dtype):
    """`rows` cast to `dtype`, l2-normalised when hidden_norm."""
    rows = tf.cast(rows, dtype)
    if self.hidden_norm:
      rows = tf.math.l2_normalize(rows, -1)
    return rows

  def contrast(self, views, batch, keys):
    """The loss of `loss`, from the prepared views [V·b, d] (and keys, or
    None); returns (loss, metrics)."""
    raise NotImplementedError


class MemoryObjective(Objective):
  """An objective with an optional memory mode (FNC, IFND).

  memory_multiplier > 0: a momentum encoder (EMA decay momentum_decay) and a
  `MemoryQueue` of memory_multiplier·B keys, built in `build` and saved as
  `queue_name`; 0: in-batch negatives.

  `contrast` gathers the columns (`contrast_columns`: in-batch views, or the
  keys followed by the queue), calls the subclass's
  `loss_on_columns(views, columns, batch)` and then, in memory mode, pushes
  the current keys into the queue.
  """
  queue_name = 'memory_queue'

  def __init__(self, temperature=0.1, hidden_norm=True, memory_multiplier=0,
               momentum_decay=0.999, name=None):
    super().__init__(temperature=temperature, hidden_norm=hidden_norm,
                     name=name)
    self.memory_multiplier = memory_multiplier
    self.momentum_decay = momentum_decay
    self.queue = None

  @property
  def uses_momentum_encoder(self):
    return self.memory_multiplier > 0

  def describe_num_views(self):
    """How V is set, for error messages."""
    return str(self.num_views)

  def validation_errors(self, global_batch_size, num_train_examples):
    errors = super().validation_errors(global_batch_size, num_train_examples)
    multiplier, views = self.memory_multiplier, self.num_views
    if multiplier < 0:
      errors.append(f'--memory_multiplier={multiplier} must be ≥ 0 (0 = '
                    'in-batch mode, no queue).')
    elif 0 < multiplier < views:
      errors.append(
          f'--memory_multiplier={multiplier}: the queue holds '
          f'{multiplier}·B = {multiplier * global_batch_size} keys, fewer '
          f'than one batch of keys (V·B = {self.describe_num_views()}·'
          f'{global_batch_size} = {views * global_batch_size}); use '
          f'--memory_multiplier ≥ {views}, or 0 for in-batch mode.')
    if not 0.0 <= self.momentum_decay <= 1.0:
      errors.append(f'--moving_average_decay={self.momentum_decay} must be '
                    'in [0, 1].')
    return errors

  def build(self, num_train_examples, global_batch_size, projection_dim):
    del num_train_examples
    if self.uses_momentum_encoder:
      if not projection_dim:
        raise ValueError(f'{type(self).__name__} memory mode needs '
                         'projection_dim (the width of the projections), got '
                         f'{projection_dim!r}.')
      self.queue = MemoryQueue(self.memory_multiplier * global_batch_size,
                               projection_dim, name=self.queue_name)

  def checkpoint_items(self):
    return {} if self.queue is None else {self.queue_name: self.queue}

  def contrast(self, views, batch, keys):
    if not self.uses_momentum_encoder:
      return self.loss_on_columns(
          views, contrast_columns(views, self.num_views), batch)
    if keys is None:
      raise ValueError(f'{type(self).__name__} memory mode (memory_multiplier'
                       ' > 0) needs the momentum encoder projections as '
                       '`keys`.')
    if self.queue is None:
      raise ValueError(f'{type(self).__name__}.build(...) must be called '
                       'before loss() in memory mode.')
    columns = contrast_columns(views, self.num_views, keys, self.queue.keys,
                               self.queue.valid())
    loss, metrics = self.loss_on_columns(views, columns, batch)
    self.queue.push_batch(columns.current_keys, batch, self.num_views)
    return loss, metrics

  def batch_values_per_column(self, batch, key):
    """`values_per_column` of batch[key] ('id' or 'label') for this step's
    columns, the queued columns' values from the queue; None when the batch
    has no such key."""
    if key not in batch:
      return None
    if self.queue is None:
      return values_per_column(batch[key], self.num_views)
    return values_per_column(batch[key], self.num_views,
                             self.queue.values(key), self.queue.keys)

  def loss_on_columns(self, views, columns, batch):
    """(loss, metrics) of the prepared views against `columns`."""
    raise NotImplementedError


class TrainContext(NamedTuple):
  """What the experiment hands to `Objective.train_actions`."""
  strategy: tf.distribute.Strategy
  global_step: tf.Variable
  train_steps: int
  steps_per_epoch: int
  key_encoder: Callable  # images [b, H, W, 3] -> projections, inference mode
  train_pass: Callable  # () -> distributed one-pass dataset of the training
  #   split, eval preprocessing, padding rows with id -1
  output_dir: Optional[str]  # model_dir on the chief; None on the other
  #   workers of a multi-worker run, which write no files


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------


_REGISTRY = {}


def register(name):
  """Class decorator that makes an objective selectable by `--objective`."""
  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f'Objective {name!r} registered twice.')
    _REGISTRY[name] = cls
    cls.registry_name = name
    return cls
  return wrap


def available_objectives():
  return sorted(_REGISTRY)


def get_objective_class(name):
  """The registered objective class called `name`."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown --objective={name!r}; available: '
                     f'{", ".join(available_objectives())}.')
  return _REGISTRY[name]


@register('simclr')
class SimCLR(Objective):
  """NT-Xent over the global batch (Chen et al. 2020)."""

  def contrast(self, views, batch, keys):
    del batch, keys
    z1, z2 = split_views(views, 2)
    loss, logits_ab, _ = nt_xent_loss(z1, z2, self.temperature)
    positive = global_row_indices(tf.shape(z1)[0])
    metrics = contrastive_metrics(logits_ab, positive)
    metrics['contrast_loss'] = loss
    return loss, metrics
