"""Every recipe in configs/ equals its source, flag by flag.

SOURCES holds, per config file, the phrase its comment must cite and the
flags of the source, written out here from the source itself: a README
command (paths and hardware flags left out) or a paper's stated values. A
config that drifts from its table, or a table that drifts from its config,
fails. Entries the source does not state are marked:

  Default   the source program's default for a flag its command leaves out,
            spelled out in the config (equal to this run.py's default
            unless the note says otherwise);
  Variant   a deliberate change from the source, which the config's comment
            names as --flag=value;
  Assumed   not stated by the source; the config's comment must say it is
            assumed.
"""

import contextlib
import io
import os
import re
from typing import NamedTuple

import pytest

import config as config_lib
import lars_optimizer
import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, 'configs')


class Default(NamedTuple):
  value: str
  note: str = "the source run.py's default (= this run.py's)"


class Variant(NamedTuple):
  value: str
  note: str


class Assumed(NamedTuple):
  value: str
  note: str


class Source(NamedTuple):
  cites: str  # must appear in the config's comment
  flags: dict
  # Peak learning rate the source states (after batch scaling), if any.
  scaled_learning_rate: float = None


SIMCLR_README = 'google-research/simclr'
FNC_README = 'google-research/fnc'

# The SimCLR README's CIFAR-10 pretraining command (tf2/README.md and
# README.md), without --model_dir and --use_tpu=False.
SIMCLR_CIFAR10_COMMAND = {
    'train_mode': 'pretrain', 'train_batch_size': '512',
    'train_epochs': '1000', 'learning_rate': '1.0', 'weight_decay': '1e-4',
    'temperature': '0.5', 'dataset': 'cifar10', 'image_size': '32',
    'eval_split': 'test', 'resnet_depth': '18', 'use_blur': 'False',
    'color_jitter_strength': '0.5',
}

# The FNC README's 1 % fine-tuning command, without paths and TPU flags;
# --mode=train there.
FNC_FINETUNE_COMMAND = {
    'train_mode': 'finetune', 'fine_tune_after_block': '-1',
    'zero_init_logits_layer': 'True',
    'variable_schema': '(?!global_step|(?:.*/|^)Momentum|head_supervised)',
    'global_bn': 'True', 'optimizer': 'lars', 'learning_rate': '0.005',
    'learning_rate_scaling': 'sqrt', 'weight_decay': '0',
    'train_epochs': '60', 'train_batch_size': '1024', 'warmup_epochs': '0',
    'dataset': 'imagenet2012_subset/1pct', 'image_size': '224',
    'eval_split': 'validation', 'train_summary_steps': '0',
    'ft_proj_selector': '1',
}
FNC_RELEASE_FINETUNE = {
    'mode': Variant('train_then_eval', 'the README has --mode=train; this '
                    'also prints the result'),
    'crop_area_min': Default('0.2', "the release's fine-tuning crop "
                             '(data.py get_preprocess_fn crop_area=(0.2, 1))'),
    'resnet_depth': Default('50'),
}

# SimCLR paper, appendix B.5 (values) and the SimCLR README's fine-tuning
# command and notes (the rest).
SIMCLR_PAPER_FINETUNE = {
    'train_mode': 'finetune', 'fine_tune_after_block': '-1',
    'optimizer': 'momentum',  # Nesterov (our momentum optimizer)
    'learning_rate': '0.05', 'learning_rate_scaling': 'linear',
    'weight_decay': '0.0', 'warmup_epochs': '0', 'train_batch_size': '4096',
    'image_size': '224', 'resnet_depth': '50',
    # The README's fine-tuning command:
    'mode': 'train_then_eval', 'zero_init_logits_layer': 'true',
    'global_bn': 'true', 'eval_split': 'validation',
    'train_summary_steps': '0',
    # The README's advice for SimCLR(v1) encoders (head discarded):
    'variable_schema': '(?!global_step|(?:.*/|^)Momentum|head)',
    'ft_proj_selector': '0',
}

SUPCONTRAST = 'as in SupContrast\'s SimCLR CIFAR recipe'
# IFND paper values (its summary); the rest assumed.
IFND_PAPER = {
    'objective': 'ifnd', 'train_mode': 'pretrain',
    'train_batch_size': '1024', 'train_epochs': '1000',
    'learning_rate': '0.125', 'learning_rate_scaling': 'linear',  # 0.5
    'warmup_epochs': '10', 'ifnd_reassign_epochs': '20',
    'ifnd_acceptance': 'linear', 'ifnd_strategy': 'elimination',
    'image_size': '32', 'eval_split': 'test',
    'optimizer': Assumed('momentum', SUPCONTRAST),
    'weight_decay': Assumed('1e-4', SUPCONTRAST),
    'temperature': Assumed('0.5', SUPCONTRAST),
    'resnet_depth': Assumed('18', 'the usual CIFAR network'),
    'use_blur': Assumed('false', "the SimCLR README's CIFAR command"),
    'color_jitter_strength': Assumed('0.5',
                                     "the SimCLR README's CIFAR command"),
    'memory_multiplier': Assumed('0', 'the summary gives a queue only for '
                                 'ImageNet'),
    'ifnd_level_combine': Assumed('mean', "this framework's default"),
}

