"""Every flag, their validation, and the typed configuration built from them.

This is the only module (besides the command-line entry points run.py and
evaluate.py) that touches absl flags. `from_flags()` turns parsed flags into
one immutable `ExperimentConfig`: a frozen dataclass per concern (data,
model, optimizer, schedule, checkpointing, evaluation, distribution) and one
per objective, whose field names are the objective's own constructor
arguments (`Objective.from_config`). Library code receives these configs,
never flags; tests build them directly (`ExperimentConfig(...)`,
`dataclasses.replace`) or from an argv list (`from_argv`) without touching
the process-wide FLAGS.

Flags keep the names, meanings and defaults of the original SimCLR TF2
run.py, plus the FNC / SogCLR compatibility flags (SPEC §2). A combination
that cannot work is rejected by `validate_flags` with a message naming the
flags, before any data is read.
"""

import dataclasses
import functools
import json
from typing import Optional, Tuple

from absl import flags
import tensorflow as tf

import checkpoints

FLAGS = flags.FLAGS

# --linear_head_optimizer: 'shared' trains the linear head with the encoder's
# optimizer (the original); the others are the head's own optimizer
# (lars_optimizer.build_optimizer names).
LINEAR_HEAD_SHARED = 'shared'
LINEAR_HEAD_OPTIMIZERS = (LINEAR_HEAD_SHARED, 'momentum', 'adam')
# --linear_head_input: what that head is trained on ('views': the original).
LINEAR_HEAD_INPUTS = ('views', 'clean')
# --linear_head_schedule: the shape of its own optimizer's learning rate.
LINEAR_HEAD_SCHEDULES = ('cosine', 'constant')


class ConfigError(ValueError):
  """A setting that cannot work; reported without a traceback."""


# ---------------------------------------------------------------------------
# Flag definitions.
# ---------------------------------------------------------------------------


