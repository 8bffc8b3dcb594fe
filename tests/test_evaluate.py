"""Tests for evaluate.py: kNN and logistic-regression protocols, feature
extraction, the online kNN monitor, pictures, and benchmarks/quality.py."""

import json
import os
import sys

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import data as data_lib
import evaluate
import run
from conftest import two_replica_strategy

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(resnet_depth=18, width_multiplier=0.125, cifar_stem=True,
            proj_out_dim=16)
TINY_RUN = {
    'dataset': 'digits', 'eval_split': 'test', 'image_size': 16,
    'resnet_depth': 18, 'width_multiplier': 0.125, 'proj_out_dim': 16,
    'train_batch_size': 128, 'eval_batch_size': 256, 'warmup_epochs': 0,
    'learning_rate': 0.5, 'use_blur': False, 'train_summary_steps': 0,
    'mode': 'train', 'seed': 0,
}


def blobs(num_classes, per_class, dim=16, spread=0.05, seed=0):
  """Well separated Gaussian blobs: centres on distinct axes."""
  rng = np.random.default_rng(seed)
  centres = np.eye(num_classes, dim) * 5.0
  labels = np.repeat(np.arange(num_classes), per_class)
  x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
  return x.astype(np.float32), labels


def set_run_flags(**overrides):
  FLAGS.unparse_flags()
  FLAGS(['run.py'] + [f'--{k}={v}' for k, v in {**TINY_RUN,
                                                 **overrides}.items()])


# ------------------------------------------------------------------ kNN


def naive_knn_scores(train_x, train_y, query_x, k, temperature, num_classes):
  """Independent per-example loop: Σ exp(s/τ) over the k nearest."""
  train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  scores = np.zeros((len(query_x), num_classes))
  for q, x in enumerate(query_x):
    sims = train @ (x / np.linalg.norm(x))
    for i in np.argsort(-sims)[:k]:
      scores[q, train_y[i]] += np.exp(sims[i] / temperature)
  return scores


def test_knn_scores_match_a_naive_loop():
  rng = np.random.default_rng(1)
  train_x = rng.normal(size=(300, 8))
  train_y = rng.integers(0, 4, 300)
  query_x = rng.normal(size=(37, 8))
  ours = evaluate.knn_scores(train_x, train_y, query_x, k=25,
                             temperature=0.2, num_classes=4, chunk_size=10)
  naive = naive_knn_scores(train_x, train_y, query_x, 25, 0.2, 4)
  # Ours omits the per-row constant factor exp(1/τ).
  np.testing.assert_allclose(ours * np.exp(1 / 0.2), naive, rtol=1e-4)


def test_knn_separable_blobs_are_perfect_and_random_labels_are_chance():
  x, y = blobs(10, 60)
  test_x, test_y = blobs(10, 30, seed=1)
  result = evaluate.knn_eval(x, y, test_x, test_y, k=200, temperature=0.1)
  assert result['top_1'] == 1.0
  assert (result['k'], result['temperature']) == (200, 0.1)
  assert (result['num_train'], result['num_test']) == (600, 300)

  rng = np.random.default_rng(2)
  rand_x = rng.normal(size=(2000, 32))
  rand_test = rng.normal(size=(2000, 32))
  chance = evaluate.knn_eval(rand_x, rng.integers(0, 10, 2000), rand_test,
                             rng.integers(0, 10, 2000))
  assert 0.06 < chance['top_1'] < 0.14


def test_knn_k_is_capped_by_the_training_set():
  x, y = blobs(3, 4)
  result = evaluate.knn_eval(x, y, x, y, k=200)
  assert result['k'] == 12 and result['top_1'] == 1.0


# ------------------------------------------------------- logistic regression


def test_logistic_regression_separable_blobs_and_random_labels():
  x, y = blobs(5, 80)
  test_x, test_y = blobs(5, 40, seed=3)
  grid = [1e-4, 1e-2, 1.0]
  result = evaluate.logistic_regression_eval(x, y, test_x, test_y, grid=grid)
  assert result['top_1'] == 1.0
  assert result['l2'] in grid and len(result['holdout_curve']) == 3
  assert result['grid'] == sorted(grid, reverse=True)
  assert result['holdout_fraction'] == 0.2

  rng = np.random.default_rng(4)
  chance = evaluate.logistic_regression_eval(
      rng.normal(size=(1500, 20)), rng.integers(0, 10, 1500),
      rng.normal(size=(2000, 20)), rng.integers(0, 10, 2000),
      grid=[1e-3, 1e-1, 10.0])
  assert 0.06 < chance['top_1'] < 0.14


