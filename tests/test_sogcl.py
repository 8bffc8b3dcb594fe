"""SogCLR: loss and u update against NumPy, gradient identity, fixed point,
replica equivalence, checkpointed u, example ids, and run.py end to end."""

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import config as config_lib
import data as data_lib
import experiment as experiment_lib
import objective as obj_lib
import run
import sogcl


TAU = 0.5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _views(seed, n, d=5):
  rng = np.random.default_rng(seed)
  return _unit(rng.normal(size=(n, d))), _unit(rng.normal(size=(n, d)))


def numpy_dcl(z1, z2, u_prev, tau, gamma, store):
  """Independent SogCLR step: (loss, objective, u_a, u_b, stored value)."""
  n = len(z1)
  loss = objective = 0.0
  per_view_u = []
  for a, b in ((z1, z2), (z2, z1)):
    u_view = np.zeros(n)
    for i in range(n):
      s_pos = a[i] @ b[i]
      negatives = np.array([a[i] @ b[j] for j in range(n) if j != i] +
                           [a[i] @ a[j] for j in range(n) if j != i])
      assert len(negatives) == 2 * (n - 1)
      g = np.mean(np.exp(negatives / tau))
      u = (1 - gamma) * u_prev[i] + gamma * g
      loss += -s_pos + np.mean(np.exp(negatives / tau) / u * negatives)
      objective += -s_pos + tau * np.log(g)
      u_view[i] = u
    per_view_u.append(u_view)
  u_a, u_b = per_view_u
  stored = u_a + u_b if store == 'sum' else (u_a + u_b) / 2
  return loss / n, objective / n, u_a, u_b, stored


@pytest.mark.parametrize('store', ['sum', 'mean'])
def test_loss_and_u_match_numpy_first_and_second_visit(store):
  num_examples, ids = 10, np.array([7, 2, 9, 4, 0])
  objective = sogcl.SogCLR(temperature=TAU, gamma=0.8, u_store=store)
  objective.build(num_examples, len(ids), projection_dim=5)
  u_expected = np.zeros(num_examples)
  for step in range(2):
    z1, z2 = _views(seed=step, n=len(ids))
    loss, metrics = objective.loss(tf.constant(np.concatenate([z1, z2])),
                                   {'id': tf.constant(ids, tf.int32)})
    want_loss, want_obj, u_a, u_b, stored = numpy_dcl(
        z1, z2, u_expected[ids], TAU, 0.8, store)
    np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics['contrast_loss'].numpy(), want_loss,
                               rtol=1e-6)
    np.testing.assert_allclose(metrics['dcl_objective'].numpy(), want_obj,
                               rtol=1e-6)
    np.testing.assert_allclose(metrics['dcl_u_mean'].numpy(),
                               np.mean((u_a + u_b) / 2), rtol=1e-6)
    u_expected[ids] = stored
    np.testing.assert_allclose(objective.u.numpy(), u_expected, rtol=1e-6)
    assert np.count_nonzero(objective.u.numpy()) == len(ids)
  assert set(metrics) == set(sogcl.SogCLR.metric_names)


def test_first_visit_uses_gamma_times_batch_estimate():
  z1, z2 = _views(seed=3, n=4)
  result = sogcl.dynamic_contrastive_loss(
      tf.constant(z1), tf.constant(z2), tf.zeros([4], tf.float64), TAU, 0.7)
  np.testing.assert_allclose(result.u_a.numpy(), 0.7 * result.g_a.numpy(),
                             rtol=1e-12)
  np.testing.assert_allclose(result.u_b.numpy(), 0.7 * result.g_b.numpy(),
                             rtol=1e-12)


def test_gradient_equals_tau_times_log_mean_exp_gradient():
  """With u = g, ∂ℓ/∂s = τ·∂(−s_pos/τ + log mean_j exp(s_aj/τ))/∂s."""
  rng = np.random.default_rng(5)
  b, num_columns = 3, 8
  sims = tf.Variable(rng.uniform(-1, 1, size=(b, num_columns)))
  positive, self_index = np.array([0, 1, 2]), np.array([4, 5, 6])
  negative = np.ones((b, num_columns), bool)
  negative[np.arange(b), positive] = False
  negative[np.arange(b), self_index] = False
  g = np.array([np.mean(np.exp(sims.numpy()[k][negative[k]] / TAU))
                for k in range(b)])
  with tf.GradientTape() as tape:
    surrogate, u, g_tf, _ = sogcl.view_terms(
        sims, positive, self_index, tf.constant(g), TAU, gamma=0.9)
    total = tf.reduce_sum(surrogate)
  grad = tape.gradient(total, sims).numpy()
  np.testing.assert_allclose(u.numpy(), g, rtol=1e-12)
  np.testing.assert_allclose(g_tf.numpy(), g, rtol=1e-12)

  with tf.GradientTape() as tape:
    s_pos = tf.gather(sims, positive, axis=1, batch_dims=1)
    masked = tf.where(negative, sims / TAU, -np.inf)
    log_mean = (tf.reduce_logsumexp(masked, axis=1) -
                np.log(negative.sum(1)))
    reference = tf.reduce_sum(-s_pos / TAU + log_mean)
  expected = TAU * tape.gradient(reference, sims).numpy()
  np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)
  assert np.all(grad[~negative & (np.arange(num_columns) != positive[:, None])]
                == 0)


