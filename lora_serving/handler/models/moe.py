"""Mixtures of experts: Mixtral and Qwen3-MoE, the Llama (Qwen3) decoder with a routed MLP in every layer.

Each token's router logits pick its top-k experts (softmax in fp32, then the top k, renormalised to sum to
one where the family does). The step's (token, expert) picks are then sorted by expert, so that each expert
multiplies all of its tokens at once: one gate/up and one down product per expert that has tokens in the
step, none for an expert without (the loop runs over the step's experts, never over tokens). Outputs are
weighted and added back per token in expert order, as the reference does.

Checkpoints keep one tensor per expert and projection (Mixtral: block_sparse_moe.experts.E.w1 / w3 / w2 for
gate / up / down, Qwen3-MoE: mlp.experts.E.gate_proj / up_proj / down_proj) and the router as `gate`.
LoRA is served on the attention projections, and on the experts as PEFT writes it for transformers 5, where
the experts are parameters (`target_parameters` on experts.gate_up_proj / down_proj; lora/expert_lora.py):
each expert's rows get their tokens' adapters' deltas. Not under tensor parallelism, where such adapters
are refused at registration.
"""

from __future__ import annotations

import torch

from lora_serving.handler.errors import ModelLoadError
from lora_serving.handler.lora.peft_adapter import DEFAULT_PEFT_MODULES
from lora_serving.handler.models.llama import DecoderLayer
from lora_serving.handler.models.mistral import MistralModel
from lora_serving.handler.models.projection import Projection

ATTENTION_PEFT_MODULES = {m: DEFAULT_PEFT_MODULES[m] for m in ("q_proj", "k_proj", "v_proj", "o_proj")}


class MoeDecoderLayer(DecoderLayer):
    model: "MixtralModel"

    def load_mlp(self) -> None:
        model, plan = self.model, self.model.plan
        parent, (gate_name, up_name, down_name) = model.moe_parent, model.expert_projections
        self.router = Projection(self.load(f"{parent}.gate.weight"))
        rows = plan.output_rows("gate_proj") if plan else None
        columns = plan.input_columns("down_proj") if plan else None
        self.expert_gate_up: list[Projection] = []
        self.expert_down: list[Projection] = []
        for expert in range(model.num_experts):
            prefix = f"{parent}.experts.{expert}."
            gate_up = torch.cat([self.load(f"{prefix}{gate_name}.weight", rows), self.load(f"{prefix}{up_name}.weight", rows)])
            self.expert_gate_up.append(Projection(gate_up))
            self.expert_down.append(Projection(self.load(f"{prefix}{down_name}.weight", columns=columns)))

    def mlp(self, x: torch.Tensor, lora) -> torch.Tensor:
        model = self.model
        num_tokens, top_k = x.shape[0], model.top_k
        top_weights, top_experts = model.route(self.router(x))
        # Each token's picks in expert order: the reference adds its experts' outputs into it in that order.
        top_experts, by_expert = top_experts.sort(dim=-1)
        top_weights = top_weights.gather(-1, by_expert)
        flat_experts = top_experts.flatten()  # [T * k], token-major
        order = torch.argsort(flat_experts, stable=True)  # the picks grouped by expert
        token_of = order // top_k
        counts = torch.bincount(flat_experts, minlength=model.num_experts).tolist()
        expert_out = torch.empty(order.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            # index_select, not x[index]: advanced indexing cost ~50x more on small CPU tensors (measured).
            tokens = token_of[rows]
            x_rows = x.index_select(0, tokens)
            gate_up = self.expert_gate_up[expert](x_rows)
            if lora is not None:
                lora.apply_expert(self.index, "gate_up_proj", expert, gate_up, x_rows, tokens)
            gate, up = gate_up.split(model.intermediate_size, dim=-1)
            hidden = model.activation(gate) * up
            down = self.expert_down[expert](hidden)
            if lora is not None:
                lora.apply_expert(self.index, "down_proj", expert, down, hidden, tokens)
            expert_out[rows] = down
            start += count
        weighted = (expert_out * top_weights.flatten().index_select(0, order)[:, None]).to(x.dtype)
        # Back to token-major order, then each token's k outputs added in expert order (a gather and k - 1
        # additions: index_add_ took milliseconds on 2 busy cores for a few rows).
        by_pick = weighted.index_select(0, torch.argsort(order)).view(num_tokens, top_k, -1)
        out = by_pick[:, 0]
        for pick in range(1, top_k):
            out = out + by_pick[:, pick]
        return self._reduce(out.contiguous(), "down", None)


class MixtralModel(MistralModel):
    """Mixtral: Mistral's attention (no biases, a sliding window on every layer when the config sets one),
    top-k weights always renormalised and kept in fp32 until they multiply the experts' outputs."""

    layer_class = MoeDecoderLayer
    # Routing reads the expert counts on the host (`.tolist()`), which a traced graph cannot.
    traceable_decode = False
    peft_modules = ATTENTION_PEFT_MODULES
    moe_parent = "block_sparse_moe"
    expert_projections = ("w1", "w3", "w2")

    def __init__(self, hf_config, *args, **kwargs) -> None:
        self.num_experts = self.experts_in(hf_config)
        self.top_k = hf_config.num_experts_per_tok
        self.norm_topk_prob = bool(getattr(hf_config, "norm_topk_prob", True))
        super().__init__(hf_config, *args, **kwargs)

    @classmethod
    def experts_in(cls, hf_config) -> int:
        return hf_config.num_local_experts

    def expert_lora(self) -> tuple[dict[str, tuple[int, int]], int, str]:
        if self.plan is not None:
            return {}, self.num_experts, "expert LoRA is not served under tensor parallelism"
        hidden, features = self.shape.hidden_size, self.shape.intermediate_size
        return {"gate_up_proj": (hidden, 2 * features), "down_proj": (features, hidden)}, self.num_experts, ""

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, experts] logits -> each token's top-k weights and expert ids, [T, k] each."""
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        return self.routing_weights(weights, router_logits.dtype), experts

    def routing_weights(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return weights


class Qwen3MoeModel(MixtralModel):
    """Qwen3-MoE: Qwen3's attention (per-head q/k norms, optional biases, sliding layers by `layer_types`),
    experts of `moe_intermediate_size`, renormalisation as `norm_topk_prob` says and weights cast to the
    model's dtype. Layers with a dense MLP (mlp_only_layers, decoder_sparse_step > 1) are refused."""

    qk_norm = True
    moe_parent = "mlp"
    expert_projections = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, hf_config, *args, **kwargs) -> None:
        if getattr(hf_config, "mlp_only_layers", None) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
            raise ModelLoadError("qwen3_moe with dense MLP layers (mlp_only_layers, decoder_sparse_step > 1) is "
                                 "not supported: every layer must be a mixture of experts")
        super().__init__(hf_config, *args, **kwargs)

    @classmethod
    def experts_in(cls, hf_config) -> int:
        return hf_config.num_experts

    @classmethod
    def has_qkv_bias(cls, hf_config) -> bool:
        return bool(getattr(hf_config, "attention_bias", False))

    @classmethod
    def has_o_bias(cls, hf_config) -> bool:
        return bool(getattr(hf_config, "attention_bias", False))

    @classmethod
    def layer_sliding_windows(cls, hf_config) -> list[int | None]:
        return cls.windows_from_layer_types(hf_config)

    def routing_weights(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return weights.to(dtype)
