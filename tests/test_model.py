"""Model: projection-head modes, ft_proj_selector, linear eval while
pretraining, checkpoint variable paths, head init, outputs_dict, freezing."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import checkpoints
import model as model_lib
import resnet

DEPTH, WIDTH = 18, 0.25
FEATURES = resnet.num_features(DEPTH, WIDTH)  # 128
PROJ_OUT = 16
NUM_CLASSES = 10
SIZE = 16


def _model(**kwargs):
  args = dict(num_classes=NUM_CLASSES, resnet_depth=DEPTH,
              width_multiplier=WIDTH, cifar_stem=True, proj_out_dim=PROJ_OUT,
              global_bn=False)
  args.update(kwargs)
  return model_lib.Model(**args)


def _images(b=4, views=1, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(size=(b, SIZE, SIZE, 3 * views)), tf.float32)


def _head_vars(model, prefix):
  """{path below the head: variable} from the checkpoint paths."""
  return {k[len(prefix) + 1:]: v
          for k, v in model_lib.variable_paths(model).items()
          if k.startswith(prefix + '/')}


def _is_bn(var):
  return 'batch_normalization' in var.name


def _non_bn_layers(head):
  """The head's LinearLayers with their Dense and BatchNormalization layers."""
  out = []
  for layer in head.linear_layers:
    bn = layer.bn_relu.bn if layer.use_bn else None
    out.append((layer.dense, bn))
  return out


@pytest.mark.parametrize('mode,expected_dim', [
    ('nonlinear', PROJ_OUT), ('linear', PROJ_OUT), ('none', FEATURES)])
def test_proj_head_modes_build_run_and_dims(mode, expected_dim):
  model = _model(proj_head_mode=mode)
  projections, logits = model(_images(b=3, views=2), training=True)
  assert projections.shape == (6, expected_dim)
  assert logits.shape == (6, NUM_CLASSES)
  assert np.all(np.isfinite(projections.numpy()))
  num_layers = {'nonlinear': 3, 'linear': 1, 'none': 0}[mode]
  assert len(model.head_contrastive.linear_layers) == num_layers
  if mode == 'none':
    assert not model.head_contrastive.trainable_variables
    # Identity head: projections are the ResNet features.
    feats = model.base_model(
        tf.concat(tf.split(_images(b=3, views=2), 2, -1), 0), training=False)
    proj, _ = model(_images(b=3, views=2), training=False)
    np.testing.assert_allclose(proj.numpy(), feats.numpy(), rtol=1e-6)
  if mode == 'linear':
    dense, bn = _non_bn_layers(model.head_contrastive)[0]
    assert dense.kernel.shape == (FEATURES, PROJ_OUT)
    assert dense.bias is None
    assert bn.gamma is not None and bn.beta is None


def test_nonlinear_head_structure_three_layers():
  model = _model(proj_head_mode='nonlinear', num_proj_layers=3)
  model(_images(views=2), training=True)
  layers = _non_bn_layers(model.head_contrastive)
  assert len(layers) == 3
  for dense, bn in layers[:2]:
    assert dense.kernel.shape == (FEATURES, FEATURES)
    assert dense.bias is None
    assert bn.gamma is not None and bn.beta is not None
  dense, bn = layers[2]
  assert dense.kernel.shape == (FEATURES, PROJ_OUT)
  assert dense.bias is None
  assert bn.gamma is not None and bn.beta is None

  # The same from the variables: no dense bias anywhere in the head, two
  # betas (middle layers) and three gammas.
  names = sorted(_head_vars(model, 'head_contrastive'))
  non_bn = [v for v in model.head_contrastive.trainable_variables
            if not _is_bn(v)]
  assert len(non_bn) == 3
  assert all(v.name.endswith('kernel:0') for v in non_bn)
  assert not any('bias' in n for n in names)
  assert sum(n.endswith('beta') for n in names) == 2
  assert sum(n.endswith('gamma') for n in names) == 3

  # ReLU after the middle layers, not after the last: compute by hand.
  x = model.base_model(_images(), training=False)
  for j, (dense, bn) in enumerate(layers):
    x = bn(dense(x), training=False)
    if j < 2:
      x = tf.nn.relu(x)
  proj, _ = model(_images(), training=False)
  np.testing.assert_allclose(proj.numpy(), x.numpy(), rtol=1e-5, atol=1e-6)
  assert np.any(proj.numpy() < 0)  # the last layer has no ReLU


