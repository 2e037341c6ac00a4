"""The two HF folders bench/nemo_restore_check.sh exports to .nemo: our tiny world model and a tiny Qwen2.

Runs in the project's venv: `python bench/nemo_restore_models.py OUT_DIR` writes OUT_DIR/world (the small world's
Llama-style policy with its character tokenizer: tokenizer.json only) and OUT_DIR/qwen2 (q/k/v bias, untied,
GQA, RoPE theta 1e6, with a BPE tokenizer that has vocab.json + merges.txt, as Qwen's has). Random weights with
random norm weights and biases, so a dropped or swapped tensor shows in the logits.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dist"))
from tiny_hf import tiny_hf_model  # noqa: E402

from questa_nemo.ckpt.hf import HFModel, write_hf_folder  # noqa: E402
from questa_nemo.data import world_assets  # noqa: E402

CORPUS = [f"{a} + {b} * {c} = {a + b * c}\nthe answer is {a * c}" for a in range(30) for b in range(9) for c in (2, 7)]


def _randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)


def _write(model: torch.nn.Module, config: dict, tokenizer_dir: Path, out: Path) -> None:
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    write_hf_folder(HFModel(config=config, tensors=tensors, tokenizer_dir=tokenizer_dir), out, overwrite=True)
    # transformers 4.51 (NeMo's) reads rope_theta only at the top level; 5.x writes it under rope_parameters.
    written = json.loads((out / "config.json").read_text())
    written["rope_theta"] = config["rope_theta"]
    (out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def world(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    assets = world_assets.asset_dir()
    hf = json.loads((assets / "config.json").read_text())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf)).eval()
    _randomise(model)
    _write(model, hf, assets / "tokenizer", out)


def qwen2_tokenizer(folder: Path) -> None:
    """A BPE tokenizer of at most 200 tokens (the tiny Qwen2's vocabulary) saved with vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    core.model.save(str(folder))  # vocab.json + merges.txt, the files NeMo takes from the archive
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # a name transformers 4.x and 5.x both know
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def qwen2(out: Path) -> None:
    model, hf = tiny_hf_model("qwen2", layers=2)
    hf["rope_theta"] = 1e6
    tok = out.parent / "qwen2_tokenizer"
    shutil.rmtree(tok, ignore_errors=True)
    qwen2_tokenizer(tok)
    _write(model, hf, tok, out)


if __name__ == "__main__":
    root = Path(sys.argv[1])
    world(root / "world")
    qwen2(root / "qwen2")
    print(f"wrote {root / 'world'} and {root / 'qwen2'}")
