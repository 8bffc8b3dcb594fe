r"""Training throughput: the framework's step against a bare loop, MFU and
the input pipeline.

  python benchmarks/throughput.py                  # the README table, ~35 min
  python benchmarks/throughput.py --preset=quick   # one small row, ~1 min
  python benchmarks/throughput.py --objectives=simclr,sogclr \
      --precisions=float32,bfloat16 --jit=false,true --depth=50 \
      --image_size=224 --batch=64                  # your own grid
  python benchmarks/throughput.py --compare=OLD.json   # ratios to OLD

For every setting (objective, ResNet depth and width, image size, batch,
precision, jit), in one process:

* framework: the `Trainer` that run.py builds (flags -> config ->
  `Experiment` -> its controller's trainer, with the non-finite checks,
  metrics and stop check), timed as `trainer.train(steps_per_loop)` host
  loops after a warm-up loop; views/s = batch × views / median loop time.
  It is fed one real batch of the run's training pipeline (the embedded
  digits at the setting's size by default), cached and repeated, so the
  step is measured without the input pipeline.
* bare: the same model, objective loss (+ supervised head and weight decay)
  and optimizer in a minimal hand-written `tf.function` loop over the same
  batch, alternated with the framework in rounds (`--rounds`) so machine
  load falls on both alike; framework/bare is the median of the per-round
  ratios.
* FLOPs per view: forward + backward of the model, counted from the graph
  of its concrete function (`tf.compat.v1.profiler`, float_operation),
  per view. MFU = FLOPs/view × framework views/s / the matmul ceiling:
  FLOP/s of a square matmul (`--matmul_size`) in the setting's compute
  dtype, measured in this process.
* peak memory: the accelerator's peak (`tf.config.experimental.
  get_memory_info`) when there is one, else the peak resident set size of
  the process sampled every 10 ms while the setting runs (process-wide:
  it includes what earlier settings left allocated).

Rows alternate too (`--interleave`, default true): every setting is built
and warmed up first, then each round times every row in turn, so a ratio
between rows (SogCLR over SimCLR, bfloat16 over float32: `summary`) is the
median of per-round ratios; `--interleave=false` builds, times and frees
one row after the other.

The input pipeline alone (`--pipeline_dataset`, by default the CIFAR-10
JPEG folder of ../shared/data, unpacked to a temporary directory): views/s
of `data.build_input_fn`'s training batches at each setting's image size,
views, blur and `--blur_on_device`, after warm-up batches, and its ratio to
the framework step of that setting.

Prints a table and writes it as JSON (`--output`, default
benchmarks/results/throughput.json). To compare a change: run the same
command on the base commit and on the change back to back (same machine,
same session) with different `--output` files, then `--compare` one against
the other.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402

import config as config_lib  # noqa: E402
import data as data_lib  # noqa: E402
import data_util  # noqa: E402
import experiment as experiment_lib  # noqa: E402
import lars_optimizer  # noqa: E402
import model as model_lib  # noqa: E402
import quality  # noqa: E402  (resolve_dataset: the CIFAR-10 JPEG folder)
import run  # noqa: E402
import timing  # noqa: E402

RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'throughput.json')
DEFAULT_PIPELINE_DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data',
                                     'cifar10_jpeg')

# Flags of each objective for a benchmark row: in-batch negatives (no
# queue), FNC with a small support set (V = 2 + fnc_support_size views).
OBJECTIVE_FLAGS = {
    'simclr': [],
    'sogclr': ['--gamma=0.9'],
    'fnc': ['--memory_multiplier=0', '--fn_topk=10'],
    'ifnd': ['--memory_multiplier=0', '--ifnd_num_clusters=10,30,100',
             '--ifnd_acceptance=constant', '--ifnd_acceptance_rate=0.5'],
}

# The README's table: ResNet-18 (CIFAR stem) at 32x32, batch 256 for every
# objective in float32, SimCLR also in bfloat16 and with XLA; ResNet-50 at
# 224 px, batch 16 with blur in the pipeline and on the device.
PRESETS = {
    'default': [
        dict(objective=o, depth=18, width=1.0, image_size=32, batch=256,
             precision='float32', jit=False, blur=False, blur_on_device=False)
        for o in ('simclr', 'sogclr', 'fnc', 'ifnd')
    ] + [
        dict(objective='simclr', depth=18, width=1.0, image_size=32,
             batch=256, precision='bfloat16', jit=False, blur=False,
             blur_on_device=False),
        dict(objective='simclr', depth=18, width=1.0, image_size=32,
             batch=256, precision='float32', jit=True, blur=False,
             blur_on_device=False),
    ] + [
        dict(objective='simclr', depth=50, width=1.0, image_size=224,
             batch=16, precision='float32', jit=False, blur=True,
             blur_on_device=on_device) for on_device in (False, True)
    ],
    'quick': [
        dict(objective='simclr', depth=18, width=0.25, image_size=32,
             batch=64, precision='float32', jit=False, blur=False,
             blur_on_device=False),
    ],
}


def parse_bools(text):
  values = {'true': True, 'false': False, '1': True, '0': False}
  try:
    return [values[v.strip().lower()] for v in text.split(',')]
  except KeyError:
    raise argparse.ArgumentTypeError(f'expected true/false values, got '
                                     f'{text!r}') from None


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', choices=sorted(PRESETS),
                      help='a fixed grid (default: "default" unless '
                           '--objectives is given)')
  parser.add_argument('--objectives', help='comma-separated objectives: '
                      'a grid with the options below')
  parser.add_argument('--depth', type=int, default=18)
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--precisions', default='float32')
  parser.add_argument('--jit', type=parse_bools, default=[False])
  parser.add_argument('--blur', type=parse_bools, default=[False],
                      help='--use_blur values')
  parser.add_argument('--blur_on_device', type=parse_bools, default=[False])
  parser.add_argument('--fnc_support_size', type=int, default=2,
                      help='FNC support views (V = 2 + this)')
  parser.add_argument('--steps_per_loop', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=3,
                      help='timed rounds (framework and bare alternated)')
  parser.add_argument('--interleave', type=parse_bools, default=[True],
                      help='build every setting first and alternate their '
                           'rounds (cross-row ratios from the same rounds); '
                           'false: one setting after the other')
  parser.add_argument('--step_dataset', default='digits',
                      help='data of the cached step batch (and N for '
                           'SogCLR / IFND state)')
  parser.add_argument('--pipeline_dataset', default=DEFAULT_PIPELINE_DATA,
                      help='image folder (or its .tar.gz) for the pipeline '
                           'rows; "none" skips them')
  parser.add_argument('--pipeline_batches', type=int, default=20)
  parser.add_argument('--matmul_size', type=int, default=2048)
  parser.add_argument('--output', default=RESULTS)
  parser.add_argument('--compare', help='a result JSON of an earlier run: '
                      'print this run\'s ratios to it (with no grid flags: '
                      'compare --output to it without running)')
  args = parser.parse_args(argv)
  if args.objectives:
    if args.preset:
      parser.error('--preset and --objectives exclude each other')
    for name in args.objectives.split(','):
      if name not in OBJECTIVE_FLAGS:
        parser.error(f'unknown objective {name!r}; choose from '
                     f'{sorted(OBJECTIVE_FLAGS)}')
    for precision in args.precisions.split(','):
      if precision not in model_lib.PRECISION_POLICIES:
        parser.error(f'unknown precision {precision!r}; choose from '
                     f'{sorted(model_lib.PRECISION_POLICIES)}')
  return args


def settings_of(args):
  """The rows to measure: a preset or the grid of the options."""
  if not args.objectives:
    return PRESETS[args.preset or 'default']
  return [dict(objective=o, depth=args.depth, width=args.width,
               image_size=args.image_size, batch=args.batch, precision=p,
               jit=j, blur=b, blur_on_device=d)
          for o in args.objectives.split(',')
          for p in args.precisions.split(',') for j in args.jit
          for b in args.blur for d in args.blur_on_device
          if b or not d]


def run_flags(setting, args, model_dir):
  """run.py's command line of a setting."""
  flags = [f'--dataset={args.step_dataset}', '--train_mode=pretrain',
           f'--objective={setting["objective"]}',
           f'--resnet_depth={setting["depth"]}',
           f'--width_multiplier={setting["width"]}',
           f'--image_size={setting["image_size"]}',
           f'--train_batch_size={setting["batch"]}',
           f'--precision={setting["precision"]}',
           f'--use_blur={str(setting["blur"]).lower()}',
           '--use_randaugment=false', '--knn_eval_epochs=0',
           '--train_epochs=100', f'--model_dir={model_dir}',
           '--export_format=none', '--seed=0']
  if setting['jit']:
    flags.append('--jit_compile=true')
  if setting['blur_on_device']:
    flags.append('--blur_on_device=true')
  if setting['objective'] == 'fnc':
    flags.append(f'--support_size={args.fnc_support_size}')
  return flags + OBJECTIVE_FLAGS[setting['objective']]


