r"""Frozen-feature evaluation: the protocols, the online kNN monitor and the
evaluate.py command line.

  python evaluate.py --flagfile=configs/quickstart.cfg --checkpoint=/tmp/quickstart
  python evaluate.py --saved_model=/tmp/quickstart/saved_model/225 \
      --dataset=digits --image_size=16 --eval_split=test --protocols=knn,linear,tsne

Owns:

* Protocols on feature arrays: `knn_eval` / `knn_scores` — weighted
  k-nearest-neighbour vote on cosine similarity (Wu et al. 2018, "instance
  discrimination"): with l2-normalised features, the k training examples
  most similar to a test example vote for their label with weight exp(s/τ);
  the class with the largest summed weight wins (defaults k = 200,
  τ = 0.1). `logistic_regression_eval` — multinomial logistic regression
  (scikit-learn, L-BFGS) on standardised features, minimising
  mean cross-entropy + λ/2·‖W‖² (bias not penalised); λ is chosen from a
  log-spaced grid (default 45 values in [1e-6, 1e5], as in Kornblith et al.
  2019 and the SimCLR transfer protocol) by accuracy on a stratified
  held-out part of the training split, then the classifier is refit on the
  whole training split with that λ and evaluated on the test split.
  `top_k_accuracy`, `limit_threads`.
* `KnnMonitor`: the kNN protocol during pretraining (an orbit train action,
  `run.py --knn_eval_epochs`).
* `evaluate_features`: the features of a frozen encoder (a checkpoint, an
  exported SavedModel, a randomly initialised encoder, or the raw pixels;
  features.py), extracted under a tf.distribute strategy without
  augmentation for the train split (optionally a `--train_subset`) and the
  test split (`--eval_split`), then the protocols of `--protocols` (knn,
  linear, and tsne: `pictures.save_embedding_plot`); the results and every
  parameter go to feature_eval.json. It takes typed configs (config.py).
* `main`, the command line: the only code here that reads flags.
"""

import os
import sys
import time
import warnings

from absl import app
from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras

import actions
import checkpoints
import clustering
import config
import data as data_lib
import features
import pictures

PIXELS = 'pixels'
PROTOCOLS = ('knn', 'linear', 'tsne')
DEFAULT_L2_GRID = tuple(float(v) for v in np.logspace(-6, 5, 45))


# ---------------------------------------------------------------------------
# Protocols on feature arrays.
# ---------------------------------------------------------------------------


def limit_threads(threads):
  """Context capping BLAS and OpenMP thread pools (None: no cap).

  Their worker threads spin-wait; on a busy machine (the shared 2-core one
  here) one thread made these small fits, kNN products and t-SNE 4–80×
  faster than the default pools.
  """
  from threadpoolctl import threadpool_limits
  return threadpool_limits(limits=threads)


def top_k_accuracy(scores, labels, k):
  """Fraction of rows whose label is among the k highest scores."""
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def knn_scores(train_x, train_y, query_x, k=200, temperature=0.1,
               num_classes=None, chunk_size=512):
  """Weighted kNN class scores [n_query, C] on cosine similarity.

  score[q, c] = Σ_{i ∈ top-k(q), y_i = c} exp((s_qi − 1)/τ) with
  s_qi = cos(query q, train i). The constant −1 (s ≤ 1) only rescales each
  row, keeping exp() finite for small τ without changing the vote. Vectorised
  over chunks of queries (top-k by argpartition, votes by bincount).
  """
  train = clustering.l2_normalize(train_x)
  query = clustering.l2_normalize(query_x)
  train_y = np.asarray(train_y, np.int64)
  num_classes = int(num_classes or train_y.max() + 1)
  k = int(min(k, len(train)))
  scores = np.zeros((len(query), num_classes), np.float64)
  for start in range(0, len(query), chunk_size):
    sims = query[start:start + chunk_size] @ train.T
    rows = len(sims)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(sims, top, axis=1).astype(np.float64)
    weights = np.exp((top_sims - 1.0) / temperature)
    slots = np.arange(rows)[:, None] * num_classes + train_y[top]
    scores[start:start + rows] = np.bincount(
        slots.ravel(), weights=weights.ravel(),
        minlength=rows * num_classes).reshape(rows, num_classes)
  return scores


