"""SogCLR: the dynamic contrastive loss and its per-example state (SPEC §8).

SogCLR (Yuan et al., ICML 2022) optimises the *global* contrastive objective

  F = mean_i [ −s(i, i⁺) + τ·log( mean over all negatives j of exp(s_ij/τ) ) ]

with small batches by keeping, for every training example i, a moving
average u[i] of its negative partition estimate g_i (the mean of exp(s/τ)
over the batch's negatives) instead of trusting the current batch alone.

This module has two layers:

* pure functions (tensors in, tensors out, no state, no flags):
  `dynamic_contrastive_loss`, `view_terms`, `stored_u`, `dedupe_mean`;
* `SogCLR`, the registered objective (`--objective=sogclr`, or the legacy
  `--DCL_mode` / `--GCL_mode` / `--BI_mode`), which owns u: N float32
  zeros, non-trainable, one mirrored copy per replica, saved in checkpoints
  as `sogclr_u`.

Keeping the copies identical: each replica all-gathers the (id, new u)
pairs of the global batch and applies the same scatter to its own copy
(aggregation NONE: a replica-context update touches only the local copy and
needs no broadcast). The inputs of that scatter are bit-identical on every
replica and the scatter is deterministic (ids made unique first), so the
copies stay bit-identical.

Decisions (see also the README):
* First visit (u[i] = 0): the update formula is applied unchanged, so
  u_a = γ·g_a and the negative weights are 1/γ times the batch softmax
  weights for that step. This is what the paper's TF and PyTorch code do
  and what SPEC §8 says; no special case.
* Store (`u_store`, --dcl_u_store) 'sum' (paper code, default):
  u[i] ← u_a + u_b. Per view the fixed point is u* = γ/(2γ − 1)·g, which
  diverges for γ ≤ 0.5 (rejected at start-up). 'mean' (later PyTorch /
  LibAUC): u[i] ← (u_a + u_b)/2 → g.
* An id can appear twice in one global batch when the batch straddles an
  epoch boundary (the input pipeline repeats before batching). Both rows
  read the same stored u[i]; the stored value is the mean of their new
  values. With B ≤ N an id appears at most twice, and the mean of two
  floats does not depend on summation order, so this is exact everywhere.
"""

from typing import NamedTuple

import tensorflow as tf

import objective

STORE_MODES = ('sum', 'mean')


class DCLResult(NamedTuple):
  """Outputs of `dynamic_contrastive_loss` (per-example tensors are [b])."""
  loss: tf.Tensor          # scalar surrogate: mean_k (ℓ_a + ℓ_b)
  u_a: tf.Tensor           # new per-view estimates, view 1 anchors
  u_b: tf.Tensor           # new per-view estimates, view 2 anchors
  g_a: tf.Tensor           # batch estimates mean_j exp(s_aj/τ), view 1
  g_b: tf.Tensor           # batch estimates, view 2
  objective: tf.Tensor     # scalar true objective mean_k (F_a + F_b)
  logits_ab: tf.Tensor     # [b, B] z1·Z2ᵀ/τ (for contrast_acc)


def view_terms(similarities, positive_index, self_index, u_prev, temperature,
               gamma):
  """SogCLR terms of the anchors of one view.

  Args:
    similarities: [b, 2B] s_aj of each local anchor to the 2B views of the
      global batch (raw cosines, no τ).
    positive_index: [b] column of the anchor's positive.
    self_index: [b] column of the anchor itself (excluded).
    u_prev: [b] stored u[i] of the anchors' examples.
    temperature: τ.
    gamma: γ, weight of the current batch in the moving average.

  Returns:
    (surrogate ℓ [b], u [b], g [b], true objective [b]) where, over the
    2(B−1) negatives j (all columns except positive and self),
      g = mean_j exp(s_aj/τ),  u = (1−γ)·u_prev + γ·g,
      ℓ = −s_pos + mean_j stop_gradient(exp(s_aj/τ)/u)·s_aj,
      F = −s_pos + τ·log g.
    u and g carry no gradient.
  """
  dtype = similarities.dtype
  num_columns = tf.shape(similarities)[1]
  positive = tf.one_hot(positive_index, num_columns, dtype=dtype)
  negative = tf.logical_not(tf.logical_or(
      tf.cast(positive, tf.bool),
      tf.cast(tf.one_hot(self_index, num_columns), tf.bool)))
  num_negatives = tf.cast(num_columns - 2, dtype)
  s_pos = tf.reduce_sum(similarities * positive, axis=1)

  sims = tf.stop_gradient(similarities)
  # where() before exp: the self column (s = 1/τ for unit vectors, or
  # anything without normalisation) never reaches exp, so it cannot turn
  # into inf·0 = NaN.
  exp_neg = tf.where(negative, tf.exp(tf.where(negative, sims, 0.0)
                                      / temperature), 0.0)
  g = tf.reduce_sum(exp_neg, axis=1) / num_negatives
  u = (1.0 - gamma) * tf.cast(u_prev, dtype) + gamma * g
  weights = exp_neg / u[:, tf.newaxis]
  surrogate = -s_pos + tf.reduce_sum(
      weights * similarities, axis=1) / num_negatives
  true_objective = -tf.stop_gradient(s_pos) + temperature * tf.math.log(g)
  return surrogate, u, g, true_objective