def define_flags(flag_values=FLAGS):
  """Defines run.py's flags on `flag_values` (once)."""
  if 'objective' in flag_values:
    return
  DEFINE_float = functools.partial(flags.DEFINE_float, flag_values=flag_values)
  DEFINE_integer = functools.partial(flags.DEFINE_integer,
                                     flag_values=flag_values)
  DEFINE_string = functools.partial(flags.DEFINE_string,
                                    flag_values=flag_values)
  DEFINE_bool = functools.partial(flags.DEFINE_bool, flag_values=flag_values)
  DEFINE_boolean = DEFINE_bool
  DEFINE_enum = functools.partial(flags.DEFINE_enum, flag_values=flag_values)
  DEFINE_list = functools.partial(flags.DEFINE_list, flag_values=flag_values)

  # --- The original SimCLR TF2 flags (names, meanings and defaults kept). ---
  DEFINE_float('learning_rate', 0.3,
               'Initial learning rate per batch size of 256.')
  DEFINE_enum('learning_rate_scaling', 'linear', ['linear', 'sqrt'],
              'How to scale the learning rate with the batch size: '
              'lr·B/256 (linear) or lr·sqrt(B) (sqrt).')
  DEFINE_float('warmup_epochs', 10, 'Number of epochs of warm-up.')
  DEFINE_float('weight_decay', 1e-6, 'Amount of weight decay to use.')
  DEFINE_float('batch_norm_decay', 0.9, 'Batch norm decay parameter.')
  DEFINE_integer('train_batch_size', 512, 'Global batch size for training.')
  DEFINE_string('train_split', 'train', 'Split for training.')
  DEFINE_integer('train_epochs', 100, 'Number of epochs to train for.')
  DEFINE_integer('train_steps', 0, 'Number of steps to train for. If '
                 'provided, overrides train_epochs.')
  DEFINE_integer('eval_steps', 0, 'Number of steps to eval for. If not '
                 'provided, evals over the entire split.')
  DEFINE_integer('eval_batch_size', 256, 'Global batch size for eval.')
  DEFINE_integer('checkpoint_epochs', 1,
                 'Number of epochs between checkpoints/summaries.')
  DEFINE_integer('checkpoint_steps', 0, 'Number of steps between '
                 'checkpoints/summaries. If provided, overrides '
                 'checkpoint_epochs.')
  DEFINE_string('eval_split', 'validation', 'Split for evaluation.')
  DEFINE_string('dataset', 'imagenet2012',
                'A TFDS dataset name, a folder of images laid out '
                '<split>/<class>/*.jpg, or "digits" (embedded, no '
                'download).')
  DEFINE_bool('cache_dataset', False,
              'Cache the decoded eval split in memory (training reads its '
              'examples by index, or TFDS records, and does not cache).')
  DEFINE_enum('mode', 'train',
              ['train', 'eval', 'train_then_eval', 'preview'],
              'Whether to perform training or evaluation (eval watches '
              'model_dir for new checkpoints); preview writes a PNG of '
              'augmented training views to model_dir/preview.png.')
  DEFINE_enum('train_mode', 'pretrain', ['pretrain', 'finetune'],
              'The train mode controls different objectives and trainable '
              'components.')
  DEFINE_bool('lineareval_while_pretraining', True,
              'Whether to train the supervised head (on stop-gradient '
              'features) while pretraining.')
  DEFINE_string('checkpoint', None,
                'Warm-start the model from this checkpoint (prefix or '
                'directory) if model_dir holds no checkpoint yet. Only '
                'model variables matched by --variable_schema are read.')
  DEFINE_bool('zero_init_logits_layer', False,
              'Zero-initialise the supervised head when starting a run.')
  DEFINE_integer('fine_tune_after_block', -1,
                 'Freeze blocks up to this one when fine-tuning: -1 '
                 'trains everything, 0 freezes the stem, 4 trains only '
                 'the head (linear eval).')
  DEFINE_string('master', None, 'Address of the TensorFlow master (TPU).')
  DEFINE_string('model_dir', None, 'Model directory for training.')
  DEFINE_string('data_dir', None, 'Directory where the TFDS dataset is.')
  DEFINE_bool('use_tpu', None, 'Whether to run on TPU. Unset: detect '
              '(TPU if configured, else all local GPUs, else the CPU).')
  DEFINE_string('tpu_name', None, 'The Cloud TPU to use.')
  DEFINE_string('tpu_zone', None, '[Optional] GCE zone of the Cloud TPU.')
  DEFINE_string('gcp_project', None, '[Optional] GCP project of the TPU.')
  DEFINE_enum('optimizer', 'lars', ['momentum', 'adam', 'lars'],
              'Optimizer to use.')
  DEFINE_float('momentum', 0.9, 'Momentum parameter.')
  DEFINE_enum('linear_head_optimizer', 'shared',
              list(LINEAR_HEAD_OPTIMIZERS),
              'Pretraining with --lineareval_while_pretraining only: who '
              'trains the linear head on the stop-gradient features. shared '
              '(the original): the encoder\'s --optimizer and learning rate, '
              'with --weight_decay as a loss term. momentum (Nesterov SGD, '
              '--momentum) or adam: an optimizer of its own with '
              '--linear_head_learning_rate (--learning_rate_scaling as the '
              'encoder, shaped by --linear_head_schedule) and '
              '--linear_head_weight_decay; the encoder\'s optimizer then '
              'never sees the head. Not with --train_mode=finetune (the '
              'head is the model being trained) nor --precision=float16.')
  DEFINE_bool('linear_head_batch_norm', False,
              'Pretraining with --lineareval_while_pretraining only: '
              'standardise the linear head\'s stop-gradient features with a '
              'BN without scale and offset (its moving statistics are '
              'checkpointed with the head), as evaluate.py standardises '
              'them for its logistic regression.')
  DEFINE_enum('linear_head_input', 'views', list(LINEAR_HEAD_INPUTS),
              'Pretraining with --lineareval_while_pretraining only: what '
              'the linear head is trained on. views (the original): the '
              'stop-gradient features of every augmented view. clean: those '
              'of one extra unaugmented view per example (the eval '
              'preprocessing), with the encoder in inference mode: the '
              'features eval and evaluate.py score, so the printed head '
              'accuracy tracks a linear evaluation (one more forward pass '
              'of b images per step, no backward).')
  DEFINE_float('linear_head_learning_rate', 0.01,
               'Base learning rate of the linear head with '
               '--linear_head_optimizer=momentum|adam (scaled by '
               '--learning_rate_scaling, shaped by --linear_head_schedule). '
               'The default is the quick start\'s measured rate for adam.')
  DEFINE_enum('linear_head_schedule', 'cosine', list(LINEAR_HEAD_SCHEDULES),
              'With --linear_head_optimizer=momentum|adam: the shape of the '
              'head\'s learning rate. cosine: the encoder\'s warm-up and '
              'cosine decay to 0. constant: the scaled '
              '--linear_head_learning_rate at every step, so that the head '
              'keeps up with the encoder\'s features to the last step (with '
              'the cosine a head that stops learning as its rate decays '
              'ends below a linear evaluation of the final encoder).')
  DEFINE_float('linear_head_weight_decay', 0.0,
               'wd·½‖w‖² over the linear head\'s kernel and bias, in the '
               'loss, with --linear_head_optimizer=momentum|adam.')
  DEFINE_string('eval_name', None, 'Name of this evaluation: summaries '
                'go to model_dir/eval_<name> instead of model_dir/eval.')
  DEFINE_integer('keep_checkpoint_max', 5,
                 'Maximum number of checkpoints to keep.')
  DEFINE_integer('keep_hub_module_max', 1,
                 'Maximum number of exported SavedModels to keep.')
  DEFINE_enum('export_format', 'both',
              list(checkpoints.EXPORT_FORMATS) + ['none'],
              'Interfaces of the exported SavedModel: serving (signature '
              'serving_default: features, projection, logits), hub (the '
              'original SimCLR TF2 export: saved_model(images, '
              'trainable=False) -> final_avg_pool, block_group1..4, ...), '
              'both, or none (no export: checkpoints only).')
  DEFINE_float('temperature', 0.1,
               'Temperature parameter for contrastive loss.')
  DEFINE_boolean('hidden_norm', True,
                 'Whether to l2-normalise projections in the loss.')
  DEFINE_enum('proj_head_mode', 'nonlinear',
              ['none', 'linear', 'nonlinear'],
              'How the head projection is done.')
  DEFINE_integer('proj_out_dim', 128, 'Projection output dimension.')
  DEFINE_integer('num_proj_layers', 3, 'Number of non-linear head layers '
                 '(0: none, the head is the identity).')
  DEFINE_integer('ft_proj_selector', 0,
                 'Which layer of the projection head to use during '
                 'fine-tuning: 0 = no projection head, -1 = the last.')
  DEFINE_boolean('global_bn', True,
                 'Whether to aggregate BN statistics across replicas.')
  DEFINE_enum('precision', None, ['float32', 'bfloat16', 'float16',
                                  'float64'],
              'Compute dtype of convolutions and dense layers (variables, '
              'BN statistics, losses and objective state stay float32): '
              'bfloat16 / float16 are Keras mixed precision (float16 with '
              'dynamic loss scaling); float64 is for numerical checks. '
              'Unset: bfloat16 on TPU, float32 elsewhere.')
  DEFINE_float('width_multiplier', 1,
               'Multiplier of the ResNet width (fractions give thinner '
               'nets, e.g. 0.25 for CPU smoke tests).')
  DEFINE_integer('resnet_depth', 50, 'Depth of ResNet.')
  DEFINE_float('sk_ratio', 0.,
               'If it is bigger than 0, it will enable SK. '
               'Recommendation: 0.0625.')
  DEFINE_float('se_ratio', 0., 'If it is bigger than 0, it will enable SE.')
  DEFINE_integer('image_size', 224, 'Input image size (≤ 32 selects the '
                 'CIFAR stem and no eval crop).')
  DEFINE_float('color_jitter_strength', 1.0,
               'The strength of color jittering.')
  DEFINE_boolean('use_blur', True, 'Whether or not to use Gaussian blur '
                 'for augmentation during pretraining.')

  # --- TF1 / FNC names. ---
  DEFINE_string('variable_schema', '?!global_step',
                'Regex (re.match) of the model variables to restore from '
                '--checkpoint; e.g. '
                "'(?!global_step|(?:.*/|^)Momentum|head)' restores the "
                'backbone only.')
  DEFINE_integer('train_summary_steps', None,
                 'Training summary period in steps: the scalars are '
                 'written at the first host-loop boundary at or after each '
                 'multiple of it; 0 = off; unset = at every host loop.')

  # --- SogCLR ---
  DEFINE_bool('DCL_mode', False, 'SogCLR: train with the dynamic '
              'contrastive loss (the same as --objective=sogclr).')
  DEFINE_bool('GCL_mode', None, 'Older name of --DCL_mode.')
  DEFINE_bool('BI_mode', None, 'Older name of --DCL_mode.')
  DEFINE_float('gamma', 0.99, 'SogCLR: weight of the current batch in '
               'the moving average u of each example (the README recipe '
               'uses 0.9).')
  DEFINE_enum('dcl_u_store', 'sum', ['sum', 'mean'],
              'SogCLR: what is stored in u[i] after a step: u_a + u_b '
              '(sum, the paper code; needs gamma > 0.5) or their mean '
              '(the later PyTorch / LibAUC code).')
  DEFINE_float('crop_area_min', 0.08,
               'The min value of random cropped region.')
  DEFINE_integer('num_classes', 0, 'Number of classes of the supervised '
                 'head; 0 = from the dataset.')

  # --- FNC ---
  DEFINE_integer('support_size', 8, 'FNC: extra views (support set) per '
                 'image; V = 2 + support_size views.')
  DEFINE_bool('use_randaugment', None, 'RandAugment (n=2, m=7) in the '
              'pretraining views, after colour jitter. Unset: the '
              "objective's default (on for fnc, off otherwise).")
  DEFINE_integer('memory_multiplier', None, 'FNC / IFND: memory queue '
                 'of memory_multiplier x train_batch_size momentum-'
                 'encoder keys; 0 = in-batch mode (no queue, no '
                 'momentum encoder). Must be 0 or >= the views per '
                 'image. Unset: the objective\'s default (16 for fnc, 0 '
                 'for ifnd).')
  DEFINE_float('moving_average_decay', 0.999, 'FNC / IFND memory mode: EMA '
               'decay d of the momentum encoder, w <- d*w + (1-d)*w_online '
               'after every step.')
  DEFINE_integer('fn_topk', 10, 'FNC: false negatives are among the '
                 'top-k scoring candidates of each image ...')
  DEFINE_float('fn_threshold', 0.7, 'FNC: ... and score (max cosine '
               'over the image\'s views) above this threshold.')
  DEFINE_enum('fn_strategy', 'attraction', ['attraction', 'elimination'],
              'FNC: pull false negatives in as positives (attraction, '
              'the released code) or drop them from the negatives '
              '(elimination).')
  DEFINE_float('fnc_warmup_epochs', 0.0, 'FNC: cancel no false negatives '
               '(plain multi-view contrastive loss) during the first '
               'ceil(fnc_warmup_epochs*N/B) steps, then FNC; the scores are '
               'reported (fn_score_*) all along. 0 = cancel from the first '
               'step (the release).')

  # --- IFND ---
  DEFINE_list('ifnd_num_clusters', ['10', '30', '100'], 'IFND: one '
              'k-means per entry (a level of pseudo labels), e.g. '
              '10,30,100 for CIFAR-10, 100,300,1000 for CIFAR-100.')
  DEFINE_integer('ifnd_reassign_epochs', 20, 'IFND: re-cluster the '
                 'training set every this many epochs (and at the start).')
  DEFINE_enum('ifnd_acceptance', 'linear', ['linear', 'constant', 'step'],
              'IFND acceptance-rate schedule over training: linear from '
              '0 to 1, constant --ifnd_acceptance_rate, or step '
              '(--ifnd_acceptance_stages equal stages from 0 to 1).')
  DEFINE_float('ifnd_acceptance_rate', 1.0, 'IFND: the rate of '
               '--ifnd_acceptance=constant.')
  DEFINE_integer('ifnd_acceptance_stages', 5, 'IFND: stages of '
                 '--ifnd_acceptance=step (r = stage/(stages-1)).')
  DEFINE_enum('ifnd_confidence', 'centroid', ['centroid', 'margin'],
              'IFND confidence of a pseudo label: cosine to the own '
              'centroid, or its margin over the second-nearest centroid.')
  DEFINE_enum('ifnd_strategy', 'elimination', ['elimination',
                                               'attraction'],
              'IFND: drop same-label examples from the negatives '
              '(elimination, the paper) or pull them in as positives.')
  DEFINE_enum('ifnd_level_combine', 'mean', ['mean', 'any'],
              'IFND: average the per-level losses (mean) or use one '
              'loss with the union of the levels\' false negatives.')
  DEFINE_integer('ifnd_kmeans_iters', 100, 'IFND: at most this many '
                 'Lloyd iterations per k-means.')

  # --- New. ---
  DEFINE_string('objective', 'simclr', 'The contrastive objective.')
  DEFINE_integer('steps_per_loop', 0,
                 'Training steps per host loop (progress line, '
                 'summaries). 0: checkpoint_steps (shortened to divide '
                 'the kNN monitor\'s and the objective\'s periods).')
  DEFINE_string('distribution_strategy', None,
                'Override the detected strategy: tpu, mirrored, '
                'multi_worker_mirrored or one_device.')
  DEFINE_bool('jit_compile', False, 'XLA-compile the whole training step '
              '(forward, loss, gradients, optimizer update, metrics) on '
              'CPU / GPU. One device only: refused at start-up with the '
              'mirrored and multi_worker_mirrored strategies (their '
              'replicas sync through merge_call). On TPU the step is '
              'always compiled and this changes nothing.')
  DEFINE_bool('skip_corrupt_images', False,
              'Image folders: skip (and count) unreadable files instead '
              'of stopping with an error that names them.')
  DEFINE_bool('blur_on_device', False, 'With --use_blur: the input '
              'pipeline only draws each view\'s blur; the accelerator '
              'blurs every view batch at the start of the step (as the '
              'original SimCLR), the same views up to float rounding. '
              'Moves work off a host-bound input pipeline.')
  DEFINE_integer('input_threads', 0, 'Size of the private thread pool of '
                 'the training input pipeline; 0 = TensorFlow\'s shared '
                 'pool.')
  DEFINE_float('input_ram_budget_gb', 0, 'RAM budget (GiB) of tf.data '
               'autotuning for the training input; 0 = TensorFlow\'s '
               'default.')
  DEFINE_integer('seed', None, 'Random seed for initialisation, the '
                 'example order and the augmentations (unset: drawn at '
                 'random and kept in the checkpoint).')
  DEFINE_bool('deterministic', False, 'Reproducible runs: TF op '
              'determinism on top of the seeded example order and '
              'augmentations, so two runs with the same --seed (and a run '
              'resumed after a kill) compute the same weights. Needs '
              '--seed; not with RandAugment.')
  DEFINE_integer('skip_nonfinite_steps', 0, 'A step whose loss is NaN or '
                 'infinite stops the run (the latest checkpoint stays the '
                 'last good one). N > 0: skip such steps (no update) and '
                 'stop after N of them.')
  DEFINE_bool('allow_flag_changes', False, 'Resume a model_dir even when '
              'a flag that changes the meaning of its checkpoint (see '
              'IDENTITY_FLAGS in config.py) differs from its flags.json.')

  # --- Evaluation protocols (evaluate.py). ---
  DEFINE_string('train_subset', None, 'A file listing the keys of the '
                'training examples to use, one per line (e.g. a 1 % '
                'label subset from imagenet_subsets/); the examples are '
                're-indexed 0..n-1.')
  DEFINE_integer('knn_eval_epochs', 0, 'Every this many epochs of '
                 'training, the kNN accuracy of the current encoder on '
                 '--eval_split goes to TensorBoard and the log; 0 = off.')
  DEFINE_integer('knn_k', 200, 'Neighbours of the weighted kNN vote.')
  DEFINE_float('knn_temperature', 0.1, 'Temperature of the weighted kNN '
               'vote: weights exp(cosine/temperature).')


