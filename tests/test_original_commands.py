"""Every pretraining, linear-eval and fine-tuning command line of the
original READMEs runs here on the embedded digits data.

Sources (the commands are written out below as published):
  SimCLR  google-research/simclr, tf2/README.md (TF2 code): CIFAR-10 and
          ImageNet pretraining; README.md (repository root, written for the
          TF1 code with the same flags): CIFAR-10 and ImageNet linear eval,
          ImageNet 1 % fine-tuning. The root README's two pretraining
          commands are the same text as tf2/README.md's.
  FNC     google-research/fnc, README.md: ImageNet pretraining, linear eval,
          1 % fine-tuning.
  SogCLR  Optimization-AI/SogCLR, README.md of the Tensorflow branch:
          ImageNet pretraining and linear eval. (The PyTorch and cifar
          branches' commands run their own train.py / lincls.py, with other
          flag names; they are not commands of this run.py.)

Only paths and sizes change (`adapted`): the data set (digits: 10 classes,
1,437 train / 360 test; `validation` is an alias of `test`), steps
(--train_steps=2, which overrides the kept --train_epochs), the batch, depth
and width (ResNet-18 x0.125) and the image size (16 for CIFAR commands; 40
for ImageNet commands, which keeps the ImageNet stem and the eval centre
crop since it is > 32). Two further changes, for the machine rather than the
size: --use_tpu=True becomes --use_tpu=False (no TPU here; --tpu_name is
still passed and accepted), and FNC's pretraining, whose run.py trains only
FNC, selects it here with --objective=fnc. Every other flag, including the
TF1 / FNC ones this TF2 code defines for them (--train_summary_steps,
--variable_schema), is passed as published.
"""

import json
import os
import shlex

import numpy as np
import pytest
import tensorflow as tf

import config as config_lib
import run
from test_run import model_values, read_checkpoint, train_scalar_steps

# ------------------------------------------------------------ the commands

SIMCLR_CIFAR10_PRETRAIN = r"""
python run.py --train_mode=pretrain \
  --train_batch_size=512 --train_epochs=1000 \
  --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 \
  --dataset=cifar10 --image_size=32 --eval_split=test --resnet_depth=18 \
  --use_blur=False --color_jitter_strength=0.5 \
  --model_dir=/tmp/simclr_test --use_tpu=False
"""

SIMCLR_IMAGENET_PRETRAIN = r"""
python run.py --train_mode=pretrain \
  --train_batch_size=4096 --train_epochs=100 --temperature=0.1 \
  --learning_rate=0.075 --learning_rate_scaling=sqrt --weight_decay=1e-4 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0
"""

SIMCLR_CIFAR10_LINEAR_EVAL = r"""
python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=4 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head)' \
  --global_bn=False --optimizer=momentum --learning_rate=0.1 --weight_decay=0.0 \
  --train_epochs=100 --train_batch_size=512 --warmup_epochs=0 \
  --dataset=cifar10 --image_size=32 --eval_split=test --resnet_depth=18 \
  --checkpoint=/tmp/simclr_test --model_dir=/tmp/simclr_test_ft --use_tpu=False
"""

SIMCLR_IMAGENET_LINEAR_EVAL = r"""
python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=4 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head)' \
  --global_bn=False --optimizer=momentum --learning_rate=0.1 --weight_decay=1e-6 \
  --train_epochs=90 --train_batch_size=4096 --warmup_epochs=0 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR --checkpoint=$CHKPT_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0
"""

SIMCLR_IMAGENET_FINETUNE_1PCT = r"""
python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=-1 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head_supervised)' \
  --global_bn=True --optimizer=lars --learning_rate=0.005 \
  --learning_rate_scaling=sqrt --weight_decay=0 \
  --train_epochs=60 --train_batch_size=1024 --warmup_epochs=0 \
  --dataset=imagenet2012_subset/1pct --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR --checkpoint=$CHKPT_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0 \
  --num_proj_layers=3 --ft_proj_selector=1
"""

FNC_IMAGENET_PRETRAIN = r"""
python run.py --train_mode=pretrain \
  --train_batch_size=4096 --train_epochs=100 --temperature=0.1 \
  --learning_rate=0.1 --learning_rate_scaling=sqrt --weight_decay=1e-4 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0
"""

