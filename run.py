r"""Contrastive pretraining, linear evaluation and fine-tuning.

  python run.py --flagfile=configs/quickstart.cfg           # embedded digits
  python run.py --dataset=cifar10 --data_dir=... --model_dir=...

Flags keep the names, meanings and defaults of the original SimCLR TF2
run.py, plus the FNC / SogCLR compatibility flags (see README.md). A flag
combination that cannot work stops the run at start-up, before any data is
read or anything is written, with a message that names the flags.
"""

import json
import math
import os
import sys

from absl import app
from absl import flags
from absl import logging
import orbit
import tensorflow as tf
import tf_keras

import checkpoints
import data as data_lib
import data_util
import evaluate as evaluate_lib
import lars_optimizer
import model as model_lib
import objective as obj_lib
import fnc  # noqa: F401  (registers --objective=fnc)
import ifnd  # noqa: F401  (registers --objective=ifnd)
import sogcl  # noqa: F401  (registers --objective=sogclr)
import trainer as trainer_lib
from official.common import distribute_utils

FLAGS = flags.FLAGS

# --- The original SimCLR TF2 flags (names, meanings and defaults kept). ---
flags.DEFINE_float('learning_rate', 0.3,
                   'Initial learning rate per batch size of 256.')
flags.DEFINE_enum('learning_rate_scaling', 'linear', ['linear', 'sqrt'],
                  'How to scale the learning rate with the batch size: '
                  'lr·B/256 (linear) or lr·sqrt(B) (sqrt).')
flags.DEFINE_float('warmup_epochs', 10, 'Number of epochs of warm-up.')
flags.DEFINE_float('weight_decay', 1e-6, 'Amount of weight decay to use.')
flags.DEFINE_float('batch_norm_decay', 0.9, 'Batch norm decay parameter.')
flags.DEFINE_integer('train_batch_size', 512, 'Global batch size for training.')
flags.DEFINE_string('train_split', 'train', 'Split for training.')
flags.DEFINE_integer('train_epochs', 100, 'Number of epochs to train for.')
flags.DEFINE_integer('train_steps', 0, 'Number of steps to train for. If '
                     'provided, overrides train_epochs.')
flags.DEFINE_integer('eval_steps', 0, 'Number of steps to eval for. If not '
                     'provided, evals over the entire split.')
flags.DEFINE_integer('eval_batch_size', 256, 'Global batch size for eval.')
flags.DEFINE_integer('checkpoint_epochs', 1,
                     'Number of epochs between checkpoints/summaries.')
flags.DEFINE_integer('checkpoint_steps', 0, 'Number of steps between '
                     'checkpoints/summaries. If provided, overrides '
                     'checkpoint_epochs.')
flags.DEFINE_string('eval_split', 'validation', 'Split for evaluation.')
flags.DEFINE_string('dataset', 'imagenet2012',
                    'A TFDS dataset name, a folder of images laid out '
                    '<split>/<class>/*.jpg, or "digits" (embedded, no '
                    'download).')
flags.DEFINE_bool('cache_dataset', False,
                  'Whether to cache the entire dataset in memory.')
flags.DEFINE_enum('mode', 'train',
                  ['train', 'eval', 'train_then_eval', 'preview'],
                  'Whether to perform training or evaluation (eval watches '
                  'model_dir for new checkpoints); preview writes a PNG of '
                  'augmented training views to model_dir/preview.png.')
flags.DEFINE_enum('train_mode', 'pretrain', ['pretrain', 'finetune'],
                  'The train mode controls different objectives and trainable '
                  'components.')
flags.DEFINE_bool('lineareval_while_pretraining', True,
                  'Whether to train the supervised head (on stop-gradient '
                  'features) while pretraining.')
flags.DEFINE_string('checkpoint', None,
                    'Warm-start the model from this checkpoint (prefix or '
                    'directory) if model_dir holds no checkpoint yet. Only '
                    'model variables matched by --variable_schema are read.')
flags.DEFINE_bool('zero_init_logits_layer', False,
                  'Zero-initialise the supervised head when starting a run.')
flags.DEFINE_integer('fine_tune_after_block', -1,
                     'Freeze blocks up to this one when fine-tuning: -1 '
                     'trains everything, 0 freezes the stem, 4 trains only '
                     'the head (linear eval).')
flags.DEFINE_string('master', None, 'Address of the TensorFlow master (TPU).')
flags.DEFINE_string('model_dir', None, 'Model directory for training.')
flags.DEFINE_string('data_dir', None, 'Directory where the TFDS dataset is.')
flags.DEFINE_bool('use_tpu', None, 'Whether to run on TPU. Unset: detect '
                  '(TPU if configured, else all local GPUs, else the CPU).')