def define_feature_eval_flags(flag_values=FLAGS):
  """Defines evaluate.py's own flags (it also uses run.py's) once."""
  if 'saved_model' in flag_values:
    return
  DEFINE_string = functools.partial(flags.DEFINE_string,
                                    flag_values=flag_values)
  DEFINE_list = functools.partial(flags.DEFINE_list, flag_values=flag_values)
  DEFINE_float = functools.partial(flags.DEFINE_float, flag_values=flag_values)
  DEFINE_integer = functools.partial(flags.DEFINE_integer,
                                     flag_values=flag_values)
  DEFINE_string('saved_model', None, 'Evaluate this exported SavedModel '
                '(model_dir/saved_model/<step>) instead of --checkpoint.')
  DEFINE_string('feature_layer', '0', 'Which representation: 0 = ResNet '
                'output, j = projection layer j, -1 = the last (SavedModel: '
                '0 or -1), or "pixels" (raw pixels, no encoder).')
  DEFINE_list('protocols', ['knn', 'linear'], 'Any of knn, linear, tsne.')
  DEFINE_list('linear_l2_grid', [], 'L2 strengths to choose from; empty: 45 '
              'log-spaced values in [1e-6, 1e5].')
  DEFINE_float('linear_holdout_fraction', 0.2, 'Fraction of the training '
               'split held out to choose the L2 strength.')
  DEFINE_integer('linear_max_iter', 1000, 'L-BFGS iterations per fit.')
  DEFINE_integer('tsne_examples', 2000, 'Test examples in the t-SNE plot.')
  DEFINE_string('output_dir', None, 'Where feature_eval.json (and tsne.png) '
                'go; default: the evaluated SavedModel or checkpoint '
                'directory; a random encoder or raw pixels needs '
                '--output_dir (or --model_dir).')


