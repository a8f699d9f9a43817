import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pfsr.config import Config, ConfigError, config_reference, load_config

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.crop % cfg.model.scale == 0


def test_paper_sizes_follow_reference_code():
    div2k, celeba, imagenet = (load_config(CONFIGS / f) for f in ("div2k_x4.yaml", "celeba_x8.yaml", "imagenet_x4.yaml"))
    assert (div2k.model.rrdb_num_block, div2k.model.rrdb_feature_blocks) == (23, [1, 8, 15, 22])
    assert div2k.model.unet_base_channels == 128 and (div2k.data.crop, div2k.data.batch_size) == (160, 16)
    assert (celeba.model.scale, celeba.model.rrdb_num_block, celeba.model.rrdb_feature_blocks) == (8, 8, [1, 3, 5, 7])
    assert (celeba.data.crop, celeba.data.batch_size) == (160, 12)
    assert (imagenet.model.rrdb_num_block, imagenet.model.rrdb_feature_blocks) == (16, [1, 5, 10, 15])
    assert (imagenet.data.crop, imagenet.data.batch_size, imagenet.train.lr) == (256, 6, 2e-4)
    for cfg in (div2k, celeba, imagenet):
        assert (cfg.train.warmup_steps, cfg.train.grad_clip) == (500, 10.0) and cfg.train.ema_decay > 0
    stages = {load_config(CONFIGS / f"div2k_x4{s}.yaml").train.stage for s in ("_encoder", "", "_quality")}
    assert stages == {"encoder", "diffusion", "quality"}
    assert load_config(CONFIGS / "div2k_x4_quality.yaml").loss.quality_weight == 0.5


def test_defaults_need_no_file():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.diffusion.hybrid_c == 1.0
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


@pytest.mark.parametrize("text, message", [
    ("model:\n  rrdb_num_blocks: 3\n", "model.rrdb_num_blocks: unknown key (did you mean 'rrdb_num_block'?)"),
    ("modle:\n  scale: 4\n", "modle: unknown key"),
    ("model:\n  scale: four\n", "model.scale: expected int, got 'four'"),
    ("model:\n  scale: 5\n", "model.scale: must be 2, 3, 4 or 8"),
    ("train:\n  stage: finetune\n", "train.stage: must be one of"),
    ("model:\n  rrdb_feature_blocks: [1, x]\n", "model.rrdb_feature_blocks[1]: expected int"),
    ("data:\n  crop: 100\n", "data.crop: must be a multiple of 8"),
    ("train:\n  bf16: 1\n", "train.bf16: expected true or false"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml") as err:
        load_config(path)
    assert message in str(err.value)


def test_base_files_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 7\n  lr: 0.1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  lr: 0.2\n")
    cfg = load_config(tmp_path / "b.yaml", {"data.batch_size": 3})
    assert (cfg.train.steps, cfg.train.lr, cfg.data.batch_size) == (7, 0.2, 3)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "loop.yaml")


def test_reference_table_lists_every_field():
    table = config_reference()
    assert "`model.hybrid_c`" not in table and "`diffusion.hybrid_c`" in table and "`serve.max_batch_size`" in table


def test_cli_exits_2_on_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pfsr", "upscale", str(tmp_path / "missing.png"), str(tmp_path / "o.png")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1] / "platform")
    assert proc.returncode == 2, proc.stderr
    assert "missing.png does not exist" in proc.stderr


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-5` as the string '1e-5'; a float field takes it as the number, in files and in
    overrides, while other strings stay errors."""
    (tmp_path / "a.yaml").write_text("train:\n  lr: 1e-5\n")
    assert load_config(tmp_path / "a.yaml").train.lr == 1e-5
    assert load_config(tmp_path / "a.yaml", {"loss.quality_weight": yaml.safe_load("2E+1")}).loss.quality_weight == 20.0
    (tmp_path / "b.yaml").write_text("train:\n  lr: 1e-5x\n")
    with pytest.raises(ConfigError, match="train.lr: expected a number, got '1e-5x'"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("train:\n  steps: 1e3\n")
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        load_config(tmp_path / "c.yaml")
