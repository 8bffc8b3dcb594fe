"""Checkpoint fit checks, warm start with `--variable_schema`, and export.

Model variables are named by their checkpoint path below the model, e.g.
`base_model/block_groups/0/...`, `head_contrastive/...`, `head_supervised/...`
(the `model/` prefix and the `/.ATTRIBUTES/VARIABLE_VALUE` suffix of the
checkpoint key dropped). A checkpoint of the original SimCLR TF2 code is
recognised by its keys and its variables renamed to these names
(simclr_checkpoint.py) before anything else. These are the names
`--variable_schema` matches with `re.match`, so the FNC/TF1 README values
keep their meaning for both kinds of checkpoint:
`(?!global_step|(?:.*/|^)Momentum|head)` restores the backbone only and
`(?!global_step|(?:.*/|^)Momentum|head_supervised)` everything but the
linear head.

The SavedModel export (`export_saved_model`) serves `serving_default(images)`
→ features / projection / logits and, as the original's hub-style export,
`__call__(images, trainable)` → its named outputs (`--export_format`).

Fault tolerance of a model_dir: `check_resume_fits_all` compares every
tensor the run's tf.train.Checkpoint would save (model, optimizer, momentum
encoder, objective state, counters) with the checkpoint it resumes from;
`find_intact_checkpoint` finds the newest checkpoint that reads back and
`FallbackCheckpointManager` restores it in place of a corrupt latest one;
`remove_stale_temporaries` deletes the leftovers of interrupted writes;
`write_json` is atomic and writes no NaN; `compare_run_flags` compares the
flags of the run that wrote a model_dir with this run's.
"""

import collections
import json
import math
import os
import re
from typing import NamedTuple

from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow.python.checkpoint import graph_view as graph_view_lib
from tensorflow.python.checkpoint import save_util
from tensorflow.python.checkpoint import util as checkpoint_util
import tf_keras

import model as model_lib
import simclr_checkpoint

MODEL_KEY = 'model'
VALUE_SUFFIX = simclr_checkpoint.VALUE_SUFFIX
BACKBONE_PREFIX = 'base_model/'
EXPORT_FORMATS = ('both', 'serving', 'hub')


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model built from the flags."""


def resolve_checkpoint_path(path):
  """A checkpoint prefix from a prefix or a directory; clear error if none."""
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise FileNotFoundError(
          f'--checkpoint={path} is a directory without a checkpoint in it; '
          'pass a checkpoint prefix such as <model_dir>/ckpt-1000.')
    return latest
  if not tf.io.gfile.glob(path + '.index'):
    raise FileNotFoundError(
        f'--checkpoint={path}: no such checkpoint ({path}.index does not '
        'exist). Pass a checkpoint prefix such as <model_dir>/ckpt-1000 or '
        'the model_dir that holds it.')
  return path


def compile_schema(variable_schema):
  """The regex of `--variable_schema`; a bare '?!x' is read as '(?!x)'."""
  schema = variable_schema or ''
  if schema.startswith('?!'):
    schema = f'({schema})'
  try:
    return re.compile(schema)
  except re.error as e:
    raise ValueError(
        f'--variable_schema={variable_schema!r} is not a valid regex: {e}')


def is_original_simclr_checkpoint(path):
  """True when `path` was written by the original SimCLR TF2 code."""
  shapes = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  return simclr_checkpoint.is_original_checkpoint(shapes)


def checkpoint_variables(path):
  """(reader, {variable path: checkpoint key}) of the model variables saved
  in `path`: by this code (key `model/<path>/.ATTRIBUTES/VARIABLE_VALUE`) or
  by the original SimCLR TF2 code (keys renamed by simclr_checkpoint's name
  map). A variable of an original checkpoint that the map does not place is
  a CheckpointMismatchError naming it."""
  reader = tf.train.load_checkpoint(path)
  keys = reader.get_variable_to_shape_map()
  if simclr_checkpoint.is_original_checkpoint(keys):
    try:
      return reader, simclr_checkpoint.variable_names(keys)
    except simclr_checkpoint.UnmappedKeyError as e:
      raise CheckpointMismatchError(f'--checkpoint={path}: {e}') from e
  prefix = MODEL_KEY + '/'
  return reader, {key[len(prefix):-len(VALUE_SUFFIX)]: key
                  for key in simclr_checkpoint.model_variable_keys(keys)}


def _compare(model, path, pattern):
  """Splits the model's variables and the checkpoint's model variables
  selected by `pattern` (None: all) into (reader, to_restore [(key, name,
  variable)], missing, mismatched, unexpected, saved names); `unexpected`
  are the checkpoint's variables that the model does not have."""
  reader, saved = checkpoint_variables(path)
  shapes = reader.get_variable_to_shape_map()
  variables = model_lib.variable_paths(model)
  selected = lambda name: pattern is None or pattern.match(name)
  to_restore, missing, mismatched = [], [], []
  for name, var in sorted(variables.items()):
    if not selected(name):
      continue
    key = saved.get(name)
    if key is None:
      missing.append(name)
    elif list(shapes[key]) != var.shape.as_list():
      mismatched.append(
          f'{name}: model {var.shape.as_list()}, checkpoint {shapes[key]}')
    else:
      to_restore.append((key, name, var))
  unexpected = sorted(name for name in saved
                      if name not in variables and selected(name))
  return reader, to_restore, missing, mismatched, unexpected, sorted(saved)