FNC_IMAGENET_LINEAR_EVAL = r"""
python run.py --mode=train --train_mode=finetune \
  --fine_tune_after_block=4 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head)' \
  --global_bn=True --optimizer=momentum --learning_rate=0.005 --weight_decay=0 \
  --train_epochs=90 --train_batch_size=1024 --warmup_epochs=0 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR --checkpoint=$CHKPT_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0
"""

FNC_IMAGENET_FINETUNE_1PCT = r"""
python run.py --mode=train --train_mode=finetune \
  --fine_tune_after_block=-1 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head_supervised)' \
  --global_bn=True --optimizer=lars --learning_rate=0.005 \
  --learning_rate_scaling=sqrt --weight_decay=0 \
  --train_epochs=60 --train_batch_size=1024 --warmup_epochs=0 \
  --dataset=imagenet2012_subset/1pct --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR --checkpoint=$CHKPT_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0 \
  --ft_proj_selector=1
"""

SOGCLR_IMAGENET_PRETRAIN = r"""
python run.py --train_mode=pretrain \
  --train_batch_size=512 --train_epochs=800 --temperature=0.1 \
  --learning_rate=0.075 --learning_rate_scaling=sqrt --weight_decay=1e-6 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation --num_classes=1000 \
  --num_proj_layers=2 \
  --DCL_mode=True --gamma=0.9  \
  --data_dir=gs://<path-to-tensorflow-dataset> \
  --model_dir=gs://<path-to-store-checkpoints> \
  --use_tpu=True
"""

# The README ends the --checkpoint value with a stray quote (ckpt-xxxx');
# it is a path, replaced like the others.
SOGCLR_IMAGENET_LINEAR_EVAL = r"""
python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=4 --zero_init_logits_layer=True \
  --num_proj_layers=0 --ft_proj_selector=-1 \
  --global_bn=False --optimizer=momentum --learning_rate=0.1 \
  --learning_rate_scaling=linear --weight_decay=0 \
  --train_epochs=90 --train_batch_size=4096 --warmup_epochs=0 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=gs://<path-to-tensorflow-dataset> \
  --model_dir=gs://<path-to-store-checkpoints> \
  --checkpoint=gs://<path-to-store-checkpoint>/ckpt-xxxx \
  --use_tpu=True
"""

# ------------------------------------------------------- shrinking them

TINY_NET = {'width_multiplier': 0.125}  # added: ResNet-18 x0.125
CIFAR_SIZES = {'dataset': 'digits', 'image_size': 16}
# digits are embedded: --data_dir (a TFDS directory) is passed but unused.
IMAGENET_SIZES = {'dataset': 'digits', 'data_dir': '/unused/digits-need-none',
                  'image_size': 40}
IMAGENET_NET = {'resnet_depth': 18, **TINY_NET}  # the default depth is 50
STEPS = {'train_steps': 2}
NO_TPU = {'use_tpu': False, 'tpu_name': 'unused-without-tpu'}


def command_flags(command):
  """{flag: value} of a README command line `python run.py --a=b ...`."""
  words = shlex.split(command.replace('\\\n', ' '))
  assert words[:2] == ['python', 'run.py'], words[:2]
  flags = {}
  for word in words[2:]:
    assert word.startswith('--') and '=' in word, word
    name, value = word[2:].split('=', 1)
    assert name not in flags, f'--{name} twice'
    flags[name] = value
  return flags


def adapted(command, replace, add=()):
  """argv of `command` with the values of `replace` swapped in (each must be
  a flag of the command) and the flags of `add` appended (none may be)."""
  flags = command_flags(command)
  unknown = set(replace) - set(flags)
  assert not unknown, f'not flags of the command: {unknown}'
  add = dict(add)
  already = set(add) & set(flags)
  assert not already, f'flags the command already has: {already}'
  flags.update(replace)
  flags.update(add)
  return [f'--{name}={value}' for name, value in flags.items()]


def run_command(argv):
  """(config, result) of an adapted command run through run.run."""
  cfg = config_lib.from_argv(argv)
  return cfg, run.run(cfg)


def latest_values(model_dir):
  return read_checkpoint(tf.train.latest_checkpoint(model_dir))


def projection_layers(values):
  """The indices of the projection-head layers in checkpoint `values`."""
  prefix = 'model/head_contrastive/linear_layers/'
  return {int(key[len(prefix):].split('/')[0])
          for key in model_values(values, 'head_contrastive')
          if key.startswith(prefix)}


