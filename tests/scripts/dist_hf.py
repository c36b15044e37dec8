"""Tiny Llama under FSDP2 (gloo, CPU): save a sharded checkpoint with config.json; rank 0 dumps full weights."""

from __future__ import annotations

import sys
from typing import Any

import btckpt
import torch
import torch.distributed as dist
from _rank_exit import exit_rank


def tiny_fsdp_llama() -> tuple[Any, Any]:
    """A 2-layer Llama from a config (seed 0), each layer and the root under FSDP2: ``(config, model)``."""
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return cfg, model


def main() -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out = sys.argv[1]
    dist.init_process_group("gloo")
    cfg, model = tiny_fsdp_llama()
    with btckpt.Checkpointer(keep_last=None) as ckpt:
        ckpt.save(1, {"model": model}, extra_files={"config.json": cfg.to_json_string().encode()})
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, out)
    dist.barrier()
    dist.destroy_process_group()
    exit_rank(0)  # inside main(): what holds the group is still alive (see _rank_exit)


if __name__ == "__main__":
    exit_rank(main())