def _listing(items, limit=10):
  text = '\n  '.join(items[:limit])
  if len(items) > limit:
    text += f'\n  ... and {len(items) - limit} more'
  return '\n  ' + text


def check_resume_fits(model, path):
  """Raises CheckpointMismatchError unless `path` holds exactly this model."""
  if is_original_simclr_checkpoint(path):
    raise CheckpointMismatchError(
        f'{path} in --model_dir was written by the original SimCLR TF2 code; '
        'a run resumes only from checkpoints of this code. Warm-start from '
        'it instead: --checkpoint=<it> with a new --model_dir.')
  _, _, missing, mismatched, unexpected, _ = _compare(model, path, None)
  if missing or mismatched or unexpected:
    raise CheckpointMismatchError(
        f'The checkpoint {path} in --model_dir does not fit the model built '
        'from these flags (different resnet_depth, width_multiplier, heads or '
        'num_classes?). Use the flags it was trained with (see flags.json '
        'next to it) or a new --model_dir.'
        + (f'\nShape mismatches:{_listing(mismatched)}' if mismatched else '')
        + (f'\nNot in the checkpoint:{_listing(missing)}' if missing else '')
        + (f'\nIn the checkpoint, not in the model:{_listing(unexpected)}'
           if unexpected else ''))


# --- Resuming: every object of the run's tf.train.Checkpoint. ---

GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'
ATTRIBUTES = '/.ATTRIBUTES/'
SLOT_MARKER = simclr_checkpoint.SLOT_MARKER
# Written by tf.train.Checkpoint.save / CheckpointManager, not an object of
# the run; created on the first save, so a fresh Checkpoint lacks it.
SAVE_COUNTER = 'save_counter'
OPTIMIZER_TYPES = (tf_keras.optimizers.legacy.Optimizer,
                   tf_keras.optimizers.Optimizer)


class FitReport(NamedTuple):
  """What `check_resume_fits_all` compared (readable checkpoint names)."""
  compared: list  # in both, same shape and dtype
  not_compared: list  # in the checkpoint only, created lazily by this run
  optional_missing: list  # allowed to be absent, absent


def readable_name(key):
  """A checkpoint key without its `/.ATTRIBUTES/VARIABLE_VALUE` suffix,
  e.g. `sogclr_u`, `memory_queue/keys`, `model/base_model/.../kernel`,
  `model/.../kernel/.OPTIMIZER_SLOT/optimizer/momentum`."""
  return key[:-len(VALUE_SUFFIX)] if key.endswith(VALUE_SUFFIX) else key


