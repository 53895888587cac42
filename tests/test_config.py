"""Config loading and validation: every bad value stops with one line naming key and fix."""
import pytest

import taipan_jax
from taipan_jax.config import ConfigError, bundled_configs, mlp_hidden_size, padded_vocab_size


def test_bundled_configs_all_load():
  names = bundled_configs()
  assert {"tiny", "taipan_190m", "taipan_450m", "taipan_1_3b", "mamba2_190m",
          "transformer_190m", "jamba_190m", "swa_hybrid_190m"} <= set(names)
  for name in names:
    cfg = taipan_jax.load_config(name)
    assert cfg.name == name


def test_load_by_path_and_by_name_agree():
  import os
  from taipan_jax import configs
  path = os.path.join(os.path.dirname(configs.__file__), "taipan_190m.py")
  assert taipan_jax.load_config(path).to_dict() == taipan_jax.load_config(
      "taipan_190m").to_dict()


def test_derived_sizes():
  cfg = taipan_jax.load_config("taipan_190m")
  assert mlp_hidden_size(cfg) == 2048          # 8/3 * 768 = 2048
  assert padded_vocab_size(cfg) == 128256
  cfg = taipan_jax.load_config("tiny", {"model.vocab_size": 100})
  assert padded_vocab_size(cfg) == 112


@pytest.mark.parametrize("overrides,key", [
    ({"model.d_model": 100}, "mamba.head_dim"),               # d_inner 200 % 64 != 0
    ({"model.d_model": 80, "mamba.head_dim": 32}, "sal.head_dim"),   # 80 % 32 != 0
    ({"mamba.n_groups": 3}, "mamba.n_groups"),                # 2 SSM heads, 3 groups
    ({"mamba.head_dim": 48}, "mamba.head_dim"),               # does not divide d_inner 128
    ({"sal.window": 0}, "sal.window"),
    ({"sal.capacity": 1.5}, "sal.capacity"),
    ({"sal.selection": "topk"}, "sal.selection"),
    ({"sal.kernel": "flash"}, "sal.kernel"),
    ({"sal.kernel": "reference"}, "sal.kernel"),             # old spelling: 'xla'
    ({"mamba.kernel": "interpret"}, "mamba.kernel"),         # old: 'pallas' + interpret
    ({"mamba.kernel": "xla", "mamba.interpret": True}, "mamba.interpret"),
    ({"model.pattern": "mmx"}, "model.pattern"),
    ({"model.dtype": "float8"}, "model.dtype"),
    ({"optim.final_lr": 1.0}, "optim.final_lr"),
    ({"data.num_kv_pairs": 40}, "data.seq_len"),
    ({"sal.inference_capacity": 1000}, "sal.inference_capacity"),
])
def test_impossible_values_name_key_value_and_fix(overrides, key):
  with pytest.raises(ConfigError) as err:
    taipan_jax.load_config("tiny", overrides)
  message = str(err.value)
  assert f"config key {key}=" in message and "fix:" in message and "\n" not in message


def test_kernel_vocabulary_is_the_dispatch_vocabulary():
  """config sits below ops and keeps its own copy of the names: the two stay equal, and an
  old spelling is refused with the new one."""
  from taipan_jax.config import validation
  from taipan_jax.ops import dispatch
  assert validation.KERNELS == dispatch.IMPLEMENTATIONS
  assert set(validation._RENAMED_KERNELS) == set(dispatch.RENAMED)
  with pytest.raises(ConfigError, match=r"mamba.kernel='interpret'.*fix: use 'pallas' with "
                                        r"mamba.interpret=True"):
    taipan_jax.load_config("tiny", {"mamba.kernel": "interpret"})


def test_unknown_key_is_rejected():
  with pytest.raises(ConfigError, match=r"model.d_modle.*unknown key"):
    taipan_jax.load_config("tiny", {"model.d_modle": 64})


def test_unknown_key_in_a_config_file_is_rejected(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from taipan_jax.configs import base\n"
                  "def get_config():\n"
                  "  cfg = base.get_config()\n"
                  "  cfg.model.windw = 3\n"
                  "  return cfg\n")
  with pytest.raises(ConfigError, match=r"model.windw=3: unknown key"):
    taipan_jax.load_config(str(path))


def test_wrong_type_is_rejected(tmp_path):
  with pytest.raises(ConfigError, match=r"train.steps='ten': expected int"):
    taipan_jax.load_config("tiny", {"train.steps": "ten"})
  path = tmp_path / "bad_type.py"
  path.write_text("from taipan_jax.configs import base\n"
                  "def get_config():\n"
                  "  cfg = base.get_config()\n"
                  "  cfg.sal.window = 'wide'\n"
                  "  return cfg\n")
  with pytest.raises(ConfigError, match="bad_type.py"):
    taipan_jax.load_config(str(path))


def test_missing_config_names_the_choices():
  with pytest.raises(ConfigError, match="tiny"):
    taipan_jax.load_config("no_such_config")


def test_configuration_reference_is_generated_from_the_configs():
  """docs/configuration.md is `python -m taipan_jax.config_reference`: regenerate it after
  changing configs/."""
  import os
  from taipan_jax.config_reference import render
  path = os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")
  with open(path, encoding="utf-8") as f:
    assert f.read() == render(), "stale docs/configuration.md: run python -m taipan_jax.config_reference > docs/configuration.md"


def test_cli_reference_names_every_flag():
  import os
  import re
  root = os.path.join(os.path.dirname(__file__), "..")
  with open(os.path.join(root, "taipan_jax", "cli.py"), encoding="utf-8") as f:
    flags = re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', f.read())
  with open(os.path.join(root, "docs", "cli.md"), encoding="utf-8") as f:
    doc = f.read()
  assert len(flags) > 10
  missing = [name for name in flags if f"--{name}" not in doc]
  assert not missing, f"docs/cli.md does not describe {missing}"