class PeakMemory:
  """Peak memory while the block runs: the first accelerator's peak bytes
  when there is one, else the process's peak RSS sampled every 10 ms."""

  def __init__(self):
    devices = tf.config.list_logical_devices('GPU') or \
        tf.config.list_logical_devices('TPU')
    self.device = devices[0].name if devices else None
    self.kind = 'device_peak' if self.device else 'process_rss_peak'
    self.peak = 0

  def __enter__(self):
    if self.device:
      tf.config.experimental.reset_memory_stats(self.device)
      return self
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    page = os.sysconf('SC_PAGE_SIZE')
    while not self._stop.is_set():
      with open('/proc/self/statm') as f:
        self.peak = max(self.peak, int(f.read().split()[1]) * page)
      self._stop.wait(0.01)

  def __exit__(self, *exc):
    if self.device:
      self.peak = tf.config.experimental.get_memory_info(self.device)['peak']
    else:
      self._stop.set()
      self._thread.join()


def cached_batch_input(experiment):
  """Replaces the experiment's training input by one real batch of it,
  cached and repeated (the step is timed without the pipeline)."""
  real_input_fn = experiment.train_input_fn

  def train_input_fn(batch_size, start_step=0):
    input_fn = real_input_fn(batch_size, start_step)
    return lambda input_context=None: (
        input_fn(input_context).take(1).cache().repeat())
  experiment.train_input_fn = train_input_fn


