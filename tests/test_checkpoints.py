"""Warm start with --variable_schema, fit checks, SavedModel export, and the
fault tolerance of model_dir: resume checks over every checkpointed object,
the newest intact checkpoint, leftovers of interrupted writes, JSON, flags."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import ifnd
import lars_optimizer
import model as model_lib
import objective

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


# ------------------------------------- resume: every checkpointed object

N, K, D, LEVELS = 12, 6, 8, 2  # examples, queue rows, key size, IFND levels


def run_checkpoint(model=None, optimizer='lars', n=N, k=K, d=D, levels=LEVELS,
                   seed_dtype=tf.int64, step=False, momentum_encoder=None,
                   drop=(), **extra):
  """A tf.train.Checkpoint shaped as experiment.py builds it: model,
  optimizer, SogCLR's u, a memory queue, IFND's table and counters; `drop`
  leaves objects out, `extra` adds some."""
  model = model or tiny_model()
  opt = lars_optimizer.build_optimizer(optimizer, 0.1)
  opt.iterations  # pylint: disable=pointless-statement
  if step:
    opt.apply_gradients([(tf.zeros_like(v), v)
                         for v in model.trainable_variables])
  items = dict(model=model, optimizer=opt,
               sogclr_u=tf.Variable(tf.zeros([n]), trainable=False),
               memory_queue=objective.MemoryQueue(k, d),
               ifnd_table=ifnd.PseudoLabelTable(n, levels),
               input_seed=tf.Variable(7, dtype=seed_dtype),
               nonfinite_skipped=tf.Variable(0, dtype=tf.int64))
  if momentum_encoder is not None:
    items['momentum_encoder'] = momentum_encoder
  items.update(extra)
  for name in drop:
    items.pop(name)
  return tf.train.Checkpoint(**items)


@pytest.fixture(scope='module')
def nets():
  """A model and its momentum encoder, shared by the checkpoints of the
  resume tests (building them is what takes time)."""
  model = tiny_model()
  encoder = model.make_momentum_encoder()
  encoder(tf.zeros([1, 16, 16, 3]), training=False)
  return dict(model=model, momentum_encoder=encoder)


@pytest.fixture(scope='module')
def resume_dir(tmp_path_factory, nets):
  """A model_dir with one checkpoint written after a training step (so it
  holds optimizer slots), by a CheckpointManager as orbit writes them."""
  directory = str(tmp_path_factory.mktemp('resume'))
  manager = tf.train.CheckpointManager(
      run_checkpoint(step=True, **nets), directory, 2)
  return manager.save(checkpoint_number=1)


def test_checkpoint_keys_are_those_a_write_produces(tmp_path, nets):
  checkpoint = run_checkpoint(step=True, **nets)
  expected = checkpoints.checkpoint_keys(checkpoint)
  reader = tf.train.load_checkpoint(checkpoint.write(str(tmp_path / 'c')))
  shapes = reader.get_variable_to_shape_map()
  dtypes = reader.get_variable_to_dtype_map()
  assert set(expected) == set(shapes) - {checkpoints.GRAPH_KEY}
  for key, (shape, dtype) in expected.items():
    assert (shape, dtype) == (shapes[key], dtypes[key]), key
  assert any(checkpoints.SLOT_MARKER in key for key in expected)


def test_checkpoint_keys_under_a_distribution_strategy(nets):
  """Mirrored variables save through legacy saveables without a shape: the
  shapes come from the variables, the keys are the same."""
  plain = checkpoints.checkpoint_keys(run_checkpoint(nets['model']))
  with tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1']).scope():
    mirrored = checkpoints.checkpoint_keys(run_checkpoint())
  assert mirrored == plain


def test_resume_check_compares_every_object(resume_dir, nets):
  # Before the first step the optimizer has no slots: they are not compared.
  report = checkpoints.check_resume_fits_all(run_checkpoint(**nets),
                                             resume_dir)
  for name in ('sogclr_u', 'memory_queue/keys', 'memory_queue/ids',
               'memory_queue/labels', 'memory_queue/count',
               'ifnd_table/labels', 'ifnd_table/rate', 'input_seed',
               'nonfinite_skipped', 'optimizer/iter',
               'model/base_model/stem/stem_layers/0/conv2d/kernel',
               'momentum_encoder/base_model/stem/stem_layers/0/conv2d/kernel'):
    assert name in report.compared, name
  assert not [n for n in report.compared if checkpoints.SLOT_MARKER in n]
  slots = [n for n in report.not_compared if checkpoints.SLOT_MARKER in n]
  assert len(slots) == len(nets['model'].trainable_variables)
  assert 'save_counter' in report.not_compared
  # After a step they exist and are compared.
  report = checkpoints.check_resume_fits_all(
      run_checkpoint(step=True, **nets), resume_dir)
  assert len([n for n in report.compared if checkpoints.SLOT_MARKER in n]) == (
      len(slots))
  assert sorted(report.not_compared) == [checkpoints.GRAPH_KEY, 'save_counter']


@pytest.mark.parametrize('changes, expected', [
    (dict(n=N + 1), r'sogclr_u: \[13\] float32 here, \[12\] float32 in the '
                    r'checkpoint'),
    (dict(d=D * 2), r'memory_queue/keys: \[6, 16\] float32 here, \[6, 8\] '
                    r'float32 in the checkpoint'),
    (dict(k=K - 1), r'memory_queue/ids: \[5\] int32 here, \[6\] int32'),
    (dict(levels=3), r'ifnd_table/labels: \[12, 3\] int32 here, \[12, 2\]'),
    (dict(seed_dtype=tf.int32), r'input_seed: \[\] int32 here, \[\] int64 in'),
    (dict(drop=('memory_queue',)), r'In the checkpoint, not in this run:'
                                   r'\n  memory_queue/count\n'),
    (dict(extra=tf.Variable(1.)), r'Not in the checkpoint \(it was written by '
                                  r'a run with another objective or other '
                                  r'flags\):\n  extra \(\[\] float32\)'),
])
def test_resume_check_names_each_misfit(resume_dir, nets, changes, expected):
  with pytest.raises(checkpoints.CheckpointMismatchError, match=expected) as e:
    checkpoints.check_resume_fits_all(run_checkpoint(**nets, **changes),
                                      resume_dir)
  message = str(e.value)
  assert 'does not fit the model built from these flags' in message
  assert 'flags.json' in message and 'another --model_dir' in message


def test_resume_simclr_dir_as_sogclr_is_an_error(tmp_path, nets):
  """A SimCLR run's checkpoint has no u: resuming it as SogCLR must not
  silently start u from zeros."""
  model = nets['model']
  simclr = tf.train.Checkpoint(model=model, input_seed=tf.Variable(1))
  path = simclr.write(str(tmp_path / 'simclr'))
  sogclr = tf.train.Checkpoint(model=model, input_seed=tf.Variable(1),
                               sogclr_u=tf.Variable(tf.zeros([N])))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'another objective.*\n  sogclr_u \(\[12\]'):
    checkpoints.check_resume_fits_all(sogclr, path)


def test_resume_check_names_model_variables(resume_dir):
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.check_resume_fits_all(
        run_checkpoint(model=tiny_model(depth=34)), resume_dir)
  message = str(e.value)
  assert ('Not in the checkpoint (it was written by a run with another '
          'objective or other flags):\n  '
          'model/base_model/block_groups/0/blocks/2/') in message
  assert '... and ' in message and 'more in model/' in message
  # The momentum encoder the checkpoint has and this run lacks is named.
  assert 'In the checkpoint, not in this run:\n  momentum_encoder/' in message


def test_resume_check_compares_existing_slots(resume_dir, nets):
  """Adam's m and v are not LARS's Momentum: an error once they exist;
  before the first step an optimizer's slots are not compared."""
  checkpoints.check_resume_fits_all(run_checkpoint(optimizer='adam', **nets),
                                    resume_dir)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'(?s)Not in the checkpoint.*\n  model/[^\n]*'
                     r'/.OPTIMIZER_SLOT/optimizer/m \(') as e:
    checkpoints.check_resume_fits_all(
        run_checkpoint(optimizer='adam', step=True, **nets), resume_dir)
  message = str(e.value)
  assert 'more optimizer slots' in message
  assert ('In the checkpoint, not in this run:\n  model/base_model/'
          'block_groups/0/blocks/0/residual_layers/0/conv2d/kernel/'
          '.OPTIMIZER_SLOT/optimizer/Momentum\n') in message


