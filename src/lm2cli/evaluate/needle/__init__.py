"""`lm2 eval needle` / `lm2 needle`: needle-in-a-haystack grids and heatmaps (SPEC §9.2, report Fig. 13).

One sample hides a needle in a haystack at a token depth and asks for it back. Three needles:

* `passkey` — the landmark-attention/YaRN test: task line, the "grass is green" filler, the key line
  "The pass key is N. Remember it. N is the pass key." and "What is the pass key? The pass key is";
  the same strings as `synthetic.passkey_document`, so a model with passkey documents in its
  pretraining mix sees its own format.
* `en` — Kamradt's San Francisco needle in English prose, NeedleBench's English prompt.
* `zh` — InternLM2's needle 小明最喜欢的实习的地点就是上海人工智能实验室。 in Chinese prose, CDME's prompt.

Unlike CDME, a cell's length counts the whole prompt, instruction and question included, up to
`length - length_buffer`: at lm2's 64–1024 lengths the instruction is a large share, and the length
the model sees is what a context test measures. Tokens are counted with the model's own tokenizer by
default (a cell's length is then exactly the positions the model sees); `token_counter: cl100k`
counts with cl100k as CDME does (the prompt is built in cl100k tokens, decoded, and re-encoded with
the model's tokenizer). Chat checkpoints (SFT, RLHF) get the prompt as a user turn of the chat
template (`--template auto|raw|chat`).

The parts: `haystack` (needles, haystacks, samples and their prompts), `score` (exact, edit, forced
choice from one shared prefix), `plot` (grids, heatmaps, the table) and `run` (the command).
"""

from .haystack import (
                       TASKS,
                       Encoder,
                       Haystack,
                       LengthTooShort,
                       Sample,
                       Task,
                       build_sample,
                       chat_messages,
                       chat_prompt,
                       filler_haystack,
                       read_corpus,
                       resolve_haystack,
)
from .plot import COLORS, grids, needle_cmap, plot_heatmap, print_table
from .run import default_name, resolve_config, resolve_template, run_needle
from .score import (
                       METRICS,
                       choice_logprobs,
                       edit_score,
                       exact_match,
                       levenshtein,
                       score_batch,
                       shared_prefix_logprobs,
                       trim_prediction,
)

__all__ = [
                       "COLORS",
                       "METRICS",
                       "TASKS",
                       "Encoder",
                       "Haystack",
                       "LengthTooShort",
                       "Sample",
                       "Task",
                       "build_sample",
                       "chat_messages",
                       "chat_prompt",
                       "choice_logprobs",
                       "default_name",
                       "edit_score",
                       "exact_match",
                       "filler_haystack",
                       "grids",
                       "levenshtein",
                       "needle_cmap",
                       "plot_heatmap",
                       "print_table",
                       "read_corpus",
                       "resolve_config",
                       "resolve_haystack",
                       "resolve_template",
                       "run_needle",
                       "score_batch",
                       "shared_prefix_logprobs",
                       "trim_prediction",
]
