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


class DecoderLayer:
    def __init__(self, model: "LlamaModel", index: int, tensors: CheckpointTensors) -> None:
        prefix = f"model.layers.{index}."
        dtype, device, plan = model.dtype, model.device, model.plan

        def load(name: str, rows: slice | None = None, columns: slice | None = None) -> torch.Tensor:
            return tensors.get_part(prefix + name, dtype, rows, columns).to(device)

        def load_column_parallel(parent: str, modules: tuple[str, ...], bias: bool):
            """Each module's output rows that this rank holds, concatenated (q/k/v, gate/up)."""
            rows = {m: plan.output_rows(m) if plan else None for m in modules}
            weight = torch.cat([load(f"{parent}.{m}.weight", rows[m]) for m in modules])
            return weight, torch.cat([load(f"{parent}.{m}.bias", rows[m]) for m in modules]) if bias else None

        def load_row_parallel(name: str, bias: bool) -> tuple[Projection, torch.Tensor | None]:
            """The projection of this rank's input columns, and the bias to add once the partial sums are
            reduced (inside the projection when nothing is sharded, as before tensor parallelism)."""
            weight = load(f"{name}.weight", columns=plan.input_columns(name.split(".")[-1]) if plan else None)
            bias_tensor = load(f"{name}.bias") if bias else None
            if model.comm is None:
                return Projection(weight, bias_tensor), None
            return Projection(weight), bias_tensor

        self.index = index
        self.model = model
        self.sliding_window = model.sliding_windows[index]
        self.input_norm = load("input_layernorm.weight")
        self.post_attention_norm = load("post_attention_layernorm.weight")
        self.qkv = Projection(*load_column_parallel("self_attn", LORA_GROUPS["qkv"], model.qkv_bias))
        self.o, self.o_bias_after_reduce = load_row_parallel("self_attn.o_proj", model.o_bias)
        self.gate_up = Projection(*load_column_parallel("mlp", LORA_GROUPS["gate_up"], model.mlp_bias))
        self.down, self.down_bias_after_reduce = load_row_parallel("mlp.down_proj", model.mlp_bias)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, k_cache, v_cache) -> torch.Tensor:
        model = self.model
        num_tokens = hidden.shape[0]
        lora = ctx.lora

        x = rms_norm(hidden, self.input_norm, model.rms_norm_eps)
        qkv = self.qkv(x)
        if lora is not None:
            lora.apply(self.index, "qkv", qkv, x)
        # q and k sit side by side in qkv (this rank's heads), so RoPE rotates them as one set of heads: half
        # the elementwise calls of rotating each, the same arithmetic per element.
        heads = model.num_heads + model.num_kv_heads
        q_and_k = model.rotary.apply(qkv[:, : model.q_size + model.kv_size].view(num_tokens, heads, model.head_dim),
                                     ctx.positions)
        q, k = q_and_k[:, : model.num_heads], q_and_k[:, model.num_heads :]
        v = qkv[:, model.q_size + model.kv_size :].view(num_tokens, model.num_kv_heads, model.head_dim)
        attn = paged_attention(q, k, v, k_cache, v_cache, ctx, self.sliding_window, model.attention_scale)
        attn = attn.reshape(num_tokens, model.q_size)
        o = self.o(attn)
        if lora is not None:
            lora.apply(self.index, "o", o, attn)
        o = self._reduce(o, "o", self.o_bias_after_reduce)
        hidden = hidden + o

        x = rms_norm(hidden, self.post_attention_norm, model.rms_norm_eps)
        gate_up = self.gate_up(x)
        if lora is not None:
            lora.apply(self.index, "gate_up", gate_up, x)
        gate, up = gate_up.split([model.intermediate_size, model.intermediate_size], dim=-1)
        mlp_hidden = model.activation(gate) * up
        down = self.down(mlp_hidden)
        if lora is not None:
            lora.apply(self.index, "down", down, mlp_hidden)
        down = self._reduce(down, "down", self.down_bias_after_reduce)
        return hidden + down

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
    """

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
        self.intermediate_size = hf_config.intermediate_size
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
        self.attention_scale = self.head_dim**-0.5
        self.rms_norm_eps = hf_config.rms_norm_eps
        act_name = getattr(hf_config, "hidden_act", "silu")
        if act_name not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported activation {act_name!r}")
        self.activation = ACTIVATIONS[act_name]
        self.max_position_embeddings = hf_config.max_position_embeddings
        self.qkv_bias = self.has_qkv_bias(hf_config)
        self.o_bias = self.has_o_bias(hf_config)
        self.mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        self.sliding_windows = self.layer_sliding_windows(hf_config)
        self.rotary = RotaryTable(hf_config, self.head_dim, self.max_position_embeddings, dtype, self.device)

        tensors = CheckpointTensors(model_dir)
        self.embed_tokens = tensors.get("model.embed_tokens.weight", dtype).to(self.device)
        self.layers = [DecoderLayer(self, index, tensors) for index in range(self.num_layers)]
        self.final_norm = tensors.get("model.norm.weight", dtype).to(self.device)
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

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, kv_cache: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, H]; kv_cache [layers, 2, kv_heads, blocks, block_size, d]."""
        hidden = F.embedding(input_ids, self.embed_tokens)
        for layer in self.layers:
            hidden = layer.forward(hidden, ctx, kv_cache[layer.index, 0], kv_cache[layer.index, 1])
        return rms_norm(hidden, self.final_norm, self.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> fp32 logits [B, V]."""
        return self.lm_head(hidden).float()
