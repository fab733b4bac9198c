"""`--dry-run` on every training command of the full-scale recipes: the model at full shape on the meta
device, the DeepSpeed config, the first global batch and the memory per rank, with exit 0 only when the
real run could start (on the stand-in inputs of `_full_scale`), and a one-line reason when it could not."""

from __future__ import annotations

import json

import pytest
from _full_scale import build_tokens, full_scale_workspace, tokenizer_with_vocab
from typer.testing import CliRunner

from lm2cli.cli import app
from lm2cli.errors import InputError
from lm2cli.layout import Workspace

RECIPES = {"internlm2-1_8b": 1.89, "internlm2-7b": 7.74, "internlm2-20b": 19.86}
COMMANDS = {
    "pretrain-1": ["pretrain", "--stage", "1", "--nproc", "8"],
    "pretrain-2": ["pretrain", "--stage", "2", "--nproc", "8"],
    "pretrain-3": ["pretrain", "--stage", "3", "--nproc", "8"],
    "extend-context": ["extend-context"],
    "sft": ["sft"],
    "rlhf-reward": ["rlhf", "reward"],
    "rlhf-ppo": ["rlhf", "ppo"],
}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(tokens folder, tokenizer) with the recipes' 92,544-id vocabulary, built once."""
    root = tmp_path_factory.mktemp("stand-in")
    tok = tokenizer_with_vocab(92_544)
    return build_tokens(root, tok), tok


@pytest.fixture(scope="module")
def workspaces(stand_in, tmp_path_factory):
    from lm2cli.config import load_recipe

    tokens, tok = stand_in
    return {name: full_scale_workspace(tmp_path_factory.mktemp(name), load_recipe(name), tokens, tok)
            for name in RECIPES}


def refused(res) -> str:
    """In-process, lm2's `InputError` reaches the runner (`lm2` itself prints it and exits 2)."""
    assert isinstance(res.exception, InputError) and res.exception.exit_code == 2, res.output[-2000:]
    return str(res.exception)


def dry_run(ws: Workspace, recipe: str, args: list[str], *extra: str, hostfile=None):
    cmd = [*args, "--recipe", recipe, "--workdir", str(ws.root), "--dry-run", "--json", *extra]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    return CliRunner().invoke(app, cmd)


@pytest.fixture(scope="module")
def eight_gpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("hosts") / "hostfile"
    path.write_text("# one node of 8 GPUs\nnode-0 slots=8\n")
    return path


@pytest.mark.timeout(900)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_command_of_the_full_scale_recipes_could_start(recipe, workspaces, eight_gpus):
    ws = workspaces[recipe]
    for name, args in COMMANDS.items():
        res = dry_run(ws, recipe, args, hostfile=None if name.startswith("pretrain") else eight_gpus)
        assert res.exit_code == 0, f"{name}: {res.output[-2000:]}"
        report = json.loads(res.stdout)
        assert report["could_start"] and report["world_size"] == 8 and not report["problems"]
        assert all(i["found"] for i in report["inputs"]), name
        backbone = report["models"][0]
        # The reward model adds its scalar head (hidden_size parameters) to the backbone.
        assert backbone["params_b"] == RECIPES[recipe], (name, backbone["params"])
        assert report["deepspeed"]["train_batch_size"] == report["deepspeed"]["train_micro_batch_size_per_gpu"] * \
            report["deepspeed"]["gradient_accumulation_steps"] * 8
        assert report["memory"] and report["writes"]
        if name == "pretrain-2":  # half the sequences from documents longer than stage 1's context (exactly
            batch = report["batch"]  # half per block of 1,024 samples, seeded order within it)
            assert batch["source"].endswith("tokens") and 0.35 < batch["long_sequences"] / batch["sequences"] < 0.65
            assert batch["tokens"] == batch["sequences"] * 32768 and 0 < batch["target_tokens"] < batch["tokens"]
        if name == "rlhf-ppo":
            assert [m["role"] for m in report["models"]] == ["actor", "reference", "critic", "reward model"]


