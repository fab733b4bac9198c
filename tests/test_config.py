import pytest

from lm2cli.config import ConfigError, Recipe, load_recipe, recipes_dir, to_yaml
import yaml


def test_every_shipped_recipe_loads():
    names = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    assert {"tiny", "internlm2-1_8b", "internlm2-7b", "internlm2-20b"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.name == name


def test_released_configs_match_spec():
    r7 = load_recipe("internlm2-7b")
    m = r7.model
    assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.num_key_value_heads) == (32, 4096, 32, 8)
    assert m.intermediate_size == 14336 and m.vocab_size == 92544 and m.rope_theta == 1e6
    assert m.q_per_kv == 4 and m.head_dim == 128
    assert r7.pretrain.stage1.rope_theta == 50_000 and r7.pretrain.stage2.rope_theta == 1e6
    assert load_recipe("internlm2-20b").model.q_per_kv == 6


def test_overrides_are_typed():
    r = load_recipe("tiny", ["pretrain.stage1.lr=3e-4", "model.num_hidden_layers=2", "pretrain.stage1.precision=bf16"])
    assert r.pretrain.stage1.lr == pytest.approx(3e-4)
    assert r.model.num_hidden_layers == 2
    assert r.pretrain.stage1.precision == "bf16"


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown recipe key 'model.num_hiden_layers'; did you mean 'model.num_hidden_layers'"):
        load_recipe("tiny", ["model.num_hiden_layers=3"])
    with pytest.raises(ConfigError, match=r"unknown recipe key 'model.nonexistent'"):
        load_recipe("tiny", ["model.nonexistent=1"])


def test_invalid_values_fail_validation():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        load_recipe("tiny", ["model.num_key_value_heads=3"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_recipe("tiny", ["model.hidden_size=wide"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_recipe("tiny", ["pretrain.stage1.precision=fp8"])


def test_malformed_yaml_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [128\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML \(line"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("no-such-recipe")


def test_dump_round_trips(tmp_path):
    r = load_recipe("tiny", ["sft.train.lr=2e-5"])
    p = tmp_path / "config.yaml"
    p.write_text(to_yaml(r))
    again = load_recipe(p)
    assert again == r
    assert isinstance(yaml.safe_load(p.read_text()), dict)
    assert Recipe() is not None