def checkpoint_keys(checkpoint):
  """{checkpoint key: (shape list or None, dtype or None)} of every tensor
  `checkpoint` would write now, computed without writing or reading a value.

  Uses TF's own save path (`save_util.serialize_graph_view`, which names
  the keys exactly as `Checkpoint.write` does, optimizer slots included)
  and takes shapes and dtypes from the variables themselves (also for
  distributed variables, whose saveables hold no shape). A tensor that is
  not a variable's value (a lookup table, Python state) gets the dtype of
  its save spec and no shape. Objects with a registered saver are not
  listed (none in this code).
  """
  view = graph_view_lib.ObjectGraphView(checkpoint)
  objects, _, _, _, names = (
      checkpoint_util.objects_ids_and_slot_variables_and_paths(view))
  by_name = {names[obj]: obj for obj in objects}
  tensors, _, _, _ = save_util.serialize_graph_view(
      graph_view_lib.ObjectGraphView(checkpoint))
  keys = {}
  for specs in tensors.values():
    for key, spec in specs.items():
      obj = by_name.get(key.split(ATTRIBUTES)[0])
      if isinstance(obj, tf.Variable) and key.endswith(VALUE_SUFFIX):
        keys[key] = (obj.shape.as_list(), obj.dtype.base_dtype)
      else:
        shape = getattr(spec, 'shape', None) if tf.is_tensor(spec) else None
        keys[key] = (None if shape is None else shape.as_list(),
                     getattr(spec, 'dtype', None))
  return keys


def _optimizer_paths(checkpoint):
  """The checkpoint paths of the optimizers reachable from `checkpoint`."""
  view = graph_view_lib.ObjectGraphView(checkpoint)
  objects, _, _, _, names = (
      checkpoint_util.objects_ids_and_slot_variables_and_paths(
          view, skip_slot_variables=True))
  return [names[obj] for obj in objects if isinstance(obj, OPTIMIZER_TYPES)]


def _owner(key, optimizer_path):
  """Whether `key` is a slot or an own variable of that optimizer."""
  return (key.startswith(optimizer_path + '/') or
          f'{SLOT_MARKER}{optimizer_path}/' in key)


def _describe(shape, dtype):
  return f'{shape} {dtype.name if dtype is not None else "?"}'


def _grouped_listing(names_and_texts, per_group=5):
  """Lines grouped by top-level object, at most `per_group` each, so every
  object of the checkpoint with a problem is named."""
  groups = collections.defaultdict(list)
  for name, text in sorted(names_and_texts):
    groups['optimizer slots' if SLOT_MARKER in name
           else f'in {name.split("/")[0]}/'].append(text)
  lines = []
  for group, texts in sorted(groups.items(), key=lambda g: (len(g[1]), g[0])):
    lines.extend(texts[:per_group])
    if len(texts) > per_group:
      lines.append(f'... and {len(texts) - per_group} more {group}')
  return '\n  ' + '\n  '.join(lines)


