"""vLLM 0.33.0's own loader code, run on the CPU without installing vLLM (it pins torch 2.14.0 and
a GPU stack; only its Python files are read, from its wheel).

What runs is vLLM's source, unchanged: the speculators config conversion
(``transformers_utils/configs/speculators/{algos,base}.py``), the EAGLE-3 draft module
(``model_executor/models/llama_eagle3.py``: ``Eagle3LlamaForCausalLM``, its ``LlamaModel`` and
``LlamaDecoderLayer`` constructors, ``load_weights``, ``combine_hidden_states``,
``compute_logits``) and the weight loader it uses (``WeightsMapper``, ``AutoWeightsLoader``,
``maybe_prefix`` from ``model_executor/models/utils.py``, ``default_weight_loader``).

What is stood in for, below, are vLLM's layer classes that file builds on (base ``LlamaDecoderLayer``,
attention and MLP, the parallel linear layers, ``RMSNorm``, embeddings, ``LogitsProcessor``): same
parameter names, shapes and shard layout as in vLLM's ``llama.py`` and ``linear.py``, plain torch
math, no kernels, no tensor parallelism. vLLM's attention, rotary kernels and serving are not run.

The wheel is found, in order, at ``$PEAGLE_EXT_VLLM_WHEEL``, as an installed vllm 0.33.0, in the
cache directory (``$PEAGLE_EXT_CACHE``, default ``~/.cache/peagle_ext``), or downloaded there with
``pip download --no-deps``; the tests skip, saying why, when none works.
"""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VLLM_VERSION = "0.33.0"
_SOURCES = {
    "algos": "vllm/transformers_utils/configs/speculators/algos.py",
    "base": "vllm/transformers_utils/configs/speculators/base.py",
    "transformers_utils": "vllm/transformers_utils/utils.py",
    "llama_eagle3": "vllm/model_executor/models/llama_eagle3.py",
    "models_utils": "vllm/model_executor/models/utils.py",
    "weight_utils": "vllm/model_executor/model_loader/weight_utils.py",
    "spec_decode_utils": "vllm/v1/spec_decode/utils.py",
}
_DOWNLOAD_TIMEOUT_S = 1200


def _cache_dir() -> Path:
    return Path(os.environ.get("PEAGLE_EXT_CACHE") or Path.home() / ".cache" / "peagle_ext")


def _download(cache: Path) -> Path:
    """``pip download`` the wheel (no dependencies) into ``cache``; skip with pip's reason on failure."""
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_x86_64", "--dest", str(cache), f"vllm=={VLLM_VERSION}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"vLLM {VLLM_VERSION}'s wheel could not be downloaded: {error}")
    wheels = sorted(cache.glob(f"vllm-{VLLM_VERSION}-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"vLLM {VLLM_VERSION}'s wheel could not be downloaded (pip download: {last})")
    return wheels[-1]


def read_sources() -> dict[str, str]:
    """The text of the vLLM files this module runs, from the first place that has them."""
    given = os.environ.get("PEAGLE_EXT_VLLM_WHEEL")
    if given:
        wheel = Path(given)
        if not wheel.is_file():
            pytest.skip(f"PEAGLE_EXT_VLLM_WHEEL={given} is not a file")
    else:
        try:
            installed = importlib.metadata.distribution("vllm")
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is not None and installed.version.split("+")[0] == VLLM_VERSION:
            root = Path(installed.locate_file(""))
            return {key: (root / path).read_text() for key, path in _SOURCES.items()}
        cached = sorted(_cache_dir().glob(f"vllm-{VLLM_VERSION}-*.whl"))
        wheel = cached[-1] if cached else _download(_cache_dir())
    try:
        with zipfile.ZipFile(wheel) as archive:
            return {key: archive.read(path).decode() for key, path in _SOURCES.items()}
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        pytest.skip(f"{wheel} is not a usable vLLM {VLLM_VERSION} wheel: {error}")


def _definitions(source: str, names: set[str]) -> str:
    """The top-level classes, functions and assignments named ``names`` of a module's source."""
    found, parts = set(), []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            name = node.name
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            name = getattr(target, "id", None)
        else:
            continue
        if name in names:
            found.add(name)
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            parts.append("\n".join(source.splitlines()[start - 1 : node.end_lineno]))
    missing = names - found
    assert not missing, f"vLLM {VLLM_VERSION}'s source has no {sorted(missing)}"
    return "\n\n\n".join(parts)


# --- stand-ins for the vLLM layers llama_eagle3.py builds on ----------------------------------------


class _Linear(nn.Module):
    """A linear layer with vLLM's parameter names; ``shards`` splits the output rows (stacked
    weights: q/k/v, gate/up), loaded by shard id as vLLM's ``load_weights`` does."""

    def __init__(self, input_size, output_size, bias=True, shards=None, return_bias=True, **_):
        super().__init__()
        self.weight = nn.Parameter(torch.full((output_size, input_size), float("nan")))
        self.bias = nn.Parameter(torch.full((output_size,), float("nan"))) if bias else None
        self.shards, self.return_bias = shards or {}, return_bias

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        return (out, None) if self.return_bias else out

    def load_weights(self, weights):
        for name, loaded in weights:
            param = getattr(self, name)
            shard_id = getattr(loaded, "shard_id", None)
            start, size = self.shards[shard_id] if shard_id is not None else (0, param.shape[0])
            target = param.data[start : start + size]
            assert target.shape == loaded.shape, (
                f"{name} shard {shard_id}: {tuple(loaded.shape)} into {tuple(target.shape)}")
            target.copy_(loaded)
            yield name


def _qkv(hidden_size, head_size, total_num_heads, total_num_kv_heads, bias=True, **_):
    q, kv = total_num_heads * head_size, total_num_kv_heads * head_size
    return _Linear(hidden_size, q + 2 * kv, bias, shards={"q": (0, q), "k": (q, kv), "v": (q + kv, kv)})


class RMSNorm(nn.Module):
    """vLLM's RMSNorm: ``forward(x)``, or ``forward(x, residual)`` = norm of x + residual, and that sum."""

    def __init__(self, hidden_size, eps=1e-6, **_):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), float("nan")))
        self.eps = eps

    def forward(self, x, residual=None):
        if residual is not None:
            x = residual = x + residual
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        out = normed.to(x.dtype) * self.weight
        return out if residual is None else (out, residual)


