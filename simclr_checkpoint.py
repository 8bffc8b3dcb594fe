"""Checkpoints of the original SimCLR TF2 code (google-research/simclr, tf2/):
recognising them and naming their model variables as this model does.

The original saves `tf.train.Checkpoint(model=, global_step=, optimizer=)`
with keys that are object paths of its own layer lists, e.g.

  model/resnet_model/block_groups/0/layers/0/conv_relu_dropblock_layers/3/
      conv2d_fixed_padding/conv2d/kernel/.ATTRIBUTES/VARIABLE_VALUE

Its lists also count layers without variables (DropBlock, identity, padding,
pooling), so the same layer sits at another index than in this model.
`variable_names(keys)` maps every model variable of such a checkpoint onto
this model's variable path (`model.variable_paths`), e.g.
`base_model/block_groups/0/blocks/0/residual_layers/2/conv/conv2d/kernel`,
by explicit per-list index tables (`STEM_LAYERS`, `BOTTLENECK_LAYERS`, ...)
chosen from the checkpoint's own layout (ResNet-D stem, SK blocks, ResNet-D
shortcuts), and explicit leaf renames per layer kind. A model variable the
tables do not cover is an `UnmappedKeyError` naming it; nothing is skipped.
Optimizer slots, `global_step`, `save_counter` and the object graph are not
model variables: a warm start never reads them.
"""

import re
from typing import NamedTuple

MODEL_PREFIX = 'model/'
VALUE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
SLOT_MARKER = '/.OPTIMIZER_SLOT/'
# The attribute names of the original `Model`'s three parts.
ORIGINAL_PARTS = ('resnet_model/', '_projection_head/', 'supervised_head/')

_BN = r'bn/(?:gamma|beta|moving_mean|moving_variance)'

# Leaf renames per layer kind: (regex of the original's path below the
# layer, replacement giving ours). Only these leaves exist in the original.
LEAVES = {
    'conv': [(r'conv2d/kernel', r'conv2d/kernel')],
    'bn': [(f'({_BN})', r'\1')],
    'se': [(r'(se_(?:reduce|expand)/(?:kernel|bias))', r'\1')],
    # SK_Conv2D: its two-branch conv + BN, then the attention conv-BN-conv.
    'sk': [(r'conv2d_fixed_padding/conv2d/kernel', r'conv/conv2d/kernel'),
           (f'batch_norm_relu/({_BN})', r'bn/\1'),
           (r'conv2d_0/kernel', r'attention_conv0/kernel'),
           (f'batch_norm_relu_1/({_BN})', r'attention_bn/\1'),
           (r'conv2d_1/kernel', r'attention_conv1/kernel')],
    'projection_layer': [(r'dense/kernel', r'dense/kernel'),
                         (f'bn_relu/({_BN})', r'bn_relu/\1')],
    'linear_head': [(r'dense/(kernel|bias)', r'dense/\1')],
}

# Original list index -> (our list index, layer kind), per layer list.
# Indices missing from a table hold no variables in the original.
STEM_LAYERS = {
    # [conv, Identity, BN-ReLU, MaxPool, Identity]; the CIFAR stem
    # [conv 3x3/1, Identity, BN-ReLU, Identity] has the same indices.
    'plain': {0: (0, 'conv'), 2: (1, 'bn')},
    # ResNet-D: [conv, BN, conv, BN, conv, Identity, BN, MaxPool, Identity].
    'resnet_d': {0: (0, 'conv'), 1: (1, 'bn'), 2: (2, 'conv'), 3: (3, 'bn'),
                 4: (4, 'conv'), 6: (5, 'bn')},
}
# Basic block (depths 18/34): conv2d_bn_layers = [conv, BN, conv, BN]; its
# SE layer is the attribute `se_layer`, ours the list's fifth entry.
BASIC_LAYERS = {0: (0, 'conv'), 1: (1, 'bn'), 2: (2, 'conv'), 3: (3, 'bn')}
BASIC_SE_INDEX = 4
BOTTLENECK_LAYERS = {
    # [conv, BN, DropBlock, conv, BN, DropBlock, conv, BN, DropBlock, SE]
    'plain': {0: (0, 'conv'), 1: (1, 'bn'), 3: (2, 'conv'), 4: (3, 'bn'),
              6: (4, 'conv'), 7: (5, 'bn'), 9: (6, 'se')},
    # [conv, BN, DropBlock, SK_Conv2D, DropBlock, conv, BN, DropBlock, SE]
    'sk': {0: (0, 'conv'), 1: (1, 'bn'), 3: (2, 'sk'), 5: (3, 'conv'),
           6: (4, 'bn'), 8: (5, 'se')},
}
# Projection shortcut of a group's first block (`shortcut_layers` in basic,
# `projection_layers` in bottleneck blocks); both codebases list the same
# layers in the same order.
SHORTCUT_LAYERS = {
    'plain': {0: (0, 'conv'), 1: (1, 'bn')},  # [conv 1x1/s, BN]
    'resnet_d_stride1': {1: (1, 'conv'), 2: (2, 'bn')},  # [AvgPool, conv, BN]
    # [FixedPadding, AvgPool, conv, BN]
    'resnet_d_strided': {2: (2, 'conv'), 3: (3, 'bn')},
}


class UnmappedKeyError(ValueError):
  """A model variable of an original checkpoint that the name map lacks."""


class Layout(NamedTuple):
  """Which variant of each layer list an original checkpoint holds."""
  stem: str  # a key of STEM_LAYERS
  bottleneck: str  # a key of BOTTLENECK_LAYERS
  resnet_d_shortcut: bool


