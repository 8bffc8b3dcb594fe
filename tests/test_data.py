"""Tests for data.py: sources, dense ids, sharding, batches and errors."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import data
import data_util
from conftest import two_replica_strategy

SHARED_CIFAR = '/work/shared/data/cifar10_jpeg/cifar10_jpeg.tar.gz'


# ---------------------------------------------------------------- fixtures


class DataTestTinyImages(tfds.core.GeneratorBasedBuilder):
  """A tiny local TFDS dataset (no download) written into several shards."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3)),
            'label': tfds.features.ClassLabel(num_classes=4),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(23, 0),
            'test': self._generate_examples(9, 100)}

  def _generate_examples(self, n, start):
    for k in range(start, start + n):
      image = np.zeros((8, 8, 3), np.uint8)
      image[..., 0] = k
      image[0, 0, 1] = k % 7
      yield k, {'image': image, 'label': k % 4}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = DataTestTinyImages(data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=3))
  return data_dir


def _write_image(path, array):
  if path.endswith('.png'):
    encoded = tf.io.encode_png(array)
  else:
    encoded = tf.io.encode_jpeg(array, quality=95)
  tf.io.write_file(path, encoded)


def _make_folder(root, counts, classes=('cat', 'dog', 'eel'), size=12):
  """root/<split>/<class>/img_XX.{png,jpg}, each image distinct."""
  rng = np.random.RandomState(0)
  for split, n in counts.items():
    for c in classes:
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(n):
        ext = 'png' if i % 2 else 'jpg'
        array = rng.randint(0, 256, (size, size, 3)).astype(np.uint8)
        _write_image(os.path.join(root, split, c, f'img_{i:02d}.{ext}'), array)
  return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return _make_folder(str(tmp_path_factory.mktemp('folder')),
                      {'train': 10, 'test': 3})


@pytest.fixture(scope='module')
def digits_source():
  return data.get_data_source('digits', eval_split='test')


def _source(kind, folder, tfds_dir, digits_source):
  if kind == 'digits':
    return digits_source, 'train'
  if kind == 'folder':
    return data.get_data_source(folder, eval_split='test'), 'train'
  return data.get_data_source('data_test_tiny_images', data_dir=tfds_dir,
                              eval_split='test'), 'train'


def _collect(ds):
  """{id: (image, label)} of one pass; fails on a repeated id."""
  out = {}
  for ex in ds.batch(128).as_numpy_iterator():
    assert ex['image'].dtype == np.uint8 and ex['image'].shape[-1] == 3
    assert ex['label'].dtype == np.int32 and ex['id'].dtype == np.int32
    for i, image, label in zip(ex['id'], ex['image'], ex['label']):
      assert int(i) not in out, f'id {i} seen twice'
      out[int(i)] = (image, int(label))
  return out


# ---------------------------------------------------------------- digits


def test_digits_split_and_images(digits_source):
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection
  src = digits_source
  assert src.num_classes == 10 and src.image_shape == (32, 32, 3)
  assert src.num_examples('train') == 1437
  assert src.num_examples('test') == 360
  assert src.num_examples('validation') == 360  # alias of 'test'
  images, labels = src.arrays('train')
  assert images.dtype == np.uint8 and images.shape == (1437, 32, 32, 3)
  assert np.array_equal(images[..., 0], images[..., 1])
  assert np.array_equal(images[..., 0], images[..., 2])
  assert images.max() == 255 and images.min() == 0
  # Independent split: ids follow the original order within each split.
  d = sk_datasets.load_digits()
  tr, te = model_selection.train_test_split(
      np.arange(1797), test_size=0.2, random_state=0, stratify=d.target)
  assert np.array_equal(labels, d.target[np.sort(tr)])
  assert np.array_equal(src.arrays('test')[1], d.target[np.sort(te)])
  # Upscaled content tracks the 8x8 original: block means correlate.
  small = d.images[np.sort(tr)[:50]] * 255 / 16
  blocks = images[:50, :, :, 0].reshape(50, 8, 4, 8, 4).mean(axis=(2, 4))
  assert np.corrcoef(small.ravel(), blocks.ravel())[0, 1] > 0.9
  # Deterministic across constructions.
  again = data.DigitsSource()
  assert np.array_equal(again.arrays('test')[0], src.arrays('test')[0])


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize('kind', ['digits', 'folder', 'tfds'])
def test_ids_dense_sharded_and_stable(kind, folder, tfds_dir, digits_source):
  src, split = _source(kind, folder, tfds_dir, digits_source)
  for s in (split, 'test'):
    n = src.num_examples(s)
    got = _collect(src.load(s))
    assert sorted(got) == list(range(n))
  n = src.num_examples(split)
  full = _collect(src.load(split))
  parts = []
  for i in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2,
                                     input_pipeline_id=i,
                                     num_replicas_in_sync=2)
    parts.append(_collect(src.load(split, input_context=ctx)))
  assert parts[0] and parts[1]
  assert not set(parts[0]) & set(parts[1])
  assert set(parts[0]) | set(parts[1]) == set(range(n))
  for part in parts:
    for i, (image, label) in part.items():
      assert np.array_equal(image, full[i][0]) and label == full[i][1]
  orders = []
  for seed in (1, 2):
    ds = src.load(split, shuffle_files=True, seed=seed)
    got = _collect(ds)
    assert sorted(got) == list(range(n))
    for i, (image, label) in got.items():
      assert np.array_equal(image, full[i][0]) and label == full[i][1]
    orders.append([int(i) for i in ds.map(lambda e: e['id'])])
  if kind != 'tfds':  # TFDS shuffles only its 3 files; orders may coincide.
    assert orders[0] != orders[1]