def _iterate(objective, z1, z2, ids, steps):
  projections = tf.constant(np.concatenate([z1, z2]))
  batch = {'id': tf.constant(ids, tf.int32)}

  @tf.function
  def step():
    return objective.loss(projections, batch)[1]

  for _ in range(steps):
    metrics = step()
  return metrics


@pytest.mark.parametrize('gamma', [0.6, 0.9])
def test_sum_store_per_view_fixed_point(gamma):
  ids = np.array([1, 3, 4, 6])
  z1, _ = _views(seed=7, n=4)
  objective = sogcl.SogCLR(temperature=TAU, gamma=gamma)
  objective.build(8, 4, projection_dim=5)
  # Identical views: g_a = g_b = g, so each view's u → γ/(2γ−1)·g.
  metrics = _iterate(objective, z1, z1, ids, steps=200)
  result = sogcl.dynamic_contrastive_loss(
      tf.constant(z1), tf.constant(z1),
      tf.cast(tf.gather(objective.u, ids), tf.float64), TAU, gamma)
  limit = gamma / (2 * gamma - 1) * result.g_a.numpy()
  np.testing.assert_allclose(result.u_a.numpy(), limit, rtol=1e-5)
  np.testing.assert_allclose(objective.u.numpy()[ids], 2 * limit, rtol=1e-5)
  np.testing.assert_allclose(
      metrics['dcl_u_mean'].numpy() / metrics['dcl_g_mean'].numpy(),
      gamma / (2 * gamma - 1), rtol=1e-5)


def test_mean_store_tends_to_batch_estimate():
  ids = np.array([0, 1, 2, 3])
  z1, z2 = _views(seed=8, n=4)
  objective = sogcl.SogCLR(temperature=TAU, gamma=0.3, u_store='mean')
  objective.validate(4, 4)  # gamma <= 0.5 is fine with 'mean'.
  objective.build(4, 4, projection_dim=5)
  _iterate(objective, z1, z2, ids, steps=200)
  result = sogcl.dynamic_contrastive_loss(
      tf.constant(z1), tf.constant(z2), tf.zeros([4], tf.float64), TAU, 1.0)
  np.testing.assert_allclose(
      objective.u.numpy(), (result.g_a.numpy() + result.g_b.numpy()) / 2,
      rtol=1e-5)


def test_validate_rejects_what_cannot_work():
  with pytest.raises(ValueError, match='--dcl_u_store=sum with --gamma=0.5'):
    sogcl.SogCLR(gamma=0.5).validate(32, 100)
  with pytest.raises(ValueError, match=r'--gamma=0.0 must be in \(0, 1\]'):
    sogcl.SogCLR(gamma=0.0, u_store='mean').validate(32, 100)
  with pytest.raises(ValueError, match='--train_batch_size=64 exceeds'):
    sogcl.SogCLR().validate(64, 50)
  sogcl.SogCLR(gamma=0.9).validate(50, 50)


def test_duplicate_ids_read_the_same_u_and_store_the_mean():
  ids = np.array([3, 5, 3, 1])
  objective = sogcl.SogCLR(temperature=TAU, gamma=0.9)
  objective.build(6, 4, projection_dim=5)
  objective.u.assign([0.0, 2.0, 0.0, 4.0, 0.0, 6.0])
  z1, z2 = _views(seed=9, n=4)
  objective.loss(tf.constant(np.concatenate([z1, z2])),
                 {'id': tf.constant(ids, tf.int32)})
  _, _, _, _, stored = numpy_dcl(z1, z2, np.array([4.0, 6.0, 4.0, 2.0]), TAU,
                                 0.9, 'sum')
  want = np.array([0.0, stored[3], 0.0, (stored[0] + stored[2]) / 2, 0.0,
                   stored[1]])
  np.testing.assert_allclose(objective.u.numpy(), want, rtol=1e-6)