def model_variable_keys(keys):
  """The keys of `keys` that hold model variables (no slots, no step)."""
  return [k for k in keys if k.startswith(MODEL_PREFIX) and
          k.endswith(VALUE_SUFFIX) and SLOT_MARKER not in k]


def is_original_checkpoint(keys):
  """True when `keys` (of a checkpoint) are the original SimCLR TF2 layout."""
  originals = tuple(MODEL_PREFIX + part for part in ORIGINAL_PARTS)
  return any(k.startswith(originals) for k in model_variable_keys(keys))


def detect_layout(keys):
  """The `Layout` of an original checkpoint, from its own keys."""
  joined = '\n'.join(model_variable_keys(keys))
  resnet_d_stem = re.search(r'/initial_conv_relu_max_pool/6/', joined)
  sk_blocks = re.search(
      r'/conv_relu_dropblock_layers/\d+/conv2d_fixed_padding/', joined)
  resnet_d_shortcut = re.search(r'/(?:shortcut|projection)_layers/2/', joined)
  return Layout(stem='resnet_d' if resnet_d_stem else 'plain',
                bottleneck='sk' if sk_blocks else 'plain',
                resnet_d_shortcut=bool(resnet_d_shortcut))


def _shortcut_table(layout, group):
  """The SHORTCUT_LAYERS table of block group `group` (0-based)."""
  if not layout.resnet_d_shortcut:
    return SHORTCUT_LAYERS['plain']
  # Block group 1 (index 0) has stride 1, the others stride 2.
  return SHORTCUT_LAYERS['resnet_d_stride1' if group == 0
                         else 'resnet_d_strided']


def _place(table, index):
  """(our index, kind) of layer `index` of an original list; (None, None)
  for an index the table does not hold."""
  return table.get(int(index), (None, None))


_BLOCK = r'resnet_model/block_groups/(\d+)/layers/(\d+)/'
_OUR_BLOCK = 'base_model/block_groups/{}/blocks/{}/'


def _locate(path, layout):
  """(our path of the layer, its kind, the original's leaf below it) for the
  original's variable path below `model/`; (None, None, None) if unknown."""
  match = re.fullmatch(r'resnet_model/initial_conv_relu_max_pool/(\d+)/(.+)',
                       path)
  if match:
    index, leaf = match.groups()
    our_index, kind = _place(STEM_LAYERS[layout.stem], index)
    return f'base_model/stem/stem_layers/{our_index}', kind, leaf
  match = re.fullmatch(
      _BLOCK + r'(conv2d_bn_layers|conv_relu_dropblock_layers|'
      r'shortcut_layers|projection_layers)/(\d+)/(.+)', path)
  if match:
    group, block, layers, index, leaf = match.groups()
    if layers == 'conv2d_bn_layers':
      table, our_list = BASIC_LAYERS, 'residual_layers'
    elif layers == 'conv_relu_dropblock_layers':
      table, our_list = BOTTLENECK_LAYERS[layout.bottleneck], 'residual_layers'
    else:
      table, our_list = _shortcut_table(layout, int(group)), 'shortcut_layers'
    our_index, kind = _place(table, index)
    return (_OUR_BLOCK.format(group, block) + f'{our_list}/{our_index}',
            kind, leaf)
  match = re.fullmatch(_BLOCK + r'se_layer/(.+)', path)
  if match:
    group, block, leaf = match.groups()
    return (_OUR_BLOCK.format(group, block) +
            f'residual_layers/{BASIC_SE_INDEX}', 'se', leaf)
  match = re.fullmatch(r'_projection_head/linear_layers/(\d+)/(.+)', path)
  if match:
    index, leaf = match.groups()
    return f'head_contrastive/linear_layers/{index}', 'projection_layer', leaf
  match = re.fullmatch(r'supervised_head/linear_layer/(.+)', path)
  if match:
    return 'head_supervised/linear_layer', 'linear_head', match.group(1)
  return None, None, None


def original_to_ours(key, layout):
  """Our variable path for the original checkpoint key `key`, or None."""
  path = key[len(MODEL_PREFIX):-len(VALUE_SUFFIX)]
  layer, kind, leaf = _locate(path, layout)
  if kind is None:
    return None
  for pattern, replacement in LEAVES[kind]:
    if re.fullmatch(pattern, leaf):
      return f'{layer}/{re.sub(pattern, replacement, leaf)}'
  return None


def variable_names(keys):
  """{our variable path: original key} for every model variable in `keys`.

  `keys`: the keys of an original SimCLR TF2 checkpoint (any iterable, e.g.
  `reader.get_variable_to_shape_map()`). Raises UnmappedKeyError naming
  every model variable that the tables above do not place.
  """
  layout = detect_layout(keys)
  names, unmapped = {}, []
  for key in sorted(model_variable_keys(keys)):
    name = original_to_ours(key, layout)
    if name is None or name in names:
      unmapped.append(key)
    else:
      names[name] = key
  if unmapped:
    listing = '\n  '.join(unmapped[:10])
    more = f'\n  ... and {len(unmapped) - 10} more' if len(unmapped) > 10 else ''
    raise UnmappedKeyError(
        f'{len(unmapped)} model variable(s) of this original SimCLR TF2 '
        f'checkpoint ({layout}) have no place in this model:\n  {listing}'
        f'{more}\nThe name map (simclr_checkpoint.py) knows the layers of '
        'google-research/simclr tf2 (ResNet 18-200, SK, SE, CIFAR stem, '
        'projection and supervised heads); a checkpoint of modified code '
        'needs its layers added there.')
  return names
