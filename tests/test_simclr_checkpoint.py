"""Compatibility with the original SimCLR TF2 code (google-research/simclr,
tf2/), checked against its reference artifacts (../shared/reference/
simclr_tf2, README there):

* the name map places every model variable of every released architecture
  onto this model built with the same flags, and back;
* its tiny `init` checkpoint warm-starts this model, and 4 training steps on
  the recorded batches reproduce the recorded losses, learning rates,
  outputs, weights, BN statistics and Momentum slots;
* the export has the original's hub-style interface
  (savedmodel_outputs.json), usable for linear evaluation as its README
  shows.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import checkpoints
import config as config_lib
import data as data_lib
import experiment as experiment_lib
import features
import lars_optimizer
import model as model_lib
import simclr_checkpoint
import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(REPO, '..', 'shared', 'reference', 'simclr_tf2')
needs_reference = pytest.mark.skipif(
    not os.path.isdir(REF),
    reason=f'SimCLR TF2 reference artifacts not found at {REF} (the '
    'shared/reference/simclr_tf2 folder beside the repository)')

BACKBONE_ONLY = '(?!global_step|(?:.*/|^)Momentum|head)'
ALL_BUT_LINEAR_HEAD = '(?!global_step|(?:.*/|^)Momentum|head_supervised)'
SLOT = '/.OPTIMIZER_SLOT/optimizer/Momentum'


def _reference(name):
  return os.path.join(REF, name)


def _load_json(name):
  with open(_reference(name)) as f:
    return json.load(f)


def _architectures():
  """architectures.json, or one placeholder that `needs_reference` skips."""
  if not os.path.isdir(REF):
    return [{'arch': 'reference_missing'}]
  return _load_json('architectures.json')


def _flags(argv):
  return dict(arg[2:].split('=', 1) for arg in argv)


def _zeros_creator(next_creator, **kwargs):
  """Variables start at zero: no random draws for 877M parameters."""
  shape, dtype = kwargs.get('shape'), kwargs.get('dtype')
  if shape is not None and dtype is not None:
    kwargs['initial_value'] = lambda: tf.zeros(shape, dtype)
  return next_creator(**kwargs)


def _model_of(flags, num_classes=1000):
  """Our model built with the reference run's flags (variables only: one
  inference pass on a 16-pixel image, enough to create every variable)."""
  with tf.variable_creator_scope(_zeros_creator):
    model = model_lib.Model(
        num_classes, resnet_depth=int(flags['resnet_depth']),
        width_multiplier=float(flags['width_multiplier']),
        cifar_stem=int(flags['image_size']) <= 32,
        sk_ratio=float(flags['sk_ratio']), se_ratio=float(flags['se_ratio']),
        proj_out_dim=int(flags['proj_out_dim']),
        num_proj_layers=int(flags['num_proj_layers']))
    model(tf.zeros([1, 16, 16, 3]), training=False)
  return model


def _read_listing(name):
  """{key: shape} of a variables_*.txt listing."""
  listing = {}
  with open(_reference(name)) as f:
    for line in f:
      key, shape = line.rstrip('\n').split('\t')
      listing[key] = json.loads(shape)
  return listing


def _assert_map_is_one_to_one(model, shapes):
  """Every model variable of the original checkpoint `shapes` ({key:
  shape}) lands on a variable of `model` with its shape, and every variable
  of `model` gets one; the trainable sets agree (the original saves a
  Momentum slot for each of its trainable variables)."""
  names = simclr_checkpoint.variable_names(shapes)
  ours = model_lib.variable_paths(model)
  assert len(names) == len(simclr_checkpoint.model_variable_keys(shapes))
  assert sorted(set(names) - set(ours)) == []
  assert sorted(set(ours) - set(names)) == []
  for name, key in names.items():
    assert list(shapes[key]) == ours[name].shape.as_list(), (name, key)
  with_slot = {name for name, key in names.items()
               if key.replace(simclr_checkpoint.VALUE_SUFFIX,
                              SLOT + simclr_checkpoint.VALUE_SUFFIX) in shapes}
  trainable = {name for name, var in ours.items() if var.trainable}
  if any(SLOT in key for key in shapes):
    assert with_slot == trainable
  return names


# ---------------------------------------------------------------------------
# The name map.
# ---------------------------------------------------------------------------


@needs_reference
@pytest.mark.parametrize('arch', _architectures(), ids=lambda a: a['arch'])
def test_name_map_covers_a_released_architecture(arch):
  model = _model_of(_flags(arch['argv']))
  listing = _read_listing(arch['file'])
  names = _assert_map_is_one_to_one(model, listing)
  assert len(names) == arch['model_variables']
  count = lambda vs: sum(v.shape.num_elements() for v in vs)
  assert count(model.trainable_variables) == arch['trainable_params']
  assert (count(model.base_model.trainable_variables) ==
          arch['backbone_trainable_params'])


@needs_reference
def test_tiny_cifar_model_maps_and_lars_treats_each_variable_the_same():
  """variables_tiny.tsv: the ResNet-18 (CIFAR stem) of the trajectory; per
  variable, LARS weight decay, trust ratio and the explicit L2 term apply
  exactly where the original applies them."""
  traj = _load_json('trajectory.json')
  flags = _flags(traj['argv'])
  flags['width_multiplier'] = traj['width_multiplier_assigned']
  model = _model_of(flags, traj['num_classes'])
  with open(_reference('variables_tiny.tsv')) as f:
    header, *rows = [line.rstrip('\n').split('\t') for line in f]
  rows = [dict(zip(header, row)) for row in rows]
  shapes = {r['checkpoint_key']: [int(d) for d in r['shape'].split('x')]
            for r in rows}
  names = _assert_map_is_one_to_one(model, shapes)
  ours = model_lib.variable_paths(model)
  optimizer = lars_optimizer.build_optimizer('lars', 0.1, weight_decay=1e-4)
  l2_ids = {id(v) for v in model.trainable_variables
            if 'head_supervised' in v.name and 'bias' not in v.name}
  by_key = {key: name for name, key in names.items()}
  for row in rows:
    var = ours[by_key[row['checkpoint_key']]]
    assert var.trainable == (row['trainable'] == '1'), var.name
    if not var.trainable:
      continue
    assert optimizer._use_weight_decay(var) == (  # pylint: disable=protected-access
        row['lars_weight_decay'] == '1'), var.name
    assert optimizer._do_layer_adaptation(var) == (  # pylint: disable=protected-access
        row['lars_trust_ratio'] == '1'), var.name
    assert (id(var) in l2_ids) == (row['l2_in_loss'] == '1'), var.name
  # The term itself is computed by the project's helper from these names.
  expected = 1e-4 * sum(float(tf.nn.l2_loss(v)) for v in model.trainable_variables
                        if id(v) in l2_ids)
  np.testing.assert_allclose(
      float(lars_optimizer.weight_decay_loss(model.trainable_variables,
                                             'lars', 1e-4)), expected,
      rtol=1e-6)


def test_a_key_outside_the_map_is_an_error_naming_it():
  good = {
      'model/resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel'
      '/.ATTRIBUTES/VARIABLE_VALUE': [3, 3, 3, 8],
      'model/supervised_head/linear_layer/dense/bias/.ATTRIBUTES/'
      'VARIABLE_VALUE': [10],
      'global_step/.ATTRIBUTES/VARIABLE_VALUE': [],
      'model/supervised_head/linear_layer/dense/bias/.OPTIMIZER_SLOT/'
      'optimizer/Momentum/.ATTRIBUTES/VARIABLE_VALUE': [10],
  }
  assert simclr_checkpoint.variable_names(good) == {
      'base_model/stem/stem_layers/0/conv2d/kernel': list(good)[0],
      'head_supervised/linear_layer/dense/bias': list(good)[1]}
  # A DropBlock index (no variables in the original) and an unknown layer.
  odd = ['model/resnet_model/block_groups/0/layers/0/'
         'conv_relu_dropblock_layers/2/conv2d/kernel/.ATTRIBUTES/'
         'VARIABLE_VALUE',
         'model/_projection_head/linear_layers/0/extra/kernel/.ATTRIBUTES/'
         'VARIABLE_VALUE']
  with pytest.raises(simclr_checkpoint.UnmappedKeyError) as info:
    simclr_checkpoint.variable_names({**good, **{k: [1] for k in odd}})
  for key in odd:
    assert key in str(info.value)
  assert list(good)[0] not in str(info.value)


def _nested(values):
  """A trackable tree whose checkpoint keys are the '/' paths of `values`."""
  root = tf.Module()
  for path, value in values.items():
    node = root
    *parents, leaf = path.split('/')
    for part in parents:
      if not hasattr(node, part):
        setattr(node, part, tf.Module())
      node = getattr(node, part)
    setattr(node, leaf, tf.Variable(value))
  return root


def test_an_unmapped_key_stops_the_warm_start(tmp_path):
  model = model_lib.Model(10, resnet_depth=18, width_multiplier=0.125,
                          cifar_stem=True)
  model(tf.zeros([1, 16, 16, 3]), training=False)
  root = _nested({'resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel':
                  np.zeros([3, 3, 3, 8], np.float32),
                  'resnet_model/mystery/kernel': np.zeros([2], np.float32)})
  path = tf.train.Checkpoint(model=root).write(str(tmp_path / 'odd'))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='model/resnet_model/mystery/kernel'):
    checkpoints.check_warm_start_fits(model, path, '?!global_step')


# ---------------------------------------------------------------------------
# Warm start and the 4-step trajectory.
# ---------------------------------------------------------------------------


def _trajectory_config(tmp_path):
  """Our config from the reference run's argv (same flags; the width it
  assigned programmatically; its batches instead of a dataset)."""
  traj = _load_json('trajectory.json')
  argv = [a for a in traj['argv']
          if not a.startswith(('--model_dir=', '--width_multiplier='))]
  argv += [f'--width_multiplier={traj["width_multiplier_assigned"]}',
           f'--model_dir={tmp_path}', '--dataset=digits']
  return traj, config_lib.from_argv(argv)


@pytest.fixture(scope='module')
def trajectory(tmp_path_factory):
  """The reference's `init` restored into our model, then 4 steps of our
  Trainer on batches.npz with the reference's flags and N = 64."""
  traj, cfg = _trajectory_config(tmp_path_factory.mktemp('trajectory'))
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  num_examples = traj['num_train_examples']
  steps = experiment_lib.plan_steps(cfg, num_examples)
  with strategy.scope():
    model = experiment_lib.build_model(cfg, traj['num_classes'])
    model(tf.zeros([1, 16, 16, 6]), training=False)
    optimizer = experiment_lib.build_optimizer(cfg, num_examples,
                                               steps.train_steps)
  restored = checkpoints.warm_start(model, _reference('init'),
                                    cfg.checkpoint.variable_schema)
  batches = np.load(_reference('batches.npz'))
  eval_images = tf.constant(batches['eval_images'])
  outputs_init = {k: v.numpy() for k, v in
                  model.simclr_outputs(eval_images).items()}
  images = batches['images'].reshape((-1,) + batches['images'].shape[2:])
  labels = batches['labels'].reshape(-1).astype(np.int32)
  dataset = tf.data.Dataset.from_tensor_slices({
      'image': images, 'label': labels,
      'id': np.arange(len(labels), dtype=np.int32)})
  dataset = strategy.experimental_distribute_dataset(
      dataset.batch(batches['images'].shape[1], drop_remainder=True))
  trainer = trainer_lib.Trainer(
      strategy, model, optimizer,
      experiment_lib.build_objective(cfg, num_examples), dataset,
      train_mode=cfg.train_mode, optimizer_name=cfg.optimizer.name,
      weight_decay=cfg.optimizer.weight_decay)
  per_step = []
  for _ in traj['steps']:
    applied = float(optimizer.learning_rate(optimizer.iterations))
    results = {k: float(v) for k, v in trainer.train(tf.constant(1)).items()}
    per_step.append(dict(results, learning_rate_applied=applied))
  return {'traj': traj, 'cfg': cfg, 'model': model, 'optimizer': optimizer,
          'restored': restored, 'steps': steps, 'per_step': per_step,
          'outputs_init': outputs_init, 'eval_images': eval_images,
          'outputs_step4': {k: v.numpy() for k, v in
                            model.simclr_outputs(eval_images).items()}}


