"""ResNet v1.5 backbones for contrastive learning (SimCLR v1/v2 architecture).

Post-activation ResNets (He et al., 2016) with the stride on the 3x3 conv of
the bottleneck ("v1.5"), width multiplier, Selective Kernels (SimCLRv2), Squeeze
and Excitation, a CIFAR stem, and partial freezing for fine-tuning.  Every
option is a constructor argument; nothing reads flags.

Variable names are stable and readable because every sub-layer has an explicit
name, e.g. ``resnet/block_group2/block0/bn3/batch_normalization/gamma:0``.
Batch-norm variables always contain ``batch_normalization`` and biases contain
``bias``, which is what weight-decay exclusion rules match on.
"""

import functools

import tensorflow as tf
import tf_keras

BATCH_NORM_EPSILON = 1e-5
STEM_NAME = 'stem'  # its key in `Resnet.feature_maps`
SUPPORTED_DEPTHS = (18, 34, 50, 101, 152, 200)

# depth -> (block type, number of blocks in each of the four groups)
_ARCHITECTURES = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}


def _kernel_initializer():
  return tf_keras.initializers.VarianceScaling()


def scaled_filters(filters, width_multiplier):
  """Channel count ``max(1, round(filters * width_multiplier))``.

  Integer multipliers give exactly ``filters * width_multiplier``; fractional
  ones (e.g. 0.25 for tiny test models) are rounded.
  """
  return max(1, int(round(filters * width_multiplier)))


def _check_depth(resnet_depth):
  if resnet_depth not in _ARCHITECTURES:
    raise ValueError(
        f'Unsupported resnet_depth {resnet_depth!r}; supported depths are '
        f'{", ".join(str(d) for d in SUPPORTED_DEPTHS)}.')


def num_features(resnet_depth, width_multiplier):
  """Width C of the pooled features: 512·w (depths 18/34) or 2048·w (50+)."""
  _check_depth(resnet_depth)
  block_type, _ = _ARCHITECTURES[resnet_depth]
  expansion = 4 if block_type == 'bottleneck' else 1
  return expansion * scaled_filters(512, width_multiplier)


def _replicas_in_sync():
  """How many replicas a synchronised BN would all-reduce over at this call.

  1 under the default strategy and in a cross-replica context, where the
  synchronised layer computes local statistics too.
  """
  context = tf.distribute.get_replica_context()
  return 1 if context is None else context.num_replicas_in_sync


class _BatchNormalization(tf_keras.layers.BatchNormalization):
  """The non-fused (optionally synchronised) Keras layer, which takes the
  fused kernel when there is nothing to synchronise.

  Built with ``fused=False``, so its variables, names and checkpoint are those
  of the plain layer whichever computation a call takes.  Each call (trace)
  chooses, and records it in ``implementation``:

  * ``'synchronized'``: ``synchronized``, training (batch statistics) and
    more than one replica in sync: the Keras cross-replica statistics;
  * ``'fused'``: otherwise, for 4-D NHWC float inputs and a Python-bool
    ``training``: ``FusedBatchNormV3`` (a ResNet-18 step ~1.1x faster on
    CPU, benchmarks/fused_bn.py);
  * ``'non_fused'``: otherwise (e.g. the 2-D BNs of the projection head).

  The fused kernel normalises with the biased batch variance, like the
  non-fused layer, but returns the unbiased one (·n/(n−1), n = N·H·W);
  Keras's own fused layer feeds that into the moving variance.  Here the
  moving variance is updated with the biased one, so both paths give the
  same numbers up to float rounding.
  """

  implementation = None

  def call(self, inputs, training=None, mask=None):
    training = self._get_training_value(training)
    if (self.synchronized and training is not False and
        _replicas_in_sync() > 1):
      self.implementation = 'synchronized'
    elif (mask is None and isinstance(training, bool) and
          inputs.shape.rank == 4 and self.axis == [3] and
          self.compute_dtype in ('float16', 'bfloat16', 'float32')):
      self.implementation = 'fused'
      return self._fused_call(tf.cast(inputs, self.compute_dtype), training)
    else:
      self.implementation = 'non_fused'
    return super().call(inputs, training=training, mask=mask)

  def _fused_call(self, inputs, training):
    ones = tf.ones(self.moving_mean.shape, self.moving_mean.dtype)
    gamma = self.gamma if self.scale else ones
    beta = self.beta if self.center else tf.zeros_like(ones)
    if not training:
      outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
          inputs, gamma, beta, mean=self.moving_mean,
          variance=self.moving_variance, epsilon=self.epsilon,
          is_training=False)
      return outputs
    outputs, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
        inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
    shape = tf.shape(inputs, out_type=tf.int64)
    count = shape[0] * shape[1] * shape[2]
    variance = unbiased * tf.cast((count - 1) / count, unbiased.dtype)
    # As the non-fused layer: no update from an empty (partial) batch.
    batch_size = shape[0] if self._support_zero_size_input() else None
    for moving, value in ((self.moving_mean, mean),
                          (self.moving_variance, variance)):
      self.add_update(functools.partial(
          self._assign_moving_average, moving, value, self.momentum,
          batch_size))
    return outputs


