"""Tests for resnet.py: architecture (exact parameter counts), stems, SK/SE,
freezing for fine-tuning, synchronized (global) batch norm, and the fused
batch norm taken where nothing is synchronised."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import resnet
from conftest import two_replica_strategy

SUPPORTED = (18, 34, 50, 101, 152, 200)
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3),
          101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


def tally(depth, width=1, cifar_stem=False, sk_ratio=0.0, se_ratio=0.0):
  """Closed-form count of trainable parameters (conv kernels + BN γ/β + SE biases).

  Written from the architecture description, independently of resnet.py.
  """
  def conv(k, cin, cout):
    return k * k * cin * cout

  def bn(c):
    return 2 * c

  bottleneck = depth >= 50
  c64 = int(round(64 * width))
  if cifar_stem:
    n = conv(3, 3, c64) + bn(c64)
  elif sk_ratio > 0:
    half = int(round(32 * width))
    n = (conv(3, 3, half) + bn(half) + conv(3, half, half) + bn(half) +
         conv(3, half, c64) + bn(c64))
  else:
    n = conv(7, 3, c64) + bn(c64)
  cin = c64
  for g, num_blocks in enumerate(BLOCKS[depth]):
    f = c64 * 2**g
    out = 4 * f if bottleneck else f
    for b in range(num_blocks):
      if b == 0:  # projection shortcut on the first block of every group
        n += conv(1, cin, out) + bn(out)
      if bottleneck:
        n += conv(1, cin, f) + bn(f)
        if sk_ratio > 0:
          mid = max(int(f * sk_ratio), 32)
          n += conv(3, f, 2 * f) + bn(2 * f) + f * mid + bn(mid) + mid * 2 * f
        else:
          n += conv(3, f, f) + bn(f)
        n += conv(1, f, out) + bn(out)
      else:
        n += conv(3, cin, f) + bn(f) + conv(3, f, f) + bn(f)
      if se_ratio > 0:
        s = max(1, int(f * se_ratio))
        n += (out * s + s) + (s * out + out)
      cin = out
  return n


def count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def build(depth, width, size=32, **kwargs):
  model = resnet.resnet(depth, width, **kwargs)
  model(tf.zeros([1, size, size, 3]), training=False)
  return model


def bn_layers(model):
  return [l for l in model._flatten_layers()
          if isinstance(l, tf_keras.layers.BatchNormalization)]


# ----------------------------------------------------------------- counts


def test_resnet50_parameter_count():
  model = build(50, 1, size=224)
  n = count(model.trainable_variables)
  # torchvision resnet50: 25,557,032 - fc (2048*1000 + 1000) = 23,508,032.
  assert n == 23_508_032
  assert n == tally(50, 1)
  # 53 BNs, each with a moving mean and variance as large as its γ and β.
  assert count(model.non_trainable_variables) == count(
      [v for v in model.trainable_variables if 'batch_normalization' in v.name])
  assert len(bn_layers(model)) == 53


def test_resnet18_parameter_count():
  model = build(18, 1)
  n = count(model.trainable_variables)
  # torchvision resnet18 without fc is 11,176,512; SimCLR also projects the
  # shortcut of block_group1's first block (1x1 64->64 conv + BN: 4,224).
  assert n == 11_180_736
  assert n == tally(18, 1)
  assert n == 11_176_512 + 64 * 64 + 2 * 64


def test_wide_resnet50_sizes_match_simclr_paper():
  # SimCLR paper, Table 1 / Fig. 7: R50 (1x) 24M, (2x) 94M, (4x) 375M.
  assert tally(50, 1) == pytest.approx(24e6, rel=0.03)
  model = build(50, 2)
  n = count(model.trainable_variables)
  assert n == tally(50, 2)
  assert n == pytest.approx(94e6, rel=0.01)
  assert model(tf.zeros([1, 32, 32, 3])).shape == (1, 4096)
  del model
  # 4x is too heavy for a test machine: closed form only.
  assert tally(50, 4) == pytest.approx(375e6, rel=0.01)


@pytest.mark.parametrize('depth,width,expected', [
    (18, 1, 512), (34, 2, 1024), (50, 1, 2048), (101, 2, 4096),
    (152, 3, 6144), (200, 4, 8192), (18, 0.25, 128), (50, 0.25, 512)])
def test_num_features(depth, width, expected):
  assert resnet.num_features(depth, width) == expected


@pytest.mark.parametrize('depth', [18, 34, 50])
def test_output_shape_and_count_per_depth(depth):
  model = build(depth, 0.25, cifar_stem=True)
  out = model(tf.random.uniform([2, 32, 32, 3]), training=True)
  assert out.shape == (2, resnet.num_features(depth, 0.25))
  assert count(model.trainable_variables) == tally(depth, 0.25,
                                                   cifar_stem=True)


@pytest.mark.parametrize('depth', [0, 20, 49, '50', None])
def test_bad_depth_raises(depth):
  with pytest.raises(ValueError, match='18, 34, 50, 101, 152, 200'):
    resnet.resnet(depth, 1)
  with pytest.raises(ValueError, match='18, 34, 50, 101, 152, 200'):
    resnet.num_features(depth, 1)


# ------------------------------------------------------------ structure


def test_block_structure_v15_and_zero_init():
  model = build(50, 0.25)
  block = model.block_groups[1].blocks[0]
  convs = {l.name: l for l in block.residual_layers}
  # v1.5: the stride sits on the 3x3 conv, not on the first 1x1.
  assert convs['conv1'].conv2d.strides == (1, 1)
  assert convs['conv2'].conv2d.strides == (2, 2)
  assert convs['conv2'].conv2d.kernel_size == (3, 3)
  assert block.shortcut_layers[0].conv2d.strides == (2, 2)
  # Only the first block of a group projects its shortcut.
  assert [len(b.shortcut_layers) > 0 for b in model.block_groups[0].blocks] \
      == [True, False, False]
  # Last BN of every block starts at γ = 0, every other BN at γ = 1.
  for v in model.trainable_variables:
    if v.name.endswith('gamma:0'):
      expected = 0.0 if '/bn3/' in v.name else 1.0
      np.testing.assert_array_equal(v.numpy(), expected, err_msg=v.name)
  # Channels: 64·2^k·w (·4 for the bottleneck output).
  maps = model.feature_maps(tf.zeros([1, 64, 64, 3]))
  assert [maps[f'block_group{i}'].shape[-1] for i in range(1, 5)] == \
      [64, 128, 256, 512]
  assert [maps[f'block_group{i}'].shape[1] for i in range(1, 5)] == \
      [16, 8, 4, 2]


def test_batch_norm_relu_options():
  layer = resnet.BatchNormRelu(batch_norm_decay=0.97, global_bn=False,
                               init_zero=True, center=False)
  x = tf.random.normal([4, 3, 3, 5])
  y = layer(x, training=True)
  assert layer.bn.momentum == 0.97
  assert layer.bn.epsilon == 1e-5
  assert not layer.bn.synchronized
  assert layer.bn.beta is None
  np.testing.assert_array_equal(layer.bn.gamma.numpy(), 0.0)
  np.testing.assert_array_equal(y.numpy(), 0.0)
  assert resnet.BatchNormRelu().bn.synchronized
  # relu=True: max(0, (x - μ)/sqrt(σ² + ε) γ + β) with batch statistics.
  layer = resnet.BatchNormRelu(global_bn=False)
  y = layer(x, training=True).numpy()
  xn = x.numpy()
  mu, var = xn.mean((0, 1, 2)), xn.var((0, 1, 2))
  np.testing.assert_allclose(
      y, np.maximum(0, (xn - mu) / np.sqrt(var + 1e-5)), atol=1e-5)
  np.testing.assert_allclose(layer.bn.moving_mean.numpy(), 0.1 * mu,
                             atol=1e-6)


@pytest.mark.parametrize('kernel_size,strides,size', [
    (3, 2, 7), (3, 2, 8), (7, 2, 9), (1, 2, 8), (3, 1, 5)])
def test_conv2d_fixed_padding(kernel_size, strides, size):
  layer = resnet.Conv2dFixedPadding(4, kernel_size, strides)
  x = tf.random.normal([2, size, size, 3])
  y = layer(x)
  kernel = layer.conv2d.kernel
  assert layer.conv2d.bias is None
  total = kernel_size - 1
  pad = [[0, 0], [total // 2, total - total // 2],
         [total // 2, total - total // 2], [0, 0]]
  expected = tf.nn.conv2d(x, kernel, strides, padding=pad)
  np.testing.assert_allclose(y.numpy(), expected.numpy(), atol=1e-5)
  assert y.shape[1] == (size + strides - 1) // strides


# ----------------------------------------------------------------- stems


def test_cifar_stem():
  model = build(18, 0.25, cifar_stem=True)
  first = model.stem.stem_layers[0]
  assert first.conv2d.kernel.shape == (3, 3, 3, 16)
  assert first.conv2d.strides == (1, 1)
  assert not any(isinstance(l, tf_keras.layers.MaxPooling2D)
                 for l in model.stem.stem_layers)
  maps = model.feature_maps(tf.zeros([2, 32, 32, 3]), training=False)
  assert maps['stem'].shape == (2, 32, 32, 16)
  assert maps['block_group4'].shape == (2, 4, 4, 128)


def test_standard_stem():
  model = build(18, 0.25)
  first = model.stem.stem_layers[0]
  assert first.conv2d.kernel.shape == (7, 7, 3, 16)
  assert first.conv2d.strides == (2, 2)
  assert isinstance(model.stem.stem_layers[-1], tf_keras.layers.MaxPooling2D)
  maps = model.feature_maps(tf.zeros([2, 32, 32, 3]), training=False)
  assert maps['stem'].shape == (2, 8, 8, 16)
  assert maps['block_group4'].shape == (2, 1, 1, 128)
  maps = model.feature_maps(tf.zeros([1, 224, 224, 3]), training=False)
  assert maps['block_group4'].shape == (1, 7, 7, 128)


# ---------------------------------------------------------------- SK / SE


def test_sk_and_se_variants_counts_and_run():
  plain = build(50, 0.25)
  se = build(50, 0.25, se_ratio=0.25)
  sk = build(50, 0.25, sk_ratio=0.0625)
  both = build(50, 0.25, sk_ratio=0.0625, se_ratio=0.25)
  se_extra = 0
  for g, num_blocks in enumerate(BLOCKS[50]):
    f = 16 * 2**g
    s = max(1, int(f * 0.25))
    se_extra += num_blocks * ((4 * f * s + s) + (s * 4 * f + 4 * f))
  assert count(se.trainable_variables) - count(plain.trainable_variables) \
      == se_extra
  assert count(sk.trainable_variables) == tally(50, 0.25, sk_ratio=0.0625)
  assert count(both.trainable_variables) == tally(
      50, 0.25, sk_ratio=0.0625, se_ratio=0.25)
  # ResNet-D: three 3x3 convs in the stem, average-pool shortcut.
  stem_convs = [l for l in sk.stem.stem_layers
                if isinstance(l, resnet.Conv2dFixedPadding)]
  assert [c.conv2d.kernel.shape for c in stem_convs] == [
      (3, 3, 3, 8), (3, 3, 8, 8), (3, 3, 8, 16)]
  assert [c.strides for c in stem_convs] == [2, 1, 1]
  shortcut = sk.block_groups[1].blocks[0].shortcut_layers
  assert any(isinstance(l, tf_keras.layers.AveragePooling2D)
             for l in shortcut)
  assert all(l.strides == 1 for l in shortcut
             if isinstance(l, resnet.Conv2dFixedPadding))
  x = tf.random.uniform([2, 32, 32, 3])
  for model in (se, sk, both):
    y = model(x, training=True)
    assert y.shape == (2, 512)
    assert np.all(np.isfinite(y.numpy()))
  # Basic blocks: SK only changes the stem and the shortcut.
  sk18 = build(18, 0.25, sk_ratio=0.0625)
  assert count(sk18.trainable_variables) == tally(18, 0.25, sk_ratio=0.0625)
  assert sk18(x, training=True).shape == (2, 128)


def test_se_layer_matches_numpy():
  layer = resnet.SE_Layer(filters=8, se_ratio=0.25)
  x = tf.random.normal([3, 4, 4, 32])
  layer(x)
  assert layer.se_reduce.kernel.shape == (1, 1, 32, 2)
  assert layer.se_expand.kernel.shape == (1, 1, 2, 32)
  w1, b1 = layer.se_reduce.kernel.numpy()[0, 0], layer.se_reduce.bias.numpy()
  w2, b2 = layer.se_expand.kernel.numpy()[0, 0], layer.se_expand.bias.numpy()
  b1 = b1 + 0.1  # non-zero biases so that a missing bias would be caught
  layer.se_reduce.bias.assign(b1)
  y = layer(x).numpy()
  xn = x.numpy()
  gate = 1 / (1 + np.exp(-(np.maximum(0, xn.mean((1, 2)) @ w1 + b1) @ w2 +
                           b2)))
  np.testing.assert_allclose(y, xn * gate[:, None, None, :], atol=1e-5)


def test_sk_conv_matches_numpy():
  layer = resnet.SK_Conv2D(filters=6, strides=2, sk_ratio=0.5,
                           global_bn=False)
  x = tf.random.normal([2, 8, 8, 5])
  layer(x, training=False)
  assert layer.attention_conv0.kernel.shape == (1, 1, 6, 32)  # max(3, 32)
  # Non-trivial BN parameters so that BN placement is checked too.
  rng = np.random.default_rng(0)
  for bnr in (layer.bn, layer.attention_bn):
    for v in (bnr.bn.gamma, bnr.bn.beta, bnr.bn.moving_mean):
      v.assign(rng.normal(size=v.shape).astype(np.float32))
    bnr.bn.moving_variance.assign(
        rng.uniform(0.5, 2, size=bnr.bn.moving_variance.shape).astype(
            np.float32))
  y = layer(x, training=False).numpy()

  def bn_relu(t, bnr):
    b = bnr.bn
    return np.maximum(0, (t - b.moving_mean.numpy()) / np.sqrt(
        b.moving_variance.numpy() + 1e-5) * b.gamma.numpy() + b.beta.numpy())

  conv = tf.nn.conv2d(x, layer.conv.conv2d.kernel, 2,
                      padding=[[0, 0], [1, 1], [1, 1], [0, 0]]).numpy()
  branches = bn_relu(conv, layer.bn)
  b0, b1 = branches[..., :6], branches[..., 6:]
  pooled = (b0 + b1).mean((1, 2))
  hidden = bn_relu(pooled @ layer.attention_conv0.kernel.numpy()[0, 0],
                   layer.attention_bn)
  logits = hidden @ layer.attention_conv1.kernel.numpy()[0, 0]
  a0 = 1 / (1 + np.exp(logits[:, 6:] - logits[:, :6]))
  expected = a0[:, None, None] * b0 + (1 - a0[:, None, None]) * b1
  np.testing.assert_allclose(y, expected, atol=1e-4)


# ---------------------------------------------------------------- freezing


def _moving_means(model):
  return {l.moving_mean.name: l.moving_mean.numpy() for l in bn_layers(model)}


def test_fine_tune_after_block_2():
  model = build(18, 0.25, cifar_stem=True, global_bn=False,
                fine_tune_after_block=2)
  frozen = ('resnet/stem/', 'resnet/block_group1/', 'resnet/block_group2/')
  trainable_names = [v.name for v in model.trainable_variables]
  assert trainable_names
  assert all(n.startswith(('resnet/block_group3/', 'resnet/block_group4/'))
             for n in trainable_names)
  assert any(n.startswith('resnet/block_group3/') for n in trainable_names)
  frozen_vars = [v for v in model.variables if v.name.startswith(frozen)]
  assert frozen_vars
  non_trainable = {v.name for v in model.non_trainable_variables}
  assert all(v.name in non_trainable for v in frozen_vars)
  # Every non-BN-statistic variable of groups 3/4 is trainable.
  assert count(model.trainable_variables) == tally(18, 0.25, True) - count(
      [v for v in frozen_vars if 'moving' not in v.name])

  x = tf.random.uniform([4, 32, 32, 3])
  before = _moving_means(model)
  watched = [v for v in model.variables if 'moving' not in v.name]
  with tf.GradientTape() as tape:
    tape.watch(watched)  # also the frozen ones: they must get no gradient
    loss = tf.reduce_sum(tf.square(model(x, training=True)))
  grads = tape.gradient(loss, watched)
  for v, g in zip(watched, grads):
    if v.name.startswith(frozen):
      assert g is None, v.name
    else:
      assert g is not None, v.name
  assert any(np.any(g.numpy() != 0) for g in grads if g is not None)

  after = _moving_means(model)
  assert before.keys() == after.keys()
  for name in before:
    if name.startswith(frozen):
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    else:
      assert np.any(after[name] != before[name]), name

  # Frozen blocks run in inference mode even when the model trains.
  train_maps = model.feature_maps(x, training=True)
  eval_maps = model.feature_maps(x, training=False)
  np.testing.assert_allclose(train_maps['block_group2'].numpy(),
                             eval_maps['block_group2'].numpy(), atol=1e-6)
  assert not np.allclose(train_maps['block_group3'].numpy(),
                         eval_maps['block_group3'].numpy(), atol=1e-3)


def test_fine_tune_after_block_4_and_minus_1():
  model = build(18, 0.25, cifar_stem=True, global_bn=False,
                fine_tune_after_block=4)
  assert not model.trainable_variables
  x = tf.random.uniform([4, 32, 32, 3])
  before = _moving_means(model)
  with tf.GradientTape() as tape:
    tape.watch(model.variables)
    out = model(x, training=True)
  assert all(g is None for g in tape.gradient(out, model.variables))
  for name, value in _moving_means(model).items():
    np.testing.assert_array_equal(value, before[name])
  np.testing.assert_allclose(out.numpy(), model(x, training=False).numpy(),
                             atol=1e-6)

  full = build(18, 0.25, cifar_stem=True, global_bn=False)
  assert count(full.trainable_variables) == tally(18, 0.25, cifar_stem=True)
  stem_only = build(18, 0.25, cifar_stem=True, fine_tune_after_block=0)
  assert not any(v.name.startswith('resnet/stem/')
                 for v in stem_only.trainable_variables)
  assert any(v.name.startswith('resnet/block_group1/')
             for v in stem_only.trainable_variables)


@pytest.mark.parametrize('k', [-2, 5, 1.5, True, None])
def test_bad_fine_tune_after_block(k):
  with pytest.raises(ValueError, match='fine_tune_after_block'):
    resnet.resnet(18, 1, fine_tune_after_block=k)


def test_variable_names_stable_and_readable():
  a = build(18, 0.25, cifar_stem=True)
  b = build(18, 0.25, cifar_stem=True)
  names = [v.name for v in a.variables]
  assert names == [v.name for v in b.variables]
  assert len(set(names)) == len(names)
  assert 'resnet/block_group3/block1/bn2/batch_normalization/gamma:0' in names
  for v in a.variables:
    is_bn = any(k in v.name for k in ('gamma', 'beta', 'moving'))
    assert ('batch_normalization' in v.name) == is_bn, v.name


# ------------------------------------------------------------- global BN


def _distributed_bn_stats(global_bn, weights, x):
  """Moving statistics, output and BN implementations of one training call
  on 2 replicas, each given half of `x`."""
  strategy = two_replica_strategy()
  per_replica = x.shape[0] // 2
  with strategy.scope():
    model = build(18, 0.25, cifar_stem=True, global_bn=global_bn)
    model.set_weights(weights)

  def step(inputs):
    return model(inputs, training=True)

  inputs = strategy.experimental_distribute_values_from_function(
      lambda ctx: x[ctx.replica_id_in_sync_group * per_replica:
                    (ctx.replica_id_in_sync_group + 1) * per_replica])
  out = strategy.run(step, args=(inputs,))
  out = tf.concat(strategy.experimental_local_results(out), 0).numpy()
  stats = {v.name: tf.convert_to_tensor(v).numpy()
           for v in model.non_trainable_variables}
  return stats, out, _implementations(model)


def test_global_bn_matches_single_replica_on_global_batch():
  # Replicas see differently distributed images, so local and global
  # statistics differ clearly.
  rng = np.random.default_rng(1)
  x = rng.uniform(size=[4, 32, 32, 3]).astype(np.float32)
  x[2:] = x[2:] * 3.0 + 1.0
  x = tf.constant(x)

  # One replica: nothing to synchronise, so the fused kernel.
  reference = build(18, 0.25, cifar_stem=True, global_bn=True)
  weights = reference.get_weights()
  ref_out = reference(x, training=True).numpy()
  assert _implementations(reference) == {'fused'}
  ref_stats = {v.name: v.numpy() for v in reference.non_trainable_variables}
  assert any(np.any(v != 0) for k, v in ref_stats.items() if 'mean' in k)

  stats, out, implementations = _distributed_bn_stats(True, weights, x)
  assert implementations == {'synchronized'}
  assert stats.keys() == ref_stats.keys()
  for name, value in ref_stats.items():
    np.testing.assert_allclose(stats[name], value, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(out, ref_out, atol=1e-4)

  # Control: per-replica BN does not reproduce the global statistics.
  local_stats, _, implementations = _distributed_bn_stats(False, weights, x)
  assert implementations == {'fused'}
  worst = max(np.max(np.abs(local_stats[n] - ref_stats[n]))
              for n in ref_stats if 'variance' in n)
  assert worst > 1e-2


# ------------------------------------------------------- fused batch norm
#
# Where nothing is synchronised, BatchNormRelu runs FusedBatchNormV3 on the
# variables of the non-fused layer; fused_bn=False is the non-fused layer.


def _implementations(model):
  return {l.implementation for l in bn_layers(model)}


def _set_bn_weights(model, rng):
  """γ, β and moving statistics away from their initial 1, 0, 0, 1."""
  for layer in bn_layers(model):
    channels = layer.moving_mean.shape
    layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
    layer.beta.assign(rng.normal(0, 0.1, channels))
    layer.moving_mean.assign(rng.normal(0, 0.5, channels))
    layer.moving_variance.assign(rng.uniform(0.5, 2, channels))


def _output_and_gradients(model, x, training, variables):
  """[output, d loss/d x, d loss/d variables...] as numpy, for a loss that
  weights the output by a fixed pattern (the plain sum of a training-mode BN
  output has zero gradient)."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = model(x, training=training)
    pattern = tf.sin(tf.reshape(tf.range(tf.size(y), dtype=y.dtype),
                                y.shape))
    loss = tf.reduce_sum(y * pattern)
  return [t.numpy() for t in [y] + tape.gradient(loss, [x] + variables)]


