"""Features of an encoder over one pass of a split, under a tf.distribute
strategy: the one feature path of evaluate.py, the kNN monitor and IFND.

* Encoders, `images [b, H, W, 3] in [0, 1] -> [b, d]`: `model_encoder` (a
  `model.Model`'s ResNet output or a projection layer), `saved_model_encoder`
  (an exported SavedModel), `pixel_encoder` (the raw pixels); the frozen
  models they read come from `build_encoder_model` + `restore_encoder`.
* The pass dataset: `build_pass_input_fn`, every example once with the eval
  preprocessing (`data.eval_view`), padded to whole global batches;
  `pass_dataset_fn` distributes it over a strategy.
* `FeatureExtractor(strategy, encode)`: a distributed pass -> (features,
  labels) in id order, all-gathered so that every host holds all rows.
"""

import numpy as np
import tensorflow as tf

import checkpoints
import data as data_lib
import model as model_lib
import objective

# ---------------------------------------------------------------------------
# Encoders.
# ---------------------------------------------------------------------------


def model_encoder(model, layer=0):
  """images [b, H, W, 3] in [0, 1] → features of `model` (inference mode).

  `layer` numbers the representation as --ft_proj_selector does: 0 = ResNet
  output, -1 = last projection layer, j = projection layer j (then the
  model must have been built with ft_proj_selector=j).
  """
  head = model.head_contrastive
  if layer not in (0, -1) and head.ft_proj_selector != layer:
    raise ValueError(f'Projection layer {layer} needs a model built with '
                     f'ft_proj_selector={layer}.')

  @tf.function(reduce_retracing=True)
  def encode(images):
    hiddens = model.base_model(images, training=False)
    if layer == 0:
      return hiddens
    projection, selected = head(hiddens, training=False)
    return projection if layer == -1 else selected
  return encode


def saved_model_encoder(path, output='features'):
  """images in [0, 1] → `output` of an exported SavedModel's signature."""
  # encode holds `loaded` itself: the signature alone does not keep the
  # variables alive, and a tf.function calling it would fail.
  loaded = tf.saved_model.load(path)

  def encode(images):
    serve = loaded.signatures['serving_default']
    return serve(images=tf.convert_to_tensor(images, tf.float32))[output]
  return encode


def pixel_encoder(images):
  """The raw (eval-preprocessed) pixels as a flat feature vector."""
  return tf.reshape(images, [tf.shape(images)[0], -1])


def build_encoder_model(layer=0, **architecture):
  """A pretraining-mode `model.Model` (no supervised head) for features.

  `architecture`: resnet_depth, width_multiplier, cifar_stem, sk_ratio,
  se_ratio, proj_head_mode, proj_out_dim, num_proj_layers, image_size (for
  building the variables). Build it under the strategy's scope.
  """
  image_size = architecture.pop('image_size', 32)
  model = model_lib.Model(
      1, train_mode='pretrain', lineareval_while_pretraining=False,
      ft_proj_selector=layer if layer > 0 else 0, **architecture)
  model(tf.zeros([1, image_size, image_size, 3]), training=False)
  return model


def restore_encoder(model, path, layer=0):
  """Reads the backbone (and the projection layers up to `layer`) of `path`.

  `path`: a checkpoint (prefix or directory) of this code or of the
  original SimCLR TF2 code (renamed by simclr_checkpoint.py, through
  `checkpoints.warm_start`). Returns the checkpoint prefix. A variable of
  another shape, or a missing backbone or needed projection variable, is a
  `checkpoints.CheckpointMismatchError` naming them.
  """
  prefix = checkpoints.resolve_checkpoint_path(path)
  if layer == 0:
    schema = checkpoints.BACKBONE_PREFIX
  else:
    schema = (f'(?:{checkpoints.BACKBONE_PREFIX}|'
              f'{model_lib.PROJECTION_HEAD_NAME}/)')
  restored = set(checkpoints.warm_start(model, prefix, schema))
  head = model.head_contrastive
  needed = head.linear_layers if layer == -1 else head.linear_layers[:layer]
  needed_ids = {id(v) for lyr in needed for v in lyr.variables}
  missing = [name for name, var in model_lib.variable_paths(model).items()
             if id(var) in needed_ids and name not in restored]
  if missing:
    raise checkpoints.CheckpointMismatchError(
        f'{prefix} has no projection layer {layer} (not in the checkpoint: '
        f'{missing[:5]}); a fine-tuned checkpoint keeps only the layers up to '
        'its --ft_proj_selector.')
  return prefix


# ---------------------------------------------------------------------------
# One padded pass over a split.
# ---------------------------------------------------------------------------


