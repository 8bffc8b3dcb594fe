"""Tests for features.py: encoders, restoring them, the padded pass dataset
and the distributed feature extractor."""

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import data as data_lib
import features
from conftest import two_replica_strategy
from test_data import DataTestTinyImages  # noqa: F401  (registers it)
from test_data import tfds_dir  # noqa: F401  (fixture)

ARCH = dict(resnet_depth=18, width_multiplier=0.125, cifar_stem=True,
            proj_out_dim=16)


def extract(encode, source, split, batch_size=16, image_size=16,
            strategy=None):
  strategy = strategy or tf.distribute.get_strategy()
  return features.FeatureExtractor(strategy, encode)(features.pass_dataset_fn(
      strategy, source, split, batch_size, image_size)())


def test_features_from_checkpoint_and_saved_model_agree(tmp_path):
  source = data_lib.get_data_source('digits')
  source = source.subset('test', np.arange(0, 360, 9))  # 40 examples
  model = features.build_encoder_model(0, image_size=16, **ARCH)
  prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / 'ckpt-1'))
  exported = checkpoints.export_saved_model(model, str(tmp_path), 1, 1)

  other = features.build_encoder_model(-1, image_size=16, **ARCH)
  features.restore_encoder(other, prefix, layer=-1)
  from_ckpt, labels = extract(features.model_encoder(other, 0), source,
                              'test')
  from_saved, labels2 = extract(features.saved_model_encoder(exported),
                                source, 'test')
  assert len(labels) == 40  # The extractor checked ids 0..39, in order.
  np.testing.assert_array_equal(labels, source.example_labels('test'))
  np.testing.assert_array_equal(labels, labels2)
  assert from_ckpt.shape == (40, model.base_model(tf.zeros([1, 16, 16, 3]))
                             .shape[-1])
  np.testing.assert_allclose(from_ckpt, from_saved, rtol=1e-5, atol=1e-5)
  proj_ckpt, _ = extract(features.model_encoder(other, -1), source, 'test')
  proj_saved, _ = extract(features.saved_model_encoder(exported,
                                                       'projection'),
                          source, 'test')
  assert proj_ckpt.shape == (40, 16)
  np.testing.assert_allclose(proj_ckpt, proj_saved, rtol=1e-5, atol=1e-5)
  pixels, _ = extract(features.pixel_encoder, source, 'test')
  images = source.arrays('test')[0]
  np.testing.assert_allclose(
      pixels, np.clip(tf.image.resize(images / 255.0, [16, 16],
                                      method='bicubic').numpy(), 0, 1)
      .reshape(40, -1), atol=1e-5)


def test_restore_encoder_names_a_missing_projection_layer(tmp_path):
  """A fine-tuned checkpoint keeps the head only up to ft_proj_selector."""
  import model as model_lib
  finetuned = model_lib.Model(10, train_mode='finetune', ft_proj_selector=1,
                              **ARCH)
  finetuned(tf.zeros([1, 16, 16, 3]))
  prefix = tf.train.Checkpoint(model=finetuned).write(str(tmp_path / 'ft'))
  features.restore_encoder(
      features.build_encoder_model(1, image_size=16, **ARCH), prefix, 1)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='no projection layer 2'):
    features.restore_encoder(
        features.build_encoder_model(2, image_size=16, **ARCH), prefix, 2)


def test_distributed_features_under_two_replicas_equal_a_direct_loop():
  """Every example once, in id order, the features of the encoder run
  directly on each eval-preprocessed image of `source.load`."""
  strategy = two_replica_strategy()
  source = data_lib.get_data_source('digits')
  weights = tf.constant(np.random.default_rng(0).normal(
      size=(16 * 16 * 3, 5)).astype(np.float32))

  def encode(images):
    return tf.reshape(images, [tf.shape(images)[0], -1]) @ weights

  num = source.num_examples('test')
  reference = np.zeros((num, 5), np.float32)
  ref_labels = np.full(num, -1, np.int32)
  for example in source.load('test'):
    i = int(example['id'])
    image = data_lib.eval_view(example['image'], 16)
    reference[i] = encode(image[tf.newaxis])[0].numpy()
    ref_labels[i] = int(example['label'])

  extractor = features.FeatureExtractor(strategy, encode)
  dataset_fn = features.pass_dataset_fn(strategy, source, 'test', 64, 16)
  for _ in range(2):  # The second pass reuses the extractor's step.
    feats, labels = extractor(dataset_fn())
    np.testing.assert_allclose(feats, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_array_equal(labels, source.arrays('test')[1])
  # 360 rows padded to 6 global batches of 64: some padding was dropped.
  input_fn = features.build_pass_input_fn(source, 'test', 64, 16)
  assert sum(1 for _ in input_fn(None)) == 6


def test_pass_input_fn_pads_every_pipeline_to_whole_batches():
  source = data_lib.get_data_source('digits')
  input_fn = features.build_pass_input_fn(source, 'test', 64, 16)
  ids = []
  for pipeline in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2,
                                         input_pipeline_id=pipeline,
                                         num_replicas_in_sync=2)
    batches = list(input_fn(context).as_numpy_iterator())
    assert [len(b['id']) for b in batches] == [32] * 6
    for b in batches:
      pad = b['id'] < 0
      assert (b['label'][pad] == -1).all() and (b['image'][pad] == 0).all()
      ids.append(b['id'][~pad])
  assert sorted(np.concatenate(ids)) == list(range(360))


