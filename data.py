"""Datasets, dense example ids and multi-view training batches.

Three kinds of data source (see `get_data_source`):

* ``'digits'`` - the embedded default, needs no download: scikit-learn's
  8x8 digits scaled to uint8, bilinearly upscaled to 32x32 and replicated to
  RGB, with a fixed stratified 80/20 split into ``'train'`` (1437) and
  ``'test'`` (360). ``'validation'`` is accepted as an alias of ``'test'`` so
  that SimCLR's default ``eval_split=validation`` works.
* a path to an image folder laid out ``<dir>/<split>/<class>/*.jpg``.
* any other string: a prepared TensorFlow Datasets name (never downloaded at
  run time).

Every source yields ``{'image': uint8 HxWx3, 'label': int32, 'id': int32}``
where ``id`` is the example's dense index in ``[0, N)`` for its split,
stable across runs, epochs, shuffling and hosts (SPEC §6): for digits the
position in the fixed split, for folders the position in the sorted
(class, filename) list, for TFDS ``offset[shard] + record`` decoded from the
``tfds_id`` that ``tfds.ReadConfig(add_tfds_id=True)`` attaches (no rebuild).

`apply_subset` restricts a split to the examples named in a key list
(`--train_subset`; keys: see `DataSource.example_keys`); the kept examples
are re-indexed densely in ascending order of their original ids.

`build_input_fn` turns a source into SimCLR-style batches whose image holds
the V views concatenated on the channel axis (view v = channels 3v..3v+2);
its `input_fn(input_context)` goes to a strategy's
`distribute_datasets_from_function` (one pipeline per host, sharded through
the `InputContext`). Its training input is a pure function of (seed, step),
so a run resumes at any step with no replayed or skipped example: digits
and folders are read by index (`DataSource.read_example`) from a stateless
per-epoch permutation, TFDS from its record files (`record_files`).
No buffer of decoded images is held: random access shuffles ids, TFDS
shuffles windows of serialized records (host memory ≈ window × the mean
encoded record size) and decodes after the window. `train_view_fn` makes
the views of one example for both the training input and `preview_batch`,
which reads only the few examples it shows. `eval_view` is the
eval preprocessing, shared with the padded feature passes of features.py.
"""
import copy
import logging
import os
import re

import numpy as np
import tensorflow as tf

import data_util

DIGITS = 'digits'
DIGITS_IMAGE_SIZE = 32
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
_AUTOTUNE = tf.data.AUTOTUNE
_KINDS_HELP = (
    "Use dataset='digits' (embedded, no download), a path to an image folder "
    "laid out <dir>/<split>/<class>/*.jpg, or the name of a prepared TFDS "
    "dataset such as 'cifar10' or 'imagenet2012_subset/1pct'.")


def _load_by_index(source, split, input_context, shuffle_files, seed):
  """`DataSource.load` of a random-access source: the ids this input
  pipeline owns (round robin), optionally shuffled, read by index."""
  num_examples = source.num_examples(split)
  ds = tf.data.Dataset.range(num_examples)
  if input_context is not None and input_context.num_input_pipelines > 1:
    ds = ds.shard(input_context.num_input_pipelines,
                  input_context.input_pipeline_id)
  if shuffle_files:
    ds = ds.shuffle(num_examples, seed=seed, reshuffle_each_iteration=True)
  return ds.map(lambda i: source.read_example(split, i),
                num_parallel_calls=_AUTOTUNE)


class DataSource:
  """A labelled image dataset with dense per-split example ids.

  Attributes: `name`, `num_classes`, `image_shape` (native (H, W, 3), or
  None when images vary in size), `splits` (available split names).
  """

  name = None
  num_classes = None
  image_shape = None

  @property
  def splits(self):
    raise NotImplementedError

  @property
  def supports_random_access(self):
    """Whether `read_example` works (digits, folders); else the training
    input reads `record_files` in sequence (TFDS)."""
    return False

  def read_example(self, split, index):
    """Example `index` (scalar int tensor, the dense id) of `split` as
    {'image', 'label', 'id'}, built from tensor ops so that it runs inside
    a tf.data map. Random-access sources only."""
    raise NotImplementedError(f'{type(self).__name__} has no random access.')

  def record_files(self, split):
    """(paths, ids) of a sequential source: its TFRecord files of `split` in
    file order and, per file, an int array with the dense id of each record
    (-1: not an example of the split). TFDS only."""
    raise NotImplementedError(f'{type(self).__name__} has no record files.')

  def decode_record(self, serialized):
    """{'image': uint8 HxWx3, 'label': int32} of one record of
    `record_files` (tensor ops, for a tf.data map)."""
    raise NotImplementedError(f'{type(self).__name__} has no record files.')

  def num_examples(self, split):
    """Number of examples N of `split`; ids are 0..N-1."""
    raise NotImplementedError

  def load(self, split, input_context=None, shuffle_files=False, seed=None,
           shard_by_example=False):
    """tf.data.Dataset of {'image': uint8 HxWx3, 'label': int32, 'id': int32}.

    With an `input_context`, only this input pipeline's share of the split
    is returned (disjoint across pipelines, union = the whole split). Shares
    are by example for digits and folders; for TFDS by file unless
    `shard_by_example` (then N/P ± 1 examples each, as one-pass evaluation
    needs: every pipeline must fit the same number of padded batches).
    `shuffle_files` shuffles the reading order (seeded by `seed`, reshuffled
    every iteration); ids are unaffected.
    """
    raise NotImplementedError

  def find_unreadable(self, split):
    """Paths of the files of `split` that cannot be decoded (folders only)."""
    del split
    return []

  def example_keys(self, split):
    """The key of every example of `split`, in id order (key[id]).

    Keys name examples in subset lists (`--train_subset`, imagenet_subsets/):
    digits: the id as a decimal string; image folders: the path relative to
    the split directory ('<class>/<file>'); TFDS: the dataset's file-name
    feature if it has one (ImageNet's 'file_name'), else the tfds_id.
    """
    raise NotImplementedError

  def example_labels(self, split):
    """int32 [N] labels of `split` in id order."""
    raise NotImplementedError

  def subset(self, split, ids):
    """This source with `split` restricted to the examples `ids`.

    The kept examples are re-indexed densely, 0..len(ids)-1, in ascending
    order of their original ids (so the new ids are stable too). Generic
    version: filter the loaded examples; folders and digits override it to
    skip the others without reading them.
    """
    return _FilteredSource(self, split, ids)

  def _check_split(self, split):
    if split not in self.splits:
      raise ValueError(
          f'Split {split!r} not found in dataset {self.name!r}; available '
          f'splits: {sorted(self.splits)}.')

  def __repr__(self):
    return (f'{type(self).__name__}(name={self.name!r}, '
            f'num_classes={self.num_classes}, splits={sorted(self.splits)})')


