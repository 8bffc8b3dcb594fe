"""Warm start with --variable_schema, fit checks and SavedModel export."""

import os

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import lars_optimizer
import model as model_lib

BACKBONE_ONLY = '(?!global_step|(?:.*/|^)Momentum|head)'
ALL_BUT_LINEAR_HEAD = '(?!global_step|(?:.*/|^)Momentum|head_supervised)'


def tiny_model(num_classes=10, depth=18, **kwargs):
  model = model_lib.Model(num_classes, resnet_depth=depth,
                          width_multiplier=0.125, cifar_stem=True,
                          proj_out_dim=8, **kwargs)
  model(tf.zeros([1, 16, 16, 3]), training=False)
  return model


def randomise(model, seed):
  rng = np.random.default_rng(seed)
  for variable in model.variables:
    variable.assign(rng.normal(size=variable.shape).astype(np.float32))


def saved(model, tmp_path, seed=1):
  randomise(model, seed)
  return tf.train.Checkpoint(model=model).write(str(tmp_path / 'src'))


def values_by_prefix(model):
  out = {}
  for name, variable in model_lib.variable_paths(model).items():
    out[name] = variable.numpy().copy()
  return out


@pytest.mark.parametrize('schema, restored_prefixes', [
    ('?!global_step', ('base_model/', 'head_contrastive/', 'head_supervised/')),
    (BACKBONE_ONLY, ('base_model/',)),
    (ALL_BUT_LINEAR_HEAD, ('base_model/', 'head_contrastive/')),
])
def test_schema_selects_what_is_restored(tmp_path, schema, restored_prefixes):
  path = saved(tiny_model(), tmp_path)
  source_model = tiny_model()
  tf.train.Checkpoint(model=source_model).read(path).expect_partial()
  source = values_by_prefix(source_model)

  target = tiny_model()
  randomise(target, seed=2)
  before = values_by_prefix(target)
  restored = checkpoints.warm_start(target, path, schema)
  after = values_by_prefix(target)
  assert restored, 'nothing restored'
  for name in after:
    if name.startswith(restored_prefixes):
      assert name in restored
      np.testing.assert_array_equal(after[name], source[name], err_msg=name)
    else:
      assert name not in restored
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_bare_negative_lookahead_is_accepted():
  pattern = checkpoints.compile_schema('?!global_step')
  assert pattern.match('base_model/x/kernel')
  assert not pattern.match('global_step')
  with pytest.raises(ValueError, match='not a valid regex'):
    checkpoints.compile_schema('(unclosed')


def test_different_depth_is_an_error_naming_variables(tmp_path):
  path = saved(tiny_model(depth=18), tmp_path)
  target = tiny_model(depth=34)
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    checkpoints.check_warm_start_fits(target, path, BACKBONE_ONLY)
  assert 'base_model/block_groups/' in str(info.value)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='does not fit the model built from these flags'):
    checkpoints.check_resume_fits(target, path)


def test_deeper_checkpoint_is_an_error_naming_its_extra_blocks(tmp_path):
  """A ResNet-34 checkpoint holds all of a ResNet-18's variables and more:
  loading only the first blocks would be silently wrong."""
  path = saved(tiny_model(depth=34), tmp_path)
  target = tiny_model(depth=18)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='Backbone variables of the checkpoint not in the '
                     r'model:\n  base_model/block_groups/0/blocks/2/'):
    checkpoints.check_warm_start_fits(target, path, BACKBONE_ONLY)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='In the checkpoint, not in the model'):
    checkpoints.check_resume_fits(target, path)


def test_checkpoint_variables_skips_slots_and_step(tmp_path):
  model = tiny_model()
  optimizer = lars_optimizer.build_optimizer('lars', 0.1)
  variables = model.trainable_variables
  optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
  path = tf.train.Checkpoint(model=model, optimizer=optimizer,
                             global_step=tf.Variable(3)).write(
                                 str(tmp_path / 'ckpt'))
  slots = [k for k in tf.train.load_checkpoint(path).get_variable_to_shape_map()
           if '.OPTIMIZER_SLOT' in k]
  assert len(slots) == len(variables)
  _, saved_names = checkpoints.checkpoint_variables(path)
  assert sorted(saved_names) == sorted(model_lib.variable_paths(model))


def test_other_num_classes_needs_the_head_excluded(tmp_path):
  path = saved(tiny_model(num_classes=10), tmp_path)
  target = tiny_model(num_classes=7)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'head_supervised/linear_layer/dense/kernel: model \[64, 7\]'):
    checkpoints.warm_start(target, path, '?!global_step')
  restored = checkpoints.warm_start(target, path, ALL_BUT_LINEAR_HEAD)
  assert not any(name.startswith('head_supervised/') for name in restored)


def test_missing_head_is_left_initialised(tmp_path):
  path = saved(tiny_model(lineareval_while_pretraining=False), tmp_path)
  target = tiny_model(train_mode='finetune')
  head_before = target.head_supervised.get_weights()
  restored = checkpoints.warm_start(target, path, '?!global_step')
  assert any(name.startswith('base_model/') for name in restored)
  for before, after in zip(head_before, target.head_supervised.get_weights()):
    np.testing.assert_array_equal(before, after)


def test_resolve_checkpoint_path(tmp_path):
  path = saved(tiny_model(), tmp_path)
  assert checkpoints.resolve_checkpoint_path(path) == path
  with pytest.raises(FileNotFoundError, match='without a checkpoint'):
    checkpoints.resolve_checkpoint_path(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='no such checkpoint'):
    checkpoints.resolve_checkpoint_path(str(tmp_path / 'nope'))
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(model=tiny_model()), str(tmp_path / 'dir'), 2)
  written = manager.save(checkpoint_number=7)
  assert checkpoints.resolve_checkpoint_path(str(tmp_path / 'dir')) == written


def test_export_keeps_newest_and_matches_model(tmp_path):
  model = tiny_model()
  randomise(model, seed=3)
  for step in (1, 2, 3):
    checkpoints.export_saved_model(model, str(tmp_path), step, keep_max=2)
  assert sorted(os.listdir(tmp_path / 'saved_model')) == ['2', '3']
  loaded = tf.saved_model.load(str(tmp_path / 'saved_model' / '3'))
  images = tf.random.uniform([4, 16, 16, 3], seed=0)
  exported = loaded.signatures['serving_default'](images=images)
  expected = model.outputs_dict(images, training=False)
  for key in ('features', 'projection', 'logits'):
    np.testing.assert_allclose(exported[key].numpy(), expected[key].numpy(),
                               rtol=1e-5, atol=1e-5)
