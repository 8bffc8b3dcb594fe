"""Orbit trainer and evaluator (the loops `run.py` hands to orbit.Controller),
and the summary manager that writes the training scalars every
--train_summary_steps.

The trainer runs one optimisation step per batch on every replica:
contrastive loss from the objective (pretraining), cross-entropy of the
supervised head (linear eval while pretraining, or fine-tuning) and the
explicit weight-decay term; the sum is divided by the number of replicas
because gradients are summed across replicas (SPEC §4). The linear head of
pretraining is trained by the encoder's optimizer, or by its own
(`LinearHead`, --linear_head_optimizer), on the augmented views or on one
clean view per example (--linear_head_input). With `jit_compile`
(--jit_compile) that whole replica step is one XLA computation; it needs
a one-device (or the default) strategy (`check_jit_compile`).

Fault tolerance (all checked on the device, no host sync per step):

* Non-finite losses. Every step tests each loss term and the gradients for
  NaN / inf and all-reduces the answer, so every replica agrees. Each host
  loop reports how many steps had a non-finite term ('train/nonfinite_steps'
  in the loop outputs) and, by `nonfinite_report()`, the first such step and
  its terms. With `skip_nonfinite` such a step changes nothing but the
  global step (see `Trainer.__init__`).
* Stop requests. `stop_requested` is a host variable that another thread
  (a signal watcher) may set while a loop runs; the loop then ends before
  its next step, without reading the iterator or advancing the global step
  (the global step is the number of steps really done). It stays set: later
  loops do nothing until it is assigned False.
"""

from typing import NamedTuple, Tuple

import orbit
import tensorflow as tf
import tf_keras

import data_util
import lars_optimizer

# The terms checked for NaN / inf, in report order: the objective's
# contrastive loss, the supervised cross-entropy, the explicit weight decay,
# their sum, and the gradients (any element of any gradient).
NONFINITE_TERMS = ('contrast_loss', 'supervised_loss', 'weight_decay', 'loss',
                   'gradients')


def _mean_metric(name):
  return tf_keras.metrics.Mean(name)


class LinearHead(NamedTuple):
  """The linear head's own optimizer (--linear_head_optimizer other than
  shared; pretraining with a supervised head only).

  optimizer: applies the gradients of the model's `supervised_head`
    variables, which the encoder's optimizer then never sees (it has no
    slots for them); its `iterations` advance with the global step.
  optimizer_name: 'momentum' or 'adam' (`lars_optimizer.build_optimizer`),
    which decides the head's decay term (`weight_decay_loss`).
  weight_decay: of that term.
  """
  optimizer: object
  optimizer_name: str
  weight_decay: float


def head_variables(model):
  """The trainable variables of the model's supervised head ([] without
  one)."""
  head = model.supervised_head
  return list(head.trainable_variables) if head is not None else []


def split_head_variables(model, variables):
  """(encoder variables, head variables) of `variables`, in their order."""
  head = {id(v) for v in head_variables(model)}
  return ([v for v in variables if id(v) not in head],
          [v for v in variables if id(v) in head])


def weight_decay_loss(model, optimizer_name, weight_decay, linear_head=None):
  """The explicit decay term of a step (SPEC §5), in the model's dtype.

  Without `linear_head` (shared): `lars_optimizer.weight_decay_loss` of
  every trainable variable for the encoder's optimizer (LARS: only the
  head's kernel; momentum / adam: every non-BN weight). With it: that term
  over the encoder's variables plus the head's own term
  (`linear_head.weight_decay`, `linear_head.optimizer_name`'s rule) over
  the head's.
  """
  dtype = tf.as_dtype(model.dtype)
  variables = model.trainable_variables
  if linear_head is None:
    groups = [(variables, optimizer_name, weight_decay)]
  else:
    encoder, head = split_head_variables(model, variables)
    groups = [(encoder, optimizer_name, weight_decay),
              (head, linear_head.optimizer_name, linear_head.weight_decay)]
  return tf.add_n([
      tf.cast(lars_optimizer.weight_decay_loss(v, name, wd), dtype)
      for v, name, wd in groups])


class NonFiniteReport(NamedTuple):
  """The steps of one host loop that had a non-finite term.

  first_step: the number of the first such step, counted from 1 as
    checkpoints count: `optimizer.iterations` after that step (the step that
    turned global step N − 1 into N is step N; ckpt-N would hold its result).
  terms: the names (`NONFINITE_TERMS`) that were NaN or infinite at
    first_step on at least one replica.
  count: how many steps of the loop had any non-finite term.
  """
  first_step: int
  terms: Tuple[str, ...]
  count: int