def build_pass_input_fn(source, split, global_batch_size, image_size):
  """One pass over `split` (eval preprocessing) for code running under a
  strategy, padded to whole global batches.

  Every replica gets the same number of full batches (static shapes, as
  TPUs need, and equal shapes for cross-replica gathers): each input
  pipeline's share, by example (`DataSource.load(shard_by_example=True)`:
  at most ceil(N / P) of the N examples for P pipelines, which always fits),
  is followed by padding rows (zero image, label and id −1) up to
  ceil(N / global_batch_size) steps. Drop rows with id < 0.
  """
  num_examples = source.num_examples(split)
  num_steps = -(-num_examples // global_batch_size)

  def input_fn(input_context=None):
    if input_context is None:
      per_replica, replicas_per_pipeline = global_batch_size, 1
    else:
      per_replica = input_context.get_per_replica_batch_size(
          global_batch_size)
      replicas_per_pipeline = (input_context.num_replicas_in_sync //
                               input_context.num_input_pipelines)
    rows = num_steps * replicas_per_pipeline * per_replica
    ds = source.load(split, input_context=input_context,
                     shard_by_example=True)
    ds = ds.map(lambda ex: {'image': data_lib.eval_view(ex['image'],
                                                        image_size),
                            'label': tf.cast(ex['label'], tf.int32),
                            'id': tf.cast(ex['id'], tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.data.Dataset.from_tensors({
        'image': tf.zeros([image_size, image_size, 3], tf.float32),
        'label': tf.constant(-1, tf.int32),
        'id': tf.constant(-1, tf.int32)}).repeat()
    ds = ds.concatenate(padding).take(rows)
    ds = ds.batch(per_replica, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  return input_fn


def pass_steps(dataset, strategy):
  """The number of global batches of a `build_pass_input_fn` dataset
  distributed over `strategy`: the cardinality (known: the padding fixes
  it) of this host's pipeline, which holds one batch per local replica and
  step."""
  cardinality = dataset.cardinality
  local_replicas = 1
  if callable(cardinality):  # a tf.data.Dataset (the default strategy)
    cardinality = cardinality()
  else:
    local_replicas = len(strategy.extended.worker_devices)
  steps = int(cardinality)
  if steps >= 0:
    steps //= local_replicas
  if steps < 0:
    raise ValueError('A feature pass needs a dataset of known length '
                     f'(features.build_pass_input_fn); got cardinality '
                     f'{steps}.')
  return steps


def pass_dataset_fn(strategy, source, split, global_batch_size, image_size):
  """() -> a new distributed `build_pass_input_fn` pass over `split` (one
  input pipeline per host, sharded through its InputContext)."""
  input_fn = build_pass_input_fn(source, split, global_batch_size,
                                 image_size)
  return lambda: strategy.distribute_datasets_from_function(input_fn)


# ---------------------------------------------------------------------------
# Feature extraction.
# ---------------------------------------------------------------------------


class FeatureExtractor:
  """`encode` over a distributed pass → (features, labels) in id order.

  `encode(images) -> [b, d]` runs on every replica of `strategy` (TPU, GPUs
  or CPU) inside one tf.function, made on the first call and reused; the
  rows are all-gathered on the accelerators, so every host of a pod
  receives all of them. Build one extractor per encoder and keep it.
  """

  def __init__(self, strategy, encode):
    self.strategy = strategy
    self.encode = encode
    self._step = None

  def _gathered_step(self):
    """tf.function: a distributed batch → (features, ids, labels) of the
    whole global batch."""
    strategy, encode = self.strategy, self.encode

    @tf.function
    def step(batch):
      def replica_fn(batch):
        features = tf.cast(encode(batch['image']), tf.float32)
        return tuple(objective.cross_replica_concat(t)
                     for t in (features, batch['id'], batch['label']))
      outputs = strategy.run(replica_fn, (batch,))
      return tf.nest.map_structure(
          lambda t: strategy.experimental_local_results(t)[0], outputs)
    return step

  def __call__(self, dataset):
    """(features float32 [N, d], labels int32 [N]) in id order, from a
    distributed `build_pass_input_fn` dataset; padding rows (id −1) are
    dropped. A ValueError unless every id 0..N−1 is seen exactly once."""
    if self._step is None:
      self._step = self._gathered_step()
    feats, labels, ids = [], [], []
    # Exactly its known number of batches: iterating to the end would make
    # TF log an OUT_OF_RANGE abort at the end of every pass.
    iterator = iter(dataset)
    for _ in range(pass_steps(dataset, self.strategy)):
      x, i, y = (t.numpy() for t in self._step(next(iterator)))
      keep = i >= 0
      feats.append(x[keep])
      ids.append(i[keep])
      labels.append(y[keep])
    feats, ids, labels = (np.concatenate(a) for a in (feats, ids, labels))
    order = np.argsort(ids, kind='stable')
    if not np.array_equal(ids[order], np.arange(len(ids))):
      raise ValueError(f'A feature pass must see every id 0..N−1 once; got '
                       f'{len(ids)} rows, {len(np.unique(ids))} distinct '
                       'ids.')
    return feats[order].reshape(len(ids), -1), labels[order]
