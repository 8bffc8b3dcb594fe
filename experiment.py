"""An experiment assembled from an `config.ExperimentConfig` and a strategy.

`Experiment(config, strategy)` calls small builders, each usable on its own
(and in tests) without absl flags:

  build_data        the data source, example counts and number of classes
  build_objective   the registered objective (validated), pretraining only
  plan_steps        train steps, epoch, checkpoint and host-loop lengths
  build_model       ResNet + heads (and the momentum encoder when needed)
  build_optimizer   LARS / momentum / Adam with warm-up + cosine decay
  build_linear_head the linear head's own optimizer (--linear_head_optimizer)

and then owns what they make: the checkpoint (model, optimizer and every
piece of objective state), the orbit controller with its train actions
(progress line, kNN monitor, the objective's own), and train / evaluate /
export / preview.
"""

import errno
import math
import os
import tempfile
from typing import NamedTuple, Optional

from absl import logging
import numpy as np
import orbit
import tensorflow as tf
import tf_keras

import actions
import checkpoints
import config as config_lib
import data as data_lib
import data_util
import evaluate
import features
import guards
import lars_optimizer
import model as model_lib
import objective as obj_lib
import fnc  # noqa: F401  (registers fnc)
import ifnd  # noqa: F401  (registers ifnd)
import pictures
import sogcl  # noqa: F401  (registers sogclr)
import trainer as trainer_lib

ConfigError = config_lib.ConfigError


TRAINING_MODES = ('train', 'train_then_eval')


class ExperimentData(NamedTuple):
  source: data_lib.DataSource
  num_train_examples: int
  num_eval_examples: Optional[int]  # None when nothing evaluates
  num_classes: int


class StepPlan(NamedTuple):
  train_steps: int
  epoch_steps: int
  checkpoint_steps: int
  steps_per_loop: int
  knn_eval_steps: int  # 0: no kNN monitor


def build_data(cfg):
  """The data source of `cfg.data` and its counts; ConfigError if unusable."""
  data = cfg.data
  needs_eval = cfg.mode != 'train' or cfg.evaluation.knn_eval_epochs > 0
  try:
    source = data_lib.get_data_source(
        data.dataset, data_dir=data.data_dir, train_split=data.train_split,
        eval_split=data.eval_split if needs_eval else None,
        skip_corrupt_images=data.skip_corrupt_images)
    if data.train_subset:
      source = data_lib.apply_subset(source, data.train_split,
                                     data_lib.read_key_list(data.train_subset))
    num_train = source.num_examples(data.train_split)
    num_eval = (source.num_examples(data.eval_split)
                if cfg.mode != 'train' else None)
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise ConfigError(str(e)) from e
  num_classes = cfg.model.num_classes or source.num_classes
  if num_classes < source.num_classes:
    raise ConfigError(f'--num_classes={cfg.model.num_classes} is smaller '
                      f'than the {source.num_classes} classes of '
                      f'--dataset={data.dataset}.')
  if source.num_classes < 2 and needs_eval:
    raise ConfigError(
        f'--dataset={data.dataset} has {source.num_classes} class: '
        'accuracy needs at least 2. Add classes, or only pretrain: '
        '--mode=train --knn_eval_epochs=0.')
  if not data.skip_corrupt_images:
    splits = ([data.train_split] if cfg.mode != 'eval' else []) + (
        [data.eval_split] if needs_eval else [])
    for split in dict.fromkeys(splits):
      unreadable = source.find_unreadable(split)
      if unreadable:
        raise ConfigError(
            f'{len(unreadable)} unreadable image(s) in split {split} of '
            f'--dataset={data.dataset}: {", ".join(unreadable[:10])}. '
            'Remove or replace them, or pass --skip_corrupt_images to skip '
            '(and count) them.')
  if cfg.mode != 'eval' and data.train_batch_size > num_train:
    raise ConfigError(f'--train_batch_size={data.train_batch_size} exceeds '
                      f'the {num_train} examples of '
                      f'--train_split={data.train_split}.')
  return ExperimentData(source, num_train, num_eval, num_classes)


def build_objective(cfg, num_train_examples):
  """The validated objective of a pretraining run (None when fine-tuning)."""
  if cfg.train_mode != 'pretrain':
    return None
  try:
    cls = obj_lib.get_objective_class(cfg.objective_name)
    objective = cls.from_config(cfg.objective)
    objective.validate(cfg.data.train_batch_size, num_train_examples)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return objective


