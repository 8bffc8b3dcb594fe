"""Quick-start quality on digits: pretrained encoder vs random encoder.

  python benchmarks/quickstart.py [--epochs_scale=1.0]

Runs, as separate `run.py` processes:
  1. the quick start (configs/quickstart.cfg): SimCLR pretraining with the
     linear head trained alongside, evaluated on the test split;
  2. linear evaluation (configs/quickstart_linear_eval.cfg) of that encoder;
  3. the same linear evaluation of a randomly initialised encoder;
  4. `evaluate.py --protocols=knn,linear` of the quick-start encoder (the
     frozen-feature protocols: weighted kNN, logistic regression).
The quick start's own end-of-run kNN of its final encoder (result.json) is
a row too. Prints a table with each run's top-1 and wall time and writes it
to benchmarks/results/quickstart.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'quickstart.json')


def timed(command):
  """Runs `command` in the repository; its wall time (exits if it
  fails)."""
  start = time.time()
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    sys.stderr.write(proc.stderr[-5000:])
    raise SystemExit(f'failed: {" ".join(command)}')
  return time.time() - start


def run(flagfile, model_dir, *extra):
  command = [sys.executable, 'run.py', f'--flagfile={flagfile}',
             f'--model_dir={model_dir}', *extra]
  elapsed = timed(command)
  with open(os.path.join(model_dir, 'result.json')) as f:
    result = json.load(f)
  return {'top_1': result['label_top_1_accuracy'],
          'top_5': result['label_top_5_accuracy'],
          'steps': result['global_step'], 'seconds': round(elapsed, 1),
          'command': ' '.join(command[1:])}


def feature_eval(flagfile, checkpoint):
  """evaluate.py's kNN and logistic-regression rows of a checkpoint."""
  command = [sys.executable, 'evaluate.py', f'--flagfile={flagfile}',
             f'--checkpoint={checkpoint}', '--protocols=knn,linear']
  elapsed = timed(command)
  with open(os.path.join(checkpoint, 'feature_eval.json')) as f:
    result = json.load(f)
  return {f'evaluate.py {name} of the quick-start encoder': {
      'top_1': result[name]['top_1'], 'top_5': result[name]['top_5'],
      'steps': None, 'seconds': round(elapsed, 1),
      'command': ' '.join(command[1:])} for name in ('knn', 'linear')}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None,
                      help='where the runs write (default: a temp dir)')
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix='quickstart_bench_')
  pretrain_dir = os.path.join(workdir, 'pretrain')
  quick_start = run('configs/quickstart.cfg', pretrain_dir)
  with open(os.path.join(pretrain_dir, 'result.json')) as f:
    final = json.load(f)
  rows = {
      'quick start (linear head trained while pretraining)': quick_start,
      'quick start: kNN of its final encoder (printed at the end)': {
          'top_1': final['knn_top_1_accuracy'],
          'top_5': final['knn_top_5_accuracy'],
          'steps': final['global_step'], 'seconds': None,
          'command': quick_start['command']},
      **feature_eval('configs/quickstart.cfg', pretrain_dir),
      'linear eval of the pretrained encoder':
          run('configs/quickstart_linear_eval.cfg',
              os.path.join(workdir, 'linear_pretrained'),
              f'--checkpoint={pretrain_dir}'),
      'linear eval of a random encoder':
          run('configs/quickstart_linear_eval.cfg',
              os.path.join(workdir, 'linear_random')),
  }
  print(f'{"run":<62} {"top-1":>7} {"top-5":>7} {"steps":>6} {"wall s":>8}')
  for name, row in rows.items():
    steps = '-' if row['steps'] is None else row['steps']
    seconds = '-' if row['seconds'] is None else f'{row["seconds"]:.1f}'
    print(f'{name:<62} {row["top_1"]:>7.4f} {row["top_5"]:>7.4f} '
          f'{steps:>6} {seconds:>8}')
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w') as f:
    json.dump({'rows': rows, 'machine': os.uname().nodename,
               'cpu_count': os.cpu_count()}, f, indent=2)
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
