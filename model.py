"""The model: ResNet + projection head + supervised head (SPEC §3).

`Model(images)` takes a batch whose V views are concatenated along the
channel axis ([b, H, W, 3·V], as the input pipeline yields it), stacks the
views along the batch axis (view-major: row v·b + k is view v of image k),
and returns `(projection_head_outputs, supervised_head_outputs)` as the
original SimCLR TF2 model does.

Variables live under three checkpoint prefixes, the names that
`--variable_schema` regexes match (see checkpoints.py): `base_model/` (the
ResNet), `head_contrastive/` (projection head) and `head_supervised/`
(linear head).
"""

import collections
import contextlib
import types

import tensorflow as tf
import tf_keras

import lars_optimizer
import resnet

# The original SimCLR TF2 module defined these here; keep them reachable.
WarmUpAndCosineDecay = lars_optimizer.WarmUpAndCosineDecay
build_optimizer = lars_optimizer.build_optimizer
get_train_steps = lars_optimizer.get_train_steps

BASE_MODEL_NAME = 'base_model'
PROJECTION_HEAD_NAME = 'head_contrastive'
SUPERVISED_HEAD_NAME = 'head_supervised'
# Our export's serving_default outputs: their `Model.simclr_outputs` names.
SERVING_OUTPUTS = {'features': 'final_avg_pool',
                   'projection': 'proj_head_output',
                   'logits': 'logits_sup'}


# --precision → the Keras dtype policy the layers are built under. The
# mixed policies keep variables (and so BN statistics, the optimizer and
# weight decay) in float32 and compute convolutions and dense layers in the
# 16-bit type; Keras BN normalises 16-bit inputs in float32.
PRECISION_POLICIES = {'float32': 'float32', 'bfloat16': 'mixed_bfloat16',
                      'float16': 'mixed_float16', 'float64': 'float64'}


@contextlib.contextmanager
def precision_policy(precision):
  """Layers constructed inside use the dtype policy of `precision` (a key of
  PRECISION_POLICIES); the global policy is put back afterwards."""
  if precision not in PRECISION_POLICIES:
    raise ValueError(f'Unknown precision {precision!r}; use one of '
                     f'{", ".join(PRECISION_POLICIES)}.')
  previous = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy(PRECISION_POLICIES[precision])
  try:
    yield
  finally:
    tf_keras.mixed_precision.set_global_policy(previous)


def _escape(name):
  """Escapes a child name the way TF checkpoint keys do."""
  return name.replace('.', '..').replace('/', '.S')


def variable_paths(root):
  """{checkpoint path below `root`: variable} for every variable of `root`.

  Breadth-first over the object graph, first path wins, as TF names
  checkpoint keys.
  """
  view = tf.train.TrackableView(root)
  paths = {}
  seen = {id(root)}
  queue = collections.deque([(root, '')])
  while queue:
    obj, path = queue.popleft()
    for name, child in view.children(obj).items():
      if id(child) in seen:
        continue
      seen.add(id(child))
      child_path = f'{path}/{_escape(name)}' if path else _escape(name)
      if isinstance(child, tf.Variable):
        paths[child_path] = child
      else:
        queue.append((child, child_path))
  return paths


class LinearLayer(tf_keras.layers.Layer):
  """Dense layer with optional BN (BN replaces the bias: β is the bias).

  `num_classes` may be a callable of the input shape (the projection head's
  middle layers take the width of their input).
  """

  def __init__(self, num_classes, use_bias=True, use_bn=False,
               batch_norm_decay=0.9, global_bn=True, name='linear_layer',
               **kwargs):
    super().__init__(name=name, **kwargs)
    self.num_classes = num_classes
    self.use_bias = use_bias
    self.use_bn = use_bn
    if use_bn:
      self.bn_relu = resnet.BatchNormRelu(
          relu=False, center=use_bias, batch_norm_decay=batch_norm_decay,
          global_bn=global_bn)

  def build(self, input_shape):
    num_classes = self.num_classes
    if callable(num_classes):
      num_classes = num_classes(input_shape)
    self.dense = tf_keras.layers.Dense(
        num_classes,
        kernel_initializer=tf_keras.initializers.RandomNormal(stddev=0.01),
        use_bias=self.use_bias and not self.use_bn, dtype=self.dtype_policy)
    super().build(input_shape)

  def call(self, inputs, training):
    outputs = self.dense(inputs)
    if self.use_bn:
      outputs = self.bn_relu(outputs, training=training)
    return outputs


