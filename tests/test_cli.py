import subprocess
import sys

from typer.testing import CliRunner

from lm2cli.cli import app

runner = CliRunner()

SUBCOMMANDS = ["prepare", "tokenize", "pretrain", "extend-context", "sft", "rlhf", "eval", "needle", "status", "quickstart",
               "generate", "chat", "export", "plan"]
NESTED = ["prepare train-classifier", "tokenize build-vocab", "rlhf reward", "rlhf ppo", "rlhf online",
          "eval ppl", "eval opencompass", "eval needle"]


def _lm2(*args):
    return subprocess.run([sys.executable, "-m", "lm2cli.cli", *args], capture_output=True, text=True)


def test_help_lists_all_subcommands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in SUBCOMMANDS:
        assert cmd in res.output


def test_every_subcommand_has_help():
    for cmd in SUBCOMMANDS + NESTED:
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


def test_status_shows_lineage(tmp_path):
    import json

    from lm2cli.layout import Workspace, write_manifest

    ws = Workspace(tmp_path)
    write_manifest(ws.prepared, "prepared", stats={"kept": 10, "rejected": 2})
    write_manifest(ws.tokens, "tokens", inputs=[ws.prepared], stats={"tokens": 1234})
    res = runner.invoke(app, ["status", "--workdir", str(tmp_path), "--json"])
    assert res.exit_code == 0
    info = json.loads(res.output)
    by_path = {a["path"]: a for a in info["artefacts"]}
    assert by_path["data/tokens"]["lineage"] == ["data/prepared"]
    assert by_path["data/tokens"]["headline"] == {"tokens": 1234}
    res = runner.invoke(app, ["status", "--workdir", str(tmp_path)])
    assert res.exit_code == 0 and "tokens" in res.output and "prepared" in res.output


def test_export_cli_refuses_non_checkpoint(tmp_path):
    from lm2cli.layout import write_manifest

    write_manifest(tmp_path / "tok", "tokens")
    p = _lm2("export", str(tmp_path / "tok"), "--out", str(tmp_path / "out"), "--format", "llama")
    assert p.returncode == 2
    assert "not a model checkpoint" in p.stderr and not (tmp_path / "out").exists()
