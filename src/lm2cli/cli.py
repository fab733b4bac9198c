"""The `lm2` command line: one thin function per subcommand.

Each command parses its options, resolves the recipe and the workspace, and calls one library
function. Errors from the library become one line on stderr and an exit code: 2 for bad input or
usage, 1 for a failure while working. Heavy libraries (torch, deepspeed, opencompass) are imported
inside the commands that need them, so `lm2 --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer
from typer.core import TyperGroup

from . import __version__
from .errors import Lm2Error, NotLanded

app = typer.Typer(
    name="lm2",
    help="The InternLM2 training recipe, end to end: prepare → tokenize → pretrain → extend-context → sft → "
    "rlhf → eval. Every command reads and writes artefacts in one workspace (--workdir, $LM2_WORKDIR, "
    "or ./lm2-work).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options every command shares. Typer reads them from function signatures, so they are defined once here.
WorkdirOpt = typer.Option(None, "--workdir", "-w", help="Workspace root (default: $LM2_WORKDIR or ./lm2-work).")
RunOpt = typer.Option("default", "--run", help="Run name: artefacts go under runs/<run>/ and eval/<run>/.")
RecipeOpt = typer.Option("tiny", "--recipe", "-r", help="Recipe name in recipes/ or a YAML path.")
SetOpt = typer.Option(None, "--set", help="Override a recipe key, e.g. --set pretrain.stage1.lr=3e-4 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print a machine-readable summary on stdout.")
DryRunOpt = typer.Option(False, "--dry-run", help="Resolve the recipe, inputs, model (meta device), DeepSpeed "
                         "config, first global batch, memory per rank and outputs; print them and exit 0 only if "
                         "the real run could start. Nothing is trained or written.")
HostfileOpt = typer.Option(None, "--hostfile", help="With --dry-run: a DeepSpeed hostfile (`host slots=N` lines) "
                           "whose slots are the world size to check.")
GpuOpt = typer.Option(None, "--gpu", help="With --dry-run: check the memory per rank against this GPU (A100-40, "
                      "A100-80, H100-80, H200-141; default: the local GPU, if any).")


def _recipe(recipe: str, overrides: Optional[List[str]]):
    from .config import load_recipe

    return load_recipe(recipe, overrides or [])


def _not_landed(command: str, issue: str) -> None:
    raise NotLanded(f"`lm2 {command}` has not landed yet ({issue}); nothing was done")


@app.callback(invoke_without_command=True)
def _main(
    version: bool = typer.Option(False, "--version", help="Print the lm2 version and exit."),
) -> None:
    if version:
        typer.echo(f"lm2 {__version__}")
        raise typer.Exit(0)


# ---------------------------------------------------------------------------------------------------
# prepare


class _PrepareGroup(TyperGroup):
    """`lm2 prepare FILES...` and `lm2 prepare train-classifier ...` share one group: a subcommand name in
    first position must not be swallowed by the group's FILES argument."""

    def parse_args(self, ctx, args):
        if args and args[0] in self.commands:
            super().parse_args(ctx, [])
            if hasattr(ctx, "_protected_args"):
                ctx._protected_args = args[:1]
            else:  # click < 8.2
                ctx.protected_args = args[:1]
            ctx.args = args[1:]
            return ctx.args
        return super().parse_args(ctx, args)


prepare_app = typer.Typer(
    cls=_PrepareGroup,
    help="Data pipeline (InternLM2 §3.1): standardize → classify → rule filters → MinHash-LSH dedup → safety → "
    "quality. Reads files/folders of .jsonl/.json/.txt/.md/.html/code (also .gz/.zst); writes "
    "<workdir>/data/prepared/: kept/part-XXXXX.jsonl, rejected/<stage>/part-XXXXX.jsonl (with stage and reason) "
    "and manifest.json (per-stage in/kept/rejected, reason histograms, per-language/type counts and bytes).",
    no_args_is_help=False,
    context_settings={"allow_interspersed_args": True},
)
app.add_typer(prepare_app, name="prepare")


EngineOpt = typer.Option(None, "--engine", help="Where tasks run: local (a process pool, default) or ray (a Ray "
                         "cluster; same output). Default: the recipe's engine.")
RayAddressOpt = typer.Option(None, "--ray-address", help="--engine ray: auto (the cluster `ray start` runs on "
                             "this machine, default) or HOST:PORT of its head.")


