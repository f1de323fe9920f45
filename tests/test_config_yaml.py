"""``CheckpointConfig.from_yaml`` / ``from_dict`` with the reference guides' keys."""

from __future__ import annotations

import textwrap

import pytest

import dcp_engine as de


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_experiment_guide_full_block(tmp_path):
    path = write(
        tmp_path,
        """
        model: {name: resnet20}
        training: {epochs: 200}
        checkpoint:
          enabled: true              # Enable checkpointing
          dir: "./experiments"       # Base directory
          experiment_name: ""        # Custom name (optional)
          save_frequency: 10         # Save every N epochs
          save_best: true            # Save best model
          resume: ""                 # Resume path (optional)
    """,
    )
    with pytest.warns(UserWarning, match="save_best: true .* monitor"):  # it has none
        cfg = de.CheckpointConfig.from_yaml(path)
    assert cfg.enabled and cfg.root_dir == "./experiments" and cfg.experiment_name == ""
    assert cfg.save_every_n_epochs == 10 and cfg.save_best and cfg.resume is None


def test_experiment_guide_resume_path_and_disabled(tmp_path):
    path = write(
        tmp_path,
        """
        checkpoint:
          enabled: true
          dir: "./experiments"
          save_frequency: 10
          save_best: true
          resume: "./experiments/my_experiment/checkpoints/latest"
    """,
    )
    with pytest.warns(UserWarning, match="monitor"):
        assert de.CheckpointConfig.from_yaml(path).resume == (
            "./experiments/my_experiment/checkpoints/latest"
        )
    off = write(tmp_path, "checkpoint:\n  enabled: false\n")
    assert de.CheckpointConfig.from_yaml(off).enabled is False


def test_dream_trainer_parameters(tmp_path):
    path = write(
        tmp_path,
        """
        checkpoint:
          root_dir: /mnt/checkpoints
          monitor: val_accuracy
          mode: max
          keep_top_k: 5
          save_last: true
          save_every_n_epochs: 5
          save_every_n_steps: 1000
          resume_mode: best
    """,
    )
    cfg = de.CheckpointConfig.from_yaml(path)
    assert (cfg.root_dir, cfg.monitor, cfg.mode, cfg.keep_top_k) == (
        "/mnt/checkpoints", "val_accuracy", "max", 5,
    )  # fmt: skip
    assert cfg.save_last and cfg.save_every_n_epochs == 5 and cfg.save_every_n_steps == 1000
    assert cfg.resume == "best"
    assert cfg.retention.keep_top_k == 5 and cfg.retention.mode == "max"


def test_super_gradients_spellings():
    block = {"ckpt_root_dir": "/ckpts", "experiment_name": "cifar_experiment",
             "resume": True, "save_freq": 2, "save_latest": False}  # fmt: skip
    cfg = de.CheckpointConfig.from_dict(block)
    assert cfg.root_dir == "/ckpts" and cfg.experiment_name == "cifar_experiment"
    assert cfg.resume == "latest" and cfg.save_every_n_epochs == 2 and cfg.save_last is False
    assert de.CheckpointConfig.from_dict({"resume": False, "save_dir": "x"}).resume is None


def test_async_mode_off_which_yaml_reads_as_false(tmp_path):
    cfg = de.CheckpointConfig.from_yaml(write(tmp_path, "checkpoint:\n  async_mode: off\n"))
    assert cfg.async_mode == "off"


def test_a_file_that_is_only_the_block_and_an_empty_block(tmp_path):
    path = write(tmp_path, "dir: runs\nkeep_last_n: 2\n")
    cfg = de.CheckpointConfig.from_yaml(path)
    assert cfg.root_dir == "runs" and cfg.keep_last_n == 2
    with pytest.warns(UserWarning, match="no enabled key"):  # the experiment guide's defaults
        empty = de.CheckpointConfig.from_yaml(write(tmp_path, "checkpoint:\n"))
    assert empty == de.CheckpointConfig(enabled=False, save_every_n_epochs=10)


@pytest.mark.parametrize(
    "block, error, message",
    [
        (
            {"save_frequncy": 5},
            de.UnknownKeyError,
            "unknown key 'save_frequncy' in .*did you mean 'save_frequency'",
        ),
        ({"keep_topk": 3}, de.UnknownKeyError, "did you mean 'keep_top_k'"),
        ({"zzz": 1}, de.UnknownKeyError, "unknown key 'zzz' in [^;]*$"),
        ({"dir": "a", "save_dir": "b"}, de.ConfigError, "one of 'dir' and 'save_dir', not both"),
        ({"save_frequency": -1}, de.ConfigError, r"checkpoint\.save_frequency=-1 .*>= 0"),
        ({"save_freq": "often"}, de.ConfigError, r"checkpoint\.save_freq='often'"),
        ({"mode": "minimum"}, de.ConfigError, r"checkpoint\.mode='minimum'.*'min', 'max'"),
        ({"keep_top_k": 3}, de.ConfigError, r"checkpoint\.keep_top_k=3 .*set monitor"),
        ({"resume": "best"}, de.ConfigError, r"checkpoint\.resume='best' .*set monitor"),
        ({"resume": 5}, de.ConfigError, r"checkpoint\.resume=5 .*'latest', 'best' or a path"),
        ({"enabled": "yes"}, de.ConfigError, r"checkpoint\.enabled='yes' .*True or False"),
        ({"save_every_n_seconds": -2}, de.ConfigError, r"checkpoint\.save_every_n_seconds"),
        ({"keep_last_n": 1.5}, de.ConfigError, r"checkpoint\.keep_last_n=1\.5"),
        ({"dir": ""}, de.ConfigError, r"checkpoint\.dir=''"),
        ({"experiment_name": "a/b"}, de.ConfigError, r"checkpoint\.experiment_name='a/b'"),
    ],
)
def test_each_bad_key_or_value_has_its_own_clear_error(block, error, message):
    with pytest.raises(error, match=message):
        de.CheckpointConfig.from_dict(block)


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(de.UnknownKeyError, match=r"config\.yaml: checkpoint"):
        de.CheckpointConfig.from_yaml(write(tmp_path, "checkpoint:\n  sav_best: true\n"))
    with pytest.raises(de.ConfigError, match=r"config\.yaml"):
        de.CheckpointConfig.from_yaml(write(tmp_path, "checkpoint: [1, 2\n"))
    with pytest.raises(de.ConfigError, match="a mapping"):
        de.CheckpointConfig.from_yaml(write(tmp_path, "checkpoint: [1, 2]\n"))
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        de.CheckpointConfig.from_yaml(tmp_path / "nope.yaml")