class DigitsSource(DataSource):
  """scikit-learn's digits as 32x32 RGB uint8 images (embedded default).

  Pixels 0..16 are scaled to round(v * 255 / 16), upscaled 8 -> 32 with
  bilinear interpolation (fixed, no antialiasing) and copied to 3 channels.
  Split: `train_test_split(test_size=0.2, random_state=0, stratify=y)`;
  within a split examples keep the original scikit-learn order, so the id is
  the rank of the original index among the split's indices.
  """

  SPLIT_ALIASES = {'validation': 'test'}

  def __init__(self, image_size=DIGITS_IMAGE_SIZE):
    from sklearn import datasets as sk_datasets
    from sklearn import model_selection
    digits = sk_datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.float32)
    big = tf.image.resize(images[..., None], [image_size, image_size],
                          method='bilinear', antialias=False).numpy()
    big = np.clip(np.round(big), 0, 255).astype(np.uint8)
    big = np.repeat(big, 3, axis=-1)
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = model_selection.train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0,
        stratify=labels)
    self._data = {}
    for split, idx in (('train', np.sort(train_idx)),
                       ('test', np.sort(test_idx))):
      self._data[split] = (big[idx], labels[idx])
    self.name = DIGITS
    self.num_classes = 10
    self.image_shape = (image_size, image_size, 3)

  @property
  def splits(self):
    return ['train', 'test', 'validation']

  def _resolve(self, split):
    self._check_split(split)
    return self.SPLIT_ALIASES.get(split, split)

  def num_examples(self, split):
    return len(self._data[self._resolve(split)][1])

  def arrays(self, split):
    """(images uint8 [N, H, W, 3], labels int32 [N]) in id order."""
    return self._data[self._resolve(split)]

  def example_keys(self, split):
    return [str(i) for i in range(self.num_examples(split))]

  def example_labels(self, split):
    return np.asarray(self.arrays(split)[1], np.int32)

  def subset(self, split, ids):
    ids = _check_subset_ids(ids, self.num_examples(split))
    restricted = copy.copy(self)
    restricted._data = dict(self._data)  # pylint: disable=protected-access
    images, labels = self.arrays(split)
    restricted._data[self._resolve(split)] = (images[ids], labels[ids])  # pylint: disable=protected-access
    return restricted

  @property
  def supports_random_access(self):
    return True

  def read_example(self, split, index):
    images, labels = self.arrays(split)
    return {'image': tf.gather(tf.constant(images), index),
            'label': tf.gather(tf.constant(labels), index),
            'id': tf.cast(index, tf.int32)}

  def load(self, split, input_context=None, shuffle_files=False, seed=None,
           shard_by_example=False):
    del shard_by_example  # shares are always by example here
    return _load_by_index(self, split, input_context, shuffle_files, seed)


def _decode_file(path):
  """uint8 HxWx3 from a JPEG/PNG/BMP/GIF(first frame)/WebP file."""
  image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                             expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _list_images(directory):
  return sorted(
      f for f in os.listdir(directory)
      if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS)
      and os.path.isfile(os.path.join(directory, f)))


def _subdirs(directory):
  return sorted(d for d in os.listdir(directory)
                if not d.startswith('.')
                and os.path.isdir(os.path.join(directory, d)))