@prepare_app.callback(invoke_without_command=True)
def prepare(
    ctx: typer.Context,
    inputs: Optional[List[Path]] = typer.Argument(None, help="Files or folders (default: the bundled examples corpus)."),
    workdir: Optional[Path] = WorkdirOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    type_: Optional[List[str]] = typer.Option(
        None, "--type", help="PATH_GLOB=web|book|paper|patent|code|other: content type for matching sources whose "
        "metadata does not say (repeatable), e.g. --type '*/papers/*=paper'."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, help="Worker processes (default: recipe)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/N: run only tasks t with t % N == i of the "
                                        "per-document stages; a run without --shard then dedups and finishes."),
    force: bool = typer.Option(False, "--force", help="Redo everything instead of resuming finished work."),
    engine: Optional[str] = EngineOpt,
    ray_address: Optional[str] = RayAddressOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Run the data pipeline into <workdir>/data/prepared/ (resumes unfinished work)."""
    if ctx.invoked_subcommand:
        return
    from .data.pipeline import prepare_main

    prepare_main(inputs, workdir, _recipe(recipe, set_), type_ or [], workers=workers, shard=shard, force=force,
                 json_out=json_out, engine=engine, ray_address=ray_address)


@prepare_app.command("train-classifier")
def prepare_train_classifier(
    labels: Path = typer.Option(..., "--labels", help="Labelled JSONL: {\"text\": ..., \"label\": 0|1} per line."),
    name: str = typer.Option(..., "--name", help="ad (1 = ad), fluency (1 = fluent) or toxic (1 = toxic)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Model file (default: <workdir>/data/classifiers/<name>.npz, "
                                       "which lm2 prepare picks up by itself)."),
    workdir: Optional[Path] = WorkdirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Train a hashed n-gram logistic-regression classifier for the safety/quality stages."""
    from .data.pipeline import train_classifier_main

    train_classifier_main(labels, name, out, workdir, json_out=json_out)


# ---------------------------------------------------------------------------------------------------
# tokenize


tokenize_app = typer.Typer(
    help="Tokenize prepared JSONL into binary token shards at <workdir>/data/tokens/ (split by language and "
    "content type, held-out validation split); `build-vocab` builds the InternLM2-style vocabulary into "
    "<workdir>/tokenizer/.",
)
app.add_typer(tokenize_app, name="tokenize")


WorkersOpt = typer.Option(None, "--workers", "-j", min=1,
                          help="Worker processes (default: tokenize.workers; 0 there = one per core).")
PreparedOpt = typer.Option(None, "--input", "-i", help="Prepared folder to read (default: <workdir>/data/prepared).")


@tokenize_app.callback(invoke_without_command=True)
def tokenize(
    ctx: typer.Context,
    workdir: Optional[Path] = WorkdirOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    workers: Optional[int] = WorkersOpt,
    force: bool = typer.Option(False, "--force", help="Redo everything, even up-to-date shards or finished chunks."),
    input_: Optional[Path] = PreparedOpt,
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="A saved tokenizer folder, or `cl100k` "
                                            "(default: <workdir>/tokenizer/ when built, else cl100k)."),
    engine: Optional[str] = EngineOpt,
    ray_address: Optional[str] = RayAddressOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Write <workdir>/data/tokens/ from <workdir>/data/prepared/ (resumes unfinished work)."""
    if ctx.invoked_subcommand:
        return
    from .layout import Workspace
    from .tokens import run_tokenize

    run_tokenize(Workspace.at(workdir), _recipe(recipe, set_), prepared=input_, tokenizer=tokenizer, workers=workers,
                 force=force, json_out=json_out, engine=engine, ray_address=ray_address)


@tokenize_app.command("build-vocab")
def build_vocab(
    workdir: Optional[Path] = WorkdirOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    workers: Optional[int] = WorkersOpt,
    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer/ built from another config."),
    input_: Optional[Path] = PreparedOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Build the InternLM2-style vocabulary (cl100k top-N + zh BPE + spares) into <workdir>/tokenizer/."""
    from .layout import Workspace, artefact_lock
    from .tokenizer import run_build_vocab

    ws = Workspace.at(workdir)
    with artefact_lock(ws.tokenizer):
        run_build_vocab(ws, _recipe(recipe, set_), prepared=input_, workers=workers, force=force, json_out=json_out)


# ---------------------------------------------------------------------------------------------------
# training stages


@app.command()
def pretrain(
    stage: int = typer.Option(1, "--stage", min=1, max=3, help="1: short context; 2: long context; 3: capability data."),
    workdir: Optional[Path] = WorkdirOpt,
    run: str = RunOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    resume: str = typer.Option("auto", "--resume", help="auto: continue from the newest whole checkpoint; never: "
                               "start over (removes old checkpoints); or a checkpoints/step-XXXXXXXX folder."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Local data-parallel ranks (re-executes under "
                              "torch.distributed.run). Multi-node: start under DeepSpeed's launcher (README)."),
    from_: Optional[Path] = typer.Option(None, "--from", help="Stages 2-3: the checkpoint (or stage folder) to "
                                         "start from (default: the previous stage's final/ in this run)."),
    plan: bool = typer.Option(False, "--plan", help="Take micro-batch, accumulation, ZeRO stage and activation "
                              "checkpointing from `lm2 plan`'s fastest layout that fits."),
    dry_run: bool = DryRunOpt,
    hostfile: Optional[Path] = HostfileOpt,
    gpu: Optional[str] = GpuOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Pretrain the InternLM2 architecture with DeepSpeed; writes runs/<run>/pretrain-stage<N>/
    (checkpoints/step-XXXXXXXX/ each with a DONE marker, metrics.jsonl, loss.png, final/ in HF format,
    manifest.json)."""
    from .layout import Workspace
    from .pretrain import run_pretrain

    if dry_run:
        from . import dryrun

        dryrun.pretrain(Workspace.at(workdir), _recipe(recipe, set_), stage, run=run, from_=from_,
                        nproc=nproc if nproc > 1 else None, hostfile=hostfile, gpu=gpu, plan=plan).finish(json_out)
        return
    run_pretrain(Workspace.at(workdir), _recipe(recipe, set_), stage, run=run, resume=resume, nproc=nproc,
                 from_=from_, plan=plan, json_out=json_out)


@app.command("extend-context")
def extend_context(
    from_: Optional[Path] = typer.Option(None, "--from", help="Checkpoint or stage folder to extend (default: the "
                                         "run's latest pretraining final/)."),
    method: Optional[str] = typer.Option(None, "--method", help="base (raise rope_theta, InternLM2's), linear "
                                         "(position interpolation), dynamic (NTK) or yarn; default: the recipe's."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=8, help="The new context length (trained at, and "
                                          "written as max_position_embeddings)."),
    factor: Optional[float] = typer.Option(None, "--factor", min=1.0, help="linear/dynamic/yarn factor (default: "
                                           "new length / old length)."),
    rope_theta: Optional[float] = typer.Option(None, "--rope-theta", help="--method base: the new RoPE base "
                                               "(default 1,000,000)."),
    resume: str = typer.Option("auto", "--resume", help="auto: continue from the newest whole checkpoint; never: "
                               "start over; or a checkpoints/step-XXXXXXXX folder."),
    workdir: Optional[Path] = WorkdirOpt,
    run: str = RunOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    dry_run: bool = DryRunOpt,
    hostfile: Optional[Path] = HostfileOpt,
    gpu: Optional[str] = GpuOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Extend a checkpoint's context (RoPE base / interpolation / NTK / YaRN) and train at it; writes
    runs/<run>/extend-context/ whose final/config.json carries max_position_embeddings, rope_theta, rope_scaling."""
    from .extend_context import run_extend_context
    from .layout import Workspace

    if dry_run:
        from . import dryrun

        dryrun.extend_context(Workspace.at(workdir), _recipe(recipe, set_), run, from_=from_, hostfile=hostfile,
                              gpu=gpu, method=method, seq_len=seq_len, factor=factor,
                              rope_theta=rope_theta).finish(json_out)
        return
    run_extend_context(Workspace.at(workdir), _recipe(recipe, set_), run, from_=from_, method=method, seq_len=seq_len,
                       factor=factor, rope_theta=rope_theta, resume=resume, json_out=json_out)


@app.command()
def sft(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="JSONL, one {\"messages\": [...]} per line "
                                        "(default: sft.data, else the bundled examples/sft/train.jsonl)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out JSONL for the eval loss, or "
                                             "`none` (default: the bundled test set with the bundled data)."),
    from_: Optional[Path] = typer.Option(None, "--from", help="Checkpoint or stage folder to fine-tune (default: "
                                         "the run's latest pretrain final/, stage 3, else 2, else 1)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", min=8, help="Tokens per packed row and per "
                                          "conversation; longer ones keep whole turns up to an assistant turn "
                                          "that fits, else are rejected (default: sft.max_len)."),
    resume: str = typer.Option("auto", "--resume", help="auto: continue from the newest whole checkpoint; never: "
                               "start over; or a checkpoints/step-XXXXXXXX folder."),
    workdir: Optional[Path] = WorkdirOpt,
    run: str = RunOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    dry_run: bool = DryRunOpt,
    hostfile: Optional[Path] = HostfileOpt,
    gpu: Optional[str] = GpuOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Supervised fine-tuning on ChatML conversations, loss on assistant turns only; writes runs/<run>/sft/
    (rejected.jsonl, checkpoints/, metrics.jsonl, loss.png, final/, manifest.json)."""
    from .layout import Workspace
    from .sft import run_sft

    overrides = list(set_ or []) + ([f"sft.max_len={max_len}"] if max_len else [])
    if dry_run:
        from . import dryrun

        dryrun.sft(Workspace.at(workdir), _recipe(recipe, overrides), run, data=data, eval_data=eval_data,
                   from_=from_, hostfile=hostfile, gpu=gpu).finish(json_out)
        return
    run_sft(Workspace.at(workdir), _recipe(recipe, overrides), run=run, data=data, from_=from_, resume=resume,
            eval_data=eval_data, json_out=json_out)


CheckpointArg = typer.Argument(None, help="Model folder: a final/, checkpoints/step-*/ or HF export "
                               "(default: the run's latest finished stage).")
MaxNewOpt = typer.Option(256, "--max-new-tokens", min=0, help="Most tokens to generate per prompt.")
TopPOpt = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus mass kept when sampling (1: off).")
TopKOpt = typer.Option(0, "--top-k", min=0, help="Most likely tokens kept when sampling (0: off).")
DeviceOpt = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu).")


@app.command("generate")
def generate_cmd(
    checkpoint: Optional[Path] = CheckpointArg,
    input_: Path = typer.Option(..., "--input", "-i", help="JSONL: `messages` (chat template applied) or `prompt` "
                                "(raw text after BOS) per line."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL: each input line plus `completion` and "
                                "`finish_reason`."),
    max_new_tokens: int = MaxNewOpt,
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts decoded together."),
    device: Optional[str] = DeviceOpt,
    workdir: Optional[Path] = WorkdirOpt,
    run: str = RunOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Batched generation (KV cache) over a prompts file; stops on </s> and <|im_end|>."""
    from .console import log, print_json
    from .generate import resolve_checkpoint, run_generate
    from .layout import Workspace

    ckpt = resolve_checkpoint(Workspace.at(workdir), run, checkpoint)
    summary = run_generate(ckpt, input_, output, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size, device=device)
    print_json(summary) if json_out else log(f"{summary['prompts']} completions -> {output}"
                                             + (f" ({summary['errors']} lines with errors)" if summary["errors"] else ""))


@app.command("chat")
def chat_cmd(
    checkpoint: Optional[Path] = CheckpointArg,
    system: str = typer.Option("", "--system", help="System prompt (change it in the chat with /system)."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1, help="Most tokens per reply."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="0: greedy (InternLM2 chat: 0.8)."),
    top_p: float = typer.Option(0.8, "--top-p", min=0.0, max=1.0, help="Nucleus mass (InternLM2 chat: 0.8)."),
    top_k: int = TopKOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default: random)."),
    device: Optional[str] = DeviceOpt,
    workdir: Optional[Path] = WorkdirOpt,
    run: str = RunOpt,
) -> None:
    """Chat in the terminal with the InternLM2 template: /reset, /system <text>, /exit. Reads stdin line by line."""
    from .generate import resolve_checkpoint, run_chat
    from .layout import Workspace

    ckpt = resolve_checkpoint(Workspace.at(workdir), run, checkpoint)
    run_chat(ckpt, system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
             top_k=top_k, seed=seed, device=device)


rlhf_app = typer.Typer(help="COOL RLHF (InternLM2 §4.2): conditional reward model (runs/<run>/rlhf-reward/), PPO "
                       "(runs/<run>/rlhf-ppo/) and online rounds that patch reward hacking.", no_args_is_help=True)
app.add_typer(rlhf_app, name="rlhf")

ResumeOpt = typer.Option("auto", "--resume", help="auto: continue from the newest whole checkpoint; never: start "
                         "over; or a checkpoints/step-XXXXXXXX folder.")
PolicyOpt = typer.Option(None, "--from", help="SFT checkpoint or stage folder (default: runs/<run>/sft/final).")
RewardOpt = typer.Option(None, "--reward", help="Reward model from `lm2 rlhf reward` (default: "
                         "runs/<run>/rlhf-reward/final).")
PtxOpt = typer.Option(None, "--ptx", help="PTX text: a JSONL of chat `messages` or `text` records, or `none` "
                      "(default: rlhf.ppo.ptx_data, else data/tokens, else the SFT data).")
RlhfNprocOpt = typer.Option(1, "--nproc", min=1, help="Local data-parallel ranks (re-executes under "
                            "torch.distributed.run). Multi-node: start under DeepSpeed's launcher (README).")
StageDirOpt = typer.Option(None, "--stage-dir", hidden=True, help="Write here instead of runs/<run>/<stage>/ "
                           "(online rounds; --nproc ranks).")


@rlhf_app.command("reward")
def rlhf_reward(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Pairs JSONL, one {\"condition\", \"prompt\": "
                                        "messages, \"chosen\", \"rejected\"} per line (default: the bundled "
                                        "examples/rlhf/pairs.jsonl)."),
    from_: Optional[Path] = typer.Option(None, "--from", help="Checkpoint or stage folder to start from (default: "
                                         "runs/<run>/sft/final); a reward model continues with its head."),
    resume: str = ResumeOpt,
    nproc: int = RlhfNprocOpt,
    stage_dir: Optional[Path] = StageDirOpt,
    workdir: Optional[Path] = WorkdirOpt, run: str = RunOpt, recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt, dry_run: bool = DryRunOpt, hostfile: Optional[Path] = HostfileOpt,
    gpu: Optional[str] = GpuOpt, json_out: bool = JsonOpt,
) -> None:
    """Train the conditional reward model (focal ranking loss + log barrier, score at an appended reward
    token); writes runs/<run>/rlhf-reward/ with held-out accuracy per condition."""
    from .align.run import run_reward
    from .layout import Workspace

    if dry_run:
        from . import dryrun

        dryrun.rlhf_reward(Workspace.at(workdir), _recipe(recipe, set_), run, data=data, from_=from_,
                           nproc=nproc if nproc > 1 else None, hostfile=hostfile, gpu=gpu).finish(json_out)
        return
    run_reward(Workspace.at(workdir), _recipe(recipe, set_), run=run, data=data, from_=from_, resume=resume,
               json_out=json_out, stage_dir=stage_dir, nproc=nproc)


@rlhf_app.command("ppo")
def rlhf_ppo(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prompts JSONL, one {\"condition\", \"prompt\": "
                                        "messages[, \"gold\"]} per line (default: examples/rlhf/prompts.jsonl)."),
    from_: Optional[Path] = PolicyOpt,
    reward: Optional[Path] = RewardOpt,
    ptx: Optional[str] = PtxOpt,
    resume: str = ResumeOpt,
    nproc: int = RlhfNprocOpt,
    plan: bool = typer.Option(False, "--plan", help="Take the ZeRO stage, frozen-model sharding and micro-batch "
                              "sizes from `lm2 plan --rlhf ppo`'s layout for this cluster."),
    stage_dir: Optional[Path] = StageDirOpt,
    workdir: Optional[Path] = WorkdirOpt, run: str = RunOpt, recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt, dry_run: bool = DryRunOpt, hostfile: Optional[Path] = HostfileOpt,
    gpu: Optional[str] = GpuOpt, json_out: bool = JsonOpt,
) -> None:
    """PPO against the frozen conditional reward model (KL-shaped reward, GAE, clipped policy loss, PTX);
    writes runs/<run>/rlhf-ppo/ (metrics.jsonl per iteration, rollouts.jsonl, final/ = the actor)."""
    from .align.run import run_ppo
    from .layout import Workspace

    if dry_run:
        from . import dryrun

        dryrun.rlhf_ppo(Workspace.at(workdir), _recipe(recipe, set_), run, data=data, from_=from_, reward=reward,
                        nproc=nproc if nproc > 1 else None, hostfile=hostfile, gpu=gpu).finish(json_out)
        return
    run_ppo(Workspace.at(workdir), _recipe(recipe, set_), run=run, data=data, from_=from_, reward=reward, ptx=ptx,
            resume=resume, json_out=json_out, stage_dir=stage_dir, nproc=nproc, plan=plan)


@rlhf_app.command("online")
def rlhf_online(
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Rounds of reward -> PPO -> patch "
                                         "(default: rlhf.online.rounds)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Pairs JSONL for the reward model (default: "
                                        "the bundled examples/rlhf/pairs.jsonl)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts JSONL for PPO (default: the bundled "
                                           "examples/rlhf/prompts.jsonl)."),
    from_: Optional[Path] = PolicyOpt,
    ptx: Optional[str] = PtxOpt,
    nproc: int = RlhfNprocOpt,
    workdir: Optional[Path] = WorkdirOpt, run: str = RunOpt, recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt, json_out: bool = JsonOpt,
) -> None:
    """Online RLHF: each round trains the reward model, runs PPO, detects reward hacking (length blow-up,
    repetition) and adds early-beats-late pairs; writes runs/<run>/rlhf-ppo/round-N/ and final/."""
    from .align.online import run_online
    from .layout import Workspace

    overrides = list(set_ or []) + ([f"rlhf.online.rounds={rounds}"] if rounds else [])
    run_online(Workspace.at(workdir), _recipe(recipe, overrides), run=run, data=data, prompts=prompts, from_=from_,
               ptx=ptx, json_out=json_out, nproc=nproc)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A model folder: an lm2 final/ or checkpoint, an export, or a "
                                      "released InternLM2 / Llama HF folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (HF formats) or FILE.gguf."),
    fmt: str = typer.Option("internlm2", "--format", help="internlm2 (HF folder, fused wqkv, runs with "
                            "trust_remote_code), llama (HF folder for LlamaForCausalLM) or gguf (llama.cpp)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="f32, f16 or bf16 (default: the checkpoint's)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="HF formats: split weights into shards "
                                       "of at most this size, with model.safetensors.index.json."),
    json_out: bool = JsonOpt,
) -> None:
    """Export a model for transformers, vLLM/LMDeploy (HF folder with config, weights, tokenizer and chat
    template) or llama.cpp (one GGUF file)."""
    from .convert import export_checkpoint

    path = export_checkpoint(checkpoint, out, fmt, dtype=dtype, max_shard_size=max_shard_size)
    if json_out:
        from .console import print_json

        print_json({"out": str(path), "format": fmt})
    else:
        from .console import log

        log(f"exported {checkpoint} -> {path} ({fmt})")