def epoch_steps(num_train_examples, global_batch_size):
  """Steps of one epoch, round(N / B) (at least 1), as the original run.py
  counts them for checkpoint_epochs and the periodic actions."""
  return max(1, int(round(num_train_examples / global_batch_size)))


def plan_steps(cfg, num_train_examples, objective=None):
  """Step arithmetic (SPEC §5): train steps, epoch, checkpoint and host-loop
  lengths.

  Periodic work (checkpoints, the kNN monitor, the objective's actions,
  summaries) runs at the first host-loop boundary at or after its due step,
  so loops need not divide the periods. --steps_per_loop, when given, is
  the loop length; unset, it is checkpoint_steps or the shortest period if
  that is shorter (so every period still gets its run). A loop shorter
  than a quarter of what was asked is logged with its reason.
  """
  schedule, batch = cfg.schedule, cfg.data.train_batch_size
  train_steps = lars_optimizer.get_train_steps(
      num_train_examples, schedule.train_epochs, batch, schedule.train_steps)
  epoch = epoch_steps(num_train_examples, batch)
  checkpoint_steps = (cfg.checkpoint.checkpoint_steps or
                      max(1, cfg.checkpoint.checkpoint_epochs * epoch))
  knn_epochs = cfg.evaluation.knn_eval_epochs
  periods = [(knn_epochs * epoch, f'--knn_eval_epochs={knn_epochs}')]
  if objective is not None:
    periods.append((objective.action_period_steps(epoch),
                    f'--objective={cfg.objective_name}'))
  requested = schedule.steps_per_loop or checkpoint_steps
  steps_per_loop, reason = requested, None
  for period, what in periods:
    if period and period < steps_per_loop:
      if schedule.steps_per_loop:
        logging.info('%s acts every %d steps; with --steps_per_loop=%d it '
                     'runs at the first loop boundary after each due step.',
                     what, period, requested)
      else:
        steps_per_loop, reason = period, f'{what} acts every {period} steps'
  if reason and steps_per_loop < requested / 4:
    logging.warning(
        'Host loops of %d steps, under a quarter of the %d of '
        '--checkpoint_steps, because %s; pass --steps_per_loop=%d to keep '
        'long loops (that work then runs at the first loop boundary after '
        'each due step).', steps_per_loop, requested, reason, requested)
  return StepPlan(train_steps=train_steps, epoch_steps=epoch,
                  checkpoint_steps=checkpoint_steps,
                  steps_per_loop=steps_per_loop,
                  knn_eval_steps=knn_epochs * epoch)


# The checkpoint key of float16's dynamic loss scale.
LOSS_SCALE_KEY = 'loss_scale'


def resolve_precision(cfg, strategy):
  """--precision, or its default: bfloat16 on TPU, float32 elsewhere."""
  if cfg.model.precision:
    return cfg.model.precision
  return 'bfloat16' if trainer_lib.is_tpu(strategy) else 'float32'


def build_model(cfg, num_classes, precision='float32'):
  """`model.Model` of `cfg.model` (call inside the strategy scope)."""
  m = cfg.model
  return model_lib.Model(
      num_classes, resnet_depth=m.resnet_depth,
      width_multiplier=m.width_multiplier,
      cifar_stem=cfg.data.image_size <= 32, sk_ratio=m.sk_ratio,
      se_ratio=m.se_ratio, proj_head_mode=m.proj_head_mode,
      proj_out_dim=m.proj_out_dim, num_proj_layers=m.num_proj_layers,
      ft_proj_selector=m.ft_proj_selector, train_mode=cfg.train_mode,
      lineareval_while_pretraining=m.lineareval_while_pretraining,
      fine_tune_after_block=m.fine_tune_after_block,
      batch_norm_decay=m.batch_norm_decay, global_bn=m.global_bn,
      precision=precision,
      linear_head_batch_norm=m.linear_head_batch_norm)


def build_optimizer(cfg, num_train_examples, train_steps, precision='float32'):
  """The optimizer of `cfg`; for float16 wrapped in Keras' dynamic loss
  scaling (`LossScaleOptimizer`: a step whose scaled gradients overflow is
  skipped and the scale halved)."""
  schedule = lars_optimizer.WarmUpAndCosineDecay(
      cfg.schedule.learning_rate, num_train_examples,
      cfg.data.train_batch_size, warmup_epochs=cfg.schedule.warmup_epochs,
      total_steps=train_steps,
      learning_rate_scaling=cfg.schedule.learning_rate_scaling)
  optimizer = lars_optimizer.build_optimizer(
      cfg.optimizer.name, schedule, momentum=cfg.optimizer.momentum,
      weight_decay=cfg.optimizer.weight_decay)
  if precision == 'float16':
    optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
  return optimizer