def check_resume_fits_all(checkpoint, path, optional=()):
  """Raises CheckpointMismatchError unless `path` holds every tensor that
  `checkpoint` (the run's tf.train.Checkpoint: model, optimizer, momentum
  encoder, objective state, input seed, ...) would save, with the same shape
  and dtype, and no tensor that this run would not restore.

  Compared: every key `checkpoint_keys` lists (the optimizer's slots only
  once they exist, i.e. after a first step; before it, tf_keras optimizers
  have not created them). Errors: a shape or dtype difference; a key the
  checkpoint lacks (a run with another objective or flags wrote it), unless
  its name is in `optional` or below one (e.g. 'nonfinite_skipped' for a
  counter newer than the checkpoint); a key of the checkpoint this run does
  not have, unless optional (float16's loss scale in a float32 run). Not
  compared (returned, not errors): the checkpoint's `save_counter` and
  object graph, its optional keys this run does not have, and the slots
  and hyperparameter variables of an optimizer that has not created its own yet (the restore
  fills them in when it creates them; a change of --optimizer is caught by
  `compare_run_flags`). Reads no tensor values.

  Returns:
    A FitReport.
  """
  if is_original_simclr_checkpoint(path):
    raise CheckpointMismatchError(
        f'{path} in --model_dir was written by the original SimCLR TF2 code; '
        'a run resumes only from checkpoints of this code. Warm-start from '
        'it instead: --checkpoint=<it> with a new --model_dir.')
  reader = tf.train.load_checkpoint(path)
  saved_shapes = reader.get_variable_to_shape_map()
  saved_dtypes = reader.get_variable_to_dtype_map()
  expected = checkpoint_keys(checkpoint)
  is_optional = lambda name: any(name == o or name.startswith(o + '/')
                                 for o in optional)
  compared, mismatched, missing, optional_missing = [], [], [], []
  for key, (shape, dtype) in sorted(expected.items()):
    name = readable_name(key)
    if key not in saved_shapes:
      if is_optional(name):
        optional_missing.append(name)
      else:
        missing.append((name, f'{name} ({_describe(shape, dtype)})'))
      continue
    saved_shape, saved_dtype = list(saved_shapes[key]), saved_dtypes[key]
    if ((shape is not None and shape != saved_shape) or
        (dtype is not None and dtype != saved_dtype)):
      mismatched.append((name, f'{name}: {_describe(shape, dtype)} here, '
                               f'{_describe(saved_shape, saved_dtype)} in '
                               'the checkpoint'))
    else:
      compared.append(name)
  # An optimizer that has not created its slots yet: its keys in the
  # checkpoint are restored when it does.
  lazy = [p for p in _optimizer_paths(checkpoint)
          if not any(SLOT_MARKER + p + '/' in key for key in expected)]
  not_compared, unexpected = [], []
  for key in sorted(saved_shapes):
    name = readable_name(key)
    if key in expected:
      continue
    if (key == GRAPH_KEY or name == SAVE_COUNTER or is_optional(name) or
        any(_owner(key, p) for p in lazy)):
      not_compared.append(name)
    else:
      unexpected.append((name, name))
  if mismatched or missing or unexpected:
    raise CheckpointMismatchError(
        f'The checkpoint {path} in --model_dir does not fit the model built '
        'from these flags (another objective, resnet_depth, width_multiplier, '
        'heads, num_classes, memory_multiplier, batch size, dataset, or '
        '--precision=float64 against 32-bit variables?). Use '
        'the flags of the run that wrote it (its flags.json in --model_dir) '
        'or another --model_dir.'
        + (f'\nShape or dtype mismatches:{_grouped_listing(mismatched)}'
           if mismatched else '')
        + ('\nNot in the checkpoint (it was written by a run with another '
           f'objective or other flags):{_grouped_listing(missing)}'
           if missing else '')
        + ('\nIn the checkpoint, not in this run:'
           f'{_grouped_listing(unexpected)}' if unexpected else ''))
  if optional_missing:
    logging.warning('Not in %s, left at initial values: %s', path,
                    optional_missing)
  logging.info('%s fits: %d tensors compared, %d not compared (%s).', path,
               len(compared), len(not_compared),
               'object graph, save counter, optimizer variables not created '
               'yet')
  return FitReport(compared, not_compared, optional_missing)


def _plan_warm_start(model, path, variable_schema, require_backbone=False):
  """(reader, [(key, name, variable)] to restore); raises if the checkpoint
  misfits, if the schema restores nothing, or (require_backbone) if it
  restores no backbone variable."""
  pattern = compile_schema(variable_schema)
  reader, to_restore, missing, mismatched, unexpected, saved = _compare(
      model, path, pattern)
  missing_backbone = [n for n in missing if n.startswith(BACKBONE_PREFIX)]
  extra_backbone = [n for n in unexpected if n.startswith(BACKBONE_PREFIX)]
  if mismatched or missing_backbone or extra_backbone:
    raise CheckpointMismatchError(
        f'--checkpoint={path} does not fit the model built from these flags '
        '(different resnet_depth, width_multiplier, sk_ratio, se_ratio or '
        'heads?).'
        + (f'\nShape mismatches:{_listing(mismatched)}' if mismatched else '')
        + (f'\nBackbone variables not in the checkpoint:'
           f'{_listing(missing_backbone)}' if missing_backbone else '')
        + (f'\nBackbone variables of the checkpoint not in the model:'
           f'{_listing(extra_backbone)}' if extra_backbone else '')
        + '\nTo skip a head, exclude it with --variable_schema, e.g. '
        "'(?!global_step|(?:.*/|^)Momentum|head_supervised)'.")
  if not to_restore:
    raise CheckpointMismatchError(
        f'--variable_schema={variable_schema!r} selects none of the model '
        f'variables of --checkpoint={path} (it holds {len(saved)}, e.g. '
        f'{", ".join(saved[:3])}): the warm start would restore '
        'nothing. Pass a schema that matches them, e.g. '
        "'(?!global_step|(?:.*/|^)Momentum|head_supervised)' (all but the "
        "linear head), or leave --checkpoint unset to start from random "
        'weights.')
  if require_backbone and not any(name.startswith(BACKBONE_PREFIX)
                                  for _, name, _ in to_restore):
    raise CheckpointMismatchError(
        f'--variable_schema={variable_schema!r} restores no backbone '
        f'variable ({BACKBONE_PREFIX}...) of --checkpoint={path}, only '
        f'{sorted(name for _, name, _ in to_restore)[:5]}: the encoder would '
        'stay random. Pass a schema that keeps the backbone, '
        "e.g. '(?!global_step|(?:.*/|^)Momentum|head)'.")
  if missing:
    logging.warning('Not in %s, left at initial values: %s', path, missing)
  return reader, to_restore


