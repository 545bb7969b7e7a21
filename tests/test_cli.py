"""Issue 27: the command line meets users where they are -- every flag's help shows its default, `m3jax --version`,
timestamped log lines, and FlagEmbedding's bare flags answered with their m3jax spelling (exit 2, one line)."""
import argparse
import os
import re
import subprocess
import sys

import pytest

from m3jax.cli import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_flag_of_every_subcommand_has_help_and_shows_its_default():
    commands = _subparsers()
    assert set(commands) == {"train", "export", "eval", "mine", "score", "merge", "plan"}
    missing = []
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            shown = formatter._expand_help(action) if action.help else ""
            if not action.help or "(default: None)" in shown or not (action.required or "default" in shown.lower()):
                missing.append(f"{name} {'/'.join(action.option_strings)}: {shown!r}")
        assert "(default: " in sub.format_help() or name == "train"
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("command, flag, shown", [
    ("merge", "--query-max-len", "(default: 512)"), ("merge", "--batch-size", "(default: 64)"),
    ("merge", "--metrics", "(default: ndcg@10,recall@100,mrr@10)"), ("eval", "--query-instruction-format",
                                                                    "(default: {}{})"),
    ("eval", "--passage-max-len", "(default: 512)"), ("export", "--step", "(default: the latest complete step)")])
def test_help_texts_the_issue_named(command, flag, shown, capsys):
    sub = _subparsers()[command]
    action = next(a for a in sub._actions if flag in a.option_strings)
    assert sub._get_formatter()._expand_help(action).endswith(shown)
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0 and shown in " ".join(capsys.readouterr().out.split())


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"m3jax {metadata.version('m3jax')}"


def test_log_lines_are_timestamped():
    code = "from m3jax.cli import main as cli; cli.configure_logging(); import logging; logging.getLogger('m3jax.x').info('hi')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO m3jax\.x: hi\n", out.stderr), out.stderr


# ---------------------------------------------------------------------------------------------------------------
# FlagEmbedding's flags


@pytest.mark.parametrize("argv, message", [
    (["--model_name_or_path", "/models/bge-m3"], "--model_name_or_path: m3jax takes config fields as "
                                                 "--config.<field>=<value>: use --config.model_name_or_path=/models/bge-m3"),
    (["--train_data=data/a,data/b"], "use --config.train_data=data/a,data/b"),
    (["--output_dir", "runs/x"], "use --config.output_dir=runs/x"),
    (["--output-dir", "runs/x"], "use --config.output_dir=runs/x"),
    (["--learning_rate", "1e-5"], "use --config.learning_rate=1e-5"),
    (["--per_device_train_batch_size", "4"], "use --config.per_device_train_batch_size=4"),
    (["--negatives_cross_device"], "use --config.negatives_cross_device=True"),
    (["--same_task_within_batch", "True"], "use --config.same_dataset_within_batch=True"),
    (["--fp16"], "use --config.model.dtype=bfloat16"),
    (["--gradient_checkpointing"], "use --config.model.remat_policy=full"),
    (["--deepspeed", "ds.json"], "FlagEmbedding's --deepspeed is not needed in m3jax"),
])
def test_flagembedding_flags_get_the_m3jax_spelling(argv, message, capsys):
    assert cli.main(["train", "--config", os.path.join(REPO, "configs", "toy.py"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m3jax train: error: ") and message in err[0], err


def test_plan_answers_a_flagembedding_flag_too(capsys):
    assert cli.main(["plan", "--config", os.path.join(REPO, "configs", "toy.py"), "--passage_max_len", "512"]) == 2
    assert capsys.readouterr().err.strip() == ("m3jax plan: error: --passage_max_len: m3jax takes config fields as "
                                               "--config.<field>=<value>: use --config.passage_max_len=512")


def test_train_py_answers_a_flagembedding_flag_in_one_line():
    out = subprocess.run([sys.executable, "train.py", "--model_name_or_path", "/m", "--config", "configs/toy.py"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if "error" in line]
    assert lines == ["m3jax train: error: --model_name_or_path: m3jax takes config fields as --config.<field>=<value>: "
                     "use --config.model_name_or_path=/m"], out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------------------------
# limits checked before work (issue 27, part 3)


def _train(tiny_ckpt, tmp_path, *overrides):
    return cli.main(["train", "--config", os.path.join(REPO, "configs", "toy.py"),
                     f"--config.model_name_or_path={tiny_ckpt}", f"--config.output_dir={tmp_path / 'run'}",
                     "--config.mesh.data=1", *overrides])


@pytest.mark.parametrize("override, message", [
    ("--config.passage_max_len=1024", "config.passage_max_len=1024: expected at most 512, the model's position limit "
                                      "(max_position_embeddings 514 - 2 for XLM-R's padding offset)"),
    ("--config.query_max_len=4096", "config.query_max_len=4096: expected at most 512"),
    ("--config.eval.passage_max_len=600", "config.eval.passage_max_len=600: expected at most 512"),
])
def test_max_lengths_beyond_the_models_positions_stop_at_start(tiny_ckpt, tmp_path, capsys, override, message):
    assert _train(tiny_ckpt, tmp_path, override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"m3jax train: error: {message}"), err
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (ckpts.exists() and os.listdir(ckpts)) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_output_dir_that_is_a_file(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    assert _train(tiny_ckpt, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"m3jax train: error: config.output_dir='{tmp_path / 'run'}': expected a directory to write "
                   f"checkpoints and logs to (this is an existing file)"]


def test_eval_max_length_beyond_the_models_positions(tiny_ckpt, capsys):
    toy = os.path.join(REPO, "toy_eval_data")
    assert cli.main(["eval", "--model", str(tiny_ckpt), "--corpus", f"{toy}/corpus.jsonl", "--queries",
                     f"{toy}/queries.jsonl", "--qrels", f"{toy}/qrels.tsv", "--devices", "cpu",
                     "--passage-max-len", "600"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "m3jax eval: error: --passage-max-len=600: at most 512, the model's position limit (max_position_embeddings "
        "514 - 2 for XLM-R's padding offset)"]


@pytest.mark.parametrize("value", ["big", "0"])
def test_a_bad_gradient_cache_chunk_size_is_one_line_and_exit_2(tiny_ckpt, tmp_path, capsys, value):
    assert _train(tiny_ckpt, tmp_path, "--config.gradient_cache=True",
                  f"--config.gradient_cache_chunk_size={value}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    shown = repr(value) if value == "big" else value
    assert err == [f"m3jax train: error: config.gradient_cache_chunk_size={shown}: expected 'auto' (chosen per step "
                   "shape by memory) or a positive int (rows per device per chunk)"], err