flags.DEFINE_string('tpu_name', None, 'The Cloud TPU to use.')
flags.DEFINE_string('tpu_zone', None, '[Optional] GCE zone of the Cloud TPU.')
flags.DEFINE_string('gcp_project', None, '[Optional] GCP project of the TPU.')
flags.DEFINE_enum('optimizer', 'lars', ['momentum', 'adam', 'lars'],
                  'Optimizer to use.')
flags.DEFINE_float('momentum', 0.9, 'Momentum parameter.')
flags.DEFINE_string('eval_name', None, 'Name of this evaluation: summaries '
                    'go to model_dir/eval_<name> instead of model_dir/eval.')
flags.DEFINE_integer('keep_checkpoint_max', 5,
                     'Maximum number of checkpoints to keep.')
flags.DEFINE_integer('keep_hub_module_max', 1,
                     'Maximum number of exported SavedModels to keep.')
flags.DEFINE_float('temperature', 0.1,
                   'Temperature parameter for contrastive loss.')
flags.DEFINE_boolean('hidden_norm', True,
                     'Whether to l2-normalise projections in the loss.')
flags.DEFINE_enum('proj_head_mode', 'nonlinear',
                  ['none', 'linear', 'nonlinear'],
                  'How the head projection is done.')
flags.DEFINE_integer('proj_out_dim', 128, 'Projection output dimension.')
flags.DEFINE_integer('num_proj_layers', 3, 'Number of non-linear head layers.')
flags.DEFINE_integer('ft_proj_selector', 0,
                     'Which layer of the projection head to use during '
                     'fine-tuning: 0 = no projection head, -1 = the last.')
flags.DEFINE_boolean('global_bn', True,
                     'Whether to aggregate BN statistics across replicas.')
flags.DEFINE_float('width_multiplier', 1,
                   'Multiplier of the ResNet width (fractions give thinner '
                   'nets, e.g. 0.25 for CPU smoke tests).')
flags.DEFINE_integer('resnet_depth', 50, 'Depth of ResNet.')
flags.DEFINE_float('sk_ratio', 0.,
                   'If it is bigger than 0, it will enable SK. '
                   'Recommendation: 0.0625.')
flags.DEFINE_float('se_ratio', 0., 'If it is bigger than 0, it will enable SE.')
flags.DEFINE_integer('image_size', 224, 'Input image size (≤ 32 selects the '
                     'CIFAR stem and no eval crop).')
flags.DEFINE_float('color_jitter_strength', 1.0,
                   'The strength of color jittering.')
flags.DEFINE_boolean('use_blur', True, 'Whether or not to use Gaussian blur '
                     'for augmentation during pretraining.')

# --- TF1 / FNC names. ---
flags.DEFINE_string('variable_schema', '?!global_step',
                    'Regex (re.match) of the model variables to restore from '
                    '--checkpoint; e.g. '
                    "'(?!global_step|(?:.*/|^)Momentum|head)' restores the "
                    'backbone only.')
flags.DEFINE_integer('train_summary_steps', None,
                     'Training summary period in steps; 0 = off; unset = '
                     'once per host loop (steps_per_loop).')

# --- SogCLR ---
flags.DEFINE_bool('DCL_mode', False, 'SogCLR: train with the dynamic '
                  'contrastive loss (the same as --objective=sogclr).')
flags.DEFINE_bool('GCL_mode', None, 'Older name of --DCL_mode.')
flags.DEFINE_bool('BI_mode', None, 'Older name of --DCL_mode.')
flags.DEFINE_float('gamma', 0.99, 'SogCLR: weight of the current batch in '
                   'the moving average u of each example (the README recipe '
                   'uses 0.9).')
flags.DEFINE_enum('dcl_u_store', 'sum', ['sum', 'mean'],
                  'SogCLR: what is stored in u[i] after a step: u_a + u_b '
                  '(sum, the paper code; needs gamma > 0.5) or their mean '
                  '(the later PyTorch / LibAUC code).')
flags.DEFINE_float('crop_area_min', 0.08,
                   'The min value of random cropped region.')
flags.DEFINE_integer('num_classes', 0, 'Number of classes of the supervised '
                     'head; 0 = from the dataset.')

# --- FNC ---
flags.DEFINE_integer('support_size', 8, 'FNC: extra views (support set) per '
                     'image; V = 2 + support_size views.')
flags.DEFINE_bool('use_randaugment', None, 'RandAugment (n=2, m=7) in the '
                  'pretraining views, after colour jitter. Unset: the '
                  "objective's default (on for fnc, off otherwise).")
flags.DEFINE_integer('memory_multiplier', None, 'FNC / IFND: memory queue '
                     'of memory_multiplier x train_batch_size momentum-'
                     'encoder keys; 0 = in-batch mode (no queue, no '
                     'momentum encoder). Must be 0 or >= the views per '
                     'image. Unset: the objective\'s default (16 for fnc, 0 '
                     'for ifnd).')