def backbones(source_dir, model_dir):
  """The ResNet values of the newest checkpoints of both directories."""
  src = model_values(latest_values(source_dir), 'base_model')
  dst = model_values(latest_values(model_dir), 'base_model')
  assert src.keys() == dst.keys() and src
  return src, dst


def assert_same_backbone(source_dir, model_dir):
  """Warm-started from source_dir and frozen (linear eval)."""
  src, dst = backbones(source_dir, model_dir)
  for key in src:
    np.testing.assert_array_equal(src[key], dst[key], err_msg=key)


def assert_backbone_trained(source_dir, model_dir):
  """Convolution weights moved (not only BN statistics)."""
  src, dst = backbones(source_dir, model_dir)
  assert any(not np.array_equal(src[k], dst[k]) for k in src
             if '/kernel/' in k)


def assert_eval_result(result, model_dir):
  assert result['global_step'] == 2 and result['num_examples'] == 360
  assert 0 <= result['label_top_1_accuracy'] <= result[
      'label_top_5_accuracy'] <= 1
  with open(os.path.join(model_dir, 'result.json')) as f:
    assert json.load(f) == pytest.approx(result)


def assert_checkpoint_at_step_2(model_dir):
  latest = tf.train.latest_checkpoint(model_dir)
  assert latest.endswith('ckpt-2')
  assert read_checkpoint(latest)[
      'optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE'] == 2


# ----------------------------------------------------------------- SimCLR


@pytest.fixture(scope='module')
def simclr_cifar10(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('simclr_test'))
  # Shrunk: dataset, image_size 32 -> 16, train_batch_size 512 -> 16;
  # added train_steps=2, width_multiplier=0.125; path: model_dir.
  cfg, result = run_command(adapted(
      SIMCLR_CIFAR10_PRETRAIN,
      {**CIFAR_SIZES, 'train_batch_size': 16, 'model_dir': model_dir},
      add={**STEPS, **TINY_NET}))
  return cfg, result, model_dir


@pytest.fixture(scope='module')
def simclr_imagenet(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('simclr_imagenet'))
  # Shrunk: dataset, image_size 224 -> 40, train_batch_size 4096 -> 16;
  # added train_steps=2, resnet_depth=18, width_multiplier=0.125; paths;
  # use_tpu True -> False.
  cfg, result = run_command(adapted(
      SIMCLR_IMAGENET_PRETRAIN,
      {**IMAGENET_SIZES, 'train_batch_size': 16, 'model_dir': model_dir,
       **NO_TPU},
      add={**STEPS, **IMAGENET_NET}))
  return cfg, result, model_dir


def test_simclr_cifar10_pretraining(simclr_cifar10):
  cfg, result, model_dir = simclr_cifar10
  assert result is None  # --mode=train (the default)
  assert cfg.objective_name == 'simclr'
  assert cfg.data.use_blur is False and cfg.objective.temperature == 0.5
  assert_checkpoint_at_step_2(model_dir)
  # No --train_summary_steps: scalars at every host loop (one loop here).
  assert train_scalar_steps(model_dir) == [2]


def test_simclr_imagenet_pretraining(simclr_imagenet):
  cfg, _, model_dir = simclr_imagenet
  assert cfg.objective_name == 'simclr'
  assert cfg.schedule.learning_rate_scaling == 'sqrt'
  assert_checkpoint_at_step_2(model_dir)
  assert train_scalar_steps(model_dir) == []  # --train_summary_steps=0


def test_simclr_cifar10_linear_eval(simclr_cifar10, tmp_path):
  _, _, pretrain_dir = simclr_cifar10
  model_dir = str(tmp_path / 'simclr_test_ft')
  # Shrunk: dataset, image_size 32 -> 16, train_batch_size 512 -> 16;
  # added train_steps=2, width_multiplier=0.125; paths.
  _, result = run_command(adapted(
      SIMCLR_CIFAR10_LINEAR_EVAL,
      {**CIFAR_SIZES, 'train_batch_size': 16, 'checkpoint': pretrain_dir,
       'model_dir': model_dir},
      add={**STEPS, **TINY_NET}))
  assert_eval_result(result, model_dir)
  assert_same_backbone(pretrain_dir, model_dir)  # frozen: linear eval
  values = latest_values(model_dir)
  assert projection_layers(values) == set()
  assert all(np.any(v != 0)
             for v in model_values(values, 'head_supervised').values())


