"""A small built-in task and policy (no downloads): contextual bandit with a hidden expert.

Each observation is a random vector; the rewarded action is the expert's argmax of a fixed random
linear map of it. A policy learns it by imitation, so its loss falls visibly within seconds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EnvMetadata:
    obs_dim: int
    num_actions: int


class BanditTask:
    def __init__(self, obs_dim: int = 16, num_actions: int = 4, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.expert = torch.randn(obs_dim, num_actions, generator=g)
        self.metadata = EnvMetadata(obs_dim, num_actions)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Observations and the expert's actions, drawn from the global (checkpointed) RNG."""
        obs = torch.randn(batch, self.metadata.obs_dim)
        return obs, (obs @ self.expert).argmax(dim=1)

    @torch.no_grad()
    def evaluate(self, policy: torch.nn.Module, episodes: int, seed: int = 0) -> float:
        """Mean reward of the policy's greedy actions over fresh episodes."""
        g = torch.Generator().manual_seed(seed)
        obs = torch.randn(episodes, self.metadata.obs_dim, generator=g)
        expert = (obs @ self.expert).argmax(dim=1)
        actions = policy(obs).argmax(dim=1)
        return (actions == expert).float().mean().item()


@dataclass(frozen=True)
class PolicyConfig:
    """Architecture of the example policy: an MLP from observations to action logits."""

    hidden: int = 64
    layers: int = 2

    def make_policy(self, env_metadata: EnvMetadata) -> torch.nn.Module:
        dims = [env_metadata.obs_dim] + [self.hidden] * self.layers
        blocks: list[torch.nn.Module] = []
        for a, b in itertools.pairwise(dims):
            blocks += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        blocks.append(torch.nn.Linear(dims[-1], env_metadata.num_actions))
        return torch.nn.Sequential(*blocks)