define_flags(FLAGS)


# ---------------------------------------------------------------------------
# Typed configuration.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which examples, how they are read and augmented, and the batch sizes."""
  dataset: str = 'imagenet2012'
  data_dir: Optional[str] = None
  train_split: str = 'train'
  eval_split: str = 'validation'
  train_subset: Optional[str] = None
  image_size: int = 224
  train_batch_size: int = 512
  eval_batch_size: int = 256
  cache_dataset: bool = False
  skip_corrupt_images: bool = False
  color_jitter_strength: float = 1.0
  use_blur: bool = True
  blur_on_device: bool = False
  crop_area_min: float = 0.08
  use_randaugment: Optional[bool] = None  # None: the objective's default
  seed: Optional[int] = None
  input_threads: int = 0  # 0: TF's shared thread pool
  input_ram_budget_gb: float = 0.0  # 0: TF's default autotune budget


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """ResNet, projection head and supervised head (SPEC §3)."""
  resnet_depth: int = 50
  width_multiplier: float = 1.0
  sk_ratio: float = 0.0
  se_ratio: float = 0.0
  proj_head_mode: str = 'nonlinear'
  proj_out_dim: int = 128
  num_proj_layers: int = 3
  ft_proj_selector: int = 0
  batch_norm_decay: float = 0.9
  global_bn: bool = True
  precision: Optional[str] = None  # None: bfloat16 on TPU, else float32
  num_classes: int = 0  # 0: from the dataset
  lineareval_while_pretraining: bool = True
  linear_head_batch_norm: bool = False
  linear_head_input: str = 'views'  # LINEAR_HEAD_INPUTS
  fine_tune_after_block: int = -1
  zero_init_logits_layer: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The encoder's optimizer and, with linear_head_optimizer other than
  'shared' (pretraining only), the linear head's own."""
  name: str = 'lars'
  momentum: float = 0.9
  weight_decay: float = 1e-6
  linear_head_optimizer: str = 'shared'  # LINEAR_HEAD_OPTIMIZERS
  linear_head_learning_rate: float = 0.01
  linear_head_schedule: str = 'cosine'  # LINEAR_HEAD_SCHEDULES
  linear_head_weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Learning rate, training length and host-loop length (SPEC §5)."""
  learning_rate: float = 0.3
  learning_rate_scaling: str = 'linear'
  warmup_epochs: float = 10
  train_epochs: int = 100
  train_steps: int = 0  # 0: from train_epochs
  steps_per_loop: int = 0  # 0: derived from the periods
  skip_nonfinite_steps: int = 0  # 0: a non-finite loss stops the run
  train_summary_steps: Optional[int] = None  # None: every host loop; 0: off


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  model_dir: Optional[str] = None
  checkpoint: Optional[str] = None  # warm start
  variable_schema: str = '?!global_step'
  checkpoint_epochs: int = 1
  checkpoint_steps: int = 0
  keep_checkpoint_max: int = 5
  keep_hub_module_max: int = 1
  export_format: str = 'both'  # checkpoints.EXPORT_FORMATS
  allow_flag_changes: bool = False


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  eval_steps: int = 0  # 0: the whole split
  eval_name: Optional[str] = None
  knn_eval_epochs: int = 0  # 0: no kNN monitor
  knn_k: int = 200
  knn_temperature: float = 0.1


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
  strategy: Optional[str] = None  # None: detected
  use_tpu: Optional[bool] = None
  tpu_name: Optional[str] = None
  tpu_zone: Optional[str] = None
  gcp_project: Optional[str] = None
  master: Optional[str] = None
  jit_compile: bool = False  # XLA-compile the train step (one replica)


# Objective configs: the fields are the objective's constructor arguments.


@dataclasses.dataclass(frozen=True)
class SimCLRConfig:
  temperature: float = 0.1
  hidden_norm: bool = True


@dataclasses.dataclass(frozen=True)
class SogCLRConfig(SimCLRConfig):
  gamma: float = 0.99
  u_store: str = 'sum'


@dataclasses.dataclass(frozen=True)
class MemoryConfig(SimCLRConfig):
  """For an `objective.MemoryObjective`: memory_multiplier > 0 means a
  momentum encoder (EMA decay momentum_decay) and a key queue."""
  memory_multiplier: int = 0
  momentum_decay: float = 0.999


@dataclasses.dataclass(frozen=True)
class FNCConfig(MemoryConfig):
  memory_multiplier: int = 16
  support_size: int = 8
  topk: int = 10
  threshold: float = 0.7
  strategy: str = 'attraction'
  warmup_epochs: float = 0.0


@dataclasses.dataclass(frozen=True)
class IFNDConfig(MemoryConfig):
  num_clusters: Tuple[int, ...] = (10, 30, 100)
  reassign_epochs: int = 20
  acceptance_schedule: str = 'linear'
  constant_rate: float = 1.0
  step_stages: int = 5
  confidence: str = 'centroid'
  strategy: str = 'elimination'
  level_combine: str = 'mean'
  kmeans_iters: int = 100
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything an `experiment.Experiment` is built from."""
  mode: str = 'train'
  train_mode: str = 'pretrain'
  objective_name: str = 'simclr'
  objective: object = SimCLRConfig()
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  evaluation: EvalConfig = EvalConfig()
  distribution: DistributionConfig = DistributionConfig()
  seed: Optional[int] = None
  deterministic: bool = False
  # The command-line flags this config came from (written to flags.json).
  flag_values: Optional[dict] = dataclasses.field(default=None, compare=False,
                                               repr=False)

  @property
  def model_dir(self):
    return self.checkpoint.model_dir

  def to_json(self):
    """The config as JSON-able nested dicts."""
    values = dataclasses.asdict(self)
    values.pop('flag_values')
    return values


