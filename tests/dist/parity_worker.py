"""torchrun worker: a converted tiny Megatron model's logits equal transformers' at the given TP / PP / VP.

Launched by tests/test_model_parallel.py as
    torchrun --standalone --nproc-per-node 2 tests/dist/parity_worker.py --kinds qwen2 llama --tp 2
Exits non-zero (with the error on stderr) when anything differs.
"""

from __future__ import annotations

import argparse

import torch
from tiny_hf import VOCAB, tiny_hf_model

from questa_nemo.config import ModelConfig
from questa_nemo.model.convert import ShardLayout
from questa_nemo.model.logprobs import chunked_logprobs, final_hidden_states, naive_logprobs, output_weight
from questa_nemo.model.megatron import build_model, load_hf_weights, shard_layout
from questa_nemo.model.parallel import all_gather, destroy_distributed, init_distributed, model_tensors


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[b, s, V/tp] vocab-parallel logits -> [b, s, V] on every TP rank."""
    from megatron.core import parallel_state as ps

    return torch.cat(all_gather(logits, ps.get_tensor_model_parallel_group()), dim=-1)


def pipeline_forward(chunks, ids, positions, hidden_shape, info) -> torch.Tensor | None:
    """Run every chunk in global order (chunk c lives on stage c % pp), passing hidden states by send/recv.

    Returns the logits on the last stage, None elsewhere.
    """
    from megatron.core import parallel_state as ps

    vp = len(chunks)
    total = info.pp_size * vp
    result = None
    for c in range(total):
        stage, vp_stage = c % info.pp_size, c // info.pp_size
        if stage != info.pp_rank:
            continue
        chunk = chunks[vp_stage]
        prev_rank = ps.get_pipeline_model_parallel_prev_rank()
        next_rank = ps.get_pipeline_model_parallel_next_rank()
        if c > 0:
            hidden = torch.empty(hidden_shape, device=ids.device)
            with model_tensors():  # activations: on the GPU in a real run
                torch.distributed.recv(hidden, src=prev_rank)
            chunk.set_input_tensor(hidden)
        out = chunk(ids, positions, None)
        if c < total - 1:
            with model_tensors():
                torch.distributed.send(out.contiguous(), dst=next_rank)
        else:
            result = out
    return result


def check_logprob_head(last_chunk, ids, positions, full_logits) -> None:
    """final_hidden_states -> chunked_logprobs over the vocab-parallel output weight == naive on full logits.

    On a pipelined model the last chunk's hidden input is still set from `pipeline_forward`.
    """
    from megatron.core import parallel_state as ps

    hidden = final_hidden_states(last_chunk, ids, positions)  # [s, b, h]
    targets = ids.roll(-1, dims=1).t()  # [s, b]
    out = chunked_logprobs(
        hidden,
        output_weight(last_chunk),
        targets,
        0.8,
        vocab_size=VOCAB,
        chunk_tokens=5,
        tp_group=ps.get_tensor_model_parallel_group(),
    )
    ref = naive_logprobs(full_logits.transpose(0, 1), targets, 0.8)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-5, atol=1e-5)
    print("chunked log-prob head matches")


def check_model(kind: str, cfg: ModelConfig, info, vp: int | None) -> None:
    ref, hf = tiny_hf_model(kind)
    built = build_model(hf, cfg)
    chunks = built if isinstance(built, list) else [built]
    for vp_stage, chunk in enumerate(chunks):
        layout: ShardLayout = shard_layout(vp_stage if vp else None)
        layer_numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        assert layer_numbers == list(layout.layer_range(hf["num_hidden_layers"])), (layer_numbers, layout)
        load_hf_weights(chunk, ref.state_dict(), hf, cfg, vp_stage if vp else None)
        chunk.eval()

    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(ids.size(1)).expand_as(ids)
    with torch.no_grad():
        logits = pipeline_forward(chunks, ids, positions, (ids.size(1), ids.size(0), hf["hidden_size"]), info)
        if logits is not None:
            full = gather_vocab(logits)[..., :VOCAB]
            expected = ref(ids).logits
            torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
            print(f"rank {info.rank}: {kind} logits match (max |diff| {(full - expected).abs().max():.2e})")
            check_logprob_head(chunks[-1], ids, positions, full)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", nargs="+", choices=["qwen2", "llama"], required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vp", type=int, default=None)
    args = parser.parse_args()

    cfg = ModelConfig(
        params_dtype="fp32",
        recompute="none",
        attention="sdpa",
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        virtual_pipeline=args.vp,
    )
    info = init_distributed(cfg)
    for kind in args.kinds:
        check_model(kind, cfg, info, args.vp)
    destroy_distributed()


if __name__ == "__main__":
    main()
