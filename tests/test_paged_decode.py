"""The paged KV cache (rollout/paged.py) on CPU: its attention against a float64 oracle, and the engine with
paged_kv against the contiguous cache (same greedy and sampled tokens, log-probs), with preemption, prefix
sharing, blocks returned, forced lengths. The Triton kernel runs through Triton's interpreter where Triton is
installed (CI's CPU image has none: those tests skip, as in tests/test_triton_kernels.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from rollout_models import (
    VOCAB,
    assert_step_is_capture_safe,
    compile_for_hopper,
    full_forward_logprobs,
    hf_model,
    megatron_twin,
)

from questa_nemo.rollout.base import SamplingParams
from questa_nemo.rollout.megatron_engine import EngineOptions, MegatronBackend
from questa_nemo.rollout.paged import BlockAllocator, paged_attention_dense, paged_attention_reference

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CPU torch)")

PROMPTS = [[5, 17, 3, 44, 9], [7], [60, 2, 2, 81, 13, 13, 40, 1, 90, 33, 8, 27] * 3]
STOPS = (3, 50, 77, 12, 64)


@pytest.fixture(scope="module")
def model():
    return megatron_twin(hf_model("qwen2"))


def backend(model, **options) -> MegatronBackend:
    return MegatronBackend(model, VOCAB, EngineOptions(**{"max_batch_sequences": 16, **options}))


def paged(model, **options) -> MegatronBackend:
    return backend(model, paged_kv=True, kv_block_size=16, harvest_every=4, **options)


def tokens(result) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in result.completions]


def max_logprob_diff(a, b) -> float:
    return max(
        (torch.tensor(x.logprobs) - torch.tensor(y.logprobs)).abs().max().item()
        for ga, gb in zip(a.completions, b.completions)
        for x, y in zip(ga, gb)
    )


def random_pool(lengths: list[int], groups=2, per_group=3, bs=16, dim=32, dtype=torch.float32, seed=0):
    """A pool with shuffled block ids per sequence, queries, the table and positions (length - 1)."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // bs) for n in lengths) + 1
    num_blocks = 1 + sum(-(-n // bs) for n in lengths) + 3
    k = torch.randn(num_blocks, groups, bs, dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, groups, bs, dim, generator=g).to(dtype)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    table = torch.zeros(len(lengths), max_blocks, dtype=torch.int32)
    for b, n in enumerate(lengths):
        need = -(-n // bs)
        table[b, :need] = torch.tensor([ids.pop() for _ in range(need)], dtype=torch.int32)
    q = torch.randn(len(lengths), groups, per_group, dim, generator=g).to(dtype)
    return q, k, v, table, torch.tensor(lengths) - 1


def test_reference_attention_matches_dense_oracle():
    lengths = [1, 15, 16, 17, 40, 64]
    q, k, v, table, positions = random_pool(lengths)
    span = 64
    visible = torch.arange(span)[None, :] <= positions[:, None]
    out = paged_attention_reference(q, k, v, table[:, : span // 16].long(), visible[:, None, None, :])
    torch.testing.assert_close(out, paged_attention_dense(q, k, v, table, positions), atol=1e-5, rtol=1e-5)


def test_allocator_counts_shares_and_frees():
    a = BlockAllocator(5)
    x, y = a.take(), a.take()
    assert (x, y, a.num_free, a.used) == (1, 2, 2, 2)
    a.share(x)
    a.drop(x)
    assert a.num_free == 2  # still referenced once
    a.drop(x)
    a.drop(y)
    assert a.num_free == 4 and a.peak_used == 2 and 0 not in a.free


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_paged_equals_contiguous(model, temperature):
    """Same tokens (greedy and sampled: admission order, slots and noise are the same) and log-probs."""
    params = SamplingParams(
        n=3, temperature=temperature, max_new_tokens=40, stop_token_ids=STOPS, seed=4
    )
    contiguous = backend(model, harvest_every=4).generate(PROMPTS, params)
    b = paged(model)
    result = b.generate(PROMPTS, params)
    assert tokens(result) == tokens(contiguous)
    assert max_logprob_diff(result, contiguous) < 1e-5
    assert result.stats["paged_kv"] == 1.0 and result.stats["preemptions"] == 0
    assert result.stats["kv_blocks_peak"] > 0 and result.stats["peak_sequences_in_flight"] == 9
    assert {c.finish_reason for g in result.completions for c in g} == {"stop", "length"}
    assert b._runner.cache.allocator.used == 0


def test_blocks_return_and_prefix_blocks_are_shared(model):
    """After a call every block is free again; the n samples of a prompt share its full prompt blocks
    (the peak is below n separate copies of a 36-token prompt)."""
    b = paged(model)
    params = SamplingParams(n=4, temperature=0.0, max_new_tokens=8, ignore_eos=True)
    result = b.generate(PROMPTS[2:], params)
    assert b._runner.cache.allocator.used == 0
    # 4 samples x (36 prompt + 8 new) positions = 3 blocks each without sharing; shared: 2 + 4 x 1
    assert result.stats["kv_blocks_peak"] == 2 + 4
    contiguous = backend(model).generate(PROMPTS[2:], params)
    assert tokens(result) == tokens(contiguous)


def test_small_pool_preempts_and_recomputes(model):
    """A pool of 8 blocks (128 positions) for 9 sequences: sequences wait for blocks and the newest are
    preempted and recomputed; greedy tokens still equal the contiguous cache's, sampled log-probs still match
    a full forward over what was generated."""
    greedy = SamplingParams(n=3, temperature=0.0, max_new_tokens=60, ignore_eos=True)
    small = paged(model, kv_blocks=9, kv_headroom_tokens=16)
    result = small.generate(PROMPTS, greedy)
    assert result.stats["preemptions"] >= 1 and result.stats["kv_blocks_peak"] <= 8
    assert tokens(result) == tokens(backend(model).generate(PROMPTS, greedy))
    assert small._runner.cache.allocator.used == 0
    sampled = SamplingParams(n=3, temperature=1.0, max_new_tokens=60, stop_token_ids=STOPS, seed=4)
    result = small.generate(PROMPTS, sampled)
    assert result.stats["preemptions"] >= 1
    # the noise is keyed per sequence and completion position: a preempted, recomputed sequence samples on
    # exactly as it would have without the preemption
    assert tokens(result) == tokens(backend(model).generate(PROMPTS, sampled))
    for i, group in enumerate(result.completions):
        for c in group:
            expected = full_forward_logprobs(model, PROMPTS[i], c.token_ids, 1.0)
            assert torch.allclose(expected, torch.tensor(c.logprobs), atol=1e-4)


def test_preemption_with_stops_and_compaction_keeps_every_logprob(model):
    """18 sequences in 32 slots with a pool of 7 blocks, no headroom: waits, preemptions, stops and the long-tail
    compaction together; every completion's log-probs still match a full forward (no stale or shared KV)."""
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=40, stop_token_ids=STOPS, seed=8)
    b = paged(model, max_batch_sequences=32, kv_blocks=8, kv_headroom_tokens=0)
    result = b.generate(PROMPTS, params)
    assert result.stats["preemptions"] >= 1 and result.stats["compactions"] >= 1
    assert b._runner.cache.allocator.used == 0 and result.stats["kv_blocks_peak"] <= 7
    for i, group in enumerate(result.completions):
        for c in group:
            expected = full_forward_logprobs(model, PROMPTS[i], c.token_ids, 1.0)
            assert torch.allclose(expected, torch.tensor(c.logprobs), atol=1e-4)


def test_pool_too_small_for_one_sequence_is_an_error(model):
    with pytest.raises(RuntimeError, match="fewer than one sequence"):
        paged(model, kv_blocks=4).generate(PROMPTS, SamplingParams(max_new_tokens=60))


def test_forced_lengths_end_like_a_stop_token(model):
    forced = [[3, 9], [1, 17], [30, 5]]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=20, ignore_eos=True, seed=1)
    for b in (backend(model, harvest_every=4), paged(model)):
        result = b.generate(PROMPTS, params, forced_lengths=forced)
        got = [[len(c.token_ids) for c in g] for g in result.completions]
        assert got == [[3, 9], [1, 17], [20, 5]]
        assert [c.finish_reason for c in result.completions[2]] == ["length", "stop"]


def test_compaction_moves_block_tables(model):
    """The long tail compacts live sequences into low slots by moving table rows (no data copies)."""
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=40, stop_token_ids=STOPS, seed=8)
    result = paged(model, max_batch_sequences=32).generate(PROMPTS, params)
    contiguous = backend(model, max_batch_sequences=32, harvest_every=4).generate(PROMPTS, params)
    assert result.stats["compactions"] >= 1
    assert tokens(result) == tokens(contiguous)


# ------------------------------------------------------------------------------ Triton (interpreter)
@pytest.fixture
def interpreter_loops(monkeypatch):
    """Triton 3.6's interpreter turns a loop bound into an int with int(ndarray of shape [1]), which NumPy 2.x
    refuses; the compiled kernel has no such step. Patch the interpreter's scalar conversion for the test."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        pytest.skip("this Triton's interpreter has no _patch_lang_tensor to patch")

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


@pytest.fixture
def kernel_on(monkeypatch, interpreter_loops):
    """Every paged cache the engine allocates runs the Triton kernels (as on a GPU), here under the
    interpreter; the step counts the kernel launches it makes (so a test can see the kernel did run)."""
    from questa_nemo.rollout import paged_triton

    original = MegatronBackend._paged_cache
    launches = {"attention": 0, "cascade": [], "merge_tile": 0}  # cascade: each cascaded launch's item groups

    def with_kernel(self, *args):
        cache = original(self, *args)
        cache.use_kernel = True
        return cache

    attention = paged_triton.paged_decode_attention

    def counted(*args, **kwargs):
        launches["attention"] += 1
        launches["merge_tile"] += bool(kwargs.get("merge_tile"))
        cascade = kwargs.get("cascade")
        if cascade is not None:  # no host read here: the capture-safety test runs through this
            launches["cascade"].append(cascade.items[:, 0].clone())
        return attention(*args, **kwargs)

    monkeypatch.setattr(MegatronBackend, "_paged_cache", with_kernel)
    launches["cascaded"] = lambda since=0: sum(bool((t >= 0).any()) for t in launches["cascade"][since:])
    monkeypatch.setattr(paged_triton, "paged_decode_attention", counted)
    return launches


MERGES = pytest.mark.parametrize("merge_tile", [False, True], ids=["loop_merge", "tile_merge"])


@needs_triton
@MERGES
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_matches_dense_oracle(splits, dtype, merge_tile, interpreter_loops):
    from questa_nemo.rollout.paged_triton import paged_decode_attention

    q, k, v, table, positions = random_pool([1, 15, 16, 17, 40, 64], dtype=dtype)
    out = paged_decode_attention(q, k, v, table, positions, num_sms=1, splits=splits, merge_tile=merge_tile)
    ref = paged_attention_dense(q, k, v, table, positions)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@needs_triton
@MERGES
@pytest.mark.parametrize("split_len", [16, 32, 48, 128])
def test_fixed_length_splits_match_dense_oracle(split_len, merge_tile, interpreter_loops):
    """Fixed-length splits (EngineOptions.fused_decode): programs past a sequence's length exit, the merge reads
    only the sequence's splits, one split in all writes the output directly (128: no merge)."""
    from questa_nemo.rollout.paged_triton import paged_decode_attention

    q, k, v, table, positions = random_pool([1, 15, 16, 17, 40, 64, 100])
    launch = {"num_sms": 1, "split_len": split_len, "merge_tile": merge_tile}
    out = paged_decode_attention(q, k, v, table, positions, **launch)
    torch.testing.assert_close(out, paged_attention_dense(q, k, v, table, positions), atol=1e-5, rtol=1e-5)
    if split_len == 16:  # one block a split: each sequence's arithmetic is its own, whatever the batch
        alone = paged_decode_attention(q[2:3], k, v, table[2:3], positions[2:3], **launch)
        assert torch.equal(alone, out[2:3])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_append_kernel_equals_torch_rope_and_index_put(dtype, interpreter_loops):
    """The fused kernel gives the same bits as decoder._qkv's RoPE and PagedKVCache's index_put."""
    from questa_nemo.rollout.decoder import rope, rope_tables
    from questa_nemo.rollout.paged_triton import rope_append

    g = torch.Generator().manual_seed(3)
    b, groups, per_group, d, bs = 5, 2, 3, 32, 16
    qkv = (torch.randn(b, groups * (per_group + 2) * d, generator=g) * 3).to(dtype)
    positions = torch.tensor([0, 7, 16, 200, 4095])
    cos, sin = rope_tables(positions[:, None], 1.0 / 10000 ** (torch.arange(0, d, 2) / d), dtype)
    pool = torch.randn(2, 9, groups, bs, d, generator=g).to(dtype)
    blocks, offsets = torch.tensor([1, 3, 4, 8, 2]), positions % bs
    k_ref, v_ref = pool[0].clone(), pool[1].clone()
    x = qkv.view(b, 1, groups, per_group + 2, d).permute(0, 2, 3, 1, 4)  # decoder._qkv's layout
    qk = rope(x[:, :, : per_group + 1], cos, sin)
    k_ref[blocks, :, offsets] = qk[:, :, per_group, 0]
    v_ref[blocks, :, offsets] = x[:, :, per_group + 1, 0]
    q = rope_append(qkv, cos.view(b, -1), sin.view(b, -1), pool[0], pool[1], blocks, offsets)
    assert torch.equal(q, qk[:, :, :per_group, 0])
    assert torch.equal(pool[0], k_ref) and torch.equal(pool[1], v_ref)


@needs_triton
def test_fused_step_gives_the_same_bits(model, kernel_on, monkeypatch):
    """At the same attention launch, the fused step (RoPE + append in one kernel) samples the same tokens with
    the same log-probs as the step of torch ops it replaces (both with torch's norms: fused_norms, whose
    RMSNorm rounds as the trainer's kernel, is checked in test_engine_with_triton_kernel_equals_contiguous)."""
    from questa_nemo.rollout.paged import PagedKVCache

    monkeypatch.setattr(PagedKVCache, "launch_settings", lambda self, batch: {"splits": 2})
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=4, ignore_eos=True)
    results = []
    for fused in (False, True):
        b = paged(model, fused_decode=fused, fused_norms=False)
        results.append(b.generate(PROMPTS, params))
        assert b._runner.cache.takes_qkv == fused
    assert kernel_on["attention"] >= 2 * 10 * 2  # two engines, ten steps, two layers: the kernel ran
    assert tokens(results[0]) == tokens(results[1])
    assert max_logprob_diff(*results) == 0


def test_prompt_groups_from_block_tables():
    """Slots whose leading blocks are the same blocks form a group (capped in size), the shared prefix is cut
    into work items, a slot's last block is never shared, slots alone get nothing."""
    from questa_nemo.rollout.paged import prompt_groups

    owned = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6, 7], [8, 9], [8, 10], [11, 12], [], [1, 2, 3, 13]]
    refs = [0] * 20
    for row in owned:
        for blk in row:
            refs[blk] += 1
    members, items, skip, count = prompt_groups(owned, refs, max_members=3, max_items=2, min_item_blocks=1)
    groups = [m for m in members if m[0] >= 0]
    assert sorted(map(tuple, groups)) == [(0, 1, 2), (3, 4, -1)]  # slot 7 alone after the cap: no group
    assert skip == [3, 3, 3, 1, 1, 0, 0, 0]
    used = [it for it in items if it[0] >= 0]
    assert sorted((it[1], it[2]) for it in used) == [(0, 1), (0, 2), (2, 3)]
    assert count == [2, 2, 2, 1, 1, 0, 0, 0]
    _, items, _, count = prompt_groups(owned, refs, max_members=3, max_items=2)  # items of >= 4 blocks
    assert count == [1, 1, 1, 1, 1, 0, 0, 0] and sum(it[0] >= 0 for it in items) == 2