class ImageFolderSource(DataSource):
  """Images laid out `<root>/<split>/<class>/<file>`.

  Classes are the sorted sub-directory names of the train split (shared by
  every split); ids follow the sorted (class, filename) order. With
  `skip_corrupt_images`, files that fail to decode are found at construction
  (for the train and eval splits; other splits when first used), logged and
  left out, so ids stay dense over the readable files.
  """

  def __init__(self, root, train_split='train', eval_split='validation',
               skip_corrupt_images=False):
    self.root = root
    self.name = root
    self.skip_corrupt_images = skip_corrupt_images
    self._available = _subdirs(root)
    self._files = {}
    train_dir = self._split_dir(train_split)
    self.classes = _subdirs(train_dir)
    if not self.classes:
      raise ValueError(f'No class sub-directories in {train_dir!r}; expected '
                       f'<dir>/<split>/<class>/*.jpg.')
    self._class_index = {c: i for i, c in enumerate(self.classes)}
    self.num_classes = len(self.classes)
    self.image_shape = None
    for split in dict.fromkeys(s for s in (train_split, eval_split) if s):
      self._split_files(split)

  @property
  def splits(self):
    return list(self._available)

  def _split_dir(self, split):
    if split not in self._available:
      raise ValueError(
          f'Split {split!r} not found in image folder {self.root!r} (no '
          f'directory {os.path.join(self.root, split)!r}); available splits: '
          f'{self._available}.')
    return os.path.join(self.root, split)

  def _list_split(self, split):
    """All (path, label) of a split in id order, unreadable files included."""
    split_dir = self._split_dir(split)
    paths, labels = [], []
    for cls in _subdirs(split_dir):
      if cls not in self._class_index:
        raise ValueError(
            f'Class directory {cls!r} of split {split!r} in {self.root!r} is '
            f'not a class of the training split; known classes: '
            f'{self.classes}.')
      files = _list_images(os.path.join(split_dir, cls))
      paths += [os.path.join(split_dir, cls, f) for f in files]
      labels += [self._class_index[cls]] * len(files)
    if not paths:
      exts = ','.join(IMAGE_EXTENSIONS)
      raise ValueError(
          f'Split {split!r} of image folder {self.root!r} has no images '
          f'(looked for {split_dir}/<class>/*{{{exts}}}).')
    return paths, labels

  def _split_files(self, split):
    """(paths, labels) used for `split`, after the optional corrupt skip."""
    if split not in self._files:
      paths, labels = self._list_split(split)
      if self.skip_corrupt_images:
        bad = set(_unreadable(paths))
        if bad:
          logging.warning(
              'Skipping %d unreadable image(s) of split %r in %s: %s',
              len(bad), split, self.root, sorted(bad))
          kept = [(p, l) for p, l in zip(paths, labels) if p not in bad]
          if not kept:
            raise ValueError(f'Every image of split {split!r} in '
                             f'{self.root!r} is unreadable.')
          paths, labels = map(list, zip(*kept))
      self._files[split] = (paths, labels)
    return self._files[split]

  def files(self, split):
    """(paths, labels) of `split` in id order: paths[id] is example `id`."""
    paths, labels = self._split_files(split)
    return list(paths), list(labels)

  def example_keys(self, split):
    split_dir = self._split_dir(split)
    return [os.path.relpath(p, split_dir).replace(os.sep, '/')
            for p in self._split_files(split)[0]]

  def example_labels(self, split):
    return np.asarray(self._split_files(split)[1], np.int32)

  def subset(self, split, ids):
    ids = _check_subset_ids(ids, self.num_examples(split))
    paths, labels = self._split_files(split)
    restricted = copy.copy(self)
    restricted._files = dict(self._files)  # pylint: disable=protected-access
    restricted._files[split] = ([paths[i] for i in ids],  # pylint: disable=protected-access
                                [labels[i] for i in ids])
    return restricted

  def num_examples(self, split):
    return len(self._split_files(split)[0])

  @property
  def supports_random_access(self):
    return True

  def read_example(self, split, index):
    paths, labels = self._split_files(split)
    return {'image': _decode_file(tf.gather(tf.constant(paths), index)),
            'label': tf.gather(tf.constant(labels, tf.int32), index),
            'id': tf.cast(index, tf.int32)}

  def load(self, split, input_context=None, shuffle_files=False, seed=None,
           shard_by_example=False):
    del shard_by_example  # shares are always by example here
    return _load_by_index(self, split, input_context, shuffle_files, seed)

  def find_unreadable(self, split):
    """Every file of `split` (as listed on disk) that fails to decode."""
    return _unreadable(self._list_split(split)[0])


