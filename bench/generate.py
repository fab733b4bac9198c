"""Tokens/s of lm2's `generate` against transformers' `generate` on the same weights, in one run.

The lm2 checkpoint is exported in Llama layout (`export_checkpoint(..., fmt="llama")`) and loaded by
`LlamaForCausalLM`. Both sides then decode the same left-padded batch greedily with their KV cache,
for exactly `--new` tokens (no stop tokens), with the same torch threads, device and dtype. Each side
gets a warm-up call, then the timed calls alternate and the best of `--repeats` counts for each. The
script also reports how many generated tokens agree between the two (greedy on identical weights: all
of them, barring fp ties).

    python bench/generate.py                       # micro preset on CPU
    python bench/generate.py --preset mini --batch 16 --new 128 --device cuda

Target: ratio lm2 / transformers >= 1.0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Scripts in bench/ may share a stdlib module's name (tokenize.py); keep this folder off the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402

PRESETS = {  # SPEC §10 sizes, vocabulary 8,192
    "nano": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "micro": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2),
    "mini": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _best_alternating(fns, repeats, device):
    """Best time and output of each function; the calls alternate, so drift in the machine's speed
    (other load, frequency) falls on both sides alike. One untimed warm-up call each first."""
    for fn in fns:
        fn()  # allocator, kernels, lazy init
    best = [(float("inf"), None)] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t, out = _timed(fn, device)
            if t < best[i][0]:
                best[i] = (t, out)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="micro", choices=sorted(PRESETS))
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48, help="longest prompt; the others are shorter (left padding)")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    from transformers import LlamaForCausalLM

    from lm2cli.config import ModelConfig
    from lm2cli.convert import export_checkpoint
    from lm2cli.generate import generate
    from lm2cli.convert import load_model, save_model
    from lm2cli.model import InternLM2

    cfg = ModelConfig(vocab_size=args.vocab, max_position_embeddings=args.prompt_len + args.new,
                      **PRESETS[args.preset])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        lm2_dir, hf_dir = Path(tmp) / "lm2", Path(tmp) / "llama"
        save_model(InternLM2(cfg), lm2_dir)
        export_checkpoint(lm2_dir, hf_dir, fmt="llama")
        ours = load_model(lm2_dir, dtype=dtype, device=args.device)
        theirs = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(args.device).eval()

    g = torch.Generator().manual_seed(1)
    lens = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=g).tolist()
    lens[0] = args.prompt_len
    prompts = [[1] + torch.randint(3, args.vocab - 16, (n - 1,), generator=g).tolist() for n in lens]
    pad = 0
    ids = torch.tensor([[pad] * (args.prompt_len - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[0] * (args.prompt_len - len(p)) + [1] * len(p) for p in prompts], device=args.device)

    def run_lm2():
        return generate(ours, prompts, args.new, stop_ids=(), batch_size=args.batch, pad_id=pad)

    @torch.inference_mode()
    def run_hf():
        out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                              do_sample=False, use_cache=True, pad_token_id=pad, eos_token_id=None,
                              temperature=None, top_p=None, top_k=None)
        return out[:, ids.shape[1]:].tolist()

    (t_lm2, out_lm2), (t_hf, out_hf) = _best_alternating([run_lm2, run_hf], args.repeats, args.device)
    n = args.batch * args.new
    agree = sum(a == b for x, y in zip(out_lm2, out_hf) for a, b in zip(x, y)) / n
    print(f"model {args.preset} ({ours.num_params() / 1e6:.1f}M params, V={args.vocab}), {args.device} {str(dtype)[6:]}, "
          f"threads {torch.get_num_threads()}; batch {args.batch}, prompts {min(lens)}-{max(lens)} tokens "
          f"(left-padded), {args.new} new tokens each, greedy, KV cache")
    print(f"{'':14}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'lm2':14}{t_lm2:>10.3f}{n / t_lm2:>12.1f}")
    print(f"{'transformers':14}{t_hf:>10.3f}{n / t_hf:>12.1f}")
    print(f"ratio lm2 / transformers: {t_hf / t_lm2:.2f}x (target >= 1.0); greedy tokens agreeing: {agree:.1%}")


if __name__ == "__main__":
    main()
