r"""Offline evaluation of frozen features, the online kNN monitor, and pictures.

  python evaluate.py --flagfile=configs/quickstart.cfg --checkpoint=runs/quickstart
  python evaluate.py --saved_model=runs/quickstart/saved_model/225 \
      --dataset=digits --image_size=16 --eval_split=test --protocols=knn,linear,tsne

Features of a frozen encoder (a checkpoint, an exported SavedModel, a
randomly initialised encoder, or the raw pixels) are extracted without
augmentation (the eval preprocessing of `data.build_input_fn`) for the train
split (`--train_split`, optionally `--train_subset`) and the test split
(`--eval_split`), then:

* kNN (`knn_eval`): weighted k-nearest-neighbour vote on cosine similarity
  (Wu et al. 2018, "instance discrimination"): with l2-normalised features,
  the k training examples most similar to a test example vote for their
  label with weight exp(s/τ); the class with the largest summed weight wins.
  Defaults k = 200, τ = 0.1.
* linear (`logistic_regression_eval`): multinomial logistic regression
  (scikit-learn, L-BFGS) on standardised features, minimising
  mean cross-entropy + λ/2·‖W‖² (bias not penalised); λ is chosen from a
  log-spaced grid (default 45 values in [1e-6, 1e5], as in Kornblith et al.
  2019 and the SimCLR transfer protocol) by accuracy on a stratified
  held-out part of the training split, then the classifier is refit on the
  whole training split with that λ and evaluated on the test split.

The results and every parameter of the protocols go to a JSON file.
`KnnMonitor` runs the same kNN protocol during pretraining (an orbit train
action; `run.py --knn_eval_epochs`), `save_view_grid` draws augmented views
(`run.py --mode=preview`) and `save_embedding_plot` a t-SNE map of features.
"""

import json
import os
import sys
import time
import warnings

from absl import app
from absl import logging
import numpy as np
import tensorflow as tf

import checkpoints
import data as data_lib
import model as model_lib
import objective

PIXELS = 'pixels'
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


def l2_normalize(x, eps=1e-12):
  """Rows of `x` scaled to unit l2 norm (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


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
  train = l2_normalize(train_x)
  query = l2_normalize(query_x)
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
# Encoders and feature extraction.
# ---------------------------------------------------------------------------


def model_encoder(model, layer=0):
  """images [b, H, W, 3] in [0, 1] → features of `model` (inference mode).

  `layer` numbers the representation as --ft_proj_selector does: 0 = ResNet
  output, -1 = last projection layer, j = projection layer j (then the
  model must have been built with ft_proj_selector=j).
  """
  head = model.head_contrastive
  if layer not in (0, -1) and head.ft_proj_selector != layer:
    raise ValueError(f'Projection layer {layer} needs a model built with '
                     f'ft_proj_selector={layer}.')

  @tf.function(reduce_retracing=True)
  def encode(images):
    hiddens = model.base_model(images, training=False)
    if layer == 0:
      return hiddens
    projection, selected = head(hiddens, training=False)
    return projection if layer == -1 else selected
  return encode


def saved_model_encoder(path, output='features'):
  """images in [0, 1] → `output` of an exported SavedModel's signature."""
  serve = tf.saved_model.load(path).signatures['serving_default']

  def encode(images):
    return serve(images=tf.convert_to_tensor(images, tf.float32))[output]
  return encode


def pixel_encoder(images):
  """The raw (eval-preprocessed) pixels as a flat feature vector."""
  return tf.reshape(images, [tf.shape(images)[0], -1])


def feature_dataset(source, split, batch_size, image_size):
  """One pass over `split` with the eval preprocessing (no augmentation)."""
  return data_lib.build_input_fn(source, split, batch_size,
                                 is_training=False, image_size=image_size,
                                 train_mode='finetune')(None)


def extract_features(encode, dataset):
  """(features float32 [N, d], labels int32 [N], ids int32 [N]) in id order."""
  feats, labels, ids = [], [], []
  for batch in dataset:
    feats.append(np.asarray(encode(batch['image']), np.float32))
    labels.append(batch['label'].numpy())
    ids.append(batch['id'].numpy())
  feats = np.concatenate(feats)
  labels = np.concatenate(labels)
  ids = np.concatenate(ids)
  order = np.argsort(ids, kind='stable')
  return feats[order].reshape(len(order), -1), labels[order], ids[order]


