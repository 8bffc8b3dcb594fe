"""Pictures: grids of augmented views and t-SNE maps of features.

`view_grid` lays out views (one row per image, its V views side by side,
small images enlarged, white gaps); `save_view_grid` writes it as a PNG
(`run.py --mode=preview`) and `summarize_view_grid` as the TensorBoard image
'augmented_views' at the start of training. `save_embedding_plot` draws a
2-D t-SNE of features coloured by label (`evaluate.py --protocols=tsne`).
"""

import os

import numpy as np
import tensorflow as tf

import clustering

VIEW_GRID_TAG = 'augmented_views'


def view_grid(images, num_views, scale=None, gap=2):
  """float32 [b·(h·s+gap)+gap, V·(w·s+gap)+gap, 3] grid in [0, 1].

  `images` [b, h, w, 3V] in [0, 1] (view v = channels 3v..3v+2); row r,
  column v holds view v of image r, enlarged s = `scale` times (nearest
  neighbour; default: the least s with max(h, w)·s ≥ 96), with `gap` white
  pixels around every view.
  """
  images = np.asarray(images, np.float32)
  height, width = images.shape[1:3]
  scale = scale or max(1, int(np.ceil(96 / max(height, width))))
  cell_h, cell_w = height * scale + gap, width * scale + gap
  grid = np.ones((len(images) * cell_h + gap, num_views * cell_w + gap, 3),
                 np.float32)
  for r, image in enumerate(images):
    for v in range(num_views):
      view = image[..., 3 * v:3 * v + 3]
      view = np.repeat(np.repeat(view, scale, axis=0), scale, axis=1)
      y, x = gap + r * cell_h, gap + v * cell_w
      grid[y:y + height * scale, x:x + width * scale] = view
  return np.clip(grid, 0.0, 1.0)


def _view_grid_uint8(images, num_views, max_images, scale, gap):
  grid = view_grid(images[:max_images], num_views, scale, gap)
  return np.round(grid * 255).astype(np.uint8)


def save_view_grid(images, num_views, path, max_images=8, scale=None, gap=2):
  """PNG at `path` of `view_grid` of the first `max_images` images."""
  png = tf.io.encode_png(_view_grid_uint8(images, num_views, max_images,
                                          scale, gap))
  tf.io.gfile.makedirs(os.path.dirname(os.path.abspath(path)))
  tf.io.write_file(path, png)
  return path


def summarize_view_grid(images, num_views, summary_dir, step, max_images=8,
                        scale=None, gap=2):
  """TensorBoard image 'augmented_views' at `step` under `summary_dir`: the
  same enlarged, gapped `view_grid` as `save_view_grid`."""
  grid = _view_grid_uint8(images, num_views, max_images, scale, gap)
  writer = tf.summary.create_file_writer(summary_dir)
  with writer.as_default():
    tf.summary.image(VIEW_GRID_TAG, grid[np.newaxis], step=step)
  writer.flush()


def save_embedding_plot(features, labels, path, class_names=None,
                        max_points=2000, seed=0, title=None, threads=1):
  """2-D t-SNE (scikit-learn) of l2-normalised features coloured by label.

  At most `max_points` examples (a fixed random sample) are embedded, with
  at most `threads` BLAS/OpenMP threads (see `evaluate.limit_threads`).
  """
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  from sklearn import manifold
  from threadpoolctl import threadpool_limits
  features = clustering.l2_normalize(features)
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  if len(features) > max_points:
    keep = np.sort(rng.choice(len(features), max_points, replace=False))
    features, labels = features[keep], labels[keep]
  perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
  with threadpool_limits(limits=threads):
    points = manifold.TSNE(n_components=2, perplexity=perplexity,
                           init='pca', random_state=seed).fit_transform(
                               features)
  fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
  classes = np.unique(labels)
  cmap = plt.get_cmap('tab10' if len(classes) <= 10 else 'tab20')
  for i, c in enumerate(classes):
    mask = labels == c
    name = class_names[c] if class_names is not None else str(c)
    ax.scatter(points[mask, 0], points[mask, 1], s=4, color=cmap(i % cmap.N),
               label=name)
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=10)
  if len(classes) <= 20:
    ax.legend(markerscale=3, fontsize=7, loc='best', frameon=False)
  fig.tight_layout()
  tf.io.gfile.makedirs(os.path.dirname(os.path.abspath(path)))
  fig.savefig(path)
  plt.close(fig)
  return path
