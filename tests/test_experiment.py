"""experiment.py: the builders (no absl flags anywhere) and an Experiment
assembled from a config, including a toy objective registered here by
following the README's "How to add an objective"."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import config as config_lib
import experiment as experiment_lib
import objective as obj_lib
import run

TINY = config_lib.ExperimentConfig(
    data=config_lib.DataConfig(dataset='digits', eval_split='test',
                               image_size=16, train_batch_size=32,
                               eval_batch_size=64, use_blur=False, seed=0),
    model=config_lib.ModelConfig(resnet_depth=18, width_multiplier=0.125,
                                 proj_out_dim=8),
    schedule=config_lib.ScheduleConfig(learning_rate=0.5, warmup_epochs=0,
                                       train_steps=2,
                                       train_summary_steps=0),
    checkpoint=config_lib.CheckpointConfig(checkpoint_steps=2))


def tiny(model_dir=None, **sections):
  """TINY with `model_dir` and whole sections or top-level fields replaced;
  `schedule={'train_steps': 3}` style dicts replace fields of a section."""
  cfg = TINY
  for name, value in sections.items():
    if isinstance(value, dict):
      value = dataclasses.replace(getattr(cfg, name), **value)
    cfg = dataclasses.replace(cfg, **{name: value})
  if model_dir is not None:
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
        cfg.checkpoint, model_dir=str(model_dir)))
  return cfg


# ------------------------------------------------------------ step plan


class _Periodic:
  """An objective stand-in with a host-side action every 3 epochs."""

  def action_period_steps(self, steps_per_epoch):
    return 3 * steps_per_epoch


def test_plan_steps_stops_exactly_and_loops_run_every_period():
  cfg = tiny(schedule={'train_steps': 0, 'train_epochs': 10},
             checkpoint={'checkpoint_steps': 0, 'checkpoint_epochs': 2},
             evaluation={'knn_eval_epochs': 5})
  plan = experiment_lib.plan_steps(cfg, num_train_examples=1000,
                                   objective=_Periodic())
  assert plan.train_steps == 1000 * 10 // 32 + 1   # SPEC §5
  assert plan.epoch_steps == round(1000 / 32) == 31
  assert plan.checkpoint_steps == 62
  assert plan.knn_eval_steps == 155
  # checkpoint_steps (62): every period (155, 93) is longer, so no loop is
  # shortened: each runs at the first boundary at or after its due step.
  assert plan.steps_per_loop == 62


def test_plan_steps_keeps_loops_long_in_the_imagenet_case():
  """ImageNet at batch 4096 (313 steps per epoch, a prime) with
  --checkpoint_steps=1000 --knn_eval_epochs=1: the gcd rule gave loops of
  one step; now the loop is the kNN period (313 ≥ 1000 / 4), and an
  explicit --steps_per_loop=1000 is kept as it is."""
  imagenet = 1281167
  cfg = tiny(data={'train_batch_size': 4096},
             schedule={'train_steps': 0, 'train_epochs': 100},
             checkpoint={'checkpoint_steps': 1000},
             evaluation={'knn_eval_epochs': 1})
  plan = experiment_lib.plan_steps(cfg, imagenet)
  assert plan.epoch_steps == 313
  assert plan.steps_per_loop == 313
  explicit = tiny(data={'train_batch_size': 4096},
                  schedule={'train_steps': 0, 'train_epochs': 100,
                            'steps_per_loop': 1000},
                  checkpoint={'checkpoint_steps': 1000},
                  evaluation={'knn_eval_epochs': 1})
  assert experiment_lib.plan_steps(explicit, imagenet).steps_per_loop == 1000


def test_a_loop_under_a_quarter_of_the_request_is_logged(caplog):
  cfg = tiny(checkpoint={'checkpoint_steps': 1000},
             evaluation={'knn_eval_epochs': 1})
  with caplog.at_level('WARNING'):
    plan = experiment_lib.plan_steps(cfg, 1000)
  assert plan.steps_per_loop == 31
  assert '--knn_eval_epochs=1 acts every 31 steps' in caplog.text
  assert '--steps_per_loop=1000' in caplog.text


def test_plan_steps_never_shortens_a_given_steps_per_loop():
  cfg = tiny(schedule={'steps_per_loop': 4},
             evaluation={'knn_eval_epochs': 1})
  assert experiment_lib.plan_steps(cfg, 1000).steps_per_loop == 4
  # The summary period does not shorten host loops (summaries are written
  # at the first loop boundary at or after each multiple of it).
  summaries = tiny(schedule={'train_summary_steps': 3},
                   checkpoint={'checkpoint_steps': 12})
  assert experiment_lib.plan_steps(summaries, 1000).steps_per_loop == 12


def test_build_data_errors_name_the_flags(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='exceeds the 1437'):
    experiment_lib.build_data(tiny(tmp_path, data={'train_batch_size': 2048}))
  with pytest.raises(config_lib.ConfigError, match='--num_classes=3 is smaller'):
    experiment_lib.build_data(tiny(tmp_path, model={'num_classes': 3}))
  data = experiment_lib.build_data(tiny(tmp_path, mode='train_then_eval'))
  assert (data.num_train_examples, data.num_eval_examples,
          data.num_classes) == (1437, 360, 10)


def test_finetuning_has_no_objective_and_one_view(tmp_path):
  cfg = tiny(tmp_path, train_mode='finetune')
  assert experiment_lib.build_objective(cfg, 1437) is None
  experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
  assert experiment.num_views == 1 and experiment.randaugment() is None


def test_batch_not_divisible_by_replicas(tmp_path, two_replicas):
  cfg = tiny(tmp_path, data={'train_batch_size': 33})
  with pytest.raises(config_lib.ConfigError,
                     match='--train_batch_size=33 is not divisible by the 2'):
    experiment_lib.Experiment(cfg, two_replicas)


# ------------------------------------- a toy objective (README recipe)


@dataclasses.dataclass(frozen=True)
class ToyInfoNCEConfig:
  """Its fields are the objective's constructor arguments."""
  temperature: float = 0.2
  hidden_norm: bool = True


