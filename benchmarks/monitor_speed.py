"""kNN monitor pass against evaluate.py's feature pass, on the same images.

  python benchmarks/monitor_speed.py            # CIFAR-10 from ../shared/data
  python benchmarks/monitor_speed.py --dataset=digits --image_size=16

Pretrains with configs/folder_cpu.cfg's settings (SimCLR, ResNet-18 width
0.25) on a class-balanced --train_percent of the training split, one host
loop of --loop_epochs epochs at a time. After each loop it extracts the
features of the training subset and of --eval_split twice each way, the two
ways alternated:
  * monitor: the `evaluate.KnnProbe` of the model being trained, in the
    training process, the training input pipeline alive (what the kNN
    monitor runs every --knn_eval_epochs);
  * evaluate.py: a fresh encoder restored from the loop's checkpoint
    (`features.build_encoder_model` + `restore_encoder` +
    `FeatureExtractor`, evaluate.py's path).
Prints the extraction seconds of every pass and the median ratio
monitor / evaluate.py; writes benchmarks/results/monitor_speed.json.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import quality  # noqa: E402  (resolve_dataset: the CIFAR-10 JPEG folder)

RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'monitor_speed.json')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', default=quality.DEFAULT_DATA)
  parser.add_argument('--eval_split', default='test')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--train_percent', type=float, default=20.0)
  parser.add_argument('--loops', type=int, default=3)
  parser.add_argument('--loop_epochs', type=int, default=1)
  parser.add_argument('--output', default=RESULTS)
  args = parser.parse_args()
  dataset, reason = quality.resolve_dataset(args.dataset)
  if reason:
    raise SystemExit(f'monitor_speed.py: {reason}; nothing written.')

  import tensorflow as tf
  import config as config_lib
  import data as data_lib
  import evaluate
  import experiment as experiment_lib
  import features
  import run
  import timing
  from imagenet_subsets import subsets
  run.setup_logging()
  started = time.time()
  workdir = tempfile.mkdtemp(prefix='monitor_speed_')
  source = data_lib.get_data_source(dataset, eval_split=args.eval_split)
  subset_path = os.path.join(workdir, 'train_subset.txt')
  subsets.write_key_list(subset_path, subsets.make_subset(
      source, 'train', args.train_percent, seed=0))
  cfg = config_lib.from_argv([
      f'--flagfile={os.path.join(REPO, "configs", "folder_cpu.cfg")}',
      f'--dataset={dataset}', f'--eval_split={args.eval_split}',
      f'--train_subset={subset_path}', f'--image_size={args.image_size}',
      f'--model_dir={os.path.join(workdir, "run")}', '--knn_eval_epochs=0',
      '--seed=0'])
  strategy = tf.distribute.get_strategy()
  exp = experiment_lib.Experiment(cfg, strategy)
  controller = exp.controller(True, False)
  train_pass = exp.pass_dataset_fn(cfg.data.train_split)
  eval_pass = exp.pass_dataset_fn(cfg.data.eval_split)
  probe = evaluate.KnnProbe(exp.model, train_pass, eval_pass,
                            strategy=strategy)
  m = cfg.model
  with strategy.scope():
    fresh = features.build_encoder_model(
        0, resnet_depth=m.resnet_depth, width_multiplier=m.width_multiplier,
        cifar_stem=args.image_size <= 32, proj_head_mode=m.proj_head_mode,
        proj_out_dim=m.proj_out_dim, num_proj_layers=m.num_proj_layers,
        image_size=args.image_size)
  extract = features.FeatureExtractor(strategy,
                                      features.model_encoder(fresh, 0))

  def evaluate_pass():
    start = time.time()
    extract(train_pass())
    extract(eval_pass())
    return time.time() - start

  rows = []
  loop_steps = args.loop_epochs * exp.steps.epoch_steps
  for loop in range(1, args.loops + 1):
    controller.train(min(loop * loop_steps, exp.steps.train_steps))
    exp.checkpoint_manager.save(checkpoint_number=exp.global_step)
    features.restore_encoder(fresh, cfg.model_dir)
    for k in range(2):
      rows.append({'loop': loop, 'pass': k, 'way': 'monitor',
                   'seconds': probe()['extraction_seconds']})
      rows.append({'loop': loop, 'pass': k, 'way': 'evaluate.py',
                   'seconds': round(evaluate_pass(), 2)})
  num_images = (source.num_examples(cfg.data.eval_split) +
                exp.data.num_train_examples)
  print(f'\nfeature passes over {num_images} images '
        f'({exp.data.num_train_examples} train + '
        f'{source.num_examples(cfg.data.eval_split)} {args.eval_split}), '
        f'seconds of extraction:')
  print(f'{"after loop":>10} {"pass":>5} {"monitor":>9} {"evaluate.py":>12}')
  for a, b in zip(rows[::2], rows[1::2]):
    print(f'{a["loop"]:>10} {a["pass"]:>5} {a["seconds"]:>9.2f} '
          f'{b["seconds"]:>12.2f}')
  ratio = statistics.median(a['seconds'] / b['seconds']
                            for a, b in zip(rows[::2], rows[1::2]))
  first = [r['seconds'] for r in rows if r['way'] == 'monitor' and
           r['pass'] == 0]
  later = [r['seconds'] for r in rows if r['way'] == 'monitor' and
           r['pass'] > 0]
  print(f'median monitor / evaluate.py: {ratio:.2f}; monitor right after a '
        f'loop median {statistics.median(first):.2f} s, later passes '
        f'{statistics.median(later):.2f} s')
  timing.write_results(args.output, {
      'rows': rows, 'median_ratio_monitor_over_evaluate': ratio,
      'num_images': num_images, 'dataset': dataset,
      'environment': timing.environment(started)}, REPO)


if __name__ == '__main__':
  main()
