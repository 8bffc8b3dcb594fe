"""config.py: flags → one typed, immutable ExperimentConfig; validation."""

import dataclasses
import json
import os

import pytest

import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_from_argv_builds_typed_sections_and_leaves_global_flags_alone(
    tmp_path):
  cfg = config_lib.from_argv([
      '--dataset=digits', f'--model_dir={tmp_path}', '--objective=fnc',
      '--fn_topk=3', '--moving_average_decay=0.5', '--optimizer=adam',
      '--train_batch_size=64', '--resnet_depth=18', '--knn_eval_epochs=2',
      '--distribution_strategy=one_device'])
  assert cfg.objective_name == 'fnc'
  assert cfg.objective == config_lib.FNCConfig(topk=3, momentum_decay=0.5)
  assert cfg.data.dataset == 'digits' and cfg.data.train_batch_size == 64
  assert cfg.model.resnet_depth == 18
  assert cfg.optimizer.name == 'adam'
  assert cfg.evaluation.knn_eval_epochs == 2
  assert cfg.distribution.strategy == 'one_device'
  assert cfg.model_dir == str(tmp_path)
  assert cfg.flag_values['fn_topk'] == 3
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.data.image_size = 32
  # The process-wide FLAGS were not parsed or changed.
  assert not config_lib.FLAGS.is_parsed() or config_lib.FLAGS.fn_topk == 10


def test_section_defaults_are_the_flag_defaults():
  """A dataclass built without flags means what the command line means."""
  flag_values = config_lib.new_flag_values()
  renames = {('OptimizerConfig', 'name'): 'optimizer',
             ('DistributionConfig', 'strategy'): 'distribution_strategy'}
  checked = 0
  for cls in (config_lib.DataConfig, config_lib.ModelConfig,
              config_lib.OptimizerConfig, config_lib.ScheduleConfig,
              config_lib.CheckpointConfig, config_lib.EvalConfig,
              config_lib.DistributionConfig):
    for field in dataclasses.fields(cls):
      name = renames.get((cls.__name__, field.name), field.name)
      assert flag_values[name].default == field.default, (cls, field.name)
      checked += 1
  assert checked > 50


@pytest.mark.parametrize('objective, cls, flag_args, expected', [
    ('simclr', config_lib.SimCLRConfig, ['--temperature=0.2'],
     dict(temperature=0.2)),
    ('sogclr', config_lib.SogCLRConfig, ['--gamma=0.9', '--dcl_u_store=mean'],
     dict(gamma=0.9, u_store='mean')),
    ('fnc', config_lib.FNCConfig, ['--support_size=2', '--fn_threshold=0.5',
                                   '--fn_strategy=elimination',
                                   '--fnc_warmup_epochs=1.5'],
     dict(support_size=2, threshold=0.5, strategy='elimination',
          warmup_epochs=1.5)),
    ('ifnd', config_lib.IFNDConfig,
     ['--ifnd_num_clusters=4,8', '--ifnd_acceptance=constant',
      '--ifnd_acceptance_rate=0.3', '--ifnd_acceptance_stages=3',
      '--seed=7', '--ifnd_strategy=attraction'],
     dict(num_clusters=(4, 8), acceptance_schedule='constant',
          constant_rate=0.3, step_stages=3, seed=7, strategy='attraction')),
])
def test_objective_configs_take_their_own_names(tmp_path, objective, cls,
                                                flag_args, expected):
  cfg = config_lib.from_argv([f'--model_dir={tmp_path}',
                              f'--objective={objective}'] + flag_args)
  assert cfg.objective == cls(**expected)


def test_unset_memory_multiplier_is_the_objectives_default(tmp_path):
  common = [f'--model_dir={tmp_path}']
  fnc = config_lib.from_argv(common + ['--objective=fnc'])
  ifnd = config_lib.from_argv(common + ['--objective=ifnd'])
  assert fnc.objective.memory_multiplier == 16
  assert ifnd.objective.memory_multiplier == 0
  assert ifnd.objective.seed == 0  # unset --seed
  given = config_lib.from_argv(common + ['--objective=fnc',
                                         '--memory_multiplier=0'])
  assert given.objective.memory_multiplier == 0


def test_parse_num_clusters():
  assert config_lib.parse_num_clusters('10,30,100') == (10, 30, 100)
  assert config_lib.parse_num_clusters(['100', '300']) == (100, 300)
  with pytest.raises(ValueError, match='comma-separated list of integers'):
    config_lib.parse_num_clusters('ten')


