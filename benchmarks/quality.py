r"""Representation quality of every objective at the same budget.

  python benchmarks/quality.py --epochs=2                       # CIFAR-10
  python benchmarks/quality.py --dataset=<folder> --epochs=2    # any folder
  python benchmarks/quality.py --dataset=digits --epochs=1 --width=0.125 \
      --image_size=16 --linear_grid_size=3                     # seconds
  python benchmarks/quality.py --epochs=8 --train_percent=20 \
      --linear_grid_size=12      # README's CIFAR-10 result: 35 min, 2 cores

Pretrains a ResNet (default ResNet-18, CIFAR stem, width --width, 0.25 by
default so that a CPU runs it) with each registered objective of
--objectives (simclr, fnc in-batch, sogclr, ifnd; an objective that is not
registered is skipped with the reason), all with
the same budget and settings: batch --batch_size (256), LARS, --epochs
epochs, the same seed, learning-rate schedule and augmentations (SimCLR's
CIFAR-10 recipe: lr 1.0 per 256, weight decay 1e-4, temperature 0.5, colour
jitter 0.5, no blur). FNC runs in-batch with --fnc_support_size support
views (default 2, FNC's 8 reduced to a CPU-sized value; stated in the
output and the row's name). The kNN monitor (`--knn_eval_epochs`) records
the kNN accuracy of the encoder after every --knn_every epochs. Then the final
encoder of each, a randomly initialised encoder and the raw pixels (the two
floors) are evaluated offline with evaluate.py's protocols: weighted kNN
(k 200, τ 0.1) and logistic regression (L-BFGS, L2 strength chosen on a
held-out 20 % of the training split).

Data: --dataset, any image folder <folder>/train/<class>/*.jpg with an
--eval_split sub-folder (default test), its .tar.gz, a TFDS name or digits;
by default the CIFAR-10 JPEG folder ../shared/data/cifar10_jpeg (its archive
is unpacked into /tmp once); the run is skipped with a message when it is
absent. --train_percent trains (and fits the evaluations) on a
class-balanced subset of the training split, made with imagenet_subsets/.

Writes quality.json, quality.md (the table) and quality.png (kNN accuracy
against epoch, one line per objective: the monitor's points and the final
encoder's; the floors dashed) to --output_dir: by default a fresh directory
under the system temp dir (named in the log), so nothing in the repository
changes unless asked (--output_dir=benchmarks/results). quality.json records
the data set; results made on another data set are never overwritten (the
run stops before training, writing nothing). Progress: a line per objective
with the ETA of the whole benchmark, and run.py's per-loop log lines (step,
loss, speed, ETA of the run).

With --workdir the runs are kept there (<workdir>/<objective>/ holds the
checkpoints, knn_monitor.json, feature_eval.json and TensorBoard files;
<workdir>/random/ and <workdir>/pixels/ the floors' feature_eval.json; the
subset list is <workdir>/train_subset.txt).
"""

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

DEFAULT_DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data',
                            'cifar10_jpeg')