def bare_loop(experiment, iterator):
  """`loop(num_steps)`: the experiment's model, objective and optimizer in
  a minimal tf.function loop (forward, loss, gradients, update)."""
  model, objective = experiment.model, experiment.objective
  optimizer, encoder = experiment.optimizer, experiment.momentum_encoder
  strategy = experiment.strategy
  cfg = experiment.config
  replicas = strategy.num_replicas_in_sync
  loss_scaled = experiment.trainer.loss_scaled

  def step(batch):
    batch = data_util.finish_views(batch)
    images = batch['image']
    kwargs = {}
    if encoder is not None:
      kwargs['keys'] = tf.stop_gradient(encoder(images, training=True))
    with tf.GradientTape() as tape:
      projections, logits = model(images, training=True)
      loss = tf.cast(objective.loss(projections, batch, **kwargs)[0],
                     tf.float32)
      if logits is not None:
        views = tf.shape(logits)[0] // tf.shape(batch['label'])[0]
        loss += tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.tile(batch['label'], [views]), logits=logits))
      loss += tf.cast(lars_optimizer.weight_decay_loss(
          model.trainable_variables, cfg.optimizer.name,
          cfg.optimizer.weight_decay), tf.float32)
      loss = loss / replicas
      if loss_scaled:
        loss = optimizer.get_scaled_loss(loss)
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    if loss_scaled:
      grads = optimizer.get_unscaled_gradients(grads)
    optimizer.apply_gradients(zip(grads, variables))
    if encoder is not None:
      encoder.update_from(model, objective.momentum_decay)

  @tf.function
  def loop(num_steps):
    for _ in tf.range(num_steps):
      strategy.run(step, args=(next(iterator),))
  return loop