def knn_eval(train_x, train_y, test_x, test_y, k=200, temperature=0.1,
             num_classes=None, threads=1):
  """Weighted kNN accuracy (see `knn_scores`) with its protocol parameters.

  `threads`: see `limit_threads`.
  """
  test_y = np.asarray(test_y)
  num_classes = int(num_classes or max(np.max(train_y), np.max(test_y)) + 1)
  with limit_threads(threads):
    scores = knn_scores(train_x, train_y, test_x, k, temperature, num_classes)
  return {
      'top_1': top_k_accuracy(scores, test_y, 1),
      'top_5': top_k_accuracy(scores, test_y, 5),
      'k': int(min(k, len(train_x))),
      'temperature': float(temperature),
      'num_train': int(len(train_x)),
      'num_test': int(len(test_x)),
      'protocol': 'weighted kNN vote (Wu et al. 2018): l2-normalised '
                  'features, cosine similarity s, the k most similar '
                  'training examples vote with weight exp(s/temperature)',
  }


def _holdout_split(labels, holdout_fraction, seed):
  """(fit_idx, holdout_idx): stratified when every class has ≥ 2 examples."""
  from sklearn import model_selection
  idx = np.arange(len(labels))
  _, counts = np.unique(labels, return_counts=True)
  stratify = labels if counts.min() >= 2 else None
  try:
    return model_selection.train_test_split(
        idx, test_size=holdout_fraction, random_state=seed, stratify=stratify)
  except ValueError:  # Too few examples for a stratified split.
    return model_selection.train_test_split(
        idx, test_size=holdout_fraction, random_state=seed)


def _fit_logistic(x, y, l2, max_iter, previous=None):
  """L-BFGS multinomial logistic regression: mean CE + l2/2·‖W‖².

  scikit-learn minimises C·Σ CE + ½‖W‖², so C = 1/(l2·n). `previous`
  (a fitted classifier on the same classes) warm-starts the solver.
  """
  from sklearn import exceptions
  from sklearn import linear_model
  clf = linear_model.LogisticRegression(
      C=1.0 / (l2 * len(x)), solver='lbfgs', max_iter=max_iter,
      warm_start=previous is not None)
  if previous is not None:
    clf.coef_ = previous.coef_.copy()
    clf.intercept_ = previous.intercept_.copy()
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', exceptions.ConvergenceWarning)
    clf.fit(x, y)
  return clf


def _standardizer(x, enabled):
  if not enabled:
    return lambda v: np.asarray(v, np.float64)
  mean = x.mean(axis=0)
  std = x.std(axis=0)
  std[std < 1e-8] = 1.0
  return lambda v: (np.asarray(v, np.float64) - mean) / std


def logistic_regression_eval(train_x, train_y, test_x, test_y, grid=None,
                             holdout_fraction=0.2, seed=0, max_iter=1000,
                             standardize=True, threads=1):
  """Linear evaluation: L2-regularised multinomial logistic regression.

  1. Split the training set into fit / held-out parts (stratified,
     `holdout_fraction`, `seed`).
  2. For every λ of `grid` (strongest first, each fit warm-started from the
     previous one) fit on the fit part, score the held-out part.
  3. Refit on the whole training set with the best λ (ties: the strongest)
     and report top-1 / top-5 on the test set.

  Features are standardised with the statistics of the data each classifier
  is fitted on (`standardize`). The objective is mean CE + λ/2·‖W‖².
  `threads`: see `limit_threads`.
  """
  with limit_threads(threads):
    return _logistic_regression_eval(train_x, train_y, test_x, test_y, grid,
                                     holdout_fraction, seed, max_iter,
                                     standardize)