UNPACK_DIR = os.path.join(tempfile.gettempdir(), 'cifar10_jpeg')
ALL_OBJECTIVES = ('simclr', 'fnc', 'sogclr', 'ifnd')
# Objective-specific settings (applied only when the flag exists).
OBJECTIVE_FLAGS = {
    'fnc': {'memory_multiplier': 0},  # In-batch FNC (no momentum queue).
    'sogclr': {'gamma': 0.9},  # The SogCLR README recipe.
    # The paper re-clusters every 20 of 1000 epochs (50 times); a budget of
    # a few epochs re-clusters every epoch so that the rising acceptance
    # rate acts at all.
    'ifnd': {'ifnd_reassign_epochs': 1},
}


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--dataset', default=DEFAULT_DATA,
                      help='image folder, its .tar.gz, a TFDS name, or '
                           'digits')
  parser.add_argument('--data_dir', default=None, help='TFDS data_dir')
  parser.add_argument('--eval_split', default='test')
  parser.add_argument('--epochs', type=int, required=True)
  parser.add_argument('--objectives', default=','.join(ALL_OBJECTIVES))
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--resnet_depth', type=int, default=18)
  parser.add_argument('--width', type=float, default=0.25,
                      help='width multiplier of the ResNet (1.0: the '
                           'published ResNet-18)')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--learning_rate', type=float, default=1.0)
  parser.add_argument('--weight_decay', type=float, default=1e-4)
  parser.add_argument('--temperature', type=float, default=0.5)
  parser.add_argument('--warmup_epochs', type=float, default=None,
                      help='default: 10 %% of --epochs')
  parser.add_argument('--train_percent', type=float, default=100.0,
                      help='class-balanced subset of the training split')
  parser.add_argument('--knn_every', type=int, default=1,
                      help='epochs between kNN monitor evaluations')
  parser.add_argument('--knn_k', type=int, default=200)
  parser.add_argument('--knn_temperature', type=float, default=0.1)
  parser.add_argument('--linear_grid_size', type=int, default=45,
                      help='log-spaced L2 strengths in [1e-6, 1e5]')
  parser.add_argument('--linear_max_iter', type=int, default=1000)
  parser.add_argument('--fnc_support_size', type=int, default=2,
                      help="FNC's support views per image (FNC's default is "
                           '8; 2 keeps a CPU run short)')
  parser.add_argument('--extra_flags', default='',
                      help='objective:flag=value,... e.g. '
                           'fnc:support_size=2')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default=None,
                      help='model dirs (default: a temporary directory, '
                           'removed at the end)')
  parser.add_argument('--output_dir', default=None,
                      help='where quality.{json,md,png} go (default: a '
                           'fresh temporary directory, named in the log; '
                           'benchmarks/results for the README)')
  return parser.parse_args(argv)


def resolve_dataset(dataset):
  """(dataset for run.py, None) or (None, reason to skip)."""
  if dataset == 'digits' or not dataset.startswith(('/', '.', '~')):
    return dataset, None
  path = os.path.expanduser(dataset)
  if os.path.isdir(os.path.join(path, 'train')):
    return path, None
  archive = path if path.endswith('.tar.gz') else os.path.join(
      path, os.path.basename(path.rstrip('/')) + '.tar.gz')
  if os.path.isfile(archive):
    if not os.path.isdir(os.path.join(UNPACK_DIR, 'train')):
      print(f'unpacking {archive} into {UNPACK_DIR} ...', flush=True)
      tmp = UNPACK_DIR + '.partial'
      shutil.rmtree(tmp, ignore_errors=True)
      with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter='data')
      roots = [tmp] + [os.path.join(tmp, d) for d in os.listdir(tmp)]
      root = next(r for r in roots if os.path.isdir(os.path.join(r, 'train')))
      shutil.rmtree(UNPACK_DIR, ignore_errors=True)
      os.rename(root, UNPACK_DIR)
      shutil.rmtree(tmp, ignore_errors=True)
    return UNPACK_DIR, None
  return None, (f'{dataset} not found (neither a folder with train/ nor '
                f'{archive})')


def parse_extra_flags(text):
  extra = {}
  for item in filter(None, (s.strip() for s in text.split(','))):
    try:
      name, setting = item.split(':', 1)
      flag, value = setting.split('=', 1)
    except ValueError:
      raise SystemExit(f'--extra_flags: expected objective:flag=value, got '
                       f'{item!r}') from None
    extra.setdefault(name, {})[flag] = value
  return extra


def objective_flags(objective, args, extra):
  """The objective-specific flags of `objective`: OBJECTIVE_FLAGS, FNC's
  --fnc_support_size, then --extra_flags (which win)."""
  specific = dict(OBJECTIVE_FLAGS.get(objective, {}))
  if objective == 'fnc':
    specific['support_size'] = args.fnc_support_size
  specific.update(extra.get(objective, {}))
  return specific


