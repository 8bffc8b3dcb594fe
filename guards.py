"""Train actions that stop a run safely: preemption and non-finite losses.

Both run after every host loop, before orbit saves its periodic checkpoint
(orbit calls the train actions first), and stop the run by raising a
`RunStopped` that run.py turns into a one-line message and an exit code.

* `PreemptionGuard`: TPU VMs and preemptible GPU hosts get SIGTERM some
  seconds before they go; Ctrl-C sends SIGINT. `install()` replaces both
  handlers. A Python handler runs only when the main thread leaves the host
  loop's TF call, so the signal is also written to a wakeup fd
  (`signal.set_wakeup_fd`) that a watcher thread reads to set the trainer's
  `stop_requested` variable: the loop ends after the step that is running
  (CPU/GPU; on TPU, where the loop runs on the device, at its end). The
  guard then saves a checkpoint at that step and raises `Preempted` (exit
  code 128 + the signal number); the same command resumes. Workers of a
  multi-worker run agree at every loop boundary (a MAX all-reduce of their
  requests) and stop at the same step; they do not stop inside a loop,
  where they could disagree.
* `NonFiniteGuard`: reads the trainer's per-loop report of steps whose loss
  was NaN or infinite (checked on the device, `trainer.Trainer`). Without
  `skip_limit` the first such loop raises `NonFiniteLoss` naming the step
  and the terms, before any checkpoint of that state is written, so the
  latest checkpoint stays the last good one. With `skip_limit` = N the
  trainer has skipped those steps (no update); the guard adds them to a
  checkpointed counter and stops once N were skipped.
"""

import os
import signal
import threading

from absl import logging
import tensorflow as tf

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
  """A run stopped on purpose; `exit_code` is the process exit status."""
  exit_code = 1


class Preempted(RunStopped):

  def __init__(self, signum, step, checkpoint_path):
    self.signum = signum
    self.exit_code = 128 + signum
    name = signal.Signals(signum).name
    super().__init__(
        f'{name} received: saved {checkpoint_path} at step {step} and '
        'stopped; run the same command again to resume.')


class NonFiniteLoss(RunStopped):
  exit_code = 3


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a checkpoint and a `Preempted` stop."""

  def __init__(self, strategy, global_step, checkpoint_manager,
               stop_variable=None, multi_worker=False, signals=SIGNALS):
    """`stop_variable`: the trainer's `stop_requested` (None: stop only at
    loop boundaries, as multi-worker runs do); `multi_worker`: agree with
    the other workers before stopping."""
    self.strategy = strategy
    self.multi_worker = multi_worker
    self.global_step = global_step
    self.checkpoint_manager = checkpoint_manager
    self.stop_variable = stop_variable
    self.signals = tuple(signals)
    self.signum = None
    self._handled = False  # the Python handler ran once
    self._previous = {}
    self._pipe = None
    self._previous_wakeup_fd = None
    self._watcher = None

  # --- Signals. ---

  def install(self):
    """Handles the signals from now on (from the main thread only, where
    Python delivers signals; elsewhere a no-op that logs it)."""
    if threading.current_thread() is not threading.main_thread():
      logging.info('Not in the main thread: SIGTERM/SIGINT keep their '
                   'default handlers.')
      return self
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    if self.stop_variable is not None:
      read_fd, write_fd = os.pipe()
      os.set_blocking(write_fd, False)
      self._pipe = (read_fd, write_fd)
      self._previous_wakeup_fd = signal.set_wakeup_fd(
          write_fd, warn_on_full_buffer=False)
      self._watcher = threading.Thread(target=self._watch, daemon=True,
                                       name='preemption-watcher')
      self._watcher.start()
    return self

  def uninstall(self):
    """Restores the previous handlers and stops the watcher thread."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    if self._pipe is not None:
      signal.set_wakeup_fd(self._previous_wakeup_fd)
      os.write(self._pipe[1], b'\0')  # wakes the watcher: it exits
      self._watcher.join(timeout=5)
      for fd in self._pipe:
        os.close(fd)
      self._pipe = None

  def _handle(self, signum, frame):
    del frame
    if self._handled:
      # A second signal: the user insists. Default behaviour from now on.
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self._handled = True
    self.signum = signum
    logging.warning('%s received: checkpointing at the next step, then '
                    'stopping (send it again to stop at once).',
                    signal.Signals(signum).name)
    self._request_stop()

  def _watch(self):
    while True:
      byte = os.read(self._pipe[0], 1)
      if not byte or byte == b'\0':
        return
      if byte[0] in self.signals:
        if self.signum is None:
          self.signum = byte[0]
        self._request_stop()

  def _request_stop(self):
    if self.stop_variable is not None:
      self.stop_variable.assign(True)

  # --- The train action. ---

  def requested_signal(self):
    """The signal that asked to stop (agreed by every worker), or None."""
    local = self.signum or 0
    if self.multi_worker:
      value = self.strategy.experimental_distribute_values_from_function(
          lambda _: tf.constant(local, tf.int32))
      total = int(self.strategy.reduce(tf.distribute.ReduceOp.SUM, value,
                                       axis=None))
      if total and not local:
        local = signal.SIGTERM  # another worker's request
    return local or None

  def __call__(self, outputs=None):
    del outputs
    signum = self.requested_signal()
    if signum is None:
      return
    step = int(self.global_step.numpy())
    path = self.checkpoint_manager.save(checkpoint_number=step,
                                        check_interval=False)
    raise Preempted(signum, step, path)


class NonFiniteGuard:
  """Stops the run at a non-finite loss (or after too many skipped steps)."""

  def __init__(self, trainer, skip_limit=0, skipped=None):
    """`skipped`: a checkpointed int64 variable counting the skipped steps
    of the whole run (needed when `skip_limit` > 0)."""
    self.trainer = trainer
    self.skip_limit = int(skip_limit)
    self.skipped = skipped

  def __call__(self, outputs=None):
    del outputs
    report = self.trainer.nonfinite_report()
    if report is None:
      return
    terms = ', '.join(report.terms)
    if not self.skip_limit:
      raise NonFiniteLoss(
          f'Non-finite loss at step {report.first_step} ({terms}); stopped '
          'without saving this state, so the latest checkpoint is the last '
          'good one. Lower --learning_rate, raise --temperature, or pass '
          '--skip_nonfinite_steps=N to skip up to N such steps.')
    total = int(self.skipped.assign_add(report.count).numpy())
    logging.warning('Skipped %d step(s) with a non-finite loss (first: step '
                    '%d, %s); %d of --skip_nonfinite_steps=%d so far.',
                    report.count, report.first_step, terms, total,
                    self.skip_limit)
    if total >= self.skip_limit:
      raise NonFiniteLoss(
          f'{total} steps with a non-finite loss, the limit of '
          f'--skip_nonfinite_steps={self.skip_limit} (last: step '
          f'{report.first_step}, {terms}); stopped without saving this '
          'state. Lower --learning_rate or raise --temperature.')