flags.DEFINE_float('moving_average_decay', 0.999, 'FNC / IFND memory mode: EMA '
                   'decay d of the momentum encoder, w <- d*w + (1-d)*w_online '
                   'after every step.')
flags.DEFINE_integer('fn_topk', 10, 'FNC: false negatives are among the '
                     'top-k scoring candidates of each image ...')
flags.DEFINE_float('fn_threshold', 0.7, 'FNC: ... and score (max cosine '
                   'over the image\'s views) above this threshold.')
flags.DEFINE_enum('fn_strategy', 'attraction', ['attraction', 'elimination'],
                  'FNC: pull false negatives in as positives (attraction, '
                  'the released code) or drop them from the negatives '
                  '(elimination).')

# --- IFND ---
flags.DEFINE_list('ifnd_num_clusters', ['10', '30', '100'], 'IFND: one '
                  'k-means per entry (a level of pseudo labels), e.g. '
                  '10,30,100 for CIFAR-10, 100,300,1000 for CIFAR-100.')
flags.DEFINE_integer('ifnd_reassign_epochs', 20, 'IFND: re-cluster the '
                     'training set every this many epochs (and at the start).')
flags.DEFINE_enum('ifnd_acceptance', 'linear', ['linear', 'constant', 'step'],
                  'IFND acceptance-rate schedule over training: linear from '
                  '0 to 1, constant --ifnd_acceptance_rate, or step '
                  '(--ifnd_acceptance_stages equal stages from 0 to 1).')
flags.DEFINE_float('ifnd_acceptance_rate', 1.0, 'IFND: the rate of '
                   '--ifnd_acceptance=constant.')
flags.DEFINE_integer('ifnd_acceptance_stages', 5, 'IFND: stages of '
                     '--ifnd_acceptance=step (r = stage/(stages-1)).')
flags.DEFINE_enum('ifnd_confidence', 'centroid', ['centroid', 'margin'],
                  'IFND confidence of a pseudo label: cosine to the own '
                  'centroid, or its margin over the second-nearest centroid.')
flags.DEFINE_enum('ifnd_strategy', 'elimination', ['elimination',
                                                   'attraction'],
                  'IFND: drop same-label examples from the negatives '
                  '(elimination, the paper) or pull them in as positives.')
flags.DEFINE_enum('ifnd_level_combine', 'mean', ['mean', 'any'],
                  'IFND: average the per-level losses (mean) or use one '
                  'loss with the union of the levels\' false negatives.')
flags.DEFINE_integer('ifnd_kmeans_iters', 100, 'IFND: at most this many '
                     'Lloyd iterations per k-means.')

# --- New. ---
flags.DEFINE_string('objective', 'simclr', 'The contrastive objective.')
flags.DEFINE_integer('steps_per_loop', 0,
                     'Training steps per host loop (progress line, '
                     'summaries). 0: checkpoint_steps, or its gcd with '
                     'train_summary_steps.')
flags.DEFINE_string('distribution_strategy', None,
                    'Override the detected strategy: tpu, mirrored, '
                    'multi_worker_mirrored or one_device.')
flags.DEFINE_bool('skip_corrupt_images', False,
                  'Image folders: skip (and count) unreadable files instead '
                  'of stopping with an error that names them.')
flags.DEFINE_integer('seed', None, 'Random seed for shuffling and '
                     'initialisation (unset: nondeterministic).')

# --- Evaluation protocols (evaluate.py). ---
flags.DEFINE_string('train_subset', None, 'A file listing the keys of the '
                    'training examples to use, one per line (e.g. a 1 % '
                    'label subset from imagenet_subsets/); the examples are '
                    're-indexed 0..n-1.')
flags.DEFINE_integer('knn_eval_epochs', 0, 'Every this many epochs of '
                     'training, the kNN accuracy of the current encoder on '
                     '--eval_split goes to TensorBoard and the log; 0 = off.')
flags.DEFINE_integer('knn_k', 200, 'Neighbours of the weighted kNN vote.')
flags.DEFINE_float('knn_temperature', 0.1, 'Temperature of the weighted kNN '
                   'vote: weights exp(cosine/temperature).')


class ConfigError(ValueError):
  """A setting that cannot work; reported without a traceback."""


def projection_layer_count():
  return {'none': 0, 'linear': 1,
          'nonlinear': FLAGS.num_proj_layers}[FLAGS.proj_head_mode]


def _flag_given(name):
  """Whether flag `name` was passed (command line, flagfile or assignment)."""
  flag = FLAGS[name]
  return bool(flag.present) or flag.value != flag.default