class BatchNormRelu(tf_keras.layers.Layer):
  """Batch norm (momentum ``batch_norm_decay``, epsilon 1e-5), then ReLU.

  With ``global_bn`` the batch statistics are all-reduced over the replicas
  of the current ``tf.distribute`` strategy (synchronized BN), so they are the
  statistics of the global batch.  ``init_zero`` initialises γ to 0 (used for
  the last BN of every residual block).

  ``fused_bn`` (default): where nothing is synchronised (``global_bn=False``,
  one replica, or inference) 4-D inputs take the fused kernel, with the same
  variables and, up to rounding, the same numbers (see
  ``_BatchNormalization``); ``fused_bn=False`` always runs the non-fused
  layer, as the original code does.
  """

  def __init__(self,
               relu=True,
               init_zero=False,
               center=True,
               scale=True,
               batch_norm_decay=0.9,
               global_bn=True,
               fused_bn=True,
               **kwargs):
    super().__init__(**kwargs)
    self.relu = relu
    layer = (_BatchNormalization if fused_bn
             else tf_keras.layers.BatchNormalization)
    self.bn = layer(
        axis=-1,
        momentum=batch_norm_decay,
        epsilon=BATCH_NORM_EPSILON,
        center=center,
        scale=scale,
        gamma_initializer='zeros' if init_zero else 'ones',
        # Built non-fused in any case: one set of variables for every path.
        fused=False,
        synchronized=global_bn,
        name='batch_normalization')

  def call(self, inputs, training=None):
    inputs = self.bn(inputs, training=training)
    if self.relu:
      inputs = tf.nn.relu(inputs)
    return inputs


class FixedPadding(tf_keras.layers.Layer):
  """Pads H and W by ``k - 1`` in total (floor half before), independent of size."""

  def __init__(self, kernel_size, **kwargs):
    super().__init__(**kwargs)
    self.kernel_size = kernel_size

  def call(self, inputs, training=None):
    del training
    pad_total = self.kernel_size - 1
    pad_beg = pad_total // 2
    pad_end = pad_total - pad_beg
    return tf.pad(inputs,
                  [[0, 0], [pad_beg, pad_end], [pad_beg, pad_end], [0, 0]])


