"""lm2's GGUF export in llama.cpp: 20 greedy tokens (and the prompt's logits) against lm2's own.

    python examples/gguf_llamacpp.py                      # a tiny model trained here to recite a text
    python examples/gguf_llamacpp.py runs/main/sft/final  # any model lm2 reads (tiktoken or SentencePiece)
    python examples/gguf_llamacpp.py CKPT --prompt "..." --tokens 20 --dtype f32

Needs `llama-cpp-python` (`pip install llama-cpp-python`, which compiles llama.cpp: several minutes);
without it the script says so and exits 0. It exports CKPT with `lm2 export --format gguf`, tokenizes
the prompt with both (ids must agree), compares the prompt's last-position logits (max |diff|) and
decodes greedily with each; exit 1 if token ids differ (on the prompt, a few probe strings, or the
greedy continuation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

PROBES = ["12345678901 3.14159 2024年12月5日", "  leading  spaces\n\n\ttabs\r\n", "def f(x):\n    return x**2  # 注释",
          "ÀÉÎ ñ ß ﬁ 😀👍🏽", "a" * 50 + " " + "9" * 20, "x\n\n\n  y", "it's THEY'RE we'll", "今天天气很好，我们去公园散步。"]
DEMO_TEXT = ("InternLM2 was trained in three pre-training phases, then extended to long contexts, "
             "then aligned with supervised fine-tuning and online RLHF. ")


def demo_checkpoint(path: Path) -> Path:
    """A 2-layer model (cl100k tokenizer) that memorises DEMO_TEXT, so greedy decoding has clear winners."""
    from lm2cli.config import ModelConfig
    from lm2cli.convert import save_model
    from lm2cli.model import InternLM2
    from lm2cli.tokenizer import Tokenizer

    tok = Tokenizer.default()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = InternLM2(cfg)
    ids = torch.tensor([tok.encode(DEMO_TEXT * 2, bos=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"demo model: recites its text at loss {loss.item():.3f}")
    return save_model(model.eval(), path, tokenizer=tok)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", type=Path, help="model folder (default: a tiny demo model)")
    ap.add_argument("--prompt", default="InternLM2 was trained in three")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python); nothing to compare, skipping.")
        return 0

    from lm2cli.convert import export_checkpoint, load_model
    from lm2cli.generate import generate
    from lm2cli.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or demo_checkpoint(Path(tmp) / "demo")
        gguf_file = export_checkpoint(ckpt, Path(tmp) / "model.gguf", fmt="gguf", dtype=args.dtype)
        print(f"exported {ckpt} -> {gguf_file.name} ({gguf_file.stat().st_size / 2**20:.1f} MiB, {args.dtype})")

        tok = Tokenizer.load(ckpt)
        model = load_model(ckpt)
        prompt = tok.encode(args.prompt, bos=True)
        ours = generate(model, [prompt], args.tokens, stop_ids=[])[0]
        with torch.no_grad():
            our_logits = model(torch.tensor([prompt]))[0, -1].float()

        llm = Llama(model_path=str(gguf_file), n_ctx=len(prompt) + args.tokens + 8, n_threads=2, logits_all=True,
                    verbose=False)
        their_prompt = llm.tokenize(args.prompt.encode("utf-8"), add_bos=True, special=False)
        llm.eval(their_prompt)
        their_logits = torch.tensor(llm.scores[len(their_prompt) - 1])
        probes = [args.prompt, *PROBES]
        same_ids = sum(llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) == tok.encode(t, bos=True)
                       for t in probes)
        theirs = []
        for _ in range(args.tokens):
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
            theirs.append(nxt)
            llm.eval([nxt])

    same_prompt = list(their_prompt) == prompt
    print(f"token ids equal on {same_ids}/{len(probes)} probe strings (digits, whitespace, code, zh, emoji)")
    print(f"prompt ids equal: {same_prompt} ({len(prompt)} tokens)")
    if same_prompt:
        print(f"prompt logits max |lm2 - llama.cpp|: {(our_logits - their_logits).abs().max().item():.3g}")
    print(f"lm2      : {ours}\n           {tok.decode(ours)!r}")
    print(f"llama.cpp: {theirs}\n           {tok.decode(theirs)!r}")
    ok = same_prompt and ours == theirs and same_ids == len(probes)
    print(f"{args.tokens} greedy tokens {'equal' if ok else 'DIFFER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
