"""HF <-> Megatron conversion and the built GPTModel: logits parity at TP=1 in-process, exact round trips."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from tiny_hf import VOCAB, tiny_hf_model  # noqa: E402

from questa_nemo.config import (  # noqa: E402
    Config,
    ConfigError,
    ModelConfig,
    read_hf_config,
    validate,
    validate_model_shapes,
)
from questa_nemo.model.convert import (  # noqa: E402
    ModelShape,
    ShardLayout,
    hf_names_for_shard,
    hf_to_megatron,
    megatron_to_hf,
)
from questa_nemo.model.hf_io import HFCheckpoint, write_safetensors  # noqa: E402

FP32 = ModelConfig(params_dtype="fp32", recompute="none", attention="sdpa")


@pytest.fixture(scope="module")
def single_process():
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    init_distributed(FP32)
    yield
    destroy_distributed()


def _megatron_from(ref: torch.nn.Module, hf: dict, cfg: ModelConfig = FP32):
    from questa_nemo.model.megatron import build_model, load_hf_weights

    model = build_model(hf, cfg)
    load_hf_weights(model, ref.state_dict(), hf, cfg)
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_logits_match_transformers_at_tp1(single_process, kind):
    ref, hf = tiny_hf_model(kind)
    model = _megatron_from(ref, hf)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(ids.size(1)).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, positions, None)  # [b, s, padded vocab]
        expected = ref(ids).logits
    assert logits.shape == (2, 23, ModelShape.from_hf(hf).padded_vocab(1))
    torch.testing.assert_close(logits[..., :VOCAB], expected, rtol=1e-5, atol=1e-5)
    assert logits[..., VOCAB:].abs().max() == 0  # padded rows are zero


def test_packed_sequences_attend_only_within_their_segment(single_process):
    from megatron.core.packed_seq_params import PackedSeqParams

    ref, hf = tiny_hf_model("qwen2")
    model = _megatron_from(ref, hf)
    g = torch.Generator().manual_seed(2)
    segments = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (9, 4, 6)]
    ids = torch.cat(segments, dim=1)
    positions = torch.cat([torch.arange(s.size(1)) for s in segments]).unsqueeze(0)
    cu = torch.tensor([0, 9, 13, 19], dtype=torch.int32)
    packed = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9
    )
    with torch.no_grad():
        logits = model(ids, positions, None, packed_seq_params=packed)
        for s, start in zip(segments, cu[:-1].tolist()):
            expected = ref(s).logits[0]
            torch.testing.assert_close(
                logits[0, start : start + s.size(1), :VOCAB], expected, rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize(
    "tp,pp,vp", [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, 2)], ids=["tp1", "tp2", "pp2", "tp2pp2vp2"]
)
def test_round_trip_is_exact(kind, tp, pp, vp):
    ref, hf = tiny_hf_model(kind)
    shape = ModelShape.from_hf(hf)
    hf_sd = {k: v for k, v in ref.state_dict().items() if not (shape.tied and k == "lm_head.weight")}
    shards = {}
    for t in range(tp):
        for p in range(pp):
            for v in range(vp or 1):
                layout = ShardLayout(t, tp, p, pp, v if vp else None, vp)
                shards[layout] = hf_to_megatron(hf_sd, shape, layout)
    back = megatron_to_hf(shards, shape)
    assert set(back) == set(hf_sd)
    for name, tensor in hf_sd.items():
        assert torch.equal(back[name], tensor), name


def test_qkv_layout_interleaves_query_groups():
    """Megatron's fused QKV: per group, its query heads then its key head then its value head."""
    ref, hf = tiny_hf_model("qwen2", layers=1)
    shape = ModelShape.from_hf(hf)
    d, h = shape.head_dim, shape.hidden
    # Tag every row of q/k/v with its (projection, head) so the layout can be read back.
    q = torch.arange(shape.heads).repeat_interleave(d)[:, None].float().expand(-1, h)
    k = 100 + torch.arange(shape.groups).repeat_interleave(d)[:, None].float().expand(-1, h)
    v = 200 + torch.arange(shape.groups).repeat_interleave(d)[:, None].float().expand(-1, h)
    sd = dict(ref.state_dict())
    for name, tagged in zip("qkv", (q, k, v)):
        sd[f"model.layers.0.self_attn.{name}_proj.weight"] = tagged
        sd[f"model.layers.0.self_attn.{name}_proj.bias"] = tagged[:, 0]
    tp1 = hf_to_megatron(sd, shape, ShardLayout())["decoder.layers.0.self_attention.linear_qkv.bias"]
    rows = tp1[::d].tolist()  # one tag per head
    assert rows == [0, 1, 100, 200, 2, 3, 101, 201]
    tp2_rank1 = hf_to_megatron(sd, shape, ShardLayout(tp_rank=1, tp_size=2))
    assert tp2_rank1["decoder.layers.0.self_attention.linear_qkv.bias"][::d].tolist() == [2, 3, 101, 201]


def test_shard_reads_only_its_tensors():
    ref, hf = tiny_hf_model("qwen2")
    shape = ModelShape.from_hf(hf)
    full = ref.state_dict()
    layout = ShardLayout(pp_rank=1, pp_size=2)
    wanted = hf_names_for_shard(shape, layout)
    assert "model.embed_tokens.weight" not in wanted and "lm_head.weight" in wanted
    assert all(".layers.0." not in n and ".layers.1." not in n for n in wanted)
    read: list[str] = []
    hf_to_megatron(lambda n: read.append(n) or full[n], shape, layout)
    assert sorted(set(read)) == wanted


def test_safetensors_sharded_write_and_lazy_read(tmp_path):
    ref, _ = tiny_hf_model("qwen2")
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    files = write_safetensors(sd, tmp_path, max_shard_bytes=40_000)
    assert len(files) > 2 and files[-1].name == "model.safetensors.index.json"
    assert not list(tmp_path.glob("*.tmp"))
    ckpt = HFCheckpoint(tmp_path)
    assert set(ckpt) == set(sd)
    for name in sd:
        assert torch.equal(ckpt[name], sd[name])
    assert set(ckpt.read(["model.norm.weight", "lm_head.weight"])) == {"model.norm.weight", "lm_head.weight"}
    with pytest.raises(KeyError, match="no safetensors file"):
        ckpt["model.missing"]


def test_parallel_config_errors_name_the_key(tmp_path):
    _, hf = tiny_hf_model("qwen2")
    import json

    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = Config()
    cfg.train.micro_batch_tokens = 10**6
    cfg.model.hf_config = str(tmp_path)
    cfg.model.tensor_parallel = 4  # divides 4 heads but not 2 key/value heads
    validate(cfg)  # config load reads no file: the model's shapes are a build-time check
    with pytest.raises(ConfigError, match="model.tensor_parallel.*num_key_value_heads"):
        validate_model_shapes(cfg.model, read_hf_config(cfg.model.hf_config))
    cfg.model.tensor_parallel, cfg.model.pipeline_parallel = 1, 3
    with pytest.raises(ConfigError, match="model.pipeline_parallel"):
        validate_model_shapes(cfg.model, read_hf_config(cfg.model.hf_config))


def test_unsupported_architecture_is_rejected_naming_the_key():
    from questa_nemo.model.megatron import transformer_config_from_hf

    _, hf = tiny_hf_model("llama")
    with pytest.raises(ConfigError, match="rope_scaling"):
        transformer_config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, FP32)
    with pytest.raises(ConfigError, match="model_type"):
        transformer_config_from_hf({**hf, "model_type": "gpt2"}, FP32)