@pytest.mark.parametrize('selector,width,num_built', [
    (0, FEATURES, 0), (2, FEATURES, 2), (3, PROJ_OUT, 3), (-1, PROJ_OUT, 3)])
def test_ft_proj_selector(selector, width, num_built):
  model = _model(train_mode='finetune', ft_proj_selector=selector,
                 num_proj_layers=3)
  images = _images(b=3)
  projections, logits = model(images, training=False)
  assert projections is None
  assert logits.shape == (3, NUM_CLASSES)
  assert model.head_supervised.linear_layer.dense.kernel.shape == (
      width, NUM_CLASSES)
  assert len(model.head_contrastive.linear_layers) == num_built
  # Logits are the supervised head on layer `selector`'s output.
  x = model.base_model(images, training=False)
  for j, (dense, bn) in enumerate(_non_bn_layers(model.head_contrastive)):
    x = bn(dense(x), training=False)
    if j < 2:
      x = tf.nn.relu(x)
  expected = model.head_supervised(x, training=False)
  np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-5,
                             atol=1e-6)


def test_ft_proj_selector_one_uses_first_layer_output():
  # Width of layer 1 equals the ResNet width, so check the values instead.
  model = _model(train_mode='finetune', ft_proj_selector=1)
  images = _images(b=3)
  _, logits = model(images, training=False)
  (dense, bn), = _non_bn_layers(model.head_contrastive)
  hidden = tf.nn.relu(bn(dense(model.base_model(images, training=False)),
                         training=False))
  np.testing.assert_allclose(
      logits.numpy(), model.head_supervised(hidden).numpy(), rtol=1e-5,
      atol=1e-6)
  feats_logits = model.head_supervised(
      model.base_model(images, training=False))
  assert not np.allclose(logits.numpy(), feats_logits.numpy(), atol=1e-4)


@pytest.mark.parametrize('train_mode,selector', [
    ('pretrain', 0), ('finetune', -1), ('finetune', 0)])
def test_nonlinear_head_with_zero_layers_is_the_identity(train_mode,
                                                         selector):
  """--num_proj_layers=0 (SogCLR's linear-eval command): no layer, so the
  projections (pretraining) and the supervised head's input are the ResNet
  features, as in the original."""
  model = _model(proj_head_mode='nonlinear', num_proj_layers=0,
                 train_mode=train_mode, ft_proj_selector=selector)
  images = _images(b=3)
  projections, logits = model(images, training=False)
  assert not model.head_contrastive.linear_layers
  assert not _head_vars(model, model_lib.PROJECTION_HEAD_NAME)
  features = model.base_model(images, training=False)
  if train_mode == 'pretrain':
    np.testing.assert_allclose(projections.numpy(), features.numpy(),
                               rtol=1e-6)
  np.testing.assert_allclose(
      logits.numpy(), model.head_supervised(features).numpy(), rtol=1e-5,
      atol=1e-6)


def test_lineareval_while_pretraining_stops_gradient():
  model = _model()
  images = _images(b=4, views=2)
  labels = tf.constant([0, 1, 2, 3] * 2)
  with tf.GradientTape() as tape:
    projections, logits = model(images, training=True)
    sup_loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
  base_vars = model.base_model.trainable_variables
  head_vars = model.head_contrastive.trainable_variables
  sup_vars = model.head_supervised.trainable_variables
  grads = tape.gradient(sup_loss, base_vars + head_vars + sup_vars)
  n_base, n_head = len(base_vars), len(head_vars)
  assert n_base > 10 and n_head > 0 and len(sup_vars) == 2
  for g in grads[:n_base + n_head]:
    assert g is None or not np.any(g.numpy())
  for g in grads[n_base + n_head:]:
    assert g is not None and np.any(g.numpy())
  # The contrastive output does reach the backbone (the tape is not broken).
  with tf.GradientTape() as tape:
    projections, _ = model(images, training=True)
    # Not a plain sum: batch-normalised outputs sum to a constant.
    loss = tf.reduce_sum(projections * tf.random.stateless_normal(
        projections.shape, seed=[1, 2]))
  grads = tape.gradient(loss, base_vars)
  assert sum(g is not None and np.any(g.numpy()) for g in grads) > 5