def test_folder_ids_follow_sorted_files(folder):
  src = data.get_data_source(folder, eval_split='test')
  assert src.num_classes == 3 and src.classes == ['cat', 'dog', 'eel']
  assert src.num_examples('train') == 30 and src.num_examples('test') == 9
  expected = []
  for label, c in enumerate(sorted(os.listdir(os.path.join(folder, 'train')))):
    for f in sorted(os.listdir(os.path.join(folder, 'train', c))):
      expected.append((os.path.join(folder, 'train', c, f), label))
  got = _collect(src.load('train'))
  for i, (path, label) in enumerate(expected):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3).numpy()
    assert np.array_equal(got[i][0], image) and got[i][1] == label


def test_tfds_ids_are_file_positions(tfds_dir):
  """id == position when the split's files are read in order, one by one."""
  src = data.get_data_source('data_test_tiny_images', data_dir=tfds_dir,
                             eval_split='test')
  assert src.num_classes == 4 and src.image_shape == (8, 8, 3)
  assert len(src.builder.info.splits['train'].shard_lengths) == 3
  builder = tfds.builder('data_test_tiny_images', data_dir=tfds_dir)
  ordered = builder.as_dataset(
      'train', shuffle_files=False,
      read_config=tfds.ReadConfig(interleave_cycle_length=1))
  got = _collect(src.load('train'))
  assert len(got) == 23
  for pos, ex in enumerate(ordered.as_numpy_iterator()):
    assert np.array_equal(got[pos][0], ex['image'])
    assert got[pos][1] == ex['label']


# ---------------------------------------------------------------- batches


def _batches(input_fn, n):
  return list(input_fn().take(n).as_numpy_iterator())


@pytest.mark.parametrize('views', [2, 3])
def test_pretrain_batches(views, digits_source):
  fn = data.build_input_fn(digits_source, 'train', 8, is_training=True,
                           image_size=32, num_views=views, seed=0)
  ds = fn()
  assert ds.element_spec['image'].shape.as_list() == [8, 32, 32, 3 * views]
  (batch,) = _batches(fn, 1)
  image = batch['image']
  assert image.dtype == np.float32 and image.shape == (8, 32, 32, 3 * views)
  assert image.min() >= 0.0 and image.max() <= 1.0
  assert batch['label'].dtype == np.int32 and batch['id'].dtype == np.int32
  assert batch['label'].shape == (8,) and batch['id'].shape == (8,)
  # Labels travel with their ids.
  labels = digits_source.arrays('train')[1]
  assert np.array_equal(batch['label'], labels[batch['id']])
  # Views of one image are independent draws.
  v0, v1 = image[..., 0:3], image[..., 3:6]
  differ = np.abs(v0 - v1).reshape(8, -1).max(axis=1) > 1e-3
  assert differ.sum() >= 7


@pytest.mark.parametrize('cache', [False, True])
def test_training_drops_remainder_and_repeats(folder, cache):
  src = data.get_data_source(folder, eval_split='test')
  fn = data.build_input_fn(src, 'train', 7, is_training=True, image_size=16,
                           train_mode='finetune', cache_dataset=cache, seed=0)
  batches = _batches(fn, 10)  # 70 > 30 examples: crosses epochs.
  assert len(batches) == 10
  for b in batches:
    assert b['image'].shape == (7, 16, 16, 3)  # finetune: one view
    assert b['id'].shape == (7,)
  ids = np.concatenate([b['id'] for b in batches])
  assert set(ids) == set(range(30))