def _all_finite(tensors):
  """Scalar bool: every element of every tensor is finite."""
  checks = []
  for t in tensors:
    if t is None:
      continue
    if isinstance(t, tf.IndexedSlices):
      t = t.values
    checks.append(tf.reduce_all(tf.math.is_finite(t)))
  return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def is_tpu(strategy):
  """Whether `strategy` runs on TPUs (its steps are always XLA-compiled)."""
  return isinstance(strategy, tf.distribute.TPUStrategy)


def check_jit_compile(strategy):
  """ValueError unless `strategy` can run an XLA-compiled replica step.

  MirroredStrategy and MultiWorkerMirroredStrategy run each replica's step
  in a thread that syncs through `merge_call` (the optimizer's gradient
  all-reduce; with several replicas also the objectives' all-gathers and
  global BN), and TensorFlow cannot merge from inside a compiled function:
  "merge_call called while defining a new graph", even with one replica.
  The default and one-device strategies compile; TPUs compile anyway.
  """
  if is_tpu(strategy):
    return
  replicas = strategy.num_replicas_in_sync
  if replicas > 1 or isinstance(strategy, (
      tf.distribute.MirroredStrategy,
      tf.distribute.MultiWorkerMirroredStrategy)):
    raise ValueError(
        f'--jit_compile cannot compile the step under '
        f'{type(strategy).__name__} ({replicas} replica(s)): its replicas '
        'sync (gradient all-reduce, all-gathers) through merge_call, which '
        'TensorFlow cannot run inside an XLA-compiled function ("merge_call '
        'called while defining a new graph"). Drop --jit_compile, or train '
        'on one device, one GPU (e.g. CUDA_VISIBLE_DEVICES=0) or the CPU, '
        'with --distribution_strategy=one_device or unset (detected).')


def uncompilable_step_message(error):
  """What to tell the user when the first compiled step raised `error`
  (a tf.errors.OpError) because XLA cannot compile it; None for any other
  error."""
  lines = [line.strip() for line in str(error).splitlines()]
  reason = next((line for line in lines
                 if 'XLA' in line or 'compile-time constant' in line), None)
  if reason is None:
    return None
  return ('--jit_compile: XLA cannot compile this training step (an op of '
          'the model or objective has no XLA kernel, or a shape XLA cannot '
          f'fix at compile time): {reason[:500]} Drop --jit_compile to '
          'train uncompiled.')