def cascade_pool(per_group: int = 3):
    """Two prompt groups sharing leading blocks, a singleton, a sequence barely past its prompt: q, k, v, table,
    positions and their Cascade (up to 2 prefix partials a sequence)."""
    from questa_nemo.rollout.paged import prompt_groups
    from questa_nemo.rollout.paged_triton import Cascade

    g = torch.Generator().manual_seed(1)
    bs, groups, dim = 16, 2, 32
    owned = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 7], [8, 9, 10], [8, 11], [12, 13]]
    lengths = [60, 70, 49, 40, 20, 30]
    refs = [0] * 14
    for row in owned:
        for blk in row:
            refs[blk] += 1
    k = torch.randn(14, groups, bs, dim, generator=g)
    v = torch.randn(14, groups, bs, dim, generator=g)
    table = torch.zeros(len(owned), 5, dtype=torch.int32)
    for i, row in enumerate(owned):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    q = torch.randn(len(owned), groups, per_group, dim, generator=g)
    positions = torch.tensor(lengths) - 1
    host = prompt_groups(owned, refs, max_members=4, max_items=2, min_item_blocks=1)
    return q, k, v, table, positions, Cascade(*(torch.tensor(t, dtype=torch.int32) for t in host), 2)


@needs_triton
@MERGES
def test_cascade_attention_matches_dense_oracle(merge_tile, interpreter_loops):
    """Cascade attention (shared prefix read once per group, suffix splits after it, one merge) against the
    float64 oracle, with two groups, a singleton and a sequence barely past its prompt."""
    from questa_nemo.rollout.paged_triton import paged_decode_attention

    q, k, v, table, positions, cascade = cascade_pool()
    ref = paged_attention_dense(q, k, v, table, positions)
    for split_len in (16, 32):
        out = paged_decode_attention(
            q, k, v, table, positions, 1, split_len=split_len, cascade=cascade, merge_tile=merge_tile
        )
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def nan_scratch(monkeypatch):
    """torch.empty's floating tensors come back NaN-filled (the kernels' partial outputs and log-sum-exps): a
    merge that reads a partial never written (a padded head row, a split past the sequence's own, a prefix
    slot past its group's count) turns its output NaN."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@needs_triton
@pytest.mark.parametrize("per_group", [3, 6])
@pytest.mark.parametrize("case", ["splits", "fixed", "fixed_chunked", "cascade", "cascade_chunked"])
def test_tile_merge_equals_loop_merge(case, per_group, monkeypatch, nan_scratch, interpreter_loops):
    """EngineOptions.merge_tile: _merge_tile_kernel (a program per live head row, the partials as one tile, or
    in chunks rescaled online) gives _merge_kernel's output to float32 rounding, and the float64 oracle's, for
    splits by batch, fixed-length splits over lengths from one split to the table's width (most sequences use
    fewer splits than the grid has) and cascade; 6 query heads a group leave padded rows 6..15 unwritten."""
    from questa_nemo.rollout import paged_triton

    if case.startswith("cascade"):
        q, k, v, table, positions, cascade = cascade_pool(per_group)
        launch = {"split_len": 16, "cascade": cascade}  # 5 splits + 2 prefix slots: part_splits 7
    else:
        lengths = [1, 16, 17, 250, 1000, 33, 990, 64]  # 1 split ... 32 (the table's 64 blocks / 2)
        q, k, v, table, positions = random_pool(lengths, per_group=per_group)
        launch = {"splits": 5} if case == "splits" else {"split_len": 32}
    if case.endswith("chunked"):  # chunks of 2 splits: online rescale, chunks with no valid partial
        monkeypatch.setattr(paged_triton, "MERGE_TILE_ELEMENTS", 2 * q.size(-1))
    loop = paged_triton.paged_decode_attention(q, k, v, table, positions, 1, **launch, merge_tile=False)
    tile = paged_triton.paged_decode_attention(q, k, v, table, positions, 1, **launch, merge_tile=True)
    assert not tile.isnan().any() and not loop.isnan().any()
    torch.testing.assert_close(tile, loop, atol=1e-6, rtol=1e-6)  # same maths, sums in another order
    torch.testing.assert_close(tile, paged_attention_dense(q, k, v, table, positions), atol=1e-5, rtol=1e-5)


@needs_triton
def test_engine_with_triton_kernel_equals_contiguous(model, kernel_on, monkeypatch):
    """The engine's paged path with the kernel (as on GPU: one graph key per batch, no span) against the
    contiguous cache: greedy tokens equal, log-probs within float32 noise."""
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12, ignore_eos=True)
    contiguous = backend(model).generate(PROMPTS, params)
    # the earlier step, fused, cascade, cascade with the tile merge, fused with the norms in Triton, and with
    # the skinny matmul for the projections
    combos = ((False, False, False, False, False), (True, False, False, False, False))
    combos += ((True, True, False, False, False), (True, True, True, False, False), (True, False, True, True, False))
    combos += ((True, False, True, True, True),)
    from questa_nemo.model import triton_kernels

    skinny_calls = []
    real_skinny = triton_kernels.skinny_linear
    monkeypatch.setattr(triton_kernels, "skinny_linear", lambda *a, **k: skinny_calls.append(1) or real_skinny(*a, **k))
    for fused, cascade, merge, norms, skinny in combos:
        b = paged(model, fused_decode=fused, cascade_attention=cascade, merge_tile=merge, fused_norms=norms,
                  skinny_gemm=skinny)  # fmt: skip
        before = {k: kernel_on[k] for k in ("attention", "merge_tile")} | {"cascade": len(kernel_on["cascade"])}
        calls = len(skinny_calls)
        result = b.generate(PROMPTS, params)
        assert b._runner.cache.fused == fused and b._runner.cache.cascade == cascade
        assert b._runner.cache.merge_tile == merge and b._runner.cache.fused_residual == norms
        assert (len(skinny_calls) - calls == 12 * (2 * 4 + 1)) == skinny  # every step's 2 layers x 4 + the head
        assert kernel_on["attention"] - before["attention"] == 12 * 2  # every step's two layers
        assert kernel_on["merge_tile"] - before["merge_tile"] == (12 * 2 if merge else 0)
        # cascade: the long prompt's samples share its two full blocks, read once by their group
        assert (kernel_on["cascaded"](before["cascade"]) > 0) == cascade
        assert tokens(result) == tokens(contiguous)
        assert max_logprob_diff(result, contiguous) < 1e-4


@needs_triton
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_engine_weights8_equal_dequantized_weights(model, kernel_on, monkeypatch, fmt):
    """EngineOptions.weights8: the step's four projections a layer multiply by 8-bit copies in the skinny
    matmul. Against the contiguous cache on a twin whose projections are those copies dequantized (q * scale):
    greedy tokens equal, log-probs within float32 noise, so the 8-bit path is that model exactly. Prompts of
    one token: the prefill (a prompt's tokens before its last) runs the model's own weights, only the decode
    step the 8-bit copies; a batch past WEIGHTS8_MAX_ROWS keeps the model's weights. A weight update
    requantizes into the same buffers (a captured graph keeps reading them); the head stays unquantized."""
    from questa_nemo.model import triton_kernels
    from questa_nemo.model.weights8 import FORMATS, dequantize_rows, quantize_rows
    from questa_nemo.rollout.decoder import DecoderWeights

    twin = megatron_twin(hf_model("qwen2"))
    for lw in DecoderWeights.from_gpt_model(twin, VOCAB).layers:
        for name in ("qkv", "proj", "fc1", "fc2"):
            getattr(lw, name).copy_(dequantize_rows(*quantize_rows(getattr(lw, name), fmt)))
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12, ignore_eos=True)
    prompts = [[5], [7], [60]]
    want = backend(twin).generate(prompts, params)
    scaled = []
    real_skinny = triton_kernels.skinny_linear
    monkeypatch.setattr(triton_kernels, "skinny_linear",
                        lambda *a, **k: scaled.append(k.get("scale") is not None) or real_skinny(*a, **k))  # fmt: skip
    b = paged(model, weights8=fmt)
    got = b.generate(prompts, params)
    assert scaled.count(True) == 12 * 2 * 4 and scaled.count(False) == 0  # every step's 2 layers x 4; head: F.linear
    assert tokens(got) == tokens(want)
    assert max_logprob_diff(got, want) < 1e-4
    unquantized = backend(model).generate(prompts, params)
    assert max_logprob_diff(got, unquantized) > 1e-5  # the copies are 8-bit: not the model's own weights
    scaled.clear()
    wide = paged(model, weights8=fmt, max_batch_sequences=32)  # 18 sequences: one batch of 32
    wide.generate([[5 + i] for i in range(9)], SamplingParams(n=2, temperature=0.0, max_new_tokens=2, ignore_eos=True))
    assert scaled == []  # past WEIGHTS8_MAX_ROWS every projection multiplies by the model's weights (cuBLAS)

    first = b.weights.w8[0]["fc1"]
    assert first[0].dtype == FORMATS[fmt][0]
    ptrs = (first[0].data_ptr(), first[1].data_ptr())
    before = first[0].float().clone()
    with torch.no_grad():
        model.decoder.layers[0].mlp.linear_fc1.weight.mul_(2.0)
        try:
            b.update_weights(1)
            assert (first[0].data_ptr(), first[1].data_ptr()) == ptrs and b.weights.w8 is not None
            assert torch.equal(first[0].float(), before)  # a doubled row: the same 8-bit values, twice the scale
            assert torch.equal(first[1], quantize_rows(model.decoder.layers[0].mlp.linear_fc1.weight, fmt)[1])
        finally:
            model.decoder.layers[0].mlp.linear_fc1.weight.mul_(0.5)


def test_engine_weights8_refused_off_the_triton_step(model):
    """weights8 runs only in the fused-norms Triton step: without fused_norms it is refused when the engine is
    built; on a cache that runs torch's step (CPU, no kernel) at the first generate, naming the option; a
    format it does not know is refused when the engine is built."""
    with pytest.raises(ValueError, match="weights8 .* fused_norms"):
        paged(model, weights8="int8", fused_norms=False)
    with pytest.raises(ValueError, match="weights8 is 'int4': one of"):
        paged(model, weights8="int4")
    for fmt in ("int8", "fp8"):
        b = paged(model, weights8=fmt)
        with pytest.raises(RuntimeError, match=f"weights8='{fmt}' needs the Triton decode step"):
            b.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=2, ignore_eos=True))


def test_paged_decode_step_is_capture_safe(model, monkeypatch):
    """The paged step reads no tensor value on the host (what CUDA-graph capture needs), as the contiguous
    step (tests/test_rollout.py), and replaying it from restored buffers reproduces it exactly."""
    from questa_nemo.rollout.graphs import StepKey

    b = paged(model)
    b.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=4))
    runner = b._runner
    for i in range(3):  # give slots blocks, as a chunk would
        runner.cache.ensure(i, 40)
    runner.cache.sync()

    runner.noise_key.copy_(torch.arange(1, runner.noise_key.numel() + 1))  # sampling keyed per sequence
    assert_step_is_capture_safe(runner, StepKey(8, 256, 1.0, 1.0), monkeypatch)


@needs_triton
@MERGES
def test_fused_cascade_step_is_capture_safe(model, kernel_on, monkeypatch, merge_tile):
    """The kernel step with fused_decode and cascade attention reads no tensor value on the host either (the
    launch settings and cascade groups come from shapes and persistent device tensors), with either merge."""
    from questa_nemo.rollout.graphs import StepKey

    b = paged(model, cascade_attention=True, merge_tile=merge_tile)
    b.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=4))
    runner = b._runner
    for i in range(3):
        runner.cache.ensure(i, 40)
    runner.cache.share_prefix(0, 3, 32)  # slots 0 and 3 share two full blocks: one cascade group
    runner.cache.ensure(3, 40)
    runner.cache.sync()
    assert int(runner.cache._groups[2][3]) == 2
    runner.noise_key.copy_(torch.arange(1, runner.noise_key.numel() + 1))
    runner.positions[:4] = torch.tensor([36, 20, 30, 35])
    before = len(kernel_on["cascade"])
    merges = kernel_on["merge_tile"]
    assert_step_is_capture_safe(runner, StepKey(8, 256, 1.0, 1.0), monkeypatch)
    assert kernel_on["cascaded"](before) > 0
    assert (kernel_on["merge_tile"] > merges) == merge_tile


def test_rollout_kv_cache_config_picks_the_layout(model):
    """rollout.kv_cache: auto is contiguous on CPU (paged on GPU), paged and contiguous force it; a wrong value
    is refused naming the key."""
    from questa_nemo.config import Config, ConfigError, RolloutConfig, validate
    from questa_nemo.rollout import RolloutContext, build_backend
    from questa_nemo.rollout.paged import PagedKVCache

    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=2)
    results = {}
    for layout in ("auto", "paged", "contiguous"):
        b = build_backend(RolloutConfig(kv_cache=layout, cuda_graphs=False), RolloutContext([model], VOCAB))
        results[layout] = tokens(b.generate(PROMPTS, params))
        assert isinstance(b._runner.cache, PagedKVCache) == (layout == "paged")
    assert results["auto"] == results["paged"] == results["contiguous"]
    cfg = Config()
    cfg.rollout.kv_cache = "ragged"
    with pytest.raises(ConfigError, match="rollout.kv_cache"):
        validate(cfg)


@needs_triton
def test_cascade_through_preemption_and_compaction_keeps_every_logprob(model, kernel_on):
    """Cascade attention (groups rebuilt from the block tables at every sync) while sequences wait, are
    preempted, stop and are compacted: every completion's log-probs still match a full forward."""
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=40, stop_token_ids=STOPS, seed=8)
    b = paged(model, max_batch_sequences=32, kv_blocks=12, kv_headroom_tokens=0, cascade_attention=True)
    result = b.generate(PROMPTS, params)
    assert result.stats["preemptions"] >= 1 and result.stats["compactions"] >= 1
    assert kernel_on["cascaded"]() > 0
    for i, group in enumerate(result.completions):
        for c in group:
            expected = full_forward_logprobs(model, PROMPTS[i], c.token_ids, 1.0)
            assert torch.allclose(expected, torch.tensor(c.logprobs), atol=1e-4)


