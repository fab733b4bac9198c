"""COOL RLHF (SPEC §8): the conditional reward model, PPO, and online rounds.

    losses.py        reward ranking loss and barrier; KL shaping, GAE, PPO policy/value losses
    rewards_data.py  preference pairs and PPO prompts: reading, conditional rendering, batching
    reward_model.py  `lm2 rlhf reward` -> runs/<run>/rlhf-reward/
    gold.py          programmatic (verifiable) gold rewards for prompts that carry one
    ppo.py           `lm2 rlhf ppo`    -> runs/<run>/rlhf-ppo/
    online.py        `lm2 rlhf online` -> runs/<run>/rlhf-ppo/round-N/
"""