# The checkpoint key of the linear head's own optimizer.
LINEAR_HEAD_OPTIMIZER_KEY = 'linear_head_optimizer'


def build_linear_head(cfg, num_train_examples, train_steps):
  """The `trainer.LinearHead` of --linear_head_optimizer (call inside the
  strategy scope), or None when the encoder's optimizer trains the head
  (shared). Its learning rate: base --linear_head_learning_rate with
  --learning_rate_scaling, in the encoder's warm-up and cosine shape or
  constant (--linear_head_schedule); its decay is a loss term
  (`trainer.weight_decay_loss`)."""
  opt = cfg.optimizer
  if opt.linear_head_optimizer == config_lib.LINEAR_HEAD_SHARED:
    return None
  if opt.linear_head_schedule == 'constant':
    schedule = lars_optimizer.ConstantLearningRate(
        opt.linear_head_learning_rate, cfg.data.train_batch_size,
        learning_rate_scaling=cfg.schedule.learning_rate_scaling)
  else:
    schedule = lars_optimizer.WarmUpAndCosineDecay(
        opt.linear_head_learning_rate, num_train_examples,
        cfg.data.train_batch_size, warmup_epochs=cfg.schedule.warmup_epochs,
        total_steps=train_steps,
        learning_rate_scaling=cfg.schedule.learning_rate_scaling)
  optimizer = lars_optimizer.build_optimizer(
      opt.linear_head_optimizer, schedule, momentum=opt.momentum)
  return trainer_lib.LinearHead(optimizer, opt.linear_head_optimizer,
                                opt.linear_head_weight_decay)


def _inside(directory, name):
  """directory/name, or None without a directory (a non-chief worker)."""
  return os.path.join(directory, name) if directory else None


def _worker_count(strategy):
  resolver = getattr(strategy, 'cluster_resolver', None)
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or (
      resolver is None):
    return 1
  return max(1, len(resolver.cluster_spec().as_dict().get('worker', [])))


def is_disk_full(error):
  """Whether `error` (OSError or a TF error) says the disk is full."""
  return (getattr(error, 'errno', None) == errno.ENOSPC or
          'No space left on device' in str(error))


def disk_full_message(error, model_dir):
  latest = tf.train.latest_checkpoint(model_dir) if model_dir else None
  intact = (f'the latest complete checkpoint, {latest}, is intact'
            if latest else 'no checkpoint had been written yet')
  return (f'No space left on device while writing to --model_dir='
          f'{model_dir} ({str(error).splitlines()[0][:200]}); {intact}. '
          'Free some space and run the same command again to resume.')


def check_replicas(cfg, strategy):
  replicas = strategy.num_replicas_in_sync
  for name in ('train_batch_size', 'eval_batch_size'):
    value = getattr(cfg.data, name)
    if value % replicas:
      raise ConfigError(f'--{name}={value} is not divisible by the '
                        f'{replicas} replicas.')
  if cfg.distribution.jit_compile:
    try:
      trainer_lib.check_jit_compile(strategy)
    except ValueError as e:  # at start-up, before anything is written
      raise ConfigError(str(e)) from None