def _unreadable(paths):
  """Paths that fail to read or decode, via one parallel tf.data pass.

  Each element maps to (index, decoded shape) - the shape keeps the decode
  from being pruned; `ignore_errors` drops failures, and the missing indices
  are the unreadable files.
  """
  if not paths:
    return []
  ds = tf.data.Dataset.from_tensor_slices(
      (tf.range(len(paths), dtype=tf.int64), tf.constant(paths)))
  ds = ds.map(lambda i, p: (i, tf.shape(_decode_file(p))),
              num_parallel_calls=_AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors(log_warning=False).batch(4096)
  ok = np.zeros(len(paths), bool)
  for idx, _ in ds.as_numpy_iterator():
    ok[idx] = True
  return [p for p, good in zip(paths, ok) if not good]


_TFDS_ID_RE = re.compile(r'-(\d+)-of-(\d+)$')
# Per-example file-name features that TFDS datasets use as subset-list keys.
TFDS_KEY_FEATURES = ('file_name', 'filename')


def _tfds_id_to_index(tfds_id, offsets):
  """Dense id of a tfds_id '<file>-SSSSS-of-NNNNN__R': offsets[S] + R."""
  m = re.search(r'-(\d+)-of-\d+__(\d+)$', tfds_id)
  if not m:
    raise ValueError(f'Unexpected tfds_id {tfds_id!r}.')
  return int(offsets[int(m.group(1))]) + int(m.group(2))


def _patch_tfds_for_protobuf():
  """Lets tfds 4.9.9 read dataset_info.json under protobuf >= 7.

  `DatasetInfo.read_from_directory` restores fields the code leaves unset via
  `field.label == LABEL_REPEATED`, and protobuf 7 removed
  `FieldDescriptor.label`, so every prepared dataset fails to load. The
  wrapper copies those non-message fields from the JSON into the proto
  first (what the original loop would do), so the original loop skips them.
  No-op when `label` exists.
  """
  from google.protobuf import descriptor
  from tensorflow_datasets.core import dataset_info
  if hasattr(descriptor.FieldDescriptor, 'label'):
    return
  cls = dataset_info.DatasetInfo
  if getattr(cls.read_from_directory, '_protobuf_compat', False):
    return
  original = cls.read_from_directory

  def read_from_directory(self, dataset_info_dir):
    parsed = dataset_info.read_from_json(
        dataset_info.dataset_info_path(dataset_info_dir))
    proto = self.as_proto
    for name, field in proto.DESCRIPTOR.fields_by_name.items():
      if field.type == field.TYPE_MESSAGE:
        continue  # The original merges messages without touching `label`.
      value, restored = getattr(proto, name), getattr(parsed, name)
      if field.is_repeated:
        if not value and restored:
          value.extend(restored)
        continue
      try:
        defined = proto.HasField(name)
        defined_restored = parsed.HasField(name)
      except ValueError:
        defined, defined_restored = bool(value), bool(restored)
      if not defined and defined_restored:
        setattr(proto, name, restored)
    return original(self, dataset_info_dir)

  read_from_directory._protobuf_compat = True
  cls.read_from_directory = read_from_directory


class TFDSSource(DataSource):
  """A prepared TFDS image-classification dataset (never downloaded here).

  Ids: tfds names every example '<file>-SSSSS-of-NNNNN__R' (shard S, record
  R within the shard, tfds 4.9.9 `reader._make_id`); id = offset[S] + R with
  offset the cumulative `shard_lengths` of the split.
  """

  def __init__(self, name, data_dir=None, train_split='train',
               eval_split='validation'):
    import tensorflow_datasets as tfds
    _patch_tfds_for_protobuf()
    self._tfds = tfds
    self.name = name
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      first_line = str(e).splitlines()[0] if str(e) else ''
      raise ValueError(
          f'Unknown dataset {name!r}: not {DIGITS!r}, not an existing '
          f'directory, and not a TFDS dataset ({first_line}). '
          f'{_KINDS_HELP}') from e
    root = getattr(builder, 'data_dir_root', data_dir)
    if not builder.is_prepared():
      raise ValueError(
          f'TFDS dataset {name!r} is not prepared in data_dir {root!r} '
          f'(looked for {builder.data_dir}); nothing is downloaded at run '
          f'time. Prepare it once with `tfds build {name} '
          f'--data_dir={root}` (ImageNet needs --manual_dir with the '
          f'original archives), or point --dataset at an image folder '
          f'<dir>/<split>/<class>/*.jpg, or use --dataset={DIGITS}.')
    self.builder = builder
    info = builder.info
    keys = info.supervised_keys
    if (isinstance(keys, (tuple, list)) and len(keys) == 2
        and all(isinstance(k, str) for k in keys)):
      self._image_key, self._label_key = keys
    else:
      self._image_key, self._label_key = 'image', 'label'
    for key in (self._image_key, self._label_key):
      if key not in info.features:
        raise ValueError(f'TFDS dataset {name!r} has no {key!r} feature; '
                         f'features: {list(info.features)}.')
    self.num_classes = int(info.features[self._label_key].num_classes)
    shape = tuple(info.features[self._image_key].shape)
    self._channels = shape[-1]
    self.image_shape = (shape[:2] + (3,)) if None not in shape else None
    for split in dict.fromkeys(s for s in (train_split, eval_split) if s):
      self._check_split(split)

  @property
  def splits(self):
    return list(self.builder.info.splits.keys())

  def num_examples(self, split):
    self._check_split(split)
    return int(self.builder.info.splits[split].num_examples)

  def _shard_offsets(self, split):
    """Cumulative example offset of each shard, after checking file names."""
    info = self.builder.info.splits[split]
    lengths = list(info.shard_lengths)
    if not lengths:
      raise ValueError(f'TFDS split {split!r} of {self.name!r} records no '
                       f'shard_lengths; cannot derive dense ids.')
    for k, filename in enumerate(info.filenames):
      m = _TFDS_ID_RE.search(os.path.basename(filename))
      if not m or int(m.group(1)) != k or int(m.group(2)) != len(lengths):
        raise ValueError(
            f'TFDS file {filename!r} does not follow the '
            f'<name>-SSSSS-of-NNNNN naming that dense ids rely on.')
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

  def _key_feature(self):
    """The dataset's own per-example file-name feature, or None."""
    for name in TFDS_KEY_FEATURES:
      if name in self.builder.info.features:
        return name
    return None

  def _scan(self, split, feature):
    """`feature` of every example of `split` in id order (one read pass).

    Only that feature is decoded (the images are skipped), but every record
    is read, which for ImageNet's train split takes a while.
    """
    offsets = self._shard_offsets(split)
    read_config = self._tfds.ReadConfig(add_tfds_id=True)
    ds = self.builder.as_dataset(
        split=split, shuffle_files=False, read_config=read_config,
        decoders=self._tfds.decode.PartialDecoding({feature: True}))
    ds = ds.map(lambda ex: (ex['tfds_id'], ex[feature]),
                num_parallel_calls=_AUTOTUNE).batch(4096)
    values = [None] * self.num_examples(split)
    for tfds_ids, batch in ds.as_numpy_iterator():
      for tfds_id, value in zip(tfds_ids, batch):
        values[_tfds_id_to_index(tfds_id.decode(), offsets)] = value
    return values

  def example_keys(self, split):
    self._check_split(split)
    feature = self._key_feature()
    if feature is not None:
      return [v.decode() for v in self._scan(split, feature)]
    # The tfds_id of record R of shard file F is 'F__R' (no read needed).
    info = self.builder.info.splits[split]
    return [f'{os.path.basename(name)}__{r}'
            for name, length in zip(info.filenames, info.shard_lengths)
            for r in range(length)]

  def example_labels(self, split):
    self._check_split(split)
    return np.asarray(self._scan(split, self._label_key), np.int32)

  def _to_example(self, ex):
    """{'image': uint8 HxWx3, 'label': int32} of a decoded TFDS example."""
    image = ex[self._image_key]
    if self._channels == 1:
      image = tf.image.grayscale_to_rgb(image)
    elif self._channels == 4:
      image = image[..., :3]
    return {'image': image, 'label': tf.cast(ex[self._label_key], tf.int32)}

  def record_files(self, split):
    """The split's shard files; record R of shard S has id offset[S] + R,
    the id `load` derives from the tfds_id."""
    self._check_split(split)
    file_format = str(getattr(self.builder.info, 'file_format', 'tfrecord'))
    if 'tfrecord' not in file_format.lower():
      raise ValueError(
          f'TFDS dataset {self.name!r} is stored as {file_format}; the '
          f'training input reads TFRecord files only.')
    offsets = self._shard_offsets(split)
    info = self.builder.info.splits[split]
    paths = [os.path.join(self.builder.data_dir, name)
             for name in info.filenames]
    ids = [np.arange(length, dtype=np.int64) + offset
           for offset, length in zip(offsets, info.shard_lengths)]
    return paths, ids

  def decode_record(self, serialized):
    return self._to_example(
        self.builder.info.features.deserialize_example(serialized))

  def load(self, split, input_context=None, shuffle_files=False, seed=None,
           shard_by_example=False):
    self._check_split(split)
    offsets = tf.constant(self._shard_offsets(split))
    read_split = split
    if (shard_by_example and input_context is not None and
        input_context.num_input_pipelines > 1):
      # Example ranges of (almost) equal size instead of whole files.
      read_split = self._tfds.even_splits(
          split, n=input_context.num_input_pipelines,
          drop_remainder=False)[input_context.input_pipeline_id]
      input_context = None
    read_config = self._tfds.ReadConfig(
        add_tfds_id=True, input_context=input_context, shuffle_seed=seed,
        interleave_cycle_length=32, interleave_block_length=1)
    ds = self.builder.as_dataset(split=read_split,
                                 shuffle_files=shuffle_files,
                                 read_config=read_config)

    def convert(ex):
      tfds_id = ex['tfds_id']
      shard = tf.strings.to_number(tf.strings.regex_replace(
          tfds_id, r'^.*-(\d+)-of-\d+__\d+$', r'\1'), tf.int64)
      record = tf.strings.to_number(
          tf.strings.regex_replace(tfds_id, r'^.*__(\d+)$', r'\1'), tf.int64)
      return dict(self._to_example(ex),
                  id=tf.cast(tf.gather(offsets, shard) + record, tf.int32))
    return ds.map(convert, num_parallel_calls=_AUTOTUNE)


def _looks_like_path(dataset):
  return dataset.startswith(('/', './', '../', '~')) or dataset in ('.', '..')


def get_data_source(dataset, data_dir=None, train_split='train',
                    eval_split='validation', skip_corrupt_images=False):
  """Returns the `DataSource` for `dataset` ('digits', a folder, or TFDS).

  A path (existing directory, or anything starting with '/', './', '../' or
  '~') is an image folder; `data_dir` is only used by TFDS. The train and
  eval splits are validated here, before any image is read (eval_split=None
  skips its check, e.g. when only training).
  """
  if dataset == DIGITS:
    source = DigitsSource()
    for split in (train_split, eval_split):
      if split:
        source._check_split(split)  # pylint: disable=protected-access
    return source
  path = os.path.expanduser(dataset)
  if os.path.isdir(path):
    return ImageFolderSource(path, train_split=train_split,
                             eval_split=eval_split,
                             skip_corrupt_images=skip_corrupt_images)
  if _looks_like_path(dataset):
    kind = 'is not a directory' if os.path.exists(path) else 'does not exist'
    raise ValueError(f'Dataset path {dataset!r} {kind}. {_KINDS_HELP}')
  return TFDSSource(dataset, data_dir=data_dir, train_split=train_split,
                    eval_split=eval_split)


# ---------------------------------------------------------------------------
# Subsets of a split named by a list of example keys (`--train_subset`).
# ---------------------------------------------------------------------------


def read_key_list(path):
  """The keys of a subset list: one per line, surrounding blanks stripped,
  empty lines ignored (the format of SimCLR's imagenet_subsets/*.txt)."""
  with tf.io.gfile.GFile(path) as f:
    return [line.strip() for line in f if line.strip()]


def subset_ids(source, split, keys):
  """Original ids (ascending) of the examples of `split` named by `keys`.

  Keys are matched exactly against `source.example_keys(split)`. For an
  image folder, a list whose keys hold no '/' (such as SimCLR's ImageNet
  lists, 'n01440764_10026.JPEG') is matched against file names instead,
  provided they are unique in the split. Unknown or repeated keys are a
  ValueError that names some of them.
  """
  all_keys = source.example_keys(split)
  keys = [str(k).strip() for k in keys]
  if not keys:
    raise ValueError(f'The subset list for split {split!r} is empty.')
  if (isinstance(source, ImageFolderSource)
      and not any('/' in k for k in keys)):
    basenames = [k.rsplit('/', 1)[-1] for k in all_keys]
    if len(set(basenames)) == len(basenames):
      all_keys = basenames
  index = {k: i for i, k in enumerate(all_keys)}
  unknown = [k for k in keys if k not in index]
  if unknown:
    raise ValueError(
        f'{len(unknown)} of the {len(keys)} keys of the subset list are not '
        f'examples of split {split!r} of {source.name!r} (e.g. '
        f'{unknown[:5]}); example keys there look like {all_keys[:3]}.')
  ids = np.array([index[k] for k in keys], np.int64)
  unique, counts = np.unique(ids, return_counts=True)
  if len(unique) != len(ids):
    repeated = [all_keys[i] for i in unique[counts > 1]]
    raise ValueError(f'The subset list names {len(repeated)} example(s) more '
                     f'than once (e.g. {repeated[:5]}).')
  return unique


def apply_subset(source, split, keys):
  """`source` with `split` restricted to the examples named by `keys`.

  The filtered N (= len(keys)) is known at once; ids are re-indexed densely
  in ascending order of the original ids (see `DataSource.subset`).
  """
  return source.subset(split, subset_ids(source, split, keys))


def _check_subset_ids(ids, num_examples):
  ids = np.unique(np.asarray(ids, np.int64))
  if len(ids) == 0 or ids[0] < 0 or ids[-1] >= num_examples:
    raise ValueError(f'Subset ids must be a non-empty set within [0, '
                     f'{num_examples}).')
  return ids


class _FilteredSource(DataSource):
  """A source whose `split` keeps only `ids` (re-indexed 0..n-1).

  Over a random-access base only the kept examples are read. Over TFDS
  every record of the split is still read and the others are dropped
  (before decoding in training), so an epoch costs a full read of the
  original split (for ImageNet's 1 % / 10 % prefer the TFDS datasets
  imagenet2012_subset/1pct, /10pct).
  """

  def __init__(self, base, split, ids):
    self._base = base
    self._split = split
    self._ids = _check_subset_ids(ids, base.num_examples(split))
    self.name = base.name
    self.num_classes = base.num_classes
    self.image_shape = base.image_shape
    new_ids = np.full(base.num_examples(split), -1, np.int32)
    new_ids[self._ids] = np.arange(len(self._ids), dtype=np.int32)
    self._new_ids = new_ids

  @property
  def splits(self):
    return self._base.splits

  def num_examples(self, split):
    if split == self._split:
      return len(self._ids)
    return self._base.num_examples(split)

  def example_keys(self, split):
    keys = self._base.example_keys(split)
    return [keys[i] for i in self._ids] if split == self._split else keys

  def example_labels(self, split):
    labels = self._base.example_labels(split)
    return labels[self._ids] if split == self._split else labels

  def find_unreadable(self, split):
    return self._base.find_unreadable(split)

  @property
  def supports_random_access(self):
    return self._base.supports_random_access

  def read_example(self, split, index):
    if split != self._split:
      return self._base.read_example(split, index)
    example = self._base.read_example(
        split, tf.gather(tf.constant(self._ids), index))
    return dict(example, id=tf.cast(index, tf.int32))

  def record_files(self, split):
    paths, ids = self._base.record_files(split)
    if split == self._split:
      ids = [np.where(i >= 0, self._new_ids[np.maximum(i, 0)], -1)
             for i in ids]
    return paths, ids

  def decode_record(self, serialized):
    return self._base.decode_record(serialized)

  def load(self, split, input_context=None, shuffle_files=False, seed=None,
           shard_by_example=False):
    if split != self._split:
      return self._base.load(split, input_context=input_context,
                             shuffle_files=shuffle_files, seed=seed,
                             shard_by_example=shard_by_example)
    if self.supports_random_access:  # Round robin by new id: by example.
      return _load_by_index(self, split, input_context, shuffle_files, seed)
    # By example: the kept ids of an even share of the base need not be
    # even, so every pipeline reads the whole split and keeps new id mod P.
    by_example = (shard_by_example and input_context is not None and
                  input_context.num_input_pipelines > 1)
    ds = self._base.load(split,
                         input_context=None if by_example else input_context,
                         shuffle_files=shuffle_files, seed=seed)
    table = tf.constant(self._new_ids)

    def reindex(example):
      return dict(example, id=tf.gather(table, example['id']))
    ds = ds.map(reindex, num_parallel_calls=_AUTOTUNE)
    ds = ds.filter(lambda example: example['id'] >= 0)
    if by_example:
      pipelines = input_context.num_input_pipelines
      pipeline = input_context.input_pipeline_id
      ds = ds.filter(lambda example: example['id'] % pipelines == pipeline)
    return ds


def eval_view(image, image_size):
  """The eval preprocessing of one image: no augmentation, centre crop
  only above 32 px."""
  return data_util.preprocess_image(image, image_size, image_size,
                                    is_training=False,
                                    test_crop=image_size > 32)


# Sub-keys of a run's input key: example order, augmentation.
_ORDER, _AUGMENT = 0, 1
_NO_END = 2**62  # "infinitely many" epochs for Dataset.range


def _fold(key, *values):
  """`key` ([2] int64) with each of `values` folded in, in turn."""
  for value in values:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(value,
                                                                tf.int64))
  return key