@obj_lib.register('toy_infonce')
class ToyInfoNCE(obj_lib.Objective):
  """One-directional InfoNCE: view-1 anchors against the view-2 rows of the
  global batch, loss = mean_k CE(onehot(i), z1_k Z2ᵀ/τ)."""
  metric_names = ('contrast_loss',)

  def contrast(self, views, batch, keys):
    del batch, keys
    z1, z2 = obj_lib.split_views(views, 2)
    logits = tf.matmul(z1, obj_lib.cross_replica_concat(z2),
                       transpose_b=True) / self.temperature
    labels = obj_lib.global_row_indices(tf.shape(z1)[0])
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))
    return loss, {'contrast_loss': loss}


def _numpy_infonce(z1, z2, temperature):
  z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  logits = z1 @ z2.T / temperature
  logits -= logits.max(axis=1, keepdims=True)
  log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -np.mean(np.diag(log_prob))


def test_toy_objective_loss_matches_numpy_on_two_replicas(two_replicas):
  objective = ToyInfoNCE.from_config(ToyInfoNCEConfig())
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
  expected = _numpy_infonce(z1, z2, 0.2)

  def replica_fn(z1_local, z2_local):
    return objective.loss(tf.concat([z1_local, z2_local], 0), {})[0]

  inputs = two_replicas.experimental_distribute_values_from_function(
      lambda ctx: tuple(tf.constant(z[4 * ctx.replica_id_in_sync_group:][:4])
                        for z in (z1, z2)))
  losses = two_replicas.experimental_local_results(
      two_replicas.run(replica_fn, args=inputs))
  # Each replica's loss is the mean over its anchors: their mean is the
  # global loss.
  np.testing.assert_allclose(np.mean([l.numpy() for l in losses]), expected,
                             rtol=1e-5)


def test_toy_objective_trains_two_steps_through_an_experiment(tmp_path):
  cfg = tiny(tmp_path, objective_name='toy_infonce',
             objective=ToyInfoNCEConfig(temperature=0.5))
  experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
  assert isinstance(experiment.objective, ToyInfoNCE)
  assert experiment.objective.temperature == 0.5
  assert experiment.num_views == 2
  outputs = []  # what orbit hands the train actions after each host loop
  standard_actions = experiment.train_actions
  experiment.train_actions = lambda: standard_actions() + [outputs.append]
  controller = experiment.controller(True, False)
  experiment.checkpoint_manager.restore_or_initialize()
  before = [v.numpy().copy() for v in experiment.model.trainable_variables]
  experiment.train(controller)
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-2')
  assert int(experiment.global_step.numpy()) == 2
  after = experiment.model.trainable_variables
  assert any(not np.array_equal(b, a.numpy()) for b, a in zip(before, after))
  assert 'train/contrast_loss' in outputs[-1]
  assert np.isfinite(float(outputs[-1]['train/contrast_loss']))
  assert os.path.isdir(tmp_path / 'saved_model' / '2')


