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
"""

import json
import os
import re

from absl import logging
import tensorflow as tf

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
  variable)], missing, mismatched, unexpected); `unexpected` are the
  checkpoint's variables that the model does not have."""
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
  return reader, to_restore, missing, mismatched, unexpected


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
  _, _, missing, mismatched, unexpected = _compare(model, path, None)
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


def _plan_warm_start(model, path, variable_schema):
  """(reader, [(key, name, variable)] to restore); raises if the checkpoint
  misfits."""
  pattern = compile_schema(variable_schema)
  reader, to_restore, missing, mismatched, unexpected = _compare(
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
  if missing:
    logging.warning('Not in %s, left at initial values: %s', path, missing)
  return reader, to_restore


def check_warm_start_fits(model, path, variable_schema):
  """Raises CheckpointMismatchError if `warm_start` would fail; reads no values."""
  _plan_warm_start(model, path, variable_schema)


def warm_start(model, path, variable_schema):
  """Restores the model variables matched by the schema from `path`.

  `path` is a checkpoint of this code or of the original SimCLR TF2 code
  (whose variables are renamed first, so the schema matches the same names).
  No step, optimizer slots or objective state are read. A matched variable
  with a different shape, or a backbone variable absent from the checkpoint
  or from the model, is an error naming them; matched head variables absent
  from the checkpoint keep their initial values (logged).

  Returns:
    The names of the restored variables.
  """
  reader, to_restore = _plan_warm_start(model, path, variable_schema)
  for key, _, var in to_restore:
    var.assign(reader.get_tensor(key))
  restored = [name for _, name, _ in to_restore]
  logging.info('Warm-started %d variables from %s (schema %r).',
               len(restored), path, variable_schema)
  return restored


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


def write_json(path, payload):
  """Writes JSON atomically (temporary file, then rename), so a reader or a
  crash never sees half a results file."""
  tmp = path + '.tmp'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_json(path, default=None):
  """The JSON value in `path`, or `default` when there is no such file."""
  if not path or not tf.io.gfile.exists(path):
    return default
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)