def test_split_positions_by_batch():
    """Fixed split lengths: about four programs per SM at a 2K context, within [2 blocks, 2048]."""
    from questa_nemo.rollout.paged import split_positions

    assert split_positions(256, 2, 132, 64) == 1024  # 256 x 2 x 2 splits at 2K = 1024 programs
    assert split_positions(512, 2, 132, 64) == 2048
    assert split_positions(8, 2, 132, 64) == 128  # two blocks: at most 16 splits at 2K
    assert split_positions(8, 2, 132, 16) == 32


def test_tile_merge_only_where_splits_are_short():
    """EngineOptions.merge_tile picks the tile merge at batches whose split length is at most
    TILE_MERGE_MAX_SPLIT (many splits a sequence: 6x faster merge at a rollout's tail) and the loop merge above
    (a few splits a sequence, where the tile merge measured up to 2% slower); off: the loop merge everywhere.
    The choice depends on the batch only, so a captured step stays valid."""
    from questa_nemo.rollout.paged import TILE_MERGE_MAX_SPLIT, PagedKVCache

    pool = torch.zeros(1, 4, 2, 64, 8)
    cache = PagedKVCache(pool, pool.clone(), slots=512, max_len=9216, num_sms=132)
    cache.fused = True
    tile = {b: cache.launch_settings(b) for b in (8, 64, 128, 256, 512)}
    assert TILE_MERGE_MAX_SPLIT == 512
    assert [tile[b]["split_len"] for b in tile] == [128, 256, 512, 1024, 2048]
    assert [tile[b]["merge_tile"] for b in tile] == [True, True, True, False, False]
    cache.merge_tile = False
    assert not any(cache.launch_settings(b)["merge_tile"] for b in tile)
    cache.fused = False  # the earlier step (splits by batch): the option as set
    assert cache.launch_settings(8) == {"splits": 32, "merge_tile": False}
    cache.merge_tile = True
    assert cache.launch_settings(256)["merge_tile"] is True


