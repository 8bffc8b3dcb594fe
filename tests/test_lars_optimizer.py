"""Tests for lars_optimizer: LARS vs NumPy (single device and mirrored),
the warm-up + cosine schedule, weight-decay loss and optimizer construction."""
import math
import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import lars_optimizer as lo
from conftest import two_replica_strategy

LR, MOMENTUM, WD, EETA = 0.5, 0.9, 0.01, 0.05

# name -> (shape, use weight decay, use layer adaptation, init kind, grad kind)
# The exclusion flags are written by hand from the rules (independent of the
# module's matching code). Exclusions: weight decay = EXCLUDE + ['no_decay'],
# adaptation = EXCLUDE.
VARIABLES = {
    'net/dense/kernel': ((3, 4), True, True, 'rand', 'rand'),
    'net/dense/bias': ((4,), False, False, 'rand', 'rand'),
    'net/batch_normalization/gamma': ((4,), False, False, 'rand', 'rand'),
    'net/bn1/beta': ((4,), False, False, 'rand', 'rand'),
    'net/head_supervised/kernel': ((4, 2), False, False, 'rand', 'rand'),
    # zero gradient, no decay -> |g| = 0 -> trust 1
    'net/no_decay/kernel': ((2, 3), False, True, 'rand', 'zero'),
    # zero gradient but decayed -> g = wd * w
    'net/conv/kernel': ((2, 2, 3), True, True, 'rand', 'zero'),
    # zero weights -> |w| = 0 -> trust 1
    'net/zero_init/kernel': ((5,), True, True, 'zero', 'rand'),
}
NAMES = list(VARIABLES)


def _initial_values(seed=0):
  rng = np.random.default_rng(seed)
  return {n: (np.zeros(s) if init == 'zero' else rng.normal(size=s))
          for n, (s, _, _, init, _) in VARIABLES.items()}


def _gradients(step, seed=1):
  rng = np.random.default_rng(seed + 100 * step)
  return {n: (np.zeros(s) if kind == 'zero' else rng.normal(size=s))
          for n, (s, _, _, _, kind) in VARIABLES.items()}


def np_lars_step(w, g, v, lr, decay, adapt, m=MOMENTUM, wd=WD, eeta=EETA):
  """Reference LARS update (classic momentum); returns (new w, new v)."""
  if decay:
    g = g + wd * w
  wn, gn = np.linalg.norm(w), np.linalg.norm(g)
  trust = eeta * wn / gn if adapt and wn > 0 and gn > 0 else 1.0
  v = m * v + lr * trust * g
  return w - v, v


def np_run(num_steps):
  ws = _initial_values()
  vs = {n: np.zeros_like(w) for n, w in ws.items()}
  for step in range(num_steps):
    gs = _gradients(step)
    for n in NAMES:
      _, decay, adapt, _, _ = VARIABLES[n]
      ws[n], vs[n] = np_lars_step(ws[n], gs[n], vs[n], LR, decay, adapt)
  return ws, vs


def make_optimizer():
  return lo.LARSOptimizer(
      LR, momentum=MOMENTUM, weight_decay=WD,
      exclude_from_weight_decay=lo.EXCLUDE_FROM_WEIGHT_DECAY + ['no_decay'],
      exclude_from_layer_adaptation=lo.EXCLUDE_FROM_WEIGHT_DECAY, eeta=EETA)


def make_variables():
  return [tf.Variable(v, name=n, dtype=tf.float64)
          for n, v in _initial_values().items()]


def assert_matches_numpy(variables, optimizer, ws, vs, initial):
  for var in variables:
    n = lo.canonical_variable_name(var)
    components = getattr(var, 'values', (var,))
    slot = optimizer.get_slot(var, 'Momentum')
    slot_components = getattr(slot, 'values', (slot,))
    for comp, slot_comp in zip(components, slot_components):
      # Compare the change of w (not w itself) so small updates count fully.
      np.testing.assert_allclose(comp.numpy() - initial[n], ws[n] - initial[n],
                                 rtol=1e-6, atol=1e-12, err_msg=n)
      np.testing.assert_allclose(slot_comp.numpy(), vs[n], rtol=1e-6,
                                 atol=1e-12, err_msg=n)