def test_param_counts_match_the_released_shapes():
    from lm2cli.config import load_recipe
    from lm2cli.dryrun import meta_model

    shapes = {"internlm2-1_8b": (2048, 24, 16, 8, 8192), "internlm2-7b": (4096, 32, 32, 8, 14336),
              "internlm2-20b": (6144, 48, 48, 8, 16384)}
    for name, want in shapes.items():
        m = load_recipe(name).model
        assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads,
                m.intermediate_size, m.vocab_size) == (*want, 92544)
        summary, _ = meta_model(m)
        assert round(summary["params"] / 1e9, 2) == RECIPES[name]


def test_missing_inputs_are_reported_and_everything_else_still_evaluated(tmp_path):
    res = dry_run(Workspace(tmp_path / "empty"), "internlm2-7b", ["pretrain", "--stage", "2", "--nproc", "8"])
    reason = refused(res)
    report = json.loads(res.stdout)
    assert not report["could_start"]
    missing = [p for p in report["problems"] if p.startswith("input missing: would read")]
    assert len(missing) == 2 and "data/tokens" in missing[0] and "pretrain-stage1/final" in missing[1]
    assert report["models"][0]["params_b"] == 7.74 and report["deepspeed"]["zero_optimization"]["stage"] == 3
    assert report["batch"]["source"] == "config (no token shards)" and report["memory"]["train"]["gib"]["total"] > 0
    assert reason == f"dry run: the real run could not start: {report['problems'][0]} (and 1 more above)"


def test_the_command_exits_2_with_one_line_on_stderr(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "lm2cli.cli", "sft", "--recipe", "internlm2-1_8b", "--dry-run",
                        "--workdir", str(tmp_path / "empty")], capture_output=True, text=True)
    assert p.returncode == 2
    assert [line for line in p.stderr.splitlines() if line.strip()] == [
        "lm2: error: dry run: the real run could not start: input missing: would read model "
        f"{tmp_path / 'empty' / 'runs' / 'default' / 'pretrain-stage3' / 'final'} (run `lm2 pretrain` first)"]
    assert "could not start" in p.stdout


@pytest.mark.parametrize("args, extra, reason", [
    (["pretrain", "--stage", "1", "--nproc", "4"], [], "world size 4 is not a multiple of hpz_partition_size 8"),
    (["pretrain", "--stage", "1", "--nproc", "8"], ["--set", "model.vocab_size=92416"],
     "model.vocab_size 92416 is smaller than the tokenizer's 92544"),
    (["pretrain", "--stage", "2", "--nproc", "8"], ["--set", "pretrain.stage2.hpz_partition_size=3"],
     "world size 8 is not a multiple of hpz_partition_size 3"),
    (["sft"], ["--data", "nope.jsonl"], "nope.jsonl does not exist"),
    (["rlhf", "ppo", "--nproc", "8"], ["--set", "rlhf.ppo.prompts_per_iteration=500"], "does not split over 8 ranks"),
])
def test_a_run_that_could_not_start_exits_nonzero_with_its_reason(args, extra, reason, workspaces):
    res = dry_run(workspaces["internlm2-1_8b"], "internlm2-1_8b", args, *extra)
    first = refused(res)
    report = json.loads(res.stdout)
    assert report["problems"] and reason in report["problems"][0] and reason in first


