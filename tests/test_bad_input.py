"""Bad input fails fast with one clear line (or is a counted skip, see test_data_and_cache.py)."""

import importlib.util

import pytest

from conftest import both_trainers, run_cli, run_trainer, tiny_assets


@pytest.mark.parametrize("flags,message", [
    ({"resolution": 36}, "--resolution must be a positive multiple of 8"),
    ({"max_train_samples": 0}, "--max_train_samples must be at least 1"),
    ({"lr_warmup_steps": -1}, "--lr_warmup_steps must not be negative"),
    ({"loss_type": "kto"}, "invalid choice: 'kto'"),
    ({"lr_scheduler": "warmup_cosine"}, "invalid choice: 'warmup_cosine'"),
    ({"max_train_steps": 0}, "--max_train_steps must be at least 1"),
    ({"resume_from_checkpoint": "checkpoint-99"}, "no such checkpoint folder"),
    ({"report_to": "wandb", "hub_token": "hf_secret"}, "would log your token"),
    ({"enable_xformers_memory_efficient_attention": True}, "needs xformers"),
    ({"use_8bit_adam": True, "use_adafactor": True}, "choose one of --use_8bit_adam and --use_adafactor"),
], ids=["resolution", "max_train_samples", "warmup", "loss_type", "scheduler", "zero-steps", "resume-path", "wandb-token", "xformers", "optimizers"])
@both_trainers
def test_flag_errors_stop_before_anything_loads(dpo, cli_args, capsys, flags, message):
    if "enable_xformers_memory_efficient_attention" in flags and dpo.is_xformers_available():
        pytest.skip("xformers is installed here")
    with pytest.raises(SystemExit) as exit_info:
        dpo.parse_args(cli_args(**flags))
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, no usage dump
    assert message in line


def test_8bit_adam_without_bitsandbytes(dpo, cli_args, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(SystemExit):
        dpo.parse_args(cli_args(use_8bit_adam=True))
    assert "--use_8bit_adam needs `pip install bitsandbytes`" in capsys.readouterr().err


def test_an_earlier_run_is_never_overwritten(dpo, cli_args, capsys):
    run_trainer(dpo, cli_args(max_train_steps=1))
    with pytest.raises(SystemExit):
        dpo.parse_args(cli_args(max_train_steps=1))
    assert "already holds a trained model" in capsys.readouterr().err


def test_resume_needs_a_checkpoint_folder_and_never_restarts_over_a_finished_model(dpo, cli_args, tmp_path, capsys):
    run_trainer(dpo, cli_args(max_train_steps=1, checkpointing_steps=5))  # finished, no checkpoint written
    with pytest.raises(SystemExit):
        dpo.parse_args(cli_args(resume_from_checkpoint="latest"))
    assert "holds a finished model but no checkpoint" in capsys.readouterr().err
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(SystemExit):
        dpo.parse_args(cli_args(resume_from_checkpoint=tmp_path / "not-a-checkpoint"))
    assert "expected a folder named checkpoint-<step>" in capsys.readouterr().err


def test_missing_columns_are_named(dpo, cli_args):
    with pytest.raises(dpo.InputError, match=r"lacks column\(s\) \['prompt'\]"):
        run_trainer(dpo, cli_args(caption_column="prompt"))


def test_a_split_of_only_ties_is_refused(dpo, cli_args, tmp_path):
    only_ties = tiny_assets.build_pickapic_dataset(str(tmp_path / "ties"), n_pairs=0, n_ties=3)
    with pytest.raises(dpo.InputError, match="no preference pairs left after dropping 3 ties"):
        run_trainer(dpo, cli_args(dataset_name=only_ties))


def test_an_unloadable_dataset_names_the_alternatives(dpo, cli_args, tmp_path):
    with pytest.raises(dpo.InputError, match="cannot load dataset .*liuhuohuo2/pick-a-pic-v2"):
        run_trainer(dpo, cli_args(dataset_name=str(tmp_path / "no-such-dataset")))


@both_trainers
def test_the_command_line_prints_one_line_and_no_traceback(dpo, cli_args):
    completed = run_cli(dpo, cli_args(caption_column="prompt"))
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("error: dataset")