def _ramp_folder(root, size=64):
  """One image per split whose red / green channels are ramps in x / y, so
  the span of a crop's values measures the crop's width / height."""
  ramp = np.linspace(0, 255, size)
  image = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                    np.zeros((size, size))], axis=-1).astype(np.uint8)
  for split in ('train', 'test'):
    os.makedirs(os.path.join(root, split, 'ramp'))
    _write_image(os.path.join(root, split, 'ramp', '0.png'), image)
  return root


def test_finetune_crop_honours_crop_area_min(tmp_path):
  """Fine-tuning views crop an area in [crop_area_min, 1] (FNC fine-tunes
  with 0.2), not always [0.08, 1]."""
  source = data.get_data_source(_ramp_folder(str(tmp_path)),
                                eval_split='test')

  def crop_areas(crop_area_min):
    fn = data.build_input_fn(source, 'train', 1, is_training=True,
                             image_size=32, train_mode='finetune',
                             crop_area_min=crop_area_min, seed=0)
    views = np.concatenate([b['image'] for b in _batches(fn, 300)])
    # Value span of a ramp = covered fraction of that side (flip-invariant).
    return np.ptp(views[..., 0], axis=(1, 2)) * np.ptp(views[..., 1],
                                                        axis=(1, 2))

  default, large = crop_areas(0.08), crop_areas(0.6)
  # The spans shrink slightly under bicubic resizing (< 5 % here).
  assert large.min() > 0.6 * 0.95
  assert default.min() < 0.3
  assert np.ptp(large) > 0.2  # still random crops


def test_eval_covers_every_example_once(digits_source):
  fn = data.build_input_fn(digits_source, 'test', 50, is_training=False,
                           image_size=32)
  batches = list(fn().as_numpy_iterator())
  assert [len(b['id']) for b in batches] == [50] * 7 + [10]
  ids = np.concatenate([b['id'] for b in batches])
  assert sorted(ids) == list(range(360))
  images, labels = digits_source.arrays('test')
  for b in batches:
    assert b['image'].shape[1:] == (32, 32, 3)
    assert np.array_equal(b['label'], labels[b['id']])
    # Eval at native 32x32: no crop, no resize -> exactly image / 255.
    np.testing.assert_allclose(b['image'], images[b['id']] / 255.0,
                               atol=1e-6)


def test_distributed_eval_two_replicas(digits_source):
  strategy = two_replica_strategy()
  fn = data.build_input_fn(digits_source, 'test', 64, is_training=False,
                           image_size=32)
  dist = strategy.distribute_datasets_from_function(fn)
  ids = []
  for batch in dist:
    for local in strategy.experimental_local_results(batch['id']):
      assert local.shape[0] <= 32
      ids.append(local.numpy())
  assert sorted(np.concatenate(ids)) == list(range(360))


# ---------------------------------------------------------------- exact resume


def _train_source(kind, folder, tfds_dir, digits_source):
  """Small training sources: 40 digits (a subset), 30 folder images, 23
  TFDS records in 3 files (8, 7, 8)."""
  if kind == 'digits':
    return digits_source.subset('train', np.arange(0, 1437, 36))
  return _source(kind, folder, tfds_dir, digits_source)[0]


def _train(source, steps, batch=5, seed=0, start_step=0, context=None,
           **kwargs):
  """`steps` training batches (pretraining, 2 views, 16 px)."""
  fn = data.build_input_fn(source, 'train', batch, is_training=True,
                           image_size=16, seed=seed, start_step=start_step,
                           **kwargs)
  return list(fn(context).take(steps).as_numpy_iterator())


def _context(pipelines, pipeline, replicas):
  return tf.distribute.InputContext(num_input_pipelines=pipelines,
                                    input_pipeline_id=pipeline,
                                    num_replicas_in_sync=replicas)


def _assert_same_batches(got, expected):
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    for key in ('id', 'label', 'image'):
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('kind', ['digits', 'folder', 'tfds'])
def test_train_input_is_a_function_of_the_seed(kind, folder, tfds_dir,
                                               digits_source):
  src = _train_source(kind, folder, tfds_dir, digits_source)
  first = _train(src, 3, seed=7)
  _assert_same_batches(_train(src, 3, seed=7), first)  # a fresh pipeline
  other = _train(src, 3, seed=8)
  ids = lambda batches: np.concatenate([b['id'] for b in batches])
  assert not np.array_equal(ids(other), ids(first))
  # Even an example both runs hold at the same place has other views.
  for a, b in zip(first, other):
    for k in np.flatnonzero(a['id'] == b['id']):
      assert not np.array_equal(a['image'][k], b['image'][k])
  labels = src.example_labels('train')
  for b in first:
    np.testing.assert_array_equal(b['label'], labels[b['id']])


