r"""IFND: the cost of one pseudo-label re-assignment, and k-means at scale.

  python benchmarks/ifnd_cost.py            # ~15 min on 2 CPU cores

1. For the embedded default (digits, 16×16) and CIFAR-10 from
   ../shared/data/cifar10_jpeg (unpacked into /tmp; skipped with a message
   when absent), in one process: a training epoch of `--objective=ifnd`
   (ResNet-18 × `--width`, CIFAR stem, batch 256, LARS; time per step over
   `--steps` steps after warm-up, × steps per epoch) against one
   re-assignment (the embedding pass of the whole training split under the
   strategy + one k-means per level of `--num_clusters`, acceptance 1, so
   every level is clustered), timed twice (the first includes tracing the
   embedding step). The ratio re-assignment / epoch is what re-clustering
   every `ifnd_reassign_epochs` epochs adds: ratio / reassign_epochs.
2. k-means on a synthetic ImageNet-1K-sized set (`--kmeans_n` × 128,
   l2-normalised mixture of 1000 Gaussians), k = `--kmeans_k`, with
   `clustering.kmeans` (scikit-learn, what the framework uses) and, when the
   package is installed, faiss-cpu with the same number of iterations
   (`pip install faiss-cpu`; not a dependency of the framework).

Prints a table and writes benchmarks/results/ifnd_cost.json.
"""

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402

RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'ifnd_cost.json')
CIFAR = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'cifar10_jpeg')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--datasets', default=f'digits,{CIFAR}')
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--num_clusters', default='10,30,100')
  parser.add_argument('--kmeans_n', type=int, default=1_281_167)
  parser.add_argument('--kmeans_k', type=int, default=1000)
  parser.add_argument('--kmeans_iters', type=int, default=100)
  parser.add_argument('--output', default=RESULTS)
  return parser.parse_args(argv)


def reassignment_cost(dataset, args):
  """Epoch time (projected from timed steps) and re-assignment time."""
  import tensorflow as tf
  import config
  import experiment as experiment_lib
  import ifnd
  import run
  image_size = 16 if dataset == 'digits' else 32
  settings = {
      'dataset': dataset, 'train_split': 'train', 'objective': 'ifnd',
      'mode': 'train', 'model_dir': f'/tmp/ifnd_cost/{len(dataset)}',
      'image_size': image_size, 'resnet_depth': 18,
      'width_multiplier': args.width, 'train_batch_size': 256,
      'eval_batch_size': 512, 'train_epochs': 100, 'use_blur': False,
      'train_summary_steps': 0, 'ifnd_num_clusters': args.num_clusters,
      'ifnd_acceptance': 'constant', 'ifnd_acceptance_rate': 1.0,
      'ifnd_reassign_epochs': 20, 'seed': 0,
  }
  cfg = config.from_argv([f'--{k}={v}' for k, v in settings.items()])
  if tf.io.gfile.exists(settings['model_dir']):
    tf.io.gfile.rmtree(settings['model_dir'])
  experiment = experiment_lib.Experiment(
      cfg, run.build_strategy(cfg.distribution))
  trainer = experiment.controller(True, False).trainer
  reassigner = next(a for a in experiment.actions
                    if isinstance(a, ifnd.Reassigner))
  trainer.train(tf.constant(2))  # tracing and warm-up
  start = time.time()
  trainer.train(tf.constant(args.steps))
  step_seconds = (time.time() - start) / args.steps
  epoch_seconds = step_seconds * experiment.steps.epoch_steps
  runs = []
  for _ in range(2):
    record = reassigner.reassign(int(experiment.global_step.numpy()))
    runs.append(record)
  steady = runs[1]
  return {
      'dataset': 'digits' if dataset == 'digits' else 'cifar10',
      'num_examples': experiment.data.num_train_examples,
      'image_size': image_size,
      'steps_per_epoch': experiment.steps.epoch_steps,
      'step_seconds': round(step_seconds, 4),
      'epoch_seconds': round(epoch_seconds, 2),
      'reassign_seconds_first': runs[0]['seconds'],
      'reassign_seconds': steady['seconds'],
      'embed_seconds': steady['embed_seconds'],
      'kmeans_seconds': steady['kmeans_seconds'],
      'purity': steady['purity'],
      'ratio_to_epoch': round(steady['seconds'] / epoch_seconds, 3),
  }


def synthetic(n, d=128, centres=1000, seed=0):
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(centres, d)).astype(np.float32)
  x = means[rng.integers(0, centres, n)]
  x += 2.0 * rng.normal(size=(n, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def kmeans_at_scale(args):
  import clustering
  x = synthetic(args.kmeans_n)
  rows = []
  start = time.time()
  _, assignments = clustering.kmeans(x, args.kmeans_k, seed=0,
                                     max_iter=args.kmeans_iters)
  rows.append({'library': 'scikit-learn (clustering.kmeans)',
               'seconds': round(time.time() - start, 1),
               'clusters_used': int(len(np.unique(assignments)))})
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    rows.append({'library': 'faiss-cpu', 'seconds': None,
                 'note': 'not installed'})
  else:
    start = time.time()
    km = faiss.Kmeans(x.shape[1], args.kmeans_k, niter=args.kmeans_iters,
                      seed=0, max_points_per_centroid=len(x))
    km.train(x)
    _, assignments = km.index.search(x, 1)
    rows.append({'library': f'faiss-cpu {faiss.__version__}',
                 'seconds': round(time.time() - start, 1),
                 'clusters_used': int(len(np.unique(assignments)))})
  return rows


def main(argv=None):
  args = parse_args(argv)
  from quality import resolve_dataset  # pylint: disable=g-import-not-at-top
  results = {'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
             'args': vars(args), 'reassignment': [], 'skipped': []}
  for dataset in filter(None, args.datasets.split(',')):
    resolved, reason = resolve_dataset(dataset)
    if resolved is None:
      print(f'skipping {dataset}: {reason}')
      results['skipped'].append({'dataset': dataset, 'reason': reason})
      continue
    results['reassignment'].append(reassignment_cost(resolved, args))
  results['kmeans'] = {'n': args.kmeans_n, 'd': 128, 'k': args.kmeans_k,
                       'max_iter': args.kmeans_iters,
                       'runs': kmeans_at_scale(args)}
  print()
  print('| data | N | epoch (s) | re-assignment (s): embedding + k-means | '
        're-assignment / epoch |')
  print('|---|---|---|---|---|')
  for r in results['reassignment']:
    print(f"| {r['dataset']} {r['image_size']}px | {r['num_examples']} | "
          f"{r['epoch_seconds']:.1f} | {r['reassign_seconds']:.1f}: "
          f"{r['embed_seconds']:.1f} + {r['kmeans_seconds']:.1f} | "
          f"{r['ratio_to_epoch']:.3f} |")
  print()
  print(f"k-means, {args.kmeans_n} × 128, k = {args.kmeans_k}, "
        f"≤ {args.kmeans_iters} iterations:")
  for row in results['kmeans']['runs']:
    print(f"  {row['library']}: {row.get('seconds')} s "
          f"{row.get('note', '')}")
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
