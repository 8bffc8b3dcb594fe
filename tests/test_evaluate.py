"""Tests for evaluate.py: kNN and logistic-regression protocols, the online
kNN monitor, offline evaluation (library and command line), and
benchmarks/quality.py."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import config
import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = config.DataConfig(dataset='digits', eval_split='test',
                              image_size=16, eval_batch_size=256)
TINY_MODEL = config.ModelConfig(resnet_depth=18, width_multiplier=0.125,
                                proj_out_dim=16)


def blobs(num_classes, per_class, dim=16, spread=0.05, seed=0):
  """Well separated Gaussian blobs: centres on distinct axes."""
  rng = np.random.default_rng(seed)
  centres = np.eye(num_classes, dim) * 5.0
  labels = np.repeat(np.arange(num_classes), per_class)
  x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
  return x.astype(np.float32), labels


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


# ------------------------------------------------------- online kNN monitor


@pytest.fixture(scope='module')
def quality_run(tmp_path_factory):
  """benchmarks/quality.py, tiny: SimCLR for 1 epoch on 20 % of digits.

  N = 287 (class-balanced, via --train_subset), batch 64: an epoch is
  round(287/64) = 4 steps and training stops at 287 // 64 + 1 = 5, so the
  kNN monitor runs at step 4, where a checkpoint is kept too, and at the
  final step 5.
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
  assert [h['step'] for h in history] == [4, 5]  # every epoch, and the end
  assert [h['epoch'] for h in history] == [1.0, 1.25]
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
  """evaluate.py's library path on ckpt-4 reproduces the monitor's number."""
  runs = quality_run[0] / 'runs'
  with open(runs / 'simclr' / 'knn_monitor.json') as f:
    monitored = json.load(f)[0]
  result = evaluate.evaluate_features(
      dataclasses.replace(TINY_DATA,
                          train_subset=str(runs / 'train_subset.txt')),
      TINY_MODEL, config.EvalConfig(knn_k=50, knn_temperature=0.07),
      config.FeatureEvalConfig(protocols=('knn', 'linear'),
                               linear_l2_grid=(0.001, 0.1),
                               output_dir=str(tmp_path)),
      checkpoint=str(runs / 'simclr' / 'ckpt-4'), seed=0)
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
  monitor.run = lambda step, outputs: calls.append(step)
  monitor.start()
  for value in (3, 5, 8, 9, 12, 15, 16):
    step.assign(value)
    monitor({})
  assert calls == [5, 12, 15]  # 12: the loop that crossed step 10.


def test_knn_monitor_history_is_appended_across_restarts(tmp_path):
  step = tf.Variable(5, dtype=tf.int64)
  path = str(tmp_path / 'knn_monitor.json')

  def restarted_monitor():
    monitor = evaluate.KnnMonitor(_FakeModel(), step, None, None,
                                  period_steps=5, history_path=path)
    monitor.run = lambda step, outputs: {'step': step}
    return monitor

  restarted_monitor()({})
  monitor = restarted_monitor()
  monitor.start()
  step.assign(10)
  monitor({})
  assert [h['step'] for h in restarted_monitor().history] == [5, 10]


class _FakeModel:
  head_contrastive = type('Head', (), {'ft_proj_selector': 0})()


# ------------------------------------------------------- offline evaluation


def test_evaluate_features_rejects_settings_that_cannot_work(tmp_path):
  cases = [
      (dict(checkpoint='a', feature_cfg=config.FeatureEvalConfig(
          saved_model='b')), 'pass --checkpoint or --saved_model, not both.'),
      (dict(feature_cfg=config.FeatureEvalConfig(
          protocols=('knn', 'svm'), output_dir=str(tmp_path))),
       "unknown --protocols ['svm']."),
      (dict(feature_cfg=config.FeatureEvalConfig()),
       'a random encoder or raw pixels has no directory of its own for '
       'feature_eval.json: pass --output_dir=DIR (or --model_dir=DIR), e.g. '
       '--output_dir=/tmp/feature_eval.'),
      (dict(checkpoint=str(tmp_path), feature_cfg=config.FeatureEvalConfig(
          feature_layer='pixels')),
       'a random encoder or raw pixels has no directory of its own for '
       'feature_eval.json: pass --output_dir=DIR (or --model_dir=DIR), e.g. '
       '--output_dir=/tmp/feature_eval.'),
      (dict(feature_cfg=config.FeatureEvalConfig(
          saved_model=str(tmp_path), feature_layer='1')),
       '--feature_layer=1: a SavedModel serves only 0 (features) and -1 '
       '(projection).'),
  ]
  for kwargs, message in cases:
    feature_cfg = kwargs.pop('feature_cfg')
    with pytest.raises(config.ConfigError) as error:
      evaluate.evaluate_features(TINY_DATA, TINY_MODEL, config.EvalConfig(),
                                 feature_cfg, **kwargs)
    assert str(error.value) == message