def test_lars_two_steps_match_numpy():
  variables = make_variables()
  opt = make_optimizer()
  for step in range(2):
    gs = _gradients(step)
    opt.apply_gradients([(tf.constant(gs[lo.canonical_variable_name(v)]), v)
                         for v in variables])
  ws, vs = np_run(2)
  assert_matches_numpy(variables, opt, ws, vs, _initial_values())
  # The NumPy reference really distinguishes adapted from non-adapted updates.
  ws_plain, _ = np_run(1)
  assert not np.allclose(ws_plain['net/dense/kernel'],
                         _initial_values()['net/dense/kernel'] -
                         LR * _gradients(0)['net/dense/kernel'])


def test_lars_mirrored_matches_single_device():
  strategy = two_replica_strategy()
  with strategy.scope():
    variables = make_variables()
    opt = make_optimizer()

  @tf.function
  def train_step(per_replica_grads):
    def replica_fn(grads):
      opt.apply_gradients(zip(grads, variables))
    strategy.run(replica_fn, args=(per_replica_grads,))

  fractions = (0.25, 0.75)  # per-replica gradients sum to the full gradient
  for step in range(2):
    gs = _gradients(step)

    def value_fn(ctx, gs=gs):
      f = fractions[ctx.replica_id_in_sync_group]
      return [tf.constant(f * gs[n]) for n in NAMES]

    train_step(strategy.experimental_distribute_values_from_function(value_fn))

  # Single-device run on the same gradients.
  single_vars = make_variables()
  single_opt = make_optimizer()
  for step in range(2):
    gs = _gradients(step)
    single_opt.apply_gradients([(tf.constant(gs[n]), v)
                                for n, v in zip(NAMES, single_vars)])

  ws, vs = np_run(2)
  assert_matches_numpy(variables, opt, ws, vs, _initial_values())
  for mirrored, single in zip(variables, single_vars):
    assert len(mirrored.values) == 2
    for comp in mirrored.values:
      np.testing.assert_allclose(comp.numpy(), single.numpy(), rtol=1e-6,
                                 atol=1e-12)


def test_lars_sparse_gradient_equals_dense():
  init = np.arange(12, dtype=np.float64).reshape(4, 3) / 10.
  sparse_var = tf.Variable(init, name='emb/kernel')
  dense_var = tf.Variable(init, name='emb/kernel')
  opt_s, opt_d = make_optimizer(), make_optimizer()
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.gather(sparse_var, [1, 3, 1]) ** 2)
  grad = tape.gradient(loss, sparse_var)
  assert isinstance(grad, tf.IndexedSlices)
  opt_s.apply_gradients([(grad, sparse_var)])
  opt_d.apply_gradients([(tf.convert_to_tensor(grad), dense_var)])
  np.testing.assert_allclose(sparse_var.numpy(), dense_var.numpy(), rtol=1e-12)
  assert not np.allclose(sparse_var.numpy(), init)


def test_layer_adaptation_defaults_to_weight_decay_exclusions():
  opt = lo.LARSOptimizer(0.1, exclude_from_weight_decay=['bias', 'foo'])
  assert opt.exclude_from_layer_adaptation == ['bias', 'foo']
  opt = lo.LARSOptimizer(0.1, exclude_from_weight_decay=['bias'],
                         exclude_from_layer_adaptation=['foo'])
  assert opt.exclude_from_layer_adaptation == ['foo']


def test_lars_get_config_round_trip_with_schedule():
  sched = lo.WarmUpAndCosineDecay(0.3, 1000, 64, warmup_epochs=1)
  opt = lo.LARSOptimizer(sched, momentum=0.8, weight_decay=1e-4,
                         exclude_from_weight_decay=['bias'], eeta=0.002)
  clone = lo.LARSOptimizer.from_config(opt.get_config())
  for attr in ('momentum', 'weight_decay', 'eeta',
               'exclude_from_weight_decay', 'exclude_from_layer_adaptation'):
    assert getattr(clone, attr) == getattr(opt, attr), attr
  lr = clone._get_hyper('learning_rate')
  assert isinstance(lr, lo.WarmUpAndCosineDecay)
  assert lr.get_config() == sched.get_config()


@pytest.mark.parametrize('name,bn,patterns_match', [
    ('model/resnet/batch_normalization_3/gamma:0', True, True),
    ('model/resnet/sync_batch_normalization/beta:0', True, True),
    ('model/resnet/bn1/gamma/replica_1:0', True, True),
    ('model/head/bn_last/beta:0', True, True),
    ('model/resnet/conv2d/kernel:0', False, False),
    ('model/dense/bias/replica_1:0', False, True),
    ('model/head_supervised/dense/kernel:0', False, True),
    ('model/gamma_net/kernel:0', False, False),
])
def test_variable_matches(name, bn, patterns_match):
  assert lo.is_batch_norm_variable(name) is bn
  assert lo.variable_matches(name, lo.EXCLUDE_FROM_WEIGHT_DECAY) is \
      patterns_match
  # Without the BN pattern gamma/beta are not matched by the special rule.
  assert lo.variable_matches(name, ['bias', 'head_supervised']) is (
      patterns_match and not bn)