class _Embedding(nn.Module):
    def __init__(self, num_embeddings, embedding_dim, **_):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_embeddings, embedding_dim), float("nan")))


class _BaseLlamaDecoderLayer(nn.Module):
    """vLLM llama.py's LlamaDecoderLayer parameters: self_attn (qkv_proj, o_proj), mlp (gate_up_proj,
    down_proj), input_layernorm, post_attention_layernorm; biases as it reads them from the config."""

    def __init__(self, vllm_config, prefix="", config=None):
        super().__init__()
        self.hidden_size = config.hidden_size
        bias = getattr(config, "attention_bias", False) or getattr(config, "bias", False)
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.self_attn = nn.Module()
        attention = self.self_attn
        attention.head_dim, attention.total_num_heads, attention.total_num_kv_heads = head_dim, heads, kv_heads
        self.self_attn.qkv_proj = _qkv(config.hidden_size, head_dim, heads, kv_heads, bias=bias)
        self.self_attn.o_proj = _Linear(heads * head_dim, config.hidden_size, bias=bias)
        intermediate, mlp_bias = config.intermediate_size, getattr(config, "mlp_bias", False)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = _Linear(config.hidden_size, 2 * intermediate, mlp_bias,
                                        shards={0: (0, intermediate), 1: (intermediate, intermediate)})
        self.mlp.down_proj = _Linear(intermediate, config.hidden_size, mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class _LogitsProcessor:
    def __init__(self, vocab_size, scale=1.0, **_):
        self.scale = scale

    def __call__(self, lm_head, hidden_states):
        return F.linear(hidden_states, lm_head.weight) * self.scale


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _exec(module: types.ModuleType, source: str) -> types.ModuleType:
    exec(compile(source, f"<vLLM {VLLM_VERSION} {module.__name__}>", "exec"), module.__dict__)
    return module


def load_vllm(sources: dict[str, str]) -> SimpleNamespace:
    """vLLM's ``SpeculatorsConfig`` and ``Eagle3LlamaForCausalLM`` (and the draft's module), built
    from its source over the stand-ins; sys.modules is left as it was."""
    logger = logging.getLogger("vllm-source")
    utils_source = _definitions(sources["models_utils"],
                                {"WeightsMapper", "_get_tied_embedding_params", "AutoWeightsLoader", "maybe_prefix"})
    modules: dict[str, types.ModuleType] = {}
    for package in ("vllm", "vllm.transformers_utils", "vllm.transformers_utils.configs",
                    "vllm.transformers_utils.configs.speculators", "vllm.model_executor", "vllm.model_executor.models"):
        modules[package] = _module(package, __path__=[])
    modules["vllm.transformers_utils.utils"] = _module("vllm.transformers_utils.utils")
    exec(_definitions(sources["transformers_utils"], {"without_trust_remote_code"}),
         modules["vllm.transformers_utils.utils"].__dict__)
    weight_loader_namespace = {"torch": torch}
    exec(_definitions(sources["weight_utils"], {"default_weight_loader"}), weight_loader_namespace)
    current = {}
    modules.update({
        "vllm.compilation.decorators": _module("vllm.compilation.decorators",
                                               support_torch_compile=lambda *args, **kwargs: (lambda cls: cls)),
        "vllm.config": _module("vllm.config", VllmConfig=object, get_current_vllm_config=lambda: current["config"]),
        "vllm.logger": _module("vllm.logger", init_logger=logging.getLogger),
        "vllm.model_executor.layers.layernorm": _module("vllm.model_executor.layers.layernorm", RMSNorm=RMSNorm),
        "vllm.model_executor.layers.linear": _module("vllm.model_executor.layers.linear", QKVParallelLinear=_qkv,
                                                     ReplicatedLinear=_Linear),
        "vllm.model_executor.layers.logits_processor": _module("vllm.model_executor.layers.logits_processor",
                                                               LogitsProcessor=_LogitsProcessor),
        "vllm.model_executor.layers.quantization.base_config": _module(
            "vllm.model_executor.layers.quantization.base_config", QuantizationConfig=object),
        "vllm.model_executor.layers.vocab_parallel_embedding": _module(
            "vllm.model_executor.layers.vocab_parallel_embedding", ParallelLMHead=_Embedding,
            VocabParallelEmbedding=_Embedding),
        "vllm.model_executor.models.llama": _module(
            "vllm.model_executor.models.llama", LlamaAttention=nn.Module, LlamaForCausalLM=nn.Module,
            LlamaMLP=nn.Module, LlamaDecoderLayer=_BaseLlamaDecoderLayer),
        "vllm.multimodal.inputs": _module("vllm.multimodal.inputs", NestedTensors=object),
    })
    utils = _module("vllm.model_executor.models.utils", re=__import__("re"), itertools=__import__("itertools"),
                    torch=torch, nn=nn, logger=logger, VocabParallelEmbedding=_Embedding,
                    default_weight_loader=weight_loader_namespace["default_weight_loader"],
                    support_quantized_model_reload_from_hp_weights=lambda function: function,
                    StageMissingLayer=type("StageMissingLayer", (nn.Module,), {}),
                    PPMissingLayer=type("PPMissingLayer", (nn.Module,), {}),
                    get_draft_quant_config=lambda vllm_config: None,
                    process_eagle_weight=lambda model, name: None)
    modules["vllm.model_executor.models.utils"] = utils
    executed = {}
    for key, name in (("algos", "vllm.transformers_utils.configs.speculators.algos"),
                      ("base", "vllm.transformers_utils.configs.speculators.base"),
                      ("llama_eagle3", "vllm.model_executor.models.llama_eagle3")):
        executed[key] = modules[name] = _module(name, __package__=name.rpartition(".")[0])

    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)  # the dataclasses and imports of the executed files look there
    try:
        exec("from collections.abc import Iterable, Mapping\nfrom dataclasses import dataclass, field, replace\n"
             "from typing import Any, TypeAlias\nShardId: TypeAlias = str | int | tuple[int, ...]\n"
             "ShardIds: TypeAlias = ShardId | list[ShardId]\n" + utils_source, utils.__dict__)
        for key, module in executed.items():
            _exec(module, sources[key])
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return SimpleNamespace(SpeculatorsConfig=executed["base"].SpeculatorsConfig, llama_eagle3=executed["llama_eagle3"],
                           current=current)


def build_draft(vllm: SimpleNamespace, hf_config, speculative: dict, target_vocab_size: int, target_layers: int = 8):
    """vLLM's Eagle3LlamaForCausalLM for a converted draft config, as its model runner builds it:
    ``speculative`` is what SpeculatorsConfig.extract_vllm_speculative_config returned."""
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=hf_config),
                                           parallel_drafting=speculative.get("parallel_drafting", False)),
        model_config=SimpleNamespace(get_total_num_hidden_layers=lambda: target_layers,
                                     get_vocab_size=lambda: target_vocab_size, dtype=torch.float32),
    )
    vllm.current["config"] = config
    return vllm.llama_eagle3.Eagle3LlamaForCausalLM(vllm_config=config, prefix="")