SOURCES = {
    'quickstart.cfg': Source('README "Quick start"', {
        # This repository's own recipe, measured in the README.
        'dataset': 'digits', 'eval_split': 'test', 'image_size': '16',
        'resnet_depth': '18', 'width_multiplier': '0.25',
        'train_batch_size': '256', 'train_epochs': '40',
        'learning_rate': '1.0', 'learning_rate_scaling': 'linear',
        'warmup_epochs': '4', 'weight_decay': '1e-4', 'temperature': '0.5',
        'use_blur': 'false', 'color_jitter_strength': '0.5',
        'lineareval_while_pretraining': 'true', 'mode': 'train_then_eval',
        # The head's own optimizer, measured in the README.
        'linear_head_optimizer': 'adam', 'linear_head_learning_rate': '0.01',
        'linear_head_batch_norm': 'true', 'linear_head_input': 'clean',
        'linear_head_schedule': 'constant',
        'checkpoint_epochs': '1',
        'eval_batch_size': '360'}),
    'quickstart_linear_eval.cfg': Source('README "Quick start"', {
        'dataset': 'digits', 'eval_split': 'test', 'image_size': '16',
        'resnet_depth': '18', 'width_multiplier': '0.25',
        'train_mode': 'finetune', 'fine_tune_after_block': '4',
        'zero_init_logits_layer': 'true',
        'variable_schema': '(?!global_step|(?:.*/|^)Momentum|head)',
        'global_bn': 'false', 'optimizer': 'momentum',
        'learning_rate': '0.1', 'weight_decay': '0.0', 'warmup_epochs': '0',
        'train_epochs': '30', 'train_batch_size': '256',
        'checkpoint_epochs': '10', 'eval_batch_size': '360',
        'mode': 'train_then_eval'}),
    'folder_cpu.cfg': Source('README "Your own folder of images"', {
        # This repository's own recipe for a folder on a laptop CPU,
        # measured in the README; --dataset and --model_dir come from the
        # command line.
        'image_size': '32', 'resnet_depth': '18', 'width_multiplier': '0.25',
        'train_batch_size': '256', 'train_epochs': '5',
        'learning_rate': '1.0', 'learning_rate_scaling': 'linear',
        'warmup_epochs': '1', 'weight_decay': '1e-4', 'temperature': '0.5',
        'use_blur': 'false', 'color_jitter_strength': '0.5',
        'lineareval_while_pretraining': 'true',
        'linear_head_optimizer': 'adam', 'linear_head_learning_rate': '0.01',
        'linear_head_batch_norm': 'true', 'linear_head_input': 'clean',
        'linear_head_schedule': 'constant', 'knn_eval_epochs': '2',
        'checkpoint_epochs': '1', 'mode': 'train_then_eval'}),
    'simclr_cifar10_r18.cfg': Source(SIMCLR_README, SIMCLR_CIFAR10_COMMAND),
    'simclr_cifar10_r50.cfg': Source(SIMCLR_README, {
        **SIMCLR_CIFAR10_COMMAND,
        'resnet_depth': Variant('50', 'the R50 version of the command')}),
    # The SimCLR README's CIFAR-10 linear-eval command (README.md).
    'cifar10_linear_eval.cfg': Source(SIMCLR_README, {
        'mode': 'train_then_eval', 'train_mode': 'finetune',
        'fine_tune_after_block': '4', 'zero_init_logits_layer': 'True',
        'variable_schema': '(?!global_step|(?:.*/|^)Momentum|head)',
        'global_bn': 'False', 'optimizer': 'momentum',
        'learning_rate': '0.1', 'weight_decay': '0.0', 'train_epochs': '100',
        'train_batch_size': '512', 'warmup_epochs': '0',
        'dataset': 'cifar10', 'image_size': '32', 'eval_split': 'test',
        'resnet_depth': '18'}),
    # The SimCLR README's ImageNet pretraining command (tf2/README.md).
    'simclr_imagenet_r50.cfg': Source(SIMCLR_README, {
        'train_mode': 'pretrain', 'train_batch_size': '4096',
        'train_epochs': '100', 'temperature': '0.1',
        'learning_rate': '0.075', 'learning_rate_scaling': 'sqrt',
        'weight_decay': '1e-4', 'dataset': 'imagenet2012',
        'image_size': '224', 'eval_split': 'validation',
        'train_summary_steps': '0', 'resnet_depth': Default('50')},
                                      scaled_learning_rate=4.8),
    # The SimCLR README's ImageNet linear-eval command (README.md).
    'imagenet_linear_eval.cfg': Source(SIMCLR_README, {
        'mode': 'train_then_eval', 'train_mode': 'finetune',
        'fine_tune_after_block': '4', 'zero_init_logits_layer': 'True',
        'variable_schema': '(?!global_step|(?:.*/|^)Momentum|head)',
        'global_bn': 'False', 'optimizer': 'momentum',
        'learning_rate': '0.1', 'weight_decay': '1e-6', 'train_epochs': '90',
        'train_batch_size': '4096', 'warmup_epochs': '0',
        'dataset': 'imagenet2012', 'image_size': '224',
        'eval_split': 'validation', 'train_summary_steps': '0',
        'resnet_depth': Default('50')}),
    'simclr_imagenet_semi_1pct.cfg': Source('SimCLR paper, appendix B.5', {
        **SIMCLR_PAPER_FINETUNE, 'train_epochs': '60',
        'dataset': 'imagenet2012_subset/1pct'}, scaled_learning_rate=0.8),
    'simclr_imagenet_semi_10pct.cfg': Source('SimCLR paper, appendix B.5', {
        **SIMCLR_PAPER_FINETUNE, 'train_epochs': '30',
        'dataset': 'imagenet2012_subset/10pct'}, scaled_learning_rate=0.8),
    # The FNC README's pretraining command, and its run.py's FNC defaults.
    'fnc_imagenet_r50.cfg': Source(FNC_README, {
        'train_mode': 'pretrain', 'train_batch_size': '4096',
        'train_epochs': '100', 'temperature': '0.1', 'learning_rate': '0.1',
        'learning_rate_scaling': 'sqrt', 'weight_decay': '1e-4',
        'dataset': 'imagenet2012', 'image_size': '224',
        'eval_split': 'validation', 'train_summary_steps': '0',
        'resnet_depth': Default('50'),
        'objective': Default('fnc', "the release's run.py trains only FNC"),
        'support_size': Default('8'),
        'use_randaugment': Default('true', 'unset here means on for fnc'),
        'memory_multiplier': Default('16', 'unset here means 16 for fnc'),
        'moving_average_decay': Default('0.999'), 'fn_topk': Default('10'),
        'fn_threshold': Default('0.7'),
        'fn_strategy': Default('attraction', "the release's only mode")}),
    # The FNC README's linear-eval command (--mode=train there).
    'fnc_imagenet_linear_eval.cfg': Source(FNC_README, {
        'train_mode': 'finetune', 'fine_tune_after_block': '4',
        'zero_init_logits_layer': 'True',
        'variable_schema': '(?!global_step|(?:.*/|^)Momentum|head)',
        'global_bn': 'True', 'optimizer': 'momentum',
        'learning_rate': '0.005', 'weight_decay': '0', 'train_epochs': '90',
        'train_batch_size': '1024', 'warmup_epochs': '0',
        'dataset': 'imagenet2012', 'image_size': '224',
        'eval_split': 'validation', 'train_summary_steps': '0',
        'learning_rate_scaling': Default(
            'sqrt', "FNC's run.py default; this run.py's is linear"),
        **FNC_RELEASE_FINETUNE}, scaled_learning_rate=0.16),
    'fnc_imagenet_semi_1pct.cfg': Source(FNC_README, {
        **FNC_FINETUNE_COMMAND, **FNC_RELEASE_FINETUNE},
                                         scaled_learning_rate=0.16),
    'fnc_imagenet_semi_10pct.cfg': Source(FNC_README, {
        **FNC_FINETUNE_COMMAND, **FNC_RELEASE_FINETUNE,
        # The README: "set dataset=imagenet2012_subset/10pct" for 10 %.
        'dataset': 'imagenet2012_subset/10pct',
        'train_epochs': Assumed('30', "SimCLR's 10 % schedule; the FNC "
                                'README gives no 10 % epochs')},
                                          scaled_learning_rate=0.16),
    # SogCLR's README pretraining command (Tensorflow branch).
    'sogclr_imagenet_r50.cfg': Source('Optimization-AI/SogCLR', {
        'train_mode': 'pretrain', 'train_batch_size': '512',
        'train_epochs': '800', 'temperature': '0.1',
        'learning_rate': '0.075', 'learning_rate_scaling': 'sqrt',
        'weight_decay': '1e-6', 'dataset': 'imagenet2012',
        'image_size': '224', 'eval_split': 'validation',
        'num_classes': '1000', 'num_proj_layers': '2', 'DCL_mode': 'True',
        'gamma': '0.9',
        'dcl_u_store': Default('sum', "the paper code's u_a + u_b (this "
                               "run.py's default)")}),
    'ifnd_cifar10.cfg': Source('Chen et al., ICLR 2022', {
        **IFND_PAPER, 'dataset': 'cifar10',
        'ifnd_num_clusters': '10,30,100'}, scaled_learning_rate=0.5),
    'ifnd_cifar100.cfg': Source('Chen et al., ICLR 2022', {
        **IFND_PAPER, 'dataset': 'cifar100',
        'ifnd_num_clusters': '100,300,1000'}, scaled_learning_rate=0.5),
}


