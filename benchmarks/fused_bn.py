r"""Fused vs non-fused batch norm: training-step time of a ResNet-18.

  python benchmarks/fused_bn.py          # ~5 min on 2 CPU cores

One process, one replica, ResNet-18 (width 1, CIFAR stem) on 32x32 random
images, a step = forward (training=True) + backward + SGD-momentum update:

  non_fused   fused_bn=False, global_bn=True: the synchronised non-fused
              layer, which the original code runs even on one replica
  fused       fused_bn=True (default): FusedBatchNormV3 where nothing is
              synchronised, same variables and numbers

The two are alternated in rounds of `--steps` steps (`timing.alternate`)
after two warm-up steps each, so load from other jobs falls on both alike,
and the median over rounds is reported, with the median of the per-round
ratios and the ratio of the fastest rounds (less disturbed by load).
Prints a table and writes benchmarks/results/fused_bn.json.
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import resnet  # noqa: E402
import timing  # noqa: E402
from timing import alternate  # noqa: E402

RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'fused_bn.json')
VARIANTS = {'non_fused': False, 'fused': True}  # name -> fused_bn


def make_step(fused_bn, weights, images):
  """A traced train step of a fresh ResNet-18 with `weights`."""
  model = resnet.resnet(18, 1, cifar_stem=True, global_bn=True,
                        fused_bn=fused_bn)
  model(images[:1], training=False)
  model.set_weights(weights)
  optimizer = tf_keras.optimizers.SGD(0.01, momentum=0.9)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(model(images, training=True)))
    variables = model.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return step


def bench(batch_size, rounds, steps):
  """({variant: median s/step}, {variant: [s/step per round]})."""
  images = tf.random.uniform([batch_size, 32, 32, 3], seed=1)
  reference = resnet.resnet(18, 1, cifar_stem=True)
  reference(images[:1], training=False)
  weights = reference.get_weights()
  fns = {name: make_step(fused, weights, images)
         for name, fused in VARIANTS.items()}
  for fn in fns.values():  # trace + warm up
    for _ in range(2):
      fn().numpy()
  return alternate(fns, rounds, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', default='256,32',
                      help='comma-separated batch sizes')
  parser.add_argument('--rounds', default='5,9',
                      help='timed rounds for each batch size')
  parser.add_argument('--steps', type=int, default=1,
                      help='steps per variant and round')
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(',')]
  rounds = [int(r) for r in args.rounds.split(',')]
  if len(rounds) != len(batches):
    parser.error('--rounds needs one count for each of --batches')

  started = time.time()
  rows = []
  for batch_size, num_rounds in zip(batches, rounds):
    medians, per_round = bench(batch_size, num_rounds, args.steps)
    paired = [a / b for a, b in zip(per_round['non_fused'], per_round['fused'])]
    rows.append({
        'batch': batch_size, 'rounds': num_rounds,
        'median_ms': {k: 1e3 * v for k, v in medians.items()},
        'non_fused_over_fused': medians['non_fused'] / medians['fused'],
        # Each round's two times share that round's machine load.
        'paired_ratio_median': statistics.median(paired),
        'min_ratio': min(per_round['non_fused']) / min(per_round['fused']),
        'rounds_ms': {k: [round(1e3 * t, 1) for t in v]
                      for k, v in per_round.items()},
    })
  result = {
      'setup': ('ResNet-18 width 1, CIFAR stem, 32x32, one replica, '
                'forward + backward + SGD step, CPU; non_fused = '
                'global_bn=True fused_bn=False (the original layer), fused '
                '= fused_bn=True'),
      'steps_per_round': args.steps,
      'results': rows,
      'environment': timing.environment(started),
  }

  print(f'{"batch":>6}{"non-fused ms":>14}{"fused ms":>11}{"speed-up":>10}'
        f'{"paired":>9}{"of minima":>11}')
  for row in rows:
    ms = row['median_ms']
    print(f'{row["batch"]:>6}{ms["non_fused"]:>14.0f}{ms["fused"]:>11.0f}'
          f'{row["non_fused_over_fused"]:>9.3f}x'
          f'{row["paired_ratio_median"]:>8.3f}x{row["min_ratio"]:>10.3f}x')
  timing.write_results(RESULTS, result, REPO)


if __name__ == '__main__':
  main()
