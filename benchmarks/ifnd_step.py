r"""IFND vs SimCLR: the in-batch loss + gradient step, 3 levels, before/after.

  python benchmarks/ifnd_step.py          # ~1-2 min on 2 CPU cores

For each global batch B of `--batches` (one replica, V = 2, d = 128,
τ = 0.1), in one process: the loss of `Objective.loss` and its gradient
w.r.t. the projections (`fnc_speed.loss_only`) for one batch of B distinct
example ids, the variants alternated in rounds (`timing.alternate`, median
over rounds):

  simclr           SimCLR's NT-Xent
  ifnd             IFND, levels (10, 30, 100), elimination, mean of levels
  ifnd_before      the same with the loss before issue 15: one
                   `cancellation_loss` per level, each with its own matmul
                   and logsumexp (kept here only, `before_cancellation_terms`)
  ifnd_any         IFND with the union of the levels (one mask)
  ifnd_attraction  IFND, attraction

Every example is labelled at every level (acceptance rate 1, uniformly
random cluster labels: about 1/10, 1/30 and 1/100 of the columns are false
negatives); no re-assignment is timed. `--metrics` also times the metrics
the trainer reads every step (contrast_acc, contrast_entropy, fn_*; without
it they are pruned from the traced step) and writes ifnd_step_metrics.json.
Prints a table and writes benchmarks/results/ifnd_step.json.
"""

import argparse
import os
import sys
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ifnd  # noqa: E402
import objective as obj_lib  # noqa: E402
from fnc_speed import loss_only  # noqa: E402
import timing  # noqa: E402
from timing import alternate  # noqa: E402

RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'ifnd_step.json')
LEVELS = (10, 30, 100)


def before_cancellation_terms(views, columns, num_views, temperature,
                              fn_masks, strategy='attraction',
                              unit_rows=False):
  """`objective.cancellation_terms` as it was before issue 15 (in-batch:
  no invalid columns): every mask recomputes the [V·b, C] logits, a one-hot
  self mask and its own masked logsumexp."""
  del unit_rows
  local_images = tf.shape(views)[0] // num_views
  num_columns = tf.shape(columns.candidates)[0]
  minus_inf = tf.cast(-float('inf'), views.dtype)
  losses = []
  for fn_mask in tf.unstack(fn_masks):
    logits = tf.matmul(views, columns.candidates,
                       transpose_b=True) / temperature
    own_rows = tf.tile(columns.own_image, [num_views, 1])
    fn_rows = tf.tile(fn_mask, [num_views, 1])
    self_column = (tf.repeat(tf.range(num_views), local_images) *
                   columns.global_batch + tf.tile(columns.index, [num_views]))
    not_self = tf.logical_not(tf.cast(tf.one_hot(self_column, num_columns),
                                      tf.bool))
    positives = tf.logical_and(own_rows, not_self)
    if strategy == 'attraction':
      numerator, denominator = tf.logical_or(positives, fn_rows), not_self
    else:
      numerator = positives
      denominator = tf.logical_and(not_self, tf.logical_not(fn_rows))
    mean_positive = tf.reduce_sum(
        tf.where(numerator, logits, tf.zeros_like(logits)), axis=1) / (
            tf.reduce_sum(tf.cast(numerator, logits.dtype), axis=1))
    per_anchor = -mean_positive + tf.reduce_logsumexp(
        tf.where(denominator, logits, minus_inf), axis=1)
    losses.append(2.0 * tf.reduce_mean(per_anchor))
  loss = tf.add_n(losses) / len(losses)
  contrast_logits = tf.where(not_self, logits, minus_inf)
  hits = tf.gather(positives, tf.argmax(contrast_logits, axis=1,
                                        output_type=tf.int32), batch_dims=1)
  prob = tf.nn.softmax(contrast_logits)
  return loss, {
      'contrast_loss': loss,
      'contrast_acc': tf.reduce_mean(tf.cast(hits, tf.float32)),
      'contrast_entropy': -tf.reduce_mean(
          tf.reduce_sum(prob * tf.math.log(prob + 1e-8), axis=-1))}