def row_name(objective, specific, extra):
  """'fnc (in-batch, support_size=2)': the objective and what it runs with
  besides the shared settings (FNC's mode and support views, --extra_flags)."""
  notes, shown = [], set()
  if objective == 'fnc':
    memory = specific.get('memory_multiplier', 0)
    notes = ['in-batch' if str(memory) == '0'
             else f'memory_multiplier={memory}',
             f'support_size={specific["support_size"]}']
    shown = {'memory_multiplier', 'support_size'}
  notes += [f'{k}={v}' for k, v in extra.get(objective, {}).items()
            if k not in shown]
  return f'{objective} ({", ".join(notes)})' if notes else objective


def check_output_dir(output_dir, dataset):
  """Stops (SystemExit, nothing written) if output_dir/quality.json holds
  results made on another data set."""
  path = os.path.join(output_dir, 'quality.json')
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      previous = json.load(f).get('dataset')
  except (OSError, ValueError, AttributeError) as e:
    raise SystemExit(f'quality.py: error: {path} exists but is not a quality '
                     f'result ({e}); pass another --output_dir.') from None
  if previous != dataset:
    made_on = (f'made on data set {previous!r}' if previous else
               'that record no data set')
    raise SystemExit(
        f'quality.py: error: {path} holds results {made_on}, not '
        f'{dataset!r}; refusing to overwrite them. Pass another --output_dir '
        f'(or remove that file).')


def format_seconds(seconds):
  minutes, secs = divmod(int(round(seconds)), 60)
  return f'{minutes} min {secs:02d} s' if minutes else f'{secs} s'


def pretrain(objective, args, dataset, model_dir, subset_path, extra,
             num_train):
  """Pretrains with `objective` in this process; returns its run record."""
  import tensorflow as tf
  import tf_keras
  import config
  import experiment
  import run
  settings = {
      'dataset': dataset, 'data_dir': args.data_dir,
      'eval_split': args.eval_split, 'train_split': 'train',
      'train_subset': subset_path, 'objective': objective,
      'mode': 'train', 'train_mode': 'pretrain', 'model_dir': model_dir,
      'image_size': args.image_size, 'resnet_depth': args.resnet_depth,
      'width_multiplier': args.width, 'train_batch_size': args.batch_size,
      'eval_batch_size': 256, 'train_epochs': args.epochs,
      'optimizer': 'lars', 'learning_rate': args.learning_rate,
      'learning_rate_scaling': 'linear',
      'warmup_epochs': (args.warmup_epochs if args.warmup_epochs is not None
                        else 0.1 * args.epochs),
      'weight_decay': args.weight_decay, 'temperature': args.temperature,
      'use_blur': False, 'color_jitter_strength': 0.5,
      'lineareval_while_pretraining': False, 'train_summary_steps': 0,
      'checkpoint_epochs': args.epochs, 'keep_checkpoint_max': 2,
      'knn_eval_epochs': args.knn_every, 'knn_k': args.knn_k,
      'knn_temperature': args.knn_temperature, 'seed': args.seed,
  }
  specific = objective_flags(objective, args, extra)
  known = config.new_flag_values()
  settings.update({k: v for k, v in specific.items() if k in known})
  argv = [f'--{k}={v}' for k, v in settings.items() if v is not None]
  tf_keras.utils.set_random_seed(args.seed)
  start = time.time()
  run.run(config.from_argv(argv))
  seconds = time.time() - start
  history = []
  if os.path.exists(os.path.join(model_dir, 'knn_monitor.json')):
    with open(os.path.join(model_dir, 'knn_monitor.json')) as f:
      history = json.load(f)
  final_step = int(tf.train.latest_checkpoint(model_dir).rsplit('-', 1)[1])
  return {'seconds': round(seconds, 1), 'knn_history': history,
          'final_step': final_step,
          'final_epoch': final_step / experiment.epoch_steps(
              num_train, args.batch_size),
          'flags': {k: v for k, v in settings.items() if k in specific},
          'command': ' '.join(argv)}


