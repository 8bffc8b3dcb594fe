r"""Fault campaign on the embedded digits data: kill, stop, diverge, resume.

  python benchmarks/faults.py                 # simclr + ifnd, ~17 min
  python benchmarks/faults.py --objectives=simclr,sogclr,fnc,ifnd  # ~30 min
  python benchmarks/faults.py --quick --objectives=simclr    # smoke, 8 min
  python benchmarks/faults.py --trials=6 --kinds=1,2         # more trials

Every trial runs `python run.py` as a subprocess (a tiny model, 40 steps,
a checkpoint every 5; `BASE_FLAGS`) in a fresh temporary model_dir outside
the repo (deleted afterwards unless --keep), each with a timeout: a run that
hangs is killed and its trial counted as not survived, with the reason. One
row per fault kind and objective, written as JSON to --output:

1. SIGKILL at a random time, uniform over the calibrated span from the
   first progress line (the first checkpoint) to the end of the export
   (--window=training starts it at the 'Training' line, so that most kills
   land while the first loop is traced), then the same command again until
   it exits 0 (at most --max_restarts times). A run that ends before its
   kill time is not counted.
   Survived: every restart resumed from the checkpoint that was the latest
   (`model_dir/checkpoint`) before it ('from step N' / 'already holds step
   N' in its log; N = 0 without one), the first restart exits 0, the final
   checkpoint is at train_steps, saved_model/<train_steps> exists, and no
   temporaries (*.tmp, ckpt-*_temp*, checkpoint.tmp*, .write_test) remain.
2. SIGTERM inside a host loop: after the progress line of a random loop
   boundary (5, 10, ..., 35), a uniform fraction of 0.9 × one calibrated
   loop later (robust to the machine's speed of the day; --window=training
   adds the first, traced loop). Survived: exit code 143 and 'SIGTERM
   received: saved ... at step N' in the log, the latest checkpoint after
   the stop is ckpt-N, complete, N ≥ the step reached when the signal was
   sent (latest checkpoint and last progress line; the notes count the stops
   inside a loop, N not a multiple of --checkpoint_steps), and the same
   command continues from N to train_steps with the export and no
   temporaries. A signal that arrives after the last step (the guard is
   gone while exporting) is not counted and is listed in the notes.
3. Non-finite loss (simclr, once): --learning_rate=1e30 --optimizer=momentum
   --steps_per_loop=1 --checkpoint_steps=1 (--mode=train_then_eval, so a run
   that got through would write result.json): exit code 3, 'Non-finite loss
   at step N' in the message, every float tensor of the latest checkpoint
   finite, no result.json and no saved_model.
4. Exact resume with --deterministic --seed=0 --use_randaugment=false
   --warmup_epochs=100 (and --ifnd_acceptance=constant for ifnd). The
   cosine decay runs over --train_steps and IFND's linear acceptance is
   step/train_steps, so a run to k steps differs from the first k steps of
   a run to 2k by design; a warm-up longer than the run (W = 4490 steps at
   batch 32) makes lr(s) = s/W·lr for any --train_steps. Compared with a
   straight run to 2k (max |a − b| over every float tensor of the two final
   checkpoints, optimizer slots and objective state included; survived when
   ≤ --tolerance): 'extend' runs k = train_steps/2 steps, then the same
   command with --train_steps=2k; 'SIGKILL' kills a 2k run as in kind 1 and
   re-runs it. The straight run also calibrates the kill times of kinds 1
   and 2 (without kind 4 a plain run does).
5. Bad input: `python -m pytest -q tests/test_run.py -k
   bad_input_is_a_one_line_error` (once): clear errors / tried from pytest's
   summary line.

Objectives (--objectives, default simclr,ifnd: see Cost): simclr, sogclr,
fnc (--support_size=1
--use_randaugment=false --memory_multiplier=3: memory mode needs a
multiplier ≥ the 3 views), ifnd (--ifnd_num_clusters=5,10
--ifnd_reassign_epochs=1 --memory_multiplier=2 --train_batch_size=48: an
epoch is 30 steps, so the pseudo labels are re-assigned at step 0 and at
step 30, inside the 40 steps, and 30 is a multiple of the 5-step host loop).

Cost (2-core CPU, measured): one 40-step run takes 45-60 s (simclr,
sogclr), 55-65 s (ifnd), 60-90 s (fnc), depending on the load, nearly all
of it fixed: ~23 s start-up, 15-45 s tracing the first host loop, ~5 s for
the 40 steps, ~7 s export, then 3-80 s of interpreter shutdown (garbage
collection of the traced graphs) before the process exits. Two runs at once
take longer than one after the other, so trials run one at a time. Per
objective and trial: the straight run (also the calibration) ~50 s, a
SIGKILL trial ~70 s, a SIGTERM trial ~70-110 s, the extension ~75 s, the
exact SIGKILL trial ~60 s: ~5.5 min for simclr, ~8 min for ifnd, ~9 min for
fnc; kind 3 ~50 s, kind 5 ~2 min (56 cases). Hence the defaults, --trials=1
and --objectives=simclr,ifnd (the plain loss and the one with the most
checkpointed state: momentum encoder, memory queue, pseudo-label table and a
re-assignment inside the run): ~17 min (estimated from the times above).
All four objectives: ~30 min (estimated); --quick --objectives=simclr: 8.0
min (measured); each further trial adds ~3.5 min per objective (simclr;
~6 min for fnc).
"""

import argparse
import datetime
import fnmatch
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'faults.json')