class Conv2dFixedPadding(tf_keras.layers.Layer):
  """Bias-free conv; explicit fixed padding + VALID when strided, else SAME.

  Explicit padding makes strided convs independent of the input size parity
  (TF's SAME padding would pad asymmetrically depending on the size).
  """

  def __init__(self, filters, kernel_size, strides, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.kernel_size = kernel_size
    self.strides = strides
    self.fixed_padding = (
        FixedPadding(kernel_size, name='fixed_padding') if strides > 1
        else None)
    self.conv2d = tf_keras.layers.Conv2D(
        filters=filters,
        kernel_size=kernel_size,
        strides=strides,
        padding='valid' if strides > 1 else 'same',
        use_bias=False,
        kernel_initializer=_kernel_initializer(),
        name='conv2d')

  def call(self, inputs, training=None):
    if self.fixed_padding is not None:
      inputs = self.fixed_padding(inputs)
    return self.conv2d(inputs)


class SK_Conv2D(tf_keras.layers.Layer):  # pylint: disable=invalid-name
  """Selective-kernel 3x3 conv (Li et al., 2019) as used by SimCLRv2.

  Two 3x3 branches (computed as one conv with 2·filters outputs, then split),
  each BN+ReLU'd; attention a = softmax over branches of
  W1·ReLU(BN(W0·GAP(b1 + b2))), with W0 of width max(int(filters·sk_ratio),
  min_dim); output Σ_i a_i ⊙ b_i.
  """

  def __init__(self, filters, strides, sk_ratio, min_dim=32,
               batch_norm_decay=0.9, global_bn=True, fused_bn=True,
               **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    mid_dim = max(int(filters * sk_ratio), min_dim)
    bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn,
                   fused_bn=fused_bn)
    self.conv = Conv2dFixedPadding(2 * filters, 3, strides, name='conv')
    self.bn = BatchNormRelu(name='bn', **bn_args)
    self.attention_conv0 = tf_keras.layers.Conv2D(
        mid_dim, 1, use_bias=False, kernel_initializer=_kernel_initializer(),
        name='attention_conv0')
    self.attention_bn = BatchNormRelu(name='attention_bn', **bn_args)
    self.attention_conv1 = tf_keras.layers.Conv2D(
        2 * filters, 1, use_bias=False,
        kernel_initializer=_kernel_initializer(), name='attention_conv1')

  def call(self, inputs, training=None):
    branches = self.bn(self.conv(inputs), training=training)
    branches = tf.stack(tf.split(branches, 2, axis=-1))  # [2, N, H, W, f]
    pooled = tf.reduce_mean(tf.reduce_sum(branches, axis=0), [1, 2],
                            keepdims=True)
    hidden = self.attention_bn(self.attention_conv0(pooled), training=training)
    logits = tf.stack(tf.split(self.attention_conv1(hidden), 2, axis=-1))
    attention = tf.nn.softmax(logits, axis=0)
    return tf.reduce_sum(branches * attention, axis=0)


class SE_Layer(tf_keras.layers.Layer):  # pylint: disable=invalid-name
  """Squeeze-and-excitation (Hu et al., 2018): x ⊙ σ(W2·ReLU(W1·GAP(x) + b1) + b2).

  W1 squeezes to max(1, int(filters·se_ratio)) channels (``filters`` is the
  block's base width), W2 expands back to the channels of the input.
  """

  def __init__(self, filters, se_ratio, **kwargs):
    super().__init__(**kwargs)
    self.squeeze_dim = max(1, int(filters * se_ratio))
    self.se_reduce = tf_keras.layers.Conv2D(
        self.squeeze_dim, 1, use_bias=True,
        kernel_initializer=_kernel_initializer(), name='se_reduce')
    self.se_expand = None

  def build(self, input_shape):
    self.se_expand = tf_keras.layers.Conv2D(
        int(input_shape[-1]), 1, use_bias=True,
        kernel_initializer=_kernel_initializer(), name='se_expand',
        dtype=self.dtype_policy)
    super().build(input_shape)

  def call(self, inputs, training=None):
    del training
    squeezed = tf.reduce_mean(inputs, [1, 2], keepdims=True)
    excitation = self.se_expand(tf.nn.relu(self.se_reduce(squeezed)))
    return tf.sigmoid(excitation) * inputs


def _projection_layers(filters_out, strides, resnet_d, bn_args):
  """Shortcut projection: 1x1/s conv + BN, or (ResNet-D) avg-pool/s + 1x1/1 conv + BN."""
  layers = []
  if resnet_d:
    if strides > 1:
      layers.append(FixedPadding(2, name='projection_padding'))
    layers.append(tf_keras.layers.AveragePooling2D(
        pool_size=2, strides=strides,
        padding='valid' if strides > 1 else 'same', name='projection_pool'))
    layers.append(Conv2dFixedPadding(filters_out, 1, 1,
                                     name='projection_conv'))
  else:
    layers.append(Conv2dFixedPadding(filters_out, 1, strides,
                                     name='projection_conv'))
  layers.append(BatchNormRelu(relu=False, name='projection_bn', **bn_args))
  return layers


class _Block(tf_keras.layers.Layer):
  """relu(residual_layers(x) + shortcut_layers(x)); subclasses build the lists.

  (No class-level defaults for the lists: Keras would then not track the
  layers assigned in the subclasses.)
  """

  def call(self, inputs, training=None):
    shortcut = inputs
    for layer in self.shortcut_layers:
      shortcut = layer(shortcut, training=training)
    for layer in self.residual_layers:
      inputs = layer(inputs, training=training)
    return tf.nn.relu(inputs + shortcut)


class ResidualBlock(_Block):
  """Basic block (depths 18/34): 3x3/s conv-BN-ReLU, 3x3 conv-BN(γ=0), [SE], +shortcut, ReLU.

  With ``sk_ratio > 0`` only the shortcut changes (ResNet-D average-pool
  projection), as in SimCLRv2; SK convs are used in bottleneck blocks only.
  """

  def __init__(self, filters, strides, use_projection=False, sk_ratio=0.0,
               se_ratio=0.0, batch_norm_decay=0.9, global_bn=True,
               fused_bn=True, **kwargs):
    super().__init__(**kwargs)
    bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn,
                   fused_bn=fused_bn)
    self.shortcut_layers = (
        _projection_layers(filters, strides, sk_ratio > 0, bn_args)
        if use_projection else [])
    self.residual_layers = [
        Conv2dFixedPadding(filters, 3, strides, name='conv1'),
        BatchNormRelu(name='bn1', **bn_args),
        Conv2dFixedPadding(filters, 3, 1, name='conv2'),
        BatchNormRelu(relu=False, init_zero=True, name='bn2', **bn_args),
    ]
    if se_ratio > 0:
      self.residual_layers.append(SE_Layer(filters, se_ratio, name='se'))


