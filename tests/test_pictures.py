"""Tests for pictures.py: the view grid (PNG and TensorBoard) and the t-SNE
plot."""

import os

import numpy as np
import tensorflow as tf

import config
import pictures
import run

TINY_RUN = {
    'dataset': 'digits', 'eval_split': 'test', 'image_size': 16,
    'resnet_depth': 18, 'width_multiplier': 0.125, 'proj_out_dim': 16,
    'train_batch_size': 128, 'eval_batch_size': 256, 'warmup_epochs': 0,
    'learning_rate': 0.5, 'use_blur': False, 'train_summary_steps': 0,
    'mode': 'train', 'seed': 0,
}


def random_views(num_images=3, size=(4, 5), num_views=2, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(num_images, *size, 3 * num_views)).astype(
      np.float32)


def test_view_grid_places_each_view_enlarged_between_white_gaps():
  images = random_views()
  grid = pictures.view_grid(images, 2, scale=2, gap=1)
  assert grid.shape == (3 * (8 + 1) + 1, 2 * (10 + 1) + 1, 3)
  cells = np.zeros(grid.shape[:2], bool)
  for r in range(3):
    for v in range(2):
      y, x = 1 + r * 9, 1 + v * 11
      expected = np.kron(images[r, ..., 3 * v:3 * v + 3],
                         np.ones((2, 2, 1)))
      np.testing.assert_array_equal(grid[y:y + 8, x:x + 10], expected)
      cells[y:y + 8, x:x + 10] = True
  assert (grid[~cells] == 1.0).all()
  # Default: enlarged to at least 96 px (16 px → ×6).
  assert pictures.view_grid(random_views(1, (16, 16)), 2).shape == (
      98 + 2, 2 * 98 + 2, 3)


def test_png_and_tensorboard_hold_the_same_grid(tmp_path):
  images = random_views(num_images=10)
  expected = np.round(pictures.view_grid(images[:8], 2) * 255)
  path = pictures.save_view_grid(images, 2, str(tmp_path / 'v.png'))
  png = tf.io.decode_png(tf.io.read_file(path)).numpy()
  np.testing.assert_array_equal(png, expected)

  pictures.summarize_view_grid(tf.constant(images), 2, str(tmp_path), 7)
  (events,) = tf.io.gfile.glob(str(tmp_path / 'events.*'))
  found = []
  for event in tf.compat.v1.train.summary_iterator(events):
    for value in event.summary.value:
      found.append((value.tag, event.step))
      encoded = tf.make_ndarray(value.tensor)[2]  # [width, height, png]
      np.testing.assert_array_equal(tf.io.decode_png(encoded).numpy(),
                                    expected)
  assert found == [(pictures.VIEW_GRID_TAG, 7)]


def test_preview_mode_writes_a_grid_of_views(tmp_path):
  argv = [f'--{k}={v}' for k, v in {
      **TINY_RUN, 'model_dir': str(tmp_path), 'mode': 'preview',
      'train_epochs': 1}.items()]
  path = run.run(config.from_argv(argv))
  image = tf.io.decode_png(tf.io.read_file(path)).numpy()
  # 8 rows of 2 views, 16 px enlarged ×6 to 96 px, 2 px gaps.
  assert image.shape == (8 * 98 + 2, 2 * 98 + 2, 3)
  assert path == os.path.join(str(tmp_path), 'preview.png')


def test_embedding_plot(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 40)
  x = np.eye(3, 16)[labels] * 5.0 + 0.05 * rng.normal(size=(120, 16))
  path = pictures.save_embedding_plot(x, labels, str(tmp_path / 't.png'),
                                      class_names=['a', 'b', 'c'])
  image = tf.io.decode_png(tf.io.read_file(path)).numpy()
  assert image.shape[0] > 100 and image.std() > 0