def test_optional_objects_may_be_missing(tmp_path, nets):
  model = nets['model']
  path = run_checkpoint(model, drop=('nonfinite_skipped',)).write(
      str(tmp_path / 'old'))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='nonfinite_skipped'):
    checkpoints.check_resume_fits_all(run_checkpoint(model), path)
  report = checkpoints.check_resume_fits_all(
      run_checkpoint(model), path, optional=('nonfinite_skipped',))
  assert report.optional_missing == ['nonfinite_skipped']


def test_resume_check_refuses_an_original_simclr_checkpoint(tmp_path, nets):
  root = tf.Module()
  root.resnet_model = tf.Module()
  root.resnet_model.kernel = tf.Variable(tf.zeros([2]))
  path = tf.train.Checkpoint(model=root).write(str(tmp_path / 'original'))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='original SimCLR TF2 code'):
    checkpoints.check_resume_fits_all(run_checkpoint(nets['model']), path)


# ------------------------------------------------ warm start selecting nothing


def test_schema_selecting_nothing_is_an_error(tmp_path):
  path = saved(tiny_model(), tmp_path)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"--variable_schema='nothing_here' selects none of "
                     r'the model variables of --checkpoint=.*src'):
    checkpoints.check_warm_start_fits(tiny_model(), path, 'nothing_here')