def test_simclr_imagenet_linear_eval(simclr_imagenet, tmp_path):
  _, _, pretrain_dir = simclr_imagenet
  model_dir = str(tmp_path / 'linear_eval')
  # Shrunk: dataset, image_size 224 -> 40, train_batch_size 4096 -> 16;
  # added train_steps=2, resnet_depth=18, width_multiplier=0.125; paths;
  # use_tpu True -> False.
  _, result = run_command(adapted(
      SIMCLR_IMAGENET_LINEAR_EVAL,
      {**IMAGENET_SIZES, 'train_batch_size': 16, 'checkpoint': pretrain_dir,
       'model_dir': model_dir, **NO_TPU},
      add={**STEPS, **IMAGENET_NET}))
  assert_eval_result(result, model_dir)
  assert_same_backbone(pretrain_dir, model_dir)
  assert train_scalar_steps(model_dir) == []


def test_simclr_imagenet_finetuning_1pct(simclr_imagenet, tmp_path):
  _, _, pretrain_dir = simclr_imagenet
  model_dir = str(tmp_path / 'finetune')
  # Shrunk: dataset imagenet2012_subset/1pct -> digits, image_size 224 ->
  # 40, train_batch_size 1024 -> 16; added train_steps=2, resnet_depth=18,
  # width_multiplier=0.125; paths; use_tpu True -> False.
  _, result = run_command(adapted(
      SIMCLR_IMAGENET_FINETUNE_1PCT,
      {**IMAGENET_SIZES, 'train_batch_size': 16, 'checkpoint': pretrain_dir,
       'model_dir': model_dir, **NO_TPU},
      add={**STEPS, **IMAGENET_NET}))
  assert_eval_result(result, model_dir)
  assert_backbone_trained(pretrain_dir, model_dir)  # the whole network
  # The head reads projection layer 1 (ft_proj_selector=1): only it exists.
  assert projection_layers(latest_values(model_dir)) == {0}


# -------------------------------------------------------------------- FNC


@pytest.fixture(scope='module')
def fnc_imagenet(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('fnc_imagenet'))
  # Shrunk: dataset, image_size 224 -> 40, train_batch_size 4096 -> 8;
  # added train_steps=2, resnet_depth=18, width_multiplier=0.125; paths;
  # use_tpu True -> False; added objective=fnc (FNC's run.py trains only
  # FNC; its defaults, 10 views, RandAugment, queue 16 B, top-10 > 0.7,
  # are this run.py's defaults for --objective=fnc).
  cfg, result = run_command(adapted(
      FNC_IMAGENET_PRETRAIN,
      {**IMAGENET_SIZES, 'train_batch_size': 8, 'model_dir': model_dir,
       **NO_TPU},
      add={**STEPS, **IMAGENET_NET, 'objective': 'fnc'}))
  return cfg, result, model_dir


def test_fnc_imagenet_pretraining(fnc_imagenet):
  cfg, _, model_dir = fnc_imagenet
  assert cfg.objective_name == 'fnc'
  assert cfg.objective.support_size == 8
  assert cfg.objective.memory_multiplier == 16
  assert_checkpoint_at_step_2(model_dir)
  values = latest_values(model_dir)
  assert any(k.startswith('momentum_encoder/') for k in values)
  assert any(k.startswith('fnc_queue/') for k in values), sorted(values)[:5]
  assert train_scalar_steps(model_dir) == []


def test_fnc_imagenet_linear_eval(fnc_imagenet, tmp_path):
  _, _, pretrain_dir = fnc_imagenet
  model_dir = str(tmp_path / 'fnc_linear_eval')
  # Shrunk: dataset, image_size 224 -> 40, train_batch_size 1024 -> 16;
  # added train_steps=2, resnet_depth=18, width_multiplier=0.125; paths;
  # use_tpu True -> False.
  _, result = run_command(adapted(
      FNC_IMAGENET_LINEAR_EVAL,
      {**IMAGENET_SIZES, 'train_batch_size': 16, 'checkpoint': pretrain_dir,
       'model_dir': model_dir, **NO_TPU},
      add={**STEPS, **IMAGENET_NET}))
  assert result is None  # --mode=train
  assert_checkpoint_at_step_2(model_dir)
  assert not os.path.exists(os.path.join(model_dir, 'result.json'))
  assert_same_backbone(pretrain_dir, model_dir)