def map_legacy_switches():
  """Maps SogCLR's --DCL_mode (older names --GCL_mode, --BI_mode) onto
  --objective and checks the SogCLR-era flags; returns error messages.

  A switch set to true turns the default --objective=simclr into sogclr; a
  contradiction (another --objective, or the names disagreeing, or an
  explicit false next to --objective=sogclr) is an error naming both flags.
  """
  errors = []
  given = {name: FLAGS[name].value
           for name in ('DCL_mode', 'GCL_mode', 'BI_mode')
           if _flag_given(name) and FLAGS[name].value is not None}
  if len(set(given.values())) > 1:
    errors.append(' contradicts '.join(
        f'--{name}={str(value).lower()}' for name, value in given.items()) +
                  ' (they are names of the same switch).')
  elif given:
    name, value = next(iter(given.items()))
    if value and not _flag_given('objective'):
      FLAGS.objective = 'sogclr'
    elif value and FLAGS.objective != 'sogclr':
      errors.append(f'--{name}=true selects --objective=sogclr but '
                    f'--objective={FLAGS.objective}; pass only one of them.')
    elif not value and FLAGS.objective == 'sogclr':
      errors.append(f'--{name}=false contradicts --objective=sogclr.')
  if not 0.0 < FLAGS.crop_area_min <= 1.0:
    errors.append(f'--crop_area_min={FLAGS.crop_area_min} must be in (0, 1].')
  if FLAGS.num_classes < 0:
    errors.append('--num_classes must not be negative (0 = from the '
                  'dataset).')
  return errors


def validate_flags():
  """Rejects flag combinations that cannot work, naming the flags."""
  errors = map_legacy_switches()
  if not FLAGS.model_dir:
    errors.append('--model_dir is required (checkpoints, summaries and '
                  'results are written there).')
  for name in ('train_batch_size', 'eval_batch_size', 'image_size',
               'checkpoint_epochs', 'proj_out_dim'):
    if getattr(FLAGS, name) <= 0:
      errors.append(f'--{name} must be positive.')
  for name in ('train_epochs', 'train_steps', 'eval_steps',
               'checkpoint_steps', 'steps_per_loop', 'keep_checkpoint_max'):
    if getattr(FLAGS, name) < 0:
      errors.append(f'--{name} must not be negative.')
  if FLAGS.train_steps == 0 and FLAGS.train_epochs == 0 and FLAGS.mode != 'eval':
    errors.append('--train_epochs=0 and --train_steps=0: nothing to train.')
  if FLAGS.width_multiplier <= 0:
    errors.append('--width_multiplier must be positive.')
  if FLAGS.temperature <= 0:
    errors.append('--temperature must be positive.')
  if not -1 <= FLAGS.fine_tune_after_block <= 4:
    errors.append('--fine_tune_after_block must be in -1..4.')
  elif FLAGS.fine_tune_after_block > -1 and FLAGS.train_mode != 'finetune':
    errors.append('--fine_tune_after_block freezes blocks only when '
                  '--train_mode=finetune; pretraining trains every block '
                  '(use --fine_tune_after_block=-1).')
  if FLAGS.proj_head_mode == 'nonlinear' and FLAGS.num_proj_layers < 1:
    errors.append('--proj_head_mode=nonlinear needs --num_proj_layers ≥ 1.')
  layers = projection_layer_count()
  if not -1 <= FLAGS.ft_proj_selector <= layers:
    errors.append(f'--ft_proj_selector={FLAGS.ft_proj_selector} but the '
                  f'projection head (--proj_head_mode={FLAGS.proj_head_mode}'
                  f', --num_proj_layers={FLAGS.num_proj_layers}) has '
                  f'{layers} layers: use -1..{layers}.')
  if (FLAGS.mode in ('eval', 'train_then_eval') and
      FLAGS.train_mode == 'pretrain' and
      not FLAGS.lineareval_while_pretraining):
    errors.append(f'--mode={FLAGS.mode} evaluates the supervised head, which '
                  'pretraining only trains with '
                  '--lineareval_while_pretraining=true (or use '
                  '--train_mode=finetune, or --mode=train).')
  if (FLAGS.train_summary_steps and FLAGS.steps_per_loop and
      FLAGS.train_summary_steps % FLAGS.steps_per_loop):
    errors.append(f'--train_summary_steps={FLAGS.train_summary_steps} must '
                  f'be a multiple of --steps_per_loop={FLAGS.steps_per_loop}.')
  if FLAGS.train_summary_steps is not None and FLAGS.train_summary_steps < 0:
    errors.append('--train_summary_steps must not be negative.')
  if FLAGS.knn_eval_epochs < 0:
    errors.append('--knn_eval_epochs must not be negative (0 = off).')
  if FLAGS.knn_k < 1:
    errors.append('--knn_k must be at least 1.')
  if FLAGS.knn_temperature <= 0:
    errors.append('--knn_temperature must be positive.')
  if FLAGS.train_subset and not tf.io.gfile.exists(FLAGS.train_subset):
    errors.append(f'--train_subset={FLAGS.train_subset}: no such file.')
  if FLAGS.use_tpu is False and FLAGS.distribution_strategy == 'tpu':
    errors.append('--use_tpu=false contradicts --distribution_strategy=tpu.')
  if FLAGS.use_tpu and FLAGS.distribution_strategy not in (None, 'tpu'):
    errors.append(f'--use_tpu contradicts --distribution_strategy='
                  f'{FLAGS.distribution_strategy}.')
  try:
    obj_lib.get_objective_class(FLAGS.objective)
  except ValueError as e:
    errors.append(str(e))
  try:
    checkpoints.compile_schema(FLAGS.variable_schema)
  except ValueError as e:
    errors.append(str(e))
  if FLAGS.checkpoint:
    try:
      checkpoints.resolve_checkpoint_path(FLAGS.checkpoint)
    except FileNotFoundError as e:
      errors.append(str(e))
  if errors:
    raise ConfigError('\n  '.join(['invalid flags:'] + errors))