class Before(ifnd.IFND):
  """IFND whose loss is traced with `before_cancellation_terms`."""

  def loss_on_columns(self, views, columns, batch):
    with mock.patch.object(obj_lib, 'cancellation_terms',
                           before_cancellation_terms):
      return super().loss_on_columns(views, columns, batch)


def with_metrics(objective, projections, batch):
  """`loss_only` that also returns the metrics (so they are computed)."""
  @tf.function
  def fn():
    with tf.GradientTape() as tape:
      tape.watch(projections)
      loss, metrics = objective.loss(projections, batch)
    return tape.gradient(loss, projections), metrics
  return fn


def objectives(num_examples, batch_size):
  table = np.stack([np.random.default_rng(k).integers(0, k, num_examples)
                    for k in LEVELS], axis=1)
  made = {'simclr': obj_lib.SimCLR(temperature=0.1)}
  for name, cls, kwargs in (
      ('ifnd', ifnd.IFND, {}),
      ('ifnd_before', Before, {}),
      ('ifnd_any', ifnd.IFND, {'level_combine': 'any'}),
      ('ifnd_attraction', ifnd.IFND, {'strategy': 'attraction'})):
    objective = cls(temperature=0.1, num_clusters=LEVELS, **kwargs)
    objective.validate(batch_size, num_examples)
    objective.build(num_examples, batch_size, projection_dim=128)
    objective.table.assign(table, 0, 1.0)
    made[name] = objective
  return made


def bench(batch_size, args):
  projections = tf.random.normal([2 * batch_size, 128], seed=batch_size)
  rng = np.random.default_rng(batch_size)
  batch = {'id': tf.constant(rng.permutation(args.num_examples)[:batch_size],
                             tf.int32),
           'label': tf.constant(rng.integers(0, 10, batch_size), tf.int32)}
  fns = {}
  for name, objective in objectives(args.num_examples, batch_size).items():
    if args.metrics:
      fns[name] = with_metrics(objective, projections, batch)
    else:
      fns[name] = loss_only(objective, projections, None, batch)
    for _ in range(2):  # trace + warm up
      fns[name]()
  return alternate(fns, args.rounds, args.steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', default='256,1024')
  parser.add_argument('--num_examples', type=int, default=50_000)
  parser.add_argument('--rounds', type=int, default=9)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--metrics', action='store_true')
  args = parser.parse_args()
  started = time.time()
  rows = []
  for batch_size in map(int, args.batches.split(',')):
    median, per_round = bench(batch_size, args)
    rows.append({
        'global_batch': batch_size,
        'median_ms': {k: 1e3 * v for k, v in median.items()},
        'over_simclr': {k: v / median['simclr'] for k, v in median.items()},
        'ifnd_after_over_before': median['ifnd'] / median['ifnd_before'],
        'rounds_ms': {k: [round(1e3 * t, 2) for t in v]
                      for k, v in per_round.items()},
    })
  result = {
      'setup': (f'loss + gradient w.r.t. the projections'
                f'{" + metrics" if args.metrics else ""}, one replica, '
                f'V = 2, d = 128, τ = 0.1, IFND levels {LEVELS} all '
                f'labelled, N = {args.num_examples}, CPU'),
      'rows': rows,
      'environment': timing.environment(started),
  }
  print(result['setup'])
  names = list(rows[0]['median_ms'])
  print(f'{"B":>6}' + ''.join(f'{n:>17}' for n in names))
  for row in rows:
    print(f'{row["global_batch"]:>6}' + ''.join(
        f'{row["median_ms"][n]:>9.2f} ms ×{row["over_simclr"][n]:<4.2f}'
        for n in names))
  for row in rows:
    ratios = row['over_simclr']
    print(f'B = {row["global_batch"]}: IFND / SimCLR before '
          f'×{ratios["ifnd_before"]:.2f}, after ×{ratios["ifnd"]:.2f} '
          f'(IFND step ×{row["ifnd_after_over_before"]:.2f} of before)')
  output = RESULTS if not args.metrics else RESULTS.replace(
      '.json', '_metrics.json')
  timing.write_results(output, result, REPO)


if __name__ == '__main__':
  main()