def distributed_feature_step(strategy, encode):
  """A tf.function: one distributed batch → (features, ids, labels) of the
  whole global batch, as host tensors.

  `encode(images) -> [b, d]` runs on every replica under `strategy` (TPU,
  GPUs or CPU); the rows are all-gathered on the accelerators, so every host
  of a pod receives all of them. Build it once and reuse it: each call of
  this function traces anew.
  """
  @tf.function
  def step(batch):
    def replica_fn(batch):
      features = tf.cast(encode(batch['image']), tf.float32)
      return tuple(objective.cross_replica_concat(t)
                   for t in (features, batch['id'], batch['label']))
    outputs = strategy.run(replica_fn, (batch,))
    return tf.nest.map_structure(
        lambda t: strategy.experimental_local_results(t)[0], outputs)
  return step


def collect_features(step, dataset):
  """(features float32 [N, d], labels int32 [N]) in id order, from a
  distributed `data.build_pass_input_fn` dataset (padding rows, id −1, are
  dropped) and a `distributed_feature_step`. Ids must be 0..N−1."""
  feats, labels, ids = [], [], []
  for batch in dataset:
    x, i, y = (t.numpy() for t in step(batch))
    keep = i >= 0
    feats.append(x[keep])
    ids.append(i[keep])
    labels.append(y[keep])
  feats, ids, labels = (np.concatenate(a) for a in (feats, ids, labels))
  order = np.argsort(ids, kind='stable')
  if not np.array_equal(ids[order], np.arange(len(ids))):
    raise ValueError(f'A feature pass must see every id 0..N−1 once; got '
                     f'{len(ids)} rows, {len(np.unique(ids))} distinct ids.')
  return feats[order].reshape(len(ids), -1), labels[order]


def build_encoder_model(layer=0, **architecture):
  """A pretraining-mode `model.Model` (no supervised head) for features.

  `architecture`: resnet_depth, width_multiplier, cifar_stem, sk_ratio,
  se_ratio, proj_head_mode, proj_out_dim, num_proj_layers, image_size (for
  building the variables).
  """
  image_size = architecture.pop('image_size', 32)
  model = model_lib.Model(
      1, train_mode='pretrain', lineareval_while_pretraining=False,
      ft_proj_selector=layer if layer > 0 else 0, **architecture)
  model(tf.zeros([1, image_size, image_size, 3]), training=False)
  return model


def restore_encoder(model, path, layer=0):
  """Reads the backbone (and the projection layers up to `layer`) of `path`.

  Returns the checkpoint prefix. A variable of another shape, or a missing
  backbone or needed projection variable, is a
  `checkpoints.CheckpointMismatchError` naming them.
  """
  prefix = checkpoints.resolve_checkpoint_path(path)
  if layer == 0:
    schema = checkpoints.BACKBONE_PREFIX
  else:
    schema = (f'(?:{checkpoints.BACKBONE_PREFIX}|'
              f'{model_lib.PROJECTION_HEAD_NAME}/)')
  restored = set(checkpoints.warm_start(model, prefix, schema))
  head = model.head_contrastive
  needed = head.linear_layers if layer == -1 else head.linear_layers[:layer]
  needed_ids = {id(v) for lyr in needed for v in lyr.variables}
  missing = [name for name, var in checkpoints.variable_paths(model).items()
             if id(var) in needed_ids and name not in restored]
  if missing:
    raise checkpoints.CheckpointMismatchError(
        f'{prefix} has no projection layer {layer} (not in the checkpoint: '
        f'{missing[:5]}); a fine-tuned checkpoint keeps only the layers up to '
        'its --ft_proj_selector.')
  return prefix


# ---------------------------------------------------------------------------
# Online kNN monitor (orbit train action).
# ---------------------------------------------------------------------------