def test_finetuning_needs_a_backbone_from_the_checkpoint(tmp_path):
  path = saved(tiny_model(), tmp_path)
  target = tiny_model()
  assert checkpoints.warm_start(target, path, 'head_supervised')
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"'head_supervised' restores no backbone variable "
                     r'\(base_model/...\)'):
    checkpoints.check_warm_start_fits(target, path, 'head_supervised',
                                      require_backbone=True)
  checkpoints.check_warm_start_fits(target, path, BACKBONE_ONLY,
                                    require_backbone=True)


# -------------------------------------------- the newest intact checkpoint


def _small_state():
  return tf.train.Checkpoint(weights=tf.Variable(tf.zeros([256])),
                             step=tf.Variable(0, dtype=tf.int64))


def write_three(directory):
  """ckpt-1..3 of a small state whose weights equal the step number."""
  state = _small_state()
  manager = tf.train.CheckpointManager(state, directory, max_to_keep=5)
  for step in (1, 2, 3):
    state.weights.assign(tf.fill([256], float(step)))
    state.step.assign(step)
    manager.save(checkpoint_number=step)
  return os.path.join(directory, 'ckpt-')


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty(path):
  open(path, 'wb').close()


def _flip_byte(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


DATA, INDEX = '.data-00000-of-00001', '.index'


@pytest.mark.parametrize('suffix, damage, says', [
    (DATA, _truncate, 'is unreadable (truncated or corrupt?)'),
    (DATA, _empty, 'is empty (0 bytes)'),
    (DATA, _flip_byte, 'is unreadable (truncated or corrupt?)'),
    (DATA, os.remove, None),
    (INDEX, _truncate, 'is unreadable (truncated or corrupt?)'),
    (INDEX, _empty, 'is empty (0 bytes)'),
])
def test_fallback_restores_the_newest_intact_checkpoint(tmp_path, suffix,
                                                        damage, says):
  prefix = write_three(str(tmp_path))
  broken = prefix + '3' + suffix
  damage(broken)
  listing = {name: (tmp_path / name).read_bytes()
             for name in os.listdir(tmp_path)}

  path, problems = checkpoints.find_intact_checkpoint(str(tmp_path))
  assert path == prefix + '2'
  assert len(problems) == 1
  if says is None:  # a removed data file: its shard count is unknown
    assert problems[0].startswith(prefix + '3.data-* is missing')
  else:
    assert problems[0].startswith(broken + ' ' + says)

  state = _small_state()
  manager = checkpoints.FallbackCheckpointManager(
      state, str(tmp_path), max_to_keep=5, restore_path=path,
      step_counter=state.step, checkpoint_interval=1)
  assert manager.restore_or_initialize() == path
  np.testing.assert_array_equal(state.weights.numpy(), np.full([256], 2.))
  assert int(state.step) == 2
  # The broken files are left as they were...
  assert {name: (tmp_path / name).read_bytes()
          for name in os.listdir(tmp_path)} == listing
  # ... until the next save at their step writes the checkpoint anew.
  assert manager.save(check_interval=True) is None  # step 2: saved already
  state.step.assign(3)
  assert manager.save(check_interval=True) == prefix + '3'
  assert checkpoints.find_intact_checkpoint(str(tmp_path)) == (
      prefix + '3', [])


def test_all_checkpoints_broken(tmp_path):
  prefix = write_three(str(tmp_path))
  _truncate(prefix + '1' + DATA)
  _empty(prefix + '2' + INDEX)
  os.remove(prefix + '3' + DATA)
  path, problems = checkpoints.find_intact_checkpoint(str(tmp_path))
  assert path is None
  assert [p.split(' ')[0] for p in problems] == [
      prefix + '3.data-*', prefix + '2' + INDEX, prefix + '1' + DATA]


def test_no_checkpoint_and_no_state_file(tmp_path):
  assert checkpoints.find_intact_checkpoint(str(tmp_path)) == (None, [])
  prefix = write_three(str(tmp_path))
  os.remove(tmp_path / 'checkpoint')
  path, problems = checkpoints.find_intact_checkpoint(str(tmp_path))
  assert path == prefix + '3'
  assert 'checkpoint is missing or unreadable' in problems[0]


def test_fallback_manager_without_a_path_is_a_checkpoint_manager(tmp_path):
  prefix = write_three(str(tmp_path))
  state = _small_state()
  manager = checkpoints.FallbackCheckpointManager(state, str(tmp_path), 5)
  assert manager.restore_or_initialize() == prefix + '3'
  assert int(state.step) == 3


# ------------------------------------------ leftovers of interrupted writes


def test_remove_stale_temporaries_removes_only_ours(tmp_path):
  stale = [
      # Names seen after killing a CheckpointManager.save mid-write.
      'ckpt-2_temp/part-00000-of-00001.data-00000-of-00001.'
      'tempstate4118489449410942398',
      'ckpt-2.index.tempstate123',
      'checkpoint.tmp' + '0123456789abcdef' * 2,
      'result.json.tmp',
      'knn_monitor.json.tmp',
      'saved_model/7.tmp/saved_model.pb',
  ]
  kept = [
      'checkpoint', 'ckpt-1.index', 'ckpt-1.data-00000-of-00001',
      'result.json', 'flags.json', 'checkpoint.tmp', 'checkpoint.tmpxyz',
      'notes_temp', 'ckpt-x_temp', 'mine.tmp', 'train/events.out.tfevents.1',
      'train/result.json.tmp', 'ckpt-3_temporary',
      'saved_model/5/saved_model.pb',
      'saved_model/5.tmp.bak/x', 'other/ckpt-2_temp/part',
  ]
  for name in stale + kept:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text('x')
  removed = checkpoints.remove_stale_temporaries(str(tmp_path))
  assert sorted(removed) == sorted(str(tmp_path / name) for name in [
      'ckpt-2_temp', 'ckpt-2.index.tempstate123', stale[2], 'result.json.tmp',
      'knn_monitor.json.tmp', 'saved_model/7.tmp'])
  for name in stale:
    assert not (tmp_path / name).exists(), name
  for name in kept:
    assert (tmp_path / name).read_text() == 'x', name
  assert checkpoints.remove_stale_temporaries(str(tmp_path)) == []
  assert checkpoints.remove_stale_temporaries(str(tmp_path / 'nope')) == []


# ----------------------------------------------------------------- JSON


def _strict_load(path):
  def refuse(constant):
    raise ValueError(f'{constant} in {path}')
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def test_write_json_writes_non_finite_values_as_null(tmp_path):
  path = str(tmp_path / 'result.json')
  payload = {'top1': float('nan'), 'top5': 0.5, 'loss': np.float32('inf'),
             'steps': np.int64(3),
             'history': [{'loss': -float('inf')}, {'loss': 1.0}]}
  nonfinite = checkpoints.write_json(path, payload)
  assert sorted(nonfinite) == ['history[0].loss', 'loss', 'top1']
  assert _strict_load(path) == {'top1': None, 'top5': 0.5, 'loss': None,
                                'steps': 3,
                                'history': [{'loss': None}, {'loss': 1.0}]}
  assert checkpoints.write_json(path, [1.0, float('nan')]) == ['[1]']
  assert _strict_load(path) == [1.0, None]


def test_write_json_is_a_rename_of_a_complete_file(tmp_path, monkeypatch):
  path = str(tmp_path / 'result.json')
  checkpoints.write_json(path, {'old': 1})
  renames = []
  rename = tf.io.gfile.rename

  def recording_rename(src, dst, overwrite=False):
    renames.append((src, dst, _strict_load(src)))
    rename(src, dst, overwrite=overwrite)

  monkeypatch.setattr(tf.io.gfile, 'rename', recording_rename)
  checkpoints.write_json(path, {'new': 2})
  assert renames == [(path + '.tmp', path, {'new': 2})]
  # A payload that is not JSON leaves the old file and no temporary.
  with pytest.raises(TypeError):
    checkpoints.write_json(path, {'bad': object()})
  assert _strict_load(path) == {'new': 2}
  assert sorted(os.listdir(tmp_path)) == ['result.json']


# ----------------------------------------------------- flags of the model_dir

IDENTITY = {'objective', 'dataset', 'train_batch_size', 'resnet_depth',
            'width_multiplier', 'memory_multiplier'}


def test_compare_run_flags():
  saved = {'objective': 'simclr', 'dataset': 'digits', 'train_batch_size': 256,
           'resnet_depth': 18, 'learning_rate': 0.3, 'ifnd_num_clusters':
           [10, 30], 'model_dir': '/a', 'mode': 'train', 'verbosity': 0,
           'old_flag': 1, 'gone_none': None, 'memory_multiplier': 0}
  current = {'objective': 'sogclr', 'dataset': 'digits',
             'train_batch_size': 512, 'resnet_depth': 18,
             'learning_rate': 0.1, 'ifnd_num_clusters': (10, 30),
             'model_dir': '/b', 'mode': 'train_then_eval', 'verbosity': 1,
             'flagfile': 'x.cfg', 'new_flag': 'a', 'memory_multiplier': 0}
  errors, warnings = checkpoints.compare_run_flags(saved, current, IDENTITY)
  assert errors == [
      '--objective: simclr in flags.json of the run in model_dir, sogclr now',
      '--train_batch_size: 256 in flags.json of the run in model_dir, 512 now']
  assert warnings == [
      '--learning_rate: 0.3 in flags.json of the run in model_dir, 0.1 now',
      '--new_flag: not in flags.json of the run in model_dir, a now',
      '--old_flag: 1 in flags.json of the run in model_dir, not a flag now']
  # A flag only on one side is never an error, even an identity flag.
  errors, warnings = checkpoints.compare_run_flags(
      {}, {'resnet_depth': 50}, IDENTITY)
  assert errors == [] and len(warnings) == 1
  assert checkpoints.compare_run_flags(
      saved, current, IDENTITY, ignore={'objective', 'train_batch_size',
                                        'learning_rate', 'new_flag',
                                        'old_flag', 'model_dir', 'mode',
                                        'verbosity', 'flagfile'}) == ([], [])
