"""End to end through run.py (config → experiment → mode) on the embedded
digits data, and bad input through the command-line path."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import checkpoints
import config as config_lib
import data as data_lib
import experiment as experiment_lib
import run
import trainer as trainer_lib
from conftest import two_replica_strategy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    'dataset': 'digits', 'eval_split': 'test', 'image_size': 32,
    'resnet_depth': 18, 'width_multiplier': 0.25, 'proj_out_dim': 16,
    'train_batch_size': 32, 'eval_batch_size': 128, 'warmup_epochs': 0,
    'learning_rate': 0.5, 'checkpoint_steps': 2, 'use_blur': False,
    'train_summary_steps': 0,
}
BACKBONE_ONLY = '(?!global_step|(?:.*/|^)Momentum|head)'


def argv(**overrides):
  return [f'--{k}={v}' for k, v in {**TINY, **overrides}.items()]


def run_flags(strategy=None, **overrides):
  return run.run(config_lib.from_argv(argv(**overrides)), strategy=strategy)


def main_exit(**overrides):
  """Runs the command-line path, which must exit; (exit code, stderr)."""
  stderr = io.StringIO()
  with pytest.raises(SystemExit) as exit_info, \
      contextlib.redirect_stderr(stderr):
    run.run_from_flags(config_lib.parse_argv(argv(**overrides)))
  return exit_info.value.code, stderr.getvalue()


def main_exit_message(**overrides):
  """The one-line message of a bad-input exit (code 2, no traceback)."""
  code, message = main_exit(**overrides)
  assert code == 2, message
  assert 'Traceback' not in message
  return message


def read_checkpoint(path):
  reader = tf.train.load_checkpoint(path)
  return {k: reader.get_tensor(k)
          for k in reader.get_variable_to_shape_map()}


def model_values(values, prefix):
  return {k: v for k, v in values.items()
          if k.startswith(f'model/{prefix}') and
          k.endswith(checkpoints.VALUE_SUFFIX) and '.OPTIMIZER_SLOT' not in k}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """Pretrains 2 steps on 2 replicas, then resumes to exactly step 3."""
  model_dir = str(tmp_path_factory.mktemp('pretrain'))
  run_flags(two_replica_strategy(), model_dir=model_dir, train_steps=2,
            mode='train')
  first = tf.train.latest_checkpoint(model_dir)
  # Resumed on one replica: checkpoints do not depend on the strategy.
  run_flags(model_dir=model_dir, train_steps=3, mode='train')
  return model_dir, first


def test_pretrain_checkpoints_and_resume_stops_exactly(pretrained):
  model_dir, first = pretrained
  assert first.endswith('ckpt-2')
  latest = tf.train.latest_checkpoint(model_dir)
  # checkpoint_steps=2 must not overshoot train_steps=3 to step 4.
  assert latest.endswith('ckpt-3')
  values = read_checkpoint(latest)
  assert values['optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE'] == 3
  before = model_values(read_checkpoint(first), 'base_model')
  after = model_values(values, 'base_model')
  changed = [k for k in before if not np.array_equal(before[k], after[k])]
  assert changed, 'the resumed step did not train'
  assert os.path.isdir(os.path.join(model_dir, 'saved_model', '3'))


def test_finetune_linear_eval_from_checkpoint_then_eval_and_export(
    pretrained, tmp_path):
  pretrain_dir, _ = pretrained
  model_dir = str(tmp_path / 'finetune')
  result = run_flags(
      model_dir=model_dir, train_mode='finetune', fine_tune_after_block=4,
      checkpoint=pretrain_dir, variable_schema=BACKBONE_ONLY,
      zero_init_logits_layer=True, train_steps=2, mode='train_then_eval')

  source = tf.train.latest_checkpoint(pretrain_dir)
  latest = tf.train.latest_checkpoint(model_dir)
  assert latest.endswith('ckpt-2')
  # The frozen backbone (weights and BN statistics) is the pretrained one.
  src = model_values(read_checkpoint(source), 'base_model')
  dst = model_values(read_checkpoint(latest), 'base_model')
  assert src.keys() == dst.keys() and src
  for key in src:
    np.testing.assert_array_equal(src[key], dst[key], err_msg=key)
  # The head trained (from zero) and no projection layer exists.
  ckpt = read_checkpoint(latest)
  head = model_values(ckpt, 'head_supervised')
  assert head and all(np.any(v != 0) for v in head.values())
  assert not model_values(ckpt, 'head_contrastive')

  with open(os.path.join(model_dir, 'result.json')) as f:
    written = json.load(f)
  assert written == pytest.approx(result)
  assert written['global_step'] == 2
  assert written['num_examples'] == 360
  assert 0.0 <= written['label_top_1_accuracy'] <= written[
      'label_top_5_accuracy'] <= 1.0
  with open(os.path.join(model_dir, 'flags.json')) as f:
    assert json.load(f)['fine_tune_after_block'] == 4

  # The exported SavedModel gives the same outputs as the checkpoint.
  loaded = tf.saved_model.load(os.path.join(model_dir, 'saved_model', '2'))
  serve = loaded.signatures['serving_default']
  images = data_lib.get_data_source('digits').arrays('test')[0][:5]
  images = tf.constant(images, tf.float32) / 255.0
  exported = serve(images=images)
  model = experiment_lib.build_model(config_lib.from_argv(argv(
      model_dir=model_dir, train_mode='finetune', fine_tune_after_block=4)),
                                     10)
  model(images, training=False)
  tf.train.Checkpoint(model=model).read(latest).expect_partial()
  expected = model.outputs_dict(images, training=False)
  assert set(exported) == {'features', 'projection', 'logits'}
  for key in expected:
    np.testing.assert_allclose(exported[key].numpy(), expected[key].numpy(),
                               rtol=1e-5, atol=1e-5, err_msg=key)


def test_zero_init_logits_layer_really_zeroes(pretrained, tmp_path):
  """The head is zero when the new run starts (after the warm start, which
  read a trained head from the pretraining checkpoint)."""
  pretrain_dir, _ = pretrained
  cfg = config_lib.from_argv(argv(
      model_dir=str(tmp_path / 'zero'), train_mode='finetune',
      fine_tune_after_block=4, checkpoint=pretrain_dir,
      zero_init_logits_layer=True, train_steps=1, mode='train'))
  experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
  experiment.checkpoint_manager.restore_or_initialize()
  head = experiment.model.supervised_head.trainable_variables
  assert head and all(np.all(v.numpy() == 0) for v in head)
  pretrained_head = model_values(read_checkpoint(
      tf.train.latest_checkpoint(pretrain_dir)), 'head_supervised')
  assert any(np.any(v != 0) for v in pretrained_head.values())


def test_eval_mode_evaluates_latest_checkpoint(pretrained):
  pretrain_dir, _ = pretrained
  result = run_flags(model_dir=pretrain_dir, train_steps=3, mode='eval')
  assert result['global_step'] == 3
  with open(os.path.join(pretrain_dir, 'result_3.json')) as f:
    assert json.load(f)['global_step'] == 3


def test_checkpoint_from_other_depth_is_a_clear_error(pretrained, tmp_path):
  pretrain_dir, _ = pretrained
  message = main_exit_message(
      model_dir=str(tmp_path / 'r34'), train_mode='finetune',
      checkpoint=pretrain_dir, resnet_depth=34, mode='train', train_steps=1)
  assert 'does not fit the model' in message
  assert 'base_model/' in message
  assert not os.path.exists(tmp_path / 'r34' / 'checkpoint')


def test_resume_with_other_model_is_refused_without_damage(pretrained):
  pretrain_dir, _ = pretrained
  listing = sorted(os.listdir(pretrain_dir))
  index = os.path.join(pretrain_dir, 'ckpt-3.index')
  with open(index, 'rb') as f:
    before = f.read()
  message = main_exit_message(model_dir=pretrain_dir, resnet_depth=34,
                              train_steps=5, mode='train')
  assert '--resnet_depth: 18 in flags.json' in message
  # Past the flags check, the checkpoint itself does not fit.
  message = main_exit_message(model_dir=pretrain_dir, resnet_depth=34,
                              train_steps=5, mode='train',
                              allow_flag_changes=True)
  assert 'does not fit the model built from these flags' in message
  assert sorted(os.listdir(pretrain_dir)) == listing
  with open(index, 'rb') as f:
    assert f.read() == before


# ------------------------------------------ bad input: one row per case


def write_images(folder, splits=('train', 'test'), classes=('a', 'b'),
                 per_class=8):
  rng = np.random.default_rng(0)
  for split in splits:
    for cls in classes:
      (folder / split / cls).mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        tf.io.write_file(str(folder / split / cls / f'{i}.jpg'),
                         tf.io.encode_jpeg(image))
  return str(folder)


def folder_with(bad_bytes, split='train', **extra):
  """A folder source with one bad file `bad.jpg` in `split`."""
  def make(tmp_path):
    folder = write_images(tmp_path / 'images')
    target = tmp_path / 'images' / split / 'b' / 'bad.jpg'
    if bad_bytes == 'truncated':
      good = (tmp_path / 'images' / split / 'b' / '0.jpg').read_bytes()
      target.write_bytes(good[:len(good) // 2])
    else:
      target.write_bytes(bad_bytes)
    return {'dataset': folder, 'train_batch_size': 16, **extra}
  return make


def empty_folder(tmp_path):
  (tmp_path / 'images' / 'train').mkdir(parents=True)
  return {'dataset': str(tmp_path / 'images')}


def one_class_folder(tmp_path):
  return {'dataset': write_images(tmp_path / 'images', classes=('a',)),
          'train_batch_size': 8, 'mode': 'train_then_eval'}


def folder_without_test_split(tmp_path):
  return {'dataset': write_images(tmp_path / 'images', splits=('train',)),
          'train_batch_size': 16, 'mode': 'train_then_eval'}


def resume_of_pretrained(**overrides):
  """Resumes the `pretrained` run's model_dir with other flags."""
  def make(tmp_path, pretrained_dir):
    del tmp_path
    return {'model_dir': pretrained_dir, 'train_steps': 5, **overrides}
  make.needs_pretrained = True
  return make


