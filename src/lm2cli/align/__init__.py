"""COOL RLHF (SPEC §8): the conditional reward model, PPO, and online rounds, on any number of ranks.

    records.py       preference pairs and PPO prompts: reading, conditional rendering
    losses.py        reward ranking loss and barrier; KL shaping, GAE, PPO policy/value losses
    reward_model.py  the reward model, pair batches (rank-sharded stream), accuracy, its folder
    gold.py          programmatic (verifiable) gold rewards for prompts that carry one
    models.py        the four models built for the DeepSpeed layout they run in (streamed, partitioned)
    frozen.py        frozen scoring models (whole or ZeRO-3 inference) and how ranks share work
    rollout.py       the rollout backend seam (lm2's generate by default)
    ppo.py           one PPO iteration: rollouts, experience, micro-batched updates
    ptx.py           PPO's pretraining text
    run.py           `lm2 rlhf reward` -> runs/<run>/rlhf-reward/, `lm2 rlhf ppo` -> runs/<run>/rlhf-ppo/
    online.py        `lm2 rlhf online` -> runs/<run>/rlhf-ppo/round-N/
"""