def build_strategy():
  """The strategy from the flags; detected when --use_tpu is unset."""
  name = FLAGS.distribution_strategy
  tpu_address = FLAGS.tpu_name or FLAGS.master or os.environ.get('TPU_NAME')
  num_gpus = len(tf.config.list_physical_devices('GPU'))
  if name is None:
    if FLAGS.use_tpu or (FLAGS.use_tpu is None and tpu_address):
      name = 'tpu'
    elif FLAGS.use_tpu is None and tf.config.list_physical_devices('TPU'):
      name, tpu_address = 'tpu', 'local'
    elif num_gpus:
      name = 'mirrored'
    else:
      name = 'one_device'
  if name == 'tpu' and (FLAGS.tpu_zone or FLAGS.gcp_project):
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=tpu_address, zone=FLAGS.tpu_zone, project=FLAGS.gcp_project)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  return distribute_utils.get_distribution_strategy(
      distribution_strategy=name, num_gpus=num_gpus,
      tpu_address=tpu_address or '')


def build_objective():
  cls = obj_lib.get_objective_class(FLAGS.objective)
  return cls(**{name: getattr(FLAGS, name) for name in cls.flag_names})


def build_model(num_classes):
  return model_lib.Model(
      num_classes,
      resnet_depth=FLAGS.resnet_depth,
      width_multiplier=FLAGS.width_multiplier,
      cifar_stem=FLAGS.image_size <= 32,
      sk_ratio=FLAGS.sk_ratio,
      se_ratio=FLAGS.se_ratio,
      proj_head_mode=FLAGS.proj_head_mode,
      proj_out_dim=FLAGS.proj_out_dim,
      num_proj_layers=FLAGS.num_proj_layers,
      ft_proj_selector=FLAGS.ft_proj_selector,
      train_mode=FLAGS.train_mode,
      lineareval_while_pretraining=FLAGS.lineareval_while_pretraining,
      fine_tune_after_block=FLAGS.fine_tune_after_block,
      batch_norm_decay=FLAGS.batch_norm_decay,
      global_bn=FLAGS.global_bn)


def json_flags():
  """The flag values that JSON can hold."""
  values = {}
  for key, val in FLAGS.flag_values_dict().items():
    try:
      json.dumps(val)
    except TypeError:
      continue
    values[key] = val
  return values


def write_view_grid(input_fn, num_views, summary_dir, step):
  """TensorBoard image grid of augmented views: one row per image."""
  batch = next(iter(input_fn(None)))
  images = batch['image']
  rows = [tf.concat(tf.split(image, num_views, axis=-1), axis=1)
          for image in tf.unstack(images)]
  grid = tf.concat(rows, axis=0)[tf.newaxis]
  writer = tf.summary.create_file_writer(summary_dir)
  with writer.as_default():
    tf.summary.image('augmented_views', grid, step=step)
  writer.flush()