# The tiny run every trial starts from (the brief's flags; --mode=train: no
# evaluation, only checkpoints and the final export).
BASE_FLAGS = {
    'dataset': 'digits', 'eval_split': 'test', 'image_size': 16,
    'resnet_depth': 18, 'width_multiplier': 0.125, 'proj_out_dim': 16,
    'train_batch_size': 32, 'warmup_epochs': 0, 'use_blur': 'false',
    'train_summary_steps': 0, 'checkpoint_steps': 5, 'train_steps': 40,
    'mode': 'train',
}
OBJECTIVE_FLAGS = {
    'simclr': {},
    'sogclr': {},
    'fnc': {'support_size': 1, 'use_randaugment': 'false',
            'memory_multiplier': 3},
    'ifnd': {'ifnd_num_clusters': '5,10', 'ifnd_reassign_epochs': 1,
             'memory_multiplier': 2, 'train_batch_size': 48},
}
DETERMINISTIC_FLAGS = {'deterministic': 'true', 'seed': 0,
                       'use_randaugment': 'false', 'warmup_epochs': 100}
DETERMINISTIC_EXTRA = {'ifnd': {'ifnd_acceptance': 'constant'}}
NONFINITE_FLAGS = {'learning_rate': 1e30, 'optimizer': 'momentum',
                   'steps_per_loop': 1, 'checkpoint_steps': 1,
                   'mode': 'train_then_eval'}
BAD_INPUT_COMMAND = ['-m', 'pytest', '-q', 'tests/test_run.py', '-k',
                     'bad_input_is_a_one_line_error', '-p', 'no:cacheprovider']
LEFTOVER_PATTERNS = ('*.tmp', 'ckpt-*_temp*', 'checkpoint.tmp*', '.write_test')

TRAINING_RE = re.compile(r'\] Training \S+ \(\S+\) from step (\d+) to (\d+)')
ALREADY_RE = re.compile(r'model_dir already holds step (\d+)')
PROGRESS_RE = re.compile(r'\] step (\d+)/(\d+) \|')
SIGTERM_RE = re.compile(r'SIGTERM received: saved (\S+) at step (\d+)')
NONFINITE_RE = re.compile(r'Non-finite loss at step (\d+)')
EXPORTED_RE = re.compile(r'Exported SavedModel')

# Used when the calibration run failed (seconds from the window start).
FALLBACK_CALIBRATION = {'training': 0.0, 'progress': 16.0, 'last': 21.0,
                        'exported': 27.0, 'exit': 28.0}


# ----------------------------------------------------------------- runs


def argv_of(flags, model_dir):
  return ['run.py'] + [f'--{k}={v}' for k, v in flags.items()] + [
      f'--model_dir={model_dir}']


def shown(argv):
  return shlex.join(['python'] + argv)


class Proc:
  """A subprocess writing stdout+stderr to a log file that is followed
  while it runs (its own process group: a kill reaches all of it)."""

  running = set()  # every Proc not yet waited for (killed at exit)

  def __init__(self, argv, log_path, cwd, timeout):
    self.log_path = log_path
    self.timeout = timeout
    self.started = time.time()
    self.deadline = self.started + timeout
    self.events = {}  # name -> time first seen
    self.text = ''
    self._offset = 0
    env = dict(os.environ, PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='1')
    with open(log_path, 'ab') as log:
      self.popen = subprocess.Popen(
          [sys.executable] + argv, cwd=cwd, stdout=log,
          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
          start_new_session=True)
    self.timed_out = False
    Proc.running.add(self)

  def poll(self):
    self._read()
    return self.popen.poll()

  def _read(self):
    """Appends what the log gained to `text` and notes, for each complete
    new line, the events it shows (the time first seen)."""
    try:
      with open(self.log_path, 'rb') as f:
        f.seek(self._offset)
        chunk = f.read()
    except OSError:
      return
    if not chunk:
      return
    self._offset += len(chunk)
    new = chunk.decode('utf-8', 'replace')
    self.text += new
    lines = (self._partial + new).split('\n')
    self._partial = lines.pop()
    now = time.time()
    for line in lines:
      for name, pattern in (('training', TRAINING_RE), ('already', ALREADY_RE),
                            ('exported', EXPORTED_RE)):
        if name not in self.events and pattern.search(line):
          self.events[name] = now
      m = PROGRESS_RE.search(line)
      if m:
        step, total = int(m.group(1)), int(m.group(2))
        self.events.setdefault('progress', now)
        self.last_step = max(self.last_step or 0, step)
        if step >= total:
          self.events.setdefault('last', now)

  last_step = None
  _partial = ''

  def wait_event(self, name):
    """Waits until the log shows `name`; False if the process ended first
    or the timeout passed."""
    while True:
      rc = self.poll()
      if name in self.events:
        return True
      if rc is not None or time.time() > self.deadline:
        return False
      time.sleep(0.05)

  def wait_step(self, step):
    """Waits for a progress line at or past `step` (False as wait_event)."""
    while True:
      rc = self.poll()
      if self.last_step is not None and self.last_step >= step:
        return True
      if rc is not None or time.time() > self.deadline:
        return False
      time.sleep(0.02)

  def sleep(self, seconds):
    """Sleeps while the process runs; False if it ended meanwhile."""
    end = time.time() + seconds
    while time.time() < end:
      if self.poll() is not None:
        return False
      time.sleep(min(0.02, max(0.0, end - time.time())))
    return self.poll() is None

  def send(self, signum, group=False):
    try:
      if group:
        os.killpg(self.popen.pid, signum)
      else:
        os.kill(self.popen.pid, signum)
    except ProcessLookupError:
      pass

  def wait(self, timeout=None):
    """The exit code; on timeout the process group is killed and None
    returned (timed_out set)."""
    end = self.deadline if timeout is None else time.time() + timeout
    while True:  # follows the log, so that events get their times
      rc = self.poll()
      if rc is not None:
        break
      if time.time() > end:
        self.timed_out = True
        self.send(signal.SIGKILL, group=True)
        self.popen.wait()
        rc = None
        break
      time.sleep(0.05)
    self._read()
    self.seconds = time.time() - self.started
    Proc.running.discard(self)
    return rc

  @classmethod
  def kill_all(cls):
    for proc in list(cls.running):
      proc.send(signal.SIGKILL, group=True)
      proc.wait(timeout=10)

  def last_error(self):
    """The last non-empty line that does not look like a log line."""
    lines = [l.strip() for l in self.text.splitlines() if l.strip()]
    for line in reversed(lines):
      if line.startswith('run.py:') or 'Error' in line:
        return line[:300]
    return lines[-1][:300] if lines else '(no output)'


