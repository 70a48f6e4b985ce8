"""Gradients of the vocabulary-sized matrices, added in place into a `weight.grad` that stays.

A causal LM's input embedding and output projection are `[vocab, hidden]` matrices: 49152 x 576
(113 MB in float32) for SmolLM2, where the two are one tied matrix, and a value model built on
the same backbone has another input embedding. Plain autograd gives every use of such a matrix
its own full-size gradient. The embedding's backward allocates and zero-fills a fresh
`[vocab, hidden]` tensor to scatter a few hundred rows into; the projection's backward allocates
another for its product; a tied matrix then adds the two into a third; and the optimizer's
`zero_grad(set_to_none=True)` lets each step start again from nothing. On the CPU a tensor that
size comes from the operating system page by page, and in a PPO update of SmolLM2 on this
project's benchmark machine those zero-fills and the tied sum took about 2 s of a 13 s update
(`docs/benchmarks.md`).

`embed` and `project` compute exactly what `F.embedding` and `F.linear` do. Their backward adds
into `weight.grad` directly (`index_add_` for the embedding's rows, `addmm_` for the projection)
and hands autograd nothing for the weight, so no full-size temporary is made. `zero_grad` keeps
those buffers allocated from step to step and zeroes them in place. The result is the gradient
plain autograd would give, summed in another order (float rounding); a test checks it.

Only where the weight needs a gradient does any of this matter; with a frozen weight (LoRA,
the reference) the backward writes nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad


class _Embed(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight  # the parameter itself: its `.grad` is written in backward
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        (ids,) = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            rows = grad.reshape(-1, grad.shape[-1]).to(ctx.weight.dtype)
            _grad_buffer(ctx.weight).index_add_(0, ids.reshape(-1), rows)
        return None, None


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden)
        ctx.weight = weight
        return F.linear(hidden, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (hidden,) = ctx.saved_tensors
        weight = ctx.weight
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            flat_grad = grad.reshape(-1, grad.shape[-1])
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])
            _grad_buffer(weight).addmm_(flat_grad.T, flat_hidden)
        return grad_hidden, None


def embed(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.embedding(ids, weight)`; backward adds the looked-up rows' gradients to `weight.grad`."""
    out: torch.Tensor = _Embed.apply(ids, weight)
    return out


def project(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(hidden, weight)`, no bias; backward adds `grad.T @ hidden` to `weight.grad`."""
    out: torch.Tensor = _Project.apply(hidden, weight)
    return out


def plain_embedding(module: nn.Module | None) -> nn.Embedding | None:
    """`module` if it is a plain `nn.Embedding`: not a subclass that scales, not a LoRA wrapper."""
    return module if type(module) is nn.Embedding else None


def plain_projection(module: nn.Module | None) -> nn.Linear | None:
    """`module` when it is a plain bias-free `nn.Linear`, so `project` computes what it does."""
    if type(module) is nn.Linear and module.bias is None:
        return module
    return None


def zero_grad(params: Iterable[nn.Parameter], keep: Collection[torch.Tensor]) -> None:
    """`zero_grad(set_to_none=True)` for `params`, except that the gradients of the tensors in
    `keep` (the vocabulary matrices) stay allocated and are zeroed in place."""
    kept = {id(t) for t in keep}
    for p in params:
        if p.grad is None:
            continue
        if id(p) in kept:
            p.grad.zero_()
        else:
            p.grad = None
