"""KV-cached inference for Llama-architecture causal LMs, without the generic forward's overhead.

A decode step pushes one token per row through every layer. For a small model on a CPU the
matrix products of that step take about 80-100 ms (SmolLM2-135M, 4 rows), and transformers'
generic forward adds some 30 % on top: per-step mask building, a cache that grows by `cat`,
keyword plumbing through every module. `LlamaDecoder` computes the same layers from the
model's own weights with a preallocated cache and one boolean mask per call, so a step costs
little more than its products (docs/benchmarks.md, "PPO").

It is the plain Llama layer and nothing else: RMSNorm, rotary positions from the model's own
rotary module, grouped-query attention, a gated MLP, bias-free linear layers, logits as
`lm_head(norm(h))`. `LlamaDecoder.supports` says which models qualify; every other model keeps
its own forward. The outputs equal the model's forward up to float rounding (tests compare them
on left-padded batches).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# A decode step pushes a handful of rows through every weight matrix once. On the CPUs this was
# measured on (AMD EPYC, AVX2, MKL; docs/benchmarks.md), `W @ x.T` streams a weight matrix
# faster than `F.linear`'s `x @ W.T` for 2-8 rows: about 25 % less time for SmolLM2's body and
# half for its 49k-row output layer. One row, or more than eight, is left to `F.linear`. On an
# AVX-512 EPYC, sampling 32 tokens for 4 prompts took 2.5 s this way against 3.2 s with F.linear.
SKINNY_MAX_ROWS = 8


def skinny_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, with 2-8 rows on the CPU computed as `(W @ x.T).T` (see `SKINNY_MAX_ROWS`)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or not 1 < rows <= SKINNY_MAX_ROWS:
        return F.linear(x, layer.weight, layer.bias)
    # Row-major again before it goes on: left as the transposed view, the layout would carry
    # through the elementwise ops into the next layer's input, and a product whose `x.T` is
    # contiguous ran SmolLM2's down projection 2-3x slower (AMD EPYC, AVX-512).
    y = (layer.weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


class LlamaDecoder:
    """Runs `model` over chunks of tokens, keeping every layer's keys and values in a
    preallocated `[batch, kv_heads, capacity, head_dim]` cache.

    Call `forward` with the prompt (left-padded) and then with one token per row at a time; each
    call returns the last position's logits. `valid` marks, for every position so far, whether
    it is a real token: padding is never attended to. The cache grows when a call needs more
    than `capacity` positions. `batch_repeat_interleave` and `batch_select_indices` reshape the
    rows as transformers' caches of the same names do, so generation can share a prompt's
    prefill between rows and drop the rows that have finished.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int) -> None:
        if not self.supports(model):
            raise ValueError(f"{type(model).__name__} is not a plain Llama causal LM")
        inner: Any = model
        self.body: Any = inner.model
        self.head: nn.Linear = inner.lm_head
        config = inner.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        weight = self.head.weight
        shape = (len(self.body.layers), batch, self.kv_heads, capacity, self.head_dim)
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.length = 0

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True for an unwrapped `LlamaForCausalLM`-shaped model whose layers are exactly the
        ones this class computes: plain bias-free linear layers (no adapters, no quantised or
        tensor-parallel modules), a plain embedding and head."""
        config = getattr(model, "config", None)
        if (
            getattr(config, "model_type", None) != "llama"
            or getattr(config, "pretraining_tp", 1) != 1
        ):
            return False
        body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
        if not all(
            hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")
        ):
            return False
        assert body is not None
        linears = [head]
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
            linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        return type(body.embed_tokens) is nn.Embedding and all(
            type(m) is nn.Linear and m.bias is None for m in linears
        )

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Append `input_ids` (`[batch, n]`, at `position_ids`) to the cache and return the
        logits of their last position, `[batch, vocab]` in float32. `valid` is `[batch,
        length + n]`: which positions, cached and new, are real tokens."""
        batch, n = input_ids.shape
        start, end = self.length, self.length + n
        if end > self.keys.shape[3]:
            self._grow(max(end, 2 * self.keys.shape[3]))
        # Query i (absolute start+i) sees the real keys up to itself. A padding query also sees
        # itself, so its row is never empty (an all-masked row would give NaN, and NaN keys
        # poison later rows even where masked); what padding computes is never attended to.
        keys_at = torch.arange(end, device=input_ids.device)[None, :]
        queries_at = torch.arange(start, end, device=input_ids.device)[:, None]
        mask = ((keys_at <= queries_at) & valid[:, None, :].bool()) | (keys_at == queries_at)
        mask = mask[:, None]  # [batch, 1, n, end]

        hidden = self.body.embed_tokens(input_ids)
        cos, sin = self.body.rotary_emb(hidden, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        for i, layer in enumerate(self.body.layers):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, hidden)
            q = skinny_linear(attn.q_proj, x).view(batch, n, self.heads, self.head_dim)
            k = skinny_linear(attn.k_proj, x).view(batch, n, self.kv_heads, self.head_dim)
            v = skinny_linear(attn.v_proj, x).view(batch, n, self.kv_heads, self.head_dim)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            self.keys[i, :, :, start:end] = _rotate(k, cos, sin)
            self.values[i, :, :, start:end] = v
            out = F.scaled_dot_product_attention(
                _rotate(q, cos, sin),
                self.keys[i, :, :, :end],
                self.values[i, :, :, :end],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=self.heads != self.kv_heads,
            )
            out = out.transpose(1, 2).reshape(batch, n, self.heads * self.head_dim)
            hidden = hidden + skinny_linear(attn.o_proj, out)
            x = _rms_norm(layer.post_attention_layernorm, hidden)
            mlp = layer.mlp
            gated = mlp.act_fn(skinny_linear(mlp.gate_proj, x)) * skinny_linear(mlp.up_proj, x)
            hidden = hidden + skinny_linear(mlp.down_proj, gated)
        self.length = end
        last = _rms_norm(self.body.norm, hidden[:, -1:])
        return skinny_linear(self.head, last)[:, -1].float()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` consecutive rows with the same cached positions."""
        self.keys = self.keys.repeat_interleave(repeats, dim=1)
        self.values = self.values.repeat_interleave(repeats, dim=1)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or reorder, or repeat) the rows `indices`."""
        self.keys, self.values = self.keys[:, indices], self.values[:, indices]

    def _grow(self, capacity: int) -> None:
        grown = list(self.keys.shape)
        grown[3] = capacity
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(grown)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' `LlamaRMSNorm`, step for step (statistics in float32)."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers' `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