def test_a_checkpoint_of_another_shape_is_caught_from_its_header(workspaces, tmp_path, stand_in):
    from _full_scale import placeholder_checkpoint

    from lm2cli.config import load_recipe
    from lm2cli.pretrain import model_config, stage_config

    _, tok = stand_in
    recipe = load_recipe("internlm2-1_8b", ["model.num_hidden_layers=2"])
    wrong = placeholder_checkpoint(tmp_path / "pretrain-stage1", model_config(recipe, stage_config(recipe, 1), tok), tok)
    res = dry_run(workspaces["internlm2-1_8b"], "internlm2-1_8b", ["pretrain", "--stage", "2", "--nproc", "8"],
                  "--from", str(wrong.parent))
    assert res.exit_code == 0  # --from decides the shape: a 2-layer stage 1 continues as a 2-layer stage 2
    assert json.loads(res.stdout)["models"][0]["config"]["num_hidden_layers"] == 2
    (wrong / "config.json").write_text((wrong / "config.json").read_text().replace('"num_hidden_layers": 2',
                                                                                   '"num_hidden_layers": 3'))
    res = dry_run(workspaces["internlm2-1_8b"], "internlm2-1_8b", ["pretrain", "--stage", "2", "--nproc", "8"],
                  "--from", str(wrong))
    refused(res)
    assert any("weights lack model.layers.2" in p for p in json.loads(res.stdout)["problems"])
    (wrong / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json")  # a partial download
    res = dry_run(workspaces["internlm2-1_8b"], "internlm2-1_8b", ["pretrain", "--stage", "2", "--nproc", "8"],
                  "--from", str(wrong))
    assert "unreadable safetensors header" in refused(res)


def test_human_readable_report_names_model_memory_and_outputs(workspaces):
    ws = workspaces["internlm2-7b"]
    res = CliRunner().invoke(app, ["pretrain", "--stage", "2", "--recipe", "internlm2-7b", "--workdir", str(ws.root),
                                   "--nproc", "8", "--dry-run"])
    assert res.exit_code == 0, res.output[-2000:]
    out = res.stdout
    assert "7.74B parameters" in out and "could start" in out and "memory per rank" in out
    assert "would write" in out and "pretrain-stage2" in out


def test_hostfile_sets_the_world_size(tmp_path):
    from lm2cli.dryrun import world_size
    from lm2cli.errors import InputError

    hosts = tmp_path / "hostfile"
    hosts.write_text("worker-1 slots=8\nworker-2 slots=8  # second node\n\n")
    assert world_size(None, hosts) == (16, 8)
    hosts.write_text("worker-1 gpus=8\n")
    with pytest.raises(InputError, match="expected `hostname slots=N`"):
        world_size(None, hosts)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("recipe", ["internlm2-1_8b", "internlm2-7b"])
def test_the_1_8b_and_7b_recipes_fit_8_gpus_of_80_gb_at_every_stage(recipe, workspaces, eight_gpus):
    """Issue 15's sizing: every command's memory per rank (lm2 plan's model of this layout) within an A100-80."""
    for name, args in COMMANDS.items():
        res = dry_run(workspaces[recipe], recipe, args, "--gpu", "A100-80",
                      hostfile=None if name.startswith("pretrain") else eight_gpus)
        assert res.exit_code == 0, f"{name}: {res.output[-2000:]}"
        report = json.loads(res.stdout)
        assert report["gpu"] == "A100-80" and report["capacity_gib"] == 80.0
        assert all(m["gib"]["total"] <= 80.0 for m in report["memory"].values()), (name, report["memory"])


def test_memory_over_the_gpu_is_a_reason_not_to_start(workspaces):
    res = dry_run(workspaces["internlm2-7b"], "internlm2-7b", ["pretrain", "--stage", "2", "--nproc", "8"],
                  "--gpu", "A100-40", "--set", "pretrain.stage2.activation_checkpointing=false")
    reason = refused(res)
    assert "per rank, the A100-40 has 40 GiB" in reason


def test_plan_picks_the_layout_for_the_gpu_named(workspaces):
    from lm2cli import plan
    from lm2cli.config import load_recipe

    ws = workspaces["internlm2-7b"]
    res = dry_run(ws, "internlm2-7b", ["pretrain", "--stage", "2", "--nproc", "8", "--plan"], "--gpu", "H100-80")
    assert res.exit_code == 0, res.output[-2000:]
    chosen = plan.best_layout(load_recipe("internlm2-7b"), plan.cluster(8, 8, "H100-80"), 2).layout
    ds = json.loads(res.stdout)["deepspeed"]
    assert ds["zero_optimization"]["stage"] == chosen.zero_stage
    assert ds["gradient_accumulation_steps"] == chosen.grad_accum
    assert "--gpu PRESET" in refused(dry_run(ws, "internlm2-7b", ["pretrain", "--stage", "2", "--nproc", "8", "--plan"]))


def test_ppo_refuses_a_reward_model_as_policy_and_a_policy_as_reward_model(workspaces):
    ws = workspaces["internlm2-1_8b"]
    res = dry_run(ws, "internlm2-1_8b", ["rlhf", "ppo"], "--from", str(ws.stage_dir("rlhf-reward")),
                  "--reward", str(ws.stage_dir("sft")))
    refused(res)
    problems = json.loads(res.stdout)["problems"]
    assert any("is a reward model; the policy starts from an SFT checkpoint" in p for p in problems)
    assert any("is a plain checkpoint (no reward head)" in p for p in problems)


def test_what_the_dry_run_predicts_is_what_the_run_does(tmp_path):
    """On a tiny real workspace: the dry run's DeepSpeed config, parameter count and first global batch size are
    the ones the real stage then uses, and it reports the stage folder the run then writes."""
    from _train_ws import TINY_MODEL
    from _train_ws import build_tokens as tiny_tokens

    from lm2cli.config import load_recipe
    from lm2cli.convert import load_model
    from lm2cli.pretrain import run_pretrain
    from lm2cli.train.loop import read_metrics

    ws = Workspace(tmp_path / "ws")
    tiny_tokens(ws.root)
    sets = TINY_MODEL + ["pretrain.stage1.seq_len=32", "pretrain.stage1.max_steps=1", "pretrain.stage1.grad_accum=2",
                         "pretrain.stage1.eval_batches=0"]
    args = ["pretrain", "--stage", "1"] + [x for s in sets for x in ("--set", s)]
    res = dry_run(ws, "tiny", args)
    assert res.exit_code == 0, res.output[-2000:]
    report = json.loads(res.stdout)
    stage = run_pretrain(ws, load_recipe("tiny", sets), 1)
    assert report["writes"] == [str(stage)]
    assert json.loads((stage / "deepspeed.json").read_text()) == report["deepspeed"]
    assert load_model(stage / "final").num_params() == report["models"][0]["params"]
    first = [r for r in read_metrics(stage / "metrics.jsonl") if "loss" in r][0]
    assert first["tokens"] == report["batch"]["tokens"] == 8 * 2 * 32
    again = json.loads(dry_run(ws, "tiny", args).stdout)  # the finished stage would be resumed, and says so
    assert any("--resume auto continues from step-00000001" in n for n in again["notes"]), again["notes"]


def test_a_released_hf_folder_without_a_manifest_is_an_input(tmp_path_factory, tmp_path):
    """internlm2-chat's layout (sharded bf16 safetensors with an index, SentencePiece tokenizer, no lm2
    manifest) as `sft --from`: read as an HF folder, its shards' headers checked, its own tokenizer used."""
    from _released import TINY, VOCAB, released_folder, session_spm

    folder = released_folder(tmp_path / "internlm2-chat-tiny", session_spm(tmp_path_factory))
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "manifest.json").exists()
    res = dry_run(Workspace(tmp_path / "ws"), "tiny", ["sft", "--from", str(folder)])
    assert res.exit_code == 0, res.output[-2000:]
    report = json.loads(res.stdout)
    assert report["inputs"][0] == {"what": "model", "path": str(folder.resolve()), "found": True, "detail": "hf"}
    config = report["models"][0]["config"]
    assert (config["hidden_size"], config["vocab_size"]) == (TINY["hidden_size"], VOCAB)
    assert report["batch"]["target_tokens"] > 0