class BottleneckBlock(_Block):
  """Bottleneck (depths 50+), v1.5: 1x1 conv-BN-ReLU, 3x3/s conv-BN-ReLU (or SK),
  1x1 conv to 4·filters-BN(γ=0), [SE], +shortcut, ReLU."""

  def __init__(self, filters, strides, use_projection=False, sk_ratio=0.0,
               se_ratio=0.0, batch_norm_decay=0.9, global_bn=True,
               fused_bn=True, **kwargs):
    super().__init__(**kwargs)
    bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn,
                   fused_bn=fused_bn)
    self.shortcut_layers = (
        _projection_layers(4 * filters, strides, sk_ratio > 0, bn_args)
        if use_projection else [])
    self.residual_layers = [
        Conv2dFixedPadding(filters, 1, 1, name='conv1'),
        BatchNormRelu(name='bn1', **bn_args),
    ]
    if sk_ratio > 0:
      self.residual_layers.append(
          SK_Conv2D(filters, strides, sk_ratio, name='sk_conv', **bn_args))
    else:
      self.residual_layers += [
          Conv2dFixedPadding(filters, 3, strides, name='conv2'),
          BatchNormRelu(name='bn2', **bn_args),
      ]
    self.residual_layers += [
        Conv2dFixedPadding(4 * filters, 1, 1, name='conv3'),
        BatchNormRelu(relu=False, init_zero=True, name='bn3', **bn_args),
    ]
    if se_ratio > 0:
      self.residual_layers.append(SE_Layer(filters, se_ratio, name='se'))