def _logistic_regression_eval(train_x, train_y, test_x, test_y, grid,
                              holdout_fraction, seed, max_iter, standardize):
  train_x = np.asarray(train_x, np.float64)
  test_x = np.asarray(test_x, np.float64)
  train_y = np.asarray(train_y)
  test_y = np.asarray(test_y)
  grid = sorted((float(v) for v in (grid or DEFAULT_L2_GRID)), reverse=True)
  start = time.time()
  fit_idx, hold_idx = _holdout_split(train_y, holdout_fraction, seed)
  scale = _standardizer(train_x[fit_idx], standardize)
  fit_x, hold_x = scale(train_x[fit_idx]), scale(train_x[hold_idx])
  curve = []
  clf = None
  for l2 in grid:
    clf = _fit_logistic(fit_x, train_y[fit_idx], l2, max_iter, clf)
    curve.append(float(np.mean(clf.predict(hold_x) == train_y[hold_idx])))
  best = int(np.argmax(curve))  # First maximum = strongest regularisation.
  scale = _standardizer(train_x, standardize)
  final = _fit_logistic(scale(train_x), train_y, grid[best], max_iter)
  probs = final.predict_proba(scale(test_x))
  scores = np.full((len(test_x), int(max(train_y.max(), test_y.max()) + 1)),
                   -np.inf)
  scores[:, final.classes_] = probs
  return {
      'top_1': top_k_accuracy(scores, test_y, 1),
      'top_5': top_k_accuracy(scores, test_y, 5),
      'l2': grid[best],
      'holdout_top_1': curve[best],
      'grid': grid,
      'holdout_curve': curve,
      'holdout_fraction': float(holdout_fraction),
      'seed': seed,
      'max_iter': int(max_iter),
      'standardize': bool(standardize),
      'num_train': int(len(train_x)),
      'num_test': int(len(test_x)),
      'seconds': round(time.time() - start, 2),
      'protocol': 'multinomial logistic regression (scikit-learn, L-BFGS) '
                  'minimising mean cross-entropy + l2/2*|W|^2 on '
                  'standardised features; l2 chosen on a stratified '
                  'held-out part of the training split, then refit on all '
                  'of it',
  }


# ---------------------------------------------------------------------------
# Online kNN monitor (orbit train action).
# ---------------------------------------------------------------------------


class KnnProbe:
  """The kNN protocol (`knn_eval`) on the current weights of a model.

  Memory bank: ResNet features of the training split, queries: the eval
  split, both with the eval preprocessing, exactly as `evaluate.py`'s
  offline kNN; the features are computed under `strategy`
  (`features.FeatureExtractor`) from the distributed one-pass datasets that
  `train_dataset_fn` and `eval_dataset_fn` return (`features.pass_dataset_fn`).
  Used by `KnnMonitor` during pretraining and for the final encoder's kNN
  at the end of a pretraining run (experiment.py).
  """

  def __init__(self, model, train_dataset_fn, eval_dataset_fn, k=200,
               temperature=0.1, num_classes=None, strategy=None):
    self.extract = features.FeatureExtractor(
        strategy or tf.distribute.get_strategy(),
        features.model_encoder(model, 0))
    self.train_dataset_fn = train_dataset_fn
    self.eval_dataset_fn = eval_dataset_fn
    self.k = k
    self.temperature = temperature
    self.num_classes = num_classes

  def __call__(self):
    """`knn_eval`'s result without 'protocol', plus 'seconds' (extraction
    of both splits and the vote) and 'extraction_seconds'."""
    start = time.time()
    train_x, train_y = self.extract(self.train_dataset_fn())
    test_x, test_y = self.extract(self.eval_dataset_fn())
    extracted = time.time()
    result = knn_eval(train_x, train_y, test_x, test_y, self.k,
                      self.temperature, self.num_classes)
    result.pop('protocol')
    result['extraction_seconds'] = round(extracted - start, 2)
    result['seconds'] = round(time.time() - start, 2)
    return result


class KnnMonitor(actions.PeriodicAction):
  """kNN top-1/top-5 (`KnnProbe`) of the current encoder every
  `period_steps` steps and at `final_step`.

  An orbit train action with the `actions.PeriodicAction` due rule (at the
  first host-loop boundary at or after each multiple, and after the loop
  that reaches `final_step`, the run's train_steps, which is rarely a
  multiple). Results go to TensorBoard (`summary_dir`, tags
  knn/top_1_accuracy, knn/top_5_accuracy), to the log, and to
  `history_path` (a JSON list, one record per step, appended across
  restarts); `scored[step]` keeps this process's records.
  """

  def __init__(self, model, global_step, train_dataset_fn, eval_dataset_fn,
               period_steps, steps_per_epoch=None, k=200, temperature=0.1,
               num_classes=None, strategy=None, history_path=None,
               summary_dir=None, final_step=None):
    super().__init__(global_step, period_steps, history_path=history_path,
                     summary_dir=summary_dir, final_step=final_step)
    self.probe = KnnProbe(model, train_dataset_fn, eval_dataset_fn, k,
                          temperature, num_classes, strategy)
    self.steps_per_epoch = steps_per_epoch
    self.k = k
    self.temperature = temperature
    # {step: record} of this process only: every worker of a multi-worker
    # run has the same (the history file is the chief's), so reusing one
    # never leaves a worker alone in a collective pass.
    self.scored = {}

  def run(self, step, outputs):
    """Evaluates at `step`; returns the history record."""
    del outputs
    result = self.probe()
    result['step'] = step
    if self.steps_per_epoch:
      result['epoch'] = step / self.steps_per_epoch
    logging.info('kNN monitor at step %d: top-1 %.4f, top-5 %.4f (k=%d, '
                 'temperature %g, %d train / %d eval examples, %.1f s).',
                 step, result['top_1'], result['top_5'], result['k'],
                 self.temperature, result['num_train'], result['num_test'],
                 result['seconds'])
    self.write_scalars(step, {'knn/top_1_accuracy': result['top_1'],
                              'knn/top_5_accuracy': result['top_5']})
    self.scored[step] = result
    return result


