"""Preemption (SIGTERM / SIGINT) and non-finite losses, on real runs of
run.py on the embedded digits."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import guards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    '--dataset=digits', '--eval_split=test', '--image_size=16',
    '--resnet_depth=18', '--width_multiplier=0.125', '--proj_out_dim=16',
    '--train_batch_size=32', '--warmup_epochs=0', '--use_blur=false',
    '--train_summary_steps=0', '--learning_rate=0.5',
]


def command(model_dir, *extra):
  return [sys.executable, 'run.py', *TINY, f'--model_dir={model_dir}',
          '--mode=train', *extra]


def checkpoint_step(model_dir):
  latest = tf.train.latest_checkpoint(model_dir)
  if latest is None:
    return None
  return int(tf.train.load_checkpoint(latest).get_tensor(
      'optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE'))


def wait_for_line(stream, text, timeout):
  """Reads `stream` until a line contains `text`; the lines read."""
  lines = []
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = stream.readline()
    if not line:
      break
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f'{text!r} not seen in {timeout} s:\n' +
                       ''.join(lines[-30:]))


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_mid_loop_and_the_same_command_resumes(
    tmp_path, signum):
  """Host loops of 200 steps, no periodic checkpoint: a signal 1.5 s into
  the second loop must stop it at a step inside that loop, checkpoint that
  step and exit with 128 + signum; the same command then starts from
  exactly that step."""
  model_dir = str(tmp_path / 'run')
  loop = ['--steps_per_loop=200', '--checkpoint_steps=100000']
  proc = subprocess.Popen(
      command(model_dir, '--train_steps=100000', *loop), cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  try:
    wait_for_line(proc.stdout, 'train | step:    200', timeout=240)
    time.sleep(1.5)
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signum, rest[-3000:]
  name = signal.Signals(signum).name
  assert f'{name} received: saved' in rest
  step = checkpoint_step(model_dir)
  assert 200 < step < 400, step
  assert f'at step {step} and stopped' in rest

  resumed = subprocess.run(
      command(model_dir, f'--train_steps={step + 2}', *loop),
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'from step {step} to {step + 2}' in resumed.stderr
  assert checkpoint_step(model_dir) == step + 2


def test_non_finite_loss_stops_before_checkpointing_it(tmp_path):
  """A learning rate of 1e30 makes the loss non-finite within a few steps:
  exit code 3 naming the step, no checkpoint after the last good one, no
  export, no result."""
  model_dir = str(tmp_path / 'nan')
  proc = subprocess.run(
      command(model_dir, '--learning_rate=1e30', '--train_steps=12',
              '--checkpoint_steps=1', '--steps_per_loop=1',
              '--optimizer=momentum', '--mode=train_then_eval'),
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == guards.NonFiniteLoss.exit_code, proc.stderr[-3000:]
  assert 'Non-finite loss at step' in proc.stderr
  assert 'Traceback' not in proc.stderr
  bad_step = int(proc.stderr.split('Non-finite loss at step ')[1].split()[0])
  good = checkpoint_step(model_dir)
  assert good == bad_step - 1
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
  for key in reader.get_variable_to_shape_map():
    value = np.asarray(reader.get_tensor(key))
    if value.dtype.kind == 'f':
      assert tf.reduce_all(tf.math.is_finite(value)), key
  assert not os.path.exists(os.path.join(model_dir, 'saved_model'))
  assert not os.path.exists(os.path.join(model_dir, 'result.json'))


def test_skip_nonfinite_steps_counts_and_stops_at_the_limit(tmp_path):
  model_dir = str(tmp_path / 'skip')
  proc = subprocess.run(
      command(model_dir, '--learning_rate=1e30', '--train_steps=12',
              '--checkpoint_steps=1', '--steps_per_loop=1',
              '--optimizer=momentum', '--skip_nonfinite_steps=3'),
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == guards.NonFiniteLoss.exit_code, proc.stderr[-3000:]
  assert 'the limit of --skip_nonfinite_steps=3' in proc.stderr
  assert proc.stderr.count('Skipped 1 step(s) with a non-finite loss') == 3
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
  assert reader.get_tensor('nonfinite_skipped/.ATTRIBUTES/VARIABLE_VALUE') == 2


def test_preemption_exit_code_and_message():
  error = guards.Preempted(signal.SIGTERM, 17, '/m/ckpt-17')
  assert error.exit_code == 143
  assert 'SIGTERM received: saved /m/ckpt-17 at step 17' in str(error)


@pytest.fixture(name='small_disk')
def small_disk_fixture(tmp_path):
  """A 1 MB tmpfs (root only; skipped where mounting is not allowed)."""
  mount_point = tmp_path / 'disk'
  mount_point.mkdir()
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs',
                         str(mount_point)], capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f'cannot mount a small tmpfs here: {proc.stderr.strip()}')
  yield mount_point
  subprocess.run(['umount', str(mount_point)], check=False)


def test_full_disk_is_a_one_line_error(small_disk):
  """The first checkpoint (~1.4 MB) does not fit on a 1 MB disk."""
  model_dir = str(small_disk / 'run')
  proc = subprocess.run(
      command(model_dir, '--train_steps=4', '--checkpoint_steps=2'),
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('run.py: error: No space left on device'), last
  assert 'no checkpoint had been written yet' in last
  assert 'Traceback' not in proc.stderr