def check_warm_start_fits(model, path, variable_schema,
                          require_backbone=False):
  """Raises CheckpointMismatchError if `warm_start` would fail (run it at
  start-up, before anything is written); reads no values."""
  _plan_warm_start(model, path, variable_schema, require_backbone)


def warm_start(model, path, variable_schema, require_backbone=False):
  """Restores the model variables matched by the schema from `path`.

  `path` is a checkpoint of this code or of the original SimCLR TF2 code
  (whose variables are renamed first, so the schema matches the same names).
  No step, optimizer slots or objective state are read. A matched variable
  with a different shape, or a backbone variable absent from the checkpoint
  or from the model, is an error naming them; matched head variables absent
  from the checkpoint keep their initial values (logged). A schema that
  restores nothing is an error, and so is, with `require_backbone` (for
  fine-tuning), one that restores no `base_model/` variable.

  Returns:
    The names of the restored variables.
  """
  reader, to_restore = _plan_warm_start(model, path, variable_schema,
                                        require_backbone)
  for key, _, var in to_restore:
    var.assign(reader.get_tensor(key))
  restored = [name for _, name, _ in to_restore]
  logging.info('Warm-started %d variables from %s (schema %r).',
               len(restored), path, variable_schema)
  return restored


# --- Resuming after a crash: the newest readable checkpoint. ---

_DATA_SHARD = re.compile(r'\.data-(\d{5})-of-(\d{5})$')