def evaluate_encoder(kind, args, dataset, subset_path, output_dir,
                     model_dir=None):
  """kNN and linear results (evaluate.py's `evaluate_features`, which also
  writes output_dir/feature_eval.json) for 'checkpoint' (model_dir),
  'random' or 'pixels'."""
  import numpy as np
  import config
  import evaluate
  result = evaluate.evaluate_features(
      config.DataConfig(dataset=dataset, data_dir=args.data_dir,
                        train_split='train', eval_split=args.eval_split,
                        train_subset=subset_path, image_size=args.image_size,
                        eval_batch_size=256),
      config.ModelConfig(resnet_depth=args.resnet_depth,
                         width_multiplier=args.width),
      config.EvalConfig(knn_k=args.knn_k,
                        knn_temperature=args.knn_temperature),
      config.FeatureEvalConfig(
          feature_layer=evaluate.PIXELS if kind == 'pixels' else '0',
          protocols=('knn', 'linear'),
          linear_l2_grid=tuple(float(v) for v in np.logspace(
              -6, 5, args.linear_grid_size)),
          linear_max_iter=args.linear_max_iter, output_dir=output_dir),
      checkpoint=model_dir if kind == 'checkpoint' else None,
      seed=args.seed)
  for protocol in ('knn', 'linear'):
    result[protocol].pop('protocol')
  return {'knn': result['knn'], 'linear': result['linear'],
          'feature_dim': result['feature_dim']}


def markdown_table(results, args, dataset_note):
  lines = [
      f'Pretraining: {dataset_note}; ResNet-{args.resnet_depth} (CIFAR '
      f'stem, width {args.width:g}), {args.image_size}px, batch '
      f'{args.batch_size}, LARS, {args.epochs} epoch(s), seed {args.seed}. '
      f'kNN: k={args.knn_k}, τ={args.knn_temperature}; linear: logistic '
      f'regression, {args.linear_grid_size} L2 strengths in [1e-6, 1e5], '
      f'20 % held out.',
      '',
      '| encoder | kNN top-1 | linear top-1 | pretraining wall time |',
      '|---|---|---|---|',
  ]
  for name, row in results['rows'].items():
    wall = f'{row["seconds"]:.0f} s' if 'seconds' in row else '–'
    lines.append(f'| {name} | {100 * row["knn"]["top_1"]:.1f} % | '
                 f'{100 * row["linear"]["top_1"]:.1f} % | {wall} |')
  for name, reason in results['skipped'].items():
    lines.append(f'| {name} | skipped: {reason} | | |')
  return '\n'.join(lines) + '\n'