@dataclasses.dataclass(frozen=True)
class FeatureEvalConfig:
  """evaluate.py's protocols (SPEC: offline linear / kNN evaluation)."""
  saved_model: Optional[str] = None
  feature_layer: str = '0'
  protocols: Tuple[str, ...] = ('knn', 'linear')
  linear_l2_grid: Tuple[float, ...] = ()  # empty: the default grid
  linear_holdout_fraction: float = 0.2
  linear_max_iter: int = 1000
  tsne_examples: int = 2000
  output_dir: Optional[str] = None


# ---------------------------------------------------------------------------
# From flags.
# ---------------------------------------------------------------------------


def data_config(flag_values=FLAGS):
  return _fill(DataConfig, flag_values)


def model_config(flag_values=FLAGS):
  return _fill(ModelConfig, flag_values)


def evaluation_config(flag_values=FLAGS):
  return _fill(EvalConfig, flag_values)


def _fill(cls, flag_values, renames=None):
  """`cls` with each field read from the flag of the same name (or of the
  name `renames` gives it)."""
  renames = renames or {}
  return cls(**{field.name: flag_values[renames.get(field.name, field.name)]
                .value for field in dataclasses.fields(cls)
                if renames.get(field.name, field.name) in flag_values})


def parse_num_clusters(value):
  """'10,30,100' (or a list) → (10, 30, 100)."""
  if isinstance(value, str):
    value = [v for v in value.split(',') if v.strip()]
  try:
    return tuple(int(v) for v in value)
  except (TypeError, ValueError) as e:
    text = value if isinstance(value, str) else ','.join(map(str, value))
    raise ValueError(f'--ifnd_num_clusters={text} must be a comma-'
                     'separated list of integers, e.g. 10,30,100.') from e