def test_two_replicas_equal_one_replica(two_replicas):
  """Loss, gradients and the whole u over 3 steps; copies bit-identical."""
  strategy = two_replicas
  num_examples, b, steps = 12, 4, 3
  # Step 2 holds id 5 on both replicas (a batch straddling two epochs).
  id_sets = [np.arange(8), np.array([8, 9, 10, 11, 0, 1, 2, 3]),
             np.array([4, 5, 6, 7, 5, 9, 10, 2])]
  with strategy.scope():
    distributed = sogcl.SogCLR(temperature=TAU, gamma=0.8)
    distributed.build(num_examples, 2 * b, projection_dim=5)
  single = sogcl.SogCLR(temperature=TAU, gamma=0.8)
  single.build(num_examples, 2 * b, projection_dim=5)

  def replica_fn(projections, ids):
    with tf.GradientTape() as tape:
      tape.watch(projections)
      loss, _ = distributed.loss(projections, {'id': ids})
      scaled = loss / strategy.num_replicas_in_sync
    return scaled, tape.gradient(scaled, projections)

  @tf.function
  def distributed_step(projections, ids):
    return strategy.run(replica_fn, args=(projections, ids))

  for step in range(steps):
    z1, z2 = _views(seed=20 + step, n=2 * b)
    ids = id_sets[step]
    projections = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(np.concatenate([
            z1[ctx.replica_id_in_sync_group * b:][:b],
            z2[ctx.replica_id_in_sync_group * b:][:b]])))
    local_ids = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(ids[ctx.replica_id_in_sync_group * b:][:b],
                                tf.int32))
    scaled, grads = distributed_step(projections, local_ids)
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, scaled, axis=None)
    grads = [g.numpy() for g in strategy.experimental_local_results(grads)]
    grad_z1 = np.concatenate([g[:b] for g in grads])
    grad_z2 = np.concatenate([g[b:] for g in grads])

    variable = tf.Variable(np.concatenate([z1, z2]))
    with tf.GradientTape() as tape:
      loss, _ = single.loss(variable, {'id': tf.constant(ids, tf.int32)})
    expected = tape.gradient(loss, variable).numpy()
    np.testing.assert_allclose(total.numpy(), loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad_z1, expected[:2 * b], rtol=1e-5,
                               atol=1e-9)
    np.testing.assert_allclose(grad_z2, expected[2 * b:], rtol=1e-5,
                               atol=1e-9)
    copies = [v.numpy() for v in distributed.u.values]
    assert len(copies) == 2
    np.testing.assert_array_equal(copies[0], copies[1])
    np.testing.assert_allclose(copies[0], single.u.numpy(), rtol=1e-6)
  assert np.count_nonzero(single.u.numpy()) == num_examples


def test_checkpoint_restores_u(tmp_path, two_replicas):
  objective = sogcl.SogCLR(temperature=TAU, gamma=0.9)
  objective.build(10, 4, projection_dim=5)
  for step, ids in enumerate(([1, 2, 3, 4], [4, 5, 6, 7])):
    z1, z2 = _views(seed=30 + step, n=4)
    objective.loss(tf.constant(np.concatenate([z1, z2]), tf.float32),
                   {'id': tf.constant(ids, tf.int32)})
  saved = objective.u.numpy()
  assert np.count_nonzero(saved) == 7
  path = tf.train.Checkpoint(**objective.checkpoint_items()).save(
      str(tmp_path / 'ckpt'))
  names = [name for name, _ in tf.train.list_variables(path)]
  assert any('sogclr_u' in name for name in names)

  fresh = sogcl.SogCLR(temperature=TAU, gamma=0.9)
  fresh.build(10, 4, projection_dim=5)
  assert np.count_nonzero(fresh.u.numpy()) == 0
  tf.train.Checkpoint(**fresh.checkpoint_items()).restore(
      path).assert_consumed()
  np.testing.assert_array_equal(fresh.u.numpy(), saved)

  with two_replicas.scope():
    mirrored = sogcl.SogCLR(temperature=TAU, gamma=0.9)
    mirrored.build(10, 4, projection_dim=5)
  tf.train.Checkpoint(**mirrored.checkpoint_items()).restore(
      path).assert_consumed()
  for copy in mirrored.u.values:
    np.testing.assert_array_equal(copy.numpy(), saved)


def test_objective_is_registered_and_reads_example_ids():
  cls = obj_lib.get_objective_class('sogclr')
  assert cls is sogcl.SogCLR
  assert cls().checkpoint_items() == {}
  built = cls(temperature=TAU)
  built.build(10, 4, projection_dim=5)
  z1, z2 = _views(seed=10, n=4)
  with pytest.raises(KeyError, match='id'):
    built.loss(tf.constant(np.concatenate([z1, z2])), {})


