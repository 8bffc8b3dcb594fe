"""Checkpoint fit checks, warm start with `--variable_schema`, and export.

Model variables are named by their checkpoint path below the model, e.g.
`base_model/block_groups/0/...`, `head_contrastive/...`, `head_supervised/...`
(the `model/` prefix and the `/.ATTRIBUTES/VARIABLE_VALUE` suffix of the
checkpoint key dropped). These are the names `--variable_schema` matches
with `re.match`, so the FNC/TF1 README values keep their meaning:
`(?!global_step|(?:.*/|^)Momentum|head)` restores the backbone only and
`(?!global_step|(?:.*/|^)Momentum|head_supervised)` everything but the
linear head.
"""

import json
import os
import re

from absl import logging
import tensorflow as tf

import model as model_lib

MODEL_KEY = 'model'
VALUE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
BACKBONE_PREFIX = 'base_model/'


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


def _compare(model, path, pattern):
  """Splits the model's variables into (to_restore, missing, mismatched)."""
  reader = tf.train.load_checkpoint(path)
  shapes = reader.get_variable_to_shape_map()
  to_restore, missing, mismatched = [], [], []
  for name, var in sorted(model_lib.variable_paths(model).items()):
    if pattern is not None and not pattern.match(name):
      continue
    key = f'{MODEL_KEY}/{name}{VALUE_SUFFIX}'
    if key not in shapes:
      missing.append(name)
    elif list(shapes[key]) != var.shape.as_list():
      mismatched.append(
          f'{name}: model {var.shape.as_list()}, checkpoint {shapes[key]}')
    else:
      to_restore.append((key, var))
  return reader, to_restore, missing, mismatched


def _listing(items, limit=10):
  text = '\n  '.join(items[:limit])
  if len(items) > limit:
    text += f'\n  ... and {len(items) - limit} more'
  return '\n  ' + text


def check_resume_fits(model, path):
  """Raises CheckpointMismatchError unless `path` holds exactly this model."""
  _, _, missing, mismatched = _compare(model, path, None)
  if missing or mismatched:
    raise CheckpointMismatchError(
        f'The checkpoint {path} in --model_dir does not fit the model built '
        'from these flags (different resnet_depth, width_multiplier, heads or '
        'num_classes?). Use the flags it was trained with (see flags.json '
        'next to it) or a new --model_dir.'
        + (f'\nShape mismatches:{_listing(mismatched)}' if mismatched else '')
        + (f'\nNot in the checkpoint:{_listing(missing)}' if missing else ''))


def _plan_warm_start(model, path, variable_schema):
  """(reader, [(key, variable)] to restore); raises if the checkpoint misfits."""
  pattern = compile_schema(variable_schema)
  reader, to_restore, missing, mismatched = _compare(model, path, pattern)
  missing_backbone = [n for n in missing if n.startswith(BACKBONE_PREFIX)]
  if mismatched or missing_backbone:
    raise CheckpointMismatchError(
        f'--checkpoint={path} does not fit the model built from these flags '
        '(different resnet_depth, width_multiplier, sk_ratio or heads?).'
        + (f'\nShape mismatches:{_listing(mismatched)}' if mismatched else '')
        + (f'\nBackbone variables not in the checkpoint:'
           f'{_listing(missing_backbone)}' if missing_backbone else '')
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

  No step, optimizer slots or objective state are read. A matched variable
  with a different shape, or a backbone variable absent from the checkpoint,
  is an error naming them; matched head variables absent from the
  checkpoint keep their initial values (logged).

  Returns:
    The names of the restored variables.
  """
  reader, to_restore = _plan_warm_start(model, path, variable_schema)
  for key, var in to_restore:
    var.assign(reader.get_tensor(key))
  restored = [key[len(MODEL_KEY) + 1:-len(VALUE_SUFFIX)]
              for key, _ in to_restore]
  logging.info('Warm-started %d variables from %s (schema %r).',
               len(restored), path, variable_schema)
  return restored


def _export_module(model):
  """A tf.Module serving images in [0, 1] → {'features', 'projection', 'logits'}.

  It tracks the model's variables, not the Keras model itself: saving a Keras
  model traces every layer's call functions, which is several times slower
  and adds nothing a consumer of the encoder needs.
  """
  module = tf.Module()
  module.model_variables = list(model.variables)

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.float32, name='images')])
  def serve(images):
    return model.outputs_dict(images, training=False)

  module.serve = serve
  return module


def export_saved_model(model, model_dir, step, keep_max):
  """Writes model_dir/saved_model/<step>, keeping the newest `keep_max`.

  Written to a temporary directory first and renamed, so an interrupted
  export never leaves a half-written model under a step number.
  """
  export_root = os.path.join(model_dir, 'saved_model')
  final_dir = os.path.join(export_root, str(int(step)))
  tmp_dir = final_dir + '.tmp'
  for stale in (tmp_dir, final_dir):
    if tf.io.gfile.exists(stale):
      tf.io.gfile.rmtree(stale)
  module = _export_module(model)
  tf.saved_model.save(module, tmp_dir,
                      signatures={'serving_default': module.serve})
  tf.io.gfile.rename(tmp_dir, final_dir)
  logging.info('Exported SavedModel to %s', final_dir)
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