class BlockGroup(tf_keras.layers.Layer):
  """``blocks`` blocks; the first has the stride and a projection shortcut.

  As in SimCLR, the first block of every group projects its shortcut, even
  when the channel count and resolution would allow an identity shortcut.
  """

  def __init__(self, filters, block_fn, blocks, strides, **block_kwargs):
    name = block_kwargs.pop('name', None)
    trainable = block_kwargs.pop('trainable', True)
    super().__init__(name=name, trainable=trainable)
    self.blocks = [
        block_fn(filters, strides if i == 0 else 1, use_projection=(i == 0),
                 name=f'block{i}', **block_kwargs)
        for i in range(blocks)
    ]

  def call(self, inputs, training=None):
    for block in self.blocks:
      inputs = block(inputs, training=training)
    return inputs


class Stem(tf_keras.layers.Layer):
  """Input stem ("block 0").

  standard: 7x7/2 conv, BN-ReLU, 3x3/2 max-pool;
  ResNet-D (sk_ratio > 0): 3x3/2, 3x3, 3x3 convs (widths 32w, 32w, 64w) with
  BN-ReLU, then the max-pool;
  CIFAR: one 3x3/1 conv + BN-ReLU, no max-pool.
  """

  def __init__(self, width_multiplier, cifar_stem=False, resnet_d=False,
               batch_norm_decay=0.9, global_bn=True, fused_bn=True,
               **kwargs):
    super().__init__(**kwargs)
    bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn,
                   fused_bn=fused_bn)
    filters = scaled_filters(64, width_multiplier)
    self.stem_layers = []
    if cifar_stem:
      self.stem_layers += [
          Conv2dFixedPadding(filters, 3, 1, name='initial_conv'),
          BatchNormRelu(name='initial_bn', **bn_args),
      ]
      return
    if resnet_d:
      half = scaled_filters(32, width_multiplier)
      self.stem_layers += [
          Conv2dFixedPadding(half, 3, 2, name='stem_conv0'),
          BatchNormRelu(name='stem_bn0', **bn_args),
          Conv2dFixedPadding(half, 3, 1, name='stem_conv1'),
          BatchNormRelu(name='stem_bn1', **bn_args),
          Conv2dFixedPadding(filters, 3, 1, name='initial_conv'),
      ]
    else:
      self.stem_layers.append(
          Conv2dFixedPadding(filters, 7, 2, name='initial_conv'))
    self.stem_layers += [
        BatchNormRelu(name='initial_bn', **bn_args),
        tf_keras.layers.MaxPooling2D(pool_size=3, strides=2, padding='same',
                                     name='initial_max_pool'),
    ]

  def call(self, inputs, training=None, return_initial_conv=False):
    """The stem's output; with `return_initial_conv`, (output, output of the
    conv named initial_conv, before its BN), as the original exports."""
    initial_conv = None
    for layer in self.stem_layers:
      inputs = layer(inputs, training=training)
      if layer.name == 'initial_conv':
        initial_conv = inputs
    if return_initial_conv:
      return inputs, initial_conv
    return inputs