@needs_reference
def test_init_restores_every_variable_and_gives_its_outputs(trajectory):
  assert len(trajectory['restored']) == trajectory['traj'][
      'num_model_variables']
  expected = np.load(_reference('outputs_init.npz'))
  assert set(expected) <= set(trajectory['outputs_init'])
  for key in expected:
    np.testing.assert_allclose(trajectory['outputs_init'][key],
                               expected[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)


@needs_reference
def test_four_steps_reproduce_losses_and_learning_rates(trajectory):
  traj, optimizer = trajectory['traj'], trajectory['optimizer']
  assert trajectory['steps'].train_steps == traj[
      'train_steps_total_for_schedule']
  schedule = optimizer.learning_rate
  assert schedule.warmup_steps == traj['warmup_steps']
  np.testing.assert_allclose(
      [float(schedule(t)) for t in range(len(traj['learning_rate_schedule']))],
      traj['learning_rate_schedule'], rtol=1e-6, atol=1e-9)
  names = {'total_loss': 'loss', 'contrast_loss': 'contrast_loss',
           'supervised_loss': 'supervised_loss',
           'weight_decay': 'weight_decay', 'contrast_acc': 'contrast_acc',
           'contrast_entropy': 'contrast_entropy',
           'supervised_acc': 'supervised_acc'}
  for ours, theirs in zip(trajectory['per_step'], traj['steps']):
    assert ours['learning_rate_applied'] == pytest.approx(
        theirs['learning_rate_applied'], abs=1e-9)
    for ref_name, our_name in names.items():
      assert ours['train/' + our_name] == pytest.approx(
          theirs[ref_name], abs=1e-5, rel=1e-6), (theirs['step'], ref_name)
  assert int(optimizer.iterations.numpy()) == 4


@needs_reference
def test_four_steps_reproduce_weights_statistics_slots_and_outputs(
    trajectory):
  """Step-4 tensors against the reference's step4 checkpoint. Kernels
  adapted by LARS move by ~1e-5 only, so the updates Δ = w4 − w0 are
  compared, relative to |Δ| (the reference's own run-to-run noise is up to
  1.2e-4 of |Δ|)."""
  model, optimizer = trajectory['model'], trajectory['optimizer']
  step4 = tf.train.load_checkpoint(_reference('step4'))
  init = tf.train.load_checkpoint(_reference('init'))
  assert step4.get_tensor('global_step' + simclr_checkpoint.VALUE_SUFFIX) == 4
  names = simclr_checkpoint.variable_names(step4.get_variable_to_shape_map())
  ours = model_lib.variable_paths(model)
  assert set(names) == set(ours)
  moved = 0
  for name, key in names.items():
    var = ours[name]
    before, after = init.get_tensor(key), step4.get_tensor(key)
    reference_update = after - before
    update = var.numpy() - before
    scale = np.linalg.norm(reference_update)
    if scale > 0:
      moved += 1
    assert np.linalg.norm(update - reference_update) <= 1e-3 * scale + 1e-7, \
        name
    np.testing.assert_allclose(var.numpy(), after, rtol=1e-5, atol=1e-6,
                               err_msg=name)
    if var.trainable:
      slot = step4.get_tensor(key.replace(
          simclr_checkpoint.VALUE_SUFFIX, SLOT + simclr_checkpoint.VALUE_SUFFIX))
      ours_slot = optimizer.get_slot(var, 'Momentum').numpy()
      assert (np.linalg.norm(ours_slot - slot) <=
              1e-3 * np.linalg.norm(slot) + 1e-9), name
  assert moved > len(names) // 2
  expected = np.load(_reference('outputs_step4.npz'))
  for key in expected:
    np.testing.assert_allclose(trajectory['outputs_step4'][key],
                               expected[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)


@needs_reference
@pytest.mark.parametrize('schema, prefixes', [
    ('?!global_step', ('base_model/', 'head_contrastive/', 'head_supervised/')),
    (BACKBONE_ONLY, ('base_model/',)),
    (ALL_BUT_LINEAR_HEAD, ('base_model/', 'head_contrastive/')),
])
def test_variable_schema_selects_from_an_original_checkpoint(
    tmp_path, schema, prefixes):
  _, cfg = _trajectory_config(tmp_path)
  model = experiment_lib.build_model(cfg, 10)
  model(tf.zeros([1, 16, 16, 3]), training=False)
  restored = checkpoints.warm_start(model, _reference('init'), schema)
  every = model_lib.variable_paths(model)
  assert sorted(restored) == sorted(n for n in every if n.startswith(prefixes))


@needs_reference
def test_original_checkpoint_of_other_flags_is_refused_by_name(tmp_path):
  _, cfg = _trajectory_config(tmp_path)
  for changes, message in [
      (dict(resnet_depth=34), 'Backbone variables not in the checkpoint'),
      (dict(width_multiplier=0.5), 'Shape mismatches'),
      (dict(sk_ratio=0.0625),
       'Backbone variables of the checkpoint not in the model:\n  '
       'base_model/block_groups/0/blocks/0/shortcut_layers/0/conv2d/kernel')]:
    other = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **changes))
    model = experiment_lib.build_model(other, 10)
    model(tf.zeros([1, 16, 16, 3]), training=False)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=message):
      checkpoints.check_warm_start_fits(model, _reference('init'),
                                        BACKBONE_ONLY)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='original SimCLR TF2 code'):
    checkpoints.check_resume_fits(model, _reference('init'))