class Trainer(orbit.StandardTrainer):
  """Pretraining / fine-tuning step on a distributed dataset."""

  def __init__(self, strategy, model, optimizer, objective, train_dataset,
               train_mode='pretrain', optimizer_name='lars',
               weight_decay=0.0, momentum_encoder=None, skip_nonfinite=False,
               stop_within_loop=True, jit_compile=False, linear_head=None,
               head_on_clean_views=False):
    """`linear_head` (a `LinearHead`, pretraining with a supervised head):
    the head's variables get their gradients from its optimizer, the
    others from `optimizer`; both apply in the same step, or (skipped
    step) neither, and both advance their `iterations`. Not with a
    LossScaleOptimizer (its loss scale would govern only the encoder).

    `head_on_clean_views` (pretraining with a supervised head;
    --linear_head_input=clean): the head is trained on the stop-gradient
    features of the batch's 'clean_image' (one eval-preprocessed view per
    example, `data.train_view_fn(clean_view=True)`) in inference mode
    (`Model.head_features`), the features that eval and evaluate.py score,
    instead of (False, the original) those of every augmented view.

    `momentum_encoder` (a `model.MomentumEncoder`, pretraining only):
    its projections of each batch go to `objective.loss` as `keys`, and it
    is EMA-updated from the model after every optimizer step.

    `skip_nonfinite`: a step with a non-finite loss term or gradient (on any
    replica) makes no update: the weights, the optimizer's slots, the BN
    moving statistics (model and momentum encoder), the objective's
    variables (queues, SogCLR's u) and the momentum encoder keep their
    values, bit for bit, and the step's losses are left out of the loop's
    metrics. The global step still advances by one, so host loops keep
    their length and step-based schedules and orbit's bookkeeping hold.
    Cost: a copy of the BN statistics and objective state every step (it is
    put back with `tf.where` after the forward pass has updated it).

    `stop_within_loop`: compile the `stop_requested` check into every step.
    Multi-worker runs pass False (workers could see a request at different
    steps); they stop between host loops instead.

    A `tf_keras.mixed_precision.LossScaleOptimizer` (float16) gets the
    scaled loss's gradients, unscaled; overflowing gradients are then its
    business (it skips the step and halves the scale), so only the loss
    terms count as non-finite.

    `jit_compile`: each replica's whole step (`_step_fn`) runs as one XLA
    computation, a `tf.function(jit_compile=True)` called from the replica
    function. Needs a one-device (or the default) strategy
    (`check_jit_compile`); a TPU step is compiled anyway, so there the flag
    changes nothing.

    Build the trainer outside `strategy.scope()`: `stop_requested` must be
    a plain host variable, not a mirrored one.
    """
    self.strategy = strategy
    self.model = model
    self.momentum_encoder = momentum_encoder
    self.optimizer = optimizer
    self.loss_scaled = isinstance(
        optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    # The loss terms are summed (and divided by the replicas) in the
    # variables' dtype: float32 (also under the mixed policies), or float64.
    self.loss_dtype = tf.as_dtype(model.dtype)
    self.objective = objective
    self.train_mode = train_mode
    self.optimizer_name = optimizer_name
    self.weight_decay = weight_decay
    self.skip_nonfinite = bool(skip_nonfinite)
    self.stop_within_loop = bool(stop_within_loop)
    if linear_head is not None:
      if train_mode != 'pretrain' or not head_variables(model):
        raise ValueError('A LinearHead optimizer trains the supervised head '
                         'of pretraining (--lineareval_while_pretraining); '
                         f'this model has none in train_mode={train_mode}.')
      if self.loss_scaled:
        raise ValueError('A LinearHead optimizer cannot run with float16\'s '
                         'LossScaleOptimizer: its dynamic loss scale would '
                         'govern only the encoder\'s gradients.')
    self.linear_head = linear_head
    if head_on_clean_views and (train_mode != 'pretrain' or
                                not head_variables(model)):
      raise ValueError('head_on_clean_views trains the supervised head of '
                       'pretraining (--lineareval_while_pretraining); this '
                       f'model has none in train_mode={train_mode}.')
    self.head_on_clean_views = bool(head_on_clean_views)
    # The replica step as orbit's loop calls it: XLA-compiled or not.
    self.compiled_step = None
    if jit_compile and not is_tpu(strategy):
      check_jit_compile(strategy)
      self.compiled_step = tf.function(self._step_fn, jit_compile=True)
    names = ['loss', 'weight_decay']
    if train_mode == 'pretrain':
      names += list(objective.metric_names)
    if model.supervised_head is not None:
      names += ['supervised_loss', 'supervised_acc']
    with strategy.scope():
      self.global_step = optimizer.iterations
      self._metrics = {'train/' + n: _mean_metric('train/' + n) for n in names}
      # Per host loop; every replica holds the same values (they come from
      # the all-reduced check), written in the cross-replica context.
      agreed = dict(trainable=False,
                    synchronization=tf.VariableSynchronization.ON_WRITE,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      self._nonfinite_count = tf.Variable(
          tf.constant(0, tf.int64), name='nonfinite_count', **agreed)
      self._nonfinite_first_step = tf.Variable(
          tf.constant(0, tf.int64), name='nonfinite_first_step', **agreed)
      self._nonfinite_first_terms = tf.Variable(
          tf.zeros([len(NONFINITE_TERMS)], tf.bool),
          name='nonfinite_first_terms', **agreed)
    with tf.device('CPU:0'):
      self.stop_requested = tf.Variable(False, trainable=False,
                                        name='stop_requested')
    if isinstance(self.stop_requested, tf.distribute.DistributedValues):
      raise ValueError('Build the Trainer outside strategy.scope(): its '
                       'stop_requested must be a host variable that another '
                       'thread can set, not a mirrored one.')
    # The global step at which the current host loop began (set by
    # `train_loop_begin`; `PeriodicSummaryManager` reads it).
    self.loop_start_step = None
    super().__init__(
        train_dataset,
        options=orbit.StandardTrainerOptions(use_tf_while_loop=True))

  def train_loop_begin(self):
    self.loop_start_step = int(self.global_step.numpy())
    for metric in self._metrics.values():
      metric.reset_state()
    self._nonfinite_count.assign(0)
    self._nonfinite_first_step.assign(0)
    self._nonfinite_first_terms.assign(tf.zeros_like(
        self._nonfinite_first_terms))

  def nonfinite_report(self):
    """The last host loop's `NonFiniteReport`, or None when every step of
    it was finite."""
    count = int(self._nonfinite_count.numpy())
    if not count:
      return None
    bad = self._nonfinite_first_terms.numpy()
    return NonFiniteReport(
        first_step=int(self._nonfinite_first_step.numpy()),
        terms=tuple(n for n, b in zip(NONFINITE_TERMS, bad) if b),
        count=count)

  def create_train_loop_fn(self):
    """orbit's tf.while_loop over `train_step`, which with stop_within_loop
    also ends as soon as a stop is requested instead of running the rest of
    the loop as no-op steps (~0.1 ms each)."""
    if not self.stop_within_loop:
      return super().create_train_loop_fn()

    def loop_fn(iterator, num_steps):
      for _ in tf.range(num_steps):
        if self.stop_requested:
          break
        with tf.name_scope(''):  # as orbit's loop: no 'while/' op prefix
          self.train_step(iterator)

    return tf.function(loop_fn)

  def train_step(self, iterator):
    if not self.stop_within_loop:
      self._run_step(iterator)
      return
    # Cross-replica context: when a stop is requested the step neither
    # reads the iterator nor advances the global step.
    tf.cond(self.stop_requested, lambda: None,
            lambda: self._run_step(iterator))

  def _run_step(self, iterator):
    step_fn = self._step_fn
    if self.compiled_step is not None:
      # A plain replica function: strategies may unwrap a tf.function
      # handed to `run` to its Python function, dropping the compilation.
      step_fn = lambda batch: self.compiled_step(batch)  # pylint: disable=unnecessary-lambda
    nonfinite = self.strategy.run(step_fn, args=(next(iterator),))
    # The same all-reduced vector on every replica: take the first's.
    nonfinite = self.strategy.experimental_local_results(nonfinite)[0]
    any_bad = tf.reduce_any(nonfinite)
    first = tf.logical_and(any_bad, self._nonfinite_count == 0)
    step = tf.cast(self.optimizer.iterations, tf.int64)  # after this step
    self._nonfinite_first_step.assign(
        tf.where(first, step, self._nonfinite_first_step))
    self._nonfinite_first_terms.assign(
        tf.where(first, nonfinite, self._nonfinite_first_terms))
    self._nonfinite_count.assign_add(tf.cast(any_bad, tf.int64))

  def _state_variables(self):
    """What the forward pass may assign: BN moving statistics (model and
    momentum encoder) and the objective's state."""
    variables = list(self.model.non_trainable_variables)
    if self.momentum_encoder is not None:
      variables += self.momentum_encoder.non_trainable_variables
    if self.objective is not None:
      variables += list(self.objective.variables)
    unique = {}
    for v in variables:
      unique.setdefault(id(v), v)
    return list(unique.values())

  def _step_fn(self, batch):
    """One replica's step; returns the [len(NONFINITE_TERMS)] bool vector of
    terms that were not finite on some replica."""
    batch = data_util.finish_views(batch)  # --blur_on_device: blur here
    num_replicas = self.strategy.num_replicas_in_sync
    state = self._state_variables() if self.skip_nonfinite else []
    saved = [v.read_value() for v in state]
    keys = None
    if self.momentum_encoder is not None:
      keys = tf.stop_gradient(
          self.momentum_encoder(batch['image'], training=True))
    head_features = None
    if self.head_on_clean_views:  # no gradient: outside the tape
      head_features = self.model.head_features(batch['clean_image'])
    terms = {}
    with tf.GradientTape() as tape:
      if head_features is None:
        projections, logits = self.model(batch['image'], training=True)
      else:
        projections, _ = self.model(batch['image'], training=True,
                                    head_on_views=False)
        logits = self.model.supervised_logits(head_features, training=True)
      loss = tf.constant(0.0, self.loss_dtype)
      scalars = {}
      if self.train_mode == 'pretrain':
        if keys is None:
          contrast_loss, con_metrics = self.objective.loss(projections, batch)
        else:
          contrast_loss, con_metrics = self.objective.loss(
              projections, batch, keys=keys)
        contrast_loss = tf.cast(contrast_loss, self.loss_dtype)
        loss += contrast_loss
        scalars.update(con_metrics)
        terms['contrast_loss'] = contrast_loss
      if logits is not None:
        num_views = tf.shape(logits)[0] // tf.shape(batch['label'])[0]
        labels = tf.tile(batch['label'], [num_views])
        sup_loss = tf.cast(tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=logits)), self.loss_dtype)
        loss += sup_loss
        scalars['supervised_loss'] = sup_loss
        scalars['supervised_acc'] = tf.reduce_mean(tf.cast(
            tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
            tf.float32))
        terms['supervised_loss'] = sup_loss
      wd_loss = tf.cast(weight_decay_loss(
          self.model, self.optimizer_name, self.weight_decay,
          self.linear_head), self.loss_dtype)
      loss += wd_loss
      scalars['weight_decay'] = wd_loss
      scalars['loss'] = loss
      terms['weight_decay'] = wd_loss
      terms['loss'] = loss
      scaled_loss = loss / num_replicas
      if self.loss_scaled:
        scaled_loss = self.optimizer.get_scaled_loss(scaled_loss)
    variables = self.model.trainable_variables
    grads = tape.gradient(scaled_loss, variables)
    if self.loss_scaled:
      grads = self.optimizer.get_unscaled_gradients(grads)
    nonfinite = self._agreed_nonfinite(terms, grads)
    ok = tf.logical_not(tf.reduce_any(nonfinite))
    grads_and_vars = [(g, v) for g, v in zip(grads, variables)
                      if g is not None]
    if self.skip_nonfinite:
      for v, old in zip(state, saved):
        v.assign(tf.where(ok, v.read_value(), old))
      self._apply_if(ok, grads_and_vars)
      weight = tf.cast(ok, tf.float32)
      for name, value in scalars.items():
        self._metrics['train/' + name].update_state(
            tf.where(ok, value, tf.zeros_like(value)), sample_weight=weight)
    else:
      self._apply(grads_and_vars)
      for name, value in scalars.items():
        self._metrics['train/' + name].update_state(value)
    return nonfinite

  def _agreed_nonfinite(self, terms, grads):
    """[len(NONFINITE_TERMS)] bool: the term is not finite on some replica
    (a sum all-reduce of this replica's 0/1 vector)."""
    local = []
    for name in NONFINITE_TERMS:
      if name == 'gradients':
        finite = (tf.constant(True) if self.loss_scaled
                  else _all_finite(grads))
      else:  # a term this step does not have counts as finite
        finite = _all_finite([terms.get(name)])
      local.append(tf.logical_not(finite))
    local = tf.stack(local)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
      return local
    counts = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                tf.cast(local, tf.float32))
    return counts > 0

  def _apply(self, grads_and_vars):
    """The optimizer step (with a `linear_head`, the head's variables by
    its optimizer), then the momentum encoder's EMA (replica context)."""
    if self.linear_head is None:
      self.optimizer.apply_gradients(grads_and_vars)
    else:
      head = {id(v) for v in head_variables(self.model)}
      self.optimizer.apply_gradients(
          [(g, v) for g, v in grads_and_vars if id(v) not in head])
      self.linear_head.optimizer.apply_gradients(
          [(g, v) for g, v in grads_and_vars if id(v) in head])
    if self.momentum_encoder is not None:
      self.momentum_encoder.update_from(self.model,
                                        self.objective.momentum_decay)

  def _apply_if(self, ok, grads_and_vars):
    """`_apply` when `ok` (the same on every replica), else only the global
    step's increment. apply_gradients calls merge_call, which cannot sit in
    a cond in a replica context, so the cond runs in the cross-replica
    context, as in tf_keras' LossScaleOptimizer."""
    grads = [g for g, _ in grads_and_vars]
    variables = [v for _, v in grads_and_vars]

    def apply(grads):
      self._apply(list(zip(grads, variables)))

    def skip():
      for optimizer in self._optimizers():
        optimizer.iterations.assign_add(1, read_value=False)

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
      tf.cond(ok, lambda: apply(grads), skip)
      return

    def cross_replica(strategy, ok, grads):
      ok = strategy.experimental_local_results(ok)[0]
      tf.cond(ok, lambda: strategy.extended.call_for_each_replica(
          apply, args=(grads,)), skip)

    tf.distribute.get_replica_context().merge_call(cross_replica,
                                                   args=(ok, grads))

  def _optimizers(self):
    """The encoder's optimizer and, with a `linear_head`, the head's."""
    if self.linear_head is None:
      return [self.optimizer]
    return [self.optimizer, self.linear_head.optimizer]

  def train_loop_end(self):
    # A metric that saw no step (all skipped or stopped) reports NaN, not
    # the 0 of an empty Mean.
    results = {name: tf.where(m.count > 0, m.result(), float('nan'))
               for name, m in self._metrics.items()}
    results['train/nonfinite_steps'] = tf.convert_to_tensor(
        self._nonfinite_count)
    names = ['train/learning_rate', 'train/linear_head_learning_rate']
    for name, optimizer in zip(names, self._optimizers()):
      lr = optimizer.learning_rate
      if callable(lr):
        lr = lr(optimizer.iterations)
      # A value, not the optimizer's (mirrored) hyper-parameter variable.
      results[name] = tf.convert_to_tensor(lr)
    return results


