"""Quick-start quality on digits: pretrained encoder vs random encoder.

  python benchmarks/quickstart.py [--epochs_scale=1.0]

Runs, as separate `run.py` processes:
  1. the quick start (configs/quickstart.cfg): SimCLR pretraining with the
     linear head trained alongside, evaluated on the test split;
  2. linear evaluation (configs/quickstart_linear_eval.cfg) of that encoder;
  3. the same linear evaluation of a randomly initialised encoder.
Prints a table with each run's top-1 and wall time and writes it to
benchmarks/results/quickstart.json.
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


def run(flagfile, model_dir, *extra):
  command = [sys.executable, 'run.py', f'--flagfile={flagfile}',
             f'--model_dir={model_dir}', *extra]
  start = time.time()
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  elapsed = time.time() - start
  if proc.returncode:
    sys.stderr.write(proc.stderr[-5000:])
    raise SystemExit(f'failed: {" ".join(command)}')
  with open(os.path.join(model_dir, 'result.json')) as f:
    result = json.load(f)
  return {'top_1': result['label_top_1_accuracy'],
          'top_5': result['label_top_5_accuracy'],
          'steps': result['global_step'], 'seconds': round(elapsed, 1),
          'command': ' '.join(command[1:])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None,
                      help='where the runs write (default: a temp dir)')
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix='quickstart_bench_')
  pretrain_dir = os.path.join(workdir, 'pretrain')
  rows = {
      'quick start (linear head trained while pretraining)':
          run('configs/quickstart.cfg', pretrain_dir),
      'linear eval of the pretrained encoder':
          run('configs/quickstart_linear_eval.cfg',
              os.path.join(workdir, 'linear_pretrained'),
              f'--checkpoint={pretrain_dir}'),
      'linear eval of a random encoder':
          run('configs/quickstart_linear_eval.cfg',
              os.path.join(workdir, 'linear_random')),
  }
  print(f'{"run":<55} {"top-1":>7} {"top-5":>7} {"steps":>6} {"wall s":>8}')
  for name, row in rows.items():
    print(f'{name:<55} {row["top_1"]:>7.4f} {row["top_5"]:>7.4f} '
          f'{row["steps"]:>6} {row["seconds"]:>8.1f}')
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w') as f:
    json.dump({'rows': rows, 'machine': os.uname().nodename,
               'cpu_count': os.cpu_count()}, f, indent=2)
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
