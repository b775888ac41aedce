"""CUDA paths: snapshots into reused pinned buffers, loading onto a GPU. Skipped without a GPU."""

import pytest
import torch

import ckptio

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_async_save_from_cuda_reuses_pinned_buffers(tmp_path, env_meta):
    from archs import MLPArch

    policy = MLPArch().make_policy(env_meta).cuda()
    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), ckptio.CheckpointConfig(async_save=True))
    ck.save(policy, 1)
    buffers = {k: v.data_ptr() for k, v in ck.saves.buffers.items()}
    assert all(v.is_pinned() for v in ck.saves.buffers.values())
    expected = {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}
    ck.save(policy, 2)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    ck.close()
    assert {k: v.data_ptr() for k, v in ck.saves.buffers.items()} == buffers
    for k, v in ckptio.load_from_uri(str(tmp_path / "run")).state_dict.items():
        assert torch.equal(v, expected[k])


def test_instantiate_on_cuda(tmp_path, policy, env_meta):
    from archs import MLPArch

    uri = ckptio.save_policy_artifact(str(tmp_path / "p"), policy, MLPArch())
    module = ckptio.load_from_uri(uri).instantiate(env_meta, device="cuda")
    assert module.head.weight.is_cuda
    assert torch.equal(module.head.weight.cpu(), policy.head.weight)