def test_digits_ids_cover_each_example_once_per_epoch():
  source = data_lib.get_data_source('digits', eval_split=None)
  num_examples = source.num_examples('train')
  eval_fn = data_lib.build_input_fn(source, 'train', 500, is_training=False,
                                    image_size=32)
  ids = np.concatenate([b['id'].numpy() for b in eval_fn()])
  np.testing.assert_array_equal(np.sort(ids), np.arange(num_examples))

  batch_size = 256
  train_fn = data_lib.build_input_fn(source, 'train', batch_size,
                                     is_training=True, image_size=32,
                                     use_blur=False, seed=1)
  batches = train_fn().take(num_examples // batch_size)
  ids = np.concatenate([b['id'].numpy() for b in batches])
  assert len(ids) == (num_examples // batch_size) * batch_size
  assert len(np.unique(ids)) == len(ids)
  assert ids.min() >= 0 and ids.max() < num_examples


# ---------------------------------------------------------------------------
# run.py end to end (subprocesses; two short training runs in total).
# ---------------------------------------------------------------------------

_COMMON = ['--dataset=digits', '--eval_split=test', '--image_size=32',
           '--resnet_depth=18', '--width_multiplier=0.25',
           '--train_batch_size=32', '--checkpoint_steps=1', '--mode=train',
           '--train_summary_steps=0']


def _run(args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, 'run.py'] + args, cwd=REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)


def _u(checkpoint):
  for name, shape in tf.train.list_variables(checkpoint):
    if 'sogclr_u' in name:
      assert shape == [1437]
      return tf.train.load_checkpoint(checkpoint).get_tensor(name)
  raise AssertionError(f'no sogclr_u in {checkpoint}')


def test_run_py_trains_sogclr_and_resumes_u(tmp_path):
  model_dir = str(tmp_path / 'model')
  first = _run(['--objective=sogclr', '--train_steps=2',
                f'--model_dir={model_dir}'] + _COMMON)
  assert first.returncode == 0, first.stderr[-3000:]
  u2 = _u(os.path.join(model_dir, 'ckpt-2'))
  # Two batches of 32 distinct ids of the first epoch, every u > 0.
  assert np.count_nonzero(u2) == 64 and np.all(u2 >= 0)

  # The legacy switch selects SogCLR and the run resumes u from ckpt-2.
  second = _run(['--DCL_mode', '--train_steps=3',
                 f'--model_dir={model_dir}'] + _COMMON)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Training sogclr' in second.stderr
  u3 = _u(os.path.join(model_dir, 'ckpt-3'))
  changed = np.flatnonzero(u3 != u2)
  assert 0 < len(changed) <= 32
  assert np.count_nonzero(u3) >= 64


def _exit_message(argv):
  """Runs the command-line path on `argv`; returns its (non-zero) exit
  text."""
  stderr = io.StringIO()
  with pytest.raises(SystemExit) as exit_info, \
      contextlib.redirect_stderr(stderr):
    run.run_from_flags(config_lib.parse_argv(argv))
  assert exit_info.value.code == 2
  return stderr.getvalue()


def test_run_py_rejects_contradicting_switches(tmp_path):
  common = [f'--model_dir={tmp_path}'] + _COMMON
  message = _exit_message(['--DCL_mode', '--objective=simclr'] + common)
  assert '--DCL_mode=true' in message and '--objective=simclr' in message
  message = _exit_message(['--GCL_mode=true', '--BI_mode=false'] + common)
  assert '--GCL_mode=true contradicts --BI_mode=false' in message
  message = _exit_message(['--BI_mode=false', '--objective=sogclr'] + common)
  assert '--BI_mode=false contradicts --objective=sogclr' in message
  message = _exit_message(['--objective=sogclr', '--gamma=0.4'] + common)
  assert '--dcl_u_store=sum with --gamma=0.4' in message
  message = _exit_message(['--num_classes=3'] + common)
  assert '--num_classes=3 is smaller than the 10 classes' in message
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('switch', ['--DCL_mode', '--GCL_mode', '--BI_mode'])
def test_legacy_switch_selects_sogclr(switch, tmp_path):
  cfg = config_lib.from_argv([switch, f'--model_dir={tmp_path}'] + _COMMON)
  assert cfg.objective_name == 'sogclr'
  assert cfg.objective == config_lib.SogCLRConfig()
  cfg = config_lib.from_argv([f'--model_dir={tmp_path}'] + _COMMON)
  assert cfg.objective_name == 'simclr'


def test_num_classes_and_crop_area_min_reach_the_experiment(tmp_path):
  cfg = config_lib.from_argv(['--num_classes=12', '--crop_area_min=0.9',
                              f'--model_dir={tmp_path}',
                              '--proj_out_dim=8'] + _COMMON)
  experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
  assert experiment.data.num_classes == 12
  kernel = experiment.model.supervised_head.trainable_variables[0]
  assert kernel.shape[-1] == 12
  seen = {}
  original = data_lib.build_input_fn

  def spy(*args, **kwargs):
    seen.update(kwargs)
    return original(*args, **kwargs)

  data_lib.build_input_fn = spy
  try:
    experiment.train_input_fn(8)
  finally:
    data_lib.build_input_fn = original
  assert seen['crop_area_min'] == 0.9