def _assert_close(actual, expected, tolerance, what):
  """max |actual − expected| <= tolerance · max |expected|, per array."""
  for i, (a, e) in enumerate(zip(actual, expected)):
    scale = max(float(np.max(np.abs(e))), 1e-6)
    error = float(np.max(np.abs(a - e)))
    assert error <= tolerance * scale, (what, i, error, scale)


@pytest.mark.parametrize('global_bn', [True, False])
def test_fused_batch_norm_relu_matches_non_fused(global_bn):
  rng = np.random.default_rng(3)
  shape = [4, 3, 3, 6]
  layers = [resnet.BatchNormRelu(batch_norm_decay=0.8, global_bn=global_bn,
                                 fused_bn=fused) for fused in (True, False)]
  for layer in layers:
    layer(tf.zeros(shape), training=False)
  weights = [rng.uniform(0.5, 1.5, 6), rng.normal(size=6),
             rng.normal(size=6), rng.uniform(0.5, 2, 6)]
  for layer in layers:
    layer.set_weights(weights)
  for _ in range(3):  # moving statistics after three updates
    x = tf.constant(rng.normal(1, 2, shape), tf.float32)
    for training in (True, False):
      fused, plain = [
          _output_and_gradients(l, x, training, [l.bn.gamma, l.bn.beta])
          for l in layers]
      _assert_close(fused, plain, 1e-5, f'training={training}')
  assert layers[0].bn.implementation == 'fused'
  assert type(layers[1].bn) is tf_keras.layers.BatchNormalization
  _assert_close(layers[0].get_weights(), layers[1].get_weights(), 1e-6,
                'moving statistics')


