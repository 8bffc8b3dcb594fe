r"""Contrastive pretraining, linear evaluation and fine-tuning.

  python run.py --flagfile=configs/quickstart.cfg --model_dir=/tmp/quickstart
  python run.py --dataset=cifar10 --data_dir=... --model_dir=...

The flags (config.py) keep the names, meanings and defaults of the original
SimCLR TF2 run.py, plus the FNC / SogCLR compatibility flags (README.md). A
flag combination that cannot work stops the run at start-up, before any data
is read or anything is written, with a message that names the flags.

This module only turns flags into a config (`config.from_flags`), picks the
strategy and dispatches --mode to an `experiment.Experiment`.
"""

import logging as python_logging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf
import tf_keras

import config as config_lib
import experiment as experiment_lib
import guards
from official.common import distribute_utils

FLAGS = config_lib.FLAGS


class _OrbitEchoFilter(python_logging.Filter):
  """Drops the INFO records of orbit's controller: it logs each event line
  ('train | step: …', 'saved checkpoint to …') and prints the same line to
  stdout, so the log handler would show every one twice."""

  def filter(self, record):
    return not (record.levelno == python_logging.INFO and
                record.pathname.endswith(os.path.join('orbit',
                                                      'controller.py')))


def setup_logging():
  """One handler, one line per event: absl's handler on the root logger
  (installed here, at INFO, when not running under absl.app, e.g. a
  benchmark that calls `run` in-process; under app.run --verbosity rules),
  TensorFlow's logger without its own handler (its records reach the root
  handler; with both, each was shown twice), orbit's printed event lines
  not logged again (`_OrbitEchoFilter`), and a line-buffered stdout so that
  those prints stay in order with the log when both go to one pipe."""
  if not flags.FLAGS.is_parsed():  # not under absl.app
    flags.FLAGS.mark_as_parsed()  # absl then logs without a warning line
    logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OrbitEchoFilter) for f in handler.filters):
    handler.addFilter(_OrbitEchoFilter())
  tf_logger = tf.get_logger()
  for own in list(tf_logger.handlers):
    tf_logger.removeHandler(own)
  tf_logger.propagate = True
  if hasattr(sys.stdout, 'reconfigure'):  # not a replaced stream
    sys.stdout.reconfigure(line_buffering=True)


def build_strategy(distribution):
  """The strategy of a `config.DistributionConfig`; detected when neither
  --distribution_strategy nor --use_tpu is given (one GPU with --jit_compile:
  a one-device strategy, as MirroredStrategy cannot run a compiled step)."""
  name = distribution.strategy
  use_tpu = distribution.use_tpu
  tpu_address = (distribution.tpu_name or distribution.master or
                 os.environ.get('TPU_NAME'))
  num_gpus = len(tf.config.list_physical_devices('GPU'))
  if name is None:
    if use_tpu or (use_tpu is None and tpu_address):
      name = 'tpu'
    elif use_tpu is None and tf.config.list_physical_devices('TPU'):
      name, tpu_address = 'tpu', 'local'
    elif num_gpus > 1 or (num_gpus and not distribution.jit_compile):
      name = 'mirrored'
    else:
      name = 'one_device'
  if name == 'tpu' and (distribution.tpu_zone or distribution.gcp_project):
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=tpu_address, zone=distribution.tpu_zone,
        project=distribution.gcp_project)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  return distribute_utils.get_distribution_strategy(
      distribution_strategy=name, num_gpus=num_gpus,
      tpu_address=tpu_address or '')


def run(cfg, strategy=None):
  """Builds the experiment of `cfg` and runs `cfg.mode`.

  Returns the eval result (eval, train_then_eval), the preview PNG's path
  (preview) or None (train).
  """
  strategy = strategy or build_strategy(cfg.distribution)
  experiment = experiment_lib.Experiment(cfg, strategy)
  try:
    experiment.prepare_model_dir()
    if cfg.mode == 'preview':
      return experiment.preview()
    if cfg.mode == 'train':
      experiment.train(experiment.controller(True, False))
      return None
    if cfg.mode == 'train_then_eval':
      controller = experiment.controller(True, True)
      experiment.train(controller)
      return experiment.evaluate(controller, with_knn=True)
    return evaluate_checkpoints(experiment)
  finally:
    experiment.close()


def evaluate_checkpoints(experiment):
  """--mode=eval: evaluates and exports every new checkpoint of model_dir
  until one reaches train_steps."""
  controller = experiment.controller(False, True)
  result = None
  for path in tf.train.checkpoints_iterator(experiment.config.model_dir,
                                            min_interval_secs=15):
    controller.restore_checkpoint(path)
    result = experiment.evaluate(controller)
    experiment.export()
    if result['global_step'] >= experiment.steps.train_steps:
      logging.info('Eval reached train_steps; exiting.')
      break
  return result


def run_from_flags(flag_values):
  """What the command line does with parsed flags: config, seed, run.

  Bad input (`config.ConfigError`, and a full disk) exits with code 2 and a
  one-line message, a deliberate stop (`guards.RunStopped`: preemption, a
  non-finite loss) with its own code; a traceback only with --verbosity ≥ 1.
  """
  verbose = flag_values['verbosity'].value >= 1 if 'verbosity' in flag_values \
      else False
  try:
    cfg = config_lib.from_flags(flag_values)
    if cfg.deterministic:
      tf.config.experimental.enable_op_determinism()
    if cfg.seed is not None:
      tf_keras.utils.set_random_seed(cfg.seed)
    return run(cfg)
  except config_lib.ConfigError as e:
    _exit(2, f'run.py: error: {e}', verbose)
  except guards.RunStopped as e:
    _exit(e.exit_code, f'run.py: {e}', verbose)
  except (OSError, tf.errors.OpError) as e:
    if not experiment_lib.is_disk_full(e):
      raise
    _exit(2, f'run.py: error: {experiment_lib.disk_full_message(e, flag_values.model_dir)}', verbose)


def _exit(code, message, verbose):
  if verbose:
    traceback.print_exc()
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  setup_logging()
  run_from_flags(FLAGS)


if __name__ == '__main__':
  app.run(main)