def resumed_from(text):
  """The step a run started (or found itself done) at, from its log."""
  m = TRAINING_RE.search(text)
  if m:
    return int(m.group(1))
  m = ALREADY_RE.search(text)
  return int(m.group(1)) if m else None


def latest_checkpoint(model_dir):
  """(step, prefix) of model_dir/checkpoint's latest entry, or (None, None)."""
  try:
    with open(os.path.join(model_dir, 'checkpoint')) as f:
      text = f.read()
  except OSError:
    return None, None
  m = re.search(r'^model_checkpoint_path: "(.*)"', text, re.M)
  if not m:
    return None, None
  prefix = m.group(1)
  if not os.path.isabs(prefix):
    prefix = os.path.join(model_dir, prefix)
  step = re.search(r'ckpt-(\d+)$', prefix)
  return (int(step.group(1)) if step else None), prefix


def complete_steps(model_dir):
  """Steps of the checkpoints whose index and data files are all there."""
  steps = []
  try:
    names = os.listdir(model_dir)
  except OSError:
    return steps
  for name in names:
    m = re.fullmatch(r'ckpt-(\d+)\.index', name)
    if not m:
      continue
    shards = [n for n in names if n.startswith(f'ckpt-{m.group(1)}.data-')]
    counts = {int(re.search(r'-of-(\d+)$', n).group(1)) for n in shards}
    if shards and len(counts) == 1 and len(shards) == counts.pop():
      steps.append(int(m.group(1)))
  return sorted(steps)


def leftovers(model_dir):
  found = []
  for root, dirs, files in os.walk(model_dir):
    for name in dirs + files:
      if any(fnmatch.fnmatch(name, p) for p in LEFTOVER_PATTERNS):
        found.append(os.path.relpath(os.path.join(root, name), model_dir))
  return sorted(found)


def tensor_report(repo, prefixes, timeout=300):
  """{float_tensors, nonfinite, [max_abs_diff, worst, only_a, only_b]} of
  one or two checkpoints, read in a subprocess (TF's reader)."""
  argv = [sys.executable, os.path.abspath(__file__), '--_tensors', *prefixes]
  try:
    proc = subprocess.run(argv, cwd=repo, capture_output=True, text=True,
                          timeout=timeout,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  except subprocess.TimeoutExpired:
    return {'error': f'reading the checkpoint(s) took over {timeout} s'}
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ['?'])[-1]
    return {'error': f'reading the checkpoint(s) failed: {tail[:300]}'}
  return json.loads(lines[-1])


def _tensors_main(prefixes):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import numpy as np
  import tensorflow as tf
  readers = [tf.train.load_checkpoint(p) for p in prefixes]
  maps = [r.get_variable_to_dtype_map() for r in readers]
  floats = sorted(k for k, d in maps[0].items() if d.is_floating)
  values = {k: readers[0].get_tensor(k) for k in floats}
  report = {'float_tensors': len(floats),
            'nonfinite': [k for k in floats
                          if not np.all(np.isfinite(values[k]))]}
  if len(readers) == 2:
    other = sorted(k for k, d in maps[1].items() if d.is_floating)
    report['only_a'] = sorted(set(floats) - set(other))
    report['only_b'] = sorted(set(other) - set(floats))
    worst, worst_key, shape_mismatch = 0.0, None, []
    for k in sorted(set(floats) & set(other)):
      a = values[k].astype(np.float64)
      b = readers[1].get_tensor(k).astype(np.float64)
      if a.shape != b.shape:
        shape_mismatch.append(k)
        continue
      diff = float(np.max(np.abs(a - b))) if a.size else 0.0
      if not np.isfinite(diff):
        diff = float('inf')
      if diff > worst or worst_key is None:
        worst, worst_key = diff, k
    report.update(max_abs_diff=worst, worst=worst_key,
                  shape_mismatch=shape_mismatch)
  print(json.dumps(report))


# ----------------------------------------------------------------- campaign