class Resnet(tf_keras.layers.Layer):
  """ResNet backbone: images [N, H, W, 3] -> globally average-pooled [N, C].

  Blocks are numbered 0 (stem) to 4 (``block_group4``).  With
  ``fine_tune_after_block = k`` blocks 0..k are frozen: their layers are
  ``trainable=False`` (so their variables are not in ``trainable_variables``),
  they always run in inference mode (BN uses and does not update its moving
  statistics), and their output goes through ``tf.stop_gradient``.  k = 4
  freezes the whole backbone (linear evaluation); k = -1 trains everything.
  """

  def __init__(self,
               block_fn,
               layers,
               width_multiplier,
               cifar_stem=False,
               sk_ratio=0.0,
               se_ratio=0.0,
               batch_norm_decay=0.9,
               global_bn=True,
               fused_bn=True,
               fine_tune_after_block=-1,
               **kwargs):
    super().__init__(**kwargs)
    if len(layers) != 4:
      raise ValueError(f'layers must list 4 block counts, got {layers!r}.')
    if not width_multiplier > 0:
      raise ValueError(
          f'width_multiplier must be > 0, got {width_multiplier!r}.')
    if sk_ratio < 0 or se_ratio < 0:
      raise ValueError(
          f'sk_ratio and se_ratio must be >= 0, got {sk_ratio!r}, '
          f'{se_ratio!r}.')
    if (isinstance(fine_tune_after_block, bool) or
        fine_tune_after_block not in (-1, 0, 1, 2, 3, 4)):
      raise ValueError(
          'fine_tune_after_block must be an integer in -1..4 (-1 trains all, '
          '0 freezes the stem, 4 freezes the whole backbone), got '
          f'{fine_tune_after_block!r}.')
    self.width_multiplier = width_multiplier
    self.fine_tune_after_block = int(fine_tune_after_block)
    bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn,
                   fused_bn=fused_bn)

    self.stem = Stem(width_multiplier, cifar_stem=cifar_stem,
                     resnet_d=sk_ratio > 0 and not cifar_stem,
                     name=STEM_NAME,
                     **bn_args)
    self.block_groups = [
        BlockGroup(
            scaled_filters(64 * 2**i, width_multiplier),
            block_fn,
            blocks=layers[i],
            strides=1 if i == 0 else 2,
            sk_ratio=sk_ratio,
            se_ratio=se_ratio,
            name=f'block_group{i + 1}',
            **bn_args) for i in range(4)
    ]
    for block in self._blocks()[:self.fine_tune_after_block + 1]:
      block.trainable = False

  def _blocks(self):
    return [self.stem] + self.block_groups

  def feature_maps(self, inputs, training=None):
    """Outputs of every block: {'initial_conv' (the stem's last conv, before
    its BN), 'stem', 'block_group1', ..., 'block_group4'}."""
    outputs = {}
    for index, block in enumerate(self._blocks()):
      frozen = index <= self.fine_tune_after_block
      block_training = False if frozen else training
      if block is self.stem:
        inputs, initial_conv = block(inputs, training=block_training,
                                     return_initial_conv=True)
        outputs['initial_conv'] = (tf.stop_gradient(initial_conv) if frozen
                                   else initial_conv)
      else:
        inputs = block(inputs, training=block_training)
      if frozen:
        inputs = tf.stop_gradient(inputs)
      outputs[block.name] = inputs
    return outputs

  def call(self, inputs, training=None, return_feature_maps=False):
    """Pooled features [N, C]; with `return_feature_maps`, the
    `feature_maps` dict plus them as 'final_avg_pool'."""
    maps = self.feature_maps(inputs, training=training)
    features = tf.reduce_mean(maps['block_group4'], [1, 2],
                              name='final_avg_pool')
    if return_feature_maps:
      return dict(maps, final_avg_pool=features)
    return features


def resnet(resnet_depth,
           width_multiplier,
           cifar_stem=False,
           sk_ratio=0.0,
           se_ratio=0.0,
           batch_norm_decay=0.9,
           global_bn=True,
           fused_bn=True,
           fine_tune_after_block=-1,
           name='resnet'):
  """Builds a ``Resnet`` of depth 18, 34, 50, 101, 152 or 200."""
  _check_depth(resnet_depth)
  block_type, layers = _ARCHITECTURES[resnet_depth]
  block_fn = BottleneckBlock if block_type == 'bottleneck' else ResidualBlock
  return Resnet(
      block_fn,
      layers,
      width_multiplier,
      cifar_stem=cifar_stem,
      sk_ratio=sk_ratio,
      se_ratio=se_ratio,
      batch_norm_decay=batch_norm_decay,
      global_bn=global_bn,
      fused_bn=fused_bn,
      fine_tune_after_block=fine_tune_after_block,
      name=name)