def test_pretrain_logits_view_major():
  model = _model()
  b = 3
  views = [_images(b=b, seed=s) for s in (1, 2, 3)]
  stacked = tf.concat(views, axis=-1)  # [b, H, W, 9]
  projections, logits = model(stacked, training=False)
  assert logits.shape == (3 * b, NUM_CLASSES)
  assert projections.shape == (3 * b, PROJ_OUT)
  for v, view in enumerate(views):
    proj_v, logits_v = model(view, training=False)
    np.testing.assert_allclose(logits[v * b:(v + 1) * b].numpy(),
                               logits_v.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(projections[v * b:(v + 1) * b].numpy(),
                               proj_v.numpy(), rtol=1e-5, atol=1e-6)
  # The views really differ, so the comparison above means something.
  assert not np.allclose(logits[:b].numpy(), logits[b:2 * b].numpy(),
                         atol=1e-5)


def test_head_features_are_the_inference_features_of_clean_views():
  """--linear_head_input=clean: `head_features` are the ResNet features of
  single-view images in inference mode (after training-mode steps moved the
  BN statistics), with no gradient; `call(head_on_views=False)` skips the
  head on the views but leaves the projections as they are."""
  model = _model(batch_norm_decay=0.5)
  views = _images(b=4, views=2, seed=1)
  model(views, training=True)  # moves the BN moving statistics
  clean = _images(b=4, seed=2)
  expected = model.simclr_outputs(clean, training=False)['final_avg_pool']
  with tf.GradientTape() as tape:
    features = model.head_features(clean)
    loss = tf.reduce_sum(model.supervised_logits(features, training=True))
  np.testing.assert_allclose(features.numpy(), expected.numpy(), rtol=1e-6,
                             atol=1e-6)
  batch_features = model.simclr_outputs(clean, training=True)[
      'final_avg_pool']
  assert np.abs(features.numpy() - batch_features.numpy()).max() > 1e-3
  grads = tape.gradient(loss, model.base_model.trainable_variables +
                        model.head_supervised.trainable_variables)
  assert all(g is None for g in grads[:-2])
  assert all(g is not None and np.any(g.numpy()) for g in grads[-2:])
  projections, logits = model(views, training=False, head_on_views=False)
  assert logits is None
  np.testing.assert_allclose(projections.numpy(),
                             model(views, training=False)[0].numpy())


def test_no_lineareval_no_supervised_head():
  model = _model(lineareval_while_pretraining=False)
  projections, logits = model(_images(views=2), training=True)
  assert logits is None
  assert model.head_supervised is None
  assert projections.shape == (8, PROJ_OUT)
  assert not any(k.startswith('head_supervised')
                 for k in model_lib.variable_paths(model))


def test_variable_paths_match_checkpoint(tmp_path):
  model = _model()
  model(_images(views=2), training=True)
  paths = model_lib.variable_paths(model)
  prefixes = ('base_model/', 'head_contrastive/', 'head_supervised/')
  assert paths and all(k.startswith(prefixes) for k in paths)
  for prefix in prefixes:
    assert any(k.startswith(prefix) for k in paths)
  # Every variable exactly once (moving statistics included).
  assert len({id(v) for v in paths.values()}) == len(paths)
  assert len(paths) == len(model.variables)

  prefix = tf.train.Checkpoint(model=model).write(
      os.path.join(tmp_path, 'ckpt'))
  suffix = '/.ATTRIBUTES/VARIABLE_VALUE'
  keys = {name[len('model/'):-len(suffix)]
          for name, _ in tf.train.list_variables(prefix)
          if name.startswith('model/') and name.endswith(suffix)}
  assert keys == set(paths)
  reader = tf.train.load_checkpoint(prefix)
  for key, var in paths.items():
    np.testing.assert_array_equal(
        reader.get_tensor('model/' + key + suffix), var.numpy())


def test_supervised_head_init():
  model = _model(num_classes=1000, proj_head_mode='none')
  model(_images(b=2), training=False)
  dense = model.head_supervised.linear_layer.dense
  kernel = dense.kernel.numpy()
  assert kernel.shape == (FEATURES, 1000)
  assert abs(kernel.std() - 0.01) < 0.0003  # 128k samples: sd of std ~2e-5
  assert abs(kernel.mean()) < 0.0003
  np.testing.assert_array_equal(dense.bias.numpy(), np.zeros(1000))


@pytest.mark.parametrize('train_mode', ['pretrain', 'finetune'])
def test_outputs_dict_shapes(train_mode):
  model = _model(train_mode=train_mode, ft_proj_selector=-1)
  out = model.outputs_dict(_images(b=5), training=False)
  assert set(out) == {'features', 'projection', 'logits'}
  assert out['features'].shape == (5, FEATURES)
  assert out['projection'].shape == (5, PROJ_OUT)
  assert out['logits'].shape == (5, NUM_CLASSES)
  # Consistent with the call: same logits on a single-view batch.
  _, logits = model(_images(b=5), training=False)
  np.testing.assert_allclose(out['logits'].numpy(), logits.numpy(),
                             rtol=1e-5, atol=1e-6)


def test_fine_tune_after_block_4_trains_only_head():
  model = _model(train_mode='finetune', fine_tune_after_block=4)
  images = _images(b=4)
  model(images, training=False)
  trainable = model.trainable_variables
  assert len(trainable) == 2
  assert all('head_supervised' in v.name for v in trainable)
  paths = model_lib.variable_paths(model)
  trainable_ids = {id(v) for v in trainable}
  assert {k for k, v in paths.items() if id(v) in trainable_ids} == {
      k for k in paths if k.startswith('head_supervised/')}
  # Frozen backbone: BN stays in inference mode when training.
  moving = [v for v in model.base_model.variables if 'moving' in v.name]
  before = [v.numpy().copy() for v in moving]
  with tf.GradientTape() as tape:
    _, logits = model(images, training=True)
    loss = tf.reduce_sum(logits)
  grads = tape.gradient(loss, model.base_model.variables)
  assert all(g is None for g in grads)
  for v, old in zip(moving, before):
    np.testing.assert_array_equal(v.numpy(), old)


# --- MomentumEncoder (FNC / IFND key encoder). ---


def _encoder_pair(**kwargs):
  model = _model(**kwargs)
  model(_images(views=2), training=False)
  encoder = model.make_momentum_encoder()
  encoder(_images(views=2), training=False)
  return model, encoder


def _paired(encoder, model):
  """[(encoder var, model var, path)] for ResNet + projection head."""
  pairs = []
  for prefix in ('base_model', 'head_contrastive'):
    own = model_lib.variable_paths(getattr(encoder, prefix))
    online = model_lib.variable_paths(getattr(model, prefix))
    assert own.keys() == online.keys() and own
    pairs += [(own[k], online[k], f'{prefix}/{k}') for k in own]
  return pairs


def test_momentum_encoder_starts_equal_and_outputs_view_major():
  model, encoder = _encoder_pair(proj_head_mode='linear')
  pairs = _paired(encoder, model)
  assert any(not np.array_equal(e.numpy(), m.numpy()) for e, m, _ in pairs
             if m.trainable)  # independent random init before copy_from
  encoder.copy_from(model)
  for own, online, path in pairs:
    np.testing.assert_array_equal(own.numpy(), online.numpy(), err_msg=path)
  images = _images(b=3, views=3, seed=4)
  projections, _ = model(images, training=True)
  keys = encoder(images, training=True)
  assert keys.shape == (9, PROJ_OUT)
  np.testing.assert_allclose(keys.numpy(), projections.numpy(), rtol=1e-5,
                             atol=1e-6)
  # View-major: rows v·b + k are view v of image k, each view encoded alone
  # would differ only through the batch statistics, so compare in inference.
  single = encoder(images[..., 3:6], training=False)
  np.testing.assert_allclose(encoder(images, training=False)[3:6].numpy(),
                             single.numpy(), rtol=1e-5, atol=1e-6)
  # Separate object: the online model's trainable variables exclude it.
  encoder_ids = {id(v) for v in encoder.variables}
  assert not encoder_ids & {id(v) for v in model.trainable_variables}
  # No supervised head in the twin.
  assert not [v for v in encoder.variables if 'head_supervised' in v.name]


def test_momentum_encoder_follows_ema_rule_on_trainable_weights():
  model, encoder = _encoder_pair()
  encoder.copy_from(model)
  rng = np.random.default_rng(7)
  for step in range(2):
    before = {path: own.numpy().copy() for own, _, path in
              _paired(encoder, model)}
    for var in model.variables:  # a fake optimizer step (+ BN statistics)
      var.assign(var + rng.normal(0, 0.1, var.shape).astype(np.float32))
    encoder.update_from(model, 0.9)
    for own, online, path in _paired(encoder, model):
      if online.trainable:
        want = 0.9 * before[path] + 0.1 * online.numpy()
        np.testing.assert_allclose(own.numpy(), want, rtol=1e-5, atol=1e-6,
                                   err_msg=path)
      else:  # BN moving statistics: the twin's own, untouched by the EMA.
        np.testing.assert_array_equal(own.numpy(), before[path],
                                      err_msg=path)
  encoder.update_from(model, 0.0)
  for own, online, path in _paired(encoder, model):
    if online.trainable:
      np.testing.assert_array_equal(own.numpy(), online.numpy(), err_msg=path)


def test_momentum_encoder_uses_batch_statistics_and_own_moving_stats():
  _, encoder = _encoder_pair()
  images = _images(b=4, views=2, seed=9)
  moving = [v for v in encoder.variables if 'moving_mean' in v.name]
  before = [v.numpy().copy() for v in moving]
  train = encoder(images, training=True)
  infer = encoder(images, training=False)
  assert not np.allclose(train.numpy(), infer.numpy(), atol=1e-3)
  assert any(not np.array_equal(v.numpy(), b) for v, b in zip(moving, before))


def test_momentum_encoder_mismatch_is_a_clear_error():
  model, _ = _encoder_pair()
  other = _model(resnet_depth=34)
  other(_images(views=2), training=False)
  encoder = other.make_momentum_encoder()
  encoder(_images(views=2), training=False)
  with pytest.raises(ValueError, match='does not match the model'):
    encoder.copy_from(model)


@pytest.mark.parametrize('precision, compute, variables', [
    ('float32', 'float32', 'float32'), ('bfloat16', 'bfloat16', 'float32'),
    ('float16', 'float16', 'float32'), ('float64', 'float64', 'float64')])
def test_precision_sets_every_layer_and_casts_the_outputs(precision, compute,
                                                          variables):
  """Every layer (also those built lazily: the heads' Dense, SE) computes
  in `compute`; variables and the outputs (projections, logits, momentum
  encoder keys, named outputs) are in `variables`; the global policy is
  left as it was."""
  net = model_lib.Model(10, resnet_depth=18, width_multiplier=0.125,
                        cifar_stem=True, se_ratio=0.25, proj_out_dim=8,
                        precision=precision)
  images = tf.random.uniform([2, 16, 16, 6])
  outputs = list(net(images, training=True))
  keys = net.make_momentum_encoder()
  outputs.append(keys(images, training=True))
  outputs += list(net.outputs_dict(images[..., :3]).values())
  assert tf_keras.mixed_precision.global_policy().name == 'float32'
  layers = [layer for root in (net, keys) for layer in root._flatten_layers()]
  assert {layer.compute_dtype for layer in layers} == {compute}
  assert {v.dtype.name for v in net.variables + keys.variables} == {variables}
  assert {o.dtype.name for o in outputs} == {variables}


def test_unknown_precision_is_refused():
  with pytest.raises(ValueError, match="Unknown precision 'int8'"):
    model_lib.Model(10, resnet_depth=18, precision='int8')


def test_supervised_head_batch_norm_standardises_its_features():
  """linear_head_batch_norm: features with per-dimension means far above
  their spread reach the Dense standardised (batch statistics in training,
  then the moving ones), through a BN without γ or β."""
  head = model_lib.SupervisedHead(3, batch_norm=True, batch_norm_decay=0.0,
                                  global_bn=False)
  rng = np.random.default_rng(0)
  x = tf.constant(5.0 + 0.2 * rng.normal(size=(64, 8)), tf.float32)
  head(x, training=True)
  assert head.trainable_variables == head.linear_layer.trainable_variables
  seen = []
  dense = head.linear_layer.dense
  original_call = dense.call
  dense.call = lambda inputs: seen.append(inputs) or original_call(inputs)
  head(x, training=True)
  head(x, training=False)  # decay 0: the moving statistics are x's
  for standardised in seen:
    np.testing.assert_allclose(np.mean(standardised, 0), 0, atol=1e-4)
    np.testing.assert_allclose(np.std(standardised, 0), 1, atol=1e-2)
  plain = model_lib.SupervisedHead(3)
  plain(x, training=True)
  assert plain.batch_norm is None and not plain.non_trainable_variables


def test_linear_head_batch_norm_only_when_pretraining():
  with pytest.raises(ValueError, match='linear_head_batch_norm'):
    model_lib.Model(10, resnet_depth=18, width_multiplier=0.125,
                    cifar_stem=True, train_mode='finetune',
                    linear_head_batch_norm=True)
