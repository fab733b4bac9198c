"""Next-token cross-entropy through the output head without the B×T×V logits in fp32.

The plain path, `cross_entropy(output(h).float(), labels)`, keeps the logits in the model dtype, their
fp32 upcast and the fp32 gradient: at 7B, 4k tokens × 92,544 × (2 + 4 + 4) B ≈ 3.8 GB per row, more
than the attention activations. `linear_cross_entropy` computes the same summed loss a chunk of tokens
at a time: forward keeps only each token's log-sum-exp (4 B per token); backward recomputes each
chunk's logits (one more head matmul, ~2 % of a 7B step) and turns them into the gradients of the
hidden states and of the head weight. The head matmul runs in the model dtype, softmax and its
gradient in fp32 as in the plain path; the weight gradient is summed over chunks in fp32.

Public API: `linear_cross_entropy`, `chunk_tokens`, `LOGITS_CHUNK`.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
LOGITS_CHUNK = 2**26  # logits elements per chunk: 725 tokens at InternLM2's 92,544 vocab (256 MiB in fp32)


def chunk_tokens(vocab: int, chunk_elements: int = LOGITS_CHUNK) -> int:
    """Tokens per chunk so that a chunk's logits hold about `chunk_elements` values."""
    return max(1, chunk_elements // max(1, vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            y = labels[s:s + chunk]
            keep = y != IGNORE_INDEX
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
            total += torch.where(keep, lse[s:s + chunk] - target, 0.0).sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            y = labels[s:s + chunk]
            keep = (y != IGNORE_INDEX)[:, None]
            # d(lse - logit_y)/dlogits = softmax - onehot(y), zero on ignored positions.
            g = torch.exp((h @ weight.t()).float() - lse[s:s + chunk, None])
            g.scatter_add_(1, y.clamp(min=0)[:, None], torch.full_like(g[:, :1], -1.0))
            g = torch.where(keep, g * grad_total, 0.0).to(hidden.dtype)
            if want_h:
                grad_h[s:s + chunk] = g @ weight
            if want_w:
                grad_w += g.t() @ h  # the chunk's product in the model dtype, the sum over chunks in fp32
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Σ over labelled tokens of cross_entropy(hidden @ weightᵀ, labels), an fp32 scalar, never holding more
    than `chunk` tokens' logits (`chunk_tokens(V)` by default). `hidden` [..., H], `labels` [...] with
    -100 where nothing is predicted; divide by the number of labelled tokens for the mean."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    return _LinearCrossEntropy.apply(h, weight, y, chunk or chunk_tokens(weight.shape[0]))
