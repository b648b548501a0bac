"""Megatron-style sharding of the Llama-family decoder over N ranks, and what it costs in communication.

Per layer:
- q/k/v and gate/up are column-parallel: rank r holds the output rows of its query heads, its KV heads and
  its slice of the intermediate features; attention and the MLP's activation run on local columns only.
- o and down are row-parallel: rank r holds the input columns that match its heads / intermediate slice,
  computes a partial sum of the full hidden output, and one all-reduce per projection adds them up. A bias
  of o / down is added once, after the all-reduce.
- With fewer KV heads than ranks, KV heads are replicated: N must be a multiple of the KV heads, and the
  N / kv_heads ranks that share a KV head hold a copy of it (their query heads all map to it).
- Mixture-of-experts layers shard every expert as the MLP above (each rank holds its slice of every expert's
  intermediate features; the router is replicated), so a step's expert choice is the same on every rank and
  the expert outputs' partial sums ride on the "down" all-reduce.
- The embedding table is replicated (a lookup, no compute to split; sharding it by vocabulary would cost
  an all-reduce of [T, hidden] per step). The LM head lives on rank 0 only, which alone samples and scores
  prompts: no communication and no protocol for the rows to score. Sharding it by vocabulary would split its
  GEMM but gather [rows, vocab / N] fp32 logits to rank 0 every step (`vocab_sharded_lm_head_bytes`);
  docs/BENCHMARKS.md has both measured on CPU, and what they come to for a 70B model.

LoRA (S-LoRA's scheme): for a column-parallel module A [r, in] is replicated and B [out, r] is sharded by
output rows, as the base weight is; no communication. For a row-parallel module A is sharded by input
columns; each rank's partial shrink x_local @ A_local.T [T, R] is all-reduced (R values per token, not the
hidden size), and then each rank expands with its slice of B's output rows and adds the result into its
own columns of the partial base output, so that the base all-reduce that follows adds the LoRA delta too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_serving.handler.errors import ConfigError

COLUMN_PARALLEL_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL_MODULES = ("o_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int  # an expert's, in a mixture of experts
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, hf_config) -> "ModelShape":
        num_heads = hf_config.num_attention_heads
        hidden = hf_config.hidden_size
        return cls(
            hidden_size=hidden,
            intermediate_size=getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hidden // num_heads,
            vocab_size=hf_config.vocab_size,
        )


@dataclass(frozen=True, slots=True)
class ShardingPlan:
    """Which part of every tensor rank `rank` of `world_size` holds. world_size 1 holds everything."""

    shape: ModelShape
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        check_shardable(self.shape, self.world_size)

    # ---- heads and features of this rank ------------------------------------------------------------

    @property
    def num_local_heads(self) -> int:
        return self.shape.num_heads // self.world_size

    @property
    def num_local_kv_heads(self) -> int:
        return max(1, self.shape.num_kv_heads // self.world_size)

    @property
    def first_kv_head(self) -> int:
        kv_heads, world = self.shape.num_kv_heads, self.world_size
        if kv_heads >= world:
            return self.rank * kv_heads // world
        return self.rank // (world // kv_heads)  # replicated: world / kv_heads ranks share each KV head

    @property
    def num_local_intermediate(self) -> int:
        return self.shape.intermediate_size // self.world_size

    @property
    def hidden_columns(self) -> slice:
        """This rank's share of the hidden features: where it adds a row-parallel LoRA expand."""
        width = self.shape.hidden_size // self.world_size
        return slice(self.rank * width, (self.rank + 1) * width)

    def output_rows(self, module: str) -> slice | None:
        """The rows of a column-parallel module's weight [out, in] (and bias) this rank holds."""
        head_dim = self.shape.head_dim
        if module == "q_proj":
            width = self.num_local_heads * head_dim
            return slice(self.rank * width, (self.rank + 1) * width)
        if module in ("k_proj", "v_proj"):
            return slice(self.first_kv_head * head_dim, (self.first_kv_head + self.num_local_kv_heads) * head_dim)
        if module in ("gate_proj", "up_proj"):
            width = self.num_local_intermediate
            return slice(self.rank * width, (self.rank + 1) * width)
        return None

    def input_columns(self, module: str) -> slice | None:
        """The columns of a row-parallel module's weight [out, in] this rank holds."""
        if module == "o_proj":
            width = self.num_local_heads * self.shape.head_dim
            return slice(self.rank * width, (self.rank + 1) * width)
        if module == "down_proj":
            width = self.num_local_intermediate
            return slice(self.rank * width, (self.rank + 1) * width)
        return None

    # ---- LoRA ----------------------------------------------------------------------------------------

    def local_lora_shapes(self, full_shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """(in, out) of each module's slot buffers on this rank: lora_a [S, R, in], lora_b [S, out, R]."""
        local = {}
        for module, (in_features, out_features) in full_shapes.items():
            rows, columns = self.output_rows(module), self.input_columns(module)
            if rows is not None:
                local[module] = (in_features, rows.stop - rows.start)
            else:
                hidden = self.hidden_columns
                local[module] = (columns.stop - columns.start, hidden.stop - hidden.start)
        return local

    def shard_lora(self, module: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A [r, in], B [out, r] of the whole module -> this rank's (A, B) for its slot buffers."""
        if self.world_size == 1:
            return a, b
        rows = self.output_rows(module)
        if rows is not None:
            return a, b[rows]
        return a[:, self.input_columns(module)], b[self.hidden_columns]

    @property
    def holds_lm_head(self) -> bool:
        return self.rank == 0

    # ---- communication ------------------------------------------------------------------------------

    def step_all_reduce_bytes(self, num_tokens: int, element_size: int, lora_groups=(),
                              max_lora_rank: int = 0) -> dict[str, int]:
        """Bytes each rank puts into the all-reduces of one forward over `num_tokens` tokens, by what they
        carry, as TensorParallelComm.bytes_sent counts them (the tests check the model sends exactly this):
        per layer the o and down partial sums [T, hidden], and for a row-parallel group that some adapter
        of the step targets ("o", "down" in `lora_groups`) its shrunk intermediate [T, max_lora_rank]."""
        if self.world_size == 1:
            return {}
        per_layer = {"o": num_tokens * self.shape.hidden_size * element_size,
                     "down": num_tokens * self.shape.hidden_size * element_size}
        for group in ("o", "down"):
            if group in lora_groups:
                per_layer[f"lora_{group}"] = num_tokens * max_lora_rank * element_size
        return {what: size * self.shape.num_layers for what, size in per_layer.items()}

    def vocab_sharded_lm_head_bytes(self, num_rows: int) -> int:
        """What rank 0 would gather per step with an LM head sharded by vocabulary instead: every other rank's
        fp32 logits [rows, vocab / N] (the alternative not taken; see the module's docstring)."""
        return num_rows * (self.shape.vocab_size // self.world_size) * 4 * (self.world_size - 1)


def ring_all_reduce_wire_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes each rank sends on the wire for a ring all-reduce of `payload_bytes` (NCCL's and gloo's
    large-message algorithm): a reduce-scatter and an all-gather, (N - 1) / N of the payload each."""
    return 2 * (world_size - 1) * payload_bytes // world_size


def check_shardable(shape: ModelShape, world_size: int) -> None:
    """Refuse, naming the reason, a degree the model's heads or features cannot be split over."""
    key = "tensor_parallel_degree"
    if world_size < 1:
        raise ConfigError(key, world_size, "must be a positive integer")
    if world_size == 1:
        return
    if shape.num_heads % world_size:
        raise ConfigError(key, world_size, f"does not divide the model's {shape.num_heads} attention heads")
    kv_heads = shape.num_kv_heads
    if kv_heads % world_size and world_size % kv_heads:
        raise ConfigError(key, world_size, f"the model's {kv_heads} KV heads can neither be split over "
                          f"{world_size} ranks nor replicated evenly (one must divide the other)")
    if shape.intermediate_size % world_size:
        raise ConfigError(key, world_size, f"does not divide the model's intermediate size "
                          f"{shape.intermediate_size}")
    if shape.hidden_size % world_size:
        raise ConfigError(key, world_size, f"does not divide the model's hidden size {shape.hidden_size}")