# Every decode-attention kernel variant, lowered to PTX and assembled by ptxas for sm_90 (no GPU needed): the
# interpreter runs above never compile, and a refactor of the kernels (the shared _softmax_step) is otherwise
# only checked on a GPU. Signatures as paged_decode_attention launches them (bf16 model, 64-position blocks).
PAGED_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from questa_nemo.rollout import paged_triton as pt

target = GPUTarget("cuda", 90, 32)
def sig(names, types):
    return dict(zip(names, types))
ints = lambda n: ["i32"] * n
split_names = ["q_ptr", "k_ptr", "v_ptr", "table_ptr", "pos_ptr", "part_ptr", "lse_ptr", "out_ptr", "skip_ptr",
    "groups", "per_group", "num_splits", "part_splits", "split_blocks", "scale",
    "stride_qb", "stride_qg", "stride_qh", "stride_kn", "stride_kg", "stride_ks", "stride_tb", "stride_ob", "stride_og", "stride_oh",
    "BS", "D", "H", "FIXED", "DIRECT", "CASCADE", "PDL"]
split_types = ["*bf16", "*bf16", "*bf16", "*i32", "*i64", "*fp32", "*fp32", "*bf16", "*i32"] + ints(5) + ["fp32"] + ints(10) + ["constexpr"] * 7
done = []
for fixed in (False, True):
    for direct in (False, True):
        for cascade in (False, True):
            c = {"BS": 64, "D": 128, "H": 16, "FIXED": fixed, "DIRECT": direct, "CASCADE": cascade, "PDL": False}
            k = triton.compile(ASTSource(fn=pt._split_kernel, signature=sig(split_names, split_types), constexprs=c), target=target, options={"num_warps": 4})
            done.append(("split", fixed, direct, cascade, bool(k.asm["cubin"])))
