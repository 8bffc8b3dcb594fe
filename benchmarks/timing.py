"""Alternated timing shared by the speed benchmarks."""

import itertools
import statistics
import time

import tensorflow as tf


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
