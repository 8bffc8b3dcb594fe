"""IFND's host-side clustering: acceptance schedules, acceptance of the most
confident, k-means, confidence, purity, pseudo-label assignment, and that
the module needs neither TensorFlow nor the model code."""

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

import clustering


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def test_acceptance_schedules():
  assert clustering.acceptance_rate(0.0) == 0.0
  assert clustering.acceptance_rate(0.37) == pytest.approx(0.37)
  assert clustering.acceptance_rate(1.5) == 1.0
  assert clustering.acceptance_rate(0.9, 'constant',
                                   constant_rate=0.3) == 0.3
  rates = [clustering.acceptance_rate(p, 'step', step_stages=5)
           for p in (0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0)]
  assert rates == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
  with pytest.raises(ValueError, match='ifnd_acceptance must be one of'):
    clustering.acceptance_rate(0.5, 'cosine')


@pytest.mark.parametrize('rate', [0.0, 0.1, 0.25, 0.55, 1.0])
def test_accept_labels_round_rn_most_confident(rate):
  rng = np.random.default_rng(3)
  n = 37
  assignments = rng.integers(0, 5, n).astype(np.int32)
  confidence = rng.uniform(size=n).astype(np.float32)
  labels = clustering.accept(assignments, confidence, rate)
  labelled = labels >= 0
  assert labelled.sum() == int(round(rate * n))
  np.testing.assert_array_equal(labels[labelled], assignments[labelled])
  if 0 < labelled.sum() < n:  # every labelled one beats every unlabelled one
    assert confidence[labelled].min() > confidence[~labelled].max()


def test_accept_breaks_ties_by_index():
  labels = clustering.accept(np.array([7, 8, 9, 6]), np.ones(4), 0.5)
  np.testing.assert_array_equal(labels, [7, 8, -1, -1])


def _planted(seed=0, per_cluster=40, k=5, d=8, spread=0.05):
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(k, d))) * 3
  truth = np.repeat(np.arange(k), per_cluster)
  x = centres[truth] + spread * rng.normal(size=(len(truth), d))
  return x.astype(np.float32), truth


def test_kmeans_recovers_planted_clusters_deterministically():
  x, truth = _planted()
  centroids, assignments = clustering.kmeans(x, 5, seed=1)
  assert sk_metrics.adjusted_rand_score(truth, assignments) == 1.0
  assert centroids.shape == (5, 8)
  again = clustering.kmeans(x, 5, seed=1)
  np.testing.assert_array_equal(again[1], assignments)
  np.testing.assert_array_equal(again[0], centroids)
  with pytest.raises(ValueError, match='Cannot make 500 clusters of 200'):
    clustering.kmeans(x, 500)


def test_confidence_against_numpy():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  centroids = rng.normal(size=(3, 3)).astype(np.float32)
  assignments = np.array([0, 1, 2, 0, 1, 2])
  own = clustering.cluster_confidence(x, centroids, assignments)
  margin = clustering.cluster_confidence(x, centroids, assignments, 'margin')
  for i in range(6):
    cos = [x[i] @ c / np.linalg.norm(x[i]) / np.linalg.norm(c)
           for c in centroids]
    assert own[i] == pytest.approx(cos[assignments[i]], abs=1e-6)
    other = max(c for j, c in enumerate(cos) if j != assignments[i])
    assert margin[i] == pytest.approx(cos[assignments[i]] - other, abs=1e-6)
  with pytest.raises(ValueError, match='ifnd_confidence must be one of'):
    clustering.cluster_confidence(x, centroids, assignments, 'entropy')


def test_purity():
  pseudo = np.array([0, 0, 0, 1, 1, -1])
  true = np.array([2, 2, 3, 1, 1, 0])
  assert clustering.purity(pseudo, true) == pytest.approx(4 / 5)
  assert np.isnan(clustering.purity(np.full(3, -1), np.zeros(3, int)))


def test_assign_pseudo_labels_on_planted_clusters():
  x, truth = _planted(per_cluster=20, k=4)
  result = clustering.assign_pseudo_labels(x, (4, 8), 0.5, seed=0,
                                     true_labels=truth)
  assert result.table.shape == (80, 2)
  assert [(result.table[:, level] >= 0).sum() for level in range(2)] == [40,
                                                                        40]
  assert result.purity[0] == 1.0 and result.purity[1] == 1.0
  assert result.cluster_sizes[0] == (20, 20.0, 20)
  empty = clustering.assign_pseudo_labels(x, (4, 8), 0.0)
  assert (empty.table == -1).all() and empty.purity == []


def test_l2_normalize():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], np.float64)
  unit = clustering.l2_normalize(x)
  assert unit.dtype == np.float32
  np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]],
                             rtol=1e-6)


def test_clustering_imports_no_tensorflow_and_no_model_code():
  code = ('import sys, clustering; '
          'sys.exit(sorted({m.split(".")[0] for m in sys.modules} & '
          '{"tensorflow", "tf_keras", "model", "objective", "features", '
          '"evaluate", "ifnd"}) or None)')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, '-c', code], cwd=repo,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
