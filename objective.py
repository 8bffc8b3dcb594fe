"""Contrastive objectives: shared primitives, NT-Xent and the objective registry.

Every objective (SimCLR here; FNC, SogCLR and IFND in their own modules)
plugs into one small interface, `Objective`, and registers itself by name.
`run.py` only ever calls `get_objective_class(FLAGS.objective)`.

Shared primitives live here once: the differentiable cross-replica gather,
the global labels of the local rows, and the contrastive metrics.
"""

from typing import Callable, NamedTuple

import tensorflow as tf

LARGE_NUM = 1e9


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
# Objective interface and registry.
# ---------------------------------------------------------------------------


class Objective(tf.Module):
  """What `run.py` needs from a contrastive objective.

  Subclasses set the class attributes and implement `loss`. Objectives with
  state (queues, per-example averages, pseudo labels) create it in `build`
  and return it from `checkpoint_items` so it is saved with the model.

  Class attributes:
    flag_names: names of the absl flags the constructor takes as keyword
      arguments (run.py passes exactly these; the loss never reads flags).
    needs_example_ids: batches must carry dense example ids in [0, N).
    metric_names: the keys of the metrics dict that `loss` returns.
    uses_momentum_encoder: run.py builds a `model.MomentumEncoder` (EMA
      twin of ResNet + projection head, decay `momentum_decay`) and the
      trainer passes its projections of the batch to `loss` as `keys`.
    default_randaugment: whether pretraining views get RandAugment when
      `--use_randaugment` is not given.
    projection_dim: the width d of the projections; run.py sets it (from the
      built model) before `build`, for objectives whose state stores
      projections (memory queues).
  """
  flag_names = ('temperature', 'hidden_norm')
  needs_example_ids = False
  metric_names = ('contrast_loss', 'contrast_acc', 'contrast_entropy')
  uses_momentum_encoder = False
  default_randaugment = False
  projection_dim = None

  def __init__(self, temperature=0.1, hidden_norm=True, name=None):
    super().__init__(name=name)
    self.temperature = temperature
    self.hidden_norm = hidden_norm

  @property
  def num_views(self):
    """Views per image in a pretraining batch."""
    return 2

  @property
  def momentum_decay(self):
    """EMA decay d of the momentum encoder (None when there is none)."""
    return None

  def validate(self, global_batch_size, num_train_examples):
    """Raises ValueError naming the flags when a setting cannot work."""
    del global_batch_size, num_train_examples

  def build(self, num_train_examples, global_batch_size):
    """Creates the objective's state; called inside `strategy.scope()`."""
    del num_train_examples, global_batch_size

  def checkpoint_items(self):
    """Trackables to save in every checkpoint (name -> trackable)."""
    return {}

  def action_period_steps(self, steps_per_epoch):
    """Steps between the objective's host-side train actions (0 = none);
    run.py makes steps_per_loop divide it."""
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
      batch: the input dict ('label' [b], 'id' [b] when needed).
      keys: [V·b, d] the momentum encoder's projections of the same batch
        (same layout, no gradient); given only when uses_momentum_encoder.

    Returns:
      (loss, metrics): the replica's loss (not yet divided by the number of
      replicas) and a dict of scalar metrics.
    """
    raise NotImplementedError


class TrainContext(NamedTuple):
  """What run.py hands to `Objective.train_actions`."""
  strategy: tf.distribute.Strategy
  global_step: tf.Variable
  train_steps: int
  steps_per_epoch: int
  key_encoder: Callable  # images [b, H, W, 3] -> projections, inference mode
  train_pass_dataset_fn: Callable  # () -> distributed one-pass dataset of
  #   the training split, eval preprocessing, padding rows with id -1
  model_dir: str


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

  def loss(self, projections, batch, keys=None):
    del batch, keys
    if self.hidden_norm:
      projections = tf.math.l2_normalize(projections, -1)
    z1, z2 = split_views(projections, 2)
    loss, logits_ab, _ = nt_xent_loss(z1, z2, self.temperature)
    positive = global_row_indices(tf.shape(z1)[0])
    metrics = contrastive_metrics(logits_ab, positive)
    metrics['contrast_loss'] = loss
    return loss, metrics
