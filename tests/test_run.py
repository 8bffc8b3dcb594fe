"""End to end through run.py (config → experiment → mode) on the embedded
digits data, and bad input through the command-line path."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

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


def main_exit_message(**overrides):
  """Runs the command-line path; returns the message it exits with (must
  exit)."""
  with pytest.raises(SystemExit) as exit_info:
    run.run_from_flags(config_lib.parse_argv(argv(**overrides)))
  assert exit_info.value.code not in (0, None)
  return str(exit_info.value.code)


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
  pretrain_dir, _ = pretrained
  model_dir = str(tmp_path / 'zero')
  run_flags(model_dir=model_dir, train_mode='finetune',
            fine_tune_after_block=4, checkpoint=pretrain_dir,
            zero_init_logits_layer=True, learning_rate=0.0, weight_decay=0.0,
            train_steps=1, mode='train')
  head = model_values(read_checkpoint(tf.train.latest_checkpoint(model_dir)),
                      'head_supervised')
  assert head and all(np.all(v == 0) for v in head.values())


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
  assert 'does not fit the model built from these flags' in message
  assert sorted(os.listdir(pretrain_dir)) == listing
  with open(index, 'rb') as f:
    assert f.read() == before


@pytest.mark.parametrize('overrides, expected', [
    ({'fine_tune_after_block': 2}, '--fine_tune_after_block freezes blocks'),
    ({'ft_proj_selector': 5}, '--ft_proj_selector=5'),
    ({'mode': 'eval', 'lineareval_while_pretraining': False},
     '--lineareval_while_pretraining'),
    ({'train_summary_steps': -1}, '--train_summary_steps must not be'),
    ({'num_proj_layers': -1}, '--num_proj_layers must not be negative'),
    ({'objective': 'nope'}, 'Unknown --objective'),
    ({'checkpoint': '/nonexistent/ckpt-1'}, '/nonexistent/ckpt-1.index'),
    ({'dataset': 'not_a_dataset_xyz'}, 'not_a_dataset_xyz'),
    ({'dataset': 'cifar10', 'data_dir': '/nonexistent_dir'},
     'tfds build'),
    ({'dataset': '/nonexistent/images'}, 'does not exist'),
    ({'train_batch_size': 5000}, 'exceeds the 1437 examples'),
])
def test_bad_flags_exit_with_clear_message(tmp_path, overrides, expected):
  settings = {'model_dir': str(tmp_path / 'bad'), 'mode': 'train',
              'train_steps': 1, **overrides}
  message = main_exit_message(**settings)
  assert expected in message
  assert not os.path.exists(tmp_path / 'bad' / 'checkpoint')


def test_unreadable_image_is_named(tmp_path):
  folder = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for cls in ('a', 'b'):
      (folder / split / cls).mkdir(parents=True)
      for i in range(8):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        tf.io.write_file(str(folder / split / cls / f'{i}.png'),
                         tf.io.encode_png(image))
  (folder / 'train' / 'b' / 'broken.jpg').write_bytes(b'not a jpeg')
  message = main_exit_message(
      dataset=str(folder), model_dir=str(tmp_path / 'm'), train_batch_size=16,
      train_steps=2, mode='train')
  assert 'broken.jpg' in message
  assert '--skip_corrupt_images' in message


def test_command_line_exit_code(tmp_path):
  """The real CLI: a contradiction exits non-zero before writing anything."""
  proc = subprocess.run(
      [sys.executable, 'run.py', '--dataset=digits',
       f'--model_dir={tmp_path / "cli"}', '--fine_tune_after_block=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert '--fine_tune_after_block freezes blocks' in proc.stderr
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
