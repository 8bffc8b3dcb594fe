"""Tests for imagenet_subsets/ (make / validate label subsets) and for the
subset filtering of data.py that `--train_subset` uses."""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import config as config_lib
import data
import experiment as experiment_lib
from imagenet_subsets import subsets



class SubsetTestNamedImages(tfds.core.GeneratorBasedBuilder):
  """A tiny local TFDS dataset with ImageNet's 'file_name' feature."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(4, 4, 3)),
            'label': tfds.features.ClassLabel(num_classes=3),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(20)}

  def _generate_examples(self, n):
    for k in range(n):
      image = np.full((4, 4, 3), k, np.uint8)
      yield k, {'image': image, 'label': k % 3,
                'file_name': f'n{k % 3:08d}_{k}.JPEG'}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  SubsetTestNamedImages(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=2))
  return data_dir


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """train/<class>/<i>.png with 3 classes of 5, 7 and 9 images."""
  root = tmp_path_factory.mktemp('images')
  for c, count in enumerate((5, 7, 9)):
    (root / 'train' / f'class{c}').mkdir(parents=True)
    for i in range(count):
      image = np.full((4, 4, 3), 10 * c + i, np.uint8)
      tf.io.write_file(str(root / 'train' / f'class{c}' / f'c{c}_{i}.png'),
                       tf.io.encode_png(image))
  return str(root)


def loaded(source, split):
  """{id: (label, first pixel)} of a whole split."""
  return {int(e['id']): (int(e['label']), int(e['image'][0, 0, 0]))
          for e in source.load(split).as_numpy_iterator()}


# ---------------------------------------------------------------- selection


def test_quotas_are_class_balanced_and_floor_the_total():
  labels = np.repeat(np.arange(4), [100, 250, 33, 617])  # N = 1000
  quota = subsets.class_quotas(labels, 10)
  assert sum(quota.values()) == 100
  for c, n in zip(range(4), (100, 250, 33, 617)):
    assert np.floor(n / 10) <= quota[c] <= np.floor(n / 10) + 1
  # ImageNet-like totals: ⌊1 % of 1,281,167⌋ = 12,811 as in SimCLR's list.
  imagenet = np.repeat(np.arange(1000), 1281)[:1281167 - 167]
  imagenet = np.concatenate([imagenet, np.arange(167)])
  assert sum(subsets.class_quotas(imagenet, 1).values()) == 12811
  # Every class keeps at least one example.
  assert min(subsets.class_quotas(labels, 0.1).values()) == 1


def test_selection_is_deterministic_balanced_and_order_free():
  keys = [f'img_{i}.jpg' for i in range(600)]
  labels = np.arange(600) % 6
  first = subsets.select_balanced(keys, labels, 5, seed=0)
  assert np.array_equal(first, subsets.select_balanced(keys, labels, 5, 0))
  assert len(first) == 30
  assert collections.Counter(labels[first]) == {c: 5 for c in range(6)}
  other = subsets.select_balanced(keys, labels, 5, seed=1)
  assert not np.array_equal(first, other)
  # The same keys are chosen whatever order the examples are listed in.
  perm = np.random.default_rng(0).permutation(600)
  shuffled = subsets.select_balanced([keys[i] for i in perm], labels[perm], 5)
  assert ({keys[perm[i]] for i in shuffled} ==
          {keys[i] for i in first})


# ---------------------------------------------------------- make / validate


def test_make_and_validate_on_digits(tmp_path):
  source = data.get_data_source('digits')
  keys = subsets.make_subset(source, 'train', 10, seed=3)
  labels = source.example_labels('train')
  counts = np.bincount(labels[[int(k) for k in keys]], minlength=10)
  totals = np.bincount(labels, minlength=10)
  assert len(keys) == 143  # ⌊1437 / 10⌋
  assert np.all(counts >= np.floor(totals / 10))
  assert np.all(counts <= np.floor(totals / 10) + 1)
  path = str(tmp_path / 'digits_10.txt')
  subsets.write_key_list(path, keys)
  assert data.read_key_list(path) == keys
  report = subsets.validate_subset(source, 'train', keys, expect_count=143)
  assert report['num_keys'] == 143 and report['classes_present'] == 10
  with pytest.raises(ValueError, match='expected 12811'):
    subsets.validate_subset(source, 'train', keys, expect_count=12811)


def test_validator_rejects_unknown_and_repeated_keys(folder):
  source = data.get_data_source(folder, eval_split=None)
  with pytest.raises(ValueError, match=r"1 of the 2 keys .*nope\.png"):
    subsets.validate_subset(source, 'train', ['class0/c0_1.png', 'nope.png'])
  with pytest.raises(ValueError, match='more than once'):
    subsets.validate_subset(source, 'train',
                            ['class1/c1_0.png', 'class1/c1_0.png'])


def test_command_line_make_then_validate(folder, tmp_path, capsys):
  out = str(tmp_path / 'half.txt')
  subsets.main(['make', f'--dataset={folder}', '--percent=50',
                f'--output={out}'])
  keys = data.read_key_list(out)
  # ⌊21 / 2⌋ = 10: floors 2 + 3 + 4, the one extra to class 0 (equal
  # remainders: the smallest class index).
  assert len(keys) == 10
  assert collections.Counter(k.split('/')[0] for k in keys) == {
      'class0': 3, 'class1': 3, 'class2': 4}
  report = subsets.main(['validate', f'--dataset={folder}', f'--list={out}',
                         '--expect_count=10'])
  assert report['per_class_min'] == 3 and report['per_class_max'] == 4
  assert 'is valid' in capsys.readouterr().out
  bad = tmp_path / 'bad.txt'
  bad.write_text('class0/c0_0.png\nclass9/missing.png\n')
  with pytest.raises(SystemExit, match='missing.png'):
    subsets.main(['validate', f'--dataset={folder}', f'--list={bad}'])


# -------------------------------------------------------- data.py filtering


def test_folder_subset_is_dense_and_reads_the_listed_files(folder):
  source = data.get_data_source(folder, eval_split=None)
  keys = ['class2/c2_8.png', 'class0/c0_3.png', 'class1/c1_0.png']
  sub = data.apply_subset(source, 'train', keys)
  assert sub.num_examples('train') == 3
  assert sub.example_keys('train') == sorted(keys)  # original id order
  assert loaded(sub, 'train') == {0: (0, 3), 1: (1, 10), 2: (2, 28)}
  assert source.num_examples('train') == 21  # the original is untouched
  # Bare file names (SimCLR's ImageNet lists) match unique file names.
  named = data.apply_subset(source, 'train', ['c1_0.png', 'c0_3.png'])
  assert named.example_keys('train') == ['class0/c0_3.png', 'class1/c1_0.png']


def test_tfds_keys_are_file_names_and_subset_filters(tfds_dir):
  source = data.get_data_source('subset_test_named_images',
                                data_dir=tfds_dir, eval_split=None)
  keys = source.example_keys('train')
  labels = source.example_labels('train')
  by_id = loaded(source, 'train')
  assert len(keys) == 20
  for i, key in enumerate(keys):
    k = by_id[i][1]  # the generator's index, written into the pixels
    assert key == f'n{k % 3:08d}_{k}.JPEG' and labels[i] == k % 3
  chosen = [keys[5], keys[17], keys[2]]
  sub = data.apply_subset(source, 'train', chosen)
  assert sub.num_examples('train') == 3
  got = loaded(sub, 'train')
  assert sorted(got) == [0, 1, 2]
  assert [got[i] for i in range(3)] == [by_id[i] for i in (2, 5, 17)]
  assert sub.example_keys('train') == [keys[2], keys[5], keys[17]]


def test_tfds_without_a_file_name_feature_uses_tfds_ids(tfds_dir):
  source = data.get_data_source('subset_test_named_images',
                                data_dir=tfds_dir, eval_split=None)
  source._key_feature = lambda: None  # pylint: disable=protected-access
  keys = source.example_keys('train')
  builder = tfds.builder('subset_test_named_images', data_dir=tfds_dir)
  read = builder.as_dataset(split='train', read_config=tfds.ReadConfig(
      add_tfds_id=True))
  offsets = source._shard_offsets('train')  # pylint: disable=protected-access
  for example in read.as_numpy_iterator():
    tfds_id = example['tfds_id'].decode()
    assert keys[data._tfds_id_to_index(tfds_id, offsets)] == tfds_id  # pylint: disable=protected-access


def test_run_train_subset_sets_the_number_of_examples(tmp_path):
  keys = subsets.make_subset(data.get_data_source('digits'), 'train', 20)
  path = tmp_path / 'subset.txt'
  subsets.write_key_list(str(path), keys)
  cfg = config_lib.from_argv([
      '--dataset=digits', f'--model_dir={tmp_path / "m"}',
      f'--train_subset={path}', '--train_batch_size=32', '--image_size=16',
      '--resnet_depth=18', '--width_multiplier=0.125', '--mode=train'])
  experiment = experiment_lib.Experiment(cfg, tf.distribute.get_strategy())
  assert experiment.data.num_train_examples == len(keys) == 287
  batch = next(iter(experiment.train_input_fn(32)(None)))
  assert int(tf.reduce_max(batch['id'])) < 287
  with pytest.raises(config_lib.ConfigError,
                     match='absent.txt: no such file'):
    config_lib.from_argv(['--dataset=digits', f'--model_dir={tmp_path / "m"}',
                          f'--train_subset={tmp_path / "absent.txt"}'])