class Experiment:
  """Everything built from the flags, ready for train / eval."""

  def __init__(self, strategy):
    self.strategy = strategy
    num_replicas = strategy.num_replicas_in_sync
    for name in ('train_batch_size', 'eval_batch_size'):
      if getattr(FLAGS, name) % num_replicas:
        raise ConfigError(f'--{name}={getattr(FLAGS, name)} is not divisible'
                          f' by the {num_replicas} replicas.')
    try:
      self.source = data_lib.get_data_source(
          FLAGS.dataset, data_dir=FLAGS.data_dir,
          train_split=FLAGS.train_split,
          eval_split=(None if FLAGS.mode == 'train' and
                      not FLAGS.knn_eval_epochs else FLAGS.eval_split),
          skip_corrupt_images=FLAGS.skip_corrupt_images)
      if FLAGS.train_subset:
        self.source = data_lib.apply_subset(
            self.source, FLAGS.train_split,
            data_lib.read_key_list(FLAGS.train_subset))
      self.num_train_examples = self.source.num_examples(FLAGS.train_split)
      if FLAGS.mode != 'train':
        self.num_eval_examples = self.source.num_examples(FLAGS.eval_split)
    except (ValueError, FileNotFoundError, KeyError) as e:
      raise ConfigError(str(e)) from e
    self.num_classes = FLAGS.num_classes or self.source.num_classes
    if self.num_classes < self.source.num_classes:
      raise ConfigError(f'--num_classes={FLAGS.num_classes} is smaller than '
                        f'the {self.source.num_classes} classes of '
                        f'--dataset={FLAGS.dataset}.')
    batch = FLAGS.train_batch_size
    if FLAGS.mode != 'eval' and batch > self.num_train_examples:
      raise ConfigError(f'--train_batch_size={batch} exceeds the '
                        f'{self.num_train_examples} examples of '
                        f'--train_split={FLAGS.train_split}.')
    self.train_steps = lars_optimizer.get_train_steps(
        self.num_train_examples, FLAGS.train_epochs, batch, FLAGS.train_steps)
    epoch_steps = max(1, int(round(self.num_train_examples / batch)))
    self.checkpoint_steps = (FLAGS.checkpoint_steps or
                             max(1, FLAGS.checkpoint_epochs * epoch_steps))
    self.steps_per_loop = FLAGS.steps_per_loop or self.checkpoint_steps
    if FLAGS.train_summary_steps and not FLAGS.steps_per_loop:
      self.steps_per_loop = math.gcd(self.checkpoint_steps,
                                     FLAGS.train_summary_steps)
    self.epoch_steps = epoch_steps
    self.knn_eval_steps = FLAGS.knn_eval_epochs * epoch_steps
    self.fit_steps_per_loop(self.knn_eval_steps,
                            f'--knn_eval_epochs={FLAGS.knn_eval_epochs}')

    self.objective = build_objective()
    self.objective_action_steps = 0
    if FLAGS.train_mode == 'pretrain':
      try:
        self.objective.validate(batch, self.num_train_examples)
      except ValueError as e:
        raise ConfigError(str(e)) from e
      self.num_views = self.objective.num_views
      self.objective_action_steps = self.objective.action_period_steps(
          epoch_steps)
      self.fit_steps_per_loop(self.objective_action_steps,
                              f'--objective={FLAGS.objective}')
    else:
      self.num_views = 1

    with strategy.scope():
      self.model = build_model(self.num_classes)
      projections, _ = self.model(tf.zeros(
          [1, FLAGS.image_size, FLAGS.image_size, 3 * self.num_views]),
                                  training=False)
      self.momentum_encoder = None
      if (FLAGS.train_mode == 'pretrain' and
          self.objective.uses_momentum_encoder):
        self.momentum_encoder = self.model.make_momentum_encoder()
        self.momentum_encoder(tf.zeros(
            [1, FLAGS.image_size, FLAGS.image_size, 3 * self.num_views]),
                              training=False)
      schedule = lars_optimizer.WarmUpAndCosineDecay(
          FLAGS.learning_rate, self.num_train_examples, batch,
          warmup_epochs=FLAGS.warmup_epochs, total_steps=self.train_steps,
          learning_rate_scaling=FLAGS.learning_rate_scaling)
      self.optimizer = lars_optimizer.build_optimizer(
          FLAGS.optimizer, schedule, momentum=FLAGS.momentum,
          weight_decay=FLAGS.weight_decay)
      self.global_step = self.optimizer.iterations
      if FLAGS.train_mode == 'pretrain':
        if projections is not None:
          self.objective.projection_dim = int(projections.shape[-1])
        self.objective.build(self.num_train_examples, batch)
      extra = {}
      if self.momentum_encoder is not None:
        extra['momentum_encoder'] = self.momentum_encoder
      self.checkpoint = tf.train.Checkpoint(
          model=self.model, optimizer=self.optimizer,
          **self.objective.checkpoint_items(), **extra)

    latest = tf.train.latest_checkpoint(FLAGS.model_dir)
    try:
      if latest:
        checkpoints.check_resume_fits(self.model, latest)
      elif FLAGS.checkpoint:
        checkpoints.check_warm_start_fits(
            self.model, checkpoints.resolve_checkpoint_path(FLAGS.checkpoint),
            FLAGS.variable_schema)
    except checkpoints.CheckpointMismatchError as e:
      raise ConfigError(str(e)) from e
    if not latest and FLAGS.mode == 'eval':
      logging.info('No checkpoint in %s yet; eval waits for one.',
                   FLAGS.model_dir)
    self.checkpoint_manager = tf.train.CheckpointManager(
        self.checkpoint, directory=FLAGS.model_dir,
        max_to_keep=FLAGS.keep_checkpoint_max, step_counter=self.global_step,
        checkpoint_interval=self.checkpoint_steps,
        init_fn=self.initialize_new_run)

  def fit_steps_per_loop(self, period, what):
    """Makes host loops end on every multiple of `period` steps (0 = no
    period): reduces the derived steps_per_loop, or checks the flag's."""
    if not period:
      return
    if not FLAGS.steps_per_loop:
      self.steps_per_loop = math.gcd(self.steps_per_loop, period)
    elif period % FLAGS.steps_per_loop:
      raise ConfigError(f'{what} acts every {period} steps, not a multiple '
                        f'of --steps_per_loop={FLAGS.steps_per_loop}.')

  def initialize_new_run(self):
    """Warm start and head zeroing, for a run with no checkpoint yet."""
    if FLAGS.checkpoint:
      path = checkpoints.resolve_checkpoint_path(FLAGS.checkpoint)
      checkpoints.warm_start(self.model, path, FLAGS.variable_schema)
    if FLAGS.zero_init_logits_layer and self.model.supervised_head is not None:
      for variable in self.model.supervised_head.trainable_variables:
        variable.assign(tf.zeros_like(variable))
      logging.info('Zero-initialised the supervised head.')
    if self.momentum_encoder is not None:
      # After the warm start: the EMA twin starts equal to the online net.
      self.momentum_encoder.copy_from(self.model)
      logging.info('Momentum encoder initialised from the model.')

  def randaugment(self):
    """Model Garden RandAugment (n=2, m=7) when on, else None.

    Its translate (100 px) and cutout (40 px) constants are meant for
    224-pixel images; they are scaled by image_size/224 (e.g. 14 and 6 px at
    32), so that a view keeps the same fraction of the image as in FNC.
    """
    use = FLAGS.use_randaugment
    if use is None:
      use = self.objective.default_randaugment
    if not use or FLAGS.train_mode != 'pretrain':
      return None
    scale = FLAGS.image_size / 224.0
    return data_util.make_randaugment(
        2, 7, translate_const=max(1, round(100 * scale)),
        cutout_const=max(1, round(40 * scale)))

  def train_input_fn(self, batch_size):
    """Augmented training batches of train_split (`num_views` views)."""
    return data_lib.build_input_fn(
        self.source, FLAGS.train_split, batch_size, is_training=True,
        image_size=FLAGS.image_size, num_views=self.num_views,
        train_mode=FLAGS.train_mode,
        color_jitter_strength=FLAGS.color_jitter_strength,
        use_blur=FLAGS.use_blur, cache_dataset=FLAGS.cache_dataset,
        crop_area_min=FLAGS.crop_area_min, seed=FLAGS.seed,
        randaugment=self.randaugment())

  def pass_dataset_fn(self, split):
    """() -> one distributed pass over `split` (eval preprocessing, padded
    to whole global batches; consumers drop the rows with id −1)."""
    input_fn = data_lib.build_pass_input_fn(
        self.source, split, FLAGS.eval_batch_size, FLAGS.image_size)
    return lambda: self.strategy.distribute_datasets_from_function(input_fn)

  def make_knn_monitor(self):
    """The --knn_eval_epochs train action (evaluate.KnnMonitor)."""
    return evaluate_lib.KnnMonitor(
        self.model, self.global_step, self.pass_dataset_fn(FLAGS.train_split),
        self.pass_dataset_fn(FLAGS.eval_split), self.knn_eval_steps,
        steps_per_epoch=self.epoch_steps, k=FLAGS.knn_k,
        temperature=FLAGS.knn_temperature, num_classes=self.num_classes,
        summary_dir=os.path.join(FLAGS.model_dir, 'knn'),
        strategy=self.strategy,
        history_path=os.path.join(FLAGS.model_dir, 'knn_monitor.json'))

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
        train_steps=self.train_steps, steps_per_epoch=self.epoch_steps,
        key_encoder=key_encoder,
        train_pass_dataset_fn=self.pass_dataset_fn(FLAGS.train_split),
        model_dir=FLAGS.model_dir)

  def controller(self, with_trainer, with_evaluator):
    trainer = evaluator = None
    actions = []
    if with_trainer:
      trainer = trainer_lib.Trainer(
          self.strategy, self.model, self.optimizer, self.objective,
          self.strategy.distribute_datasets_from_function(
              self.train_input_fn(FLAGS.train_batch_size)),
          train_mode=FLAGS.train_mode, optimizer_name=FLAGS.optimizer,
          weight_decay=FLAGS.weight_decay,
          momentum_encoder=self.momentum_encoder)
      self.progress = trainer_lib.ProgressLogger(
          self.global_step, self.train_steps, FLAGS.train_batch_size)
      actions.append(self.progress)
      self.knn_monitor = None
      if self.knn_eval_steps:
        self.knn_monitor = self.make_knn_monitor()
        actions.append(self.knn_monitor)
      if FLAGS.train_mode == 'pretrain':
        actions.extend(self.objective.train_actions(self.train_context()))
    self.train_actions = actions
    if with_evaluator:
      evaluator = trainer_lib.Evaluator(
          self.strategy, self.model,
          self.pass_dataset_fn(FLAGS.eval_split)(), self.num_classes,
          optimizer_name=FLAGS.optimizer, weight_decay=FLAGS.weight_decay)
    summaries_on = FLAGS.train_summary_steps != 0
    eval_dir = 'eval_' + FLAGS.eval_name if FLAGS.eval_name else 'eval'
    return orbit.Controller(
        strategy=self.strategy, trainer=trainer, evaluator=evaluator,
        global_step=self.global_step,
        steps_per_loop=self.steps_per_loop if with_trainer else None,
        checkpoint_manager=self.checkpoint_manager,
        summary_dir=FLAGS.model_dir if summaries_on and with_trainer else None,
        summary_interval=FLAGS.train_summary_steps or None,
        eval_summary_dir=os.path.join(FLAGS.model_dir, eval_dir),
        train_actions=actions)

  def train(self, controller):
    step = int(self.global_step.numpy())
    if step >= self.train_steps:
      logging.info('model_dir already holds step %d ≥ train_steps %d.',
                   step, self.train_steps)
      return
    if FLAGS.train_summary_steps != 0:
      preview = self.train_input_fn(min(8, FLAGS.train_batch_size))
      write_view_grid(preview, self.num_views, FLAGS.model_dir, step)
    logging.info('Training %s (%s) from step %d to %d: %d examples, global '
                 'batch %d, %d replica(s).', FLAGS.objective,
                 FLAGS.train_mode, step, self.train_steps,
                 self.num_train_examples, FLAGS.train_batch_size,
                 self.strategy.num_replicas_in_sync)
    for action in self.train_actions:  # e.g. a due re-clustering
      if action is not self.progress and hasattr(action, 'start'):
        action.start()
    self.progress.start()
    try:
      controller.train(steps=self.train_steps)
    except tf.errors.InvalidArgumentError as e:
      unreadable = self.source.find_unreadable(FLAGS.train_split)
      if unreadable:
        raise ConfigError(
            f'{len(unreadable)} unreadable image(s) in --train_split='
            f'{FLAGS.train_split}: {", ".join(unreadable[:10])}. Remove or '
            'replace them, or pass --skip_corrupt_images to skip them.'
        ) from e
      raise
    checkpoints.export_saved_model(
        self.model, FLAGS.model_dir, self.global_step.numpy(),
        FLAGS.keep_hub_module_max)

  def evaluate(self, controller):
    """Evaluates the current weights; writes result.json and flags.json."""
    outputs = controller.evaluate(steps=FLAGS.eval_steps or -1)
    step = int(self.global_step.numpy())
    result = {k: float(v) for k, v in outputs.items()}
    result['global_step'] = step
    logging.info('Eval at step %d: %s', step, result)
    checkpoints.write_json(os.path.join(FLAGS.model_dir, 'result.json'), result)
    checkpoints.write_json(os.path.join(FLAGS.model_dir, f'result_{step}.json'), result)
    checkpoints.write_json(os.path.join(FLAGS.model_dir, 'flags.json'), json_flags())
    print(f'Eval at step {step}: top-1 accuracy '
          f'{result["label_top_1_accuracy"]:.4f}, top-5 accuracy '
          f'{result["label_top_5_accuracy"]:.4f} '
          f'({int(result["num_examples"])} examples of '
          f'{FLAGS.eval_split}).')
    return result


