"""actions.py: the periodic train-action base (due rule, JSON history,
summaries) and the progress line."""

import json
import os

import pytest
import tensorflow as tf

import actions


class _Recorder(actions.PeriodicAction):
  """Records where it runs; optionally due at start."""

  def __init__(self, *args, due_at_start_steps=(), **kwargs):
    super().__init__(*args, **kwargs)
    self.runs = []
    self._due_at_start_steps = set(due_at_start_steps)

  def due_at_start(self, step):
    return step in self._due_at_start_steps

  def run(self, step, outputs):
    self.runs.append(step)
    return {'step': step, 'value': 10 * step}


def _drive(action, step, values):
  for value in values:
    step.assign(value)
    action({})


def test_runs_after_loops_that_cross_a_multiple_of_the_period():
  step = tf.Variable(0, dtype=tf.int64)
  action = _Recorder(step, period_steps=5)
  action.start()
  _drive(action, step, (3, 5, 8, 9, 12, 15, 16))
  assert action.runs == [5, 12, 15]  # 12: the loop that crossed step 10.


def test_without_start_the_first_call_runs_only_on_a_multiple():
  step = tf.Variable(7, dtype=tf.int64)
  action = _Recorder(step, period_steps=5)
  action({})
  step.assign(10)
  action({})
  assert action.runs == [10]
  zero = tf.Variable(0, dtype=tf.int64)
  at_zero = _Recorder(zero, period_steps=5)
  at_zero({})
  assert at_zero.runs == []  # never at step 0


def test_due_at_start_runs_before_training():
  step = tf.Variable(15, dtype=tf.int64)
  action = _Recorder(step, period_steps=10, due_at_start_steps={15})
  action.start()
  assert action.runs == [15]
  _drive(action, step, (18, 20))
  assert action.runs == [15, 20]


def test_history_is_one_record_per_step_and_survives_a_restart(tmp_path):
  path = str(tmp_path / 'history.json')
  step = tf.Variable(0, dtype=tf.int64)
  action = _Recorder(step, period_steps=2, history_path=path)
  action.start()
  _drive(action, step, (2, 4))
  # A restart from the checkpoint of step 2 runs step 4 again.
  step.assign(2)
  again = _Recorder(step, period_steps=2, history_path=path)
  assert [h['step'] for h in again.history] == [2, 4]
  again.start()
  _drive(again, step, (4, 6))
  with open(path) as f:
    written = json.load(f)
  assert [h['step'] for h in written] == [2, 4, 6]
  assert [h['value'] for h in written] == [20, 40, 60]
  assert not os.path.exists(path + '.tmp')


def test_write_scalars_goes_to_its_summary_dir(tmp_path):
  step = tf.Variable(0, dtype=tf.int64)
  action = _Recorder(step, period_steps=1, summary_dir=str(tmp_path / 's'))
  action.write_scalars(3, {'x/y': 1.5})
  events = tf.io.gfile.glob(str(tmp_path / 's' / 'events.*'))
  assert len(events) == 1
  values = [(v.tag, tf.make_ndarray(v.tensor).item(), e.step)
            for e in tf.compat.v1.train.summary_iterator(events[0])
            for v in e.summary.value]
  assert values == [('x/y', 1.5, 3)]
  no_dir = _Recorder(step, period_steps=1)
  no_dir.write_scalars(3, {'x/y': 1.5})  # no summary_dir: nothing written


def test_period_must_be_positive():
  step = tf.Variable(0, dtype=tf.int64)
  with pytest.raises(ValueError, match='period_steps must be ≥ 1'):
    _Recorder(step, period_steps=0)


def test_format_duration():
  assert actions.format_duration(3725) == '1h02m05s'
  assert actions.format_duration(65) == '1m05s'
  assert actions.format_duration(7) == '7s'
  assert actions.format_duration(float('inf')) == '?'
  assert actions.format_duration(float('nan')) == '?'


def test_progress_logger_logs_speed_and_eta(monkeypatch):
  step = tf.Variable(0, dtype=tf.int64)
  logger = actions.ProgressLogger(step, total_steps=100,
                                      global_batch_size=8)
  clock = iter([1000.0, 1010.0])
  monkeypatch.setattr(actions.time, 'time', lambda: next(clock))
  messages = []
  monkeypatch.setattr(actions.logging, 'info',
                      lambda fmt, *args: messages.append(fmt % args))
  logger.start()
  step.assign(10)
  logger({'train/loss': tf.constant(1.5)})
  assert len(messages) == 1
  # 10 steps in 10 s: 1 step/s, 8 images/s, 90 steps left -> 1m30s.
  assert 'step 10/100' in messages[0]
  assert 'loss 1.5000' in messages[0]
  assert '1.00 steps/s' in messages[0]
  assert '8.0 images/s' in messages[0]
  assert 'ETA 1m30s' in messages[0]


def test_final_step_runs_once_even_off_the_period():
  """235 steps, period 20 (N=5000, B=256, 12 epochs): runs at every
  multiple and at 235; a final step on a multiple runs once."""
  step = tf.Variable(0, dtype=tf.int64)
  action = _Recorder(step, period_steps=20, final_step=235)
  action.start()
  _drive(action, step, list(range(10, 231, 10)) + [235])
  assert action.runs == list(range(20, 221, 20)) + [235]
  step.assign(0)
  on_multiple = _Recorder(step, period_steps=20, final_step=240)
  on_multiple.start()
  _drive(on_multiple, step, range(40, 241, 40))
  assert on_multiple.runs == [40, 80, 120, 160, 200, 240]


def test_a_resumed_run_scores_the_final_step_not_its_start():
  step = tf.Variable(220, dtype=tf.int64)
  action = _Recorder(step, period_steps=20, final_step=235)
  action.start()  # resumed at 220, which was scored before the restart
  _drive(action, step, (230, 235))
  assert action.runs == [235]
  # Resumed exactly at the final step (nothing left to train): no run.
  done = _Recorder(step, period_steps=20, final_step=235)
  done.start()
  done({})
  assert done.runs == []