def warm_start_of_pretrained(**overrides):
  def make(tmp_path, pretrained_dir):
    return {'model_dir': str(tmp_path / 'warm'), 'checkpoint': pretrained_dir,
            **overrides}
  make.needs_pretrained = True
  return make


BAD_INPUTS = [
    # Flags.
    ('negative learning rate', {'learning_rate': -0.1}, '--learning_rate'),
    ('zero learning rate', {'learning_rate': 0}, 'must be positive'),
    ('zero temperature', {'temperature': 0}, '--temperature must be'),
    ('negative temperature', {'temperature': -1}, '--temperature must be'),
    ('zero batch', {'train_batch_size': 0}, '--train_batch_size must be'),
    ('negative batch', {'train_batch_size': -4}, '--train_batch_size must'),
    ('zero eval batch', {'eval_batch_size': 0}, '--eval_batch_size must'),
    ('negative epochs', {'train_epochs': -1}, '--train_epochs must not'),
    ('nothing to train', {'train_epochs': 0, 'train_steps': 0},
     'nothing to train'),
    ('negative steps', {'train_steps': -3}, '--train_steps must not'),
    ('1-pixel images', {'image_size': 1}, '--image_size=1 is below 8'),
    ('zero image size', {'image_size': 0}, '--image_size must be positive'),
    ('unknown strategy', {'distribution_strategy': 'foo'},
     "Unknown --distribution_strategy='foo'"),
    ('clusters not integers', {'objective': 'ifnd',
                               'ifnd_num_clusters': '0,abc'},
     '--ifnd_num_clusters=0,abc must be'),
    ('zero clusters', {'objective': 'ifnd', 'ifnd_num_clusters': '0'},
     'clusters'),
    ('unknown objective', {'objective': 'nope'}, 'Unknown --objective'),
    ('frozen blocks when pretraining', {'fine_tune_after_block': 2},
     '--fine_tune_after_block freezes blocks'),
    ('projection selector', {'ft_proj_selector': 5}, '--ft_proj_selector=5'),
    ('eval without head', {'mode': 'eval',
                           'lineareval_while_pretraining': False},
     '--lineareval_while_pretraining'),
    ('negative summary steps', {'train_summary_steps': -1},
     '--train_summary_steps must not be'),
    ('negative projection layers', {'num_proj_layers': -1},
     '--num_proj_layers must not be negative'),
    ('momentum above 1', {'momentum': 1.5}, '--momentum=1.5 must be in'),
    ('negative weight decay', {'weight_decay': -1e-4},
     '--weight_decay must not'),
    ('negative warm-up', {'warmup_epochs': -1}, '--warmup_epochs must not'),
    ('deterministic without seed', {'deterministic': True},
     '--deterministic needs --seed'),
    ('deterministic with RandAugment', {'deterministic': True, 'seed': 1,
                                        'objective': 'fnc',
                                        'support_size': 1},
     '--use_randaugment=false'),
    ('negative skip count', {'skip_nonfinite_steps': -1},
     '--skip_nonfinite_steps must not'),
    ('invalid schema regex', {'variable_schema': '(abc'},
     'is not a valid regex'),
    ('zero kNN neighbours', {'knn_k': 0}, '--knn_k must be at least 1'),
    ('zero crop area', {'crop_area_min': 0}, '--crop_area_min=0.0 must be'),
    ('contradicting SogCLR switch', {'DCL_mode': True, 'objective': 'fnc'},
     '--DCL_mode=true selects --objective=sogclr'),
    ('TPU contradiction', {'use_tpu': False, 'distribution_strategy': 'tpu'},
     '--use_tpu=false contradicts'),
    ('XLA with mirrored replicas', {'jit_compile': True,
                                    'distribution_strategy': 'mirrored'},
     '--jit_compile cannot compile the step of --distribution_strategy='
     'mirrored'),
    ('zero width', {'width_multiplier': 0}, '--width_multiplier must be'),
    ('missing subset file', {'train_subset': '/nonexistent/keys.txt'},
     '--train_subset=/nonexistent/keys.txt: no such file'),
    ('no model_dir', {'model_dir': ''}, '--model_dir is required'),
    ('SogCLR gamma above 1', {'objective': 'sogclr', 'gamma': 1.5}, 'gamma'),
    ('negative support size', {'objective': 'fnc', 'support_size': -1},
     'support'),
    ('negative memory', {'objective': 'fnc', 'memory_multiplier': -1},
     'memory_multiplier'),
    ('missing warm-start checkpoint', {'checkpoint': '/nonexistent/ckpt-1'},
     '/nonexistent/ckpt-1.index'),
    ('batch above the split', {'train_batch_size': 5000},
     'exceeds the 1437 examples'),
    # Data.
    ('unknown dataset', {'dataset': 'not_a_dataset_xyz'}, 'not_a_dataset_xyz'),
    ('TFDS data not prepared', {'dataset': 'cifar10',
                                'data_dir': '/nonexistent_dir'}, 'tfds build'),
    ('missing folder', {'dataset': '/nonexistent/images'}, 'does not exist'),
    ('empty folder', empty_folder, 'No class sub-directories'),
    ('one class', one_class_folder, 'needs at least 2'),
    ('missing split', folder_without_test_split, 'test'),
    ('zero-byte image in train', folder_with(b''), 'bad.jpg'),
    ('truncated image in train', folder_with('truncated'), 'bad.jpg'),
    ('not an image in train', folder_with(b'<html>not a jpeg</html>'),
     'bad.jpg'),
    ('not an image in test', folder_with(b'GIF89a?', split='test',
                                         mode='train_then_eval'), 'bad.jpg'),
    # model_dir and checkpoints.
    ('read-only model_dir', {'model_dir': '/sys/fs/simclr_test_run'},
     'is not writable'),
    ('resume with another depth', resume_of_pretrained(resnet_depth=34),
     '--resnet_depth: 18 in flags.json'),
    ('resume with another batch', resume_of_pretrained(train_batch_size=16),
     '--train_batch_size: 32'),
    ('resume as another objective', resume_of_pretrained(objective='sogclr'),
     '--objective'),
    ('resume as SogCLR anyway', resume_of_pretrained(
        objective='sogclr', allow_flag_changes=True), 'sogclr_u'),
    ('warm start matching nothing', warm_start_of_pretrained(
        train_mode='finetune', variable_schema='nothing_matches_this'),
     'nothing_matches_this'),
]


