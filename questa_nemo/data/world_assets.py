"""The small world's tokenizer and tiny policy config, committed under data/world/ (regenerate with
`python -m questa_nemo.data.world_assets data/world`; a test checks the committed files match).

Tokenizer: one token per character (printable ASCII and newline) plus <|pad|>, <|endoftext|> (EOS) and <|unk|>,
built with `tokenizers` and saved as a Hugging Face fast tokenizer whose chat template renders a user message
followed by the generation prompt "?" (see world.py for the text format).
Policy: a Llama-style config.json (RoPE, RMSNorm, SwiGLU, tied embeddings): 3 layers, width 96, 4 heads,
~0.34M parameters, the model docs/world.md reports trainable on 2 CPU cores in minutes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
GENERATION_PROMPT = "?"
# An assistant turn (supervised warm-up) renders as "?" + solution + EOS, exactly what generation produces.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    f"{GENERATION_PROMPT}{{{{ message['content'] }}}}{EOS}"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
    f"{{% if add_generation_prompt %}}{GENERATION_PROMPT}{{% endif %}}"
)
MAX_POSITIONS = 256


def asset_dir() -> Path:
    """data/world of a source checkout, or the copy packed into the wheel."""
    packaged = Path(__file__).resolve().parents[1] / "_data" / "world"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "data" / "world"


def build_tokenizer():
    """The character-level tokenizer as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def policy_config(vocab_size: int) -> dict:
    """Hugging Face config.json of the tiny policy; vocab rounded up to a multiple of 8."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": -(-vocab_size // 8) * 8,
        "hidden_size": 96,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 24,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "bos_token_id": None,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def write_assets(folder: str | Path) -> None:
    """folder/tokenizer/ (tokenizer.json, tokenizer_config.json, ...) and folder/config.json."""
    folder = Path(folder)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name transformers 4.x and 5.x both know
    config["chat_template"] = CHAT_TEMPLATE  # in the config itself, where every transformers version looks
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "tokenizer" / "chat_template.jinja").unlink(missing_ok=True)  # one copy of the template
    with open(folder / "config.json", "w") as f:
        json.dump(policy_config(len(tokenizer)), f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    write_assets(sys.argv[1] if len(sys.argv) > 1 else asset_dir())
