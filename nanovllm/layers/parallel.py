"""Tensor parallelism (Megatron style) over torch.distributed: each rank holds a slice of every big matrix.

Column-parallel (q/k/v, gate/up): a rank computes its own heads / its own part of the intermediate size.
Row-parallel (o_proj, down_proj): a rank multiplies its slice of the input; the partial sums are all-reduced.
Vocab-parallel (embedding, LM head): a rank holds a contiguous range of the vocabulary (the last range padded);
the embedding all-reduces (each token is found on one rank), the logits are gathered on rank 0.
With one process every function here is the plain single-device operation."""

from contextlib import contextmanager

import torch
import torch.distributed as dist

alone = False  # inside one_rank()


@contextmanager
def one_rank():
    """Build and run a model as if there were one process: speculative decoding's draft model lives whole on rank
    0, beside the target's slices."""
    global alone
    before, alone = alone, True
    try:
        yield
    finally:
        alone = before


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() and not alone else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() and not alone else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's [T, n] side by side, rank order: [T, n * tp] on every rank."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def vocab_range(vocab_size: int) -> tuple[int, int]:
    """[start, start + rows) of the vocabulary this rank holds; every rank has `rows` (padded) rows."""
    rows = -(-vocab_size // tp_size())
    return tp_rank() * rows, rows


def embed(ids: torch.Tensor, lookup, vocab_size: int) -> torch.Tensor:
    """The rows of `ids`; lookup(local ids) -> this rank's rows (F.embedding over its weight, or a quantized
    weight's rows dequantized)."""
    if tp_size() == 1:
        return lookup(ids)
    start, rows = vocab_range(vocab_size)
    local = ids - start
    outside = (local < 0) | (local >= rows)
    x = lookup(local.masked_fill(outside, 0))
    return all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))


def gather_logits(local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Each rank's [tokens, rows] logits, put side by side on rank 0 (None elsewhere)."""
    if tp_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp_size())] if tp_rank() == 0 else None
    dist.gather(local.contiguous(), parts, dst=0)
    return torch.cat(parts, dim=-1)[:, :vocab_size] if parts else None


def shard(tensor, dim: int, size: int, full: int | None = None) -> torch.Tensor:
    """This rank's `size` rows (dim 0) or columns (dim 1) of a checkpoint tensor, read without the rest where
    the tensor is a lazy safetensors slice. `full`: the expected size along dim (vocab ranges may run short)."""
    shape = tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)
    expected = full if full is not None else size * tp_size()
    if shape[dim] != expected:
        raise ValueError(f"size {shape[dim]} along dim {dim}, the model expects {expected}")
    start = tp_rank() * size
    index = (slice(None),) * dim + (slice(start, min(start + size, shape[dim])),)
    return tensor[index]