def _pipeline_rows(global_batch_size, input_context):
  """(rows per step of this pipeline, its first row within the global
  batch, per-replica batch): pipeline p holds rows [p·m, (p+1)·m) of every
  global batch, m = B / P, as its replicas' b-row batches in replica order."""
  if input_context is None:
    return global_batch_size, 0, global_batch_size
  per_replica = input_context.get_per_replica_batch_size(global_batch_size)
  pipelines = input_context.num_input_pipelines
  replicas = input_context.num_replicas_in_sync
  if replicas % pipelines:
    raise ValueError(f'{replicas} replicas do not split evenly over '
                     f'{pipelines} input pipelines.')
  rows = per_replica * (replicas // pipelines)
  return rows, input_context.input_pipeline_id * rows, per_replica


def _indexed_stream(num_examples, order_key, global_batch_size, rows,
                    first_row, start_step):
  """{'epoch', 'index'} of this pipeline's rows from step `start_step` on.

  The global stream is the epochs' orders concatenated: position s is
  example perm_e[s - e·N] of epoch e = s // N, perm_e a stateless shuffle of
  range(N) keyed by (order_key, e). The global batch of step t is
  positions [t·B, (t+1)·B); this pipeline keeps the positions whose row
  s mod B is in [first_row, first_row + rows). One O(N) integer pass per
  epoch; resuming starts at the epoch of step `start_step` and reads nothing
  before it.
  """
  n = num_examples
  start = start_step * global_batch_size

  def epoch_rows(epoch):
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), _fold(order_key, epoch))
    position = epoch * n + tf.range(n, dtype=tf.int64)
    row = position % global_batch_size
    keep = ((position >= start) & (row >= first_row) &
            (row < first_row + rows))
    index = tf.boolean_mask(perm, keep)
    return tf.data.Dataset.from_tensor_slices(
        {'epoch': tf.fill(tf.shape(index), epoch), 'index': index})
  return tf.data.Dataset.range(start // n, _NO_END).flat_map(epoch_rows)


def _record_stream(source, split, order_key, input_context, rows,
                   start_step, window):
  """{'epoch', 'id', 'serialized'} of this pipeline's records from step
  `start_step` on, for a source without random access (TFDS).

  Pipeline p of P reads files p, p + P, ... (per-host file sharding). Epoch
  e: its files in a stateless order keyed by (order_key, e), interleaved
  record by record, records outside the split dropped, then shuffled in
  consecutive windows of `window` records (stateless, keyed by
  (order_key, e, window index): no tf.data shuffle, whose order would also
  depend on TF's global seed). Resuming at row start_step·rows of this
  pipeline starts at its epoch and skips the rows before it within that
  epoch: at most one epoch of this pipeline's records is read (not
  decoded) to resume.
  """
  paths, ids = source.record_files(split)
  pipelines, pipeline = ((input_context.num_input_pipelines,
                          input_context.input_pipeline_id)
                         if input_context is not None else (1, 0))
  if len(paths) < pipelines:
    raise ValueError(f'Split {split!r} of {source.name!r} has {len(paths)} '
                     f'files, fewer than the {pipelines} input pipelines.')
  paths, ids = paths[pipeline::pipelines], ids[pipeline::pipelines]
  table = np.concatenate(ids).astype(np.int32)
  file_starts = np.concatenate([[0], np.cumsum([len(i) for i in ids])[:-1]])
  num_rows = int((table >= 0).sum())
  if num_rows == 0:
    raise ValueError(f'Input pipeline {pipeline} has no example of split '
                     f'{split!r} of {source.name!r}.')
  start_epoch, offset = divmod(start_step * rows, num_rows)
  paths_t, starts_t = tf.constant(paths), tf.constant(file_starts, tf.int64)
  table_t = tf.constant(table)

  def read_file(f):
    return tf.data.TFRecordDataset(tf.gather(paths_t, f)).enumerate().map(
        lambda r, record: {'id': tf.gather(table_t, starts_t[f] + r),
                           'serialized': record})

  def shuffle_window(key, w, block):
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(tf.shape(block['id'])[0]), _fold(key, 1, w))
    return tf.data.Dataset.from_tensor_slices(
        tf.nest.map_structure(lambda t: tf.gather(t, perm), block))

  def epoch_records(epoch):
    key = _fold(order_key, epoch)
    order = tf.random.experimental.stateless_shuffle(
        tf.range(len(paths), dtype=tf.int64), _fold(key, 0))
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        read_file, cycle_length=min(32, len(paths)), block_length=1,
        num_parallel_calls=_AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda r: r['id'] >= 0).batch(window).enumerate()
    ds = ds.flat_map(lambda w, block: shuffle_window(key, w, block))
    ds = ds.skip(tf.where(epoch == start_epoch, tf.constant(offset, tf.int64),
                          tf.constant(0, tf.int64)))
    return ds.map(lambda r: dict(r, epoch=epoch))
  return tf.data.Dataset.range(start_epoch, _NO_END).flat_map(epoch_records)