class Campaign:

  def __init__(self, args):
    self.args = args
    self.repo = os.path.abspath(args.repo)
    self.started = time.time()
    self.rows = []
    self.calibration = {}
    self.straight = {}  # objective -> (model_dir, argv) of kind 4's reference
    self.workdir = args.workdir or tempfile.gettempdir()
    os.makedirs(self.workdir, exist_ok=True)
    if os.path.commonpath([os.path.abspath(self.workdir), self.repo]) == \
        self.repo:
      raise SystemExit(f'--workdir={self.workdir} is inside the repo; use a '
                       'directory outside it.')
    self.cleanup = []

  # --- Bookkeeping. ---

  def log(self, message):
    print(f'[{time.time() - self.started:6.0f} s] {message}', flush=True)

  def new_dir(self, label):
    path = tempfile.mkdtemp(prefix=f'faults_{label}_', dir=self.workdir)
    self.cleanup.append(path)
    return path

  def flags(self, objective, deterministic=False, **extra):
    flags = dict(BASE_FLAGS)
    flags['objective'] = objective
    flags.update(OBJECTIVE_FLAGS[objective])
    if deterministic:
      flags.update(DETERMINISTIC_FLAGS)
      flags.update(DETERMINISTIC_EXTRA.get(objective, {}))
    flags.update(extra)
    return flags

  def rng(self, kind, objective, trial):
    return random.Random(f'{self.args.seed}:{kind}:{objective}:{trial}')

  def run(self, argv, log_path, timeout=None):
    return Proc(argv, log_path, self.repo, timeout or self.args.timeout)

  def trial(self, row, number, fn, *fn_args):
    """Runs one trial; any harness error counts as not survived."""
    start = time.time()
    try:
      result = fn(*fn_args)
    except Exception as e:  # noqa: BLE001 (a broken trial must not stop all)
      result = {'survived': False, 'outcome': f'harness error: {e!r}'}
    result['seconds'] = round(time.time() - start, 1)
    result.setdefault('trial', number)
    if result.get('counted', True):
      row['tried'] += 1
      row['survived'] += bool(result['survived'])
    row['trials'].append(result)
    verdict = ('survived' if result['survived'] else
               'NOT COUNTED' if not result.get('counted', True) else 'FAILED')
    self.log(f'{row["kind"]} | {row["objective"]} | trial {number}: '
             f'{verdict}: {result["outcome"]} ({result["seconds"]:.0f} s)')
    return result

  def new_row(self, kind, objective, command, procedure):
    row = {'kind': kind, 'objective': objective, 'tried': 0, 'survived': 0,
           'notes': '', 'command': command, 'procedure': procedure,
           'trials': []}
    self.rows.append(row)
    return row

  # --- Calibration: times of the log events of an uninterrupted run. ---

  def calibrate(self, objective, deterministic):
    model_dir = self.new_dir(f'calibrate_{objective}')
    flags = self.flags(objective, deterministic=deterministic)
    argv = argv_of(flags, model_dir)
    proc = self.run(argv, model_dir + '.log')
    rc = proc.wait()
    events = dict(proc.events)
    events['exit'] = time.time()
    ok = rc == 0 and all(e in events for e in ('training', 'progress', 'last'))
    if ok:
      events.setdefault('exported', events['exit'])
      base = events['training']
      calibration = {k: events[k] - base for k in
                     ('training', 'progress', 'last', 'exported', 'exit')}
    else:
      calibration = dict(FALLBACK_CALIBRATION)
    calibration['ok'] = ok
    calibration['seconds'] = round(proc.seconds, 1)
    calibration['error'] = None if ok else (
        'timed out' if proc.timed_out else f'exit {rc}: {proc.last_error()}')
    self.calibration[objective] = calibration
    self.log(f'calibration | {objective}: '
             + (f'{proc.seconds:.0f} s; from the Training line: first '
                f'checkpoint {calibration["progress"]:.1f} s, last step '
                f'{calibration["last"]:.1f} s, exported '
                f'{calibration["exported"]:.1f} s, exit '
                f'{calibration["exit"]:.1f} s'
                if ok else f'FAILED ({calibration["error"]}); kill times use '
                'fallback offsets'))
    return model_dir, argv, ok

  def window(self, objective, end):
    """(start event, span in seconds) of the random kill/stop time."""
    cal = self.calibration[objective]
    start = 'training' if self.args.window == 'training' else 'progress'
    return start, max(0.5, cal[end] - cal[start])

  # --- Kind 1 (and kind 4's SIGKILL variant). ---

  def kill_trial(self, objective, flags, rng, label):
    model_dir = self.new_dir(label)
    argv = argv_of(flags, model_dir)
    train_steps = int(flags['train_steps'])
    start_event, span = self.window(objective, 'exported')
    fraction = rng.random()
    delay = fraction * span
    info = {'command': shown(argv), 'kill_after': round(delay, 2),
            'kill_window': f'{delay:.1f} s after the first {start_event!r} log '
                           f'event (u={fraction:.3f} of {span:.1f} s)'}
    proc = self.run(argv, model_dir + '.log')
    if not proc.wait_event(start_event):
      rc = proc.wait(timeout=5)
      return dict(info, survived=False, outcome=(
          f'the run never logged {start_event!r}: '
          + ('timed out' if proc.timed_out or rc is None
             else f'exit {rc}: {proc.last_error()}')))
    alive = proc.sleep(delay)
    if not alive:
      proc.wait(timeout=5)
      return dict(info, survived=False, counted=False,
                  outcome='finished before the kill')
    phase = ('tracing/first loop' if proc.last_step is None else
             'exiting (after the export)' if 'exported' in proc.events else
             'export' if 'last' in proc.events else
             f'training (last progress line: step {proc.last_step})')
    proc.send(signal.SIGKILL, group=True)
    rc = proc.wait(timeout=30)
    info['killed_during'] = phase
    info['kill_rc'] = rc
    return self.resume_and_check(model_dir, argv, train_steps, info, phase)

  def resume_and_check(self, model_dir, argv, train_steps, info, phase,
                       expected_from=None):
    """Re-runs `argv` until it exits 0 and checks the resume (kinds 1, 2)."""
    problems = []
    restarts = []
    for attempt in range(1, self.args.max_restarts + 1):
      before, _ = latest_checkpoint(model_dir)
      complete = complete_steps(model_dir)
      expected = before if before is not None else 0
      if expected_from is not None and attempt == 1 and expected != \
          expected_from:
        problems.append(f'latest checkpoint before the restart is '
                        f'{before}, the stop reported step {expected_from}')
      if complete and before is not None and max(complete) > before:
        problems.append(f'restart {attempt}: complete ckpt-{max(complete)} '
                        f'is newer than the latest in checkpoint ({before})')
      proc = self.run(argv, f'{model_dir}.restart{attempt}.log')
      rc = proc.wait()
      started = resumed_from(proc.text)
      restarts.append({'rc': rc, 'from_step': started,
                       'expected_from': expected,
                       'seconds': round(proc.seconds, 1)})
      if started != expected:
        problems.append(f'restart {attempt} started from step {started}, the '
                        f'latest checkpoint was {expected}')
      if rc == 0:
        break
      problems.append(f'restart {attempt} ' + (
          'timed out' if proc.timed_out else
          f'exited {rc}: {proc.last_error()}'))
    info['restarts'] = restarts
    final, prefix = latest_checkpoint(model_dir)
    if final != train_steps:
      problems.append(f'final checkpoint at step {final}, not {train_steps}')
    export = os.path.join(model_dir, 'saved_model', str(train_steps))
    if not os.path.isdir(export):
      problems.append(f'no saved_model/{train_steps}')
    left = leftovers(model_dir)
    if left:
      problems.append('temporaries left: ' + ', '.join(left[:5]))
    info['final_prefix'] = prefix
    info['problems'] = problems
    first = restarts[0] if restarts else {}
    outcome = (f'{phase}; resumed from step {first.get("from_step")}'
               + (f' after {len(restarts)} runs' if len(restarts) > 1 else ''))
    if problems:
      outcome += ' — ' + '; '.join(problems)
    return dict(info, survived=not problems, outcome=outcome,
                model_dir=model_dir)

  # --- Kind 2. ---

  def term_trial(self, objective, flags, rng, label):
    model_dir = self.new_dir(label)
    argv = argv_of(flags, model_dir)
    train_steps = int(flags['train_steps'])
    every = int(flags['checkpoint_steps'])
    boundary, loop_seconds = self.term_schedule(objective, train_steps, every,
                                                rng)
    fraction = rng.random()
    delay = fraction * loop_seconds
    start_event = f'step {boundary}' if boundary else 'training'
    info = {'command': shown(argv), 'term_after': round(delay, 2),
            'term_window': f'{delay:.2f} s after the progress line of step '
                           f'{boundary} (u={fraction:.3f} of one host loop, '
                           f'{loop_seconds:.2f} s)' if boundary else
                           f'{delay:.1f} s after the Training line (u='
                           f'{fraction:.3f} of the first loop, '
                           f'{loop_seconds:.1f} s)'}
    proc = self.run(argv, model_dir + '.log')
    if not (proc.wait_step(boundary) if boundary else
            proc.wait_event('training')):
      rc = proc.wait(timeout=5)
      return dict(info, survived=False, outcome=(
          f'the run never logged {start_event!r}: '
          + ('timed out' if proc.timed_out or rc is None
             else f'exit {rc}: {proc.last_error()}')))
    if not proc.sleep(delay):
      proc.wait(timeout=5)
      return dict(info, survived=False, counted=False,
                  outcome='finished before the signal')
    if 'last' in proc.events:
      proc.send(signal.SIGKILL, group=True)
      proc.wait(timeout=30)
      return dict(info, survived=False, counted=False,
                  outcome='late: the last step was logged before the signal')
    at_signal, _ = latest_checkpoint(model_dir)
    at_signal = at_signal or 0
    seen = proc.last_step
    sent = time.time()
    proc.send(signal.SIGTERM)
    rc = proc.wait(timeout=self.args.stop_timeout)
    info.update(rc=rc, latest_at_signal=at_signal, last_progress_seen=seen,
                stop_seconds=round(time.time() - sent, 2))
    problems = []
    if rc is None:
      problems.append(f'did not stop within {self.args.stop_timeout} s '
                      '(killed)')
    elif rc != 143:
      problems.append(f'exit code {rc}, not 143'
                      + (' (killed by the signal: default handler)'
                         if rc == -signal.SIGTERM else ''))
    m = SIGTERM_RE.search(proc.text)
    step = int(m.group(2)) if m else None
    info['stopped_at'] = step
    if step is None:
      problems.append("no 'SIGTERM received: saved ... at step N' message")
      return dict(info, survived=False, outcome='; '.join(problems),
                  model_dir=model_dir)
    after, _ = latest_checkpoint(model_dir)
    if after != step:
      problems.append(f'latest checkpoint after the stop is {after}, the '
                      f'message says step {step}')
    if step not in complete_steps(model_dir):
      problems.append(f'ckpt-{step} is not complete on disk')
    if step < max(at_signal, seen or 0):
      problems.append(f'stopped at step {step}, before step '
                      f'{max(at_signal, seen or 0)} that was reached (latest '
                      f'checkpoint {at_signal}, last progress line {seen}) '
                      'when the signal was sent')
    if step > train_steps:
      problems.append(f'stopped at step {step} > train_steps')
    mid_loop = step % every != 0
    info['mid_loop'] = mid_loop
    where = (f'stopped at step {step} (inside a host loop; latest checkpoint '
             f'was {at_signal})' if mid_loop else
             f'stopped at step {step} (a loop boundary; latest checkpoint '
             f'was {at_signal})')
    info['stop_problems'] = problems
    result = self.resume_and_check(model_dir, argv, train_steps, info,
                                   where, expected_from=step)
    if problems:
      result['survived'] = False
      result['outcome'] += ' — ' + '; '.join(problems)
      result['problems'] = problems + result['problems']
    return result

  def term_schedule(self, objective, train_steps, every, rng):
    """(host-loop boundary step, seconds of one loop) of a SIGTERM time:
    a boundary drawn uniformly (step 0 = the 'Training' line only with
    --window=training), then a uniform fraction of the loop after it, so
    the signal falls inside a loop however fast the run is today."""
    cal = self.calibration[objective]
    boundaries = list(range(every, train_steps, every))
    loop_seconds = max(0.05, (cal['last'] - cal['progress']) /
                       max(1, len(boundaries)))
    if self.args.window == 'training':
      boundaries = [0] + boundaries
    boundary = rng.choice(boundaries)
    if boundary == 0:
      return 0, max(0.5, cal['progress'] - cal['training'])
    return boundary, loop_seconds * 0.9

  # --- Kind 3. ---

  def nonfinite_trial(self):
    model_dir = self.new_dir('nonfinite')
    argv = argv_of(self.flags('simclr', **NONFINITE_FLAGS), model_dir)
    proc = self.run(argv, model_dir + '.log')
    rc = proc.wait()
    problems = []
    info = {'command': shown(argv), 'rc': rc}
    if rc != 3:
      problems.append('timed out' if proc.timed_out else
                      f'exit code {rc}, not 3 ({proc.last_error()})')
    m = NONFINITE_RE.search(proc.text)
    step = int(m.group(1)) if m else None
    if step is None:
      problems.append("no 'Non-finite loss at step N' message")
    latest, prefix = latest_checkpoint(model_dir)
    info.update(step=step, latest_checkpoint=latest)
    if prefix:
      report = tensor_report(self.repo, [prefix])
      info['tensors'] = report
      if 'error' in report:
        problems.append(report['error'])
      elif report['nonfinite']:
        problems.append(f'{len(report["nonfinite"])} of '
                        f'{report["float_tensors"]} float tensors of '
                        f'ckpt-{latest} not finite, e.g. '
                        f'{report["nonfinite"][0]}')
      if step is not None and latest is not None and latest >= step:
        problems.append(f'ckpt-{latest} holds the state of the non-finite '
                        f'step {step}')
    for name in ('result.json', 'saved_model'):
      if os.path.exists(os.path.join(model_dir, name)):
        problems.append(f'{name} was written')
    outcome = (f'stopped at step {step}, latest checkpoint {latest}'
               + (f' ({info["tensors"].get("float_tensors")} float tensors '
                  'checked)' if 'tensors' in info else ' (none written)'))
    if problems:
      outcome += ' — ' + '; '.join(problems)
    return dict(info, survived=not problems, outcome=outcome)

  # --- Kind 4. ---

  def compare_to_straight(self, objective, result, final_prefix):
    straight_dir, _ = self.straight[objective]
    straight_step, straight_prefix = latest_checkpoint(straight_dir)
    if straight_step != int(BASE_FLAGS['train_steps']):
      result['survived'] = False
      result['outcome'] += (f' — the straight run ended at step '
                            f'{straight_step}: nothing to compare with')
      return result
    if not final_prefix:
      result['survived'] = False
      result['outcome'] += ' — nothing to compare (no final checkpoint)'
      return result
    report = tensor_report(self.repo, [final_prefix, straight_prefix])
    result['comparison'] = report
    if 'error' in report:
      result['survived'] = False
      result['outcome'] += ' — ' + report['error']
      return result
    diff = report['max_abs_diff']
    result['max_abs_diff'] = diff
    extra = []
    if report['only_a'] or report['only_b'] or report['shape_mismatch']:
      extra.append(f'tensors differ in name/shape: only resumed '
                   f'{report["only_a"][:3]}, only straight '
                   f'{report["only_b"][:3]}, shapes '
                   f'{report["shape_mismatch"][:3]}')
    if diff > self.args.tolerance:
      extra.append(f'max |resumed − straight| = {diff:.3g} '
                   f'(> {self.args.tolerance:g}) in {report["worst"]}')
    result['outcome'] += f'; max |diff| {diff:.3g} over ' \
                         f'{report["float_tensors"]} float tensors'
    if extra:
      result['survived'] = False
      result['outcome'] += ' — ' + '; '.join(extra)
    return result

  def extend_trial(self, objective):
    steps = int(BASE_FLAGS['train_steps'])
    k = steps // 2
    model_dir = self.new_dir(f'extend_{objective}')
    first = argv_of(self.flags(objective, True, train_steps=k), model_dir)
    second = argv_of(self.flags(objective, True, train_steps=steps),
                     model_dir)
    info = {'command': f'{shown(first)} && {shown(second)}'}
    proc = self.run(first, model_dir + '.log')
    rc = proc.wait()
    if rc != 0:
      return dict(info, survived=False, outcome=f'the {k}-step run ' + (
          'timed out' if proc.timed_out else
          f'exited {rc}: {proc.last_error()}'))
    proc = self.run(second, model_dir + '.extend.log')
    rc = proc.wait()
    started = resumed_from(proc.text)
    final, prefix = latest_checkpoint(model_dir)
    problems = []
    if rc != 0:
      problems.append('the extension ' + ('timed out' if proc.timed_out else
                                          f'exited {rc}: {proc.last_error()}'))
    if started != k:
      problems.append(f'the extension started from step {started}, not {k}')
    if final != steps:
      problems.append(f'final checkpoint {final}, not {steps}')
    result = {'survived': not problems,
              'outcome': f'{k} steps, then resumed from {started} to {final}'
                         + (' — ' + '; '.join(problems) if problems else '')}
    result = dict(info, **result)
    return self.compare_to_straight(objective, result, prefix)

  def exact_kill_trial(self, objective, rng):
    flags = self.flags(objective, deterministic=True)
    result = self.kill_trial(objective, flags, rng, f'exactkill_{objective}')
    return self.compare_to_straight(objective, result,
                                    result.get('final_prefix'))

  # --- Kind 5. ---

  def bad_input_row(self):
    argv = BAD_INPUT_COMMAND
    row = self.new_row('5 bad input', '-', shown(argv),
                       'pytest; a clear error = a passed parametrized case')
    start = time.time()
    log_dir = self.new_dir('bad_input')
    proc = self.run(argv, os.path.join(log_dir, 'pytest.log'),
                    timeout=self.args.pytest_timeout)
    rc = proc.wait()
    out = proc.text
    counts = {}
    summary = [l for l in out.splitlines()
               if re.search(r'\d+ (passed|failed|error)', l)]
    if summary:
      for number, what in re.findall(
          r'(\d+) (passed|failed|errors?|skipped|deselected)', summary[-1]):
        counts[what.rstrip('s') if what.startswith('error') else what] = \
            int(number)
    passed = counts.get('passed', 0)
    tried = passed + counts.get('failed', 0) + counts.get('error', 0)
    row['tried'], row['survived'] = tried, passed
    failed = re.findall(r'^(?:FAILED|ERROR) \S+?\[(.+?)\]', out, re.M)
    row['notes'] = (f'clear error {passed}/{tried}'
                    + (f'; not clear: {", ".join(failed[:6])}'
                       + (f' and {len(failed) - 6} more' if len(failed) > 6
                          else '') if failed else '')
                    + ('' if rc is not None else
                       f'; pytest timed out after {self.args.pytest_timeout} s')
                    + ('' if summary else '; no pytest summary line: '
                       + (out.strip().splitlines() or ['(no output)'])[-1][:200]))
    row['trials'].append({'rc': rc, 'counts': counts,
                          'seconds': round(time.time() - start, 1),
                          'not_clear': failed})
    self.log(f'5 bad input: {row["notes"]} ({time.time() - start:.0f} s)')

  # --- The whole campaign. ---

  def execute(self):
    args = self.args
    kinds = set(args.kinds)
    if 3 in kinds:
      row = self.new_row('3 non-finite', 'simclr', None,
                         'one run; exit 3, message, finite latest checkpoint, '
                         'no result.json/saved_model')
      result = self.trial(row, 1, self.nonfinite_trial)
      row['command'] = result.get('command')
      row['notes'] = result['outcome']
    for objective in args.objectives:
      if kinds & {1, 2, 4}:
        model_dir, argv, ok = self.calibrate(objective, deterministic=4 in kinds)
        if 4 in kinds:
          self.straight[objective] = (model_dir, argv)
          if not ok:
            self.log(f'4 exact | {objective}: the straight run failed; the '
                     'comparisons will fail')
      if 1 in kinds:
        flags = self.flags(objective)
        start, span = self.window(objective, 'exported')
        row = self.new_row(
            '1 SIGKILL', objective, shown(argv_of(flags, '<fresh dir>')),
            f'SIGKILL at u·{span:.1f} s after the first {start!r} log event, '
            'then the same command until exit 0')
        for i in range(1, args.trials + 1):
          self.trial(row, i, self.kill_trial, objective, flags,
                     self.rng(1, objective, i), f'kill_{objective}')
        self.summarize(row)
      if 2 in kinds:
        flags = self.flags(objective)
        row = self.new_row(
            '2 SIGTERM', objective, shown(argv_of(flags, '<fresh dir>')),
            'SIGTERM at u × 0.9 host loop after the progress line of a '
            'random loop boundary, then the same command')
        for i in range(1, args.trials + 1):
          self.trial(row, i, self.term_trial, objective, flags,
                     self.rng(2, objective, i), f'term_{objective}')
        self.summarize(row, sigterm=True)
      if 4 in kinds:
        straight_cmd = shown(argv_of(self.flags(objective, True),
                                     '<straight dir>'))
        k = int(BASE_FLAGS['train_steps']) // 2
        row = self.new_row(
            '4 exact (extend)', objective,
            shown(argv_of(self.flags(objective, True, train_steps=k),
                          '<dir>')) + ' && the same with --train_steps='
            f'{2 * k}', f'compared with the straight run: {straight_cmd}')
        self.trial(row, 1, self.extend_trial, objective)
        self.summarize(row, exact=True)
        row = self.new_row(
            '4 exact (SIGKILL)', objective,
            shown(argv_of(self.flags(objective, True), '<fresh dir>')),
            'SIGKILL as kind 1, re-run until exit 0, compared with the '
            f'straight run: {straight_cmd}')
        for i in range(1, args.trials + 1):
          self.trial(row, i, self.exact_kill_trial, objective,
                     self.rng(4, objective, i))
        self.summarize(row, exact=True)
    if 5 in kinds:
      self.bad_input_row()

  def summarize(self, row, sigterm=False, exact=False):
    trials = row['trials']
    notes = []
    failures = [t for t in trials if t.get('counted', True)
                and not t['survived']]
    if sigterm:
      counted = [t for t in trials if t.get('counted', True)
                 and 'stopped_at' in t]
      mid = sum(bool(t.get('mid_loop')) for t in counted)
      if counted:
        notes.append(f'stopped inside a host loop {mid}/{len(counted)}; '
                     'stop took ' + ', '.join(
                         f'{t["stop_seconds"]:.1f}' for t in counted) + ' s')
      skipped = [t for t in trials if not t.get('counted', True)]
      if skipped:
        notes.append(f'{len(skipped)} not counted ({skipped[0]["outcome"]})')
    else:
      phases = [t.get('killed_during') or t['outcome'] for t in trials
                if 'kill_window' in t]
      if phases:
        notes.append('killed during: ' + ', '.join(phases))
    if exact:
      diffs = [t['max_abs_diff'] for t in trials if 'max_abs_diff' in t]
      if diffs:
        notes.append(f'max |diff| {max(diffs):.3g}')
    if failures:
      notes.append('failed: ' + ' | '.join(
          t['outcome'][:400] for t in failures[:3]))
    row['notes'] = '; '.join(notes)

  def finish(self):
    if not self.args.keep:
      for path in self.cleanup:
        shutil.rmtree(path, ignore_errors=True)
        for log in [p for p in os.listdir(os.path.dirname(path))
                    if p.startswith(os.path.basename(path) + '.')]:
          try:
            os.remove(os.path.join(os.path.dirname(path), log))
          except OSError:
            pass