@pytest.mark.parametrize('gpus, jit_compile, expected', [
    (0, True, 'one_device'), (1, False, 'mirrored'), (1, True, 'one_device'),
    (2, True, 'mirrored')])
def test_detected_strategy(gpus, jit_compile, expected, monkeypatch):
  """Detection: all local GPUs mirrored, except a lone GPU with
  --jit_compile (one device: MirroredStrategy cannot run a compiled step;
  with 2 GPUs Experiment then refuses --jit_compile)."""
  requested = {}
  real = tf.config.list_physical_devices
  monkeypatch.setattr(tf.config, 'list_physical_devices', lambda kind=None: (
      ['GPU'] * gpus if kind == 'GPU' else real(kind)))
  monkeypatch.setattr(run.distribute_utils, 'get_distribution_strategy',
                      lambda **kwargs: requested.update(kwargs))
  run.build_strategy(config_lib.DistributionConfig(jit_compile=jit_compile))
  assert requested['distribution_strategy'] == expected
  assert requested['num_gpus'] == gpus


def test_bad_input_table_has_forty_rows():
  assert len(BAD_INPUTS) >= 40
  assert len({name for name, _, _ in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize('name, setup, expected', BAD_INPUTS,
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_a_one_line_error(name, setup, expected, tmp_path,
                                       request):
  """Exit code 2, the expected words, no traceback, and nothing written or
  changed in a model_dir that already existed."""
  del name
  settings = {'model_dir': str(tmp_path / 'bad'), 'mode': 'train',
              'train_steps': 1}
  if callable(setup):
    if getattr(setup, 'needs_pretrained', False):
      pretrained_dir = request.getfixturevalue('pretrained')[0]
      settings.update(setup(tmp_path, pretrained_dir))
    else:
      settings.update(setup(tmp_path))
  else:
    settings.update(setup)
  model_dir = settings['model_dir']
  before = directory_state(model_dir)
  message = main_exit_message(**settings)
  assert expected in message
  assert directory_state(model_dir) == before


def directory_state(path):
  """{relative path: bytes} of every file below `path` ({} if none)."""
  state = {}
  if not path or not os.path.isdir(path):
    return state
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        state[os.path.relpath(full, path)] = f.read()
  return state


def test_command_line_exit_code(tmp_path):
  """The real CLI: a contradiction exits non-zero before writing anything."""
  proc = subprocess.run(
      [sys.executable, 'run.py', '--dataset=digits',
       f'--model_dir={tmp_path / "cli"}', '--fine_tune_after_block=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert '--fine_tune_after_block freezes blocks' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'cli')


# ------------------------------------------ --train_summary_steps


def train_scalar_steps(model_dir, tag='train/loss'):
  """The steps of the `tag` scalar events in model_dir's own event files."""
  steps = []
  for path in tf.io.gfile.glob(os.path.join(model_dir, 'events.out.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      steps += [event.step for value in event.summary.value
                if value.tag == tag]
  return sorted(steps)


@pytest.mark.parametrize('period, written', [
    (None, [3, 6]),  # unset: every host loop
    (4, [6]),        # the loop (3, 6] reached 4
])
def test_train_summary_steps_is_the_scalar_period(tmp_path, period, written):
  """Six steps in host loops of checkpoint_steps = 3, which the period does
  not shorten: scalars at the first loop boundary at or after each multiple
  of --train_summary_steps. (0 = off: the README commands of
  tests/test_original_commands.py.)"""
  model_dir = str(tmp_path / 'summaries')
  overrides = dict(TINY, model_dir=model_dir, image_size=16,
                   width_multiplier=0.125, train_steps=6, checkpoint_steps=3,
                   mode='train')
  del overrides['train_summary_steps']
  if period is not None:
    overrides['train_summary_steps'] = period
  run.run(config_lib.from_argv([f'--{k}={v}' for k, v in overrides.items()]))
  assert train_scalar_steps(model_dir) == written
  assert train_scalar_steps(model_dir, 'train/learning_rate') == written
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-6')


@pytest.mark.parametrize('period, start, loop_ends, written', [
    (3, 0, [2, 4, 6, 8, 10], [4, 6, 10]),
    (5, 0, [4, 6, 10, 12, 14, 16], [6, 10, 16]),
    (1, 0, [3, 6, 9], [3, 6, 9]),  # shorter than a loop: every loop
    # Resumed at step 3: the first loop, (3, 5], reached 4.
    (4, 3, [5, 7, 9], [5, 9]),
])
def test_periodic_summary_manager_rule(tmp_path, period, start, loop_ends,
                                       written):
  global_step = tf.Variable(start, dtype=tf.int64)
  loop_start = [None]
  manager = trainer_lib.PeriodicSummaryManager(
      str(tmp_path), global_step, period,
      loop_start_step=lambda: loop_start[0])
  for end in loop_ends:
    loop_start[0] = int(global_step.numpy())
    global_step.assign(end)
    manager.write_summaries({'train/loss': 1.0, 'steps_per_second': 2.0})
  manager.flush()
  assert train_scalar_steps(str(tmp_path)) == written
  assert train_scalar_steps(str(tmp_path), 'steps_per_second') == written


# ------------------------------------------ exact resume


RESUME_OBJECTIVES = {
    'simclr': {},
    # The linear head's own optimizer (its slots and step) and its BN.
    'simclr_linear_head': {'linear_head_optimizer': 'adam',
                           'linear_head_learning_rate': 0.01,
                           'linear_head_batch_norm': True},
    'sogclr': {'objective': 'sogclr', 'gamma': 0.9},
    'fnc': {'objective': 'fnc', 'support_size': 1, 'use_randaugment': False,
            'memory_multiplier': 3, 'fn_topk': 2},
    'ifnd': {'objective': 'ifnd', 'memory_multiplier': 2,
             'ifnd_num_clusters': '5', 'ifnd_acceptance': 'constant',
             'ifnd_acceptance_rate': 0.5, 'ifnd_reassign_epochs': 1},
}


def seeded_run(model_dir, train_steps, **overrides):
  """run.py's path for a --seed run: the global seed, then the run."""
  settings = dict(image_size=16, width_multiplier=0.125, train_batch_size=32,
                  checkpoint_steps=2, seed=7, deterministic=True,
                  model_dir=str(model_dir), train_steps=train_steps,
                  mode='train', **overrides)
  cfg = config_lib.from_argv(argv(**settings))
  tf_keras.utils.set_random_seed(cfg.seed)
  run.run(cfg)
  return read_checkpoint(tf.train.latest_checkpoint(str(model_dir)))


def killed_after_step_2(run_dir, killed_dir):
  """A model_dir as a kill after ckpt-2 (and before ckpt-4) leaves it."""
  os.makedirs(killed_dir)
  for name in os.listdir(run_dir):
    if name.startswith('ckpt-2.') or name == 'flags.json':
      with open(os.path.join(run_dir, name), 'rb') as f:
        content = f.read()
      with open(os.path.join(killed_dir, name), 'wb') as f:
        f.write(content)
  with open(os.path.join(killed_dir, 'checkpoint'), 'w') as f:
    f.write('model_checkpoint_path: "ckpt-2"\n'
            'all_model_checkpoint_paths: "ckpt-2"\n')


@pytest.mark.parametrize('objective', sorted(RESUME_OBJECTIVES))
def test_resumed_run_equals_straight_run(objective, tmp_path):
  """--deterministic: 4 steps; the same run killed after its step-2
  checkpoint and resumed to 4 ends equal (every checkpointed value:
  weights, slots, BN statistics, objective state, to 1e-6), and a second
  straight run is bitwise equal."""
  flags = RESUME_OBJECTIVES[objective]
  straight = seeded_run(tmp_path / 'straight', 4, **flags)
  killed_after_step_2(tmp_path / 'straight', tmp_path / 'resumed')
  resumed = seeded_run(tmp_path / 'resumed', 4, **flags)
  again = seeded_run(tmp_path / 'again', 4, **flags)
  assert resumed.keys() == straight.keys() == again.keys()
  for key in straight:
    if key.startswith(('save_counter', '_CHECKPOINTABLE')):
      continue  # bookkeeping of the saves, not state
    np.testing.assert_allclose(resumed[key], straight[key], rtol=0,
                               atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(again[key], straight[key], err_msg=key)


def test_resume_without_seed_continues_the_epoch(tmp_path):
  """No --seed: the example order comes from a seed kept in the checkpoint,
  so 2 steps + restart + 2 steps see 4 · 32 distinct ids (SogCLR's u is
  written for exactly the ids of the global batches): no replay."""
  model_dir = str(tmp_path / 'unseeded')
  flags = dict(image_size=16, width_multiplier=0.125, train_batch_size=32,
               checkpoint_steps=2, objective='sogclr', gamma=0.9,
               model_dir=model_dir, mode='train')
  run_flags(train_steps=2, **flags)
  run_flags(train_steps=4, **flags)
  values = read_checkpoint(tf.train.latest_checkpoint(model_dir))
  u = values['sogclr_u/.ATTRIBUTES/VARIABLE_VALUE']
  seen = set(np.flatnonzero(u).tolist())
  seed = int(values['input_seed/.ATTRIBUTES/VARIABLE_VALUE'])
  input_fn = data_lib.build_input_fn(
      data_lib.get_data_source('digits'), 'train', 32, is_training=True,
      image_size=16, num_views=2, use_blur=False, seed=seed)
  expected = set()
  for batch in input_fn(None).take(4):
    expected.update(batch['id'].numpy().tolist())
  assert len(expected) == 4 * 32
  assert seen == expected


# ------------------------------------------ interrupted work


def test_restart_finishes_an_interrupted_export_and_cleans_up(tmp_path):
  """A kill during the final export leaves no export and a half-written
  saved_model/<step>.tmp (and, from a kill mid-save, ckpt-N_temp and
  checkpoint.tmp<hex>): the restart removes them and exports."""
  model_dir = tmp_path / 'export'
  flags = dict(image_size=16, width_multiplier=0.125, train_steps=2,
               model_dir=str(model_dir), mode='train')
  run_flags(**flags)
  export = model_dir / 'saved_model' / '2'
  tf.io.gfile.rmtree(str(export))
  leftovers = [model_dir / 'saved_model' / '2.tmp', model_dir / 'ckpt-3_temp',
               model_dir / ('checkpoint.tmp' + '0123456789abcdef' * 2)]
  for path in leftovers[:2]:
    path.mkdir()
  leftovers[2].write_text('partial')
  run_flags(**flags)
  assert export.is_dir()
  assert not [path for path in leftovers if path.exists()]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  model_dir = tmp_path / 'corrupt'
  flags = dict(image_size=16, width_multiplier=0.125, train_steps=4,
               checkpoint_steps=2, model_dir=str(model_dir), mode='train')
  run_flags(**flags)
  data = next(model_dir.glob('ckpt-4.data-*'))
  data.write_bytes(data.read_bytes()[:100])
  run_flags(**flags)  # resumes from ckpt-2 and trains steps 3 and 4 again
  values = read_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
  assert values['optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE'] == 4


# ------------------------------------------ log lines of a healthy run

# The lines at WARNING or above that a healthy CPU run may print, each
# explained in README "Log lines you may see" (keep the two lists equal).
ALLOWED_LOG_LINES = (
    # TF probes for a CUDA driver; on a machine without one it logs this
    # E-level line once, then runs on the CPU.
    r'cuda_platform\.cc:\d+\] failed call to cuInit',
    # tf.distribute's own per-device iterator (MultiDeviceIterator) is a
    # generator dataset that tf.data cannot optimise; once per iterator.
    r'Input of GeneratorDatasetOp::Dataset will not be optimized',
)
WARNING_OR_ABOVE = (
    r'^[WEF]\d{4} ',                           # absl (python)
    r'^\d{4}-\d\d-\d\d [\d:.]+: [WEF] ',       # TF C++
    r'^WARNING:', r'\w+Warning: ',             # python logging / warnings
)


def warning_lines(text):
  import re  # pylint: disable=import-outside-toplevel
  return [line for line in text.splitlines()
          if any(re.search(p, line) for p in WARNING_OR_ABOVE) and
          not any(re.search(p, line) for p in ALLOWED_LOG_LINES)]


def test_warning_lines_are_detected():
  assert warning_lines(
      'W1202 01:02:03.000 1 x.py:1] careful\n'
      '2026-12-02 01:02:03.4: E tensorflow/x.cc:9] bad\n'
      'x.py:3: UserWarning: hm\nI1202 01:02:03.000 1 x.py:1] fine\n'
      '2026-12-02 01:02:03.4: E external/local_xla/xla/stream_executor/'
      'cuda/cuda_platform.cc:51] failed call to cuInit: (303)') == [
          'W1202 01:02:03.000 1 x.py:1] careful',
          '2026-12-02 01:02:03.4: E tensorflow/x.cc:9] bad',
          'x.py:3: UserWarning: hm']


@pytest.fixture(scope='module')
def quick_start(tmp_path_factory):
  """The README's quick start command, seeded: (its process, model_dir)."""
  model_dir = tmp_path_factory.mktemp('quick_start') / 'qs'
  proc = subprocess.run(
      [sys.executable, 'run.py', '--flagfile=configs/quickstart.cfg',
       f'--model_dir={model_dir}', '--seed=0'],
      cwd=REPO, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, model_dir


def test_quick_start_logs_cleanly(quick_start):
  """The quick start (225 steps): no line at WARNING or above but the
  explained ones, every orbit event line once (orbit logs and prints each),
  and the final line names both numbers, also in result.json."""
  proc, model_dir = quick_start
  output = proc.stdout + proc.stderr
  assert warning_lines(output) == []
  events = [line.strip() for line in output.splitlines()
            if ' | step: ' in line or 'saved checkpoint to' in line]
  assert any('train | step:    225' in line for line in events), events
  for line in events:
    assert sum(line in other for other in output.splitlines()) == 1, line
  final = [line for line in proc.stdout.splitlines()
           if line.startswith('Eval at step 225')]
  assert len(final) == 1
  assert 'linear head trained alongside (not a linear evaluation)' in final[0]
  assert 'kNN (k=200, τ=0.1) of the final encoder: top-1 ' in final[0]
  with open(model_dir / 'result.json') as f:
    result = json.load(f)
  assert 0.0 <= result['knn_top_1_accuracy'] <= 1.0
  assert (result['knn_k'], result['knn_temperature']) == (200, 0.1)
  assert f'top-1 {result["knn_top_1_accuracy"]:.4f}' in final[0]


def test_quick_start_head_is_within_3_points_of_a_linear_evaluation(
    quick_start):
  """Issue 14: the head accuracy the quick start prints (its own adam at a
  constant rate, on clean views) is within 3 points of evaluate.py's
  logistic regression on the same checkpoint, and its kNN is evaluate.py's
  kNN; both well above chance (10 %)."""
  proc, model_dir = quick_start
  with open(model_dir / 'result.json') as f:
    result = json.load(f)
  printed = [line for line in proc.stdout.splitlines()
             if line.startswith('Eval at step 225')][0]
  head = result['label_top_1_accuracy']
  assert f'alongside (not a linear evaluation): top-1 {head:.4f}' in printed
  evaluation = subprocess.run(
      [sys.executable, 'evaluate.py', '--flagfile=configs/quickstart.cfg',
       f'--checkpoint={model_dir}', '--protocols=knn,linear'],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  with open(model_dir / 'feature_eval.json') as f:
    offline = json.load(f)
  linear = offline['linear']['top_1']
  assert linear > 0.8 and head > 0.8
  assert abs(head - linear) <= 0.03, (head, linear)
  assert offline['knn']['top_1'] == pytest.approx(
      result['knn_top_1_accuracy'], abs=1e-6)
