"""A policy-shaped benchmark model: many tensors of varied shapes, float32 and bfloat16."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import ckptio

RATIOS = (2.0, 0.75, 1.5, 0.5, 1.25, 1.0)
BLOCKS = 48


@ckptio.register_architecture
@dataclass(frozen=True)
class BenchPolicy:
    """48 blocks of (LayerNorm, Linear, Linear), 288 tensors whose widths vary from block to block
    and grow with the target size (as real models grow wider, not only deeper); odd blocks bf16."""

    target_bytes: int

    def blocks(self) -> list[tuple[int, int]]:
        out = []
        for i in range(BLOCKS):
            itemsize = 2 if i % 2 else 4
            r = RATIOS[i % len(RATIOS)]
            # 2*a*b*itemsize bytes per block, b = r*a; mean item size 3 bytes over the blocks
            a = max(64, round((self.target_bytes * itemsize / 3 / BLOCKS / (2 * r * itemsize)) ** 0.5 / 64) * 64)
            out.append((a, max(64, round(a * r / 64) * 64)))
        return out

    def make_policy(self, env_metadata: object = None) -> torch.nn.Module:
        layers = []
        for i, (a, b) in enumerate(self.blocks()):
            block = torch.nn.Sequential(torch.nn.LayerNorm(a), torch.nn.Linear(a, b), torch.nn.Linear(b, a))
            layers.append(block.to(torch.bfloat16) if i % 2 else block)
        return torch.nn.Sequential(*layers)


def state_dict_bytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())