def plot(results, path, title):
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
  for name, row in results['rows'].items():
    if 'knn_history' in row:
      # The monitor's points, then the offline kNN of the final encoder
      # (same protocol) at the last step, which is rarely a whole epoch.
      epochs = [h['epoch'] for h in row['knn_history']]
      accs = [100 * h['top_1'] for h in row['knn_history']]
      if row['final_step'] not in [h['step'] for h in row['knn_history']]:
        epochs.append(row['final_epoch'])
        accs.append(100 * row['knn']['top_1'])
      ax.plot(epochs, accs, marker='o', label=name)
  styles = {'random encoder': '--', 'raw pixels': ':'}
  for name, style in styles.items():
    if name in results['rows']:
      ax.axhline(100 * results['rows'][name]['knn']['top_1'], color='gray',
                 linestyle=style, label=f'{name} (floor)')
  ax.set_xlabel('epoch')
  ax.set_ylabel('kNN top-1 (%)')
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  dataset, reason = resolve_dataset(args.dataset)
  if dataset is None:
    print(f'quality benchmark skipped: {reason}.')
    return None
  import data as data_lib
  import experiment
  import objective as obj_lib
  import run  # registers the objectives; its logging set-up
  from imagenet_subsets import subsets

  if args.output_dir:
    check_output_dir(args.output_dir, dataset)
  output_dir = args.output_dir or tempfile.mkdtemp(prefix='quality_results_')
  print(f'results will go to {output_dir}', flush=True)
  run.setup_logging()  # run.run()'s per-loop progress lines, at INFO
  total_start = time.time()
  workdir = args.workdir or tempfile.mkdtemp(prefix='quality_bench_')
  os.makedirs(workdir, exist_ok=True)
  source = data_lib.get_data_source(dataset, data_dir=args.data_dir,
                                    eval_split=args.eval_split)
  subset_path = None
  dataset_note = f'{os.path.basename(dataset.rstrip("/"))} train split'
  if args.train_percent < 100:
    subset_path = os.path.join(workdir, 'train_subset.txt')
    keys = subsets.make_subset(source, 'train', args.train_percent,
                               args.seed)
    subsets.write_key_list(subset_path, keys)
    source = data_lib.apply_subset(source, 'train', keys)
    dataset_note = (f'{os.path.basename(dataset.rstrip("/"))}, a '
                    f'class-balanced {args.train_percent:g} % of the train '
                    f'split ({len(keys)} images)')
  dataset_note += (f', evaluated on {args.eval_split} '
                   f'({source.num_examples(args.eval_split)} images)')
  extra = parse_extra_flags(args.extra_flags)
  registered = obj_lib.available_objectives()
  results = {'rows': {}, 'skipped': {}, 'settings': vars(args),
             'dataset': dataset, 'train_examples':
                 source.num_examples('train')}
  objectives = []
  for objective in filter(None, args.objectives.split(',')):
    if objective not in registered:
      reason = (f'--objective={objective} is not registered in this build '
                f'(registered: {", ".join(sorted(registered))})')
      print(f'skipping {objective}: {reason}', flush=True)
      results['skipped'][objective] = reason
    else:
      objectives.append(objective)
  num_train = source.num_examples('train')
  spent = []  # seconds per finished objective (pretraining + evaluation)
  for i, objective in enumerate(objectives):
    name = row_name(objective, objective_flags(objective, args, extra), extra)
    if spent:
      left = sum(spent) / len(spent) * (len(objectives) - i)
      eta = f'ETA ~{format_seconds(left)} for the rest, then the two floors'
    else:
      eta = 'ETA once the first objective is done'
    print(f'[{i + 1}/{len(objectives)}] pretraining {name}: {args.epochs} '
          f'epoch(s) of '
          f'{experiment.epoch_steps(num_train, args.batch_size)} steps on '
          f'{num_train} images; {eta}', flush=True)
    start = time.time()
    model_dir = os.path.join(workdir, objective)
    row = pretrain(objective, args, dataset, model_dir, subset_path, extra,
                   num_train)
    row.update(evaluate_encoder('checkpoint', args, dataset, subset_path,
                                model_dir, model_dir))
    spent.append(time.time() - start)
    results['rows'][name] = row
    print(f'[{i + 1}/{len(objectives)}] {name}: kNN '
          f'{row["knn"]["top_1"]:.4f}, linear {row["linear"]["top_1"]:.4f}, '
          f'pretraining {row["seconds"]:.0f} s, with evaluation '
          f'{format_seconds(spent[-1])}', flush=True)
  for kind, name in (('random', 'random encoder'), ('pixels', 'raw pixels')):
    results['rows'][name] = evaluate_encoder(
        kind, args, dataset, subset_path, os.path.join(workdir, kind))
    print(f'{name}: kNN {results["rows"][name]["knn"]["top_1"]:.4f}, linear '
          f'{results["rows"][name]["linear"]["top_1"]:.4f}', flush=True)
  results['wall_seconds'] = round(time.time() - total_start, 1)
  results['command'] = ' '.join(['python', 'benchmarks/quality.py'] +
                                list(argv if argv is not None
                                     else sys.argv[1:]))
  os.makedirs(output_dir, exist_ok=True)
  table = markdown_table(results, args, dataset_note)
  table += (f'\nCommand: `{results["command"]}`; total wall time '
            f'{results["wall_seconds"]:.0f} s on {os.cpu_count()} CPU '
            f'core(s).\n')
  paths = {k: os.path.join(output_dir, f'quality.{k}')
           for k in ('json', 'md', 'png')}
  with open(paths['json'], 'w') as f:
    json.dump(results, f, indent=2)
  with open(paths['md'], 'w') as f:
    f.write(table)
  plot(results, paths['png'], f'kNN top-1 during pretraining '
       f'({os.path.basename(dataset.rstrip("/"))}, {args.epochs} epochs)')
  print(table)
  print('wrote ' + ', '.join(paths.values()))
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  return results


if __name__ == '__main__':
  main()
