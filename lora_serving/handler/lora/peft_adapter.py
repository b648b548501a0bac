"""Reading a PEFT LoRA adapter directory, and refusing what this engine cannot serve exactly.

PEFT writes `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`); tensor names
look like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. Each targeted projection
gets `lora_A` [r, in] and `lora_B` [out, r]; its output gains `(x @ A.T) @ B.T * scaling` with
scaling = alpha / r, or alpha / sqrt(r) with rslora. r and alpha may differ per module
(`rank_pattern`, `alpha_pattern`, matched as PEFT matches them).

What an adapter may target is the base model family's (BaseModelShapes.peft_modules). A module the
checkpoint fuses (Phi-3's qkv_proj, gate_up_proj) feeds several of the engine's modules: its A is shared
by them and its B split by their output rows, which computes the same delta, row for row. LoRA on a
mixture of experts' expert parameters (`target_parameters`) is read by lora/expert_lora.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from lora_serving.handler.errors import InvalidAdapterError
from lora_serving.handler.lora.expert_lora import EXPERT_MODULE, ExpertLora, split_experts, which_parameter

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
SERVABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# PEFT module name -> (its parent in a decoder layer, the engine's modules it feeds, in output-row order).
PeftModules = dict[str, tuple[str, tuple[str, ...]]]
DEFAULT_PEFT_MODULES: PeftModules = {module: (parent, (module,)) for module, parent in _MODULE_PARENT.items()}
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(\w+)\.([\w.]+?)\.lora_([AB])(?:\.default)?\.weight$"
)


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One registered content of an adapter: the name may be re-registered, the content hash may not lie."""

    name: str
    path: Path
    content_hash: str


@dataclass(slots=True)
class ModuleLora:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], already multiplied by the module's scaling


@dataclass(slots=True)
class AdapterWeights:
    """An adapter in host memory, ready to be copied into a device slot."""

    version: AdapterVersion
    modules: dict[tuple[int, str], ModuleLora]  # (layer index, module name) -> weights
    # (layer index, expert parameter) -> every expert's weights
    expert_modules: dict[tuple[int, str], ExpertLora] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        loras = [*self.modules.values(), *self.expert_modules.values()]
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in loras)

    @property
    def max_rank(self) -> int:
        return max([m.a.shape[0] for m in self.modules.values()] + [m.a.shape[1] for m in self.expert_modules.values()])


@dataclass(frozen=True, slots=True)
class BaseModelShapes:
    """What an adapter must fit: the layer count and each projection's (in, out) features."""

    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # the engine's modules
    model_type: str
    peft_modules: PeftModules = field(default_factory=lambda: dict(DEFAULT_PEFT_MODULES))
    # A mixture of experts': each expert parameter's (in, out) where expert LoRA is served (else empty, and
    # `expert_lora_refusal` says why when the model has experts).
    expert_parameters: dict[str, tuple[int, int]] = field(default_factory=dict)
    num_experts: int = 0
    expert_lora_refusal: str = ""

    def refusal_for(self, parent: str, module: str) -> str | None:
        """Why a LoRA on `parent.module` cannot be served on this model (None: it can)."""
        known = self.peft_modules.get(module)
        if known is not None and known[0] == parent:
            return None
        servable = ", ".join(self.peft_modules)
        if "experts" in module.split(".") or (module == "gate" and parent != "self_attn"):
            return (f"it targets {parent}.{module}, a mixture-of-experts {'router' if module == 'gate' else 'expert'}"
                    f" module; LoRA on a {self.model_type} model is served on {servable} only")
        return f"it targets {parent}.{module}, which a {self.model_type} model does not have (servable: {servable})"


