import pytest

from aigc_ray.config import ConfigError, ExperimentConfig, load_config, named_configs


def test_shipped_configs_load_and_validate():
    names = named_configs()
    assert {"dcgan-digits", "vae-digits", "dcgan-shapes", "seed-recipe", "wgan-gp-digits"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert type(cfg).from_dict(cfg.to_dict()) == cfg  # YAML/dict round trip (a text config is its own type)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.lr_generator"):
        ExperimentConfig.from_dict({"train": {"lr_generator": 1e-3}})
    with pytest.raises(ConfigError, match="unknown config section"):
        ExperimentConfig.from_dict({"trainer": {}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.epochs must be int"):
        ExperimentConfig.from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"train\.use_gpu must be bool"):
        ExperimentConfig.from_dict({"train": {"use_gpu": 1}})


def test_mismatched_data_and_model_sizes_fail():
    with pytest.raises(ConfigError, match="model.image_size=32 differs"):
        ExperimentConfig.from_dict({"model": {"image_size": 32}})


def test_overrides_are_validated():
    cfg = ExperimentConfig().with_overrides({"train.lr_g": 1e-4})
    assert cfg.train.lr_g == 1e-4
    with pytest.raises(ConfigError, match="train.lr_g must be in"):
        cfg.with_overrides({"train.lr_g": 5.0})
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        cfg.with_overrides({"train.nope": 1})


def test_missing_named_config_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="dcgan-digits"):
        load_config("no-such-config")


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_lr_decay_start_outside_0_1_is_named(value):
    with pytest.raises(ConfigError, match=rf"train\.lr_decay_start must be in \[0, 1\], got {value}"):
        ExperimentConfig().with_overrides({"train.lr_decay_start": value})
