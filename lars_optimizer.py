"""Optimizer construction: LARS (with SimCLR's exclusion rules), momentum, Adam.

Also the SimCLR learning-rate schedule (linear warm-up, then cosine decay) and
the explicit weight-decay loss term used next to each optimizer.

Variable exclusion is by name. A variable "matches" a pattern when the pattern
is a substring of its canonical name (`canonical_variable_name`: the name
without the ':0' suffix and without the '/replica_<k>' suffix that
tf.distribute gives the non-primary copies of a mirrored variable). The pattern
'batch_normalization' is special: it also matches any variable whose last name
component is 'gamma' or 'beta', so BN layers are recognised whatever the model
called them (e.g. 'bn1/gamma'). Keras names BatchNormalization and
SyncBatchNormalization layers '..._batch_normalization...' by default, so both
rules agree for default-named layers.
"""

import math
import re

import tensorflow as tf
import tf_keras

EETA_DEFAULT = 0.001

BATCH_NORM_PATTERN = 'batch_normalization'
EXCLUDE_FROM_WEIGHT_DECAY = [BATCH_NORM_PATTERN, 'bias', 'head_supervised']

OPTIMIZERS = ('lars', 'momentum', 'adam')
LEARNING_RATE_SCALINGS = ('linear', 'sqrt')

_NAME_SUFFIX = re.compile(r'(/replica_\d+)?(:\d+)?$')


def canonical_variable_name(var):
  """Name of `var` (a variable or a str) without ':0' and '/replica_<k>'."""
  name = var if isinstance(var, str) else var.name
  return _NAME_SUFFIX.sub('', name)


def is_batch_norm_variable(var):
  """True for BN parameters: 'batch_normalization' in the name or a gamma/beta."""
  name = canonical_variable_name(var)
  return (BATCH_NORM_PATTERN in name or
          name.rsplit('/', 1)[-1] in ('gamma', 'beta'))


def variable_matches(var, patterns):
  """True if any pattern is a substring of `var`'s canonical name.

  `var` is a variable or a name. The pattern 'batch_normalization' matches
  every BN parameter (see `is_batch_norm_variable`).
  """
  name = canonical_variable_name(var)
  for pattern in patterns or ():
    if pattern == BATCH_NORM_PATTERN:
      if is_batch_norm_variable(name):
        return True
    elif pattern in name:
      return True
  return False


@tf_keras.utils.register_keras_serializable(package='simclr')
class LARSOptimizer(tf_keras.optimizers.legacy.Optimizer):
  """Layer-wise Adaptive Rate Scaling (You et al., 2017) as in SimCLR.

  Classic momentum, per variable w with gradient g (SPEC §5):
    g <- g + wd * w                      (unless excluded from weight decay)
    trust = eeta * |w| / |g|             (if adapted and both norms > 0, else 1)
    v <- m * v + lr * trust * g
    w <- w - v
  Exclusions are substring patterns on variable names (`variable_matches`).
  `exclude_from_layer_adaptation` defaults to `exclude_from_weight_decay` when
  None or empty. The momentum slot is named 'Momentum', as in SimCLR.
  (SimCLR's unused Nesterov and "popular momentum" variants are not offered.)
  """

  def __init__(self,
               learning_rate,
               momentum=0.9,
               weight_decay=0.0,
               exclude_from_weight_decay=None,
               exclude_from_layer_adaptation=None,
               eeta=EETA_DEFAULT,
               name='LARSOptimizer',
               **kwargs):
    super().__init__(name, **kwargs)
    self._set_hyper('learning_rate', learning_rate)
    self._set_hyper('decay', self._initial_decay)
    self.momentum = momentum
    self.weight_decay = weight_decay
    self.eeta = eeta
    self.exclude_from_weight_decay = list(exclude_from_weight_decay or [])
    if exclude_from_layer_adaptation:
      self.exclude_from_layer_adaptation = list(exclude_from_layer_adaptation)
    else:
      self.exclude_from_layer_adaptation = list(self.exclude_from_weight_decay)

  def _create_slots(self, var_list):
    for var in var_list:
      self.add_slot(var, 'Momentum')

  def _use_weight_decay(self, var):
    return bool(self.weight_decay) and not variable_matches(
        var, self.exclude_from_weight_decay)

  def _do_layer_adaptation(self, var):
    return not variable_matches(var, self.exclude_from_layer_adaptation)

  def _trust_ratio(self, w, u, dtype):
    """eeta * |w| / |u| when both norms are > 0, else 1."""
    w_norm = tf.norm(w, ord=2)
    u_norm = tf.norm(u, ord=2)
    ok = tf.logical_and(w_norm > 0, u_norm > 0)
    safe_u_norm = tf.where(ok, u_norm, tf.ones_like(u_norm))
    return tf.where(ok, tf.cast(self.eeta, dtype) * w_norm / safe_u_norm,
                    tf.ones_like(w_norm))

  def _resource_apply_dense(self, grad, var, apply_state=None):
    var_device, var_dtype = var.device, var.dtype.base_dtype
    coefficients = ((apply_state or {}).get((var_device, var_dtype)) or
                    self._fallback_apply_state(var_device, var_dtype))
    lr = coefficients['lr_t']
    momentum = tf.cast(self.momentum, var_dtype)
    v = self.get_slot(var, 'Momentum')

    if self._use_weight_decay(var):
      grad = grad + tf.cast(self.weight_decay, var_dtype) * var
    adapt = self._do_layer_adaptation(var)

    trust = self._trust_ratio(var, grad, var_dtype) if adapt else 1.0
    next_v = momentum * v + lr * trust * grad
    next_var = var - next_v

    return tf.group(var.assign(next_var, use_locking=self._use_locking),
                    v.assign(next_v, use_locking=self._use_locking))

  def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
    # LARS needs the norm of the whole gradient, so apply it densely.
    dense_grad = tf.math.unsorted_segment_sum(
        grad, indices, tf.shape(var, out_type=indices.dtype)[0])
    return self._resource_apply_dense(dense_grad, var, apply_state)

  def get_config(self):
    config = super().get_config()
    config.update({
        'learning_rate': self._serialize_hyperparameter('learning_rate'),
        'decay': self._initial_decay,
        'momentum': self.momentum,
        'weight_decay': self.weight_decay,
        'exclude_from_weight_decay': self.exclude_from_weight_decay,
        'exclude_from_layer_adaptation': self.exclude_from_layer_adaptation,
        'eeta': self.eeta,
    })
    return config