def dynamic_contrastive_loss(z1, z2, u_prev, temperature, gamma,
                             replica_context=None):
  """SogCLR's dynamic contrastive loss over the global batch (SPEC §8).

  With local views z1, z2 [b, d] (normalise them first for cosines) and
  their all-gathered versions Z1, Z2 [B, d], the anchor z1[k] (global index
  i) is compared with the 2B columns [Z2 | Z1]: its positive is Z2[i],
  Z1[i] is itself, and the other 2(B−1) are negatives; z2[k] likewise with
  [Z1 | Z2]. Both views read the same stored u[i] (`u_prev[k]`).

    loss = mean_k (ℓ_a + ℓ_b)   (the gradient of SogCLR; see `view_terms`)

  The gather is differentiable, so each replica's rows get the gradient
  from every replica's loss; divide by R before summing gradients, as for
  NT-Xent.

  Args:
    z1, z2: [b, d] projections of the two views.
    u_prev: [b] u[i] of the local examples (0 on first visit).
    temperature: τ.
    gamma: γ in (0, 1].
    replica_context: as `objective.cross_replica_concat`.

  Returns:
    DCLResult.
  """
  z1_large = objective.cross_replica_concat(z1, replica_context)
  z2_large = objective.cross_replica_concat(z2, replica_context)
  global_batch = tf.shape(z1_large)[0]
  index = objective.global_row_indices(tf.shape(z1)[0], replica_context)
  s_ab = tf.matmul(z1, z2_large, transpose_b=True)
  s_aa = tf.matmul(z1, z1_large, transpose_b=True)
  s_ba = tf.matmul(z2, z1_large, transpose_b=True)
  s_bb = tf.matmul(z2, z2_large, transpose_b=True)
  self_index = index + global_batch
  loss_a, u_a, g_a, f_a = view_terms(
      tf.concat([s_ab, s_aa], axis=1), index, self_index, u_prev,
      temperature, gamma)
  loss_b, u_b, g_b, f_b = view_terms(
      tf.concat([s_ba, s_bb], axis=1), index, self_index, u_prev,
      temperature, gamma)
  return DCLResult(
      loss=tf.reduce_mean(loss_a + loss_b), u_a=u_a, u_b=u_b, g_a=g_a,
      g_b=g_b, objective=tf.reduce_mean(f_a + f_b),
      logits_ab=s_ab / temperature)


def stored_u(u_a, u_b, store='sum'):
  """The value written back to u[i]: u_a + u_b ('sum') or their mean."""
  if store == 'sum':
    return u_a + u_b
  if store == 'mean':
    return 0.5 * (u_a + u_b)
  raise ValueError(f'dcl_u_store must be one of {STORE_MODES}, got '
                   f'{store!r}.')


def dedupe_mean(ids, values):
  """(unique ids in first-seen order, mean of `values` per id)."""
  unique_ids, position = tf.unique(ids)
  means = tf.math.unsorted_segment_mean(values, position,
                                        tf.size(unique_ids))
  return unique_ids, means