class PeriodicSummaryManager(orbit.utils.SummaryManager):
  """orbit's summary manager, writing a host loop's scalars only when the
  loop reached a multiple of `period_steps` (--train_summary_steps).

  Rule: the outputs of the loop over steps (start, end] are written, at
  step end, when start // period < end // period, i.e. at the first loop
  boundary at or after each multiple of the period. Loops keep their length
  (orbit's `summary_interval` would only gate tf.summary calls inside the
  step, and needs loops that divide the period); a period shorter than a
  loop writes once per loop. `loop_start_step` is a callable giving start
  (`Trainer.loop_start_step`), so a resumed run keeps the rule.
  """

  def __init__(self, summary_dir, global_step, period_steps,
               loop_start_step):
    if period_steps < 1:
      raise ValueError(f'period_steps must be ≥ 1, got {period_steps}.')
    super().__init__(summary_dir, tf.summary.scalar, global_step=global_step)
    self.global_step = global_step
    self.period_steps = int(period_steps)
    self.loop_start_step = loop_start_step

  def is_due(self):
    """Whether the loop that just ended reached a multiple of the period
    (never before a first loop)."""
    start = self.loop_start_step()
    end = int(self.global_step.numpy())
    return (start is not None and
            start // self.period_steps < end // self.period_steps)

  def write_summaries(self, summary_dict):
    if self.is_due():
      super().write_summaries(summary_dict)


class Evaluator(orbit.StandardEvaluator):
  """Top-1 / top-5 accuracy of the supervised head on the eval split.

  Rows with id < 0 (the padding of `features.build_pass_input_fn`, which gives
  every replica whole batches) are not counted.
  """

  def __init__(self, strategy, model, eval_dataset, num_classes,
               optimizer_name='lars', weight_decay=0.0, linear_head=None):
    """`optimizer_name`, `weight_decay`, `linear_head`: as the Trainer's,
    for the 'regularization_loss' it reports (`weight_decay_loss`)."""
    self.strategy = strategy
    self.model = model
    self.optimizer_name = optimizer_name
    self.weight_decay = weight_decay
    self.linear_head = linear_head
    with strategy.scope():
      self.top_1 = tf_keras.metrics.SparseTopKCategoricalAccuracy(
          1, name='label_top_1_accuracy')
      self.top_5 = tf_keras.metrics.SparseTopKCategoricalAccuracy(
          min(5, num_classes), name='label_top_5_accuracy')
      self.regularization_loss = _mean_metric('regularization_loss')
      self.num_examples = tf_keras.metrics.Sum('num_examples')
    super().__init__(
        eval_dataset,
        options=orbit.StandardEvaluatorOptions(use_tf_while_loop=False))

  def eval_begin(self):
    for metric in self._all_metrics():
      metric.reset_state()

  def _all_metrics(self):
    return [self.top_1, self.top_5, self.regularization_loss,
            self.num_examples]

  def eval_step(self, iterator):

    def step_fn(batch):
      _, logits = self.model(batch['image'], training=False)
      # Padding rows (id < 0, `features.build_pass_input_fn`) weigh nothing.
      weight = tf.ones_like(batch['label'], tf.float32)
      if 'id' in batch:
        weight = tf.cast(batch['id'] >= 0, tf.float32)
      self.top_1.update_state(batch['label'], logits, sample_weight=weight)
      self.top_5.update_state(batch['label'], logits, sample_weight=weight)
      self.num_examples.update_state(tf.reduce_sum(weight))
      self.regularization_loss.update_state(weight_decay_loss(
          self.model, self.optimizer_name, self.weight_decay,
          self.linear_head))

    self.strategy.run(step_fn, args=(next(iterator),))

  def eval_end(self):
    return {m.name: m.result() for m in self._all_metrics()}