def _first_line(error):
  text = str(getattr(error, 'message', None) or error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


def _checkpoint_prefixes(directory):
  """(checkpoint prefixes of `directory`, newest first; problems): those
  the `checkpoint` state file lists or, when that file is unreadable, every
  `<prefix>.index` there, by step number."""
  problems = []
  try:
    state = tf.train.get_checkpoint_state(directory)
  except (tf.errors.OpError, ValueError) as e:
    state = None
    problems.append(f'{os.path.join(directory, "checkpoint")} is unreadable '
                    f'({_first_line(e)}).')
  if state is not None:
    paths = list(state.all_model_checkpoint_paths)
    if state.model_checkpoint_path not in paths:
      paths.append(state.model_checkpoint_path)
    return paths[::-1], problems
  prefixes = [i[:-len('.index')] for i in
              tf.io.gfile.glob(os.path.join(directory, '*.index'))]
  if prefixes and not problems:
    problems.append(f'{os.path.join(directory, "checkpoint")} is missing or '
                    'unreadable; looking at the .index files instead.')
  return sorted(prefixes, key=_step_number, reverse=True), problems


def _step_number(prefix):
  """The N of `.../ckpt-N` (-1 without one)."""
  match = re.search(r'-(\d+)$', prefix)
  return int(match.group(1)) if match else -1


def checkpoint_problem(prefix):
  """None if the checkpoint `prefix` is complete and every tensor in it
  reads back (the bundle reader checks each tensor's CRC32C), else a
  sentence naming the broken file. Reads the whole checkpoint once."""
  index = prefix + '.index'
  if not tf.io.gfile.exists(index):
    return f'{index} is missing.'
  if tf.io.gfile.stat(index).length == 0:
    return f'{index} is empty (0 bytes).'
  shards = [p for p in tf.io.gfile.glob(prefix + '.data-*')
            if _DATA_SHARD.search(p)]
  if not shards:
    return f'{prefix}.data-* is missing (no data file for {index}).'
  count = int(_DATA_SHARD.search(shards[0]).group(2))
  expected = [f'{prefix}.data-{i:05d}-of-{count:05d}' for i in range(count)]
  for shard in expected:
    if not tf.io.gfile.exists(shard):
      return f'{shard} is missing.'
    if tf.io.gfile.stat(shard).length == 0:
      return f'{shard} is empty (0 bytes).'
  # The reader reports damage as OpErrors, but also as IndexError ("Read
  # less bytes than requested") and others: any failure means unreadable.
  try:
    reader = tf.train.load_checkpoint(prefix)
  except Exception as e:  # pylint: disable=broad-except
    return f'{index} is unreadable (truncated or corrupt?): {_first_line(e)}'
  try:
    for key in sorted(reader.get_variable_to_shape_map()):
      reader.get_tensor(key)
  except Exception as e:  # pylint: disable=broad-except
    files = ', '.join(expected)
    return (f'{files} is unreadable (truncated or corrupt?) at '
            f'{readable_name(key)}: {_first_line(e)}')
  return None


def find_intact_checkpoint(directory):
  """(newest intact checkpoint prefix of `directory` or None, [problems]).

  Walks the checkpoints of the `checkpoint` state file from the newest and
  stops at the first that `checkpoint_problem` finds complete; `problems`
  describes each newer one that is not (a kill or a full disk mid-write, a
  truncated copy), naming its file. Older checkpoints are not read. Nothing
  is modified or deleted. (None, []) when there is no checkpoint at all;
  (None, problems) when every one is broken.
  """
  prefixes, problems = _checkpoint_prefixes(directory)
  for prefix in prefixes:
    problem = checkpoint_problem(prefix)
    if problem is None:
      return prefix, problems
    problems.append(problem)
  return None, problems


class FallbackCheckpointManager(tf.train.CheckpointManager):
  """A tf.train.CheckpointManager whose `restore_or_initialize` (what
  orbit.Controller calls) restores `restore_path` rather than the latest
  checkpoint of the directory, e.g. `find_intact_checkpoint`'s answer when
  the latest is corrupt. The corrupt files are left alone (the next save
  at their step number overwrites them; max_to_keep deletes them in turn).
  With restore_path None it is a plain CheckpointManager.
  """

  def __init__(self, checkpoint, directory, max_to_keep, *args,
               restore_path=None, **kwargs):
    super().__init__(checkpoint, directory, max_to_keep, *args, **kwargs)
    self.restore_path = restore_path
    self._restored = None

  def restore_or_initialize(self):
    """Restores (or initialises) once; later calls return the same path
    (the experiment restores before building its input, orbit again)."""
    if self._restored is None:
      self._restored = (self._restore_or_initialize(),)
    return self._restored[0]

  def _restore_or_initialize(self):
    path, latest = self.restore_path, self._latest_checkpoint
    if path is None or path == latest:
      return super().restore_or_initialize()
    if latest is None:
      logging.warning('Restoring %s (the checkpoint state file of %s lists '
                      'none).', path, self.directory)
    else:
      logging.warning('Restoring %s: the newer %s is unreadable (left as it '
                      'is; the next save at its step overwrites it).', path,
                      latest)
    self._checkpoint.restore(path)
    if self._checkpoint_interval is not None:
      self._last_checkpoint_step = int(self._step_counter.numpy())
    return path


def _export_module(model, export_format='both'):
  """The tf.Module that `export_saved_model` writes, and its signatures.

  'serving' and 'both': signature `serving_default(images)` with images in
  [0, 1] → {'features', 'projection'[, 'logits']}. 'hub' and 'both': the
  original SimCLR TF2 interface, `module(images, trainable)` (trainable a
  Python bool: False = inference, True = batch statistics, updating the BN
  moving averages) → the `Model.simclr_outputs` dict, traced for both values
  of trainable, plus `trainable_variables_list` for fine-tuning through it.

  It tracks the model's variables, not the Keras model itself: saving a
  Keras model traces every layer's call functions, which is several times
  slower and adds nothing a consumer of the encoder needs.
  """
  if export_format not in EXPORT_FORMATS:
    raise ValueError(f'Unknown export_format {export_format!r}; use one of '
                     f'{", ".join(EXPORT_FORMATS)}.')
  image_spec = tf.TensorSpec([None, None, None, 3], tf.float32, name='images')
  module = tf.Module()
  module.model_variables = list(model.variables)

  @tf.function
  def simclr_outputs(images, trainable):
    return model.simclr_outputs(images, training=trainable)

  signatures = {}
  if export_format in ('both', 'serving'):
    # One traced inference graph serves both interfaces.
    @tf.function(input_signature=[image_spec])
    def serve(images):
      outputs = simclr_outputs(images, False)
      return {ours: outputs[original]
              for ours, original in model_lib.SERVING_OUTPUTS.items()
              if original in outputs}
    module.serve = serve
    signatures['serving_default'] = serve
  if export_format in ('both', 'hub'):
    for trainable in (False, True):
      simclr_outputs.get_concrete_function(image_spec, trainable)
    module.__call__ = simclr_outputs
    module.trainable_variables_list = list(model.trainable_variables)
  return module, signatures


def export_saved_model(model, model_dir, step, keep_max, export_format='both'):
  """Writes model_dir/saved_model/<step>, keeping the newest `keep_max`.

  `export_format` chooses the interfaces (`_export_module`): 'both'
  (default), 'serving' or 'hub'. Written to a temporary directory first and
  renamed, so an interrupted export never leaves a half-written model under
  a step number.
  """
  module, signatures = _export_module(model, export_format)
  export_root = os.path.join(model_dir, 'saved_model')
  final_dir = os.path.join(export_root, str(int(step)))
  tmp_dir = final_dir + '.tmp'
  for stale in (tmp_dir, final_dir):
    if tf.io.gfile.exists(stale):
      tf.io.gfile.rmtree(stale)
  tf.saved_model.save(module, tmp_dir, signatures=signatures or None)
  tf.io.gfile.rename(tmp_dir, final_dir)
  logging.info('Exported SavedModel (%s) to %s', export_format, final_dir)
  if keep_max and keep_max > 0:
    steps = sorted(int(d.rstrip('/')) for d in tf.io.gfile.listdir(export_root)
                   if d.rstrip('/').isdigit())
    for old in steps[:-keep_max]:
      tf.io.gfile.rmtree(os.path.join(export_root, str(old)))
  return final_dir


# --- Leftovers of interrupted writes. ---

def _stale_patterns(checkpoint_name):
  """Regexes of the names that our writers leave only when killed
  mid-write, in model_dir itself (see `remove_stale_temporaries`)."""
  name = re.escape(checkpoint_name)
  return [
      # Checkpoint.write's sharded save: <prefix>_temp/part-* then merged
      # into <prefix>.index/.data-* and deleted (functional_saver).
      re.compile(rf'^{name}-\d+_temp$'),
      # The tensor bundle writer's own temporary files of a shard.
      re.compile(rf'^{name}-\d+\.(?:index|data-\d{{5}}-of-\d{{5}})'
                 r'\.tempstate\d+$'),
      # update_checkpoint_state's atomic write of the `checkpoint` file
      # (file_io.atomic_write_string_to_file: '.tmp' + uuid4().hex).
      re.compile(r'^checkpoint\.tmp[0-9a-f]{32}$'),
      # write_json.
      re.compile(r'^.+\.json\.tmp$'),
  ]


def remove_stale_temporaries(model_dir, checkpoint_name='ckpt'):
  """Deletes the leftovers of writes interrupted by a kill, and returns
  their paths: in model_dir, `<checkpoint_name>-<N>_temp/` (a checkpoint
  being written), `<checkpoint_name>-<N>.{index,data-*}.tempstate<n>`,
  `checkpoint.tmp<32 hex>` (the state file being replaced) and
  `*.json.tmp` (write_json); in model_dir/saved_model, `<step>.tmp/` (an
  export, see export_saved_model). Nothing else is touched, and nothing
  below other directories. Call it before this run writes anything.
  """
  if not tf.io.gfile.isdir(model_dir):
    return []
  candidates = [(model_dir, _stale_patterns(checkpoint_name))]
  export_root = os.path.join(model_dir, 'saved_model')
  if tf.io.gfile.isdir(export_root):
    candidates.append((export_root, [re.compile(r'^\d+\.tmp$')]))
  removed = []
  for directory, patterns in candidates:
    for entry in sorted(tf.io.gfile.listdir(directory)):
      entry = entry.rstrip('/')
      if not any(p.match(entry) for p in patterns):
        continue
      path = os.path.join(directory, entry)
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)
      removed.append(path)
  return removed