# ---------------------------------------------------------------------------------------------------
# evaluation


eval_app = typer.Typer(help="Evaluate a checkpoint: `ppl`, `opencompass`, `needle`; with no subcommand the recipe's "
                       "default suite. Writes eval/<run>/<name>/.")
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
def eval_(
    ctx: typer.Context,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint folder or HF export "
                                              "(default: the run's latest final/)."),
    workdir: Optional[Path] = WorkdirOpt,
    run: str = RunOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Run the recipe's default suite (ppl + OpenCompass example tasks + a small needle grid) on the run's
    latest checkpoint (or --checkpoint); writes eval/<run>/report/ (report.md, report.json, plots)."""
    if ctx.invoked_subcommand:
        return
    from .evaluate.suite import run_suite
    from .layout import Workspace

    out = run_suite(Workspace.at(workdir), _recipe(recipe, set_), checkpoint, run=run)
    _eval_json(json_out, out / "report.json")


def _eval_json(json_out: bool, path: Path) -> None:
    if json_out:
        import json

        from .console import print_json

        print_json({"out": str(path.parent), **json.loads(path.read_text())})


EvalCheckpointArg = typer.Argument(None, help="Checkpoint folder or HF export (default: the run's latest final/).")
EvalNprocOpt = typer.Option(1, "--nproc", min=1, help="Local ranks sharing the evaluation (re-executes under "
                            "torch.distributed.run); the results equal one rank's. Under a launcher: its ranks.")
EvalDtypeOpt = typer.Option(None, "--dtype", help="auto (the checkpoint's half dtype, else bf16, on CUDA; fp32 on "
                            "CPU), fp32, bf16 or fp16; default: eval.dtype.")


def _eval_sets(set_: Optional[List[str]], dtype: Optional[str]) -> list:
    return list(set_ or []) + ([f"eval.dtype={dtype}"] if dtype else [])


@eval_app.command("ppl")
def eval_ppl(
    checkpoint: Optional[Path] = EvalCheckpointArg,
    data: Optional[List[Path]] = typer.Option(None, "--data", help="JSONL files or folders with a `text` field "
                                              "(and `lang`, `content_type`) instead of the validation split "
                                              "of data/tokens (repeatable)."),
    contamination: Optional[Tuple[Path, Path, Path]] = typer.Option(
        None, "--contamination", metavar="TRAIN TEST REF",
        help="Contamination check (InternLM2 §5.4): mean loss on a benchmark's train split, test split and "
             "look-alike reference text (JSONL with `text`, or `question` + `answer`); reports Δ1 = L_test − L_ref "
             "and Δ2 = L_test − L_train."),
    name: str = typer.Option("ppl", "--name", help="Output folder under eval/<run>/."),
    nproc: int = EvalNprocOpt,
    dtype: Optional[str] = EvalDtypeOpt,
    workdir: Optional[Path] = WorkdirOpt,
    run: str = RunOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Perplexity and bits per byte by language and content type; writes eval/<run>/ppl/ (results.json,
    summary.md)."""
    from .evaluate.ppl import run_ppl
    from .layout import Workspace

    out = run_ppl(Workspace.at(workdir), _recipe(recipe, _eval_sets(set_, dtype)), checkpoint, run=run, data=data,
                  contamination_sets=contamination, name=name, show=not json_out, nproc=nproc)
    _eval_json(json_out, out / "results.json")


