"""Evaluation of lm2 checkpoints (SPEC §9): `ppl` (perplexity, bits per byte, contamination),
`opencompass_model` / `opencompass_runner` (lm2 checkpoints as OpenCompass models, offline),
`needle` (long-context retrieval) and `suite` (plain `lm2 eval`: all of them into one report).

Every command writes `eval/<run>/<name>/` with a `manifest.json`; OpenCompass is imported only by the
modules that need it, so importing this package stays cheap.
"""