def test_fused_moving_variance_is_the_biased_batch_variance():
  # n = 2·2·1 = 4 values per channel: Keras's own fused layer would move
  # towards the unbiased variance, 4/3 of the biased one.
  x = tf.constant(np.random.default_rng(4).normal(size=[2, 2, 1, 3]),
                  tf.float32)
  layer = resnet.BatchNormRelu(global_bn=False, batch_norm_decay=0.5)
  keras_fused = tf_keras.layers.BatchNormalization(momentum=0.5, fused=True)
  layer(x, training=True)
  keras_fused(x, training=True)
  biased = x.numpy().var((0, 1, 2))
  np.testing.assert_allclose(layer.bn.moving_variance.numpy(),
                             0.5 + 0.5 * biased, rtol=1e-6)
  np.testing.assert_allclose(keras_fused.moving_variance.numpy(),
                             0.5 + 0.5 * biased * 4 / 3, rtol=1e-6)


@pytest.mark.parametrize('global_bn', [True, False])
def test_fused_resnet_matches_non_fused(global_bn, monkeypatch, tmp_path):
  rng = np.random.default_rng(5)
  fused = build(18, 0.125, cifar_stem=True, global_bn=global_bn)
  plain = build(18, 0.125, cifar_stem=True, global_bn=global_bn,
                fused_bn=False)
  # One set of variables whichever path: same names, and a checkpoint of
  # one restores into the other.
  assert [v.name for v in fused.variables] == [v.name for v in plain.variables]
  _set_bn_weights(fused, rng)
  path = tf.train.Checkpoint(model=fused).write(str(tmp_path / 'ckpt'))
  tf.train.Checkpoint(model=plain).read(path).assert_consumed()
  for a, b in zip(fused.variables, plain.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())

  batches = [tf.constant(rng.uniform(size=[8, 32, 32, 3]), tf.float32)
             for _ in range(3)]
  for x in batches:
    _assert_close([fused(x, training=True).numpy()],
                  [plain(x, training=True).numpy()], 1e-4, 'train output')
  assert _implementations(fused) == {'fused'}
  _assert_close([v.numpy() for v in fused.non_trainable_variables],
                [v.numpy() for v in plain.non_trainable_variables], 1e-4,
                'moving statistics')
  _assert_close([fused(batches[0], training=False).numpy()],
                [plain(batches[0], training=False).numpy()], 1e-5,
                'inference output')

  # Gradients with a smooth activation: a pre-ReLU value within rounding of
  # 0 (some in ~500k per step here) flips its ReLU in one of any two float
  # implementations, even two non-fused ones, and changes single gradient
  # entries by percents.
  monkeypatch.setattr(tf.nn, 'relu', tf.nn.softplus)
  for training in (True, False):
    grads = [_output_and_gradients(m, batches[1], training,
                                   m.trainable_variables)
             for m in (fused, plain)]
    _assert_close(*grads, 1e-4, f'gradients, training={training}')