def test_fnc_imagenet_finetuning_1pct(fnc_imagenet, tmp_path):
  _, _, pretrain_dir = fnc_imagenet
  model_dir = str(tmp_path / 'fnc_finetune')
  # Shrunk: dataset imagenet2012_subset/1pct -> digits, image_size 224 ->
  # 40, train_batch_size 1024 -> 16; added train_steps=2, resnet_depth=18,
  # width_multiplier=0.125; paths; use_tpu True -> False.
  _, result = run_command(adapted(
      FNC_IMAGENET_FINETUNE_1PCT,
      {**IMAGENET_SIZES, 'train_batch_size': 16, 'checkpoint': pretrain_dir,
       'model_dir': model_dir, **NO_TPU},
      add={**STEPS, **IMAGENET_NET}))
  assert result is None  # --mode=train
  assert_checkpoint_at_step_2(model_dir)
  assert_backbone_trained(pretrain_dir, model_dir)
  assert projection_layers(latest_values(model_dir)) == {0}


# ----------------------------------------------------------------- SogCLR


@pytest.fixture(scope='module')
def sogclr_imagenet(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('sogclr_imagenet'))
  # Shrunk: dataset, image_size 224 -> 40, train_batch_size 512 -> 16,
  # num_classes 1000 -> 10 (the data set's); added train_steps=2,
  # resnet_depth=18, width_multiplier=0.125; paths; use_tpu True -> False.
  cfg, result = run_command(adapted(
      SOGCLR_IMAGENET_PRETRAIN,
      {**IMAGENET_SIZES, 'train_batch_size': 16, 'num_classes': 10,
       'model_dir': model_dir, 'use_tpu': False},
      add={**STEPS, **IMAGENET_NET}))
  return cfg, result, model_dir


def test_sogclr_imagenet_pretraining(sogclr_imagenet):
  cfg, _, model_dir = sogclr_imagenet
  assert cfg.objective_name == 'sogclr'  # from --DCL_mode=True
  assert cfg.objective.gamma == 0.9
  assert_checkpoint_at_step_2(model_dir)
  values = latest_values(model_dir)
  (u_key,) = [k for k in values if k.startswith('sogclr_u/')]
  assert values[u_key].shape == (1437,) and np.any(values[u_key] != 0)
  assert projection_layers(values) == {0, 1}
  # No --train_summary_steps: scalars at every host loop (one loop here).
  assert train_scalar_steps(model_dir) == [2]


def test_sogclr_imagenet_linear_eval_with_identity_head(sogclr_imagenet,
                                                         tmp_path):
  """--num_proj_layers=0 (with the default --proj_head_mode=nonlinear)
  builds no projection layer: the linear head reads the ResNet features."""
  _, _, pretrain_dir = sogclr_imagenet
  model_dir = str(tmp_path / 'sogclr_linear_eval')
  # Shrunk: dataset, image_size 224 -> 40, train_batch_size 4096 -> 16;
  # added train_steps=2, resnet_depth=18, width_multiplier=0.125; paths
  # (the checkpoint is the pretraining's ckpt-2 prefix); use_tpu True ->
  # False.
  cfg, result = run_command(adapted(
      SOGCLR_IMAGENET_LINEAR_EVAL,
      {**IMAGENET_SIZES, 'train_batch_size': 16,
       'checkpoint': os.path.join(pretrain_dir, 'ckpt-2'),
       'model_dir': model_dir, 'use_tpu': False},
      add={**STEPS, **IMAGENET_NET}))
  assert cfg.model.proj_head_mode == 'nonlinear'
  assert cfg.model.num_proj_layers == 0
  assert_eval_result(result, model_dir)
  assert_same_backbone(pretrain_dir, model_dir)
  values = latest_values(model_dir)
  assert projection_layers(values) == set()
  (kernel,) = [v for k, v in model_values(values, 'head_supervised').items()
               if 'kernel' in k]
  assert kernel.shape == (64, 10)  # ResNet-18 x0.125 features -> classes
