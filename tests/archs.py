"""Architectures used by the tests (importable by class path from subprocesses too)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MLPArch:
    hidden: int = 16
    tied: bool = False

    def make_policy(self, env_metadata):
        from ckptio.artifact import env_dims  # a dict or an object with obs_dim / num_actions

        obs_dim, num_actions = env_dims(env_metadata)
        return MLP(obs_dim, self.hidden, num_actions, self.tied)


class MLP(torch.nn.Module):
    def __init__(self, obs_dim: int, hidden: int, num_actions: int, tied: bool = False):
        super().__init__()
        self.embed = torch.nn.Linear(obs_dim, hidden)
        self.body = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, num_actions)
        if tied:  # weight tying, as between an embedding and an output projection
            self.tied_out = torch.nn.Linear(hidden, hidden, bias=False)
            self.tied_out.weight = self.body.weight
        self.register_buffer("running_mean", torch.zeros(obs_dim))

    def forward(self, x):
        return self.head(torch.relu(self.body(torch.relu(self.embed(x - self.running_mean)))))


@dataclass
class NonPersistentArch:
    """A module with a non-persistent buffer: it cannot stay on the meta device after assign."""

    hidden: int = 4

    def make_policy(self, env_metadata):
        m = torch.nn.Linear(env_metadata["obs_dim"], self.hidden)
        m.register_buffer("scale", torch.full((self.hidden,), 2.0), persistent=False)
        return m


ENV = {"obs_dim": 6, "num_actions": 3}