def test_train_input_needs_an_int_seed(digits_source):
  for seed in (None, 1.5, '3'):
    with pytest.raises(ValueError, match='int seed'):
      data.build_input_fn(digits_source, 'train', 8, is_training=True,
                          image_size=16, seed=seed)
  data.build_input_fn(digits_source, 'test', 8, is_training=False,
                      image_size=16)  # eval: no seed needed


@pytest.mark.parametrize('kind', ['digits', 'folder', 'tfds'])
def test_resume_continues_the_straight_run(kind, folder, tfds_dir,
                                           digits_source):
  """start_step=k gives batches k, k+1, ... of the run from 0, bitwise:
  from within epoch 0 across the boundary, and from within epoch 1 (epochs
  of 8, 6 and 4.6 steps; for TFDS step 9 starts at epoch 1's last record)."""
  src = _train_source(kind, folder, tfds_dir, digits_source)
  straight = _train(src, 12)
  for k in (4, 9):
    _assert_same_batches(_train(src, 12 - k, start_step=k), straight[k:])


@pytest.mark.parametrize('kind', ['digits', 'folder', 'tfds'])
def test_every_id_once_per_epoch(kind, folder, tfds_dir, digits_source):
  """The stream (batches concatenated) holds each id once in each run of N
  positions from an epoch start; epochs are in different orders."""
  src = _train_source(kind, folder, tfds_dir, digits_source)
  n = src.num_examples('train')
  batch = 4
  steps = -(-3 * n // batch)
  stream = np.concatenate([b['id'] for b in _train(src, steps, batch=batch,
                                                   use_blur=False)])
  epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_huge_start_step_reads_nothing_before_it(digits_source):
  """Resuming at step 10^12 (epoch ~3·10^11) costs no more than step 0."""
  src = _train_source('digits', None, None, digits_source)
  step = 10 ** 12
  batches = _train(src, 2, start_step=step)
  _assert_same_batches(_train(src, 1, start_step=step + 1), batches[1:])
  epoch_start = -(-step * 5 // 40) * 40  # first epoch starting after step
  assert epoch_start - step * 5 < 10  # this epoch boundary is within reach
  ids = np.concatenate([b['id'] for b in batches])
  assert ids.min() >= 0 and ids.max() < 40


def test_global_batch_independent_of_pipelines_and_replicas(digits_source):
  """Per step, the replicas' batches in replica order (pipeline by
  pipeline) are the one-pipeline global batch, examples and views: for 2
  pipelines x 1 replica, 1 pipeline x 2 replicas, 2 pipelines x 2 replicas."""
  src = _train_source('digits', None, None, digits_source)
  steps, batch = 7, 8  # crosses the epoch boundary (5 steps)
  whole = _train(src, steps, batch=batch)
  for pipelines, replicas in ((2, 2), (1, 2), (2, 4)):  # (P, R)
    local = replicas // pipelines
    parts = [_train(src, steps * local, batch=batch,
                    context=_context(pipelines, p, replicas))
             for p in range(pipelines)]
    for t in range(steps):
      rows = [parts[p][t * local + r] for p in range(pipelines)
              for r in range(local)]
      assert all(len(r['id']) == batch // replicas for r in rows)
      joined = {key: np.concatenate([r[key] for r in rows])
                for key in ('id', 'label', 'image')}
      _assert_same_batches([joined], [whole[t]])


def test_two_replica_strategy_gets_the_global_batch(digits_source):
  """Through MirroredStrategy (1 pipeline, 2 local replicas), replica r
  gets rows [r·b, (r+1)·b) of the global batch."""
  src = _train_source('digits', None, None, digits_source)
  strategy = two_replica_strategy()
  fn = data.build_input_fn(src, 'train', 8, is_training=True, image_size=16,
                           seed=3, start_step=4)
  whole = list(fn(None).take(3).as_numpy_iterator())
  dist = iter(strategy.distribute_datasets_from_function(fn))
  for t in range(3):
    batch = next(dist)
    for key in ('id', 'image'):
      local = [v.numpy() for v in
               strategy.experimental_local_results(batch[key])]
      np.testing.assert_array_equal(np.concatenate(local), whole[t][key])


def _views_by_epoch(batches, n):
  """{(epoch, id): [B-row image]} of a stream starting at step 0."""
  out = {}
  stream = [(i, image) for b in batches for i, image in zip(b['id'],
                                                            b['image'])]
  for position, (i, image) in enumerate(stream):
    out[(position // n, int(i))] = image
  return out


def test_views_keyed_by_epoch_id_and_view(digits_source):
  """An example's views in epoch e are the same whatever the batch size (so
  however it is reached), differ between epochs and between views."""
  src = _train_source('digits', None, None, digits_source)
  by_5 = _views_by_epoch(_train(src, 16, batch=5), 40)  # epochs 0, 1
  by_4 = _views_by_epoch(_train(src, 10, batch=4), 40)  # epoch 0
  assert len(by_5) == 80 and len(by_4) == 40
  for (epoch, i), image in by_4.items():
    np.testing.assert_array_equal(by_5[(epoch, i)], image)
  for i in range(40):
    first, second = by_5[(0, i)], by_5[(1, i)]
    assert np.abs(first - second).max() > 1e-3
    assert np.abs(first[..., :3] - first[..., 3:]).max() > 1e-3


def test_finetune_views_are_keyed_too(folder):
  src = data.get_data_source(folder, eval_split='test')
  straight = _train(src, 6, batch=7, train_mode='finetune')
  assert straight[0]['image'].shape == (7, 16, 16, 3)
  _assert_same_batches(_train(src, 2, batch=7, start_step=4,
                              train_mode='finetune'), straight[4:])
  # One crop + flip view: it differs between epochs (step 0 vs 5 hold
  # epochs 0 and 1 at most 35 positions apart).
  views = _views_by_epoch(straight, 30)
  assert all(np.abs(views[(0, i)] - views[(1, i)]).max() > 1e-3
             for i in range(12) if (1, i) in views)


def test_tfds_pipelines_read_their_own_files(tfds_dir, digits_source):
  """TFDS: 2 pipelines read files {0, 2} (16 records) and {1} (7); each
  pipeline's stream covers its ids once per epoch, resumes exactly, and
  decodes the images `load` gives for the same ids."""
  src = _train_source('tfds', None, tfds_dir, digits_source)
  owned = [set(range(0, 8)) | set(range(15, 23)), set(range(8, 15))]
  for p in range(2):
    ctx = _context(2, p, 2)
    n = len(owned[p])
    batches = _train(src, 2 * n, batch=4, context=ctx, use_blur=False)
    stream = np.concatenate([b['id'] for b in batches])  # 2 rows a step
    for e in range(4):  # epochs of n ids, ~n/2 steps each
      assert set(stream[e * n:(e + 1) * n]) == owned[p]
      assert len(stream[e * n:(e + 1) * n]) == n
    _assert_same_batches(
        _train(src, 2 * n - 11, batch=4, context=ctx, use_blur=False,
               start_step=11), batches[11:])
  # Records decode to the images of `load`: eval-view those ids.
  full = _collect(src.load('train'))
  fn = data.build_input_fn(src, 'train', 23, is_training=True, image_size=8,
                           seed=0, train_mode='finetune')
  (batch,) = list(fn().take(1).as_numpy_iterator())
  labels = np.array([full[int(i)][1] for i in batch['id']])
  np.testing.assert_array_equal(batch['label'], labels)
  # A crop of a constant channel stays constant: the red value k written
  # into the fixture image of that id.
  for i, image in zip(batch['id'], batch['image']):
    red = np.unique(full[int(i)][0][..., 0])
    assert red.size == 1
    np.testing.assert_allclose(image[..., 0], red[0] / 255, atol=1e-5)


@pytest.mark.parametrize('kind', ['digits', 'tfds'])
def test_filtered_source_training(kind, tfds_dir, digits_source):
  """A subset through the generic `_FilteredSource`: random access over
  digits, filtered records over TFDS; ids dense, every kept example once
  per epoch, labels of the kept originals, exact resume."""
  if kind == 'digits':
    base = digits_source
  else:
    base = _train_source('tfds', None, tfds_dir, digits_source)
  kept = np.array([1, 4, 5, 9, 12, 16, 20, 22])
  src = data._FilteredSource(base, 'train', kept)  # pylint: disable=protected-access
  assert src.supports_random_access == (kind == 'digits')
  batches = _train(src, 8, batch=3)
  stream = np.concatenate([b['id'] for b in batches])
  for e in range(3):
    np.testing.assert_array_equal(np.sort(stream[e * 8:(e + 1) * 8]),
                                  np.arange(8))
  base_labels = base.example_labels('train')
  for b in batches:
    np.testing.assert_array_equal(b['label'], base_labels[kept[b['id']]])
  _assert_same_batches(_train(src, 3, batch=3, start_step=5), batches[5:])
  # Unaugmented reads: new id j is the original example kept[j].
  full = _collect(base.load('train'))
  for j, (image, label) in _collect(src.load('train')).items():
    np.testing.assert_array_equal(image, full[int(kept[j])][0])
    assert label == full[int(kept[j])][1]


# ------------------------------------------- pod hosts: memory, preview, blur


def test_tfds_window_holds_serialized_records(tfds_dir, digits_source):
  """The TFDS shuffle window holds encoded records (strings), never decoded
  images: `_record_stream` yields {'epoch', 'id', 'serialized'}, and each
  window's records decode to the images of their ids."""
  src = _train_source('tfds', None, tfds_dir, digits_source)
  order_key = tf.constant([0, 0], tf.int64)
  ds = data._record_stream(src, 'train', order_key, None, 5, 0, 23)  # pylint: disable=protected-access
  assert set(ds.element_spec) == {'epoch', 'id', 'serialized'}
  assert ds.element_spec['serialized'] == tf.TensorSpec([], tf.string)
  full = _collect(src.load('train'))
  records = list(ds.take(23).as_numpy_iterator())
  assert sorted(r['id'] for r in records) == list(range(23))
  for r in records:
    decoded = src.decode_record(tf.constant(r['serialized']))
    np.testing.assert_array_equal(decoded['image'].numpy(),
                                  full[int(r['id'])][0])


def _first_epoch_views(source, image_size, **kwargs):
  """{id: training views} of epoch 0 (the first N stream positions)."""
  n = source.num_examples('train')
  fn = data.build_input_fn(source, 'train', 5, is_training=True,
                           image_size=image_size, seed=3, **kwargs)
  batches = list(fn().take(-(-n // 5)).as_numpy_iterator())
  return {i: views for (epoch, i), views in
          _views_by_epoch(batches, n).items() if epoch == 0}


@pytest.mark.parametrize('kind', ['digits', 'tfds'])
def test_preview_shows_the_training_views_of_its_examples(
    kind, tfds_dir, digits_source):
  """preview_batch: examples spread over the split (random access: ids
  k·N // 6; TFDS: the first records in file order) with exactly the views
  epoch 0 of training gives them; with blur_on_device blurred as on the
  device, the host path's views to float rounding."""
  src = _train_source(kind, None, tfds_dir, digits_source)
  size = 32 if kind == 'digits' else 16  # blur kernel 3 at 32 px
  training = _first_epoch_views(src, size)
  preview = data.preview_batch(src, 'train', 6, size, seed=3)
  n = src.num_examples('train')
  np.testing.assert_array_equal(
      preview['id'], np.arange(6) * n // 6 if kind == 'digits' else
      np.arange(6))
  assert set(preview) == {'image', 'label', 'id'}
  for i, views in zip(preview['id'].numpy(), preview['image'].numpy()):
    np.testing.assert_array_equal(views, training[i])
  on_device = data.preview_batch(src, 'train', 6, size, seed=3,
                                 blur_on_device=True)
  assert set(on_device) == {'image', 'label', 'id'}  # finished
  np.testing.assert_allclose(on_device['image'].numpy(),
                             preview['image'].numpy(), atol=1e-6, rtol=0)


class _RecordFileSource(data.DataSource):
  """A sequential (TFDS-like) source: one TFRecord file of PNG records,
  record r = example id r."""

  name = 'records'
  num_classes = 2
  image_shape = (8, 8, 3)

  def __init__(self, path, num_records):
    self._path, self._num_records = path, num_records

  @property
  def splits(self):
    return ['train']

  def num_examples(self, split):
    return self._num_records

  def record_files(self, split):
    return [self._path], [np.arange(self._num_records)]

  def decode_record(self, serialized):
    parsed = tf.io.parse_single_example(serialized, {
        'png': tf.io.FixedLenFeature([], tf.string),
        'label': tf.io.FixedLenFeature([], tf.int64)})
    image = tf.io.decode_png(parsed['png'], channels=3)
    image.set_shape([8, 8, 3])
    return {'image': image, 'label': tf.cast(parsed['label'], tf.int32)}


def _record_file_with_a_corrupt_record(path, num_records, corrupt):
  """TFRecord file of `num_records` examples whose record `corrupt` fails
  its CRC check when read (a flipped payload byte)."""
  with tf.io.TFRecordWriter(path) as writer:
    for k in range(num_records):
      png = tf.io.encode_png(np.full((8, 8, 3), k, np.uint8)).numpy()
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          'png': tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
          'label': tf.train.Feature(int64_list=tf.train.Int64List(
              value=[k % 2]))})).SerializeToString())
  raw = bytearray(open(path, 'rb').read())
  pos = 0
  for _ in range(corrupt):  # record: length (8), crc (4), data, crc (4)
    pos += 16 + int.from_bytes(raw[pos:pos + 8], 'little')
  raw[pos + 12] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(bytes(raw))


def test_preview_reads_only_the_first_records(tmp_path):
  """The preview of a sequential source reads its first records only: a
  corrupt record 20 of 40 stops the training input (which fills its
  40-record shuffle window first) but not an 8-image preview."""
  path = str(tmp_path / 'train.tfrecord')
  _record_file_with_a_corrupt_record(path, 40, corrupt=20)
  src = _RecordFileSource(path, 40)
  fn = data.build_input_fn(src, 'train', 4, is_training=True, image_size=8,
                           seed=0)
  with pytest.raises(tf.errors.DataLossError):
    next(iter(fn()))
  preview = data.preview_batch(src, 'train', 8, 8, seed=0)
  np.testing.assert_array_equal(preview['id'], np.arange(8))
  assert preview['image'].shape == (8, 8, 8, 6)


def test_blur_on_device_batches_carry_the_blur_draws(digits_source):
  """blur_on_device: the batch holds 'blur_sigma' [b, V] (0 = not blurred)
  and unblurred views; finishing them gives the host-blurred batch. No
  'blur_sigma' when the flag is off, without use_blur, or fine-tuning."""
  src = _train_source('digits', None, None, digits_source)

  def batches(**kwargs):
    ds = data.build_input_fn(src, 'train', 8, is_training=True,
                             image_size=32, seed=1, **kwargs)()
    return ds, list(ds.take(2).as_numpy_iterator())

  _, host = batches()
  ds, device = batches(blur_on_device=True)
  assert ds.element_spec['blur_sigma'] == tf.TensorSpec([8, 2], tf.float32)
  sigmas = np.concatenate([b['blur_sigma'] for b in device])
  assert 0 < (sigmas > 0).sum() < sigmas.size
  for h, d in zip(host, device):
    np.testing.assert_array_equal(d['id'], h['id'])
    finished = data_util.finish_views(d)
    np.testing.assert_allclose(finished['image'].numpy(), h['image'],
                               atol=1e-6, rtol=0)
  assert 'blur_sigma' not in host[0]
  for kwargs in (dict(use_blur=False), dict(train_mode='finetune')):
    fn = data.build_input_fn(src, 'train', 8, is_training=True,
                             image_size=32, seed=1, blur_on_device=True,
                             **kwargs)
    assert 'blur_sigma' not in fn().element_spec, kwargs


def test_clean_view_is_the_eval_view_of_each_example(digits_source):
  """clean_view (--linear_head_input=clean): each row's 'clean_image' is
  the eval preprocessing of that example's image (no augmentation), and
  the augmented views are the same as without it."""
  images, _ = digits_source.arrays('train')
  for size in (16, 40):  # 40: above 32 px the eval view is a centre crop
    def batches(**kwargs):
      fn = data.build_input_fn(digits_source, 'train', 6, is_training=True,
                               image_size=size, seed=3, **kwargs)
      return list(fn().take(2).as_numpy_iterator())
    plain, clean = batches(), batches(clean_view=True)
    assert 'clean_image' not in plain[0]
    for p, c in zip(plain, clean):
      np.testing.assert_array_equal(c['image'], p['image'])
      assert c['clean_image'].shape == (6, size, size, 3)
      for row, i in enumerate(c['id']):
        expected = data.eval_view(tf.constant(images[i]), size).numpy()
        np.testing.assert_array_equal(c['clean_image'][row], expected)
        assert np.abs(c['image'][row, ..., :3] - expected).max() > 1e-2


def test_train_options_land_on_the_dataset(digits_source):
  """input_threads / input_ram_budget_gb become the training dataset's
  tf.data options; 0 leaves TF's defaults."""
  def options(**kwargs):
    return data.build_input_fn(digits_source, 'train', 8, is_training=True,
                               image_size=16, seed=0, **kwargs)().options()
  default = options()
  assert default.threading.private_threadpool_size in (None, 0)
  assert default.autotune.ram_budget in (None, 0)
  given = options(input_threads=6, input_ram_budget_gb=1.5)
  assert given.threading.private_threadpool_size == 6
  assert given.autotune.ram_budget == int(1.5 * 2**30)
  for o in (default, given):
    assert o.threading.max_intra_op_parallelism == 1


# ---------------------------------------------------------------- errors


def test_error_unknown_dataset():
  with pytest.raises(ValueError) as e:
    data.get_data_source('no_such_dataset_xyz')
  msg = str(e.value)
  assert 'no_such_dataset_xyz' in msg and 'digits' in msg
  assert 'image folder' in msg


def test_error_missing_path(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(ValueError, match='does not exist'):
    data.get_data_source(missing)
  with pytest.raises(ValueError, match='does not exist'):
    data.get_data_source('./surely_not_here_dir')


def test_error_missing_split_lists_available(folder):
  with pytest.raises(ValueError) as e:
    data.get_data_source(folder)  # default eval_split='validation'
  msg = str(e.value)
  assert "'validation'" in msg and "'test'" in msg and "'train'" in msg
  with pytest.raises(ValueError, match='available splits'):
    data.get_data_source('digits', eval_split='holdout')


def test_error_empty_split_and_unknown_class(tmp_path):
  root = str(tmp_path)
  _make_folder(root, {'train': 2}, classes=('a', 'b'))
  os.makedirs(os.path.join(root, 'empty', 'a'))
  with pytest.raises(ValueError, match='no images'):
    data.get_data_source(root, eval_split='empty')
  _make_folder(root, {'other': 1}, classes=('a', 'zebra'))
  with pytest.raises(ValueError, match="'zebra'"):
    data.get_data_source(root, eval_split='other')


def test_error_tfds_not_prepared(tmp_path):
  for name in ('cifar10', 'data_test_tiny_images'):
    with pytest.raises(ValueError) as e:
      data.get_data_source(name, data_dir=str(tmp_path), eval_split='test')
    msg = str(e.value)
    assert name in msg and str(tmp_path) in msg
    assert f'tfds build {name}' in msg and 'not prepared' in msg


def test_error_tfds_unknown_split(tfds_dir):
  with pytest.raises(ValueError) as e:
    data.get_data_source('data_test_tiny_images', data_dir=tfds_dir,
                         eval_split='validation')
  assert "'validation'" in str(e.value) and "'test'" in str(e.value)


# ---------------------------------------------------------------- corrupt


def test_corrupt_files(tmp_path):
  root = _make_folder(str(tmp_path), {'train': 3}, classes=('a', 'b'))
  garbage = os.path.join(root, 'train', 'a', 'img_01b.jpg')
  with open(garbage, 'wb') as f:
    f.write(b'this is not a jpeg' * 20)
  good = os.path.join(root, 'train', 'b', 'img_00.jpg')
  truncated = os.path.join(root, 'train', 'b', 'img_00t.jpg')
  with open(good, 'rb') as f:
    payload = f.read()
  with open(truncated, 'wb') as f:
    f.write(payload[:len(payload) // 2])

  src = data.get_data_source(root, eval_split=None)
  assert src.num_examples('train') == 8
  assert sorted(src.find_unreadable('train')) == sorted([garbage, truncated])
  with pytest.raises(tf.errors.InvalidArgumentError):
    list(src.load('train').as_numpy_iterator())

  clean = data.get_data_source(root, eval_split=None, skip_corrupt_images=True)
  assert clean.num_examples('train') == 6
  paths, _ = clean.files('train')
  assert garbage not in paths and truncated not in paths
  got = _collect(clean.load('train'))
  assert sorted(got) == list(range(6))
  assert data.get_data_source('digits').find_unreadable('train') == []


# ---------------------------------------------------------------- real data


def test_real_cifar_jpeg_folder(tmp_path):
  """A few files of the shared CIFAR-10 JPEG archive as a folder source."""
  import tarfile
  if not os.path.exists(SHARED_CIFAR):
    pytest.skip('shared CIFAR-10 JPEG archive not available')
  per_class = {}
  with tarfile.open(SHARED_CIFAR, 'r:gz') as tar:
    for member in tar:  # The archive starts with train/<class>/ folders.
      parts = member.name.lstrip('./').split('/')
      if not member.isfile() or len(parts) != 3 or parts[0] != 'train':
        continue
      if parts[1] not in per_class and len(per_class) == 2:
        break
      names = per_class.setdefault(parts[1], [])
      if len(names) < 3:
        member.name = '/'.join(parts)
        tar.extract(member, str(tmp_path), filter='data')
        names.append(parts[2])
  classes = sorted(per_class)
  if len(classes) < 2 or any(len(per_class[c]) < 3 for c in classes):
    pytest.skip('unexpected archive layout')
  src = data.get_data_source(str(tmp_path), eval_split=None)
  assert src.classes == classes and src.num_examples('train') == 6
  paths, labels = src.files('train')
  expected = [os.path.join(str(tmp_path), 'train', c, n)
              for c in classes for n in sorted(per_class[c])]
  assert paths == expected and labels == [0, 0, 0, 1, 1, 1]
  got = _collect(src.load('train'))
  assert sorted(got) == list(range(6))
  assert all(v[0].shape == (32, 32, 3) for v in got.values())
  assert all(v[0].std() > 0 for v in got.values())  # real photos
