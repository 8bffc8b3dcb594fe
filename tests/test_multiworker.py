"""Multi-worker runs on TensorFlow's own engine: the same run.py as 2 worker
processes on 127.0.0.1 with MultiWorkerMirroredStrategy and TF_CONFIG.

Checks: every worker exits 0 and ends with the same state (the digest each
logs of the model and every piece of objective state); only the chief
writes into model_dir; the kNN monitor, IFND's embedding pass and the eval
see every example exactly once (they raise otherwise, and the eval counts
are checked here).
"""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300

COMMON = ['--dataset=digits', '--eval_split=test', '--image_size=16',
          '--resnet_depth=18', '--width_multiplier=0.125', '--proj_out_dim=8',
          '--train_batch_size=256', '--eval_batch_size=24', '--use_blur=false',
          '--warmup_epochs=0', '--learning_rate=0.5',
          '--distribution_strategy=multi_worker_mirrored']


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def run_workers(num_workers, model_dir, args, log_dir):
  """Runs run.py as `num_workers` processes; returns their logs."""
  workers = [f'127.0.0.1:{port}' for port in _free_ports(num_workers)]
  procs, logs = [], []
  for index in range(num_workers):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='',
               TF_CONFIG=json.dumps({'cluster': {'worker': workers},
                                     'task': {'type': 'worker',
                                              'index': index}}))
    log = os.path.join(log_dir, f'worker{index}.log')
    logs.append(log)
    with open(log, 'w') as out:
      procs.append(subprocess.Popen(
          [sys.executable, 'run.py', f'--model_dir={model_dir}'] + COMMON +
          args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  try:
    codes = [proc.wait(timeout=TIMEOUT) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  texts = []
  for log in logs:
    with open(log) as f:
      texts.append(f.read())
  for index, (code, text) in enumerate(zip(codes, texts)):
    assert code == 0, f'worker {index} exited {code}:\n{text[-4000:]}'
  return texts


def _digest(text):
  found = re.findall(r'state digest (\{.*\})', text)
  assert found, 'no state digest logged'
  return found[-1]


def _eval_counts(text):
  return [int(n) for n in re.findall(r'\((\d+) examples of test\)', text)]


@pytest.fixture(scope='module')
def simclr_run(tmp_path_factory):
  """SimCLR with the kNN monitor at step 6, then eval: 2 workers."""
  work = tmp_path_factory.mktemp('mw_simclr')
  model_dir = str(work / 'model')
  texts = run_workers(2, model_dir, [
      '--objective=simclr', '--train_steps=6', '--checkpoint_steps=3',
      '--knn_eval_epochs=1', '--mode=train_then_eval',
      '--train_summary_steps=0'], str(work))
  return model_dir, texts


def test_workers_end_with_identical_state(simclr_run):
  _, texts = simclr_run
  digests = [_digest(text) for text in texts]
  assert digests[0] == digests[1]
  assert 'model' in digests[0]


def test_only_the_chief_writes_into_model_dir(simclr_run):
  model_dir, _ = simclr_run
  listing = sorted(os.listdir(model_dir))
  assert 'ckpt-6.index' in listing and 'result.json' in listing
  assert not [name for name in listing
              if 'temp' in name or name.endswith('.tmp')], listing
  with open(os.path.join(model_dir, 'knn_monitor.json')) as f:
    history = json.load(f)
  # An epoch is round(1437 / 256) = 6 steps: one record, from one writer,
  # of a pass over all 1437 training and 360 test examples.
  assert [h['step'] for h in history] == [6]
  assert (history[0]['num_train'], history[0]['num_test']) == (1437, 360)


def test_eval_sees_every_example_once_on_every_worker(simclr_run):
  _, texts = simclr_run
  for text in texts:
    assert _eval_counts(text) == [360]


@pytest.mark.parametrize('objective_args, state', [
    (['--objective=sogclr', '--gamma=0.9'], 'sogclr_u'),
    # Memory mode with a re-assignment at step 0 (constant rate 0.5): the
    # queue, the momentum encoder and the chief's broadcast pseudo labels.
    (['--objective=ifnd', '--memory_multiplier=2', '--ifnd_num_clusters=5',
      '--ifnd_acceptance=constant', '--ifnd_acceptance_rate=0.5',
      '--ifnd_reassign_epochs=1'], 'ifnd_table'),
])
def test_objective_state_is_identical_on_every_worker(objective_args, state,
                                                      tmp_path):
  texts = run_workers(2, str(tmp_path / 'model'), objective_args + [
      '--train_steps=2', '--checkpoint_steps=2', '--mode=train',
      '--train_summary_steps=0'], str(tmp_path))
  digests = [_digest(text) for text in texts]
  assert digests[0] == digests[1]
  assert f"'{state}'" in digests[0]
  if state == 'ifnd_table':
    assert "'momentum_encoder'" in digests[0]
    assert "'ifnd_queue'" in digests[0]
    with open(tmp_path / 'model' / 'ifnd_assignments.json') as f:
      assert [h['step'] for h in json.load(f)] == [0]