class KnnMonitor:
  """kNN top-1/top-5 of the current encoder every `period_steps` steps.

  An orbit train action (called after every host loop); it evaluates when
  the global step reaches a multiple of `period_steps` (run.py makes
  steps_per_loop divide it). Memory bank: ResNet features of the training
  split, query: the eval split, both with the eval preprocessing, exactly as
  `evaluate.py`'s offline kNN; the features are computed under `strategy`
  (`distributed_feature_step`) from the distributed one-pass datasets that
  `train_dataset_fn` and `eval_dataset_fn` return
  (`data.build_pass_input_fn`). Results go to TensorBoard (`summary_dir`,
  tags knn/top_1_accuracy, knn/top_5_accuracy), to the log, and to
  `history_path` (a JSON list, appended across restarts).
  """

  def __init__(self, model, global_step, train_dataset_fn, eval_dataset_fn,
               period_steps, steps_per_epoch=None, k=200, temperature=0.1,
               num_classes=None, summary_dir=None, history_path=None,
               strategy=None):
    self.global_step = global_step
    self.encode = model_encoder(model, 0)
    self.strategy = strategy or tf.distribute.get_strategy()
    self._step = None
    self.train_dataset_fn = train_dataset_fn
    self.eval_dataset_fn = eval_dataset_fn
    self.period_steps = int(period_steps)
    self.steps_per_epoch = steps_per_epoch
    self.k = k
    self.temperature = temperature
    self.num_classes = num_classes
    self.summary_dir = summary_dir
    self.history_path = history_path
    self.history = []
    if history_path and tf.io.gfile.exists(history_path):
      with tf.io.gfile.GFile(history_path) as f:
        self.history = json.load(f)
    self._writer = None
    self._last_step = None

  def start(self):
    """Marks the current step as seen (call before training resumes)."""
    self._last_step = int(self.global_step.numpy())

  def __call__(self, outputs=None):
    del outputs
    step = int(self.global_step.numpy())
    if self._last_step is None:
      due = step % self.period_steps == 0
    else:
      due = step // self.period_steps > self._last_step // self.period_steps
    self._last_step = step
    if due and step > 0:
      self.evaluate(step)

  def evaluate(self, step):
    start = time.time()
    if self._step is None:
      self._step = distributed_feature_step(self.strategy, self.encode)
    train_x, train_y = collect_features(self._step, self.train_dataset_fn())
    test_x, test_y = collect_features(self._step, self.eval_dataset_fn())
    result = knn_eval(train_x, train_y, test_x, test_y, self.k,
                      self.temperature, self.num_classes)
    result.pop('protocol')
    result['step'] = step
    if self.steps_per_epoch:
      result['epoch'] = step / self.steps_per_epoch
    result['seconds'] = round(time.time() - start, 2)
    logging.info('kNN monitor at step %d: top-1 %.4f, top-5 %.4f (k=%d, '
                 'temperature %g, %d train / %d eval examples, %.1f s).',
                 step, result['top_1'], result['top_5'], result['k'],
                 self.temperature, result['num_train'], result['num_test'],
                 result['seconds'])
    if self.summary_dir:
      if self._writer is None:
        self._writer = tf.summary.create_file_writer(self.summary_dir)
      with self._writer.as_default():
        tf.summary.scalar('knn/top_1_accuracy', result['top_1'], step=step)
        tf.summary.scalar('knn/top_5_accuracy', result['top_5'], step=step)
      self._writer.flush()
    self.history = [h for h in self.history if h['step'] != step] + [result]
    if self.history_path:
      checkpoints.write_json(self.history_path, self.history)
    return result


# ---------------------------------------------------------------------------
# Pictures.
# ---------------------------------------------------------------------------


def save_view_grid(dataset, num_views, path, max_images=8, scale=None,
                   gap=2):
  """PNG of augmented views: one row per image, its V views side by side.

  `dataset` yields batches {'image': [b, H, W, 3V]} in [0, 1]; small images
  are enlarged (nearest neighbour, `scale`, default to ≥ 96 px) and
  separated by `gap` white pixels.
  """
  images = next(iter(dataset))['image'][:max_images].numpy()
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
  png = tf.io.encode_png(np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8))
  tf.io.gfile.makedirs(os.path.dirname(os.path.abspath(path)))
  tf.io.write_file(path, png)
  return path


