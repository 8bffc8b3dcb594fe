r"""FNC vs SimCLR: training-step time at the same batch, split into its parts.

  python benchmarks/fnc_speed.py          # ~2-3 min on 2 CPU cores

One process, one tiny ResNet-18 (width 0.25, CIFAR stem, 32x32 random
images, LARS), the variants alternated in rounds of `--steps` steps, the
median over rounds reported, so that machine load affects all alike:

  simclr          SimCLR, 2 views
  views           FNC loss over V views with identification off
                  (fn_topk = 0): the multi-view NT-Xent, i.e. the cost of the
                  extra views alone (inherent to FNC)
  fnc_in_batch    full FNC in-batch mode (+ identification)
  keys            'views' + the momentum encoder's forward pass and the loss
                  against the current batch's keys, identification off, no
                  queue, no EMA (the inherent cost of memory mode)
  fnc_memory      full FNC memory mode (+ identification over batch and
                  queue of memory_multiplier·B keys, queue push, EMA update)

Ratios: views/simclr (extra views), fnc_in_batch/views − 1 and
fnc_memory/keys − 1 (the rest: identification, queue, EMA; target ≤ 10 %).

Whole-step differences of a few per cent drown in the noise of a shared
machine, so the rest is also measured directly, in isolation and over many
repetitions: the loss + gradient alone at the same shapes (views-only vs
full FNC, keys-only vs full memory mode with its queue push) and the EMA
update alone; their extra milliseconds are divided by the baseline step.
Prints a table and writes benchmarks/results/fnc_speed.json.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel('ERROR')  # one retrace per variant is expected

import fnc  # noqa: E402
import lars_optimizer  # noqa: E402
import model as model_lib  # noqa: E402
import objective as obj_lib  # noqa: E402
import timing  # noqa: E402
from timing import alternate  # noqa: E402

RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'fnc_speed.json')


class KeysOnly(obj_lib.Objective):
  """Multi-view loss against the current momentum keys, no identification,
  no queue (the memory-mode baseline)."""

  def __init__(self, num_views, temperature=0.1):
    super().__init__(temperature=temperature)
    self._views = num_views

  def loss(self, projections, batch, keys=None):
    del batch
    return fnc.fnc_loss(tf.math.l2_normalize(projections, -1), self._views,
                        self.temperature, 0, 1.0,
                        keys=tf.math.l2_normalize(keys, -1))


def make_step(model, optimizer, objective, encoder=None, decay=None):
  @tf.function
  def step(images, labels, ids):
    batch = {'image': images, 'label': labels, 'id': ids}
    keys = None
    if encoder is not None:
      keys = tf.stop_gradient(encoder(images, training=True))
    with tf.GradientTape() as tape:
      projections, _ = model(images, training=True)
      if keys is None:
        loss, _ = objective.loss(projections, batch)
      else:
        loss, _ = objective.loss(projections, batch, keys=keys)
    variables = model.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    if decay is not None:
      encoder.update_from(model, decay)
    return loss
  return step


def loss_only(objective, projections, keys, batch):
  @tf.function
  def fn():
    with tf.GradientTape() as tape:
      tape.watch(projections)
      loss, _ = objective.loss(projections, batch, keys=keys)
    return tape.gradient(loss, projections)
  return fn


def ema_only(encoder, model, decay):
  @tf.function
  def fn():
    with tf.control_dependencies([encoder.update_from(model, decay)]):
      return tf.constant(0)
  return fn


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--support_size', type=int, default=8)
  parser.add_argument('--memory_multiplier', type=int, default=16)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--part_steps', type=int, default=20)
  args = parser.parse_args()
  started = time.time()
  num_views = 2 + args.support_size
  batch = args.batch

  model = model_lib.Model(10, resnet_depth=18, width_multiplier=0.25,
                          cifar_stem=True, proj_out_dim=128,
                          lineareval_while_pretraining=False)
  model(tf.zeros([1, 32, 32, 6]), training=False)
  encoder = model.make_momentum_encoder()
  encoder(tf.zeros([1, 32, 32, 6]), training=False)
  encoder.copy_from(model)
  optimizer = lars_optimizer.build_optimizer('lars', 0.1, weight_decay=1e-6)

  fnc_args = dict(temperature=0.1, support_size=args.support_size)
  in_batch = fnc.FNC(memory_multiplier=0, **fnc_args)
  views_only = fnc.FNC(memory_multiplier=0, topk=0, **fnc_args)
  memory = fnc.FNC(memory_multiplier=args.memory_multiplier, **fnc_args)
  for objective in (in_batch, views_only, memory):
    objective.validate(batch, 50_000)
    objective.build(50_000, batch, projection_dim=128)

  steps = {
      'simclr': (make_step(model, optimizer, obj_lib.SimCLR(0.1)), 2),
      'views': (make_step(model, optimizer, views_only), num_views),
      'fnc_in_batch': (make_step(model, optimizer, in_batch), num_views),
      'keys': (make_step(model, optimizer, KeysOnly(num_views), encoder),
               num_views),
      'fnc_memory': (make_step(model, optimizer, memory, encoder,
                               memory.momentum_decay), num_views),
  }
  inputs = {}
  for views in {2, num_views}:
    inputs[views] = (
        tf.random.uniform([batch, 32, 32, 3 * views], seed=views),
        tf.random.uniform([batch], 0, 10, tf.int32, seed=1),
        tf.range(batch))
  # Trace and warm up; memory mode also fills its queue.
  fill = -(-args.memory_multiplier // num_views) + 1
  for name, (fn, views) in steps.items():
    for _ in range(fill if name == 'fnc_memory' else 2):
      fn(*inputs[views]).numpy()
  median, per_round = alternate(
      {name: (lambda fn=fn, views=views: fn(*inputs[views]))
       for name, (fn, views) in steps.items()}, args.rounds, args.steps)

  # The rest, in isolation: loss + gradient at the step's shapes, and EMA.
  rows = num_views * batch
  projections = tf.random.normal([rows, 128], seed=3)
  keys = tf.random.normal([rows, 128], seed=4)
  loss_batch = {'label': inputs[num_views][1], 'id': inputs[num_views][2]}
  parts = {
      'views': loss_only(views_only, projections, None, loss_batch),
      'fnc_in_batch': loss_only(in_batch, projections, None, loss_batch),
      'keys': loss_only(KeysOnly(num_views), projections, keys, loss_batch),
      'fnc_memory': loss_only(memory, projections, keys, loss_batch),
      'ema': ema_only(encoder, model, memory.momentum_decay),
  }
  for fn in parts.values():
    fn()
  part_median, _ = alternate(parts, args.rounds, args.part_steps)
  in_batch_extra = part_median['fnc_in_batch'] - part_median['views']
  memory_extra = (part_median['fnc_memory'] - part_median['keys'] +
                  part_median['ema'])

  result = {
      'setup': (f'ResNet-18 width 0.25, CIFAR stem, 32x32, batch {batch}, '
                f'V = {num_views} (support_size {args.support_size}), queue '
                f'{args.memory_multiplier}·B = '
                f'{args.memory_multiplier * batch} keys, LARS, CPU'),
      'median_ms': {k: 1e3 * v for k, v in median.items()},
      'rounds_ms': {k: [round(1e3 * t, 1) for t in v]
                    for k, v in per_round.items()},
      'parts_median_ms': {k: 1e3 * v for k, v in part_median.items()},
      'rest_measured_in_isolation': {
          'in_batch_extra_ms': 1e3 * in_batch_extra,
          'in_batch_rest_over_views_step': in_batch_extra / median['views'],
          'memory_extra_ms': 1e3 * memory_extra,
          'memory_rest_over_keys_step': memory_extra / median['keys'],
      },
      'ratios': {
          'fnc_in_batch_over_simclr': median['fnc_in_batch'] /
                                      median['simclr'],
          'fnc_memory_over_simclr': median['fnc_memory'] / median['simclr'],
          'extra_views_over_simclr': median['views'] / median['simclr'],
          'keys_over_simclr': median['keys'] / median['simclr'],
          'in_batch_rest_over_views': median['fnc_in_batch'] /
                                      median['views'] - 1,
          'memory_rest_over_keys': median['fnc_memory'] / median['keys'] - 1,
      },
      'environment': timing.environment(started),
  }
  print(result['setup'])
  print(f'{"variant":<16}{"ms/step":>10}{"x SimCLR":>10}')
  for name in steps:
    print(f'{name:<16}{1e3 * median[name]:>10.1f}'
          f'{median[name] / median["simclr"]:>10.2f}')
  ratios = result['ratios']
  print(f'extra views (inherent): x{ratios["extra_views_over_simclr"]:.2f};'
        f' in-batch rest (identification): '
        f'{100 * ratios["in_batch_rest_over_views"]:+.1f} %; memory rest '
        f'(identification, queue, EMA) over views + key encoder: '
        f'{100 * ratios["memory_rest_over_keys"]:+.1f} %')
  rest = result['rest_measured_in_isolation']
  print(f'in isolation: identification (in-batch) '
        f'{rest["in_batch_extra_ms"]:.1f} ms = '
        f'{100 * rest["in_batch_rest_over_views_step"]:.1f} % of the views '
        f'step; identification + queue + EMA (memory) '
        f'{rest["memory_extra_ms"]:.1f} ms = '
        f'{100 * rest["memory_rest_over_keys_step"]:.1f} % of the keys step')
  print('loss + grad alone (ms): ' + ', '.join(
      f'{k} {1e3 * v:.2f}' for k, v in part_median.items()))
  timing.write_results(RESULTS, result, REPO)


if __name__ == '__main__':
  main()