def test_canonical_variable_name():
  v = tf.Variable(1.0, name='a/b/kernel')
  assert lo.canonical_variable_name(v) == 'a/b/kernel'
  assert lo.canonical_variable_name('a/gamma/replica_12:0') == 'a/gamma'


# ----------------------------------------------------------------- schedule


def np_schedule(step, base_lr, batch, warmup, total, scaling):
  scaled = base_lr * batch / 256. if scaling == 'linear' else (
      base_lr * math.sqrt(batch))
  if step < warmup:
    return step / warmup * scaled
  progress = min(step - warmup, total - warmup) / (total - warmup)
  return scaled * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize('scaling', ['linear', 'sqrt'])
def test_schedule_matches_numpy(scaling):
  # warmup_epochs * N / B = 3.67: SimCLR's floor-then-round gives 3, not 4.
  n, batch, epochs = 1100, 300, 10
  sched = lo.WarmUpAndCosineDecay(0.3, n, batch, warmup_epochs=1,
                                  train_epochs=epochs,
                                  learning_rate_scaling=scaling)
  warmup, total = 3, n * epochs // batch + 1
  assert sched.warmup_steps == warmup
  assert total == 37 and sched.decay_end_step == total
  scaled = 0.3 * 300 / 256. if scaling == 'linear' else 0.3 * math.sqrt(300)
  for step in [0, 1, 2, 3, 4, 20, 36, 37, 50]:
    got = float(sched(tf.constant(step, tf.int64)))
    want = np_schedule(step, 0.3, batch, warmup, total, scaling)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7,
                               err_msg=str(step))
  assert float(sched(0)) == 0.
  np.testing.assert_allclose(float(sched(3)), scaled, rtol=1e-6)  # not 0.75x
  np.testing.assert_allclose(float(sched(37)), 0., atol=1e-7)
  np.testing.assert_allclose(float(sched(20)),
                             scaled * 0.5 * (1 + math.cos(math.pi * 17 / 34)),
                             rtol=1e-6)


def test_schedule_explicit_total_steps_and_fractional_warmup():
  # 2.5 * 1000 // 64 = 39.0
  sched = lo.WarmUpAndCosineDecay(0.1, 1000, 64, warmup_epochs=2.5,
                                  total_steps=100)
  assert sched.warmup_steps == 39
  assert sched.decay_end_step == 100
  for step in [0, 20, 39, 70, 100]:
    np.testing.assert_allclose(
        float(sched(step)), np_schedule(step, 0.1, 64, 39, 100, 'linear'),
        rtol=1e-6, atol=1e-7)


def test_schedule_without_warmup_starts_at_scaled_lr():
  sched = lo.WarmUpAndCosineDecay(0.2, 1000, 512, warmup_epochs=0,
                                  total_steps=10)
  np.testing.assert_allclose(float(sched(0)), 0.2 * 2, rtol=1e-6)
  np.testing.assert_allclose(float(sched(5)), 0.4 * 0.5, rtol=1e-6)


def test_schedule_get_config_and_bad_scaling():
  sched = lo.WarmUpAndCosineDecay(0.3, 1000, 64, warmup_epochs=2,
                                  total_steps=77, train_epochs=5,
                                  learning_rate_scaling='sqrt', name='lr')
  clone = lo.WarmUpAndCosineDecay.from_config(sched.get_config())
  assert clone.get_config() == sched.get_config()
  assert float(clone(30)) == pytest.approx(float(sched(30)))
  serialized = tf_keras.optimizers.schedules.serialize(sched)
  restored = tf_keras.optimizers.schedules.deserialize(serialized)
  assert restored.get_config() == sched.get_config()
  with pytest.raises(ValueError, match='linear.*sqrt'):
    lo.WarmUpAndCosineDecay(0.3, 1000, 64, learning_rate_scaling='cubic')