def test_logistic_fit_minimises_mean_ce_plus_half_l2_norm():
  """The λ ↔ scikit-learn C mapping: the gradient of the stated objective
  mean CE + λ/2‖W‖² (bias unpenalised), computed with NumPy, vanishes."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(200, 6))
  y = rng.integers(0, 3, 200)
  l2 = 0.05
  clf = evaluate._fit_logistic(x, y, l2, max_iter=5000)  # pylint: disable=protected-access
  logits = x @ clf.coef_.T + clf.intercept_
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  residual = p - np.eye(3)[y]
  grad_w = residual.T @ x / len(x) + l2 * clf.coef_
  grad_b = residual.mean(axis=0)
  assert np.abs(grad_w).max() < 1e-4
  assert np.abs(grad_b).max() < 1e-4


# ------------------------------------------------------ feature extraction


def test_features_from_checkpoint_and_saved_model_agree(tmp_path):
  source = data_lib.get_data_source('digits')
  source = source.subset('test', np.arange(0, 360, 9))  # 40 examples
  model = evaluate.build_encoder_model(0, image_size=16, **ARCH)
  prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / 'ckpt-1'))
  exported = checkpoints.export_saved_model(model, str(tmp_path), 1, 1)

  other = evaluate.build_encoder_model(-1, image_size=16, **ARCH)
  evaluate.restore_encoder(other, prefix, layer=-1)
  dataset = evaluate.feature_dataset(source, 'test', 16, 16)
  from_ckpt, labels, ids = evaluate.extract_features(
      evaluate.model_encoder(other, 0), dataset)
  from_saved, labels2, _ = evaluate.extract_features(
      evaluate.saved_model_encoder(exported), dataset)
  np.testing.assert_array_equal(ids, np.arange(40))
  np.testing.assert_array_equal(labels, source.example_labels('test'))
  np.testing.assert_array_equal(labels, labels2)
  assert from_ckpt.shape == (40, model.base_model(tf.zeros([1, 16, 16, 3]))
                             .shape[-1])
  np.testing.assert_allclose(from_ckpt, from_saved, rtol=1e-5, atol=1e-5)
  proj_ckpt, _, _ = evaluate.extract_features(
      evaluate.model_encoder(other, -1), dataset)
  proj_saved, _, _ = evaluate.extract_features(
      evaluate.saved_model_encoder(exported, 'projection'), dataset)
  assert proj_ckpt.shape == (40, 16)
  np.testing.assert_allclose(proj_ckpt, proj_saved, rtol=1e-5, atol=1e-5)
  pixels, _, _ = evaluate.extract_features(evaluate.pixel_encoder, dataset)
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
  evaluate.restore_encoder(
      evaluate.build_encoder_model(1, image_size=16, **ARCH), prefix, 1)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='no projection layer 2'):
    evaluate.restore_encoder(
        evaluate.build_encoder_model(2, image_size=16, **ARCH), prefix, 2)


# ------------------------------------------------------- online kNN monitor


@pytest.fixture(scope='module')
def quality_run(tmp_path_factory):
  """benchmarks/quality.py, tiny: SimCLR for 1 epoch on 20 % of digits.

  N = 287 (class-balanced, via --train_subset), batch 64: an epoch is
  round(287/64) = 4 steps and training stops at 287 // 64 + 1 = 5, so the
  kNN monitor runs once, at step 4, where a checkpoint is kept too.
  """
  work = tmp_path_factory.mktemp('quality')
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import quality  # pylint: disable=import-outside-toplevel
  results = quality.main([
      '--dataset=digits', '--epochs=1', '--width=0.125', '--image_size=16',
      '--batch_size=64', '--train_percent=20', '--objectives=simclr,nope',
      '--linear_grid_size=2', '--linear_max_iter=100', '--knn_k=50',
      '--knn_temperature=0.07', f'--workdir={work / "runs"}',
      f'--output_dir={work / "out"}'])
  return work, results


def test_knn_monitor_runs_every_epoch_and_logs(quality_run):
  model_dir = str(quality_run[0] / 'runs' / 'simclr')
  with open(os.path.join(model_dir, 'knn_monitor.json')) as f:
    history = json.load(f)
  assert [h['step'] for h in history] == [4]
  assert [h['epoch'] for h in history] == [1.0]
  assert (history[0]['k'], history[0]['temperature']) == (50, 0.07)
  # The memory bank is the --train_subset (287), the queries the test split.
  assert (history[0]['num_train'], history[0]['num_test']) == (287, 360)
  events = tf.io.gfile.glob(os.path.join(model_dir, 'knn', 'events.*'))
  assert len(events) == 1
  tags = {}
  for event in tf.compat.v1.train.summary_iterator(events[0]):
    for value in event.summary.value:
      tags.setdefault(value.tag, []).append(
          (event.step, float(tf.make_ndarray(value.tensor))))
  steps, values = zip(*tags['knn/top_1_accuracy'])
  assert list(steps) == [h['step'] for h in history]
  assert list(values) == pytest.approx([h['top_1'] for h in history])


def test_knn_monitor_matches_offline_evaluation_of_the_checkpoint(
    quality_run, tmp_path):
  """evaluate.py's CLI path on ckpt-4 reproduces the monitor's number."""
  runs = quality_run[0] / 'runs'
  with open(runs / 'simclr' / 'knn_monitor.json') as f:
    monitored = json.load(f)[0]
  evaluate.define_flags()
  set_run_flags(checkpoint=str(runs / 'simclr' / 'ckpt-4'),
                train_subset=str(runs / 'train_subset.txt'),
                knn_k=50, knn_temperature=0.07, protocols='knn,linear',
                linear_l2_grid='0.001,0.1', output_dir=str(tmp_path))
  result = evaluate.evaluate_from_flags()
  assert result['knn']['top_1'] == pytest.approx(monitored['top_1'],
                                                 abs=1.5 / 360)
  assert result['knn']['top_5'] == pytest.approx(monitored['top_5'],
                                                 abs=1.5 / 360)
  with open(tmp_path / 'feature_eval.json') as f:
    written = json.load(f)
  assert written['knn']['k'] == 50 and written['knn']['temperature'] == 0.07
  assert written['encoder']['path'].endswith('ckpt-4')
  assert written['knn']['num_train'] == 287
  assert written['linear']['grid'] == [0.1, 0.001]
  assert 0.0 <= written['linear']['top_1'] <= 1.0


def test_knn_monitor_only_fires_on_multiples_of_its_period():
  step = tf.Variable(0, dtype=tf.int64)
  calls = []
  monitor = evaluate.KnnMonitor(_FakeModel(), step, None, None,
                                period_steps=5)
  monitor.evaluate = calls.append
  monitor.start()
  for value in (3, 5, 8, 9, 12, 15, 16):
    step.assign(value)
    monitor({})
  assert calls == [5, 12, 15]  # 12: the loop that crossed step 10.


class _FakeModel:
  head_contrastive = type('Head', (), {'ft_proj_selector': 0})()


# ------------------------------------------------------------------ pictures


def test_preview_mode_writes_a_grid_of_views(tmp_path):
  set_run_flags(model_dir=str(tmp_path), mode='preview', train_epochs=1)
  path = run.run()
  image = tf.io.decode_png(tf.io.read_file(path)).numpy()
  # 8 rows of 2 views, 16 px enlarged ×6 to 96 px, 2 px gaps.
  assert image.shape == (8 * 98 + 2, 2 * 98 + 2, 3)
  assert path == os.path.join(str(tmp_path), 'preview.png')


def test_embedding_plot(tmp_path):
  x, y = blobs(3, 40)
  path = evaluate.save_embedding_plot(x, y, str(tmp_path / 't.png'),
                                      class_names=['a', 'b', 'c'])
  image = tf.io.decode_png(tf.io.read_file(path)).numpy()
  assert image.shape[0] > 100 and image.std() > 0


# --------------------------------------------------------------- benchmark


def test_quality_benchmark_end_to_end_on_digits(quality_run):
  work, results = quality_run
  assert set(results['rows']) == {'simclr', 'random encoder', 'raw pixels'}
  assert 'not registered' in results['skipped']['nope']
  assert results['train_examples'] == 287  # floor(1437 / 5)
  history = results['rows']['simclr']['knn_history']
  assert [h['epoch'] for h in history] == [1.0]
  for row in results['rows'].values():
    assert 0.0 <= row['knn']['top_1'] <= 1.0
    assert row['knn']['k'] == 50 and len(row['linear']['grid']) == 2
  out = work / 'out'
  table = (out / 'quality.md').read_text()
  assert '| simclr |' in table and '| nope | skipped' in table
  assert json.loads((out / 'quality.json').read_text())['rows']
  assert tf.io.decode_png(tf.io.read_file(
      str(out / 'quality.png'))).shape[0] > 100


def test_quality_benchmark_skips_without_data(tmp_path, capsys):
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import quality  # pylint: disable=import-outside-toplevel
  assert quality.main([f'--dataset={tmp_path}/absent', '--epochs=1',
                       f'--output_dir={tmp_path}']) is None
  assert 'skipped' in capsys.readouterr().out
  assert not os.listdir(tmp_path)


def test_distributed_features_under_two_replicas_equal_a_local_pass():
  """Every example once, in id order, the same features as one device."""
  strategy = two_replica_strategy()
  source = data_lib.get_data_source('digits')
  input_fn = data_lib.build_pass_input_fn(source, 'test', 64, 16)
  weights = tf.constant(np.random.default_rng(0).normal(
      size=(16 * 16 * 3, 5)).astype(np.float32))

  def encode(images):
    return tf.reshape(images, [tf.shape(images)[0], -1]) @ weights

  step = evaluate.distributed_feature_step(strategy, encode)
  features, labels = evaluate.collect_features(
      step, strategy.distribute_datasets_from_function(input_fn))
  reference, ref_labels, ids = evaluate.extract_features(
      encode, evaluate.feature_dataset(source, 'test', 64, 16))
  np.testing.assert_array_equal(ids, np.arange(source.num_examples('test')))
  np.testing.assert_allclose(features, reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_array_equal(labels, source.arrays('test')[1])
  # 360 rows padded to 6 global batches of 64: some padding was dropped.
  assert sum(1 for _ in input_fn(None)) == 6