def train_view_fn(image_size, num_views=2, train_mode='pretrain',
                  color_jitter_strength=1.0, use_blur=True,
                  crop_area_min=0.08, randaugment=None, seed=None,
                  blur_on_device=False, clean_view=False):
  """`views(example, epoch)`: the training views of one example, the one
  view function of the training input and of `preview_batch`.

  Returns {'image': float32 [H, W, 3V], 'label', 'id'}, view v keyed by
  (seed, epoch, id, v). Pretrain: `num_views` colour-distorted crops
  (`use_blur`, `randaugment` apply here); finetune: 1 crop + flip view;
  both crop an area in [`crop_area_min`, 1] (FNC's fine-tuning uses 0.2).
  `blur_on_device` (pretrain with `use_blur`): the views are not blurred;
  each carries its drawn σ in 'blur_sigma' (float32 [V], 0 = not blurred)
  and is left before its blur and final clip, for
  `data_util.finish_views` to finish on the accelerator.
  `clean_view` (--linear_head_input=clean): the result also holds
  'clean_image', float32 [H, W, 3], the example's `eval_view` (no
  augmentation), for the linear head trained alongside pretraining.
  """
  if train_mode not in ('pretrain', 'finetune'):
    raise ValueError(f"train_mode must be 'pretrain' or 'finetune', got "
                     f'{train_mode!r}.')
  if train_mode == 'pretrain' and num_views < 1:
    raise ValueError(f'num_views must be >= 1, got {num_views}.')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f'Training input needs an int seed, got {seed!r}.')
  pretrain = train_mode == 'pretrain'
  num_views = num_views if pretrain else 1
  defer_blur = pretrain and use_blur and blur_on_device

  def augment(image, key):
    if pretrain:
      return data_util.preprocess_image(
          image, image_size, image_size, is_training=True,
          color_distort=True, color_jitter_strength=color_jitter_strength,
          use_blur=use_blur, crop_area_min=crop_area_min,
          randaugment=randaugment, defer_blur=defer_blur, seed=key)
    return data_util.preprocess_image(
        image, image_size, image_size, is_training=True, color_distort=False,
        use_blur=False, crop_area_min=crop_area_min, seed=key)

  def views(example, epoch):
    """One traced augmentation run over the V view keys (tf.map_fn), not V
    traced copies: with RandAugment, FNC's 10 copies took ~40 s to trace."""
    key = _fold(tf.constant([seed, 0], tf.int64), _AUGMENT, epoch,
                example['id'])
    keys = tf.stack([_fold(key, v) for v in range(num_views)])
    out = tf.map_fn(lambda k: augment(example['image'], k), keys,
                    fn_output_signature=((tf.float32, tf.float32)
                                         if defer_blur else tf.float32),
                    parallel_iterations=num_views)
    images = out[0] if defer_blur else out
    result = {'image': tf.concat(tf.unstack(images, num=num_views), axis=-1),
              'label': example['label'], 'id': example['id']}
    if defer_blur:
      result['blur_sigma'] = out[1]
    if clean_view:
      result['clean_image'] = eval_view(example['image'], image_size)
    return result
  return views