class ProjectionHead(tf_keras.layers.Layer):
  """Projection head of SPEC §3.

  nonlinear: num_proj_layers layers; the middle ones Dense(no bias) + BN +
  ReLU at the input width, the last Dense(proj_out_dim, no bias) + BN
  without β (with num_proj_layers = 0 there are none, so the head is the
  identity, as in the original). linear: only that last layer. none:
  identity.

  `call` returns (output of the last layer, output of layer
  `ft_proj_selector`), where 0 is the head's input (the ResNet features).
  In finetune mode only the layers up to `ft_proj_selector` are built, since
  nothing else is used.
  """

  def __init__(self, proj_head_mode='nonlinear', proj_out_dim=128,
               num_proj_layers=3, ft_proj_selector=0, train_mode='pretrain',
               batch_norm_decay=0.9, global_bn=True,
               name=PROJECTION_HEAD_NAME, **kwargs):
    super().__init__(name=name, **kwargs)
    self.proj_head_mode = proj_head_mode
    self.ft_proj_selector = ft_proj_selector
    bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
    if proj_head_mode == 'none':
      num_layers = 0
    elif proj_head_mode == 'linear':
      num_layers = 1
    elif proj_head_mode == 'nonlinear':
      num_layers = num_proj_layers
    else:
      raise ValueError(f'Unknown proj_head_mode {proj_head_mode!r}; use '
                       'none, linear or nonlinear.')
    if train_mode == 'finetune' and ft_proj_selector >= 0:
      num_layers = min(num_layers, ft_proj_selector)
    self.linear_layers = []
    for j in range(num_layers):
      is_last = (j == num_proj_layers - 1 or proj_head_mode == 'linear')
      if is_last:
        layer = LinearLayer(proj_out_dim, use_bias=False, use_bn=True,
                            name=f'nl_{j}', **bn_args)
      else:
        layer = LinearLayer(lambda shape: int(shape[-1]), use_bias=True,
                            use_bn=True, name=f'nl_{j}', **bn_args)
      self.linear_layers.append(layer)
    self._relu_after = [
        proj_head_mode == 'nonlinear' and j != num_proj_layers - 1
        for j in range(num_layers)]

  def call(self, inputs, training):
    hiddens = [inputs]
    for layer, relu in zip(self.linear_layers, self._relu_after):
      outputs = layer(hiddens[-1], training=training)
      if relu:
        outputs = tf.nn.relu(outputs)
      hiddens.append(outputs)
    return hiddens[-1], hiddens[self.ft_proj_selector]


class SupervisedHead(tf_keras.layers.Layer):
  """Linear classifier: Dense(num_classes) with bias, init N(0, 0.01²).

  `batch_norm` (--linear_head_batch_norm): the features are first
  standardised by a BN without γ and β (batch statistics in training,
  moving averages in inference; `batch_norm_decay`, `global_bn`), as
  evaluate.py's logistic regression standardises them: ResNet features are
  post-ReLU, with per-dimension means larger than their spread and a scale
  that grows during pretraining, which a plain linear head fits badly.
  """

  def __init__(self, num_classes, batch_norm=False, batch_norm_decay=0.9,
               global_bn=True, name=SUPERVISED_HEAD_NAME, **kwargs):
    super().__init__(name=name, **kwargs)
    self.batch_norm = None
    if batch_norm:
      self.batch_norm = resnet.BatchNormRelu(
          relu=False, center=False, scale=False,
          batch_norm_decay=batch_norm_decay, global_bn=global_bn,
          name='feature_norm')
    self.linear_layer = LinearLayer(num_classes, use_bias=True, use_bn=False)

  def call(self, inputs, training):
    if self.batch_norm is not None:
      inputs = self.batch_norm(inputs, training=training)
    return self.linear_layer(inputs, training=training)


