"""NeMo 1.x's reads of a .nemo's model_config.yaml, replayed on what `questa-nemo export` writes.

NeMo's own loader does not install in our venv (it needs megatron-core 0.13.1 and transformers 4.51); the
by-hand check bench/nemo_restore_check.sh runs it for real in a separate venv. This test replays, in order, each
read that `MegatronGPTModel.restore_from` makes of the config on the way to a built model, with NeMo's own
defaults, on an OmegaConf struct config as NeMo builds it (a missing key read as an attribute raises), and checks
the value it gets is right for the exported model. Citations: NVIDIA/NeMo v2.4.1 (nemo_toolkit 2.4.1, the last
release with MegatronGPTModel), paths under nemo/, lines as in that release.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from export_helpers import tiny_hf_folder
from omegaconf import DictConfig, OmegaConf

from questa_nemo.ckpt import nemo
from questa_nemo.ckpt.export import ExportOptions, convert
from questa_nemo.ckpt.hf import HFModel
from questa_nemo.model.convert import ModelShape

BASE = "collections/nlp/models/language_modeling/megatron_base_model.py"
GPT = "collections/nlp/models/language_modeling/megatron_gpt_model.py"
TOK = "collections/nlp/modules/common/tokenizer_utils.py"
FUNCS = "collections/nlp/parts/utils_funcs.py"
CONNECTOR = "core/connectors/save_restore_connector.py"
OVERRIDES = "collections/nlp/parts/nlp_overrides.py"
DIST_IO = "utils/callbacks/dist_ckpt_io.py"

# nemo/collections/nlp/parts/utils_funcs.py:187-196: the activations activation_to_func accepts.
NEMO_ACTIVATIONS = {"gelu", "geglu", "fast-geglu", "reglu", "fast-reglu", "swiglu", "fast-swiglu", "squared-relu"}
# nemo/collections/nlp/parts/utils_funcs.py:48-55: torch_dtype_from_precision's accepted values.
NEMO_PRECISIONS = {"bf16": "bfloat16", "bf16-mixed": "bfloat16", 16: "float16", "16": "float16",
                   "16-mixed": "float16", 32: "float32", "32": "float32", "32-true": "float32"}  # fmt: skip


@dataclass(frozen=True)
class Read:
    where: str  # upstream file:line (NeMo v2.4.1)
    what: str  # the read, as NeMo writes it
    check: Callable[[DictConfig, dict, Archive], object]  # raises or returns False when NeMo would fail / misbuild


@dataclass
class Archive:
    names: set[str]  # tar members without "./"
    dtype: str  # what export was asked for


def _eq(actual, expected):
    assert actual == expected, f"{actual!r} != {expected!r}"
    return True


def _tokenizer_loadable(c: DictConfig, hf: dict, a: Archive) -> bool:
    # get_nmt_tokenizer: library != byte-level and model_name (type) is None and no tokenizer_model file
    # -> ValueError "No Tokenizer path provided or file does not exist!"; huggingface -> AutoTokenizer(type).
    assert c.tokenizer.library == "huggingface", c.tokenizer.library
    type_ = c.tokenizer.get("type", None)
    assert type_, "tokenizer.type is null: NeMo stops with 'No Tokenizer path provided'"
    assert not str(type_).startswith("nemo:"), "type goes to AutoTokenizer.from_pretrained unresolved"
    return True


def _artifact(key: str) -> Callable[[DictConfig, dict, Archive], bool]:
    def check(c: DictConfig, hf: dict, a: Archive) -> bool:
        ref = c.tokenizer.get(key, None)
        # register_artifact (core/connectors/save_restore_connector.py:414-415): "nemo:" + a top-level member.
        assert ref is None or (ref.startswith("nemo:") and ref[5:] in a.names), f"tokenizer.{key}={ref!r}"
        return True

    return check


def _shape(hf: dict) -> ModelShape:
    return ModelShape.from_hf(hf)


READS = [
    Read(f"{CONNECTOR}:184", "OmegaConf.set_struct(conf, True)", lambda c, hf, a: OmegaConf.is_struct(c)),
    Read(f"{BASE}:128", "torch_dtype_from_precision(self.cfg.precision)",
         lambda c, hf, a: _eq(NEMO_PRECISIONS[c.precision], a.dtype)),
    Read(f"{BASE}:151", "cfg.optim.get('name')", lambda c, hf, a: c.optim.get("name") is not None),
    Read(f"{BASE}:206", "self.cfg.optim.get('num_distributed_optimizer_instances', 1)",
         lambda c, hf, a: c.optim.get("num_distributed_optimizer_instances", 1) == 1),
    Read(f"{BASE}:158", "self._cfg.get('use_cpu_initialization', False) is False -> torch.cuda.set_device",
         lambda c, hf, a: _eq(c.get("use_cpu_initialization", False), False)),
    Read(f"{GPT}:344", "cfg.get('mcore_gpt', False)", lambda c, hf, a: _eq(c.get("mcore_gpt", False), True)),
    # TE layer specs hold the `_extra_state` objects the archive's weights carry (a strict load wants both).
    Read(f"{GPT}:386", "cfg.get('transformer_engine', False)",
         lambda c, hf, a: _eq(c.get("transformer_engine", False), True)),
    Read(f"{GPT}:446", "cfg.get('global_batch_size') // (cfg.get('micro_batch_size') * dp)",
         lambda c, hf, a: c.get("global_batch_size") // c.get("micro_batch_size") >= 1),
    Read(f"{BASE}:454", "self._cfg.tokenizer.library", lambda c, hf, a: c.tokenizer.library),
    Read(f"{TOK}:205", "model_name is None and tokenizer_model is None -> 'No Tokenizer path provided'",
         _tokenizer_loadable),
    Read(f"{BASE}:456", "register_artifact('tokenizer.model', cfg.tokenizer.get('model'))", _artifact("model")),
    Read(f"{BASE}:457", "register_artifact('tokenizer.vocab_file', ...)", _artifact("vocab_file")),
    Read(f"{BASE}:458", "register_artifact('tokenizer.merge_file', ...)", _artifact("merge_file")),
    Read(f"{BASE}:510", "self.cfg.get('bias', True)", lambda c, hf, a: _eq(c.get("bias", True), False)),
    Read(f"{BASE}:511", "self.cfg.get('qkv_bias', False)",
         lambda c, hf, a: _eq(c.get("qkv_bias", False), _shape(hf).qkv_bias)),
    Read(f"{BASE}:513", "self.cfg.get('activation', 'gelu')",
         lambda c, hf, a: c.get("activation", "gelu") in NEMO_ACTIVATIONS
         and c.get("activation", "gelu").endswith("swiglu")),
    Read(f"{BASE}:518", "self.cfg.get('normalization', 'LayerNorm')",
         lambda c, hf, a: _eq(c.get("normalization", "LayerNorm").lower(), "rmsnorm")),
    Read(f"{BASE}:608", "TransformerConfig fields by name: cfg[num_layers]",
         lambda c, hf, a: _eq(c.num_layers, _shape(hf).layers)),
    Read(f"{BASE}:608", "cfg[hidden_size]", lambda c, hf, a: _eq(c.hidden_size, _shape(hf).hidden)),
    Read(f"{BASE}:608", "cfg[ffn_hidden_size]", lambda c, hf, a: _eq(c.ffn_hidden_size, _shape(hf).ffn)),
    Read(f"{BASE}:608", "cfg[num_attention_heads]", lambda c, hf, a: _eq(c.num_attention_heads, _shape(hf).heads)),
    Read(f"{BASE}:608", "cfg[num_query_groups]", lambda c, hf, a: _eq(c.num_query_groups, _shape(hf).groups)),
    Read(f"{BASE}:608", "cfg[kv_channels]", lambda c, hf, a: _eq(c.kv_channels, _shape(hf).head_dim)),
    Read(f"{BASE}:608", "cfg[layernorm_epsilon]", lambda c, hf, a: _eq(c.layernorm_epsilon, hf["rms_norm_eps"])),
    Read(f"{BASE}:630", "self._cfg.get('make_vocab_size_divisible_by', 128)",
         lambda c, hf, a: _shape(hf).vocab % (c.get("make_vocab_size_divisible_by", 128)
                                              * c.get("tensor_model_parallel_size", 1)) == 0),
    Read(f"{GPT}:501", "self.cfg.get('override_vocab_size', self.padded_vocab_size)",
         lambda c, hf, a: _eq(c.get("override_vocab_size"), _shape(hf).vocab)),
    Read(f"{GPT}:502", "self.cfg.get('encoder_seq_length', 512)",
         lambda c, hf, a: _eq(c.get("encoder_seq_length", 512), hf["max_position_embeddings"])),
    Read(f"{GPT}:506", "self.cfg.get('share_embeddings_and_output_weights', True)",
         lambda c, hf, a: _eq(c.get("share_embeddings_and_output_weights", True), _shape(hf).tied)),
    Read(f"{GPT}:507", "self.cfg.get('position_embedding_type', 'learned_absolute')",
         lambda c, hf, a: _eq(c.get("position_embedding_type", "learned_absolute"), "rope")),
    Read(f"{GPT}:508", "self.cfg.get('rotary_percentage', 1.0)",
         lambda c, hf, a: _eq(c.get("rotary_percentage", 1.0), 1.0)),
    Read(f"{GPT}:510", "self.cfg.get('rotary_base', 10000)",
         lambda c, hf, a: _eq(c.get("rotary_base", 10000), hf["rope_theta"])),
    Read(f"{OVERRIDES}:1409", "assert os.path.isdir(<extracted>/model_weights)",
         lambda c, hf, a: "model_weights/metadata.json" in a.names),
    Read(f"{OVERRIDES}:1424 -> {DIST_IO}:258", "model_cfg.get('dist_ckpt_format', 'torch_dist')",
         lambda c, hf, a: _eq(c.get("dist_ckpt_format", "torch_dist"), "torch_dist")),
    # Generation and fine-tuning (megatron_gpt_sft_model.py:1095) read these without defaults.
    Read(f"{GPT}:2104", "self.cfg.activations_checkpoint_granularity",
         lambda c, hf, a: c.activations_checkpoint_granularity is None),
    Read(f"{GPT}:2105", "self.cfg.activations_checkpoint_method",
         lambda c, hf, a: c.activations_checkpoint_method is None),
    Read(f"{GPT}:2106", "self.cfg.activations_checkpoint_num_layers",
         lambda c, hf, a: c.activations_checkpoint_num_layers is None),
    Read(f"{GPT}:2107", "self.cfg.activations_checkpoint_layers_per_pipeline",
         lambda c, hf, a: c.activations_checkpoint_layers_per_pipeline is None),
    Read(f"{GPT}:2162", "self.cfg.sequence_parallel", lambda c, hf, a: _eq(c.sequence_parallel, False)),
]


def replay(archive_path: Path, hf: dict, dtype: str) -> list[str]:
    """Each read NeMo would make, in order; returns one line per read that fails (empty: NeMo gets through)."""
    with tarfile.open(archive_path, "r:") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
        raw = yaml.safe_load(tar.extractfile("./model_config.yaml"))
    conf = OmegaConf.create(raw)
    OmegaConf.set_struct(conf, True)
    archive = Archive(names=names, dtype=dtype)
    failures = []
    for read in READS:
        try:
            ok = read.check(conf, hf, archive)
        except Exception as e:  # noqa: BLE001 - what NeMo would hit: ConfigAttributeError, KeyError, ...
            failures.append(f"{read.where}: {read.what}: {type(e).__name__}: {e}".splitlines()[0])
            continue
        if ok is False:
            failures.append(f"{read.where}: {read.what}: wrong value")
    return failures


def _export(tmp_path: Path, kind: str, dtype: str, tokenizer: bool = True) -> tuple[Path, dict]:
    ref, src = tiny_hf_folder(kind, tmp_path / "src", layers=2)
    if tokenizer:  # stand-in BPE files: they must travel as artifacts, the folder is tokenizer.type
        (src / "vocab.json").write_text("{}")
        (src / "merges.txt").write_text("#version: 0.2\n")
        (src / "tokenizer_config.json").write_text("{}")
    convert(src, tmp_path / "m.nemo", ExportOptions(format="nemo", dtype=dtype))
    hf = ref.config.to_dict()
    hf["rope_theta"] = getattr(ref.config, "rope_theta", None) or hf.get("rope_parameters", {})["rope_theta"]
    hf["model_type"] = kind
    return tmp_path / "m.nemo", hf


@pytest.fixture(scope="module")
def qwen2_bf16(tmp_path_factory) -> tuple[Path, dict]:
    return _export(tmp_path_factory.mktemp("qwen2"), "qwen2", "bf16")


def test_nemo_gets_through_every_read_of_an_exported_archive(qwen2_bf16, tmp_path):
    for path, hf, dtype in [(*qwen2_bf16, "bfloat16"), (*_export(tmp_path, "llama", "fp32"), "float32")]:
        assert replay(path, hf, dtype) == []
        with tarfile.open(path) as tar:
            cfg = yaml.safe_load(tar.extractfile("./model_config.yaml"))
        assert cfg["tokenizer"]["type"] == str((path.parent / "src").resolve())  # the folder, loadable here


def test_tokenizer_type_prefers_a_hub_id_and_takes_an_override(tmp_path):
    model = HFModel(config={"_name_or_path": "Qwen/Qwen2.5-Math-1.5B"}, tensors={}, tokenizer_dir=tmp_path)
    assert nemo.tokenizer_type(model, folder_persists=True) == "Qwen/Qwen2.5-Math-1.5B"
    model.config["_name_or_path"] = str(tmp_path / "gone")  # a path on the machine that trained it
    assert nemo.tokenizer_type(model, folder_persists=True) == str(tmp_path.resolve())
    assert nemo.tokenizer_type(model, folder_persists=False) is None  # a temporary unpack folder

    _, src = tiny_hf_folder("llama", tmp_path / "src", layers=1)
    (src / "tokenizer_config.json").write_text("{}")
    convert(src, tmp_path / "b.nemo", ExportOptions(format="nemo", tokenizer_type="/models/tok"))
    with tarfile.open(tmp_path / "b.nemo") as tar:
        assert yaml.safe_load(tar.extractfile("./model_config.yaml"))["tokenizer"]["type"] == "/models/tok"


def test_replay_fails_on_the_archive_before_the_fix(qwen2_bf16, tmp_path):
    """The archive as it was before issue 16 (no optim section, tokenizer.type null): the replay must stop there."""
    path, hf = qwen2_bf16
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    cfg = yaml.safe_load(dict((m.name, d) for m, d in members)["./model_config.yaml"])
    del cfg["optim"]
    cfg["tokenizer"]["type"] = None
    old = tmp_path / "old.nemo"
    with tarfile.open(old, "w:") as tar:
        for member, data in members:
            if member.name == "./model_config.yaml":
                data = yaml.safe_dump(cfg).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    failures = replay(old, hf, "bfloat16")
    assert [f.split(": ")[0] for f in failures] == [f"{BASE}:151", f"{BASE}:206", f"{TOK}:205"], failures


def test_an_archive_without_a_tokenizer_source_says_what_to_pass(tmp_path, capsys):
    _, src = tiny_hf_folder("llama", tmp_path / "src", layers=1)  # no tokenizer files, no hub id
    convert(src, tmp_path / "m.nemo", ExportOptions(format="nemo"))
    assert "nemo.tokenizer_type=" in capsys.readouterr().err
    with tarfile.open(tmp_path / "m.nemo") as tar:
        assert yaml.safe_load(tar.extractfile("./model_config.yaml"))["tokenizer"]["type"] is None