def read_config(name):
  """(comment text, {flag: value}) of configs/<name>."""
  comment, flags = [], {}
  with open(os.path.join(CONFIG_DIR, name)) as f:
    for line in f:
      line = line.strip()
      if line.startswith('#'):
        comment.append(line.lstrip('# '))
      elif line:
        match = re.fullmatch(r'--([A-Za-z_]+)=(.*)', line)
        assert match, f'{name}: not a --flag=value line: {line!r}'
        assert match[1] not in flags, f'{name}: --{match[1]} twice'
        flags[match[1]] = match[2]
  return ' '.join(comment), flags


def table_value(entry):
  return entry if isinstance(entry, str) else entry.value


def parsed(flags):
  """{flag: parsed value} of `flags` as run.py's absl flags read them."""
  flag_values = config_lib.parse_argv(
      [f'--{name}={value}' for name, value in flags.items()])
  return {name: flag_values[name].value for name in flags}


def test_every_config_has_a_source_table():
  configs = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith('.cfg'))
  assert configs == sorted(SOURCES)


@pytest.mark.parametrize('name', sorted(SOURCES))
def test_config_equals_its_source(name):
  source = SOURCES[name]
  comment, flags = read_config(name)
  assert source.cites in comment, f'{name} must cite {source.cites!r}'
  assert sorted(flags) == sorted(source.flags), (
      f'{name}: flags not in its source table: '
      f'{sorted(set(flags) - set(source.flags))}; in the table but not in '
      f'the config: {sorted(set(source.flags) - set(flags))}')
  expected = {k: table_value(v) for k, v in source.flags.items()}
  assert parsed(flags) == parsed(expected)