def save_embedding_plot(features, labels, path, class_names=None,
                        max_points=2000, seed=0, title=None, threads=1):
  """2-D t-SNE (scikit-learn) of l2-normalised features coloured by label.

  At most `max_points` examples (a fixed random sample) are embedded;
  `threads`: see `limit_threads`.
  """
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  from sklearn import manifold
  features = l2_normalize(features)
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  if len(features) > max_points:
    keep = np.sort(rng.choice(len(features), max_points, replace=False))
    features, labels = features[keep], labels[keep]
  perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
  with limit_threads(threads):
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


# ---------------------------------------------------------------------------
# Command line (flags are defined only when this file is run as a script).
# ---------------------------------------------------------------------------


def define_flags():
  """evaluate.py's own flags; the data and model flags are run.py's."""
  from absl import flags
  if 'saved_model' in flags.FLAGS:
    return
  flags.DEFINE_string('saved_model', None, 'Evaluate this exported '
                      'SavedModel (model_dir/saved_model/<step>) instead of '
                      '--checkpoint.')
  flags.DEFINE_string('feature_layer', '0', 'Which representation: 0 = '
                      'ResNet output, j = projection layer j, -1 = the last '
                      '(SavedModel: 0 or -1), or "pixels" (raw pixels, no '
                      'encoder).')
  flags.DEFINE_list('protocols', ['knn', 'linear'], 'Any of knn, linear, '
                    'tsne.')
  flags.DEFINE_list('linear_l2_grid', [], 'L2 strengths to choose from; '
                    'empty: 45 log-spaced values in [1e-6, 1e5].')
  flags.DEFINE_float('linear_holdout_fraction', 0.2, 'Fraction of the '
                     'training split held out to choose the L2 strength.')
  flags.DEFINE_integer('linear_max_iter', 1000, 'L-BFGS iterations per fit.')
  flags.DEFINE_integer('tsne_examples', 2000, 'Test examples in the t-SNE '
                       'plot.')
  flags.DEFINE_string('output_dir', None, 'Where feature_eval.json (and '
                      'tsne.png) go; default: --model_dir, else the '
                      'checkpoint or SavedModel directory.')