merge_names = ["part_ptr", "lse_ptr", "out_ptr", "pos_ptr", "skip_ptr", "count_ptr", "groups", "per_group", "num_splits", "part_splits", "split_blocks",
    "stride_ob", "stride_og", "stride_oh", "BS", "D", "H", "FIXED", "CASCADE", "PDL"]
merge_types = ["*fp32", "*fp32", "*bf16", "*i64", "*i32", "*i32"] + ints(5) + ints(3) + ["constexpr"] * 6
for fixed in (False, True):
    for cascade in (False, True):
        c = {"BS": 64, "D": 128, "H": 16, "FIXED": fixed, "CASCADE": cascade, "PDL": False}
        k = triton.compile(ASTSource(fn=pt._merge_kernel, signature=sig(merge_names, merge_types), constexprs=c), target=target, options={"num_warps": 4})
        done.append(("merge", fixed, cascade, bool(k.asm["cubin"])))
        for chunk, warps in ((64, 4), (128, 8)):  # _merge_tile_kernel as launched: 4 warps up to 8192 values
            k = triton.compile(ASTSource(fn=pt._merge_tile_kernel, signature=sig(merge_names + ["C"], merge_types + ["constexpr"]), constexprs={**c, "C": chunk}), target=target, options={"num_warps": warps})
            done.append(("merge_tile", fixed, cascade, chunk, bool(k.asm["cubin"])))
prefix_names = ["q_ptr", "k_ptr", "v_ptr", "table_ptr", "members_ptr", "items_ptr", "part_ptr", "lse_ptr",
    "groups", "per_group", "num_splits", "part_splits", "scale", "stride_qb", "stride_qg", "stride_qh", "stride_kn", "stride_kg", "stride_ks",
    "stride_tb", "stride_mg", "BS", "D", "H", "M", "R", "PDL"]
prefix_types = ["*bf16"] * 3 + ["*i32"] * 3 + ["*fp32"] * 2 + ints(4) + ["fp32"] + ints(8) + ["constexpr"] * 6
k = triton.compile(ASTSource(fn=pt._prefix_kernel, signature=sig(prefix_names, prefix_types), constexprs={"BS": 64, "D": 128, "H": 16, "M": 16, "R": 128, "PDL": False}), target=target, options={"num_warps": 8})
done.append(("prefix", bool(k.asm["cubin"])))
assert all(row[-1] for row in done), done
print("compiled", len(done))
"""


@needs_triton
def test_paged_kernels_compile_for_hopper():
    done = compile_for_hopper(PAGED_AOT, timeout=600)
    assert done.returncode == 0 and "compiled 21" in done.stdout, done.stderr[-2000:]