def stack_views(inputs):
  """[b, H, W, 3V] images (V views side by side in channels) → [V·b, H, W, 3],
  view-major: row v·b + k is view v of image k."""
  num_views = inputs.shape[-1] // 3
  if num_views * 3 != inputs.shape[-1]:
    raise ValueError(f'Expected 3·V channels, got {inputs.shape[-1]}.')
  return tf.concat(tf.split(inputs, num_views, axis=-1), axis=0)


def build_encoder(resnet_depth=50, width_multiplier=1, cifar_stem=False,
                  sk_ratio=0.0, se_ratio=0.0, proj_head_mode='nonlinear',
                  proj_out_dim=128, num_proj_layers=3, ft_proj_selector=0,
                  train_mode='pretrain', fine_tune_after_block=-1,
                  batch_norm_decay=0.9, global_bn=True, precision='float32'):
  """(ResNet, projection head) named `base_model` and `head_contrastive`:
  the encoder that `Model` and its `MomentumEncoder` twin share, its layers
  under the dtype policy of `precision`."""
  bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
  with precision_policy(precision):
    base_model = resnet.resnet(
        resnet_depth=resnet_depth, width_multiplier=width_multiplier,
        cifar_stem=cifar_stem, sk_ratio=sk_ratio, se_ratio=se_ratio,
        fine_tune_after_block=fine_tune_after_block, name=BASE_MODEL_NAME,
        **bn_args)
    head = ProjectionHead(
        proj_head_mode=proj_head_mode, proj_out_dim=proj_out_dim,
        num_proj_layers=num_proj_layers, ft_proj_selector=ft_proj_selector,
        train_mode=train_mode, **bn_args)
  return base_model, head


