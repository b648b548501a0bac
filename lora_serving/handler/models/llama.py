"""The Llama decoder, which Mistral and Qwen2 share with small differences (see their files).

Our own forward pass over the checkpoint's tensors: q/k/v fused into one projection and gate/up into
another (one matmul each instead of three and two), attention over the paged KV cache, and a LoRA hook
after every projection group. Every numerical step follows the reference implementation's order of
operations, so that fp32 greedy output equals transformers' token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_serving.handler.attention import paged_attention
from lora_serving.handler.errors import ModelLoadError
from lora_serving.handler.forward_context import ForwardContext
from lora_serving.handler.lora.peft_adapter import DEFAULT_PEFT_MODULES, PeftModules
from lora_serving.handler.models.projection import Projection
from lora_serving.handler.models.rope import RotaryTable
from lora_serving.handler.models.weights import CheckpointTensors
from lora_serving.handler.tp.comm import TensorParallelComm
from lora_serving.handler.tp.plan import ModelShape, ShardingPlan

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# The projection groups a LoRA hook sees, and the PEFT module names packed into each, in output order.
LORA_GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 and cast back before the weight, as the reference does.
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class DecoderLayer:
    def __init__(self, model: "LlamaModel", index: int, tensors: CheckpointTensors) -> None:
        self.prefix = f"model.layers.{index}."
        self.tensors = tensors
        self.index = index
        self.model = model
        self.sliding_window = model.sliding_windows[index]
        self.rotary = model.rotary_for_layer(index)
        self.input_norm = self.load_norm("input_layernorm.weight")
        self.post_attention_norm = self.load_norm("post_attention_layernorm.weight")
        if model.sandwich_norms:  # Gemma: the pre-MLP norm has its own weight; post_attention norms o's output
            self.pre_feedforward_norm = self.load_norm("pre_feedforward_layernorm.weight")
            self.post_feedforward_norm = self.load_norm("post_feedforward_layernorm.weight")
        if model.qk_norm:
            self.q_norm = self.load_norm("self_attn.q_norm.weight")
            self.k_norm = self.load_norm("self_attn.k_norm.weight")
        self.qkv = Projection(*self.load_column_parallel("self_attn", "qkv", model.qkv_bias))
        self.o, self.o_bias_after_reduce = self.load_row_parallel("self_attn.o_proj", model.o_bias)
        self.load_mlp()

    # ---- loading -------------------------------------------------------------------------------------

    def load(self, name: str, rows: slice | None = None, columns: slice | None = None) -> torch.Tensor:
        model = self.model
        return self.tensors.get_part(self.prefix + name, model.dtype, rows, columns).to(model.device)

    def load_norm(self, name: str) -> torch.Tensor:
        return self.model.norm_weight(self.load(name))

    def load_column_parallel(self, parent: str, group: str, bias: bool):
        """Each module's output rows that this rank holds, concatenated (q/k/v, gate/up); from one fused
        tensor where the checkpoint stores the group as one module (Phi-3's qkv_proj, gate_up_proj)."""
        model, plan = self.model, self.model.plan
        modules = LORA_GROUPS[group]
        rows = {m: plan.output_rows(m) if plan else None for m in modules}
        fused = model.fused_checkpoint_modules.get(group)
        if fused is None:
            weight = torch.cat([self.load(f"{parent}.{m}.weight", rows[m]) for m in modules])
            return weight, torch.cat([self.load(f"{parent}.{m}.bias", rows[m]) for m in modules]) if bias else None
        offsets = model.fused_offsets(group)
        whole = {m: slice(0, model.full_out_features(m)) for m in modules}
        parts = [slice(offsets[m] + (rows[m] or whole[m]).start, offsets[m] + (rows[m] or whole[m]).stop)
                 for m in modules]
        weight = torch.cat([self.load(f"{parent}.{fused}.weight", part) for part in parts])
        return weight, torch.cat([self.load(f"{parent}.{fused}.bias", part) for part in parts]) if bias else None

    def load_row_parallel(self, name: str, bias: bool) -> tuple[Projection, torch.Tensor | None]:
        """The projection of this rank's input columns, and the bias to add once the partial sums are
        reduced (inside the projection when nothing is sharded, as before tensor parallelism)."""
        plan = self.model.plan
        weight = self.load(f"{name}.weight", columns=plan.input_columns(name.split(".")[-1]) if plan else None)
        bias_tensor = self.load(f"{name}.bias") if bias else None
        if self.model.comm is None:
            return Projection(weight, bias_tensor), None
        return Projection(weight), bias_tensor

    def load_mlp(self) -> None:
        model = self.model
        self.gate_up = Projection(*self.load_column_parallel("mlp", "gate_up", model.mlp_bias))
        self.down, self.down_bias_after_reduce = self.load_row_parallel("mlp.down_proj", model.mlp_bias)

    # ---- forward -------------------------------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, k_cache, v_cache) -> torch.Tensor:
        model = self.model
        num_tokens = hidden.shape[0]
        lora = ctx.lora
        norm, eps = model.norm, model.rms_norm_eps

        x = norm(hidden, self.input_norm, eps)
        qkv = self.qkv(x)
        if lora is not None:
            lora.apply(self.index, "qkv", qkv, x)
        # q and k sit side by side in qkv (this rank's heads), so RoPE rotates them as one set of heads: half
        # the elementwise calls of rotating each, the same arithmetic per element.
        heads = model.num_heads + model.num_kv_heads
        q_and_k = qkv[:, : model.q_size + model.kv_size].view(num_tokens, heads, model.head_dim)
        if model.qk_norm:  # per head, before RoPE (Qwen3, Gemma 3)
            q_and_k = torch.cat((norm(q_and_k[:, : model.num_heads], self.q_norm, eps),
                                 norm(q_and_k[:, model.num_heads :], self.k_norm, eps)), dim=1)
        q_and_k = self.rotary.apply(q_and_k, ctx.positions)
        q, k = q_and_k[:, : model.num_heads], q_and_k[:, model.num_heads :]
        v = qkv[:, model.q_size + model.kv_size :].view(num_tokens, model.num_kv_heads, model.head_dim)
        attn = paged_attention(q, k, v, k_cache, v_cache, ctx, self.sliding_window, model.attention_scale,
                               model.attn_logit_softcapping)
        attn = attn.reshape(num_tokens, model.q_size)
        o = self.o(attn)
        if lora is not None:
            lora.apply(self.index, "o", o, attn)
        o = self._reduce(o, "o", self.o_bias_after_reduce)
        if model.sandwich_norms:
            hidden = hidden + norm(o, self.post_attention_norm, eps)
            x = norm(hidden, self.pre_feedforward_norm, eps)
            return hidden + norm(self.mlp(x, lora), self.post_feedforward_norm, eps)
        hidden = hidden + o
        x = norm(hidden, self.post_attention_norm, eps)
        return hidden + self.mlp(x, lora)

    def mlp(self, x: torch.Tensor, lora) -> torch.Tensor:
        model = self.model
        gate_up = self.gate_up(x)
        if lora is not None:
            lora.apply(self.index, "gate_up", gate_up, x)
        gate, up = gate_up.split([model.intermediate_size, model.intermediate_size], dim=-1)
        mlp_hidden = model.activation(gate) * up
        down = self.down(mlp_hidden)
        if lora is not None:
            lora.apply(self.index, "down", down, mlp_hidden)
        return self._reduce(down, "down", self.down_bias_after_reduce)

    def _reduce(self, partial: torch.Tensor, what: str, bias: torch.Tensor | None) -> torch.Tensor:
        """A row-parallel projection's partial sums (LoRA delta included) added over ranks, then its bias."""
        comm = self.model.comm
        if comm is None:
            return partial
        comm.all_reduce(partial, what)
        return partial if bias is None else partial + bias


class LlamaModel:
    """Llama: optional biases from `attention_bias` / `mlp_bias`, no sliding window.

    With a sharding plan and its rank's collectives (handler/tp/), the model holds one rank's shard:
    num_heads, num_kv_heads, intermediate_size, q_size and kv_size are then this rank's, and only rank 0
    has the LM head. The full shapes stay in `shape`.

    The class attributes below are what the other families change (their files say why).
    """

    layer_class = DecoderLayer
    norm = staticmethod(rms_norm)
    # Per-head RMSNorm of q and k before RoPE (self_attn.q_norm / k_norm).
    qk_norm = False
    # Norms around the attention and MLP outputs too (pre_feedforward_layernorm, post_feedforward_layernorm).
    sandwich_norms = False
    # LoRA group -> the checkpoint's one module holding the group's weights stacked by output rows.
    fused_checkpoint_modules: dict[str, str] = {}
    # What a PEFT adapter may target on this family, and which of the engine's modules each feeds.
    peft_modules: PeftModules = DEFAULT_PEFT_MODULES
    # Whether torch.compile can trace a decode step through the layers (handler/runner/compiled_decode.py).
    traceable_decode = True

    def __init__(self, hf_config, model_dir, dtype: torch.dtype, device: torch.device,
                 plan: ShardingPlan | None = None, comm: TensorParallelComm | None = None) -> None:
        self.hf_config = hf_config
        self.dtype = dtype
        self.device = torch.device(device)
        self.shape = ModelShape.from_hf_config(hf_config)
        self.plan = plan if plan is not None and plan.world_size > 1 else None
        self.comm = comm if self.plan is not None else None
        self.vocab_size = hf_config.vocab_size
        self.hidden_size = hf_config.hidden_size
        self.intermediate_size = self.shape.intermediate_size
        self.num_layers = hf_config.num_hidden_layers
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(hf_config, "head_dim", None) or self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.plan is not None:
            self.num_heads = self.plan.num_local_heads
            self.num_kv_heads = self.plan.num_local_kv_heads
            self.intermediate_size = self.plan.num_local_intermediate
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.attention_scale = self.query_scale(hf_config, self.head_dim)
        self.attn_logit_softcapping = getattr(hf_config, "attn_logit_softcapping", None)
        self.final_logit_softcapping = getattr(hf_config, "final_logit_softcapping", None)
        self.rms_norm_eps = hf_config.rms_norm_eps
        act_name = self.activation_name(hf_config)
        if act_name not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported activation {act_name!r}")
        self.activation = ACTIVATIONS[act_name]
        self.max_position_embeddings = hf_config.max_position_embeddings
        self.qkv_bias = self.has_qkv_bias(hf_config)
        self.o_bias = self.has_o_bias(hf_config)
        self.mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        self.sliding_windows = self.layer_sliding_windows(hf_config)
        self.rotary = self.make_rotary(hf_config)
        self.embed_scale = self.embedding_scale(hf_config)

        tensors = CheckpointTensors(model_dir)
        self.embed_tokens = tensors.get("model.embed_tokens.weight", dtype).to(self.device)
        self.layers = [self.layer_class(self, index, tensors) for index in range(self.num_layers)]
        self.final_norm = self.norm_weight(tensors.get("model.norm.weight", dtype).to(self.device))
        if self.plan is not None and not self.plan.holds_lm_head:
            self.lm_head = None
        elif getattr(hf_config, "tie_word_embeddings", False) or "lm_head.weight" not in tensors:
            self.lm_head = Projection(self.embed_tokens)
        else:
            self.lm_head = Projection(tensors.get("lm_head.weight", dtype).to(self.device))

    # ---- what differs between the family's members --------------------------------------------------

    @classmethod
    def has_qkv_bias(cls, hf_config) -> bool:
        return bool(getattr(hf_config, "attention_bias", False))

    @classmethod
    def has_o_bias(cls, hf_config) -> bool:
        return bool(getattr(hf_config, "attention_bias", False))

    @classmethod
    def layer_sliding_windows(cls, hf_config) -> list[int | None]:
        return [None] * hf_config.num_hidden_layers

    @staticmethod
    def windows_from_layer_types(hf_config) -> list[int | None]:
        """`sliding_window` on the layers whose `layer_types` entry is sliding_attention, None elsewhere."""
        window = getattr(hf_config, "sliding_window", None)
        layer_types = getattr(hf_config, "layer_types", None) or ["full_attention"] * hf_config.num_hidden_layers
        return [window if kind == "sliding_attention" else None for kind in layer_types]

    @classmethod
    def query_scale(cls, hf_config, head_dim: int) -> float:
        return head_dim**-0.5

    @classmethod
    def activation_name(cls, hf_config) -> str:
        return getattr(hf_config, "hidden_act", "silu")

    @classmethod
    def embedding_scale(cls, hf_config) -> float | None:
        return None

    def norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A norm's checkpoint weight in the form `norm` multiplies by."""
        return weight

    def make_rotary(self, hf_config, layer_type: str | None = None) -> RotaryTable:
        return RotaryTable(hf_config, self.head_dim, self.max_position_embeddings, self.dtype, self.device, layer_type)

    def rotary_for_layer(self, index: int) -> RotaryTable:
        return self.rotary

    def full_out_features(self, module: str) -> int:
        shape = self.shape
        if module == "q_proj":
            return shape.num_heads * shape.head_dim
        if module in ("k_proj", "v_proj"):
            return shape.num_kv_heads * shape.head_dim
        return shape.intermediate_size

    def fused_offsets(self, group: str) -> dict[str, int]:
        """Where each module's rows start in the group's fused checkpoint tensor."""
        offsets, start = {}, 0
        for module in LORA_GROUPS[group]:
            offsets[module] = start
            start += self.full_out_features(module)
        return offsets

    # ---- forward ------------------------------------------------------------------------------------

    def lora_module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every projection an adapter may target, in the whole model."""
        shape = self.shape
        hidden, inter = shape.hidden_size, shape.intermediate_size
        q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        return {
            "q_proj": (hidden, q_size),
            "k_proj": (hidden, kv_size),
            "v_proj": (hidden, kv_size),
            "o_proj": (q_size, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }

    def expert_lora(self) -> tuple[dict[str, tuple[int, int]], int, str]:
        """A mixture of experts' expert parameters that take LoRA, (in, out) each; the number of experts; why
        expert LoRA is refused where the model has experts but does not serve it."""
        return {}, 0, ""

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, kv_cache: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, H]; kv_cache [layers, 2, kv_heads, blocks, block_size, d]."""
        return self.forward_layers(input_ids, ctx, kv_cache)

    def forward_layers(self, input_ids: torch.Tensor, ctx: ForwardContext, kv_cache: torch.Tensor) -> torch.Tensor:
        """`forward` without its inference-mode wrapper: what the compiled decode step traces."""
        hidden = F.embedding(input_ids, self.embed_tokens)
        if self.embed_scale is not None:  # Gemma: sqrt(hidden_size), rounded to the model's dtype first
            hidden = hidden * torch.tensor(self.embed_scale).to(hidden.dtype)
        for layer in self.layers:
            hidden = layer.forward(hidden, ctx, kv_cache[layer.index, 0], kv_cache[layer.index, 1])
        return self.norm(hidden, self.final_norm, self.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> fp32 logits [B, V]."""
        return soft_cap(self.lm_head(hidden), self.final_logit_softcapping).float()
