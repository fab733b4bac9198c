"""The training engine every lm2 stage runs on: DeepSpeed setup, packed data, checkpoints and one loop.

    schedule.py    linear warmup + cosine to a floor (the LR multiplier DeepSpeed steps)
    data.py        packed fixed-length samples streamed from `data/tokens` (mixture, long share, resumable)
    engine.py      distributed init, the DeepSpeed config from a `TrainConfig`, the engine wrapper
    checkpoint.py  `checkpoints/step-%08d/` folders: async snapshot + write, DONE marker, `latest`, resume
    loop.py        `fit(...)`: the explicit training loop, metrics, eval, `final/` and the stage manifest

Pretraining (`lm2cli.pretrain`), SFT and the reward model call `fit` with their own batches and loss.
"""