def flops_per_view(experiment, batch):
  """Forward + backward FLOPs of the model per view, from the graph."""
  model = experiment.model
  images = data_util.finish_views(batch)['image']
  images = tf.zeros((1,) + tuple(images.shape[1:]), images.dtype)
  num_views = images.shape[-1] // 3

  def forward_backward(images):
    with tf.GradientTape() as tape:
      projections, logits = model(images, training=True)
      total = tf.reduce_sum(tf.cast(projections, tf.float32))
      if logits is not None:
        total += tf.reduce_sum(tf.cast(logits, tf.float32))
    return tape.gradient(total, model.trainable_variables)

  graph = tf.function(forward_backward).get_concrete_function(images).graph
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options['output'] = 'none'
  flops = tf.compat.v1.profiler.profile(graph, options=options)
  return flops.total_float_ops / num_views


_CEILINGS = {}


def matmul_ceiling(dtype, size):
  """FLOP/s of a size³ matmul in `dtype` (median of 5 after a warm-up)."""
  if dtype not in _CEILINGS:
    a = tf.random.uniform([size, size], dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    matmul().numpy()
    times = []
    for _ in range(5):
      start = time.perf_counter()
      matmul().numpy()
      times.append(time.perf_counter() - start)
    _CEILINGS[dtype] = 2 * size**3 / statistics.median(times)
  return _CEILINGS[dtype]


class StepRow:
  """One setting's experiment, its framework and bare loops (traced and
  warmed up), and their timed rounds."""

  def __init__(self, setting, args, stack):
    self.setting, self.args = setting, args
    model_dir = stack.enter_context(tempfile.TemporaryDirectory())
    with PeakMemory() as memory:
      cfg = config_lib.from_argv(run_flags(setting, args, model_dir))
      strategy = run.build_strategy(cfg.distribution)
      experiment = experiment_lib.Experiment(cfg, strategy)
      cached_batch_input(experiment)
      experiment.controller(True, False)
      for action in reversed(experiment.actions):  # IFND: clusters first
        if hasattr(action, 'start'):
          action.start()
      trainer = experiment.trainer
      self.batch = next(iter(experiment.train_input_fn(
          cfg.data.train_batch_size)(None)))
      bare = bare_loop(experiment, iter(
          strategy.distribute_datasets_from_function(
              experiment.train_input_fn(cfg.data.train_batch_size))))
      steps = tf.constant(args.steps_per_loop)
      self.loops = {
          'framework': lambda: trainer.train(steps),
          'bare': lambda: bare(steps),
      }
      for fn in self.loops.values():  # trace + warm up
        fn()
        experiment.global_step.numpy()
    self.experiment, self.memory = experiment, memory
    self.per_round = {name: [] for name in self.loops}

  def time_round(self):
    """One timed host loop of the framework, then one of the bare loop."""
    for name, fn in self.loops.items():
      start = time.perf_counter()
      fn()
      self.experiment.global_step.numpy()  # waits for the loop's last step
      self.per_round[name].append((time.perf_counter() - start) /
                                  self.args.steps_per_loop)

  def result(self):
    """The framework / bare / FLOPs / memory numbers of the setting."""
    experiment, per_round = self.experiment, self.per_round
    flops = flops_per_view(experiment, self.batch)
    experiment.close()
    num_views = experiment.num_views
    compute_dtype = tf.as_dtype(experiment.model.compute_dtype).name
    step_s = {k: statistics.median(v) for k, v in per_round.items()}
    batch = self.setting['batch']
    views_s = batch * num_views / step_s['framework']
    ceiling = matmul_ceiling(compute_dtype, self.args.matmul_size)
    return {
        'views': num_views,
        'compute_dtype': compute_dtype,
        'step_ms': {k: 1e3 * v for k, v in step_s.items()},
        'rounds_ms': {k: [round(1e3 * t, 3) for t in v]
                      for k, v in per_round.items()},
        'views_per_s': views_s,
        'bare_views_per_s': batch * num_views / step_s['bare'],
        'framework_over_bare': statistics.median(
            b / f for f, b in zip(per_round['framework'], per_round['bare'])),
        'gflops_per_view': flops / 1e9,
        'matmul_ceiling_gflops': ceiling / 1e9,
        'mfu': flops * views_s / ceiling,
        'memory_kind': self.memory.kind,
        'peak_memory_mb': self.memory.peak / 2**20,
    }


def measure_steps(settings, args):
  """Every setting's step numbers. With --interleave all settings are
  built first and their rounds alternate (round r of every setting, then
  round r + 1), so machine drift falls on all rows alike and cross-row
  ratios (SogCLR over SimCLR) are medians of per-round ratios; without it,
  each setting is built, timed and released in turn (less memory)."""
  results = []
  with contextlib.ExitStack() as stack:
    if args.interleave:
      rows = []
      for setting in settings:
        print(f'building {label(setting)} ...', flush=True)
        rows.append(StepRow(setting, args, stack))
      for r in range(args.rounds):
        print(f'round {r + 1}/{args.rounds}', flush=True)
        for row in rows:
          row.time_round()
      return [row.result() for row in rows]
    for setting in settings:
      print(f'measuring {label(setting)} ...', flush=True)
      with contextlib.ExitStack() as row_stack:
        row = StepRow(setting, args, row_stack)
        for _ in range(args.rounds):
          row.time_round()
        results.append(row.result())
  return results


def measure_pipeline(setting, num_views, folder, args):
  """Views/s of the training pipeline alone at a setting."""
  source = data_lib.get_data_source(folder, eval_split='train')
  kwargs = {'blur_on_device': True} if setting['blur_on_device'] else {}
  input_fn = data_lib.build_input_fn(
      source, 'train', setting['batch'], is_training=True,
      image_size=setting['image_size'], num_views=num_views,
      use_blur=setting['blur'], seed=0, **kwargs)
  iterator = iter(input_fn(None))
  for _ in range(3):
    next(iterator)
  start = time.perf_counter()
  for _ in range(args.pipeline_batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return setting['batch'] * num_views * args.pipeline_batches / seconds


def label(setting):
  blur = ('blur on device' if setting['blur_on_device'] else
          'blur' if setting['blur'] else '')
  return (f'{setting["objective"]} R{setting["depth"]} w{setting["width"]:g} '
          f'{setting["image_size"]}px b{setting["batch"]} '
          f'{setting["precision"]}{" jit" if setting["jit"] else ""}'
          f'{" " + blur if blur else ""}')


def print_table(rows):
  header = (f'{"setting":<46}{"views/s":>9}{"fw/bare":>9}{"GFLOP/v":>9}'
            f'{"MFU":>7}{"mem MB":>8}{"pipe/s":>9}{"pipe/step":>10}')
  print(header)
  for row in rows:
    m = row['step']
    pipe = row.get('pipeline_views_per_s')
    print(f'{label(row["setting"]):<46}{m["views_per_s"]:>9.1f}'
          f'{m["framework_over_bare"]:>9.3f}{m["gflops_per_view"]:>9.2f}'
          f'{100 * m["mfu"]:>6.1f}%{m["peak_memory_mb"]:>8.0f}'
          + (f'{pipe:>9.0f}{pipe / m["views_per_s"]:>9.1f}x' if pipe
             else f'{"-":>9}{"-":>10}'))


def per_round_views(row):
  """Framework views/s of each timed round of a row."""
  m, batch = row['step'], row['setting']['batch']
  return [batch * m['views'] / (t / 1e3) for t in m['rounds_ms']['framework']]


def speed_ratio(row, base, interleaved):
  """Views/s of `row` over `base`: the median of per-round ratios when the
  rows' rounds alternated, else the ratio of their medians."""
  if interleaved:
    return statistics.median(a / b for a, b in zip(per_round_views(row),
                                                   per_round_views(base)))
  return row['step']['views_per_s'] / base['step']['views_per_s']


def summary(rows, interleaved):
  """The issue's target ratios, where the rows allow them."""
  def find(**want):
    for row in rows:
      if all(row['setting'].get(k) == v for k, v in want.items()):
        return row
    return None
  base = dict(depth=18, image_size=32, batch=256, jit=False,
              blur_on_device=False)
  out = {}
  f32 = find(objective='simclr', precision='float32', **base)
  if f32:
    out['simclr_framework_over_bare'] = f32['step']['framework_over_bare']
    bf16 = find(objective='simclr', precision='bfloat16', **base)
    if bf16:
      out['bfloat16_speedup'] = speed_ratio(bf16, f32, interleaved)
    jit = find(objective='simclr', precision='float32',
               **dict(base, jit=True))
    if jit:
      out['jit_speedup'] = speed_ratio(jit, f32, interleaved)
    for name in ('sogclr', 'ifnd'):
      other = find(objective=name, precision='float32', **base)
      if other:  # step time over SimCLR's (same views)
        out[f'{name}_step_over_simclr'] = 1 / speed_ratio(other, f32,
                                                          interleaved)
    fnc = find(objective='fnc', precision='float32', **base)
    if fnc:  # per-view cost over SimCLR's: 1 = exactly its extra views
      out['fnc_per_view_cost_over_simclr'] = 1 / speed_ratio(fnc, f32,
                                                             interleaved)
  pipes = [r['pipeline_views_per_s'] / r['step']['views_per_s']
           for r in rows if r.get('pipeline_views_per_s')]
  if pipes:
    out['min_pipeline_over_step'] = min(pipes)
  return out


def compare(rows, old_path):
  with open(old_path) as f:
    old = {label(r['setting']): r for r in json.load(f)['rows']}
  print(f'\nratio to {old_path} (views/s new / old; framework/bare new, old)')
  for row in rows:
    name = label(row['setting'])
    if name not in old:
      print(f'{name:<46}  not in the old run')
      continue
    was = old[name]['step']
    print(f'{name:<46}{row["step"]["views_per_s"] / was["views_per_s"]:>8.3f}x'
          f'{row["step"]["framework_over_bare"]:>9.3f}'
          f'{was["framework_over_bare"]:>9.3f}')


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.compare and not args.objectives and not args.preset:
    with open(args.output) as f:
      compare(json.load(f)['rows'], args.compare)
    return
  started = time.time()
  folder = None
  if args.pipeline_dataset != 'none':
    folder, reason = quality.resolve_dataset(args.pipeline_dataset)
    if folder is None:
      print(f'pipeline rows skipped: {reason}')
  settings = settings_of(args)
  args.interleave = args.interleave[0]
  rows = [{'setting': setting, 'step': step}
          for setting, step in zip(settings, measure_steps(settings, args))]
  if folder:
    for row in rows:
      print(f'pipeline {label(row["setting"])} ...', flush=True)
      row['pipeline_views_per_s'] = measure_pipeline(
          row['setting'], row['step']['views'], folder, args)
      row['pipeline_over_step'] = (row['pipeline_views_per_s'] /
                                   row['step']['views_per_s'])
  result = {
      'setup': ('framework = the Trainer run.py builds; bare = the same '
                'model, loss and optimizer in a minimal tf.function loop; '
                'both on one cached real batch (digits), one process; '
                f'{args.rounds} rounds of {args.steps_per_loop}-step host '
                'loops after a warm-up loop'
                + ('; every row built first and the rows\' rounds '
                   'alternated' if args.interleave else
                   '; rows measured one after the other')
                + '; pipeline = training batches of '
                f'{args.pipeline_dataset} alone'),
      'fnc_support_size': args.fnc_support_size,
      'rows': rows,
      'interleaved': args.interleave,
      'summary': summary(rows, args.interleave),
      'environment': timing.environment(started),
  }
  print()
  print_table(rows)
  for key, value in result['summary'].items():
    print(f'{key}: {value:.3f}')
  timing.write_results(os.path.abspath(args.output), result, REPO)
  if args.compare:
    compare(rows, args.compare)


if __name__ == '__main__':
  main()