class Model(tf_keras.models.Model):
  """ResNet + projection head + supervised head.

  Returns (projection_head_outputs, supervised_head_outputs):
    pretrain: (projections [V·b, d], logits on stop_gradient(features) of
      every view, or None when lineareval_while_pretraining is off or
      head_on_views is False);
    finetune: (None, logits on the features selected by ft_proj_selector).

  The sub-layers are the attributes `base_model`, `head_contrastive` and
  `head_supervised`, which are also the first component of every variable's
  checkpoint path (what `--variable_schema` matches). The original's names
  `resnet_model` and `supervised_head` are kept as aliases.

  `precision` (model.PRECISION_POLICIES): the layers' compute dtype; the
  outputs are cast to the variable dtype (float32, or float64), so losses,
  logits and softmax never run in 16 bits.
  """

  def __init__(self, num_classes, resnet_depth=50, width_multiplier=1,
               cifar_stem=False, sk_ratio=0.0, se_ratio=0.0,
               proj_head_mode='nonlinear', proj_out_dim=128,
               num_proj_layers=3, ft_proj_selector=0, train_mode='pretrain',
               lineareval_while_pretraining=True, fine_tune_after_block=-1,
               batch_norm_decay=0.9, global_bn=True, precision='float32',
               linear_head_batch_norm=False, **kwargs):
    with precision_policy(precision):
      super().__init__(**kwargs)
    if train_mode not in ('pretrain', 'finetune'):
      raise ValueError(f'Unknown train_mode {train_mode!r}; use pretrain or '
                       'finetune.')
    if linear_head_batch_norm and train_mode != 'pretrain':
      raise ValueError('linear_head_batch_norm standardises the features of '
                       'the linear head trained while pretraining; '
                       f'train_mode={train_mode} has none.')
    self.train_mode = train_mode
    # What MomentumEncoder needs to build a twin (read-only: not tracked).
    self._encoder_config = types.MappingProxyType(dict(
        resnet_depth=resnet_depth, width_multiplier=width_multiplier,
        cifar_stem=cifar_stem, sk_ratio=sk_ratio, se_ratio=se_ratio,
        proj_head_mode=proj_head_mode, proj_out_dim=proj_out_dim,
        num_proj_layers=num_proj_layers, batch_norm_decay=batch_norm_decay,
        global_bn=global_bn, precision=precision))
    self.base_model, self.head_contrastive = build_encoder(
        fine_tune_after_block=fine_tune_after_block,
        ft_proj_selector=ft_proj_selector, train_mode=train_mode,
        **self._encoder_config)
    if train_mode == 'finetune' or lineareval_while_pretraining:
      with precision_policy(precision):
        self.head_supervised = SupervisedHead(
            num_classes, batch_norm=linear_head_batch_norm,
            batch_norm_decay=batch_norm_decay, global_bn=global_bn)
    else:
      self.head_supervised = None

  @property
  def resnet_model(self):
    return self.base_model

  def make_momentum_encoder(self, name='momentum_encoder'):
    """A `MomentumEncoder` twin of this model's ResNet + projection head.

    Build it inside the strategy scope; its variables exist after the first
    call, and `copy_from(self)` makes it equal to this model.
    """
    return MomentumEncoder(name=name, **self._encoder_config)

  @property
  def supervised_head(self):
    return self.head_supervised

  def simclr_outputs(self, images, training=False):
    """The named outputs of the original SimCLR TF2 export for a
    single-view batch [b, H, W, 3]:

    initial_conv (the stem's last conv, before its BN), initial_max_pool
    (the stem's output: after the max-pool, or after BN-ReLU for the CIFAR
    stem), block_group1..4, final_avg_pool (= proj_head_input, the ResNet
    features), proj_head_output (the last built projection layer) and,
    when the supervised head exists, logits_sup (on the features it is
    trained on).
    """
    maps = self.base_model(images, training=training,
                           return_feature_maps=True)
    features = maps['final_avg_pool']
    projections, selected = self.head_contrastive(features, training=training)
    outputs = {f'block_group{i}': maps[f'block_group{i}'] for i in range(1, 5)}
    outputs.update(initial_conv=maps['initial_conv'],
                   initial_max_pool=maps[resnet.STEM_NAME],
                   final_avg_pool=features, proj_head_input=features,
                   proj_head_output=projections)
    if self.head_supervised is not None:
      outputs['logits_sup'] = self.head_supervised(selected,
                                                   training=training)
    return {name: tf.cast(value, self.dtype)
            for name, value in outputs.items()}

  def outputs_dict(self, images, training=False):
    """{'features', 'projection'[, 'logits']} of a single-view batch: the
    ResNet features, the last built projection layer (in finetune mode the
    head is only built up to ft_proj_selector) and the supervised head on
    the features it is trained on (`SERVING_OUTPUTS` of `simclr_outputs`).
    """
    outputs = self.simclr_outputs(images, training=training)
    return {ours: outputs[original]
            for ours, original in SERVING_OUTPUTS.items()
            if original in outputs}

  def call(self, inputs, training=False, head_on_views=True):
    """`head_on_views=False` (pretraining with --linear_head_input=clean):
    the supervised head is not run on the views; the trainer runs it on
    `head_features` of the clean views instead."""
    features = stack_views(inputs)
    hiddens = self.base_model(features, training=training)
    projections, supervised_inputs = self.head_contrastive(
        hiddens, training=training)
    projections = tf.cast(projections, self.dtype)
    if self.train_mode == 'finetune':
      return None, self.supervised_logits(supervised_inputs,
                                          training=training)
    if self.head_supervised is not None and head_on_views:
      return projections, self.supervised_logits(
          tf.stop_gradient(supervised_inputs), training=training)
    return projections, None

  def head_features(self, images):
    """The stop-gradient features the supervised head reads
    (ft_proj_selector), of single-view `images` in inference mode (BN
    moving averages): what eval and evaluate.py see, for a pretraining head
    trained on clean views (--linear_head_input=clean)."""
    hiddens = self.base_model(images, training=False)
    _, supervised_inputs = self.head_contrastive(hiddens, training=False)
    return tf.stop_gradient(supervised_inputs)

  def supervised_logits(self, features, training=False):
    """The supervised head on `features`, cast to the variable dtype."""
    return tf.cast(self.head_supervised(features, training=training),
                   self.dtype)