def print_table(rows):
  header = ('kind', 'objective', 'tried', 'survived', 'notes')
  widths = [max(len(header[0]), *(len(r['kind']) for r in rows)),
            max(len(header[1]), *(len(r['objective']) for r in rows)), 5, 8]
  line = (f'{header[0]:<{widths[0]}} | {header[1]:<{widths[1]}} | '
          f'{header[2]:>5} | {header[3]:>8} | {header[4]}')
  print(line)
  print('-' * len(line))
  for r in rows:
    print(f'{r["kind"]:<{widths[0]}} | {r["objective"]:<{widths[1]}} | '
          f'{r["tried"]:>5} | {r["survived"]:>8} | {r["notes"]}')
  print('\nCommands (run from the repo; <dir> is a fresh model_dir):')
  for r in rows:
    print(f'  {r["kind"]} / {r["objective"]}: {r["command"]}')
    if r.get('procedure'):
      print(f'      {r["procedure"]}')


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--trials', type=int, default=1,
                      help='trials per objective of kinds 1, 2 and 4 '
                           '(SIGKILL variant); kinds 3, 5 and 4 (extend) '
                           'run once')
  parser.add_argument('--objectives', default='simclr,ifnd',
                      type=lambda s: [x for x in s.split(',') if x])
  parser.add_argument('--kinds', default='1,2,3,4,5',
                      type=lambda s: [int(x) for x in s.split(',') if x])
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the random kill/stop times')
  parser.add_argument('--quick', action='store_true',
                      help='smoke test: 1 trial of everything')
  parser.add_argument('--window', choices=('checkpoint', 'training'),
                      default='checkpoint',
                      help="kill/stop times start at the first progress line "
                           "(= first checkpoint; default) or at the "
                           "'Training' line (then most kills land while the "
                           "first loop is traced)")
  parser.add_argument('--tolerance', type=float, default=1e-6)
  parser.add_argument('--timeout', type=float, default=600,
                      help='seconds per run.py subprocess')
  parser.add_argument('--stop_timeout', type=float, default=120,
                      help='seconds a run may take to stop after SIGTERM')
  parser.add_argument('--pytest_timeout', type=float, default=1800)
  parser.add_argument('--max_restarts', type=int, default=3)
  parser.add_argument('--workdir', default=None,
                      help='where the model_dirs go (default: the system '
                           'temp dir; never inside the repo)')
  parser.add_argument('--keep', action='store_true',
                      help='keep the model_dirs and logs')
  parser.add_argument('--repo', default=REPO,
                      help='the checkout whose run.py runs (default: this one)')
  parser.add_argument('--output', default=RESULTS)
  args = parser.parse_args(argv)
  if args.quick:
    args.trials = 1
  unknown = [o for o in args.objectives if o not in OBJECTIVE_FLAGS]
  if unknown:
    parser.error(f'unknown objective(s) {unknown}; choose from '
                 f'{",".join(OBJECTIVE_FLAGS)}')
  if set(args.kinds) - {1, 2, 3, 4, 5}:
    parser.error('--kinds takes numbers from 1 to 5')
  return args