@pytest.mark.parametrize('args, expected', [
    (['--ifnd_num_clusters=ten', '--objective=ifnd'],
     'comma-separated list of integers'),
    (['--objective=nope'], "Unknown --objective='nope'; available: fnc, ifnd"),
    (['--fine_tune_after_block=2'], '--fine_tune_after_block freezes blocks'),
    (['--width_multiplier=0'], '--width_multiplier must be positive'),
    (['--jit_compile', '--distribution_strategy=multi_worker_mirrored'],
     '--jit_compile cannot compile the step of '
     '--distribution_strategy=multi_worker_mirrored: its replicas sync '
     'through merge_call'),
    (['--input_threads=-1'], '--input_threads must not be negative'),
    (['--input_ram_budget_gb=-0.5'],
     '--input_ram_budget_gb must not be negative'),
    (['--linear_head_optimizer=adam', '--train_mode=finetune'],
     '--linear_head_optimizer=adam applies to pretraining only'),
    (['--linear_head_optimizer=momentum',
      '--lineareval_while_pretraining=false'],
     'which is false'),
    (['--linear_head_optimizer=adam', '--precision=float16'],
     'cannot run with --precision=float16'),
    (['--linear_head_learning_rate=0.01'],
     '--linear_head_learning_rate is used only with --linear_head_optimizer='
     'momentum or adam'),
    (['--linear_head_weight_decay=1e-4'],
     '--linear_head_weight_decay is used only with'),
    (['--linear_head_optimizer=adam', '--linear_head_learning_rate=0'],
     '--linear_head_learning_rate=0.0 must be positive'),
    (['--linear_head_optimizer=adam', '--linear_head_weight_decay=-1'],
     '--linear_head_weight_decay must not be negative'),
    (['--linear_head_batch_norm', '--train_mode=finetune'],
     '--linear_head_batch_norm concerns the linear head trained while '
     'pretraining'),
    (['--linear_head_schedule=constant'],
     '--linear_head_schedule is used only with'),
    (['--linear_head_input=clean', '--train_mode=finetune'],
     '--linear_head_input=clean concerns the linear head trained while '
     'pretraining'),
    (['--linear_head_input=clean', '--lineareval_while_pretraining=false'],
     '--linear_head_input=clean concerns the linear head'),
])
def test_validation_names_the_flags(tmp_path, args, expected):
  with pytest.raises(config_lib.ConfigError, match='invalid flags') as info:
    config_lib.from_argv([f'--model_dir={tmp_path}'] + args)
  assert expected in str(info.value)


def test_input_pipeline_flags_reach_the_data_config(tmp_path):
  cfg = config_lib.from_argv([f'--model_dir={tmp_path}', '--blur_on_device',
                              '--input_threads=12',
                              '--input_ram_budget_gb=64'])
  assert cfg.data.blur_on_device and cfg.data.use_blur
  assert cfg.data.input_threads == 12 and cfg.data.input_ram_budget_gb == 64


def test_jit_compile_reaches_the_distribution_config(tmp_path):
  common = [f'--model_dir={tmp_path}']
  assert not config_lib.from_argv(common).distribution.jit_compile
  cfg = config_lib.from_argv(common + ['--jit_compile',
                                       '--distribution_strategy=one_device'])
  assert cfg.distribution.jit_compile


def test_model_dir_is_required():
  with pytest.raises(config_lib.ConfigError, match='--model_dir is required'):
    config_lib.from_argv(['--dataset=digits'])


def test_to_json_is_the_whole_config(tmp_path):
  cfg = config_lib.from_argv([f'--model_dir={tmp_path}', '--objective=ifnd'])
  values = json.loads(json.dumps(cfg.to_json()))
  assert values['objective']['num_clusters'] == [10, 30, 100]
  assert values['checkpoint']['model_dir'] == str(tmp_path)
  assert 'flag_values' not in values


@pytest.mark.parametrize('config', sorted(
    f for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.cfg')))
def test_configs_parse_and_validate(config, tmp_path):
  cfg = config_lib.from_argv([
      f'--flagfile={os.path.join(REPO, "configs", config)}',
      f'--model_dir={tmp_path}'])
  assert cfg.objective_name in config_lib.OBJECTIVE_CONFIGS


def test_every_flag_is_documented_in_readme():
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  flag_values = config_lib.new_flag_values()
  config_lib.define_feature_eval_flags(flag_values)
  defined = [flag.name for flag in
             flag_values.get_flags_for_module(config_lib)]
  assert len(defined) >= 90, 'found too few flags'
  missing = [name for name in defined if f'`{name}`' not in readme]
  assert not missing, f'flags missing from README.md: {missing}'


def test_linear_head_flags_reach_the_config(tmp_path):
  common = [f'--model_dir={tmp_path}']
  default = config_lib.from_argv(common)
  assert default.optimizer.linear_head_optimizer == 'shared'
  assert not default.model.linear_head_batch_norm
  assert default.model.linear_head_input == 'views'
  cfg = config_lib.from_argv(common + [
      '--linear_head_optimizer=adam', '--linear_head_learning_rate=0.02',
      '--linear_head_weight_decay=1e-5', '--linear_head_batch_norm',
      '--linear_head_input=clean', '--linear_head_schedule=constant'])
  assert cfg.model.linear_head_input == 'clean'
  assert cfg.optimizer.linear_head_schedule == 'constant'
  assert default.optimizer.linear_head_schedule == 'cosine'
  assert cfg.optimizer.linear_head_optimizer == 'adam'
  assert cfg.optimizer.linear_head_learning_rate == 0.02
  assert cfg.optimizer.linear_head_weight_decay == 1e-5
  assert cfg.model.linear_head_batch_norm
  with pytest.raises(Exception, match='linear_head_optimizer'):
    config_lib.from_argv(common + ['--linear_head_optimizer=sgd'])
  with pytest.raises(Exception, match='linear_head_input'):
    config_lib.from_argv(common + ['--linear_head_input=augmented'])
  assert 'linear_head_optimizer' in config_lib.IDENTITY_FLAGS
  assert 'linear_head_batch_norm' in config_lib.IDENTITY_FLAGS