class MomentumEncoder(tf_keras.Model):
  """EMA twin of a `Model`'s ResNet + projection head (SPEC §3).

  Used for the keys of a memory queue (FNC, IFND). It is a separate object,
  so its variables are never in `Model.trainable_variables` and the
  optimizer never sees them; they change only through
  `copy_from` (w_ema ← w, all variables: start equal to the online network)
  and `update_from` (after each optimizer step, trainable weights only):

    w_ema ← d·w_ema + (1 − d)·w

  BN moving statistics are not averaged: the twin always runs with
  training=True (batch statistics, synchronised across replicas when
  global_bn), so its BN layers keep their own moving averages of the keys'
  batch statistics, as MoCo's key encoder and the FNC release do. They are
  saved in checkpoints but do not affect the keys.

  `call(images [b, H, W, 3V])` → projections [V·b, d], view-major (row
  v·b + k is view v of image k), the same stacking as `Model.call`.
  """

  def __init__(self, name='momentum_encoder', **encoder_config):
    """`encoder_config`: the architecture arguments of `build_encoder`
    (those of the `Model` it follows)."""
    with precision_policy(encoder_config.get('precision', 'float32')):
      super().__init__(name=name)
    self.base_model, self.head_contrastive = build_encoder(**encoder_config)
    self._pairs = None

  def call(self, inputs, training=True):
    features = stack_views(inputs)
    hiddens = self.base_model(features, training=training)
    projections, _ = self.head_contrastive(hiddens, training=training)
    return tf.cast(projections, self.dtype)

  def _variable_pairs(self, model):
    """[(own variable, model's variable)] matched by checkpoint path."""
    if self._pairs is not None and self._pairs[0] is model:
      return self._pairs[1]
    pairs = []
    for name in (BASE_MODEL_NAME, PROJECTION_HEAD_NAME):
      own = variable_paths(getattr(self, name))
      online = variable_paths(getattr(model, name))
      if own.keys() != online.keys():
        missing = sorted(set(own) ^ set(online))
        raise ValueError(
            f'The momentum encoder does not match the model under {name}/ '
            f'(build both, by calling them once, from the same config); '
            f'differing variables: {", ".join(missing[:5])}')
      for path, variable in own.items():
        if variable.shape != online[path].shape:
          raise ValueError(f'Momentum encoder variable {name}/{path} has '
                           f'shape {variable.shape}, the model '
                           f'{online[path].shape}.')
        pairs.append((variable, online[path]))
    # Plain attribute: Keras must not track the model (or its variables)
    # as a dependency of the encoder, or checkpoints would hold it twice.
    object.__setattr__(self, '_pairs', (model, pairs))
    return pairs

  def copy_from(self, model):
    """Sets every variable (weights and BN statistics) to the model's."""
    for own, online in self._variable_pairs(model):
      own.assign(tf.convert_to_tensor(online))

  def update_from(self, model, decay):
    """w_ema ← decay·w_ema + (1 − decay)·w for the model's trainable weights.

    Call it in the same context on every replica (replica or cross-replica)
    with identical model weights; the copies then stay identical.
    """
    updates = []
    for own, online in self._variable_pairs(model):
      if online.trainable:
        d = tf.cast(decay, own.dtype)
        updates.append(own.assign(d * own + (1 - d) * online))
    return tf.group(updates)


def add_weight_decay(model, adjust_per_optimizer=True, optimizer='lars',
                     weight_decay=1e-6):
  """The explicit weight-decay loss term (the original's helper).

  With adjust_per_optimizer and LARS (which decays inside the update), only
  the supervised head is decayed here; otherwise every non-BN variable.
  """
  name = optimizer if adjust_per_optimizer else 'momentum'
  return lars_optimizer.weight_decay_loss(
      model.trainable_variables, name, weight_decay)