@pytest.mark.parametrize('name', sorted(SOURCES))
def test_marked_entries_are_declared(name):
  """Assumptions are called so in the config's comment, variants are named
  there, and plain defaults are this run.py's defaults."""
  comment, _ = read_config(name)
  defaults = config_lib.new_flag_values()
  for flag, entry in SOURCES[name].flags.items():
    if isinstance(entry, Assumed):
      assert 'ssum' in comment, f'{name}: --{flag} is assumed: say so'
    elif isinstance(entry, Variant):
      assert f'--{flag}={entry.value}' in comment, (name, flag)
    elif isinstance(entry, Default) and entry.note == Default._field_defaults[
        'note']:
      assert parsed({flag: entry.value})[flag] == defaults[flag].default, (
          name, flag)


@pytest.mark.parametrize('name', sorted(
    n for n, s in SOURCES.items() if s.scaled_learning_rate))
def test_scaled_learning_rate_is_the_sources(name):
  """The peak rate the source states, from --learning_rate, its scaling and
  the batch (e.g. 0.005·√1024 = 0.16)."""
  flags = config_lib.parse_argv(
      [f'--flagfile={os.path.join(CONFIG_DIR, name)}'])
  schedule = lars_optimizer.WarmUpAndCosineDecay(
      flags.learning_rate, 1_000_000, flags.train_batch_size,
      learning_rate_scaling=flags.learning_rate_scaling)
  assert schedule.scaled_learning_rate == pytest.approx(
      SOURCES[name].scaled_learning_rate)


def test_no_config_sets_model_dir():
  """A config's model_dir would be shared by every run of it (the second
  silently resumes the first): the command line names it."""
  for name in sorted(SOURCES):
    assert 'model_dir' not in read_config(name)[1], name


@pytest.mark.parametrize('mode', ['train', 'train_then_eval', 'eval',
                                  'preview'])
@pytest.mark.parametrize('name', sorted(SOURCES))
def test_config_without_model_dir_is_refused_before_writing(
    name, mode, tmp_path, monkeypatch):
  """run.py --flagfile=configs/<name> without --model_dir: exit 2 with a
  message saying what to pass; nothing is written (cwd stays empty)."""
  monkeypatch.chdir(tmp_path)
  stderr = io.StringIO()
  with pytest.raises(SystemExit) as exit_info, \
      contextlib.redirect_stderr(stderr):
    run.run_from_flags(config_lib.parse_argv(
        [f'--flagfile={os.path.join(CONFIG_DIR, name)}', f'--mode={mode}']))
  assert exit_info.value.code == 2
  message = stderr.getvalue()
  assert '--model_dir is required' in message
  assert '--model_dir=/tmp/quickstart' in message
  assert not os.listdir(tmp_path)