class Experiment:
  """Everything a run needs, built from `cfg`, ready for train / eval."""

  def __init__(self, cfg, strategy):
    self.config = cfg
    self.strategy = strategy
    # Only the chief writes into model_dir (checkpoints, export, summaries,
    # JSON); the other workers of a multi-worker run write their
    # checkpoints to a local temporary directory (`close` deletes it).
    self.is_chief = strategy.extended.should_checkpoint
    self.output_dir = cfg.checkpoint.model_dir if self.is_chief else None
    check_replicas(cfg, strategy)
    self.data = build_data(cfg)
    self.objective = build_objective(cfg, self.data.num_train_examples)
    self.num_views = self.objective.num_views if self.objective else 1
    # --linear_head_input=clean: the batches carry one clean view each.
    self.head_on_clean_views = cfg.model.linear_head_input == 'clean'
    self.steps = plan_steps(cfg, self.data.num_train_examples, self.objective)
    size = cfg.data.image_size
    dummy = tf.zeros([1, size, size, 3 * self.num_views])
    self.precision = resolve_precision(cfg, strategy)
    with strategy.scope():
      self.model = build_model(cfg, self.data.num_classes, self.precision)
      projections, _ = self.model(dummy, training=False)
      self.momentum_encoder = None
      if self.objective is not None and self.objective.uses_momentum_encoder:
        self.momentum_encoder = self.model.make_momentum_encoder()
        self.momentum_encoder(dummy, training=False)
      self.optimizer = build_optimizer(cfg, self.data.num_train_examples,
                                       self.steps.train_steps, self.precision)
      self.linear_head = build_linear_head(
          cfg, self.data.num_train_examples, self.steps.train_steps)
      state = {}
      if self.objective is not None:
        self.objective.build(
            self.data.num_train_examples, cfg.data.train_batch_size,
            None if projections is None else int(projections.shape[-1]))
        state = dict(self.objective.checkpoint_items())
      if self.momentum_encoder is not None:
        state['momentum_encoder'] = self.momentum_encoder
      if self.linear_head is not None:
        state[LINEAR_HEAD_OPTIMIZER_KEY] = self.linear_head.optimizer
      # The example order and augmentations derive from this seed and the
      # step (data.build_input_fn), so a resumed run continues its epoch.
      self.input_seed = tf.Variable(
          cfg.seed if cfg.seed is not None else
          int(np.random.SeedSequence().generate_state(1)[0] >> 1),
          dtype=tf.int64, trainable=False, name='input_seed')
      self.nonfinite_skipped = tf.Variable(0, dtype=tf.int64,
                                           trainable=False,
                                           name='nonfinite_skipped')
      # The optimizer's keys are the same in every precision; float16 adds
      # its dynamic loss scale (the LossScaleOptimizer's own trackable: the
      # wrapper itself would save the slots twice), so a run can resume in
      # another precision of the same variable dtype.
      if isinstance(self.optimizer,
                    tf_keras.mixed_precision.LossScaleOptimizer):
        state[LOSS_SCALE_KEY] = self.optimizer._loss_scale  # pylint: disable=protected-access
      self.checkpoint = tf.train.Checkpoint(
          model=self.model,
          optimizer=getattr(self.optimizer, 'inner_optimizer',
                            self.optimizer),
          input_seed=self.input_seed,
          nonfinite_skipped=self.nonfinite_skipped, **state)
    self.global_step = self.optimizer.iterations
    self.multi_worker = _worker_count(strategy) > 1
    if cfg.deterministic and self.randaugment() is not None:
      raise ConfigError(
          '--deterministic cannot replay RandAugment (Model Garden draws its '
          'operations from stateful random ops); pass '
          '--use_randaugment=false with --deterministic.')
    self.check_run_identity()
    self.checkpoint_manager = self._checkpoint_manager()
    self.actions = []  # the train actions of the last controller
    self.trainer = None
    self.knn_monitor = None  # its evaluate.KnnMonitor (--knn_eval_epochs)
    self.preemption_guard = None

  # --- The model_dir. ---

  def check_run_identity(self):
    """Refuses to resume a model_dir whose flags.json differs in a flag
    of `config.IDENTITY_FLAGS` (unless --allow_flag_changes); logs the
    other differences."""
    cfg = self.config
    model_dir = cfg.checkpoint.model_dir
    saved = checkpoints.read_json(os.path.join(model_dir, 'flags.json'))
    if (cfg.mode not in TRAINING_MODES or saved is None or
        cfg.flag_values is None or
        not tf.train.latest_checkpoint(model_dir)):
      return
    errors, warnings = checkpoints.compare_run_flags(
        saved, cfg.flag_values, config_lib.IDENTITY_FLAGS)
    for warning in warnings:
      logging.warning('Flag changed since the run that wrote %s: %s',
                      model_dir, warning)
    if errors and not cfg.checkpoint.allow_flag_changes:
      raise ConfigError(
          f'--model_dir={model_dir} holds the checkpoints of a run with '
          'other flags:\n  ' + '\n  '.join(errors) + '\n  Use another '
          '--model_dir, the flags of that run, or --allow_flag_changes to '
          'resume anyway.')
    for error in errors:
      logging.warning('--allow_flag_changes: resuming despite %s', error)

  def prepare_model_dir(self):
    """Creates model_dir and checks that it is writable, removes the
    temporaries of interrupted writes and writes flags.json (the chief;
    before anything else is written)."""
    model_dir = self.config.checkpoint.model_dir
    try:
      tf.io.gfile.makedirs(model_dir)
      if self.is_chief:
        probe = os.path.join(model_dir, '.write_test')
        with tf.io.gfile.GFile(probe, 'w') as f:
          f.write('ok')
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
      if is_disk_full(e):
        raise
      raise ConfigError(f'--model_dir={model_dir} is not writable ({e}); '
                        'pass a directory you can write to.') from e
    if not self.is_chief:
      return
    for path in checkpoints.remove_stale_temporaries(model_dir):
      logging.info('Removed %s (left by an interrupted write).', path)
    name = 'flags.json'
    if (self.config.mode not in TRAINING_MODES and
        tf.io.gfile.exists(os.path.join(model_dir, name))):
      name = f'flags_{self.config.mode}.json'  # the trainer's stays
    # The command line's flags; a config built in code writes itself.
    checkpoints.write_json(os.path.join(model_dir, name),
                           self.config.flag_values or self.config.to_json())

  # --- Checkpoints. ---

  def _checkpoint_manager(self):
    """The manager of model_dir, after checking that what it holds (or the
    warm-start checkpoint) fits: the newest intact checkpoint (a corrupt
    newer one is named and skipped) must hold every object of this run
    with its shape."""
    ckpt = self.config.checkpoint
    restore_path, problems = checkpoints.find_intact_checkpoint(
        ckpt.model_dir)
    for problem in problems:
      logging.warning('Unreadable checkpoint: %s', problem)
    if problems and restore_path is None:
      raise ConfigError(
          f'Every checkpoint in --model_dir={ckpt.model_dir} is unreadable: '
          + '; '.join(problems) + '. Move them away to start afresh, or use '
          'another --model_dir.')
    try:
      if restore_path:
        checkpoints.check_resume_fits_all(self.checkpoint, restore_path,
                                          optional=(LOSS_SCALE_KEY,))
      elif ckpt.checkpoint:
        checkpoints.check_warm_start_fits(
            self.model, checkpoints.resolve_checkpoint_path(ckpt.checkpoint),
            ckpt.variable_schema,
            require_backbone=self.config.train_mode == 'finetune')
    except checkpoints.CheckpointMismatchError as e:
      raise ConfigError(str(e)) from e
    if not restore_path and self.config.mode == 'eval':
      logging.info('No checkpoint in %s yet; eval waits for one.',
                   ckpt.model_dir)
    self.restore_path = restore_path
    directory, init_fn = ckpt.model_dir, self.initialize_new_run
    if not self.is_chief:
      directory = tempfile.mkdtemp(prefix='worker_checkpoints_')
      init_fn = self._restore_chiefs_latest
      restore_path = None
    return checkpoints.FallbackCheckpointManager(
        self.checkpoint, directory=directory,
        max_to_keep=ckpt.keep_checkpoint_max, step_counter=self.global_step,
        checkpoint_interval=self.steps.checkpoint_steps, init_fn=init_fn,
        restore_path=restore_path)

  def _restore_chiefs_latest(self):
    """A non-chief worker resumes from model_dir (its own checkpoints are
    throw-away), or starts a new run like the chief."""
    latest = self.restore_path
    if latest:
      self.checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info('Restored %s (written by the chief).', latest)
    else:
      self.initialize_new_run()

  def close(self):
    """Deletes a non-chief worker's temporary checkpoint directory."""
    directory = self.checkpoint_manager.directory
    if not self.is_chief and tf.io.gfile.exists(directory):
      tf.io.gfile.rmtree(directory)

  def initialize_new_run(self):
    """Warm start and head zeroing, for a run with no checkpoint yet."""
    ckpt = self.config.checkpoint
    if ckpt.checkpoint:
      checkpoints.warm_start(
          self.model, checkpoints.resolve_checkpoint_path(ckpt.checkpoint),
          ckpt.variable_schema,
          require_backbone=self.config.train_mode == 'finetune')
    if (self.config.model.zero_init_logits_layer and
        self.model.supervised_head is not None):
      for variable in self.model.supervised_head.trainable_variables:
        variable.assign(tf.zeros_like(variable))
      logging.info('Zero-initialised the supervised head.')
    if self.momentum_encoder is not None:
      # After the warm start: the EMA twin starts equal to the online net.
      self.momentum_encoder.copy_from(self.model)
      logging.info('Momentum encoder initialised from the model.')

  # --- Data. ---

  def randaugment(self):
    """Model Garden RandAugment (n=2, m=7) when on, else None.

    Its translate (100 px) and cutout (40 px) constants are meant for
    224-pixel images; they are scaled by image_size/224 (e.g. 14 and 6 px at
    32), so that a view keeps the same fraction of the image as in FNC.
    """
    use = self.config.data.use_randaugment
    if self.objective is None:
      return None
    if use is None:
      use = self.objective.default_randaugment
    if not use:
      return None
    scale = self.config.data.image_size / 224.0
    return data_util.make_randaugment(
        2, 7, translate_const=max(1, round(100 * scale)),
        cutout_const=max(1, round(40 * scale)))

  def view_args(self):
    """The arguments of the training views (`data.train_view_fn`), shared
    by the training input and the preview."""
    data = self.config.data
    return dict(image_size=data.image_size, num_views=self.num_views,
                train_mode=self.config.train_mode,
                color_jitter_strength=data.color_jitter_strength,
                use_blur=data.use_blur, crop_area_min=data.crop_area_min,
                seed=int(self.input_seed.numpy()),
                randaugment=self.randaugment(),
                blur_on_device=data.blur_on_device,
                clean_view=self.head_on_clean_views)

  def train_input_fn(self, batch_size, start_step=0):
    """Augmented training batches of train_split (`num_views` views),
    from the batch of step `start_step` on."""
    data = self.config.data
    return data_lib.build_input_fn(
        self.data.source, data.train_split, batch_size, is_training=True,
        cache_dataset=data.cache_dataset, start_step=start_step,
        input_threads=data.input_threads,
        input_ram_budget_gb=data.input_ram_budget_gb, **self.view_args())

  def pass_dataset_fn(self, split):
    """() -> one distributed pass over `split` (eval preprocessing, padded
    to whole global batches; consumers drop the rows with id −1)."""
    data = self.config.data
    return features.pass_dataset_fn(self.strategy, self.data.source, split,
                                    data.eval_batch_size, data.image_size)

  def preview_batch(self):
    """The training views of (at most) 8 examples of train_split, as the
    model sees them (`data.preview_batch`: reads only those examples)."""
    data = self.config.data
    return data_lib.preview_batch(
        self.data.source, data.train_split, min(8, data.train_batch_size),
        **self.view_args())['image']

  # --- Train actions and controller. ---

  def train_actions(self):
    """Progress line, kNN monitor (--knn_eval_epochs) and the objective's
    own actions, in that order."""
    cfg, steps = self.config, self.steps
    train_actions = [actions.ProgressLogger(
        self.global_step, steps.train_steps, cfg.data.train_batch_size)]
    # Before any other work of the loop: a non-finite loss must stop the
    # run before orbit checkpoints it, a preemption must not wait for a kNN
    # pass.
    if self.trainer is not None:
      train_actions.append(guards.NonFiniteGuard(
          self.trainer, cfg.schedule.skip_nonfinite_steps,
          self.nonfinite_skipped))
      self.preemption_guard = guards.PreemptionGuard(
          self.strategy, self.global_step, self.checkpoint_manager,
          stop_variable=(None if self.multi_worker else
                         self.trainer.stop_requested),
          multi_worker=self.multi_worker)
      train_actions.append(self.preemption_guard)
    output_dir = self.output_dir
    if steps.knn_eval_steps:
      self.knn_monitor = evaluate.KnnMonitor(
          self.model, self.global_step,
          self.pass_dataset_fn(cfg.data.train_split),
          self.pass_dataset_fn(cfg.data.eval_split), steps.knn_eval_steps,
          steps_per_epoch=steps.epoch_steps, k=cfg.evaluation.knn_k,
          temperature=cfg.evaluation.knn_temperature,
          num_classes=self.data.num_classes, strategy=self.strategy,
          history_path=_inside(output_dir, 'knn_monitor.json'),
          summary_dir=_inside(output_dir, 'knn'), final_step=steps.train_steps)
      train_actions.append(self.knn_monitor)
    if self.objective is not None:
      train_actions.extend(self.objective.train_actions(self.train_context()))
    return train_actions

  def train_context(self):
    """What the objective's train actions may use (objective.TrainContext)."""
    if self.momentum_encoder is not None:
      key_encoder = tf.function(
          lambda images: self.momentum_encoder(images, training=False))
    else:
      key_encoder = tf.function(
          lambda images: self.model(images, training=False)[0])
    return obj_lib.TrainContext(
        strategy=self.strategy, global_step=self.global_step,
        train_steps=self.steps.train_steps,
        steps_per_epoch=self.steps.epoch_steps, key_encoder=key_encoder,
        train_pass=self.pass_dataset_fn(self.config.data.train_split),
        output_dir=self.output_dir)

  def controller(self, with_trainer, with_evaluator):
    cfg = self.config
    trainer = evaluator = None
    train_actions = []
    if with_trainer:
      # The input starts at the restored step (data.build_input_fn).
      self.checkpoint_manager.restore_or_initialize()
      trainer = trainer_lib.Trainer(
          self.strategy, self.model, self.optimizer, self.objective,
          self.strategy.distribute_datasets_from_function(
              self.train_input_fn(cfg.data.train_batch_size,
                                  start_step=int(self.global_step.numpy()))),
          train_mode=cfg.train_mode, optimizer_name=cfg.optimizer.name,
          weight_decay=cfg.optimizer.weight_decay,
          momentum_encoder=self.momentum_encoder,
          skip_nonfinite=cfg.schedule.skip_nonfinite_steps > 0,
          stop_within_loop=not self.multi_worker,
          jit_compile=cfg.distribution.jit_compile,
          linear_head=self.linear_head,
          head_on_clean_views=self.head_on_clean_views)
      self.trainer = trainer
      train_actions = self.train_actions()
    self.actions = train_actions
    if with_evaluator:
      evaluator = trainer_lib.Evaluator(
          self.strategy, self.model,
          self.pass_dataset_fn(cfg.data.eval_split)(), self.data.num_classes,
          optimizer_name=cfg.optimizer.name,
          weight_decay=cfg.optimizer.weight_decay,
          linear_head=self.linear_head)
    # Training scalars: every host loop (--train_summary_steps unset), none
    # (0), or at the first loop boundary at or after each multiple of it.
    summary_steps = cfg.schedule.train_summary_steps
    output_dir = self.output_dir
    summary_dir = output_dir if summary_steps != 0 and with_trainer else None
    summary_manager = None
    if summary_steps and with_trainer:
      summary_manager = trainer_lib.PeriodicSummaryManager(
          summary_dir, self.global_step, summary_steps,
          loop_start_step=lambda: trainer.loop_start_step)
    eval_name = cfg.evaluation.eval_name
    return orbit.Controller(
        strategy=self.strategy, trainer=trainer, evaluator=evaluator,
        global_step=self.global_step,
        steps_per_loop=self.steps.steps_per_loop if with_trainer else None,
        checkpoint_manager=self.checkpoint_manager,
        summary_dir=summary_dir, summary_manager=summary_manager,
        eval_summary_dir=_inside(
            output_dir, 'eval_' + eval_name if eval_name else 'eval'),
        train_actions=train_actions)

  # --- Modes. ---

  def train(self, controller):
    """Trains up to train_steps (from the last checkpoint), then exports."""
    cfg = self.config
    step = int(self.global_step.numpy())
    if step >= self.steps.train_steps:
      logging.info('model_dir already holds step %d ≥ train_steps %d.',
                   step, self.steps.train_steps)
      export_dir = os.path.join(cfg.checkpoint.model_dir, 'saved_model',
                                str(step))
      if (self.is_chief and cfg.checkpoint.export_format != 'none' and
          not tf.io.gfile.exists(export_dir)):
        logging.info('Its export is missing (interrupted?); exporting.')
        self.export()
      return
    if cfg.schedule.train_summary_steps != 0 and self.is_chief:
      pictures.summarize_view_grid(self.preview_batch(), self.num_views,
                                   self.output_dir, step)
    logging.info('Training %s (%s) from step %d to %d: %d examples, global '
                 'batch %d, %d replica(s).', cfg.objective_name,
                 cfg.train_mode, step, self.steps.train_steps,
                 self.data.num_train_examples, cfg.data.train_batch_size,
                 self.strategy.num_replicas_in_sync)
    # Last to start: the progress clock, after any work due at start (a
    # stale IFND re-clustering).
    for action in reversed(self.actions):
      if hasattr(action, 'start'):
        action.start()
    self.preemption_guard.install()
    try:
      controller.train(steps=self.steps.train_steps)
    except tf.errors.InvalidArgumentError as e:
      uncompilable = (cfg.distribution.jit_compile and
                      trainer_lib.uncompilable_step_message(e))
      if uncompilable:  # at the first step, before any checkpoint
        raise ConfigError(uncompilable) from e
      split = cfg.data.train_split
      unreadable = self.data.source.find_unreadable(split)
      if unreadable:
        raise ConfigError(
            f'{len(unreadable)} unreadable image(s) in --train_split='
            f'{split}: {", ".join(unreadable[:10])}. Remove or replace '
            'them, or pass --skip_corrupt_images to skip them.') from e
      raise
    finally:
      self.preemption_guard.uninstall()
    logging.info('Trained to step %d; state digest %s.',
                 int(self.global_step.numpy()), self.state_digest())
    self.export()

  def state_digest(self):
    """{checkpointed object: float64 sum of all its values}: equal on every
    worker of a multi-worker run when their states agree (logged at the end
    of training)."""
    objects = {'model': self.model}
    if self.objective is not None:
      objects.update(self.objective.checkpoint_items())
    if self.momentum_encoder is not None:
      objects['momentum_encoder'] = self.momentum_encoder
    def values(obj):
      return [obj] if isinstance(obj, tf.Variable) else obj.variables
    return {name: repr(float(sum(np.sum(v.numpy().astype(np.float64))
                                 for v in values(objects[name]))))
            for name in sorted(objects)}

  def export(self):
    """SavedModel of the current weights in model_dir/saved_model/<step>,
    with the interfaces of --export_format (none: no export)."""
    ckpt = self.config.checkpoint
    if ckpt.export_format == 'none':
      logging.info('No SavedModel export (--export_format=none).')
      return None
    # Every worker saves (as Model Garden does); a non-chief one into a
    # temporary directory that it deletes.
    root = ckpt.model_dir if self.is_chief else tempfile.mkdtemp(
        prefix='worker_export_')
    try:
      return checkpoints.export_saved_model(
          self.model, root, int(self.global_step.numpy()),
          ckpt.keep_hub_module_max, export_format=ckpt.export_format)
    finally:
      if not self.is_chief:
        tf.io.gfile.rmtree(root)

  def evaluate(self, controller, with_knn=False):
    """Evaluates the current weights; writes result.json, result_<step>.json
    and flags.json. `with_knn` (the end of a pretraining run): also the
    final encoder's kNN (`final_knn`), printed next to the head's accuracy
    and kept in the results as knn_top_1_accuracy / knn_top_5_accuracy."""
    cfg = self.config
    # The pass's own length, not -1 (to its end, which TF logs as an abort).
    outputs = controller.evaluate(
        steps=cfg.evaluation.eval_steps or
        features.pass_steps(controller.evaluator.eval_dataset, self.strategy))
    step = int(self.global_step.numpy())
    result = {k: float(v) for k, v in outputs.items()}
    result['global_step'] = step
    expected = self.data.num_eval_examples
    if not cfg.evaluation.eval_steps and result['num_examples'] != expected:
      raise RuntimeError(
          f'The eval pass scored {int(result["num_examples"])} of the '
          f'{expected} examples of --eval_split={cfg.data.eval_split}; '
          'every example must be scored once (input sharding bug).')
    knn = self.final_knn() if with_knn else None
    if knn is not None:
      result.update(knn_top_1_accuracy=knn['top_1'],
                    knn_top_5_accuracy=knn['top_5'], knn_k=knn['k'],
                    knn_temperature=knn['temperature'])
    logging.info('Eval at step %d: %s', step, result)
    if self.is_chief:
      model_dir = cfg.checkpoint.model_dir
      for name in ('result.json', f'result_{step}.json'):
        checkpoints.write_json(os.path.join(model_dir, name), result)
    head = ('linear head trained alongside (not a linear evaluation)'
            if cfg.train_mode == 'pretrain' else 'fine-tuned classifier')
    knn_text = (f'; kNN (k={knn["k"]}, τ={knn["temperature"]:g}) of the '
                f'final encoder: top-1 {knn["top_1"]:.4f}, top-5 '
                f'{knn["top_5"]:.4f}' if knn is not None else '')
    print(f'Eval at step {step} ({int(result["num_examples"])} examples of '
          f'{cfg.data.eval_split}): {head}: top-1 '
          f'{result["label_top_1_accuracy"]:.4f}, top-5 '
          f'{result["label_top_5_accuracy"]:.4f}{knn_text}.')
    return result

  def final_knn(self):
    """The kNN result (`evaluate.KnnProbe`, the monitor's protocol and
    --knn_k / --knn_temperature) of the current weights, for the end of a
    pretraining run: the monitor's record of this step when it scored it in
    this process (it always scores train_steps), else one pass now. None
    when not pretraining."""
    if self.objective is None:
      return None
    step = int(self.global_step.numpy())
    if self.knn_monitor is not None:
      record = self.knn_monitor.scored.get(step)
      if record is not None:
        return record
    cfg = self.config
    return evaluate.KnnProbe(
        self.model, self.pass_dataset_fn(cfg.data.train_split),
        self.pass_dataset_fn(cfg.data.eval_split), k=cfg.evaluation.knn_k,
        temperature=cfg.evaluation.knn_temperature,
        num_classes=self.data.num_classes, strategy=self.strategy)()

  def preview(self):
    """model_dir/preview.png: augmented training views, one row per image."""
    path = os.path.join(self.config.checkpoint.model_dir, 'preview.png')
    pictures.save_view_grid(self.preview_batch(), self.num_views, path)
    print(f'Wrote {path} (one row per image, its {self.num_views} '
          'augmented views side by side).')
    return path