def run(strategy=None):
  """Builds the experiment from the flags and runs --mode."""
  validate_flags()
  strategy = strategy or build_strategy()
  experiment = Experiment(strategy)
  tf.io.gfile.makedirs(FLAGS.model_dir)
  if FLAGS.mode == 'preview':
    path = evaluate_lib.save_view_grid(
        experiment.train_input_fn(min(8, FLAGS.train_batch_size))(None),
        experiment.num_views, os.path.join(FLAGS.model_dir, 'preview.png'))
    print(f'Wrote {path} (one row per image, its {experiment.num_views} '
          'augmented views side by side).')
    return path
  if FLAGS.mode == 'train':
    experiment.train(experiment.controller(True, False))
    return None
  if FLAGS.mode == 'train_then_eval':
    controller = experiment.controller(True, True)
    experiment.train(controller)
    return experiment.evaluate(controller)
  controller = experiment.controller(False, True)
  result = None
  for path in tf.train.checkpoints_iterator(FLAGS.model_dir,
                                            min_interval_secs=15):
    controller.restore_checkpoint(path)
    result = experiment.evaluate(controller)
    checkpoints.export_saved_model(
        experiment.model, FLAGS.model_dir, result['global_step'],
        FLAGS.keep_hub_module_max)
    if result['global_step'] >= experiment.train_steps:
      logging.info('Eval reached train_steps; exiting.')
      break
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.seed is not None:
    tf_keras.utils.set_random_seed(FLAGS.seed)
  try:
    run()
  except ConfigError as e:
    logging.error('%s', e)
    sys.exit(f'run.py: error: {e}')


if __name__ == '__main__':
  app.run(main)
