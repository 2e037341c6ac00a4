"""Pack variable-length sequences into THD micro-batches under a token budget, and unpack results.

A packed micro-batch is one row of concatenated sequences (megatron's "thd" layout, batch dimension 1), with
`cu_seqlens` marking where each sequence starts so attention and RoPE stay within it. Every per-token tensor is
aligned with the token ids: value i belongs to token i (its log-prob is log p(token i | tokens before i), and
the first token of a sequence has no prediction, so its log-prob is 0 and it never enters the loss).

Packing is first-fit-decreasing: sequences sorted by length, each placed into the first micro-batch with
room. All micro-batches of a step share one length (the longest, rounded up to `pad_multiple`) so pipeline
stages exchange activations of a single shape; the tail of each row is a padding segment of its own.
Pure functions: no process groups, no megatron.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenSequence:
    """One prompt + completion with its per-token training data, all aligned with `token_ids`."""

    token_ids: torch.Tensor  # [L] int64
    loss_mask: torch.Tensor  # [L] float32: 1 on completion tokens that enter the loss, 0 on prompt tokens
    advantages: torch.Tensor  # [L] float32
    behaviour_logprobs: torch.Tensor  # [L] float32: the rollout engine's log-probs (0 on prompt tokens)
    proximal_logprobs: torch.Tensor | None = None  # [L] float32: the trainer's recompute (set before update)

    def __len__(self) -> int:
        return int(self.token_ids.numel())


@dataclass
class PackedMicroBatch:
    """Sequences concatenated into one THD row; padding sits in a final segment with loss_mask 0."""

    tokens: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64: 0..len-1 within each sequence (and within the padding)
    labels: torch.Tensor  # [1, T] int64: the next token within the same sequence; 0 at each sequence's end
    loss_mask: torch.Tensor  # [1, T] float32
    advantages: torch.Tensor  # [1, T] float32
    behaviour_logprobs: torch.Tensor  # [1, T] float32
    proximal_logprobs: torch.Tensor | None  # [1, T] float32, None when the sequences carry none
    cu_seqlens: torch.Tensor  # [S + 1] int32: segment boundaries, real sequences then the padding segment
    max_seqlen: int  # longest segment in this row
    sequence_ids: list[int]  # [S_real]: index in the caller's list of each real segment, in row order

    @property
    def num_real_tokens(self) -> int:
        """Tokens belonging to real sequences (the row minus its padding)."""
        return int(self.cu_seqlens[len(self.sequence_ids)])

    @property
    def segment_starts(self) -> torch.Tensor:
        """[T] bool: True at the first token of every segment (where no prediction exists)."""
        starts = torch.zeros(self.tokens.size(1), dtype=torch.bool)
        starts[self.cu_seqlens[:-1].long()] = True
        return starts


def assign_first_fit_decreasing(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into bins of at most `token_budget` tokens, longest sequences first.

    Raises ValueError naming the sequence when one alone exceeds the budget. Bins keep insertion order
    (longest first), which makes the result deterministic for equal inputs on every rank.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > token_budget:
            raise ValueError(
                f"sequence {index} has {length} tokens, more than train.micro_batch_tokens={token_budget}"
            )
        for b, free in enumerate(room):
            if length <= free:
                bins[b].append(index)
                room[b] -= length
                break
        else:
            bins.append([index])
            room.append(token_budget - length)
    return bins


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _concat(parts: list[torch.Tensor], pad: int, dtype: torch.dtype) -> torch.Tensor:
    """[sum L_i + pad] -> [1, T]: the parts end to end, then `pad` zeros."""
    return torch.cat([p.to(dtype) for p in parts] + [torch.zeros(pad, dtype=dtype)]).unsqueeze(0)


def _build_row(sequences: list[TokenSequence], ids: list[int], row_tokens: int) -> PackedMicroBatch:
    members = [sequences[i] for i in ids]
    lengths = [len(s) for s in members]
    pad = row_tokens - sum(lengths)
    segment_lengths = lengths + ([pad] if pad else [])
    cu = torch.zeros(len(segment_lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(segment_lengths, dtype=torch.int32).cumsum(0)
    positions = torch.cat([torch.arange(n) for n in segment_lengths] or [torch.zeros(0, dtype=torch.long)])
    labels = [torch.cat([s.token_ids[1:], s.token_ids.new_zeros(1)]) for s in members]
    has_proximal = bool(members) and all(s.proximal_logprobs is not None for s in members)
    if not has_proximal and any(s.proximal_logprobs is not None for s in members):
        raise ValueError("pack: some sequences carry proximal_logprobs and some do not")
    return PackedMicroBatch(
        tokens=_concat([s.token_ids for s in members], pad, torch.long),
        position_ids=positions.unsqueeze(0).long(),
        labels=_concat(labels, pad, torch.long),
        loss_mask=_concat([s.loss_mask for s in members], pad, torch.float32),
        advantages=_concat([s.advantages for s in members], pad, torch.float32),
        behaviour_logprobs=_concat([s.behaviour_logprobs for s in members], pad, torch.float32),
        proximal_logprobs=(
            _concat([s.proximal_logprobs for s in members], pad, torch.float32) if has_proximal else None
        ),
        cu_seqlens=cu,
        max_seqlen=max(segment_lengths, default=0),
        sequence_ids=list(ids),
    )


def pack(
    sequences: list[TokenSequence],
    token_budget: int,
    pad_multiple: int = 1,
    min_micro_batches: int = 0,
) -> list[PackedMicroBatch]:
    """First-fit-decreasing packing into THD micro-batches of at most `token_budget` tokens.

    Every micro-batch has the same length T (the fullest one's token count rounded up to `pad_multiple`,
    at least `pad_multiple`; padding may take a row up to `pad_multiple - 1` tokens past the budget), so
    pipeline stages can exchange fixed-shape activations. When there are fewer
    than `min_micro_batches` bins, all-padding micro-batches are appended: data-parallel ranks must run the
    same number of micro-batches in a step. Each micro-batch's `sequence_ids` give the permutation back to
    the caller's order (see `unpack`).
    """
    for i, s in enumerate(sequences):
        n = len(s)
        fields = {
            "loss_mask": s.loss_mask,
            "advantages": s.advantages,
            "behaviour_logprobs": s.behaviour_logprobs,
        }
        if s.proximal_logprobs is not None:
            fields["proximal_logprobs"] = s.proximal_logprobs
        for name, value in fields.items():
            if value.shape != (n,):
                raise ValueError(
                    f"pack: sequence {i} field {name} has shape {tuple(value.shape)}, expected ({n},)"
                )
        if n == 0:
            raise ValueError(f"pack: sequence {i} has no tokens")
    bins = assign_first_fit_decreasing([len(s) for s in sequences], token_budget)
    bins += [[] for _ in range(min_micro_batches - len(bins))]
    fullest = max((sum(len(sequences[i]) for i in b) for b in bins), default=0)
    row_tokens = _round_up(max(fullest, 1), pad_multiple)
    return [_build_row(sequences, ids, row_tokens) for ids in bins]


def unpack(
    values: list[torch.Tensor], micro_batches: list[PackedMicroBatch], num_sequences: int
) -> list[torch.Tensor]:
    """Split per-token results ([1, T] per micro-batch) back into one [L_i] tensor per original sequence."""
    out: list[torch.Tensor | None] = [None] * num_sequences
    for value, mb in zip(values, micro_batches, strict=True):
        cu = mb.cu_seqlens.tolist()
        for slot, seq_id in enumerate(mb.sequence_ids):
            out[seq_id] = value[0, cu[slot] : cu[slot + 1]]
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"unpack: sequences {missing[:5]} are in no micro-batch")
    return out  # type: ignore[return-value]