def _train_options(input_threads, input_ram_budget_gb):
  """tf.data options of the training input: a private thread pool of
  `input_threads` threads and an autotune RAM budget of
  `input_ram_budget_gb` GiB (0: TF's shared pool / default budget; GiB
  as Model Garden's `ram_budget`); and one thread per op, as TPU reference
  input pipelines set it (parallelism comes from the parallel maps;
  measured here: not slower on the CPU pipeline)."""
  options = tf.data.Options()
  options.threading.max_intra_op_parallelism = 1
  if input_threads:
    options.threading.private_threadpool_size = int(input_threads)
  if input_ram_budget_gb:
    options.autotune.ram_budget = int(input_ram_budget_gb * 2**30)
  return options


def build_input_fn(source, split, global_batch_size, is_training, image_size,
                   num_views=2, train_mode='pretrain',
                   color_jitter_strength=1.0, use_blur=True,
                   crop_area_min=0.08, randaugment=None, cache_dataset=False,
                   shuffle_buffer=None, seed=None, start_step=0,
                   blur_on_device=False, clean_view=False, input_threads=0,
                   input_ram_budget_gb=0):
  """Returns `input_fn(input_context=None) -> tf.data.Dataset` of batches.

  Batch: {'image': float32 [b, H, W, 3V], 'label': int32 [b], 'id': int32
  [b]}, b = per-replica batch (global batch when no context). Training
  views: `train_view_fn` (its arguments; with `blur_on_device` the batch
  also holds 'blur_sigma' [b, V] and the trainer finishes the views; with
  `clean_view`, 'clean_image' [b, H, W, 3]); eval
  -> 1 view, centre crop only if image_size > 32.

  Training (endless, drop_remainder) is a pure function of (`seed`, step),
  `seed` a required int, and starts at the batch of step `start_step`:
  * Random access (digits, folders, their subsets): epoch e is a stateless
    permutation of the ids keyed by (seed, e); the epochs concatenated form
    one stream whose positions [t·B, (t+1)·B) are the global batch of step
    t, replica r holding rows [r·b, (r+1)·b). So the examples of a step, and
    their replica order, do not depend on the number of input pipelines.
    Resuming skips the index stream only (see `_indexed_stream`).
  * TFDS: each pipeline reads its own files (see `_record_stream`); the
    batches then depend on the number of pipelines. Resuming reads at most
    one epoch of records.
  The views of example id i in epoch e use the keys (seed, e, i, v),
  v = 0..V-1, so they are the same however the example is reached (RandAugment
  excepted: stateful, see data_util). Images are decoded after the example
  order is drawn: the training input holds no buffer of decoded images
  (random access shuffles ids; TFDS shuffles windows of `shuffle_buffer`
  serialized records, default min(N, 50000), ≈ window × the mean encoded
  record size of host memory, and decodes after). `cache_dataset` concerns
  eval only. `input_threads`, `input_ram_budget_gb`: `_train_options`.
  Eval: one pass in id order, (cache), last partial batch kept.
  """
  if int(start_step) < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  num_examples = source.num_examples(split)
  if is_training:
    train_views = train_view_fn(
        image_size, num_views=num_views, train_mode=train_mode,
        color_jitter_strength=color_jitter_strength, use_blur=use_blur,
        crop_area_min=crop_area_min, randaugment=randaugment, seed=seed,
        blur_on_device=blur_on_device, clean_view=clean_view)

  def train_input_fn(input_context):
    rows, first_row, batch_size = _pipeline_rows(global_batch_size,
                                                 input_context)
    order_key = _fold(tf.constant([seed, 0], tf.int64), _ORDER)
    if source.supports_random_access:
      ds = _indexed_stream(num_examples, order_key, global_batch_size, rows,
                           first_row, int(start_step))
      ds = ds.map(lambda r: train_views(source.read_example(split, r['index']),
                                        r['epoch']),
                  num_parallel_calls=_AUTOTUNE)
    else:
      window = shuffle_buffer or min(num_examples, 50_000)
      ds = _record_stream(source, split, order_key, input_context, rows,
                          int(start_step), window)
      ds = ds.map(lambda r: train_views(
          dict(source.decode_record(r['serialized']), id=r['id']),
          r['epoch']), num_parallel_calls=_AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.prefetch(_AUTOTUNE)
    return ds.with_options(_train_options(input_threads, input_ram_budget_gb))

  def eval_input_fn(input_context):
    batch_size = (input_context.get_per_replica_batch_size(global_batch_size)
                  if input_context is not None else global_batch_size)
    ds = source.load(split, input_context=input_context)
    if cache_dataset:
      ds = ds.cache()
    ds = ds.map(lambda ex: {'image': eval_view(ex['image'], image_size),
                            'label': ex['label'], 'id': ex['id']},
                num_parallel_calls=_AUTOTUNE)
    return ds.batch(batch_size).prefetch(_AUTOTUNE)

  def input_fn(input_context=None):
    if is_training:
      return train_input_fn(input_context)
    return eval_input_fn(input_context)

  return input_fn


def _preview_examples(source, split, num_examples):
  """`num_examples` examples of `split`, reading only those: ids
  k·N // num_examples for random access (spread over the split, so that a
  class-sorted folder shows several classes), the first records in file
  order for TFDS."""
  if source.supports_random_access:
    ids = np.arange(num_examples) * source.num_examples(split) // num_examples
    return tf.data.Dataset.from_tensor_slices(ids).map(
        lambda i: source.read_example(split, i))
  paths, ids = source.record_files(split)
  table = tf.constant(np.concatenate(ids).astype(np.int32))
  ds = tf.data.TFRecordDataset(paths).enumerate()
  ds = ds.map(lambda r, record: (tf.gather(table, r), record))
  ds = ds.filter(lambda i, _: i >= 0).take(num_examples)
  return ds.map(lambda i, record: dict(source.decode_record(record), id=i))


def preview_batch(source, split, num_images, image_size, **view_args):
  """The training views of `num_images` examples of `split`
  (`_preview_examples`), as epoch 0 of training makes them (`train_view_fn`
  with `view_args`) and finished as the accelerator finishes them
  (`data_util.finish_views`): what the model sees, for pictures. Reads
  only those examples, not a training pipeline (whose TFDS shuffle window
  fills before its first batch)."""
  views = train_view_fn(image_size, **view_args)
  num_images = min(num_images, source.num_examples(split))
  ds = _preview_examples(source, split, num_images)
  ds = ds.map(lambda example: views(example, tf.constant(0, tf.int64)))
  batch = next(iter(ds.batch(num_images)))
  return data_util.finish_views(batch)
