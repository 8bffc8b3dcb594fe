"""Host-side train actions: the progress line and periodic work between steps.

orbit calls every train action after each host loop (`steps_per_loop`
steps) with that loop's outputs. `PeriodicAction` is the one base for them:
the due rule (the global step crossed a multiple of `period_steps`), a JSON
history in model_dir that survives restarts (one record per step), and a
lazily created TensorBoard writer. Subclasses implement `run(step, outputs)`
and, when they have work that must not wait for the next period after a
restart (IFND's stale pseudo labels), `due_at_start(step)`.

Users: `ProgressLogger` (here), `evaluate.KnnMonitor`, `ifnd.Reassigner`.
"""

import time

from absl import logging
import tensorflow as tf

import checkpoints


class PeriodicAction:
  """An orbit train action that runs every `period_steps` global steps.

  Due rule: after a host loop that moved the global step across a multiple
  of `period_steps` (at the multiple itself when loops divide the period,
  else at the first loop boundary after it), at steps > 0; and, with a
  `final_step` (the run's train_steps), after the loop that reaches it, so
  that the last weights are scored even when no multiple falls on it (once:
  a multiple that is the final step runs once). Before the first loop
  `start()` marks the current step as seen (a resumed run does not redo the
  step it resumes at) and runs at once if `due_at_start(step)`.

  `run(step, outputs)` returns a record (a JSON-able dict, or None). With a
  `history_path`, records are kept in a JSON list there, one per step (a
  re-run of a step after a restart replaces its record), and read back on
  construction. `write_scalars` writes to TensorBoard under `summary_dir`.
  """

  def __init__(self, global_step, period_steps, history_path=None,
               summary_dir=None, final_step=None):
    if period_steps < 1:
      raise ValueError(f'period_steps must be ≥ 1, got {period_steps}.')
    self.global_step = global_step
    self.period_steps = int(period_steps)
    self.final_step = None if final_step is None else int(final_step)
    self.history_path = history_path
    self.summary_dir = summary_dir
    self.history = checkpoints.read_json(history_path, default=[])
    self._writer = None
    self._last_step = None

  def current_step(self):
    return int(self.global_step.numpy())

  def due_at_start(self, step):
    """Whether to run before training resumes at `step` (default: no)."""
    del step
    return False

  def run(self, step, outputs):
    """The periodic work; returns a record for the history, or None."""
    raise NotImplementedError

  def start(self):
    step = self.current_step()
    self._last_step = step
    if self.due_at_start(step):
      self.run_and_record(step, None)

  def __call__(self, outputs=None):
    step = self.current_step()
    last, self._last_step = self._last_step, step
    if last is None:
      due = step % self.period_steps == 0 or step == self.final_step
    else:
      due = (step // self.period_steps > last // self.period_steps or
             (self.final_step is not None and
              last < self.final_step <= step))
    if due and step > 0:
      self.run_and_record(step, outputs)

  def run_and_record(self, step, outputs):
    record = self.run(step, outputs)
    if record is not None and self.history_path:
      self.history = [h for h in self.history if h.get('step') != step]
      self.history.append(record)
      checkpoints.write_json(self.history_path, self.history)
    return record

  def write_scalars(self, step, scalars):
    """{tag: value} to TensorBoard at `step` (nothing without summary_dir)."""
    if not self.summary_dir:
      return
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self.summary_dir)
    with self._writer.as_default():
      for tag, value in scalars.items():
        tf.summary.scalar(tag, value, step=step)
    self._writer.flush()


class ProgressLogger(PeriodicAction):
  """One log line per host loop: step, loss, speed and ETA."""

  def __init__(self, global_step, total_steps, global_batch_size):
    super().__init__(global_step, period_steps=1)
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self._last_time = None
    self._time_step = None

  def start(self):
    super().start()
    self._last_time, self._time_step = time.time(), self.current_step()

  def run(self, step, outputs):
    now = time.time()
    if self._last_time is None:
      self._last_time, self._time_step = now, step
      return None
    elapsed = max(now - self._last_time, 1e-9)
    steps_per_sec = (step - self._time_step) / elapsed
    images_per_sec = steps_per_sec * self.global_batch_size
    remaining = self.total_steps - step
    eta = remaining / steps_per_sec if steps_per_sec > 0 else float('inf')
    loss = outputs.get('train/loss') if outputs else None
    loss_text = f' | loss {float(loss):.4f}' if loss is not None else ''
    logging.info('step %d/%d%s | %.2f steps/s | %.1f images/s | ETA %s',
                 step, self.total_steps, loss_text, steps_per_sec,
                 images_per_sec, format_duration(eta))
    self._last_time, self._time_step = now, step
    return None


def format_duration(seconds):
  """'1h02m03s' style duration; '?' when unknown."""
  if seconds != seconds or seconds == float('inf'):
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{secs:02d}s'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'