def test_output_dir_is_next_to_the_evaluated_encoder(tmp_path):
  """Default: the SavedModel's / checkpoint's directory, not a --flagfile's
  --model_dir; --output_dir overrides; no encoder directory: --model_dir."""
  run_dir = tmp_path / 'pretrain'
  run_dir.mkdir()
  saved = str(run_dir / 'saved_model' / '225')
  flagfile_dir = str(tmp_path / 'flagfile_model_dir')

  def output_dir(checkpoint=None, **feature):
    return evaluate._output_dir(  # pylint: disable=protected-access
        config.FeatureEvalConfig(**feature), checkpoint, flagfile_dir)

  assert output_dir(str(run_dir)) == str(run_dir)
  assert output_dir(str(run_dir / 'ckpt-225')) == str(run_dir)
  assert output_dir(saved_model=saved) == saved
  assert output_dir(str(run_dir), output_dir='/o') == '/o'
  assert output_dir(saved_model=saved, output_dir='/o') == '/o'
  assert output_dir() == flagfile_dir  # random encoder
  assert output_dir(str(run_dir), feature_layer='pixels') == flagfile_dir


def test_command_line_end_to_end_on_raw_pixels(tmp_path):
  """python evaluate.py: absl flags → configs → feature_eval.json, whose kNN
  equals the protocol on pixels resized here; bad input exits with a
  message."""
  def evaluate_py(*flags):
    return subprocess.run([sys.executable, 'evaluate.py', *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=600)

  proc = evaluate_py('--dataset=digits', '--eval_split=test',
                     '--image_size=16', '--feature_layer=pixels',
                     '--protocols=knn,linear', '--linear_l2_grid=0.1',
                     '--knn_k=20', f'--output_dir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'feature_eval.json') as f:
    written = json.load(f)
  assert written['encoder'] == {'feature_layer': 'pixels', 'kind': 'pixels'}
  assert written['feature_dim'] == 16 * 16 * 3
  assert written['linear']['grid'] == [0.1]
  assert (f'kNN (k=20, temperature 0.1): top-1 '
          f'{written["knn"]["top_1"]:.4f}') in proc.stdout

  import data as data_lib  # pylint: disable=import-outside-toplevel
  source = data_lib.get_data_source('digits')

  def pixels(split):
    images, labels = source.arrays(split)
    resized = tf.image.resize(images / 255.0, [16, 16], method='bicubic')
    return np.clip(resized.numpy(), 0, 1).reshape(len(images), -1), labels
  expected = evaluate.knn_eval(*pixels('train'), *pixels('test'), k=20)
  assert written['knn']['top_1'] == pytest.approx(expected['top_1'],
                                                  abs=1.5 / 360)

  proc = evaluate_py('--dataset=digits', '--checkpoint=a', '--saved_model=b')
  assert proc.returncode == 1
  assert proc.stderr.strip().endswith(
      'evaluate.py: error: pass --checkpoint or --saved_model, not both.')


# --------------------------------------------------------------- benchmark


def test_quality_benchmark_end_to_end_on_digits(quality_run):
  work, results = quality_run
  assert set(results['rows']) == {'simclr', 'random encoder', 'raw pixels'}
  assert 'not registered' in results['skipped']['nope']
  assert results['train_examples'] == 287  # floor(1437 / 5)
  history = results['rows']['simclr']['knn_history']
  assert [h['epoch'] for h in history] == [1.0, 1.25]  # epoch 1, the end
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


def _quality_module():
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import quality  # pylint: disable=import-outside-toplevel
  return quality


def test_quality_benchmark_defaults_fit_a_cpu():
  quality = _quality_module()
  args = quality.parse_args(['--epochs=1'])
  assert (args.width, args.fnc_support_size, args.output_dir) == (
      0.25, 2, None)
  fnc = quality.objective_flags('fnc', args, {})
  assert fnc == {'memory_multiplier': 0, 'support_size': 2}
  assert quality.row_name('fnc', fnc, {}) == 'fnc (in-batch, support_size=2)'
  extra = quality.parse_extra_flags('fnc:support_size=0,sogclr:gamma=0.5')
  fnc = quality.objective_flags('fnc', args, extra)
  assert fnc['support_size'] == '0'
  assert quality.row_name('fnc', fnc, extra) == (
      'fnc (in-batch, support_size=0)')
  sogclr = quality.objective_flags('sogclr', args, extra)
  assert quality.row_name('sogclr', sogclr, extra) == 'sogclr (gamma=0.5)'


def test_quality_benchmark_refuses_results_of_another_data_set(tmp_path):
  quality = _quality_module()
  previous = json.dumps({'dataset': '/data/other_images', 'rows': {}})
  (tmp_path / 'quality.json').write_text(previous)
  with pytest.raises(SystemExit) as error:
    quality.main(['--dataset=digits', '--epochs=1',
                  f'--output_dir={tmp_path}'])
  assert str(error.value) == (
      f'quality.py: error: {tmp_path / "quality.json"} holds results made '
      "on data set '/data/other_images', not 'digits'; refusing to overwrite "
      'them. Pass another --output_dir (or remove that file).')
  assert os.listdir(tmp_path) == ['quality.json']
  assert (tmp_path / 'quality.json').read_text() == previous