@needs_reference
def test_evaluate_reads_an_original_checkpoint(trajectory):
  """features.restore_encoder (evaluate.py --checkpoint) on `init`."""
  flags = _flags(trajectory['traj']['argv'])
  model = features.build_encoder_model(
      layer=-1, resnet_depth=int(flags['resnet_depth']),
      width_multiplier=trajectory['traj']['width_multiplier_assigned'],
      cifar_stem=True, image_size=16)
  assert features.restore_encoder(model, _reference('init'), layer=-1) == \
      _reference('init')
  expected = np.load(_reference('outputs_init.npz'))
  images = trajectory['eval_images']
  for layer, key in ((0, 'final_avg_pool'), (-1, 'proj_head_output')):
    np.testing.assert_allclose(
        features.model_encoder(model, layer)(images).numpy(), expected[key],
        rtol=1e-4, atol=1e-5, err_msg=key)


# ---------------------------------------------------------------------------
# The export's hub-style interface.
# ---------------------------------------------------------------------------


@needs_reference
def test_export_has_the_original_outputs(trajectory, tmp_path):
  """savedmodel_outputs.json: names, shapes, dtypes and call forms of the
  original's export of the step-4 tiny model, and its values."""
  reference = _load_json('savedmodel_outputs.json')
  model = trajectory['model']
  path = checkpoints.export_saved_model(model, str(tmp_path), 4, 1)
  loaded = tf.saved_model.load(path)
  images = trajectory['eval_images']
  outputs = loaded(images, trainable=False)
  assert sorted(outputs) == sorted(reference['outputs'])
  for name, shape in reference['outputs'].items():
    assert outputs[name].shape.as_list() == shape, name
    assert outputs[name].dtype.name == reference['outputs_dtype'][name], name
  expected = np.load(_reference('outputs_step4.npz'))
  for name in expected:
    np.testing.assert_allclose(outputs[name].numpy(), expected[name],
                               rtol=1e-4, atol=1e-5, err_msg=name)
  # Our serving signature is still there, with its keys.
  serving = loaded.signatures['serving_default'](images=images)
  assert sorted(serving) == ['features', 'logits', 'projection']
  np.testing.assert_allclose(serving['features'].numpy(),
                             expected['final_avg_pool'], rtol=1e-4, atol=1e-5)
  # The other call forms the reference records.
  assert sorted(loaded(images, False)) == sorted(reference['outputs'])
  other_size = loaded(tf.zeros([2, 24, 24, 3]), trainable=False)
  assert other_size['block_group1'].shape.as_list() == [2, 24, 24, 16]
  with pytest.raises((ValueError, TypeError)):
    loaded(tf.zeros([2, 16, 16, 6]), trainable=False)
  # Gradients reach every trainable variable, as for the original.
  variables = loaded.trainable_variables_list
  assert len(variables) == reference['num_trainable_variables']
  for trainable in (False, True):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(loaded(images, trainable)['proj_head_output'])
    assert all(g is not None for g in tape.gradient(loss, variables))
  # trainable=True ran on batch statistics and moved the BN averages.
  after = loaded(images, trainable=False)['final_avg_pool'].numpy()
  assert not np.allclose(after, expected['final_avg_pool'], atol=1e-3)


