"""torchrun job: an FSDP2 Llama, new run, filled from a Hugging Face folder (initial_load); rank 0 writes the
full state dict it holds then (torch's own get_model_state_dict) for the test to compare with the folder."""

import sys

import torch
import torch.distributed as dist
from hf_models import tiny_config
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

import ckptio


def main() -> None:
    hf_dir, run_dir, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234 + dist.get_rank())  # weights unlike the folder's, and unlike each other
    model = LlamaForCausalLM(tiny_config())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    arch = ckptio.TransformersArchitecture.of(tiny_config(), "LlamaForCausalLM")
    with ckptio.Checkpointer(run_dir, arch, ckptio.CheckpointConfig(initial_load=hf_dir)) as ckpt:
        assert ckpt.load_into(model) is True
        assert ckpt.resumed_from is None and ckpt.start_epoch == 0 and ckpt.initial_loaded_from == hf_dir
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        if dist.get_rank() == 0:
            full = {k: v.contiguous() for k, v in full.items() if k != "lm_head.weight"}
            save_file(full, out, {"tied": str(tied)})
        ckpt.save(model, epoch=0, force=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