def _memory_multiplier(flag_values, default):
  value = flag_values.memory_multiplier
  return default if value is None else value


def _simclr_config(fv):
  return SimCLRConfig(temperature=fv.temperature, hidden_norm=fv.hidden_norm)


def _sogclr_config(fv):
  return SogCLRConfig(temperature=fv.temperature, hidden_norm=fv.hidden_norm,
                      gamma=fv.gamma, u_store=fv.dcl_u_store)


def _fnc_config(fv):
  return FNCConfig(temperature=fv.temperature, hidden_norm=fv.hidden_norm,
                   support_size=fv.support_size,
                   memory_multiplier=_memory_multiplier(fv, 16),
                   momentum_decay=fv.moving_average_decay, topk=fv.fn_topk,
                   threshold=fv.fn_threshold, strategy=fv.fn_strategy,
                   warmup_epochs=fv.fnc_warmup_epochs)


def _ifnd_config(fv):
  return IFNDConfig(
      temperature=fv.temperature, hidden_norm=fv.hidden_norm,
      memory_multiplier=_memory_multiplier(fv, 0),
      momentum_decay=fv.moving_average_decay,
      num_clusters=parse_num_clusters(fv.ifnd_num_clusters),
      reassign_epochs=fv.ifnd_reassign_epochs,
      acceptance_schedule=fv.ifnd_acceptance,
      constant_rate=fv.ifnd_acceptance_rate,
      step_stages=fv.ifnd_acceptance_stages, confidence=fv.ifnd_confidence,
      strategy=fv.ifnd_strategy, level_combine=fv.ifnd_level_combine,
      kmeans_iters=fv.ifnd_kmeans_iters,
      seed=0 if fv.seed is None else fv.seed)


# --objective=<name> → the objective's config from the flags. An objective
# that should be selectable from the command line adds its entry here.
OBJECTIVE_CONFIGS = {
    'simclr': _simclr_config,
    'sogclr': _sogclr_config,
    'fnc': _fnc_config,
    'ifnd': _ifnd_config,
}


def from_flags(flag_values=FLAGS):
  """The validated `ExperimentConfig` of parsed flags (raises ConfigError)."""
  validate_flags(flag_values)
  fv = flag_values
  return ExperimentConfig(
      mode=fv.mode, train_mode=fv.train_mode, objective_name=fv.objective,
      objective=OBJECTIVE_CONFIGS[fv.objective](fv),
      data=data_config(fv),
      model=model_config(fv),
      optimizer=_fill(OptimizerConfig, fv, {'name': 'optimizer'}),
      schedule=_fill(ScheduleConfig, fv),
      checkpoint=_fill(CheckpointConfig, fv),
      evaluation=evaluation_config(fv),
      distribution=_fill(DistributionConfig, fv,
                         {'strategy': 'distribution_strategy'}),
      seed=fv.seed, deterministic=fv.deterministic,
      flag_values=json_flags(fv))


def feature_eval_config(flag_values=FLAGS):
  """evaluate.py's `FeatureEvalConfig` from its flags."""
  fv = flag_values
  return FeatureEvalConfig(
      saved_model=fv.saved_model, feature_layer=fv.feature_layer,
      protocols=tuple(fv.protocols),
      linear_l2_grid=tuple(float(v) for v in fv.linear_l2_grid),
      linear_holdout_fraction=fv.linear_holdout_fraction,
      linear_max_iter=fv.linear_max_iter, tsne_examples=fv.tsne_examples,
      output_dir=fv.output_dir)


def new_flag_values():
  """A fresh FlagValues with run.py's flags defined (for tests and tools that
  parse argv without touching the process-wide FLAGS)."""
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  return flag_values


def parse_argv(argv):
  """A fresh FlagValues holding the command line `argv` (['--dataset=digits',
  ...], no program name)."""
  flag_values = new_flag_values()
  flag_values(['run.py'] + list(argv))
  return flag_values


def from_argv(argv):
  """The validated `ExperimentConfig` of a command line (see `parse_argv`)."""
  return from_flags(parse_argv(argv))


def json_flags(flag_values=FLAGS):
  """The flag values that JSON can hold."""
  values = {}
  for key, val in flag_values.flag_values_dict().items():
    try:
      json.dumps(val)
    except TypeError:
      continue
    values[key] = val
  return values


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------

# Flags whose change alters what a model_dir's checkpoint means (its shapes,
# its objective state, its data): resuming a model_dir whose flags.json
# differs in one of them is refused unless --allow_flag_changes. A change of
# any other flag (learning rate, epochs, logging...) is logged as a warning.
IDENTITY_FLAGS = (
    'objective', 'train_mode', 'dataset', 'train_split', 'train_subset',
    'train_batch_size', 'image_size', 'resnet_depth', 'width_multiplier',
    'sk_ratio', 'se_ratio', 'proj_head_mode', 'proj_out_dim',
    'num_proj_layers', 'num_classes', 'lineareval_while_pretraining',
    'linear_head_batch_norm',
    'optimizer', 'linear_head_optimizer', 'memory_multiplier',
    'support_size', 'dcl_u_store', 'ifnd_num_clusters')  # --DCL_mode and its older names: via objective