def _finite_json(value, where, nonfinite):
  """`value` with every NaN/±Infinity float replaced by None (their key
  paths appended to `nonfinite`) and NumPy scalars and arrays made plain."""
  if isinstance(value, dict):
    return {k: _finite_json(v, f'{where}.{k}' if where else str(k), nonfinite)
            for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_finite_json(v, f'{where}[{i}]', nonfinite)
            for i, v in enumerate(list(value))]
  if isinstance(value, (np.bool_, np.integer, np.floating)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    nonfinite.append(where or '<value>')
    return None
  return value


def write_json(path, payload):
  """Writes JSON atomically: to `<path>.tmp` in the same directory, then a
  rename over `path`, so a reader or a crash never sees half a file (a kill
  leaves at most the .tmp, which `remove_stale_temporaries` deletes).

  NaN and ±Infinity, which are not JSON, are written as null: the key paths
  of those values (e.g. 'top1', 'history[3].loss') are logged and returned,
  so result.json never holds NaN.
  """
  nonfinite = []
  clean = _finite_json(payload, '', nonfinite)
  if nonfinite:
    logging.warning('%s: non-finite values written as null: %s', path,
                    ', '.join(nonfinite))
  text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False)
  tmp = path + '.tmp'
  try:
    with tf.io.gfile.GFile(tmp, 'w') as f:
      f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.remove(tmp)
    raise
  return nonfinite