def test_fused_path_choice(two_replicas):
  x = tf.random.normal([4, 2, 2, 3], seed=6)
  layer = resnet.BatchNormRelu()
  layer(x, training=True)
  assert layer.bn.implementation == 'fused'
  head = resnet.BatchNormRelu(relu=False)  # 2-D, as in the projection head
  head(tf.random.normal([4, 3], seed=7), training=True)
  assert head.bn.implementation == 'non_fused'
  previous = tf_keras.mixed_precision.global_policy()
  for policy, expected in (('float64', 'non_fused'),  # no float64 kernel
                           ('mixed_float16', 'fused')):
    tf_keras.mixed_precision.set_global_policy(policy)
    try:
      layer = resnet.BatchNormRelu()
      layer(x, training=True)
    finally:
      tf_keras.mixed_precision.set_global_policy(previous)
    assert layer.bn.implementation == expected, policy

  with two_replicas.scope():
    synced = resnet.BatchNormRelu(global_bn=True)
    local = resnet.BatchNormRelu(global_bn=False)
    for l in (synced, local):
      l(x, training=False)

  def implementation(l, inputs, training):
    two_replicas.run(lambda: l(inputs, training=training))
    return l.bn.implementation

  assert implementation(synced, x, True) == 'synchronized'
  assert implementation(synced, x, False) == 'fused'  # moving statistics
  assert implementation(local, x, True) == 'fused'
  # An empty (partial) batch leaves the moving statistics alone.
  before = [tf.convert_to_tensor(v).numpy() for v in local.bn.weights]
  implementation(local, tf.zeros([0, 2, 2, 3]), True)
  for value, old in zip(local.bn.weights, before):
    np.testing.assert_array_equal(tf.convert_to_tensor(value).numpy(), old)