@pytest.mark.parametrize('stem', ['cifar', 'standard', 'resnet_d'])
def test_simclr_outputs_name_the_stem_and_blocks(stem):
  """initial_conv is the output of the stem's conv named initial_conv (the
  last conv, before its BN), initial_max_pool the stem's output, as the
  original's identity layers of those names mark them."""
  model = model_lib.Model(10, resnet_depth=50, width_multiplier=0.125,
                          cifar_stem=stem == 'cifar',
                          sk_ratio=0.0625 if stem == 'resnet_d' else 0.0)
  images = tf.random.stateless_uniform([2, 32, 32, 3], seed=[1, 2])
  outputs = model.simclr_outputs(images)
  x, initial_conv = images, None
  for layer in model.base_model.stem.stem_layers:
    x = layer(x, training=False)
    if layer.name == 'initial_conv':
      initial_conv = x
  side = 32 if stem == 'cifar' else 16
  assert outputs['initial_conv'].shape == (2, side, side, 8)
  np.testing.assert_allclose(outputs['initial_conv'], initial_conv, atol=1e-6)
  np.testing.assert_allclose(outputs['initial_max_pool'], x, atol=1e-6)
  side = 32 if stem == 'cifar' else 8
  for i in range(1, 5):
    assert outputs[f'block_group{i}'].shape == (
        2, side, side, 32 * 2**(i - 1)), i
    side = -(-side // 2)
  np.testing.assert_allclose(outputs['final_avg_pool'],
                             model.base_model(images, training=False),
                             atol=1e-6)
  assert outputs['proj_head_input'] is outputs['final_avg_pool']
  assert outputs['logits_sup'].shape == (2, 10)


@pytest.mark.parametrize('export_format, callable_, signatures', [
    ('serving', False, ['serving_default']),
    ('hub', True, []),
])
def test_export_format_chooses_the_interfaces(tmp_path, export_format,
                                              callable_, signatures):
  model = model_lib.Model(10, resnet_depth=18, width_multiplier=0.125,
                          cifar_stem=True, proj_out_dim=8)
  model(tf.zeros([1, 16, 16, 3]), training=False)
  path = checkpoints.export_saved_model(model, str(tmp_path), 1, 1,
                                        export_format=export_format)
  loaded = tf.saved_model.load(path)
  assert sorted(loaded.signatures) == signatures
  assert callable(loaded) == callable_
  with pytest.raises(ValueError, match='Unknown export_format'):
    checkpoints.export_saved_model(model, str(tmp_path), 2, 1,
                                   export_format='tf1_hub')


def test_linear_eval_on_the_export_learns_digits(tmp_path):
  """The SimCLR README's "linear eval on a SavedModel", written anew: load
  the export, call it with trainable=False, train a Dense head on
  final_avg_pool; only the head changes and it learns the digits."""
  size, num_classes = 16, 10
  tf_keras.utils.set_random_seed(0)
  source = data_lib.DigitsSource(image_size=size)
  train_x, train_y = source.arrays('train')
  test_x, test_y = source.arrays('test')
  to_float = lambda x: tf.constant(x, tf.float32) / 255.0
  model = model_lib.Model(num_classes, resnet_depth=18, width_multiplier=0.25,
                          cifar_stem=True)
  # BN moving statistics of the digits, as a trained encoder has them (a
  # fresh encoder's mean 0 / variance 1 give almost constant features).
  update_statistics = tf.function(lambda x: model(x, training=True))
  for start in range(0, 15 * 64, 64):
    update_statistics(to_float(train_x[start:start + 256]))
  loaded = tf.saved_model.load(
      checkpoints.export_saved_model(model, str(tmp_path), 0, 1))
  head = tf_keras.layers.Dense(num_classes, name='head_supervised_new')
  optimizer = tf_keras.optimizers.legacy.Adam(0.05)
  encoder_before = [v.numpy() for v in loaded.model_variables]

  @tf.function
  def train_step(images, labels):
    with tf.GradientTape() as tape:
      outputs = loaded(images, trainable=False)
      logits = head(outputs['final_avg_pool'])
      loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
          labels=tf.one_hot(labels, num_classes), logits=logits))
    grads = tape.gradient(loss, head.trainable_weights)
    optimizer.apply_gradients(zip(grads, head.trainable_weights))
    return loss

  rng = np.random.default_rng(0)
  losses = []
  for _ in range(100):
    batch = rng.choice(len(train_y), 128, replace=False)
    losses.append(float(train_step(to_float(train_x[batch]), train_y[batch])))
  logits = head(loaded(to_float(test_x), trainable=False)['final_avg_pool'])
  accuracy = float(np.mean(np.argmax(logits, -1) == test_y))
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
  assert accuracy > 0.5, accuracy  # chance: 0.1
  for before, var in zip(encoder_before, loaded.model_variables):
    np.testing.assert_array_equal(before, var.numpy())