# --distribution_strategy values (official.common.distribute_utils).
STRATEGIES = ('one_device', 'mirrored', 'multi_worker_mirrored', 'tpu', 'off')

# The CIFAR stem (image_size ≤ 32) keeps full resolution and the three
# stride-2 block groups divide it by 8: below this, the last groups see
# 1-pixel maps of padding.
MIN_IMAGE_SIZE = 8


def projection_layer_count(proj_head_mode, num_proj_layers):
  return {'none': 0, 'linear': 1, 'nonlinear': num_proj_layers}[proj_head_mode]


def _flag_given(flag_values, name):
  """Whether flag `name` was passed (command line, flagfile or assignment)."""
  flag = flag_values[name]
  return bool(flag.present) or flag.value != flag.default


def map_legacy_switches(fv):
  """Maps SogCLR's --DCL_mode (older names --GCL_mode, --BI_mode) onto
  --objective and checks the SogCLR-era flags; returns error messages.

  A switch set to true turns the default --objective=simclr into sogclr; a
  contradiction (another --objective, or the names disagreeing, or an
  explicit false next to --objective=sogclr) is an error naming both flags.
  """
  errors = []
  given = {name: fv[name].value
           for name in ('DCL_mode', 'GCL_mode', 'BI_mode')
           if _flag_given(fv, name) and fv[name].value is not None}
  if len(set(given.values())) > 1:
    errors.append(' contradicts '.join(
        f'--{name}={str(value).lower()}' for name, value in given.items()) +
                  ' (they are names of the same switch).')
  elif given:
    name, value = next(iter(given.items()))
    if value and not _flag_given(fv, 'objective'):
      fv.objective = 'sogclr'
    elif value and fv.objective != 'sogclr':
      errors.append(f'--{name}=true selects --objective=sogclr but '
                    f'--objective={fv.objective}; pass only one of them.')
    elif not value and fv.objective == 'sogclr':
      errors.append(f'--{name}=false contradicts --objective=sogclr.')
  if not 0.0 < fv.crop_area_min <= 1.0:
    errors.append(f'--crop_area_min={fv.crop_area_min} must be in (0, 1].')
  if fv.num_classes < 0:
    errors.append('--num_classes must not be negative (0 = from the '
                  'dataset).')
  return errors


def _linear_head_errors(fv):
  """--linear_head_*: the head's own optimizer needs a head trained
  alongside pretraining, and its flags mean nothing without it."""
  errors = []
  own = fv.linear_head_optimizer != LINEAR_HEAD_SHARED
  for name, given in (('linear_head_batch_norm', fv.linear_head_batch_norm),
                      ('linear_head_input=clean',
                       fv.linear_head_input == 'clean')):
    if given and (fv.train_mode != 'pretrain' or
                  not fv.lineareval_while_pretraining):
      errors.append(f'--{name} concerns the linear head trained while '
                    'pretraining: it needs --train_mode=pretrain and '
                    '--lineareval_while_pretraining=true.')
  if own and fv.train_mode != 'pretrain':
    errors.append(f'--linear_head_optimizer={fv.linear_head_optimizer} '
                  'applies to pretraining only; with --train_mode=finetune '
                  'the supervised head is trained with the network by '
                  '--optimizer (use --linear_head_optimizer=shared).')
  elif own and not fv.lineareval_while_pretraining:
    errors.append(f'--linear_head_optimizer={fv.linear_head_optimizer} '
                  'trains the linear head of '
                  '--lineareval_while_pretraining=true, which is false.')
  if own and fv.precision == 'float16':
    errors.append(f'--linear_head_optimizer={fv.linear_head_optimizer} '
                  'cannot run with --precision=float16: the dynamic loss '
                  'scale belongs to the encoder\'s optimizer alone. Use '
                  '--linear_head_optimizer=shared, or bfloat16 / float32.')
  if not own:
    for name in ('linear_head_learning_rate', 'linear_head_weight_decay',
                 'linear_head_schedule'):
      if _flag_given(fv, name):
        errors.append(f'--{name} is used only with --linear_head_optimizer='
                      'momentum or adam (it is shared, the encoder\'s '
                      'optimizer trains the head).')
  if fv.linear_head_learning_rate <= 0:
    errors.append(f'--linear_head_learning_rate='
                  f'{fv.linear_head_learning_rate} must be positive.')
  if fv.linear_head_weight_decay < 0:
    errors.append('--linear_head_weight_decay must not be negative.')
  return errors