@eval_app.command("opencompass")
def eval_opencompass(
    checkpoint: Optional[Path] = EvalCheckpointArg,
    dataset: Optional[List[Path]] = typer.Option(None, "--dataset", "-d", help="OpenCompass custom-format JSONL "
                                                 "(mcq rows: question, A, B, ..., answer; qa rows: question, "
                                                 "answer); repeatable. Default: examples/eval/*.jsonl."),
    dataset_config: Optional[List[str]] = typer.Option(None, "--dataset-config", help="An OpenCompass dataset "
                                                       "config name (e.g. gsm8k_gen) or .py path whose data is "
                                                       "already under eval.opencompass.data_root; repeatable."),
    template: Optional[str] = typer.Option(None, "--template", help="chat (ChatML), base (plain text) or auto "
                                           "(chat after sft/rlhf); default: eval.opencompass.template."),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="inprocess or cli (OpenCompass's own CLI on "
                                           "the same config); default: eval.opencompass.launcher."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Workers sharing the inference (OpenCompass's "
                              "NumWorkerPartitioner + LocalRunner, one GPU each on CUDA)."),
    dtype: Optional[str] = EvalDtypeOpt,
    workdir: Optional[Path] = WorkdirOpt,
    run: str = RunOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Evaluate with OpenCompass, offline; writes eval/<run>/opencompass/ (summary.json, summary.md,
    config.py, outputs/)."""
    from .evaluate.opencompass_runner import run_opencompass
    from .layout import Workspace

    sets = _eval_sets(set_, dtype) + ([f"eval.opencompass.nproc={nproc}"] if nproc > 1 else [])
    sets += [f"eval.opencompass.template={template}"] if template else []
    sets += [f"eval.opencompass.launcher={launcher}"] if launcher else []
    out = run_opencompass(Workspace.at(workdir), _recipe(recipe, sets), checkpoint, run=run, datasets=dataset,
                          configs=dataset_config, show=not json_out)
    _eval_json(json_out, out / "summary.json")


def _int_list(value: Optional[str], what: str) -> Optional[list]:
    """"128,256,512" -> [128, 256, 512]; numbers may be floats for depths."""
    if value is None:
        return None
    from .errors import InputError

    try:
        nums = [float(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {value!r}") from None
    return [int(x) if x.is_integer() else x for x in nums]


def _needle(checkpoint, workdir, run, recipe, set_, json_out, mode, lengths, depths, repeats, rope_scaling, factor,
            haystack, name, template=None, nproc=1, dtype=None) -> None:
    from .evaluate.needle import run_needle
    from .layout import Workspace

    run_needle(Workspace.at(workdir), _recipe(recipe, _eval_sets(set_, dtype)), run, checkpoint, mode=mode,
               lengths=_int_list(lengths, "--lengths"), depths=_int_list(depths, "--depths"), repeats=repeats,
               rope_scaling=rope_scaling, factor=factor, haystack=haystack, template=template, name=name,
               json_out=json_out, nproc=nproc)


NeedleCheckpointArg = typer.Argument(None, help="Checkpoint folder or HF export (default: the run's latest final/).")
NeedleModeOpt = typer.Option(None, "--mode", help="passkey (random digits), en (San Francisco needle) or zh "
                             "(InternLM2's 小明 needle); default: the recipe's eval.needle.mode.")
NeedleLengthsOpt = typer.Option(None, "--lengths", help="Context lengths in tokens, e.g. 128,256,512,1024.")
NeedleDepthsOpt = typer.Option(None, "--depths", help="Needle depths in percent, e.g. 0,25,50,75,100.")
NeedleRepeatsOpt = typer.Option(None, "--repeats", min=1, help="Samples per cell (different keys and haystacks).")
NeedleRopeOpt = typer.Option(None, "--rope-scaling", help="Inference-time RoPE scaling: dynamic (NTK), linear, "
                             "yarn, or none to switch off the checkpoint's own.")
NeedleFactorOpt = typer.Option(None, "--factor", min=1.0, help="Factor for --rope-scaling (default 2.0).")
NeedleHaystackOpt = typer.Option(None, "--haystack", help="auto, filler, or a JSONL/text file or folder.")
NeedleNameOpt = typer.Option(None, "--name", help="Output folder under eval/<run>/ (default: needle-<mode>[-<scaling>]).")
NeedleTemplateOpt = typer.Option(None, "--template", help="raw (plain prompt), chat (a user turn of the chat "
                                 "template) or auto (chat for SFT/RLHF checkpoints); default: eval.needle.template.")


@eval_app.command("needle")
def eval_needle(
    checkpoint: Optional[Path] = NeedleCheckpointArg,
    mode: Optional[str] = NeedleModeOpt,
    lengths: Optional[str] = NeedleLengthsOpt,
    depths: Optional[str] = NeedleDepthsOpt,
    repeats: Optional[int] = NeedleRepeatsOpt,
    rope_scaling: Optional[str] = NeedleRopeOpt,
    factor: Optional[float] = NeedleFactorOpt,
    haystack: Optional[str] = NeedleHaystackOpt,
    template: Optional[str] = NeedleTemplateOpt,
    name: Optional[str] = NeedleNameOpt,
    nproc: int = EvalNprocOpt,
    dtype: Optional[str] = EvalDtypeOpt,
    workdir: Optional[Path] = WorkdirOpt,
    run: str = RunOpt,
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Needle-in-a-haystack grid; writes eval/<run>/needle-<mode>/ (results.jsonl, summary.json, heatmap.png)."""
    _needle(checkpoint, workdir, run, recipe, set_, json_out, mode, lengths, depths, repeats, rope_scaling, factor,
            haystack, name, template, nproc, dtype)


# `lm2 needle` is the very same command, registered a second time at the top level.
app.command("needle", help="Same as `lm2 eval needle`.")(eval_needle)


# ---------------------------------------------------------------------------------------------------
# planning


@app.command()
def plan(
    gpus: int = typer.Option(..., "--gpus", help="GPUs in the job (data-parallel size; lm2 keeps tp = pp = 1)."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node (NVLink domain; hpZ group)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Preset: A100-40, A100-80, H100-80, H200-141 "
                                      "(memory, bf16 peak, NVLink/IB bandwidth); explicit figures override it."),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GiB per GPU."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Dense bf16 TFLOP/s per GPU."),
    intra_bw: Optional[float] = typer.Option(None, "--intra-bw", help="GB/s per GPU inside a node (NVLink)."),
    inter_bw: Optional[float] = typer.Option(None, "--inter-bw", help="GB/s per GPU across nodes (its NIC)."),
    stage: int = typer.Option(1, "--stage", help="Pretraining stage whose seq_len, precision and batch to plan."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Sequence length (default: the stage's)."),
    global_batch_tokens: Optional[int] = typer.Option(None, "--global-batch-tokens", help="Tokens per optimizer "
                                                      "step (default: the recipe's, sized for 8 GPUs)."),
    mfu: float = typer.Option(0.5, "--mfu", help="Share of peak the executed FLOPs reach."),
    zero: Optional[List[int]] = typer.Option(None, "--zero", help="Only these ZeRO stages (repeatable)."),
    top: int = typer.Option(5, "--top", help="Layouts to show in the table."),
    rlhf: Optional[str] = typer.Option(None, "--rlhf", help="Plan an RLHF stage instead: `reward` (the reward "
                                       "model's training) or `ppo` (four models + rollout buffer per rank)."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print every layout as JSON, best first."),
) -> None:
    """Simulate memory and step time of the DeepSpeed layouts (ZeRO 0-3, hpZ, checkpointing, micro-batch ×
    accumulation) for a recipe on a cluster; print the fastest that fit and why the others do not."""
    from .plan import run_plan

    run_plan(_recipe(recipe, set_), gpus, gpus_per_node, gpu, gpu_memory, peak_tflops, intra_bw, inter_bw, stage,
             seq_len, global_batch_tokens, mfu, zero, top, json_out, rlhf=rlhf)


# ---------------------------------------------------------------------------------------------------
# workspace


@app.command()
def status(workdir: Optional[Path] = WorkdirOpt, json_out: bool = JsonOpt) -> None:
    """Show the workspace's artefacts as a tree with lineage and headline stats."""
    from .status import show_status

    show_status(workdir, json_out=json_out)


@app.command()
def quickstart(
    workdir: Optional[Path] = typer.Option(None, "--workdir", "-w", help="Workspace (default: ./lm2-work)."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    fresh: bool = typer.Option(True, "--fresh/--reuse", help="Start from an empty workspace (default) or reuse it."),
    json_out: bool = JsonOpt,
) -> None:
    """Run every landed stage, in order, on the bundled examples into a fresh workspace."""
    from .quickstart import run_quickstart

    run_quickstart(workdir, recipe, set_ or [], fresh=fresh, json_out=json_out)


def main() -> None:
    try:
        app()
    except Lm2Error as e:
        from .console import err

        err.print(f"lm2: error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