def test_extractor_rejects_a_pass_that_misses_or_repeats_an_id():
  extractor = features.FeatureExtractor(tf.distribute.get_strategy(),
                                        features.pixel_encoder)

  def batches(ids):
    ids = np.asarray(ids, np.int32)
    return tf.data.Dataset.from_tensors({
        'image': tf.zeros([len(ids), 2, 2, 3]), 'id': ids,
        'label': np.zeros_like(ids)})

  feats, labels = extractor(batches([1, -1, 0]))
  assert feats.shape == (2, 12) and labels.tolist() == [0, 0]
  for ids in ([0, 2], [0, 1, 1]):
    with pytest.raises(ValueError, match='every id 0..N−1 once'):
      extractor(batches(ids))


# ------------------------------------------- passes sharded by example


class _Context:
  """tf.distribute.InputContext of pipeline `index` of `count`, one replica
  each."""

  def __init__(self, index, count):
    self.input_pipeline_id = index
    self.num_input_pipelines = count
    self.num_replicas_in_sync = count

  def get_per_replica_batch_size(self, global_batch_size):
    return global_batch_size // self.num_replicas_in_sync


def _pass_ids(source, split, pipelines, per_replica_batch):
  """The ids (padding dropped) and the batch count of every pipeline."""
  input_fn = features.build_pass_input_fn(
      source, split, per_replica_batch * pipelines, image_size=8)
  ids, batches = [], []
  for index in range(pipelines):
    rows = [batch['id'].numpy()
            for batch in input_fn(_Context(index, pipelines))]
    batches.append(len(rows))
    ids.append(np.concatenate(rows))
  return ids, batches


@pytest.mark.parametrize('pipelines', [2, 3])
@pytest.mark.parametrize('kind', ['tfds', 'tfds_subset', 'digits'])
def test_every_pipeline_gets_whole_batches_and_every_id_once(
    kind, pipelines, tfds_dir):
  """23 TFDS examples in 3 files (8, 8, 7): by file, 2 pipelines would own
  15 and 8 examples and a padded pass of 3 global batches of 8 would drop 3
  of the 15; by example nothing is lost."""
  if kind == 'digits':
    source = data_lib.get_data_source('digits').subset(
        'test', np.arange(0, 360, 15))  # 24 examples
  else:
    source = data_lib.get_data_source('data_test_tiny_images',
                                      data_dir=tfds_dir, eval_split=None)
    if kind == 'tfds_subset':  # 12 ids, all from the first 2 files
      source = source.subset('train', np.arange(12))
  split = 'test' if kind == 'digits' else 'train'
  num = source.num_examples(split)
  ids, batches = _pass_ids(source, split, pipelines, per_replica_batch=4)
  assert len(set(batches)) == 1  # the same number of batches everywhere
  assert batches[0] == -(-num // (4 * pipelines))
  seen = np.concatenate([i[i >= 0] for i in ids])
  np.testing.assert_array_equal(np.sort(seen), np.arange(num))


def test_pass_steps_counts_global_batches_under_any_strategy():
  """360 rows in global batches of 64: 6 steps, whether the pass is a plain
  dataset or split over two replicas (one pipeline, two batches a step)."""
  source = data_lib.get_data_source('digits')
  for strategy in (tf.distribute.get_strategy(), two_replica_strategy()):
    dataset = features.pass_dataset_fn(strategy, source, 'test', 64, 16)()
    assert features.pass_steps(dataset, strategy) == 6
