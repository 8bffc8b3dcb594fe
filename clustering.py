"""IFND's host-side clustering: acceptance schedule, k-means, confidence,
pseudo labels (SPEC §9). Pure NumPy / scikit-learn: no TensorFlow, no model.

`assign_pseudo_labels(features, num_clusters, rate)` is the whole step: one
k-means per granularity (level), each example's cluster as its label at the
level, kept only by the round(rate·N) most confident examples
(`cluster_confidence`, `accept`); `acceptance_rate` gives the rate at a
point of training. `purity` measures the labels against true classes.

Choices not in the paper summary (SPEC §9): k-means with scikit-learn
(Lloyd, k-means++ seeding on a subsample, fixed seed, a bounded number of
iterations; benchmarks/ifnd_cost.py measures it against faiss), and no
clustering while r·N rounds to 0 (nothing could be accepted).
"""

import time
from typing import NamedTuple

import numpy as np

SCHEDULES = ('linear', 'constant', 'step')
CONFIDENCES = ('centroid', 'margin')


def l2_normalize(x, eps=1e-12):
  """Rows of `x` scaled to unit l2 norm (zero rows stay zero), float32."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def acceptance_rate(progress, schedule='linear', constant_rate=1.0,
                    step_stages=5):
  """Acceptance rate r in [0, 1] at `progress` (fraction of training done).

  linear: r = progress (0 at the start, 1 at the end; the paper);
  constant: r = `constant_rate` throughout;
  step: `step_stages` equal stages, r = stage / (step_stages − 1)
  (0, ¼, ½, ¾, 1 for 5).
  """
  progress = min(max(float(progress), 0.0), 1.0)
  if schedule == 'linear':
    return progress
  if schedule == 'constant':
    return float(constant_rate)
  if schedule == 'step':
    stage = min(int(progress * step_stages), step_stages - 1)
    return stage / (step_stages - 1)
  raise ValueError(f'ifnd_acceptance must be one of {SCHEDULES}, got '
                   f'{schedule!r}.')


def kmeans(features, num_clusters, seed=0, max_iter=100, seed_sample=None):
  """Lloyd k-means (scikit-learn), one run, fixed seed.

  k-means++ seeding, which makes k passes over the points it seeds from,
  runs on a random subsample of `seed_sample` points (default
  max(20·k, 10 000); all of them when N is smaller); Lloyd then runs on all
  points (benchmarks/ifnd_cost.py: 144 s for 1.28 M × 128, k = 1000, on 2
  cores).

  Returns (centroids [k, d] float32, assignments [N] int32).
  """
  from sklearn import cluster  # pylint: disable=g-import-not-at-top
  features = np.asarray(features, np.float32)
  num = len(features)
  if num_clusters > num:
    raise ValueError(f'Cannot make {num_clusters} clusters of {num} '
                     'examples.')
  rng = np.random.default_rng(seed)
  seed_sample = seed_sample or max(20 * num_clusters, 10_000)
  sample = (features if num <= seed_sample else
            features[np.sort(rng.choice(num, seed_sample, replace=False))])
  init, _ = cluster.kmeans_plusplus(sample, num_clusters,
                                    random_state=seed)
  km = cluster.KMeans(n_clusters=num_clusters, init=init, n_init=1,
                      max_iter=max_iter, random_state=seed, algorithm='lloyd')
  assignments = km.fit_predict(features)
  return km.cluster_centers_.astype(np.float32), assignments.astype(np.int32)


def cluster_confidence(features, centroids, assignments, kind='centroid'):
  """Confidence of each example's cluster label, [N] float32.

  centroid: cos(x_i, c_{a_i}) (default); margin: that minus the cosine to
  the most similar other centroid. Centroids are l2-normalised first.
  """
  unit = l2_normalize(centroids)
  x = l2_normalize(features)
  own = np.einsum('nd,nd->n', x, unit[assignments])
  if kind == 'centroid':
    return own.astype(np.float32)
  if kind == 'margin':
    if len(centroids) < 2:
      raise ValueError('Margin confidence needs at least 2 clusters.')
    cosines = x @ unit.T
    cosines[np.arange(len(x)), assignments] = -np.inf
    return (own - cosines.max(axis=1)).astype(np.float32)
  raise ValueError(f'ifnd_confidence must be one of {CONFIDENCES}, got '
                   f'{kind!r}.')


def accept(assignments, confidence, rate):
  """Pseudo labels [N] int32: the round(rate·N) most confident examples
  keep their cluster, the others get −1 (ties: lower index first)."""
  num = len(assignments)
  count = int(round(rate * num))
  order = np.lexsort((np.arange(num), -confidence))
  labels = np.full(num, -1, np.int32)
  keep = order[:count]
  labels[keep] = assignments[keep]
  return labels


def purity(pseudo_labels, true_labels):
  """Fraction of labelled examples whose cluster's majority true label is
  theirs (NaN when nothing is labelled or true labels are unknown)."""
  keep = (pseudo_labels >= 0) & (true_labels >= 0)
  if not keep.any():
    return float('nan')
  clusters, true = pseudo_labels[keep], true_labels[keep]
  counts = np.zeros((clusters.max() + 1, true.max() + 1), np.int64)
  np.add.at(counts, (clusters, true), 1)
  return float(counts.max(axis=1).sum() / keep.sum())


class Assignment(NamedTuple):
  """The outcome of `assign_pseudo_labels`."""
  table: np.ndarray           # [N, L] int32, −1 = no label
  rate: float
  purity: list                # per level
  cluster_sizes: list         # per level: (min, median, max) over clusters
  kmeans_seconds: float


def assign_pseudo_labels(features, num_clusters, rate, seed=0,
                         confidence='centroid', max_iter=100,
                         true_labels=None):
  """The pseudo-label table of `features` [N, d] at acceptance `rate`.

  One k-means per entry of `num_clusters`; nothing is clustered when the
  rate accepts no example.
  """
  num = len(features)
  table = np.full((num, len(num_clusters)), -1, np.int32)
  purities, sizes = [], []
  start = time.time()
  if int(round(rate * num)) > 0:
    for level, k in enumerate(num_clusters):
      centroids, assignments = kmeans(features, k, seed=seed + level,
                                      max_iter=max_iter)
      conf = cluster_confidence(features, centroids, assignments, confidence)
      table[:, level] = accept(assignments, conf, rate)
      counts = np.bincount(assignments, minlength=k)
      sizes.append((int(counts.min()), float(np.median(counts)),
                    int(counts.max())))
      if true_labels is not None:
        purities.append(purity(table[:, level], np.asarray(true_labels)))
  return Assignment(table=table, rate=float(rate), purity=purities,
                    cluster_sizes=sizes,
                    kmeans_seconds=time.time() - start)