def evaluate_from_flags():
  """Runs the protocols named by --protocols; writes feature_eval.json.

  Uses run.py's data and model flags plus those of `define_flags`.
  """
  from absl import flags
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if FLAGS.seed is not None:
    import tf_keras
    tf_keras.utils.set_random_seed(FLAGS.seed)
  if FLAGS.checkpoint and FLAGS.saved_model:
    sys.exit('evaluate.py: error: pass --checkpoint or --saved_model, not '
             'both.')
  unknown = set(FLAGS.protocols) - {'knn', 'linear', 'tsne'}
  if unknown:
    sys.exit(f'evaluate.py: error: unknown --protocols {sorted(unknown)}.')
  output_dir = FLAGS.output_dir or FLAGS.model_dir or FLAGS.saved_model
  if not output_dir and FLAGS.checkpoint:
    output_dir = (FLAGS.checkpoint if tf.io.gfile.isdir(FLAGS.checkpoint)
                  else os.path.dirname(FLAGS.checkpoint))
  if not output_dir:
    sys.exit('evaluate.py: error: pass --output_dir (or --model_dir) for a '
             'random encoder or raw pixels.')
  layer_name = FLAGS.feature_layer
  try:
    source = data_lib.get_data_source(
        FLAGS.dataset, data_dir=FLAGS.data_dir, train_split=FLAGS.train_split,
        eval_split=FLAGS.eval_split,
        skip_corrupt_images=FLAGS.skip_corrupt_images)
    if FLAGS.train_subset:
      source = data_lib.apply_subset(
          source, FLAGS.train_split,
          data_lib.read_key_list(FLAGS.train_subset))
    encoder_info = {'feature_layer': layer_name}
    if layer_name == PIXELS:
      encode = pixel_encoder
      encoder_info['kind'] = 'pixels'
    elif FLAGS.saved_model:
      outputs = {'0': 'features', '-1': 'projection'}
      if layer_name not in outputs and layer_name not in outputs.values():
        raise ValueError(f'--feature_layer={layer_name}: a SavedModel serves '
                         'only 0 (features) and -1 (projection).')
      encode = saved_model_encoder(FLAGS.saved_model,
                                   outputs.get(layer_name, layer_name))
      encoder_info.update(kind='saved_model', path=FLAGS.saved_model)
    else:
      layer = int(layer_name)
      model = build_encoder_model(
          layer, resnet_depth=FLAGS.resnet_depth,
          width_multiplier=FLAGS.width_multiplier,
          cifar_stem=FLAGS.image_size <= 32, sk_ratio=FLAGS.sk_ratio,
          se_ratio=FLAGS.se_ratio, proj_head_mode=FLAGS.proj_head_mode,
          proj_out_dim=FLAGS.proj_out_dim,
          num_proj_layers=FLAGS.num_proj_layers, image_size=FLAGS.image_size)
      encode = model_encoder(model, layer)
      if FLAGS.checkpoint:
        prefix = restore_encoder(model, FLAGS.checkpoint, layer)
        encoder_info.update(kind='checkpoint', path=prefix)
      else:
        logging.warning('No --checkpoint or --saved_model: evaluating a '
                        'randomly initialised encoder (seed %s).', FLAGS.seed)
        encoder_info.update(kind='random', seed=FLAGS.seed)
  except (ValueError, FileNotFoundError,
          checkpoints.CheckpointMismatchError) as e:
    sys.exit(f'evaluate.py: error: {e}')

  def features(split):
    return extract_features(encode, feature_dataset(
        source, split, FLAGS.eval_batch_size, FLAGS.image_size))

  start = time.time()
  train_x, train_y, _ = features(FLAGS.train_split)
  test_x, test_y, _ = features(FLAGS.eval_split)
  result = {
      'encoder': encoder_info, 'dataset': FLAGS.dataset,
      'train_split': FLAGS.train_split, 'train_subset': FLAGS.train_subset,
      'test_split': FLAGS.eval_split, 'image_size': FLAGS.image_size,
      'feature_dim': int(train_x.shape[1]),
      'extraction_seconds': round(time.time() - start, 1),
  }
  if 'knn' in FLAGS.protocols:
    result['knn'] = knn_eval(train_x, train_y, test_x, test_y, FLAGS.knn_k,
                             FLAGS.knn_temperature, source.num_classes)
    print(f'kNN (k={FLAGS.knn_k}, temperature {FLAGS.knn_temperature}): '
          f'top-1 {result["knn"]["top_1"]:.4f}')
  if 'linear' in FLAGS.protocols:
    grid = [float(v) for v in FLAGS.linear_l2_grid] or None
    result['linear'] = logistic_regression_eval(
        train_x, train_y, test_x, test_y, grid=grid,
        holdout_fraction=FLAGS.linear_holdout_fraction,
        seed=FLAGS.seed or 0, max_iter=FLAGS.linear_max_iter)
    print(f'linear (logistic regression, l2 {result["linear"]["l2"]:.3g}): '
          f'top-1 {result["linear"]["top_1"]:.4f}')
  tf.io.gfile.makedirs(output_dir)
  if 'tsne' in FLAGS.protocols:
    path = os.path.join(output_dir, 'tsne.png')
    names = getattr(source, 'classes', None)
    save_embedding_plot(test_x, test_y, path, class_names=names,
                        max_points=FLAGS.tsne_examples,
                        seed=FLAGS.seed or 0,
                        title=f'{os.path.basename(FLAGS.dataset.rstrip("/"))} '
                              f'{FLAGS.eval_split}: {encoder_info["kind"]} '
                              f'features (layer {layer_name})')
    result['tsne'] = path
    print(f'wrote {path}')
  path = os.path.join(output_dir, 'feature_eval.json')
  checkpoints.write_json(path, result)
  print(f'wrote {path}')
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  evaluate_from_flags()


if __name__ == '__main__':
  import run  # noqa: F401  (defines the data and model flags)
  define_flags()
  app.run(main)
