"""Needle scores: exact match, the edit-distance score, and forced choice from one shared prefix.

Scores per sample: `exact` (passkey: the first integer of the answer equals the key, compared as
strings; en/zh: the needle's key phrase appears in the whitespace-stripped answer), `edit`
(OpenCompass's `100·(1 − Lev/max(len))` on whitespace-stripped strings, after NeedleBench's trim of
the prediction to 0.8–1.2× the reference), and `choice` (forced choice: the key's continuation has the
highest log-likelihood among the key and `choices` distractors; chance is 1/(choices+1)).

Forced choice runs the prompt (haystack and question, the long part) once per sample, keeps its KV
cache, copies the cache once per candidate and scores every candidate's continuation over it in one
batch: one long forward instead of one per candidate (`choice_logprobs`, the reference it equals).
With dynamic NTK past the trained length the prompt's keys are rotated at the prompt's length, as
greedy decoding's cache is, so there the two differ slightly; everywhere else they agree to float
rounding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

METRICS = ("exact", "edit", "choice")


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def trim_prediction(prediction: str, reference: str) -> str:
    """NeedleBench's trim: keep at most 1.2x the reference, ending at the reference's last character
    when it appears past 0.8x (so trailing chatter does not count against a right answer)."""
    l08, l12 = int(0.8 * len(reference)), int(1.2 * len(reference))
    out = prediction[:l12]
    if len(out) > l08 and reference and reference[-1] in out[l08:]:
        out = out[: l08 + out[l08:].index(reference[-1]) + 1]
    return out


def edit_score(prediction: str, reference: str, trim: bool = True) -> float:
    """OpenCompass CDME: 100·(1 − Lev(pred, ref)/max(|pred|, |ref|)) on whitespace-stripped strings."""
    pred, ref = re.sub(r"\s+", "", prediction), re.sub(r"\s+", "", reference)
    if trim:
        pred = trim_prediction(pred, ref)
    longest = max(len(pred), len(ref))
    return 100.0 * (1 - levenshtein(pred, ref) / longest) if longest else 100.0


def exact_match(mode: str, prediction: str, key: str) -> bool:
    if mode == "passkey":
        m = re.search(r"\d+", prediction)
        return bool(m) and m.group(0) == key  # strings: cl100k chunks digits in threes (SPEC §9.2)
    norm = lambda s: re.sub(r"\s+", "", s).lower()
    return norm(key) in norm(prediction)


def choice_logprobs(model, prompt: Sequence[int], continuations: Sequence[Sequence[int]], pad_id: int = 0) -> list[float]:
    """Reference forced choice: sum of log p(continuation | prompt) for each continuation, each as a full
    `prompt + continuation` row (one long forward per candidate), in one right-padded batch.

    Right padding needs no mask: under causal attention no real token sees a later pad.
    """
    import torch

    device = next(model.parameters()).device
    n = len(prompt)
    width = n + max(len(c) for c in continuations)
    rows = [list(prompt) + list(c) + [pad_id] * (width - n - len(c)) for c in continuations]
    with torch.inference_mode():
        hidden = model(torch.tensor(rows, device=device), return_hidden=True)
        out = []
        for r, c in enumerate(continuations):
            logp = model.output(hidden[r, n - 1 : n - 1 + len(c)]).float().log_softmax(-1)
            out.append(float(logp.gather(-1, torch.tensor(list(c), device=device)[:, None]).sum()))
    return out


def shared_prefix_logprobs(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]],
                           pad_id: int = 0) -> list[list[float]]:
    """For each prompt, sum of log p(continuation | prompt) of each of its continuations; the prompts run
    once (a left-padded batch into a KV cache), then the cache is copied per candidate and all candidates'
    continuations are fed over it together, one token per step as decoding does (right-padded: causal
    attention never lets a real token see a later pad)."""
    import torch

    from ...generate import left_pad
    from ...model import KVCache

    if any(not c for cs in continuations for c in cs):
        raise ValueError("every forced-choice continuation needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tail = max(len(c) for cs in continuations for c in cs) - 1  # the last token is predicted, never fed
    ids, mask, padded = left_pad(prompts, pad_id, device)
    n, width = ids.shape
    rows = [(s, j) for s, cs in enumerate(continuations) for j in range(len(cs))]
    out = [[0.0] * len(cs) for cs in continuations]
    with torch.inference_mode():
        cache = KVCache(model.config, n, width + tail, device=device, dtype=dtype)
        hidden = model(ids, attention_mask=mask if padded else None, cache=cache, return_hidden=True)
        first = model.output(hidden[:, -1]).float().log_softmax(-1)  # [n, V]: each continuation's first token
        owner = torch.tensor([s for s, _ in rows], device=device)
        firsts = torch.tensor([continuations[s][j][0] for s, j in rows], device=device)
        scores = first[owner, firsts]
        if tail > 0:
            cache.reorder(owner)  # one copy of the prompt's cache per candidate
            feed = torch.full((len(rows), tail), pad_id, dtype=torch.long)
            targets = torch.zeros((len(rows), tail), dtype=torch.long)
            keep = torch.zeros((len(rows), tail), dtype=torch.bool)
            for r, (s, j) in enumerate(rows):
                c = list(continuations[s][j])
                feed[r, :len(c) - 1] = torch.as_tensor(c[:-1])
                targets[r, :len(c) - 1] = torch.as_tensor(c[1:])
                keep[r, :len(c) - 1] = True
            feed, targets, keep = feed.to(device), targets.to(device), keep.to(device)
            ext = torch.cat([mask[owner], torch.ones_like(feed)], dim=1)
            steps = []
            for t in range(tail):  # token by token, as decoding feeds the cache
                hidden = model(feed[:, t:t + 1], attention_mask=ext[:, :width + t + 1] if padded else None,
                               cache=cache, return_hidden=True)
                steps.append(model.output(hidden[:, 0]).float().log_softmax(-1))
            logp = torch.stack(steps, 1).gather(-1, targets[..., None])[..., 0]
            scores = scores + (logp * keep).sum(-1)
        for r, (s, j) in enumerate(rows):
            out[s][j] = float(scores[r])
    return out


def score_batch(model, tok, samples: Sequence, mode: str, max_new_tokens: int, trim: bool = True) -> list[dict]:
    """One batch of samples: greedy answers (KV-cached decoding), then forced choice from the shared
    prefix; one record per sample, in the given order."""
    from ...generate import generate

    answers = generate(model, [s.ids for s in samples], max_new_tokens, stop_ids=tok.stop_ids,
                       batch_size=len(samples), pad_id=tok.pad_id)
    lps = shared_prefix_logprobs(model, [s.ids for s in samples],
                                 [[tok.encode(c) for c in s.choices] for s in samples], pad_id=tok.pad_id)
    records = []
    for s, ans, lp in zip(samples, answers, lps):
        pred = tok.decode(ans)
        records.append({
            "mode": mode, "length": s.length, "depth": s.depth, "repeat": s.repeat, "template": s.template,
            "prompt_tokens": len(s.ids), "counted_tokens": s.counted, "needle_at": s.needle_at,
            "key": s.key, "prediction": pred,
            "exact": int(exact_match(mode, pred, s.key)),
            "edit": round(edit_score(pred, s.reference, trim=trim), 2),
            "choice": int(lp[0] > max(lp[1:])),
            "choice_logprobs": [round(x, 3) for x in lp],
        })
    return records