def get_train_steps(num_examples, train_epochs, train_batch_size,
                    train_steps=0):
  """train_steps if > 0, else N * epochs // B + 1."""
  if train_steps and train_steps > 0:
    return int(train_steps)
  return int(num_examples * train_epochs // train_batch_size + 1)


def _check_choice(value, allowed, what):
  if value not in allowed:
    raise ValueError(f'Unknown {what} {value!r}; allowed values: '
                     f'{", ".join(allowed)}.')


def scale_learning_rate(base_learning_rate, train_batch_size,
                        learning_rate_scaling='linear'):
  """lr · B / 256 (linear) or lr · sqrt(B) (sqrt)."""
  _check_choice(learning_rate_scaling, LEARNING_RATE_SCALINGS,
                'learning_rate_scaling')
  if learning_rate_scaling == 'linear':
    return base_learning_rate * train_batch_size / 256.
  return base_learning_rate * math.sqrt(train_batch_size)


@tf_keras.utils.register_keras_serializable(package='simclr')
class ConstantLearningRate(tf_keras.optimizers.schedules.LearningRateSchedule):
  """`scale_learning_rate(...)` at every step: no warm-up, no decay. For
  the linear head trained on clean views (--linear_head_schedule=constant),
  which must keep up with the encoder's moving features to the last step.
  A schedule rather than a float, so that the rate is not an optimizer
  variable (checkpointed, and restored over a changed flag)."""

  def __init__(self, base_learning_rate, train_batch_size,
               learning_rate_scaling='linear', name=None):
    super().__init__()
    self.base_learning_rate = base_learning_rate
    self.train_batch_size = train_batch_size
    self.learning_rate_scaling = learning_rate_scaling
    self.scaled_learning_rate = scale_learning_rate(
        base_learning_rate, train_batch_size, learning_rate_scaling)
    self._name = name

  def __call__(self, step):
    del step
    return tf.constant(self.scaled_learning_rate, tf.float32)

  def get_config(self):
    return {'base_learning_rate': self.base_learning_rate,
            'train_batch_size': self.train_batch_size,
            'learning_rate_scaling': self.learning_rate_scaling,
            'name': self._name}


@tf_keras.utils.register_keras_serializable(package='simclr')
class WarmUpAndCosineDecay(tf_keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up from 0 to the scaled LR, then cosine decay to 0.

    scaled = lr * B / 256 (linear) or lr * sqrt(B) (sqrt)
    W = int(round(warmup_epochs * N // B)),  T = total_steps
    lr(s) = s / W * scaled                                   for s < W
    lr(s) = scaled * 0.5 * (1 + cos(pi * min(s - W, T - W) / (T - W)))  else
  """

  def __init__(self, base_learning_rate, num_examples, train_batch_size,
               warmup_epochs=10, total_steps=None, train_epochs=100,
               learning_rate_scaling='linear', name=None):
    super().__init__()
    _check_choice(learning_rate_scaling, LEARNING_RATE_SCALINGS,
                  'learning_rate_scaling')
    self.base_learning_rate = base_learning_rate
    self.num_examples = num_examples
    self.train_batch_size = train_batch_size
    self.warmup_epochs = warmup_epochs
    self.train_epochs = train_epochs
    self.learning_rate_scaling = learning_rate_scaling
    self.total_steps = total_steps
    self._name = name

  @property
  def scaled_learning_rate(self):
    return scale_learning_rate(self.base_learning_rate,
                               self.train_batch_size,
                               self.learning_rate_scaling)

  @property
  def warmup_steps(self):
    return int(round(
        self.warmup_epochs * self.num_examples // self.train_batch_size))

  @property
  def decay_end_step(self):
    """The step at which the learning rate reaches 0."""
    if self.total_steps is not None:
      return int(self.total_steps)
    return get_train_steps(self.num_examples, self.train_epochs,
                           self.train_batch_size)

  def __call__(self, step):
    with tf.name_scope(self._name or 'WarmUpAndCosineDecay'):
      step = tf.cast(step, tf.float32)
      scaled_lr = tf.constant(self.scaled_learning_rate, tf.float32)
      warmup = self.warmup_steps
      decay_steps = float(max(self.decay_end_step - warmup, 1))
      if warmup:
        warmup_lr = step / float(warmup) * scaled_lr
      else:
        warmup_lr = scaled_lr
      progress = tf.clip_by_value(step - warmup, 0., decay_steps) / decay_steps
      cosine_lr = scaled_lr * 0.5 * (1. + tf.cos(math.pi * progress))
      return tf.where(step < warmup, warmup_lr, cosine_lr)

  def get_config(self):
    return {
        'base_learning_rate': self.base_learning_rate,
        'num_examples': self.num_examples,
        'train_batch_size': self.train_batch_size,
        'warmup_epochs': self.warmup_epochs,
        'total_steps': self.total_steps,
        'train_epochs': self.train_epochs,
        'learning_rate_scaling': self.learning_rate_scaling,
        'name': self._name,
    }


def build_optimizer(optimizer_name, learning_rate, momentum=0.9,
                    weight_decay=0.0):
  """'lars' (decay inside the update), 'momentum' (Nesterov SGD) or 'adam'.

  For 'momentum' and 'adam', weight decay is not part of the optimizer: add
  `weight_decay_loss(...)` to the loss instead.
  """
  _check_choice(optimizer_name, OPTIMIZERS, 'optimizer')
  if optimizer_name == 'lars':
    return LARSOptimizer(
        learning_rate, momentum=momentum, weight_decay=weight_decay,
        exclude_from_weight_decay=EXCLUDE_FROM_WEIGHT_DECAY)
  if optimizer_name == 'momentum':
    return tf_keras.optimizers.legacy.SGD(learning_rate, momentum=momentum,
                                          nesterov=True)
  return tf_keras.optimizers.legacy.Adam(learning_rate)


def weight_decay_loss(variables, optimizer_name, weight_decay):
  """Explicit decay term wd * sum(½|w|²) over the variables the optimizer skips.

  'lars': only the supervised head's weights (name contains 'head_supervised',
  not 'bias'), since LARS decays everything else itself. 'momentum' / 'adam':
  every non-BN variable. Returns a scalar in the variables' dtype (float32 0
  when no variable counts).
  """
  _check_choice(optimizer_name, OPTIMIZERS, 'optimizer')
  if optimizer_name == 'lars':
    chosen = [v for v in variables
              if 'head_supervised' in canonical_variable_name(v)
              and 'bias' not in canonical_variable_name(v)]
  else:
    chosen = [v for v in variables if not is_batch_norm_variable(v)]
  if not chosen:
    return tf.constant(0., tf.float32)
  total = tf.add_n([tf.nn.l2_loss(v) for v in chosen])
  return tf.cast(weight_decay, total.dtype) * total
