"""``eval.reward_model``: the reward-model judge (aligner/evaluation/reward_judge.py) at every evaluation of a training run.

At each evaluation every rank generates greedy responses (``eval.reward_max_new_tokens``)
to the prompts of ``data.eval`` with the policy engine (the same prompts on every
rank, so ZeRO-3's collective forwards stay in step); rank 0 scores them with
the reward model. The anchor's responses are the policy's own at the first
judged evaluation, i.e. the policy before training (the pre-aligned model, as
FlipGuard's anchor by default); they and their scores are kept in
``output_dir/reward_judge_anchor.json``, so a resumed run compares against the
same ones. Logged, on rank 0, as ``eval/regression/generation/*``:
``policy_reward``, ``anchor_reward``, ``negative_flip_rate`` (R(x, y_pre) − R(x, y_θ) > ε,
``eval.reward_epsilon``) and ``positive_flip_rate``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from aligner.config import ConfigError
from aligner.data import load_rows
from aligner.evaluation.generate import generate
from aligner.evaluation.regression import reward_model_flips
from aligner.evaluation.reward_judge import check_reward_model, generation_prompts, load_reward_model, score

log = logging.getLogger(__name__)
PREFIX = "eval/regression/generation/"


class RewardJudge:
    """Built on every rank (each checks the reward model, so a bad one fails on all ranks alike); rank 0 scores."""

    def __init__(self, cfg, tokenizer, rank: int) -> None:
        self.cfg, self.tokenizer, self.rank = cfg, tokenizer, rank
        flag = "eval.reward_model"
        if not cfg.data.eval:
            raise ConfigError(f"{flag} judges generations on data.eval's prompts, but data.eval is null; "
                              f"set data.eval or remove {flag}")
        if rank == 0:
            self.rm, self.rm_tokenizer = load_reward_model(cfg.eval.reward_model, flag)
        else:  # the same refusal as rank 0's, without loading the weights
            self.rm = self.rm_tokenizer = None
            check_reward_model(cfg.eval.reward_model, flag)
        rows = load_rows(cfg.data.eval)
        self.prompts, self.judged_prompts = generation_prompts(rows, tokenizer, f"data.eval ({cfg.data.eval})")
        self.templated = bool(len(rows)) and not isinstance(rows[0]["prompt"], str)
        self.anchor_file = Path(cfg.output_dir) / "reward_judge_anchor.json"

    @torch.no_grad()
    def evaluate(self, policy_module) -> dict[str, float]:
        """Generate on every rank; on rank 0 score and compare with the anchor's responses; ``{}`` elsewhere."""
        was_training = policy_module.training
        policy_module.eval()
        responses = []
        for start in range(0, len(self.prompts), self.cfg.eval.batch_size):
            responses += generate(policy_module, self.tokenizer, self.prompts[start:start + self.cfg.eval.batch_size],
                                  self.cfg.eval.reward_max_new_tokens, add_special_tokens=not self.templated)
        if was_training:
            policy_module.train()
        if self.rank != 0:
            return {}
        rewards = score(self.rm, self.rm_tokenizer, self.judged_prompts, responses, self.cfg.eval.batch_size)
        if not self.anchor_file.is_file():
            log.info("eval.reward_model: the anchor's responses are the policy's at this evaluation; kept in %s",
                     self.anchor_file)
            self.anchor_file.write_text(json.dumps({"responses": responses, "rewards": rewards.tolist()}))
        anchor = torch.tensor(json.loads(self.anchor_file.read_text())["rewards"], dtype=torch.float64)
        flips = reward_model_flips(rewards, anchor, self.cfg.eval.reward_epsilon)
        return {PREFIX + k: v for k, v in flips.items() if k != "epsilon"}