def update_u(u, ids, values, replica_context=None):
  """Writes `values` [b] to u at `ids` [b] identically on every replica.

  Every replica gathers the (id, value) pairs of the whole global batch and
  scatters them (duplicates averaged, `dedupe_mean`) into its own copy.
  """
  all_ids = objective.cross_replica_concat(
      tf.cast(ids, tf.int32), replica_context)
  all_values = objective.cross_replica_concat(
      tf.cast(tf.stop_gradient(values), u.dtype), replica_context)
  unique_ids, means = dedupe_mean(all_ids, all_values)
  return u.scatter_update(tf.IndexedSlices(means, unique_ids))


@objective.register('sogclr')
class SogCLR(objective.Objective):
  """SogCLR / dynamic contrastive loss with a per-example moving average u.

  gamma: γ, the weight of the current batch in u; u_store: what is written
  back to u[i], 'sum' (u_a + u_b, the paper's code) or 'mean'
  (`stored_u`). The loss reads batch['id'] (dense example ids in [0, N)).

  Metrics: contrast_loss (the surrogate, what is minimised),
  dcl_objective (the true global-objective estimate −s_pos + τ·log g,
  summed over both views like contrast_loss), dcl_u_mean / dcl_g_mean
  (batch means of the per-view u and of g: under 'sum' their ratio tends
  to γ/(2γ−1), under 'mean' to 1), contrast_acc and contrast_entropy as
  for SimCLR.
  """
  metric_names = ('contrast_loss', 'contrast_acc', 'contrast_entropy',
                  'dcl_objective', 'dcl_u_mean', 'dcl_g_mean')

  def __init__(self, temperature=0.1, hidden_norm=True, gamma=0.99,
               u_store='sum', name=None):
    super().__init__(temperature=temperature, hidden_norm=hidden_norm,
                     name=name)
    self.gamma = gamma
    self.u_store = u_store
    self.u = None

  def validation_errors(self, global_batch_size, num_train_examples):
    errors = []
    if not 0.0 < self.gamma <= 1.0:
      errors.append(f'--gamma={self.gamma} must be in (0, 1] for SogCLR.')
    if self.u_store not in STORE_MODES:
      errors.append(f'--dcl_u_store={self.u_store!r} must be one of '
                    f'{", ".join(STORE_MODES)}.')
    elif self.u_store == 'sum' and self.gamma <= 0.5:
      errors.append(
          f'--dcl_u_store=sum with --gamma={self.gamma}: the stored sum '
          'u_a + u_b grows without bound for gamma <= 0.5 (per-view fixed '
          'point gamma/(2·gamma−1)·g); use --gamma > 0.5 or '
          '--dcl_u_store=mean.')
    if global_batch_size < 2:
      errors.append(f'--train_batch_size={global_batch_size}: SogCLR needs '
                    'at least 2 images per batch (negatives).')
    if global_batch_size > num_train_examples:
      errors.append(f'--train_batch_size={global_batch_size} exceeds the '
                    f'{num_train_examples} training examples; SogCLR keeps '
                    'one u per example and needs B <= N.')
    return errors

  def build(self, num_train_examples, global_batch_size, projection_dim):
    del global_batch_size, projection_dim
    self.u = objective.replicated_state(
        tf.zeros([num_train_examples], tf.float32), 'sogclr_u')

  def checkpoint_items(self):
    return {} if self.u is None else {'sogclr_u': self.u}

  def contrast(self, views, batch, keys):
    del keys  # SogCLR has no momentum encoder.
    if self.u is None:
      raise ValueError('SogCLR.build(num_train_examples, ...) must be called '
                       'before loss().')
    z1, z2 = objective.split_views(views, 2)
    ids = tf.cast(batch['id'], tf.int32)
    u_prev = tf.gather(self.u, ids)
    result = dynamic_contrastive_loss(z1, z2, u_prev, self.temperature,
                                      self.gamma)
    update_u(self.u, ids, stored_u(result.u_a, result.u_b, self.u_store))
    positive = objective.global_row_indices(tf.shape(z1)[0])
    metrics = objective.contrastive_metrics(result.logits_ab, positive)
    metrics.update({
        'contrast_loss': result.loss,
        'dcl_objective': result.objective,
        'dcl_u_mean': tf.reduce_mean(0.5 * (result.u_a + result.u_b)),
        'dcl_g_mean': tf.reduce_mean(0.5 * (result.g_a + result.g_b)),
    })
    return result.loss, metrics