def main(argv):
  if argv[:1] == ['--_tensors']:
    _tensors_main(argv[1:])
    return
  args = parse_args(argv)
  campaign = Campaign(args)
  print(f'fault campaign: kinds {",".join(map(str, args.kinds))}, objectives '
        f'{",".join(args.objectives)}, {args.trials} trial(s), seed '
        f'{args.seed}, repo {campaign.repo}', flush=True)
  interrupted = False
  try:
    campaign.execute()
  except KeyboardInterrupt:
    interrupted = True
    print('interrupted: writing what was measured', flush=True)
  finally:
    Proc.kill_all()
    campaign.finish()
  elapsed = time.time() - campaign.started
  print()
  if campaign.rows:
    print_table(campaign.rows)
  print(f'\n{elapsed / 60:.1f} min in all')
  payload = {
      'rows': campaign.rows, 'calibration': campaign.calibration,
      'settings': {k: v for k, v in vars(args).items()},
      'base_flags': BASE_FLAGS, 'objective_flags': OBJECTIVE_FLAGS,
      'deterministic_flags': DETERMINISTIC_FLAGS,
      'seconds': round(elapsed, 1), 'interrupted': interrupted,
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': os.uname().nodename, 'cpu_count': os.cpu_count(),
      'cwd_of_commands': campaign.repo,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  tmp = args.output + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp, args.output)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main(sys.argv[1:])