def read_json(path, default=None):
  """The JSON value in `path`, or `default` when there is no such file."""
  if not path or not tf.io.gfile.exists(path):
    return default
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


# --- The flags of the run that wrote a model_dir. ---

# Flags that never change what a checkpoint means: where and how this
# process runs and logs (absl's logging and app flags, TF's internal ones).
IGNORED_FLAGS = frozenset({
    'model_dir', 'mode', 'flagfile', 'undefok', 'allow_flag_changes',
    'help', 'helpfull', 'helpshort', 'helpxml', '?',
    'logtostderr', 'alsologtostderr', 'log_dir', 'verbosity', 'v',
    'logger_levels', 'stderrthreshold', 'showprefixforinfo',
    'run_with_pdb', 'pdb_post_mortem', 'pdb', 'run_with_profiling',
    'profile_file', 'use_cprofile_for_profiling', 'only_check_args',
    'op_conversion_fallback_to_while_loop', 'delta_threshold',
    'tt_check_filter', 'tt_single_core_summaries', 'runtime_oom_exit',
    'hbm_oom_exit', 'test_srcdir', 'test_tmpdir', 'test_random_seed',
    'test_randomize_ordering_seed', 'xml_output_file'})


def _as_json(value):
  """`value` as flags.json holds it (tuples become lists, ...)."""
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def _shown(value):
  if isinstance(value, str):
    return value if value else "''"
  return json.dumps(value)


def compare_run_flags(saved, current, identity_flags, ignore=IGNORED_FLAGS):
  """(errors, warnings) between `saved` (the flags.json of the run that
  wrote model_dir) and `current` (this run's flags), both {name: value}.

  One error line per differing flag of `identity_flags` (their change
  alters the meaning of the checkpoint), one warning line per other
  differing flag; flags in `ignore` are skipped. Values are compared as
  JSON holds them, so (1, 2) equals [1, 2]. A flag on one side only (a
  flags.json of another version of this code) counts as None there: equal
  if the other side is None too, otherwise a warning, never an error, as
  the missing side's value is unknown.
  """
  errors, warnings = [], []
  for name in sorted(set(saved) | set(current)):
    if name in ignore:
      continue
    old = _as_json(saved.get(name))
    new = _as_json(current.get(name))
    if old == new:
      continue
    if name not in saved:
      warnings.append(f'--{name}: not in flags.json of the run in model_dir, '
                      f'{_shown(new)} now')
    elif name not in current:
      warnings.append(f'--{name}: {_shown(old)} in flags.json of the run in '
                      'model_dir, not a flag now')
    elif name in identity_flags:
      errors.append(f'--{name}: {_shown(old)} in flags.json of the run in '
                    f'model_dir, {_shown(new)} now')
    else:
      warnings.append(f'--{name}: {_shown(old)} in flags.json of the run in '
                      f'model_dir, {_shown(new)} now')
  return errors, warnings