def test_constant_schedule_is_the_scaled_rate_at_every_step():
  """--linear_head_schedule=constant: lr·B/256 (linear) or lr·√B (sqrt) at
  every step, no warm-up; a schedule, so an optimizer keeps no
  learning-rate variable in its checkpoint; bad scaling refused."""
  linear = lo.ConstantLearningRate(0.01, 512)
  sqrt = lo.ConstantLearningRate(0.01, 64, learning_rate_scaling='sqrt')
  for step in (0, 1, 10**6):
    assert float(linear(step)) == pytest.approx(0.02)
    assert float(sqrt(step)) == pytest.approx(0.08)
  clone = lo.ConstantLearningRate.from_config(sqrt.get_config())
  assert clone.get_config() == sqrt.get_config()
  restored = tf_keras.optimizers.schedules.deserialize(
      tf_keras.optimizers.schedules.serialize(sqrt))
  assert float(restored(3)) == pytest.approx(0.08)
  optimizer = lo.build_optimizer('adam', linear)
  variable = tf.Variable([1.0, 2.0])
  optimizer.apply_gradients([(tf.constant([1.0, 1.0]), variable)])
  keys = [k for k, _ in tf.train.list_variables(tf.train.Checkpoint(
      optimizer=optimizer).write(os.path.join(tempfile.mkdtemp(), 'c')))]
  assert not [k for k in keys if 'learning_rate' in k], keys
  with pytest.raises(ValueError, match='linear.*sqrt'):
    lo.ConstantLearningRate(0.01, 64, learning_rate_scaling='cubic')


def test_get_train_steps():
  assert lo.get_train_steps(1000, 10, 64) == 10000 // 64 + 1 == 157
  assert lo.get_train_steps(1024, 1, 512) == 3
  assert lo.get_train_steps(1000, 10, 64, train_steps=5) == 5
  assert lo.get_train_steps(1000, 10, 64, train_steps=0) == 157


# ------------------------------------------------- weight decay, construction


def test_weight_decay_loss_matches_numpy():
  rng = np.random.default_rng(3)
  named = {
      'model/head_supervised/dense/kernel:0': rng.normal(size=(4, 3)),
      'model/head_supervised/dense/bias:0': rng.normal(size=(3,)),
      'model/resnet/conv2d/kernel:0': rng.normal(size=(3, 3, 2, 4)),
      'model/resnet/batch_normalization/gamma:0': rng.normal(size=(4,)),
      'model/head/bn_last/gamma:0': rng.normal(size=(4,)),
      'model/head/dense/bias:0': rng.normal(size=(4,)),
  }
  variables = [tf.Variable(v, name=n.split(':')[0], dtype=tf.float32)
               for n, v in named.items()]
  half_sq = {n: 0.5 * np.sum(v.astype(np.float32) ** 2)
             for n, v in named.items()}
  wd = 1e-3
  lars = float(lo.weight_decay_loss(variables, 'lars', wd))
  np.testing.assert_allclose(
      lars, wd * half_sq['model/head_supervised/dense/kernel:0'], rtol=1e-6)
  others = wd * sum(half_sq[n] for n in [
      'model/head_supervised/dense/kernel:0',
      'model/head_supervised/dense/bias:0',
      'model/resnet/conv2d/kernel:0', 'model/head/dense/bias:0'])
  for name in ('momentum', 'adam'):
    got = lo.weight_decay_loss(variables, name, wd)
    assert got.shape == () and got.dtype == tf.float32
    np.testing.assert_allclose(float(got), others, rtol=1e-6)
  empty = lo.weight_decay_loss(variables[2:], 'lars', wd)
  assert empty.shape == () and float(empty) == 0.
  with pytest.raises(ValueError, match='lars'):
    lo.weight_decay_loss(variables, 'sgd', wd)


def test_build_optimizer():
  lars = lo.build_optimizer('lars', 0.3, momentum=0.8, weight_decay=1e-6)
  assert isinstance(lars, lo.LARSOptimizer)
  assert lars.momentum == 0.8 and lars.weight_decay == 1e-6
  assert lars.exclude_from_weight_decay == [
      'batch_normalization', 'bias', 'head_supervised']
  assert lars.exclude_from_layer_adaptation == lars.exclude_from_weight_decay
  sgd = lo.build_optimizer('momentum', 0.1, momentum=0.7)
  assert type(sgd) is tf_keras.optimizers.legacy.SGD
  assert sgd.nesterov is True
  assert float(sgd._get_hyper('momentum')) == pytest.approx(0.7)
  adam = lo.build_optimizer('adam', 0.001)
  assert type(adam) is tf_keras.optimizers.legacy.Adam
  assert float(adam._get_hyper('learning_rate')) == pytest.approx(0.001)
  with pytest.raises(ValueError) as err:
    lo.build_optimizer('sgd', 0.1)
  for allowed in ('lars', 'momentum', 'adam', 'sgd'):
    assert allowed in str(err.value)