def validate_flags(flag_values=FLAGS):
  """Rejects flag combinations that cannot work, naming the flags."""
  fv = flag_values
  errors = map_legacy_switches(fv)
  if not fv.model_dir:
    errors.append('--model_dir is required (checkpoints, summaries and '
                  'results are written there; no config sets it): pass a '
                  'directory of your own, e.g. --model_dir=/tmp/quickstart '
                  '(an existing one is resumed).')
  for name in ('train_batch_size', 'eval_batch_size', 'image_size',
               'checkpoint_epochs', 'proj_out_dim'):
    if getattr(fv, name) <= 0:
      errors.append(f'--{name} must be positive.')
  for name in ('train_epochs', 'train_steps', 'eval_steps',
               'checkpoint_steps', 'steps_per_loop', 'keep_checkpoint_max'):
    if getattr(fv, name) < 0:
      errors.append(f'--{name} must not be negative.')
  if fv.train_steps == 0 and fv.train_epochs == 0 and fv.mode != 'eval':
    errors.append('--train_epochs=0 and --train_steps=0: nothing to train.')
  if 0 < fv.image_size < MIN_IMAGE_SIZE:
    errors.append(f'--image_size={fv.image_size} is below '
                  f'{MIN_IMAGE_SIZE}, the smallest input the ResNet\'s '
                  'stride-2 block groups can downsample; use 32 (CIFAR '
                  'stem) or 224 (ImageNet stem).')
  if fv.learning_rate <= 0:
    errors.append(f'--learning_rate={fv.learning_rate} must be positive '
                  '(a negative rate trains by gradient ascent).')
  if fv.warmup_epochs < 0:
    errors.append('--warmup_epochs must not be negative.')
  if fv.weight_decay < 0:
    errors.append('--weight_decay must not be negative.')
  if not 0 <= fv.momentum < 1:
    errors.append(f'--momentum={fv.momentum} must be in [0, 1).')
  if fv.skip_nonfinite_steps < 0:
    errors.append('--skip_nonfinite_steps must not be negative (0: a '
                  'non-finite loss stops the run).')
  if fv.input_threads < 0:
    errors.append('--input_threads must not be negative (0: TensorFlow\'s '
                  'shared thread pool).')
  if fv.input_ram_budget_gb < 0:
    errors.append('--input_ram_budget_gb must not be negative (0: '
                  'TensorFlow\'s default budget).')
  if fv.deterministic and fv.seed is None:
    errors.append('--deterministic needs --seed (e.g. --seed=0): the '
                  'seed fixes initialisation, example order and '
                  'augmentations.')
  if (fv.distribution_strategy is not None and
      fv.distribution_strategy.lower() not in STRATEGIES):
    errors.append(f'Unknown --distribution_strategy='
                  f'{fv.distribution_strategy!r}; use one of '
                  f'{", ".join(STRATEGIES)} (or leave it unset to detect).')
  if fv.width_multiplier <= 0:
    errors.append('--width_multiplier must be positive.')
  if fv.temperature <= 0:
    errors.append('--temperature must be positive.')
  if not -1 <= fv.fine_tune_after_block <= 4:
    errors.append('--fine_tune_after_block must be in -1..4.')
  elif fv.fine_tune_after_block > -1 and fv.train_mode != 'finetune':
    errors.append('--fine_tune_after_block freezes blocks only when '
                  '--train_mode=finetune; pretraining trains every block '
                  '(use --fine_tune_after_block=-1).')
  if fv.num_proj_layers < 0:
    errors.append('--num_proj_layers must not be negative (0 with '
                  '--proj_head_mode=nonlinear: no layers, the identity).')
  layers = projection_layer_count(fv.proj_head_mode, fv.num_proj_layers)
  if not -1 <= fv.ft_proj_selector <= layers:
    errors.append(f'--ft_proj_selector={fv.ft_proj_selector} but the '
                  f'projection head (--proj_head_mode={fv.proj_head_mode}'
                  f', --num_proj_layers={fv.num_proj_layers}) has '
                  f'{layers} layers: use -1..{layers}.')
  if (fv.mode in ('eval', 'train_then_eval') and
      fv.train_mode == 'pretrain' and
      not fv.lineareval_while_pretraining):
    errors.append(f'--mode={fv.mode} evaluates the supervised head, which '
                  'pretraining only trains with '
                  '--lineareval_while_pretraining=true (or use '
                  '--train_mode=finetune, or --mode=train).')
  errors += _linear_head_errors(fv)
  if fv.train_summary_steps is not None and fv.train_summary_steps < 0:
    errors.append('--train_summary_steps must not be negative.')
  if fv.knn_eval_epochs < 0:
    errors.append('--knn_eval_epochs must not be negative (0 = off).')
  if fv.knn_k < 1:
    errors.append('--knn_k must be at least 1.')
  if fv.knn_temperature <= 0:
    errors.append('--knn_temperature must be positive.')
  if fv.train_subset and not tf.io.gfile.exists(fv.train_subset):
    errors.append(f'--train_subset={fv.train_subset}: no such file.')
  if fv.jit_compile and (fv.distribution_strategy or '').lower() in (
      'mirrored', 'multi_worker_mirrored'):
    errors.append(f'--jit_compile cannot compile the step of '
                  f'--distribution_strategy={fv.distribution_strategy}: its '
                  'replicas sync through merge_call, which TensorFlow cannot '
                  'run inside an XLA-compiled function. Drop --jit_compile, '
                  'or use --distribution_strategy=one_device (one GPU or the '
                  'CPU).')
  if fv.use_tpu is False and fv.distribution_strategy == 'tpu':
    errors.append('--use_tpu=false contradicts --distribution_strategy=tpu.')
  if fv.use_tpu and fv.distribution_strategy not in (None, 'tpu'):
    errors.append(f'--use_tpu contradicts --distribution_strategy='
                  f'{fv.distribution_strategy}.')
  if fv.objective not in OBJECTIVE_CONFIGS:
    errors.append(f'Unknown --objective={fv.objective!r}; available: '
                  f'{", ".join(sorted(OBJECTIVE_CONFIGS))}.')
  else:
    try:
      OBJECTIVE_CONFIGS[fv.objective](fv)
    except ValueError as e:
      errors.append(str(e))
  try:
    checkpoints.compile_schema(fv.variable_schema)
  except ValueError as e:
    errors.append(str(e))
  if fv.checkpoint:
    try:
      checkpoints.resolve_checkpoint_path(fv.checkpoint)
    except FileNotFoundError as e:
      errors.append(str(e))
  if errors:
    raise ConfigError('\n  '.join(['invalid flags:'] + errors))
