r"""Class-balanced p % label subsets of a labelled split, and their validation.

  python -m imagenet_subsets.subsets make --dataset=DATASET --percent=1 \
      --output=subset_1pct.txt [--split=train] [--seed=0] [--data_dir=...]
  python -m imagenet_subsets.subsets validate --dataset=DATASET \
      --list=1percent.txt [--split=train] [--expect_count=12811]

A list holds one example key per line (SimCLR's imagenet_subsets/*.txt
format); `run.py --train_subset=<list>` trains on those examples only. Keys
(`data.DataSource.example_keys`): digits: the id; image folders: the path
below the split directory ('<class>/<file>'; a list of bare file names is
matched against file names when they are unique, as for ImageNet); TFDS: the
'file_name' feature if the dataset has one (ImageNet), else the tfds_id.

Selection (`select_balanced`): class c with n_c examples gets
t_c = floor(p·n_c/100) or one more, the extra ones going to the classes with
the largest remainders so that Σ t_c = ⌊p·N/100⌋ (as SimCLR's ImageNet lists:
12,811 = ⌊1 % of 1,281,167⌋ and 128,116), and at least one example per
class. Within a class, the t_c examples with the smallest
sha256('<seed>:<key>') are kept: the choice depends only on the keys, the
labels and the seed (not on listing order, NumPy version or platform).
"""

import argparse
import collections
import hashlib
import os
import sys

import numpy as np

if __package__ in (None, ''):  # Run as a script: make the repo importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import data as data_lib  # noqa: E402


def class_quotas(labels, percent):
  """{class: t_c} for a class-balanced `percent` % subset (see module doc)."""
  if not 0 < percent <= 100:
    raise ValueError(f'percent must be in (0, 100], got {percent}.')
  classes, counts = np.unique(np.asarray(labels), return_counts=True)
  exact = counts * (percent / 100.0)
  quota = np.floor(exact).astype(np.int64)
  extra = int(np.floor(len(labels) * percent / 100.0 + 1e-9)) - int(
      quota.sum())
  if extra > 0:
    # Largest remainder first; ties go to the smaller class index.
    order = np.lexsort((classes, -(exact - quota)))
    quota[order[:extra]] += 1
  quota = np.clip(quota, 1, counts)
  return {int(c): int(q) for c, q in zip(classes, quota)}


def _rank_key(seed, key):
  return hashlib.sha256(f'{seed}:{key}'.encode()).digest()


def select_balanced(keys, labels, percent, seed=0):
  """Ids (ascending) of a class-balanced `percent` % subset of the examples.

  Args:
    keys: example keys in id order (key[id]).
    labels: labels in id order.
    percent: p in (0, 100].
    seed: any integer or string; another seed gives another subset.
  """
  labels = np.asarray(labels)
  if len(keys) != len(labels):
    raise ValueError(f'{len(keys)} keys but {len(labels)} labels.')
  by_class = collections.defaultdict(list)
  for i, label in enumerate(labels):
    by_class[int(label)].append(i)
  chosen = []
  for label, quota in class_quotas(labels, percent).items():
    members = sorted(by_class[label], key=lambda i: _rank_key(seed, keys[i]))
    chosen.extend(members[:quota])
  return np.sort(np.asarray(chosen, np.int64))


def write_key_list(path, keys):
  """Writes one key per line."""
  with open(path, 'w') as f:
    f.writelines(f'{k}\n' for k in keys)


def make_subset(source, split, percent, seed=0):
  """Keys (in id order) of a class-balanced `percent` % subset of `split`."""
  keys = source.example_keys(split)
  ids = select_balanced(keys, source.example_labels(split), percent, seed)
  return [keys[i] for i in ids]


def validate_subset(source, split, keys, expect_count=None):
  """Checks a key list against `split`; returns a report dict.

  Raises ValueError for unknown or repeated keys (`data.subset_ids`) and for
  a count other than `expect_count`.
  """
  ids = data_lib.subset_ids(source, split, keys)
  if expect_count is not None and len(ids) != expect_count:
    raise ValueError(f'The list names {len(ids)} examples, expected '
                     f'{expect_count}.')
  labels = source.example_labels(split)
  per_class = np.bincount(labels[ids], minlength=source.num_classes)
  total = np.bincount(labels, minlength=source.num_classes)
  fractions = per_class[total > 0] / total[total > 0]
  return {
      'num_keys': int(len(ids)),
      'num_examples': int(len(labels)),
      'percent': 100.0 * len(ids) / len(labels),
      'classes_present': int(np.count_nonzero(per_class)),
      'num_classes': int(source.num_classes),
      'per_class_min': int(per_class.min()),
      'per_class_max': int(per_class.max()),
      'class_fraction_min': float(fractions.min()),
      'class_fraction_max': float(fractions.max()),
  }


def _source(args):
  return data_lib.get_data_source(args.dataset, data_dir=args.data_dir,
                                  train_split=args.split, eval_split=None)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  for name in ('make', 'validate'):
    sub = commands.add_parser(name)
    sub.add_argument('--dataset', required=True,
                     help="'digits', an image folder or a TFDS name")
    sub.add_argument('--data_dir', default=None, help='TFDS data directory')
    sub.add_argument('--split', default='train')
  make = commands.choices['make']
  make.add_argument('--percent', type=float, required=True)
  make.add_argument('--seed', default='0')
  make.add_argument('--output', required=True)
  check = commands.choices['validate']
  check.add_argument('--list', required=True, help='the key list to check')
  check.add_argument('--expect_count', type=int, default=None)
  args = parser.parse_args(argv)
  try:
    source = _source(args)
    if args.command == 'make':
      keys = make_subset(source, args.split, args.percent, args.seed)
      write_key_list(args.output, keys)
      report = validate_subset(source, args.split, keys)
      print(f'wrote {args.output}: ', end='')
    else:
      report = validate_subset(source, args.split,
                               data_lib.read_key_list(args.list),
                               args.expect_count)
      print(f'{args.list} is valid: ', end='')
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'subsets: error: {e}')
  print(f'{report["num_keys"]} of {report["num_examples"]} examples '
        f'({report["percent"]:.3f} %) of split {args.split!r}, '
        f'{report["classes_present"]}/{report["num_classes"]} classes, '
        f'{report["per_class_min"]}–{report["per_class_max"]} per class.')
  return report


if __name__ == '__main__':
  main()