def load_peft_adapter(
    name: str,
    adapter_dir: str | Path,
    base: BaseModelShapes,
    max_rank: int,
    dtype: torch.dtype,
) -> AdapterWeights:
    """Read, check and scale an adapter; InvalidAdapterError names the adapter and the reason."""
    adapter_dir = Path(adapter_dir)

    def refuse(reason: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"Adapter {name} cannot be served: {reason}")

    if not adapter_dir.is_dir():
        raise refuse(f"{adapter_dir} is not a directory")
    config = _read_config(adapter_dir, refuse)
    _check_config(config, base, refuse)
    config_bytes = (adapter_dir / CONFIG_FILE).read_bytes()
    tensors, weights_bytes = _read_tensors(adapter_dir, refuse)
    digest = hashlib.sha256(config_bytes + weights_bytes).hexdigest()[:32]
    version = AdapterVersion(name=name, path=adapter_dir, content_hash=digest)

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    expert_pairs: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in tensors.items():
        match = _TENSOR_NAME.match(tensor_name)
        if match is None:
            raise refuse(f"tensor {tensor_name!r} is not a LoRA A/B weight of a decoder-layer projection "
                         "(embedding, lm_head, DoRA and bias weights cannot be served unmerged)")
        layer, parent, module, which = int(match[1]), match[2], match[3], match[4]
        if base.expert_parameters and EXPERT_MODULE.match(module):
            expert_pairs.setdefault((layer, parent, module), {})[which] = tensor
            continue
        refusal = base.refusal_for(parent, module)
        if refusal is not None:
            raise refuse(refusal)
        if layer >= base.num_layers:
            raise refuse(f"it has weights for layer {layer} but the base model has {base.num_layers} layers")
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs and not expert_pairs:
        raise refuse("it holds no LoRA weights")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[tuple[int, str], ModuleLora] = {}
    for (layer, module), pair in sorted(pairs.items()):
        parent, engine_modules = base.peft_modules[module]
        key = f"model.layers.{layer}.{parent}.{module}"
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise refuse(f"{key} has no {missing} weight")
        a, b = pair["A"], pair["B"]
        in_features = base.module_shapes[engine_modules[0]][0]
        part_rows = [base.module_shapes[m][1] for m in engine_modules]
        out_features = sum(part_rows)
        rank = _pattern_value(rank_pattern, key, config["r"])
        alpha = _pattern_value(alpha_pattern, key, config.get("lora_alpha", 8))
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features:
            raise refuse(f"{key} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not fit the "
                         f"base model's {in_features} -> {out_features} projection")
        if a.shape[0] != b.shape[1]:
            raise refuse(f"{key} has lora_A of rank {a.shape[0]} but lora_B of rank {b.shape[1]}")
        if a.shape[0] != rank:
            raise refuse(f"adapter_config.json gives {key} rank {rank} but its tensors have rank {a.shape[0]}")
        if rank > max_rank:
            raise refuse(f"{key} has rank {rank}, above option.max_lora_rank={max_rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise refuse(f"{key} has NaN or infinite weights")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        a = a.to(dtype).contiguous()
        scaled_b = (b.to(torch.float32) * scaling).to(dtype)
        for engine_module, rows in zip(engine_modules, scaled_b.split(part_rows)):
            modules[(layer, engine_module)] = ModuleLora(a=a, b=rows.contiguous())
    experts = _expert_modules(expert_pairs, config, base, max_rank, dtype, refuse)
    return AdapterWeights(version=version, modules=modules, expert_modules=experts)


def _expert_modules(expert_pairs, config: dict, base: BaseModelShapes, max_rank: int, dtype: torch.dtype,
                    refuse) -> dict[tuple[int, str], ExpertLora]:
    experts: dict[tuple[int, str], ExpertLora] = {}
    for (layer, parent, module), pair in sorted(expert_pairs.items()):
        where = f"model.layers.{layer}.{parent}.{module}"
        if set(pair) != {"A", "B"}:
            raise refuse(f"{where} has no {'lora_B' if 'A' in pair else 'lora_A'} weight")
        a, b = pair["A"], pair["B"]
        parameter = which_parameter(a, b, base.expert_parameters) if a.dim() == b.dim() == 2 else None
        if parameter is None or a.shape[0] != b.shape[1] or a.shape[0] % base.num_experts:
            raise refuse(f"{where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which fit none of the "
                         f"{base.num_experts} experts' parameters ({base.expert_parameters})")
        key = f"model.layers.{layer}.{parent}.experts.{parameter}"
        rank = a.shape[0] // base.num_experts
        expected = _pattern_value(config.get("rank_pattern") or {}, key, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, key, config.get("lora_alpha", 8))
        if rank != expected:
            raise refuse(f"adapter_config.json gives {key} rank {expected} but its tensors have rank {rank}")
        if rank > max_rank:
            raise refuse(f"{key} has rank {rank}, above option.max_lora_rank={max_rank}")
        if (layer, parameter) in experts:
            raise refuse(f"{key} has two LoRA weights")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise refuse(f"{key} has NaN or infinite weights")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        experts[(layer, parameter)] = split_experts(a, b, base.num_experts, scaling, dtype)
    return experts


def _read_config(adapter_dir: Path, refuse) -> dict:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise refuse(f"{CONFIG_FILE} is missing in {adapter_dir}")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise refuse(f"{CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise refuse(f"{CONFIG_FILE} is not a JSON object")
    return config


def _check_config(config: dict, base: BaseModelShapes, refuse) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise refuse(f"peft_type is {peft_type}; only LORA adapters are served")
    if config.get("use_dora"):
        raise refuse("it is a DoRA adapter (use_dora=true), whose magnitude vectors need the merged weight")
    if config.get("modules_to_save"):
        raise refuse(f"modules_to_save={config['modules_to_save']} replaces whole base modules per adapter")
    if config.get("bias", "none") not in ("none", None) or config.get("lora_bias"):
        raise refuse("it trains biases, which would change the base model for every request")
    if config.get("fan_in_fan_out"):
        raise refuse("fan_in_fan_out=true is for Conv1D models (GPT-2), not this base model")
    for target in config.get("target_parameters") or []:
        if base.expert_parameters and target.split(".")[-2:-1] == ["experts"] \
                and target.split(".")[-1] in base.expert_parameters:
            continue
        reason = base.expert_lora_refusal or (
            f"servable: {', '.join(base.peft_modules)}"
            + (f" and the experts' {', '.join(base.expert_parameters)}" if base.expert_parameters else ""))
        raise refuse(f"target_parameters names {target}, LoRA on a parameter this model does not serve it on ({reason})")
    for unsupported in ("layer_replication", "trainable_token_indices"):
        if config.get(unsupported):
            raise refuse(f"{unsupported} is not supported")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise refuse(f"adapter_config.json has r={rank!r}; expected a positive integer")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        # A regex: PEFT matches it against full module names; the tensors say what it hit.
        return
    for target in targets:
        if target in ("embed_tokens", "lm_head"):
            raise refuse(f"it targets {target}; embedding and lm_head LoRA cannot be served")
        if target not in base.peft_modules:
            raise refuse(f"it targets {target}, which a {base.model_type} model does not have "
                         f"(servable: {', '.join(base.peft_modules)})")


def _pattern_value(patterns: dict, key: str, default):
    """The value PEFT would use for module `key`: the first pattern matching the name's end."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _read_tensors(adapter_dir: Path, refuse) -> tuple[dict[str, torch.Tensor], bytes]:
    safetensors_path = adapter_dir / SAFETENSORS_FILE
    bin_path = adapter_dir / BIN_FILE
    if safetensors_path.is_file():
        data = safetensors_path.read_bytes()
        try:
            return load_safetensors_bytes(data), data
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise refuse(f"{SAFETENSORS_FILE} is corrupt ({error})") from None
    if bin_path.is_file():
        data = bin_path.read_bytes()
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and torch errors all mean the same to the caller
            raise refuse(f"{BIN_FILE} cannot be read ({type(error).__name__}: {error})") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise refuse(f"{BIN_FILE} is not a state dict of tensors")
        return state, data
    raise refuse(f"no {SAFETENSORS_FILE} or {BIN_FILE} in {adapter_dir}")