# ---------------------------------------------------------------------------
# Offline evaluation of a frozen encoder (evaluate.py).
# ---------------------------------------------------------------------------


def _output_dir(feature_cfg, checkpoint, model_dir):
  """Where feature_eval.json goes: --output_dir, else next to the evaluated
  encoder (the SavedModel's directory, the checkpoint's directory or the
  directory a checkpoint prefix is in), else --model_dir (a random encoder
  or raw pixels; a --flagfile's model_dir is never used for an encoder that
  has its own directory). None: none of them."""
  if feature_cfg.output_dir:
    return feature_cfg.output_dir
  if feature_cfg.feature_layer != PIXELS:
    if feature_cfg.saved_model:
      return feature_cfg.saved_model
    if checkpoint:
      return (checkpoint if tf.io.gfile.isdir(checkpoint)
              else os.path.dirname(checkpoint) or '.')
  return model_dir


def _load_source(data_cfg):
  source = data_lib.get_data_source(
      data_cfg.dataset, data_dir=data_cfg.data_dir,
      train_split=data_cfg.train_split, eval_split=data_cfg.eval_split,
      skip_corrupt_images=data_cfg.skip_corrupt_images)
  if data_cfg.train_subset:
    source = data_lib.apply_subset(
        source, data_cfg.train_split,
        data_lib.read_key_list(data_cfg.train_subset))
  return source


def _build_encoder(model_cfg, image_size, feature_cfg, checkpoint, seed):
  """(encode, encoder_info) of --feature_layer; build under a strategy."""
  layer_name = feature_cfg.feature_layer
  info = {'feature_layer': layer_name}
  if layer_name == PIXELS:
    info['kind'] = 'pixels'
    return features.pixel_encoder, info
  if feature_cfg.saved_model:
    outputs = {'0': 'features', '-1': 'projection'}
    if layer_name not in outputs and layer_name not in outputs.values():
      raise ValueError(f'--feature_layer={layer_name}: a SavedModel serves '
                       'only 0 (features) and -1 (projection).')
    info.update(kind='saved_model', path=feature_cfg.saved_model)
    return features.saved_model_encoder(
        feature_cfg.saved_model, outputs.get(layer_name, layer_name)), info
  layer = int(layer_name)
  model = features.build_encoder_model(
      layer, resnet_depth=model_cfg.resnet_depth,
      width_multiplier=model_cfg.width_multiplier,
      cifar_stem=image_size <= 32, sk_ratio=model_cfg.sk_ratio,
      se_ratio=model_cfg.se_ratio, proj_head_mode=model_cfg.proj_head_mode,
      proj_out_dim=model_cfg.proj_out_dim,
      num_proj_layers=model_cfg.num_proj_layers, image_size=image_size)
  if checkpoint:
    info.update(kind='checkpoint',
                path=features.restore_encoder(model, checkpoint, layer))
  else:
    logging.warning('No --checkpoint or --saved_model: evaluating a '
                    'randomly initialised encoder (seed %s).', seed)
    info.update(kind='random', seed=seed)
  return features.model_encoder(model, layer), info


