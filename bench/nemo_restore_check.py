"""Restore a .nemo written by `questa-nemo export` with NeMo 1.x's own loader and compare its logits.

Runs in the separate NeMo venv (bench/nemo_restore_venv.sh: nemo_toolkit 2.4.1, megatron-core 0.13.1,
transformers 4.51.3, torch 2.13.0 CPU), never in the project's venv; bench/nemo_restore_check.sh drives it.

    python bench/nemo_restore_check.py ARCHIVE.nemo HF_FOLDER
    torchrun --nproc-per-node=2 bench/nemo_restore_check.py ARCHIVE_TP2.nemo HF_FOLDER --tp 2

`MegatronGPTModel.restore_from` reads the archive as NeMo would. The archive itself is not edited: the only
overrides are the CPU-ONLY WORKAROUNDS below (each one exists because this machine has no GPU, Transformer
Engine or apex, not because the archive is wrong), and the script asserts that the keys the archive must get
right on its own (optim, tokenizer.type / files, precision) reach NeMo untouched. NeMo's logits on random ids
are compared with transformers' on the HF folder the archive was exported from; its tokenizer with the HF
folder's. Prints one JSON line; exit 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

# CPU-only workaround 1: NeMo's _enable_nvidia_optimizations calls re.fullmatch on NVIDIA_PYTORCH_VERSION,
# which NVIDIA's containers set (megatron_base_model.py:401-407); outside them it is unset.
os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "25.09")

import torch  # noqa: E402


def _cpu_only_patches() -> None:
    """CPU-only workarounds 2, 3, 8 and 9: what NeMo imports eagerly from Transformer Engine and apex, which do not install
    on CPU. A GPU NeMo container has both, and none of this applies there."""
    import megatron.core.tensor_parallel.layers as mcore_layers
    from nemo.collections.nlp.models.language_modeling import megatron_gpt_model as gpt
    from nemo.collections.nlp.modules.common.megatron import build_model

    # 2: get_specs() builds every spec in its table, TE ones included, before picking the local one
    # (megatron_gpt_model.py:157-166); without TE those builders raise. Stub the ones that need TE.
    for name in (
        "get_gpt_layer_with_transformer_engine_spec",
        "get_gpt_full_te_layer_autocast_spec",
        "get_gpt_layer_with_te_and_hyena_spec",
        "get_gpt_layer_modelopt_spec",
    ):
        if hasattr(gpt, name):
            setattr(gpt, name, lambda *a, **k: None)
    # 3: build_model imports this helper from apex (build_model.py:36); megatron-core has the same function.
    build_model.set_defaults_if_not_set_tensor_model_parallel_attributes = (
        mcore_layers.set_defaults_if_not_set_tensor_model_parallel_attributes
    )
    # 8: megatron's RoPE moves its frequencies to torch.cuda.current_device() at the first forward
    # (rotary_pos_embedding.py:162-164); on a CPU torch that device is the CPU (what our cpu_shim does too).
    torch.cuda.current_device = lambda: "cpu"
    # 9: attention dropout runs under the model-parallel CUDA RNG tracker's fork even in eval mode; the tracker's
    # state is seeded with torch.cuda.manual_seed on a GPU. Dropout is identity in eval: fork does nothing here.
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def _process_groups(tp: int) -> None:
    """CPU-only workaround 4: megatron-core 0.13 wants model-parallel groups before the model is built; on a GPU
    NeMo's NLPDDPStrategy sets them up (it needs apex, so here Lightning's 'auto' strategy is used instead)."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world == 1:
            handle = tempfile.NamedTemporaryFile(prefix="nemo-restore-pg-", delete=False)
            handle.close()
            init = f"file://{handle.name}"
        else:
            init = "env://"
        torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, 1)


# CPU-only config overrides (workarounds 5-7), and nothing else: the archive is written for a GPU NeMo.
CPU_ONLY_OVERRIDES = {
    "use_cpu_initialization": True,  # 5: the archive says False, right on a GPU (torch.cuda.set_device)
    "transformer_engine": False,  # 6: True asks for TE layers (TENorm, TELayerNormColumnParallelLinear)
    "persist_layer_norm": False,  # 7: True needs apex's persistent LayerNorm kernel
}


def restore(archive: str, tp: int):
    from lightning.pytorch import Trainer
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector
    from omegaconf import OmegaConf, open_dict

    _cpu_only_patches()
    _process_groups(tp)
    connector = NLPSaveRestoreConnector()
    # What the archive says, read by NeMo's own connector.
    cfg = MegatronGPTModel.restore_from(archive, return_config=True, save_restore_connector=connector)
    as_written = OmegaConf.to_container(cfg, resolve=True)
    with open_dict(cfg):
        for key, value in CPU_ONLY_OVERRIDES.items():
            cfg[key] = value
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun --nproc-per-node=TP for a TP>1 archive
    trainer = Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
    )
    model = MegatronGPTModel.restore_from(
        archive, override_config_path=cfg, trainer=trainer, save_restore_connector=connector
    )
    return model.eval(), as_written


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("archive")
    parser.add_argument("hf_folder")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, written = restore(args.archive, args.tp)
    # The keys the archive must get right by itself reached NeMo as written (no override touched them).
    for key in ("optim", "tokenizer", "precision", "mcore_gpt"):
        assert key in written and written[key] is not None, f"archive lacks {key}"
    assert written["tokenizer"]["type"], "archive has no tokenizer.type"
    assert model.cfg.tokenizer.type == written["tokenizer"]["type"]

    ref = AutoModelForCausalLM.from_pretrained(args.hf_folder, torch_dtype=torch.float32).eval()
    if written["precision"] in ("bf16", "bf16-mixed", 16, "16"):  # the archive stores rounded weights
        low = torch.bfloat16 if str(written["precision"]).startswith("bf16") else torch.float16
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(low).float())
    vocab = ref.config.vocab_size
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    # An explicit causal mask (True = masked), as NeMo's own generation passes one: without it megatron builds
    # its default mask with device="cuda" (transformer/utils.py:32), which a CPU torch cannot.
    causal = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        ours = model.model(ids, position_ids, attention_mask=causal).float()  # [b, s, padded vocab]
        theirs = ref(ids).logits.float()
    if args.tp > 1:  # the output layer is vocab-parallel: each rank holds a slice of the logits
        from megatron.core import tensor_parallel

        ours = tensor_parallel.gather_from_tensor_model_parallel_region(ours)
    ours = ours[..., :vocab]
    diff = (ours - theirs).abs().max().item()

    text = "3 + 4 * 7 = ?\nthe answer is 42"
    hf_tok = AutoTokenizer.from_pretrained(args.hf_folder)
    nemo_ids = model.tokenizer.text_to_ids(text)
    hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    result = {
        "archive": args.archive,
        "tp": args.tp,
        "precision": written["precision"],
        "tokenizer.type": written["tokenizer"]["type"],
        "optim": written["optim"],
        "max_abs_logit_diff": diff,
        "logit_scale": theirs.abs().max().item(),
        "tokenizer_matches": nemo_ids == hf_ids,
        "nemo_tokenizer": type(model.tokenizer.tokenizer).__name__,
    }
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result))
    ok = diff <= args.atol and nemo_ids == hf_ids
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
