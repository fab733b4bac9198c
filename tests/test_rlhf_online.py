"""Online RLHF's fast path: early/late windows, hacking-pattern detection, early-beats-late patch pairs."""

from lm2cli.align.online import detect, early_late, patch_pairs
from lm2cli.config import OnlineConfig


def _r(line, it, tokens, rep=0.0, text=None):
    return {"line": line, "iteration": it, "tokens": tokens, "repetition": rep, "condition": "detailed",
            "response": text or f"answer-{line}-{it}-{tokens}", "score": 0.0, "gold": None}


PROMPTS = {n: {"prompt": [{"role": "user", "content": f"q{n}"}]} for n in range(1, 40)}


def test_windows_take_warmup_plus_first_quarter_and_last_quarter():
    rollouts = [_r(1, it, 10) for it in range(1, 26)]  # 25 iterations, 5 of them critic warm-up
    early, late = early_late(rollouts, iterations=25, warmup=5, window=0.25)
    assert [r["iteration"] for r in early] == list(range(1, 11))
    assert [r["iteration"] for r in late] == list(range(21, 26))


def test_length_blow_up_becomes_early_beats_late_pairs():
    cfg = OnlineConfig(patch_pairs_min=3, patch_pairs_max=5)
    early = [_r(n, 1, 10) for n in range(1, 9)] + [_r(n, 2, 3) for n in range(1, 9)]
    late = [_r(n, 20, 40) for n in range(1, 9)]
    found = detect(early, late, cfg)
    assert found["length"]["found"] and not found["repetition"]["found"]
    assert found["length"]["ratio"] == 40 / 6.5
    pairs, counts = patch_pairs(early, late, PROMPTS, found, cfg, round_no=1)
    assert counts == {"length": 8} and len(pairs) == 5  # capped at patch_pairs_max
    for p in pairs:
        # Of the early answers without the pattern, the most similar one (the longest) is chosen.
        assert p["chosen"].endswith("-1-10") and p["rejected"].endswith("-20-40")
        assert p["condition"] == "detailed" and p["prompt"] == PROMPTS[int(p["chosen"].split("-")[1])]["prompt"]


def test_too_few_candidates_patch_nothing_and_no_pattern_no_pairs():
    cfg = OnlineConfig(patch_pairs_min=20)
    early = [_r(n, 1, 10) for n in range(1, 5)]
    late = [_r(n, 20, 40) for n in range(1, 5)]
    pairs, counts = patch_pairs(early, late, PROMPTS, detect(early, late, cfg), cfg, 1)
    assert pairs == [] and counts == {"length": 4}
    same = [_r(n, 20, 11) for n in range(1, 5)]
    found = detect(early, same, cfg)
    assert not any(f["found"] for f in found.values())
    assert patch_pairs(early, same, PROMPTS, found, cfg, 1) == ([], {})


def test_repetition_pattern():
    cfg = OnlineConfig(patch_pairs_min=2)
    early = [_r(n, 1, 20, rep=0.05) for n in range(1, 4)]
    late = [_r(n, 20, 22, rep=0.5) for n in range(1, 4)]
    found = detect(early, late, cfg)
    assert found["repetition"]["found"] and not found["length"]["found"]
    pairs, counts = patch_pairs(early, late, PROMPTS, found, cfg, 2)
    assert counts == {"repetition": 3} and all(p["source"] == "fast-path round 2: repetition" for p in pairs)