def test_run_dispatches_a_config_without_flags(tmp_path):
  result = run.run(tiny(tmp_path, mode='train_then_eval', objective_name='fnc',
                        objective=config_lib.FNCConfig(
                            support_size=0, memory_multiplier=0, topk=2)))
  assert result['global_step'] == 2 and result['num_examples'] == 360
  with open(tmp_path / 'flags.json') as f:
    written = f.read()
  assert '"topk": 2' in written  # the config itself, no flags were parsed


# ------------------------------------------------------- precision

# bfloat16 keeps 8 significant bits. Measured here (two steps from the
# same weights and batches): losses within 0.05-0.44 % of float32's (FNC
# the most), although the projections differ by ~4 % of their scale.
BF16_RTOL = 0.02
PRECISION_OBJECTIVES = {
    'simclr': config_lib.SimCLRConfig(),
    'sogclr': config_lib.SogCLRConfig(gamma=0.9),
    'fnc': config_lib.FNCConfig(support_size=1, memory_multiplier=3, topk=2),
    'ifnd': config_lib.IFNDConfig(num_clusters=(5,), memory_multiplier=2,
                                  acceptance_schedule='constant',
                                  constant_rate=0.5),
}


def _train(model_dir, objective, precision, steps=2, learning_rate=0.01,
           jit_compile=False):
  """(per-step training losses, the experiment, dtypes of the projections
  the objective received, initial weights, per-loop outputs) of `steps`
  steps from the seed-0 weights."""
  tf_keras.utils.set_random_seed(0)
  cfg = tiny(model_dir, objective_name=objective, seed=0,
             objective=PRECISION_OBJECTIVES[objective],
             data={'use_randaugment': False},
             model={'precision': precision},
             schedule={'train_steps': steps, 'steps_per_loop': 1,
                       'learning_rate': learning_rate},
             checkpoint={'checkpoint_steps': steps},
             distribution={'jit_compile': jit_compile})
  experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
  received = set()
  loss_fn = experiment.objective.loss

  def spy(projections, batch, **kwargs):
    received.add(projections.dtype)
    return loss_fn(projections, batch, **kwargs)

  experiment.objective.loss = spy
  outputs = []
  standard_actions = experiment.train_actions
  experiment.train_actions = lambda: standard_actions() + [outputs.append]
  controller = experiment.controller(True, False)
  experiment.checkpoint_manager.restore_or_initialize()
  initial = [v.numpy() for v in experiment.model.trainable_variables]
  for action in reversed(experiment.actions):  # as Experiment.train: IFND
    if hasattr(action, 'start'):               # clusters before step 1
      action.start()
  controller.train(steps)
  return ([float(o['train/loss']) for o in outputs], experiment, received,
          initial, outputs)


def _float_variables(experiment):
  variables = list(experiment.model.variables) + list(
      experiment.optimizer.variables())
  if experiment.momentum_encoder is not None:
    variables += experiment.momentum_encoder.variables
  variables += list(experiment.objective.variables)
  return [v for v in variables if v.dtype.is_floating]


@pytest.mark.parametrize('objective', sorted(PRECISION_OBJECTIVES))
def test_bfloat16_losses_match_float32_and_state_stays_float32(tmp_path,
                                                               objective):
  """Two steps in bfloat16 (mixed) against float32 from the same weights:
  the losses agree to BF16_RTOL; the convolutions ran in bfloat16, the
  objective got float32 projections, and every variable (weights, BN
  statistics, optimizer slots, momentum encoder, u / queue / pseudo
  labels) is float32."""
  reference = _train(tmp_path / 'f32', objective, 'float32')[0]
  losses, experiment, received, _, outputs = _train(
      tmp_path / 'bf16', objective, 'bfloat16')
  np.testing.assert_allclose(losses, reference, rtol=BF16_RTOL)
  if objective == 'ifnd':  # false negatives eliminated from step 1 on
    assert float(outputs[0]['train/fn_per_anchor']) > 0
  assert experiment.model.base_model.stem.compute_dtype == 'bfloat16'
  assert received == {tf.float32}
  assert {v.dtype for v in _float_variables(experiment)} == {tf.float32}


