r"""SogCLR vs SimCLR: step time at the same batch, and the memory of u.

  python benchmarks/sogclr_speed.py          # ~1-2 min on 2 CPU cores

Two measurements, both in one process with the two objectives alternated
(rounds of `--steps` steps each, the median over rounds reported), so that
machine load affects both alike:

1. full training step (forward, loss, backward, LARS update) of a tiny
   ResNet-18 (width 0.25, CIFAR stem) on random 32x32 two-view batches;
2. the loss alone (loss + gradient w.r.t. the projections) at the ImageNet
   recipe's size: global batch 512, 128-d projections, and for SogCLR a u
   of N = 1,281,167 floats (ImageNet-1K train), gathered and scattered every
   step.

u costs 4·N bytes per replica (one mirrored copy each) and the same in
every checkpoint. Prints a table and writes
benchmarks/results/sogclr_speed.json.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import lars_optimizer  # noqa: E402
import model as model_lib  # noqa: E402
import objective as obj_lib  # noqa: E402
import sogcl  # noqa: E402
import timing  # noqa: E402
from timing import alternate, cycling  # noqa: E402

IMAGENET_TRAIN_EXAMPLES = 1_281_167
RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'sogclr_speed.json')


def make_objectives(num_examples, batch_size):
  simclr = obj_lib.SimCLR(temperature=0.1)
  sog = sogcl.SogCLR(temperature=0.1, gamma=0.9)
  sog.validate(batch_size, num_examples)
  sog.build(num_examples, batch_size, projection_dim=128)
  return {'simclr': simclr, 'sogclr': sog}


def id_batches(num_examples, batch_size, count, seed=0):
  """`count` batches of distinct ids, as one epoch's batches would be."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(num_examples)[:count * batch_size]
  return [tf.constant(order[k * batch_size:(k + 1) * batch_size], tf.int32)
          for k in range(count)]


def timed(step_fns, args_list, rounds, steps):
  """(median, per-round) seconds per step of each fn (`timing.alternate`),
  each called on the batches of `args_list` in turn, after two warm-up
  calls."""
  fns = {name: cycling(fn, args_list) for name, fn in step_fns.items()}
  for fn in fns.values():  # trace + warm up
    for _ in range(2):
      fn().numpy()
  return alternate(fns, rounds, steps)


def bench_model(batch_size, rounds, steps, num_examples=50_000):
  model = model_lib.Model(10, resnet_depth=18, width_multiplier=0.25,
                          cifar_stem=True, lineareval_while_pretraining=False)
  model(tf.zeros([1, 32, 32, 6]), training=False)
  optimizer = lars_optimizer.build_optimizer('lars', 0.1, weight_decay=1e-6)
  objectives = make_objectives(num_examples, batch_size)
  images = tf.random.uniform([batch_size, 32, 32, 6], seed=1)

  def make_step(objective):
    @tf.function
    def step(ids):
      with tf.GradientTape() as tape:
        projections, _ = model(images, training=True)
        loss, _ = objective.loss(projections, {'id': ids})
      variables = model.trainable_variables
      optimizer.apply_gradients(zip(tape.gradient(loss, variables),
                                    variables))
      return loss
    return step

  fns = {name: make_step(obj) for name, obj in objectives.items()}
  ids = [(t,) for t in id_batches(num_examples, batch_size, 8)]
  return timed(fns, ids, rounds, steps)


def bench_loss(batch_size, dim, num_examples, rounds, steps):
  objectives = make_objectives(num_examples, batch_size)
  projections = tf.Variable(
      tf.random.normal([2 * batch_size, dim], seed=2))

  def make_step(objective):
    @tf.function
    def step(ids):
      with tf.GradientTape() as tape:
        loss, _ = objective.loss(projections, {'id': ids})
      return tf.reduce_sum(tape.gradient(loss, projections)) + loss
    return step

  fns = {name: make_step(obj) for name, obj in objectives.items()}
  ids = [(t,) for t in id_batches(num_examples, batch_size, 16)]
  return timed(fns, ids, rounds, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model_batch', type=int, default=64)
  parser.add_argument('--model_rounds', type=int, default=7)
  parser.add_argument('--model_steps', type=int, default=3)
  parser.add_argument('--loss_batch', type=int, default=512)
  parser.add_argument('--loss_rounds', type=int, default=7)
  parser.add_argument('--loss_steps', type=int, default=10)
  args = parser.parse_args()

  started = time.time()
  model_times, model_rounds = bench_model(args.model_batch,
                                          args.model_rounds, args.model_steps)
  loss_times, loss_rounds = bench_loss(args.loss_batch, 128,
                                       IMAGENET_TRAIN_EXAMPLES,
                                       args.loss_rounds, args.loss_steps)
  ms = lambda rounds: {k: [round(1e3 * t, 2) for t in v]  # noqa: E731
                       for k, v in rounds.items()}
  u_bytes = 4 * IMAGENET_TRAIN_EXAMPLES
  result = {
      'model_step': {
          'setup': (f'ResNet-18 width 0.25, CIFAR stem, 32x32, 2 views, '
                    f'batch {args.model_batch}, LARS, CPU'),
          'simclr_ms': 1e3 * model_times['simclr'],
          'sogclr_ms': 1e3 * model_times['sogclr'],
          'sogclr_over_simclr': model_times['sogclr'] / model_times['simclr'],
          'rounds_ms': ms(model_rounds),
      },
      'loss_step': {
          'setup': (f'loss + gradient only, batch {args.loss_batch}, 128-d, '
                    f'N = {IMAGENET_TRAIN_EXAMPLES} (u gather + scatter), '
                    'CPU'),
          'simclr_ms': 1e3 * loss_times['simclr'],
          'sogclr_ms': 1e3 * loss_times['sogclr'],
          'sogclr_over_simclr': loss_times['sogclr'] / loss_times['simclr'],
          'rounds_ms': ms(loss_rounds),
      },
      'u_memory': {
          'num_examples': IMAGENET_TRAIN_EXAMPLES,
          'bytes_per_replica': u_bytes,
          'MB_per_replica': u_bytes / 1e6,
          'MiB_per_replica': u_bytes / 2**20,
          'MB_for_8_replicas': 8 * u_bytes / 1e6,
          'MB_added_to_each_checkpoint': u_bytes / 1e6,
      },
      'environment': timing.environment(started),
  }

  print(f'{"measurement":<44}{"SimCLR ms":>11}{"SogCLR ms":>11}'
        f'{"ratio":>8}')
  labels = {'model_step': f'train step, ResNet-18 x0.25, B={args.model_batch}',
            'loss_step': f'loss + grad, B={args.loss_batch}, u of 1.28M'}
  for key, label in labels.items():
    row = result[key]
    print(f'{label:<44}{row["simclr_ms"]:>11.1f}'
          f'{row["sogclr_ms"]:>11.1f}{row["sogclr_over_simclr"]:>8.3f}')
  memory = result['u_memory']
  print(f'u for ImageNet-1K (N = {memory["num_examples"]:,}): '
        f'{memory["MB_per_replica"]:.2f} MB ({memory["MiB_per_replica"]:.2f}'
        f' MiB) per replica, {memory["MB_for_8_replicas"]:.1f} MB on 8 '
        f'replicas, +{memory["MB_added_to_each_checkpoint"]:.2f} MB per '
        'checkpoint')
  timing.write_results(RESULTS, result, REPO)


if __name__ == '__main__':
  main()
