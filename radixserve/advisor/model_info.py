"""What the advisor needs to know about a model: its tokenizer, its shape and the KV cost.

The replay needs no forward pass, so the advisor reads only the tokenizer and the architecture
(no weights) unless it must measure the prefill rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixserve.config import EMBEDDED_MODEL
from radixserve.errors import ModelLoadError


@dataclass(slots=True)
class ModelInfo:
    """A model as the advisor sees it.

    ``kv_dtype`` is the dtype the KV cache would be stored in (the engine stores KV in the
    weights' dtype: float32 on CPU, bfloat16 on GPU by default).
    """

    model_id: str
    tokenizer: Any  # radixserve.model.tokenizer.Tokenizer
    arch: Any  # radixserve.model.arch.ModelArch
    kv_dtype: str = "float32"
    max_model_len: int | None = None

    @property
    def dtype_bytes(self) -> int:
        import torch

        from radixserve.model.arch import parse_dtype

        return torch.empty((), dtype=parse_dtype(self.kv_dtype)).element_size()

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x dtype bytes."""
        return int(self.arch.kv_bytes_per_token(self.kv_dtype))

    def kv_formula(self) -> dict[str, int | str]:
        a = self.arch
        return {
            "layers": a.num_layers,
            "kv_heads": a.num_kv_heads,
            "head_dim": a.head_dim,
            "dtype": self.kv_dtype,
            "dtype_bytes": self.dtype_bytes,
            "bytes_per_token": self.kv_bytes_per_token,
        }


def model_info_from_loaded(loaded: Any, kv_dtype: str | None = None) -> ModelInfo:
    """ModelInfo of an already loaded model (radixserve.model.loader.LoadedModel)."""
    dtype = kv_dtype or str(loaded.dtype).removeprefix("torch.")
    return ModelInfo(loaded.model_id, loaded.tokenizer, loaded.arch, dtype, loaded.max_model_len or None)


def load_model_info(source: str, kv_dtype: str = "float32", max_model_len: int | None = None) -> ModelInfo:
    """Tokenizer and shape of ``source`` ('embedded', a .gguf file, an HF folder, dummy:<preset>)
    without reading any weights. Raises ModelLoadError like load_model does."""
    from radixserve.model import loader
    from radixserve.model.arch import ModelArch, preset
    from radixserve.model.gguf_file import GGUFFile
    from radixserve.model.tokenizer import Tokenizer

    source = (source or "").strip()
    try:
        if source == EMBEDDED_MODEL or source.lower().endswith(".gguf"):
            path = loader.find_embedded_gguf() if source == EMBEDDED_MODEL else Path(source).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"model source {source!r} not found")
            g = GGUFFile(path)
            arch = loader.arch_from_gguf(g)
            tokenizer = Tokenizer.from_gguf(g)
            model_id = loader.EMBEDDED_MODEL_ID if source == EMBEDDED_MODEL else path.stem
        elif source.startswith(loader.DUMMY_PREFIX):
            arch = preset(source[len(loader.DUMMY_PREFIX) :])
            # Same choice as the loader: the embedded vocabulary when it fits, else bytes.
            tokenizer = Tokenizer.from_gguf(loader.find_embedded_gguf()) if loader.embedded_available() else None
            if tokenizer is None or tokenizer.vocab_size > arch.vocab_size:
                tokenizer = Tokenizer.byte_level()
            model_id = source
        else:
            folder = Path(source).expanduser()
            if not (folder / "config.json").is_file():
                raise ModelLoadError(
                    f"model source {source!r} not found: expected 'embedded', 'dummy:<preset>', "
                    "a .gguf file or a Hugging Face checkpoint folder"
                )
            arch = ModelArch.from_hf_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
            tokenizer = Tokenizer.from_hf_folder(folder)
            model_id = folder.resolve().name
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not read model {source!r}: {e}") from e
    limit = min(max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
    return ModelInfo(model_id, tokenizer, arch, kv_dtype, limit)