def test_float16_trains_with_dynamic_loss_scaling(tmp_path):
  """float16: Keras' LossScaleOptimizer (initial scale 2^15). Its first
  steps overflow in the backward pass and are skipped with the scale
  halved (5 of them here) until the scaled gradients fit float16; then the
  steps apply. Eight steps at lr 0.1: finite losses, no stop, weights
  changed, a finite scale in [1, 2^15)."""
  losses, experiment, received, initial, _ = _train(
      tmp_path, 'simclr', 'float16', steps=8, learning_rate=0.1)
  optimizer = experiment.optimizer
  assert isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
  assert len(losses) == 8 and np.isfinite(losses).all()
  assert int(experiment.global_step.numpy()) == 8
  assert 1 <= float(optimizer.loss_scale.numpy()) < 2**15
  assert received == {tf.float32}
  after = experiment.model.trainable_variables
  assert any(not np.array_equal(a.numpy(), b) for a, b in zip(after, initial))
  assert experiment.model.base_model.stem.compute_dtype == 'float16'
  assert {v.dtype for v in _float_variables(experiment)} == {tf.float32}


def test_resume_in_another_precision_of_the_same_variables(tmp_path):
  """float32 → float16 → bfloat16 resumes of one model_dir: the checkpoint
  keys of the model and optimizer do not depend on the precision; float16
  adds its loss scale, which the other precisions do not need."""
  for steps, precision in enumerate(['float32', 'float16', 'bfloat16'], 1):
    tf_keras.utils.set_random_seed(0)
    cfg = tiny(tmp_path, seed=0, model={'precision': precision},
               schedule={'train_steps': steps, 'steps_per_loop': 1},
               checkpoint={'checkpoint_steps': 1})
    experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
    controller = experiment.controller(True, False)
    assert int(experiment.global_step.numpy()) == steps - 1
    controller.train(steps)
    keys = tf.train.list_variables(tf.train.latest_checkpoint(tmp_path))
    scale = [name for name, _ in keys if name.startswith('loss_scale/')]
    assert bool(scale) == (precision == 'float16'), (precision, scale)


# ------------------------------------------------------- input pipeline


def test_training_with_blur_on_device(tmp_path):
  """--blur_on_device: two SimCLR steps at 32 px (blur kernel 3) train,
  with the start-of-training view grid; the preview shows the views
  blurred as on the device, the host-blurred views to float rounding."""
  cfg = tiny(tmp_path, data={'image_size': 32, 'use_blur': True,
                             'blur_on_device': True, 'input_threads': 2},
             schedule={'train_summary_steps': 1})
  experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
  preview = experiment.preview_batch().numpy()
  host = experiment_lib.data_lib.preview_batch(
      experiment.data.source, 'train', 8,
      **dict(experiment.view_args(), blur_on_device=False))['image']
  np.testing.assert_allclose(preview, host.numpy(), atol=1e-6, rtol=0)
  outputs = []
  standard_actions = experiment.train_actions
  experiment.train_actions = lambda: standard_actions() + [outputs.append]
  controller = experiment.controller(True, False)
  experiment.train(controller)
  assert int(experiment.global_step.numpy()) == 2
  assert np.isfinite(float(outputs[-1]['train/contrast_loss']))
  assert tf.io.gfile.glob(str(tmp_path / 'events.out.tfevents.*'))


# ------------------------------------------------------- --jit_compile


def test_jit_compiled_resnet_steps_equal_uncompiled(tmp_path):
  """--jit_compile reaches the trainer, and two compiled steps of the
  ResNet-18 (convolutions, BN, LARS) in float64 agree with uncompiled ones
  from the same weights and batches: losses, and every weight, BN
  statistic and optimizer slot to 1e-9 of its tensor's largest value (the
  rule of tests/test_multiworker.py; measured ~1e-12). Each objective's
  own state: tests/test_trainer.py."""
  plain_losses, plain = _train(tmp_path / 'plain', 'simclr', 'float64',
                               learning_rate=0.5)[:2]
  jit_losses, jit, _, initial, _ = _train(tmp_path / 'jit', 'simclr',
                                          'float64', learning_rate=0.5,
                                          jit_compile=True)
  assert plain.trainer.compiled_step is None
  assert jit.trainer.compiled_step is not None
  np.testing.assert_allclose(jit_losses, plain_losses, rtol=1e-6)
  expected = _float_variables(plain)
  assert len(expected) > 100
  for a, b in zip(_float_variables(jit), expected):
    a, b = a.numpy(), b.numpy()
    assert np.abs(a - b).max() <= 1e-12 + 1e-9 * np.abs(b).max(), a.name
  after = jit.model.trainable_variables
  assert all(not np.array_equal(a.numpy(), b) for a, b in zip(after, initial)
             if 'head_supervised' not in a.name)


