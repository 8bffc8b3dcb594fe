"""Orbit trainer and evaluator (the loops `run.py` hands to orbit.Controller),
and the summary manager that writes the training scalars every
--train_summary_steps.

The trainer runs one optimisation step per batch on every replica:
contrastive loss from the objective (pretraining), cross-entropy of the
supervised head (linear eval while pretraining, or fine-tuning) and the
explicit weight-decay term; the sum is divided by the number of replicas
because gradients are summed across replicas (SPEC §4).
"""

import orbit
import tensorflow as tf
import tf_keras

import lars_optimizer


def _mean_metric(name):
  return tf_keras.metrics.Mean(name)


class Trainer(orbit.StandardTrainer):
  """Pretraining / fine-tuning step on a distributed dataset."""

  def __init__(self, strategy, model, optimizer, objective, train_dataset,
               train_mode='pretrain', optimizer_name='lars',
               weight_decay=0.0, momentum_encoder=None):
    """`momentum_encoder` (a `model.MomentumEncoder`, pretraining only):
    its projections of each batch go to `objective.loss` as `keys`, and it
    is EMA-updated from the model after every optimizer step."""
    self.strategy = strategy
    self.model = model
    self.momentum_encoder = momentum_encoder
    self.optimizer = optimizer
    self.objective = objective
    self.train_mode = train_mode
    self.optimizer_name = optimizer_name
    self.weight_decay = weight_decay
    names = ['loss', 'weight_decay']
    if train_mode == 'pretrain':
      names += list(objective.metric_names)
    if model.supervised_head is not None:
      names += ['supervised_loss', 'supervised_acc']
    with strategy.scope():
      self.global_step = optimizer.iterations
      self._metrics = {'train/' + n: _mean_metric('train/' + n) for n in names}
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

  def train_step(self, iterator):
    num_replicas = self.strategy.num_replicas_in_sync

    def step_fn(batch):
      keys = None
      if self.momentum_encoder is not None:
        keys = tf.stop_gradient(
            self.momentum_encoder(batch['image'], training=True))
      with tf.GradientTape() as tape:
        projections, logits = self.model(batch['image'], training=True)
        loss = 0.0
        scalars = {}
        if self.train_mode == 'pretrain':
          if keys is None:
            contrast_loss, con_metrics = self.objective.loss(
                projections, batch)
          else:
            contrast_loss, con_metrics = self.objective.loss(
                projections, batch, keys=keys)
          loss += contrast_loss
          scalars.update(con_metrics)
        if logits is not None:
          num_views = tf.shape(logits)[0] // tf.shape(batch['label'])[0]
          labels = tf.tile(batch['label'], [num_views])
          sup_loss = tf.reduce_mean(
              tf.nn.sparse_softmax_cross_entropy_with_logits(
                  labels=labels, logits=logits))
          loss += sup_loss
          scalars['supervised_loss'] = sup_loss
          scalars['supervised_acc'] = tf.reduce_mean(tf.cast(
              tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
              tf.float32))
        wd_loss = lars_optimizer.weight_decay_loss(
            self.model.trainable_variables, self.optimizer_name,
            self.weight_decay)
        loss += wd_loss
        scalars['weight_decay'] = wd_loss
        scalars['loss'] = loss
        scaled_loss = loss / num_replicas
      variables = self.model.trainable_variables
      grads = tape.gradient(scaled_loss, variables)
      self.optimizer.apply_gradients(zip(grads, variables))
      if self.momentum_encoder is not None:
        self.momentum_encoder.update_from(self.model,
                                          self.objective.momentum_decay)
      for name, value in scalars.items():
        self._metrics['train/' + name].update_state(value)

    self.strategy.run(step_fn, args=(next(iterator),))

  def train_loop_end(self):
    results = {name: m.result() for name, m in self._metrics.items()}
    lr = self.optimizer.learning_rate
    if callable(lr):
      lr = lr(self.optimizer.iterations)
    # A value, not the optimizer's (mirrored) hyper-parameter variable.
    results['train/learning_rate'] = tf.convert_to_tensor(lr)
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
               optimizer_name='lars', weight_decay=0.0):
    self.strategy = strategy
    self.model = model
    self.optimizer_name = optimizer_name
    self.weight_decay = weight_decay
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
      self.regularization_loss.update_state(
          lars_optimizer.weight_decay_loss(
              self.model.trainable_variables, self.optimizer_name,
              self.weight_decay))

    self.strategy.run(step_fn, args=(next(iterator),))

  def eval_end(self):
    return {m.name: m.result() for m in self._all_metrics()}
