"""The numerical reference: a Hugging Face transformers model holding exactly our weights.

Used by tests and benchmarks (transformers is a test dependency, imported lazily). Our model
stacks q/k/v and gate/up; here they are split back into transformers' names.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from radixserve.model.llama import _STACKED, LlamaForCausalLM


def hf_named_weights(model: LlamaForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameters under transformers' names, stacked matrices split into their parts."""
    parts_of: dict[str, list[tuple[str, int]]] = {}
    for hf, (ours, index) in _STACKED.items():
        parts_of.setdefault(ours, []).append((hf, index))
    for name, param in model.named_parameters():
        stacked = next((ours for ours in parts_of if f".{ours}." in name), None)
        if stacked is None:
            yield name, param.detach()
            continue
        for hf, index in parts_of[stacked]:
            start, length = model._shard_range(name, index)
            yield name.replace(stacked, hf), param.detach().narrow(0, start, length)


def transformers_model(model: LlamaForCausalLM) -> torch.nn.Module:
    """A transformers *ForCausalLM with the same config and weights, in eval mode."""
    import transformers

    config_dict = model.arch.to_hf_config()
    architecture = config_dict["architectures"][0]
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    # Built directly in the target dtype on the target device: an 8B model initialized in fp32
    # on the CPU first would take minutes and 32 GB of host memory.
    # Not .to(dtype) afterwards: that would also round the fp32 RoPE inv_freq buffer.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(model.device):
            hf = getattr(transformers, architecture)(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    state = dict(hf_named_weights(model))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings) and "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weights do not line up with transformers: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf
