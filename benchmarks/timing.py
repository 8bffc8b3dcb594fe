"""Alternated timing and the result file shared by the speed benchmarks."""

import itertools
import json
import os
import platform
import statistics
import time

import tensorflow as tf


def environment(started):
  """The facts every result file records: versions, cores, load, run time
  since `started` (time.time())."""
  return {'tensorflow': tf.__version__, 'python': platform.python_version(),
          'cpu_count': os.cpu_count(),
          'load_average_1min': os.getloadavg()[0],
          'runtime_s': time.time() - started}


def write_results(path, result, repo):
  """Writes `result` as JSON to `path` and says so (path relative to
  `repo`, with the run time of result['environment'])."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {os.path.relpath(path, repo)} '
        f'({result["environment"]["runtime_s"]:.0f} s)')


def alternate(fns, rounds, steps):
  """Times zero-argument callables in alternation.

  Every round calls each fn `steps` times in turn (and waits for the last
  result), so load from other jobs on a shared machine falls on all of them
  alike. Trace and warm the fns up first.

  Returns ({name: median seconds per call}, {name: [seconds per call in
  each round]}).
  """
  per_round = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(steps):
        out = fn()
      tf.nest.map_structure(lambda t: t.numpy(), out)
      per_round[name].append((time.perf_counter() - start) / steps)
  return {k: statistics.median(v) for k, v in per_round.items()}, per_round


def cycling(fn, args_list):
  """A zero-argument callable calling fn(*args) for args_list in a cycle."""
  calls = itertools.cycle(args_list)
  return lambda: fn(*next(calls))
