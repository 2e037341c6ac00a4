"""Export / import: HF -> ours -> HF and ours -> .nemo -> ours exact, transformers reloads, atomic failures."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
import yaml
from export_helpers import assert_same_tensors, tiny_hf_folder
from tiny_hf import VOCAB

from questa_nemo.ckpt import export, native, nemo
from questa_nemo.ckpt.export import ExportOptions, convert, open_model
from questa_nemo.config import ConfigError
from questa_nemo.model import nemo_io


def _tensors(path) -> dict[str, torch.Tensor]:
    with open_model(path) as model:
        return {name: model.tensors[name].clone() for name in model.tensors}


def _hf_state(ref: torch.nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    sd = {k: v.detach() for k, v in ref.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight")
    return sd


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_hf_to_native_to_hf_is_exact_and_transformers_reloads(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    ref, src = tiny_hf_folder(kind, tmp_path / "src")
    convert(src, tmp_path / "ours", ExportOptions(format="native", tensor_parallel=2))
    convert(tmp_path / "ours", tmp_path / "back", ExportOptions(format="hf"))

    tied = kind == "llama"
    assert_same_tensors(_tensors(tmp_path / "back"), _hf_state(ref, tied))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB  # megatron's padding is stripped
    # The embedding is stored padded for TP=2 in our checkpoint: 256 rows, not 200.
    shapes = nemo_io.tensor_shapes(native.model_dir(tmp_path / "ours"))
    assert shapes["embedding.word_embeddings.weight"][0] == (256, 64)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ref(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_native_to_nemo_to_native_is_exact(tmp_path, kind):
    _, src = tiny_hf_folder(kind, tmp_path / "src")
    convert(src, tmp_path / "ours", ExportOptions(format="native"))
    convert(tmp_path / "ours", tmp_path / "m.nemo", ExportOptions(format="nemo"))
    convert(tmp_path / "m.nemo", tmp_path / "again", ExportOptions(format="native"))

    first = native.model_dir(tmp_path / "ours")
    second = native.model_dir(tmp_path / "again")
    keys = sorted(nemo_io.tensor_shapes(first))
    assert keys == sorted(nemo_io.tensor_shapes(second))
    assert_same_tensors(nemo_io.load_tensors(second, keys), nemo_io.load_tensors(first, keys))
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (tmp_path / "ours" / "config.json").read_text()
    )


def test_nemo_archive_has_the_layout_and_keys_nemo_reads(tmp_path):
    _, src = tiny_hf_folder("qwen2", tmp_path / "src", layers=2)
    (src / "vocab.json").write_text("{}")  # stand-in tokenizer files: they must travel as artifacts
    (src / "merges.txt").write_text("#version: 0.2\n")
    convert(src, tmp_path / "m.nemo", ExportOptions(format="nemo", dtype="bf16"))

    with tarfile.open(tmp_path / "m.nemo", "r:") as tar:  # "r:" fails on a compressed archive
        names = tar.getnames()
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml"))
    assert {"./model_config.yaml", "./model_weights/metadata.json", "./model_weights/common.pt"} <= set(names)
    assert (
        cfg["mcore_gpt"] and cfg["position_embedding_type"] == "rope" and cfg["activation"] == "fast-swiglu"
    )
    assert cfg["normalization"] == "rmsnorm" and cfg["qkv_bias"] and cfg["precision"] == "bf16"
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["ffn_hidden_size"]) == (2, 64, 96)
    assert (cfg["num_attention_heads"], cfg["num_query_groups"], cfg["kv_channels"]) == (4, 2, 16)
    assert cfg["rotary_base"] == 1e6 and cfg["share_embeddings_and_output_weights"] is False
    vocab_ref = cfg["tokenizer"]["vocab_file"]
    assert vocab_ref.startswith("nemo:") and "./" + vocab_ref.removeprefix("nemo:") in names
    assert cfg["tokenizer"]["merge_file"].removeprefix("nemo:").endswith("_merges.txt")
    assert cfg["tokenizer"]["type"] == str(src.resolve())  # NeMo's AutoTokenizer loads the folder
    assert cfg["optim"]["name"] == "adamw"  # NeMo requires the section (tests/test_nemo_restore_replay.py)

    with tarfile.open(tmp_path / "m.nemo") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    shapes = nemo_io.tensor_shapes(tmp_path / "x" / "model_weights")
    assert shapes["model.embedding.word_embeddings.weight"] == ((VOCAB, 64), torch.bfloat16)  # unpadded
    assert shapes["model.decoder.layers.self_attention.linear_qkv.weight"][0] == (2, (4 + 2 * 2) * 16, 64)
    assert shapes["model.decoder.layers.self_attention.linear_qkv.bias"][0] == (2, 128)
    assert shapes["model.decoder.layers.mlp.linear_fc1.weight"][0] == (2, 2 * 96, 64)
    assert "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in shapes
    assert "model.output_layer.weight" in shapes and "model.decoder.final_layernorm.weight" in shapes


def test_nemo_written_by_nemo_imports_from_model_config_alone(tmp_path):
    """An archive without our hf_config.json (as NeMo writes it) imports from model_config.yaml."""
    ref, src = tiny_hf_folder("llama", tmp_path / "src", layers=2)
    convert(src, tmp_path / "m.nemo", ExportOptions(format="nemo", dtype="fp32"))
    with tarfile.open(tmp_path / "m.nemo") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    (tmp_path / "x" / "hf_config.json").unlink()
    with tarfile.open(tmp_path / "bare.nemo", "w:") as tar:
        tar.add(tmp_path / "x", arcname=".")
    convert(tmp_path / "bare.nemo", tmp_path / "hf", ExportOptions(format="hf"))
    assert_same_tensors(_tensors(tmp_path / "hf"), _hf_state(ref, tied=True))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (
        "llama",
        2,
        True,
    )


def test_truncated_or_foreign_archives_fail_clearly_and_write_nothing(tmp_path, capsys):
    _, src = tiny_hf_folder("qwen2", tmp_path / "src", layers=2)
    convert(src, tmp_path / "m.nemo", ExportOptions(format="nemo"))
    data = (tmp_path / "m.nemo").read_bytes()
    (tmp_path / "cut.nemo").write_bytes(data[: len(data) // 2])
    with tarfile.open(tmp_path / "foreign.nemo", "w:") as tar:
        tar.add(src / "config.json", arcname="./config.json")
    (tmp_path / "text.nemo").write_text("hello")

    for bad, reason in [
        ("cut.nemo", "truncated"),
        ("foreign.nemo", "model_config.yaml"),
        ("text.nemo", "not a readable"),
    ]:
        out = tmp_path / f"out_{bad}"
        with pytest.raises(ValueError, match=reason):
            convert(tmp_path / bad, out, ExportOptions(format="hf"))
        assert not out.exists()
        assert export.main("default", [], [str(tmp_path / bad), str(out)]) == 2  # an unusable input: exit code 2 (cli.py)
        assert bad in capsys.readouterr().err
        assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary siblings left behind


def test_failed_write_leaves_no_output_and_existing_output_is_kept(tmp_path, monkeypatch):
    _, src = tiny_hf_folder("qwen2", tmp_path / "src", layers=2)

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nemo.nemo_io, "save_layer_stacked", crash)
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "ours", ExportOptions(format="native"))
    assert not (tmp_path / "ours").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]
    monkeypatch.undo()

    (tmp_path / "hf").mkdir()
    assert export.main("default", [], [str(src), str(tmp_path / "hf")]) == 2  # refuses to overwrite: a usage error
    assert export.main("default", ["overwrite=true"], [str(src), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_options_name_the_bad_key():
    with pytest.raises(ConfigError, match="^format:"):
        export.parse_options(["format=onnx"], "hf")
    with pytest.raises(ConfigError, match="^colour:"):
        export.parse_options(["colour=red"], "hf")
    with pytest.raises(ConfigError, match="^model.tensor_parallel:"):
        export.parse_options(["model.tensor_parallel=two"], "hf")
    options = export.parse_options(["dtype=bf16", "model.tensor_parallel=2", "overwrite=true"], "native")
    assert (options.format, options.dtype, options.tensor_parallel, options.overwrite) == (
        "native",
        "bf16",
        2,
        True,
    )


def test_sharded_hf_export_writes_an_index(tmp_path):
    ref, src = tiny_hf_folder("qwen2", tmp_path / "src", layers=2)
    convert(src, tmp_path / "hf", ExportOptions(format="hf", shard_gb=40_000 / 2**30))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_tensors(_tensors(tmp_path / "hf"), _hf_state(ref, tied=False))


def test_legacy_common_file_is_added_only_where_missing(tmp_path):
    """megatron-core 0.17+ writes no common.pt, which NeMo 25.09's megatron-core 0.14 opens first: the .nemo
    writer adds the empty common state 0.14 itself writes (it must load without pickle), and leaves one that
    exists alone. bench/mcore_version_check.py checks it on the real 0.19.2 in CI's install checks."""
    nemo_io.write_legacy_common(tmp_path)
    assert torch.load(tmp_path / nemo_io.COMMON_FILE, weights_only=True) == {}
    torch.save({"kept": 1}, tmp_path / nemo_io.COMMON_FILE)
    nemo_io.write_legacy_common(tmp_path)
    assert torch.load(tmp_path / nemo_io.COMMON_FILE, weights_only=True) == {"kept": 1}
