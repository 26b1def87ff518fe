import pytest

from chimera_jax import config_lib
from configs import lm as lm_configs
from tests.lm_testing import cli


def test_variants_and_required_top_level_fields():
    c = lm_configs.get_config("arch=dense,size=tiny")
    for field in ("stage", "seed", "total_steps", "log_every", "eval_every", "checkpoint_every", "mesh", "model",
                  "optimizer", "data"):
        assert field in c
    assert c.model.pattern == "A" and c.stage == "lm"
    big = lm_configs.get_config("size=1p3b")
    assert (big.model.d_model, big.model.num_layers, big.model.vocab_size, big.model.tie_embeddings) == \
        (2048, 24, 128256, False)


def test_unknown_variant_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config variant key 'sise'.*\['arch', 'size'\]"):
        lm_configs.get_config("sise=tiny")
    with pytest.raises(ValueError, match="arch='nope' is not one of"):
        lm_configs.get_config("arch=nope")


def test_locked_config_refuses_unknown_field_naming_valid_ones():
    c = lm_configs.get_config()
    with pytest.raises(AttributeError, match="num_layerz"):
        c.model.num_layerz = 3
    with pytest.raises(ValueError, match=r"model has no field 'num_layerz'.*num_layers"):
        config_lib.apply_overrides(c, {"model.num_layerz": 3})
    with pytest.raises(TypeError, match="model.num_layers"):
        config_lib.apply_overrides(c, {"model.num_layers": "four"})


def test_cli_stops_before_running_on_unknown_field_or_wrong_type(tmp_path):
    bad = cli("chimera_jax.train", "--config=configs/lm.py", f"--workdir={tmp_path}/w",
              "--config.model.num_layerz=3", check=False)
    assert bad.returncode != 0 and "num_layerz" in bad.stderr and "num_layers" in bad.stderr
    wrong = cli("chimera_jax.train", "--config=configs/lm.py", f"--workdir={tmp_path}/w",
                "--config.model.num_layers=four", check=False)
    assert wrong.returncode != 0 and "num_layers" in wrong.stderr
    assert not (tmp_path / "w").exists()  # nothing ran