def test_jit_compile_with_two_replicas_is_refused_before_anything_is_written(
    tmp_path, two_replicas):
  model_dir = tmp_path / 'model'
  with pytest.raises(config_lib.ConfigError, match='merge_call') as error:
    experiment_lib.Experiment(tiny(model_dir, distribution={
        'jit_compile': True}), two_replicas)
  assert '--jit_compile' in str(error.value)
  assert not model_dir.exists()


# ------------------------------------------ the linear head's own optimizer


def test_linear_head_schedule_and_clean_views_reach_the_trainer(tmp_path):
  """--linear_head_schedule=constant gives the head optimizer the scaled
  rate at every step (cosine: the encoder's shape, 0 at the end);
  --linear_head_input=clean gives the training batches a clean view and
  the trainer the head on it."""
  common = dict(optimizer={'linear_head_optimizer': 'adam',
                           'linear_head_learning_rate': 0.02})
  schedules = {}
  for name in ('constant', 'cosine'):
    cfg = tiny(tmp_path / name, **common)
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(
        cfg.optimizer, linear_head_schedule=name))
    head = experiment_lib.build_linear_head(cfg, 1000, train_steps=50)
    schedules[name] = [float(head.optimizer.learning_rate(s))
                       for s in (0, 25, 50)]
  assert schedules['constant'] == pytest.approx([0.02 * 32 / 256] * 3)
  assert schedules['cosine'][-1] == 0.0
  cfg = tiny(tmp_path / 'clean', model={'linear_head_input': 'clean'},
             **common)
  experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
  batch = next(iter(experiment.train_input_fn(8)()))
  assert batch['clean_image'].shape == (8, 16, 16, 3)
  trainer = experiment.controller(True, False).trainer
  assert trainer.head_on_clean_views
  plain = experiment_lib.Experiment(tiny(tmp_path / 'views'),
                                    tf.distribute.get_strategy())
  assert 'clean_image' not in next(iter(plain.train_input_fn(8)()))


def test_linear_head_optimizer_state_is_checkpointed(tmp_path):
  """--linear_head_optimizer=adam --linear_head_batch_norm, 2 steps: the
  checkpoint holds the head optimizer's step and its slots for exactly the
  head's kernel and bias (the encoder's LARS none for them), and the head's
  BN statistics; a new Experiment on the directory fits and restores the
  head optimizer at step 2. The shared default writes none of it."""
  keys = {}
  for name, head in (('shared', {}),
                     ('own', {'linear_head_optimizer': 'adam',
                              'linear_head_learning_rate': 0.01})):
    cfg = tiny(tmp_path / name, seed=0,
               optimizer=head,
               model={'linear_head_batch_norm': bool(head)})
    experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
    experiment.controller(True, False).train(2)
    keys[name] = [k for k, _ in tf.train.list_variables(
        tf.train.latest_checkpoint(str(tmp_path / name)))]
  own, shared = keys['own'], keys['shared']
  head_slots = sorted(k.split('/.OPTIMIZER_SLOT/')[0] for k in own
                      if '.OPTIMIZER_SLOT/linear_head_optimizer/' in k)
  assert head_slots == sorted(
      ['model/head_supervised/linear_layer/dense/bias',
       'model/head_supervised/linear_layer/dense/kernel'] * 2)  # m and v
  assert not [k for k in own if k.startswith('model/head_supervised') and
              '.OPTIMIZER_SLOT/optimizer/' in k]
  assert [k for k in shared if k.startswith('model/head_supervised') and
          '.OPTIMIZER_SLOT/optimizer/' in k]
  assert 'linear_head_optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE' in own
  assert any('head_supervised/batch_norm' in k and 'moving_mean' in k
             for k in own)
  assert not [k for k in shared
              if 'linear_head' in k or 'head_supervised/batch_norm' in k]
  cfg = tiny(tmp_path / 'own', seed=0,
             optimizer={'linear_head_optimizer': 'adam',
                        'linear_head_learning_rate': 0.01},
             model={'linear_head_batch_norm': True},
             schedule={'train_steps': 3})
  resumed = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
  resumed.checkpoint_manager.restore_or_initialize()
  assert int(resumed.linear_head.optimizer.iterations.numpy()) == 2
  assert int(resumed.global_step.numpy()) == 2