def evaluate_features(data_cfg, model_cfg, knn_cfg, feature_cfg,
                      checkpoint=None, model_dir=None, seed=None,
                      strategy=None):
  """Runs the protocols of `feature_cfg` on a frozen encoder; writes
  feature_eval.json (and tsne.png) to its output directory.

  data_cfg: `config.DataConfig` (dataset, splits, subset, image and batch
  size); model_cfg: `config.ModelConfig` (architecture of a checkpoint or
  random encoder); knn_cfg: `config.EvalConfig` (knn_k, knn_temperature);
  feature_cfg: `config.FeatureEvalConfig`. `checkpoint` (or
  feature_cfg.saved_model) is the encoder, none: a random one seeded with
  `seed`. Features are extracted under `strategy` (default: the current
  one). Returns the result dict; a setting or input that cannot work is a
  `config.ConfigError`.
  """
  if seed is not None:
    tf_keras.utils.set_random_seed(seed)
  if checkpoint and feature_cfg.saved_model:
    raise config.ConfigError('pass --checkpoint or --saved_model, not both.')
  unknown = set(feature_cfg.protocols) - set(PROTOCOLS)
  if unknown:
    raise config.ConfigError(f'unknown --protocols {sorted(unknown)}.')
  output_dir = _output_dir(feature_cfg, checkpoint, model_dir)
  if not output_dir:
    raise config.ConfigError(
        'a random encoder or raw pixels has no directory of its own for '
        'feature_eval.json: pass --output_dir=DIR (or --model_dir=DIR), e.g. '
        '--output_dir=/tmp/feature_eval.')
  strategy = strategy or tf.distribute.get_strategy()
  replicas = strategy.num_replicas_in_sync
  if data_cfg.eval_batch_size % replicas:
    raise config.ConfigError(f'--eval_batch_size={data_cfg.eval_batch_size} '
                             f'is not divisible by the {replicas} replicas.')
  try:
    source = _load_source(data_cfg)
    with strategy.scope():
      encode, encoder_info = _build_encoder(
          model_cfg, data_cfg.image_size, feature_cfg, checkpoint, seed)
  except (ValueError, FileNotFoundError,
          checkpoints.CheckpointMismatchError) as e:
    raise config.ConfigError(str(e)) from e
  extract = features.FeatureExtractor(strategy, encode)

  def split_features(split):
    return extract(features.pass_dataset_fn(
        strategy, source, split, data_cfg.eval_batch_size,
        data_cfg.image_size)())

  start = time.time()
  train_x, train_y = split_features(data_cfg.train_split)
  test_x, test_y = split_features(data_cfg.eval_split)
  result = {
      'encoder': encoder_info, 'dataset': data_cfg.dataset,
      'train_split': data_cfg.train_split,
      'train_subset': data_cfg.train_subset,
      'test_split': data_cfg.eval_split, 'image_size': data_cfg.image_size,
      'feature_dim': int(train_x.shape[1]),
      'extraction_seconds': round(time.time() - start, 1),
  }
  if 'knn' in feature_cfg.protocols:
    result['knn'] = knn_eval(train_x, train_y, test_x, test_y, knn_cfg.knn_k,
                             knn_cfg.knn_temperature, source.num_classes)
    print(f'kNN (k={knn_cfg.knn_k}, temperature {knn_cfg.knn_temperature}): '
          f'top-1 {result["knn"]["top_1"]:.4f}')
  if 'linear' in feature_cfg.protocols:
    result['linear'] = logistic_regression_eval(
        train_x, train_y, test_x, test_y,
        grid=list(feature_cfg.linear_l2_grid) or None,
        holdout_fraction=feature_cfg.linear_holdout_fraction,
        seed=seed or 0, max_iter=feature_cfg.linear_max_iter)
    print(f'linear (logistic regression, l2 {result["linear"]["l2"]:.3g}): '
          f'top-1 {result["linear"]["top_1"]:.4f}')
  tf.io.gfile.makedirs(output_dir)
  if 'tsne' in feature_cfg.protocols:
    path = os.path.join(output_dir, 'tsne.png')
    pictures.save_embedding_plot(
        test_x, test_y, path, class_names=getattr(source, 'classes', None),
        max_points=feature_cfg.tsne_examples, seed=seed or 0,
        title=f'{os.path.basename(data_cfg.dataset.rstrip("/"))} '
              f'{data_cfg.eval_split}: {encoder_info["kind"]} '
              f'features (layer {feature_cfg.feature_layer})')
    result['tsne'] = path
    print(f'wrote {path}')
  path = os.path.join(output_dir, 'feature_eval.json')
  checkpoints.write_json(path, result)
  print(f'wrote {path}')
  return result


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def main(argv):
  """evaluate.py: run.py's data and model flags plus
  `config.define_feature_eval_flags`; bad input exits with a message."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  fv = config.FLAGS
  try:
    evaluate_features(
        config.data_config(fv), config.model_config(fv),
        config.evaluation_config(fv), config.feature_eval_config(fv),
        checkpoint=fv.checkpoint, model_dir=fv.model_dir, seed=fv.seed)
  except config.ConfigError as e:
    sys.exit(f'evaluate.py: error: {e}')


if __name__ == '__main__':
  config.define_feature_eval_flags()
  app.run(main)
