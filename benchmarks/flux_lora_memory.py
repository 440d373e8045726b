"""GPU memory of FLUX.1 [dev] LoRA DPO at 512 px, batch 1, on a 4-bit base (docs/low-memory.md's recipe).

    python benchmarks/flux_lora_memory.py --estimate            # any machine: counted on meta tensors, seconds
    python benchmarks/flux_lora_memory.py --measure --work_dir W  # a GPU: the real script's peak

--estimate (the default without CUDA) builds the FLUX.1 [dev] transformer on the meta device and counts, exactly,
the NF4 weights, what stays bf16, the LoRA of train_diffusion_dpo_flux.py's default targets and its optimizer state;
the activations of one block come from running it on meta tensors under an emulated bf16 autocast and summing what
autograd saves. --measure builds a random-weight pipeline of FLUX.1 [dev]'s transformer and VAE shape (text encoders
of the right output widths but one layer: they run only in the precompute, before the transformer loads) and a
512 px Pick-a-Pic-format dataset in --work_dir, runs train_diffusion_dpo_flux.py unmodified through
peak_memory_runner.py with the recipe's flags, and reports torch.cuda.max_memory_allocated / reserved of the whole
run (precompute and loading included: an upper bound on the training step's peak).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
GIB = 2**30
CARD_GIB = 24
# FLUX.1 [dev]'s transformer: diffusers' FluxTransformer2DModel defaults with the guidance input
DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize: one fp32 absmax per 64 weights (no double quantization: family.py)
ADAM8_BLOCK = 256  # bitsandbytes' 8-bit optimizer blocksize: one fp32 absmax per 256 values of each state


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--estimate", action="store_true", help="Count on meta tensors (default without CUDA).")
    mode.add_argument("--measure", action="store_true", help="Run the real script on a GPU (default with CUDA).")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens per caption.")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the script's).")
    parser.add_argument("--steps", type=int, default=4, help="--measure: training steps.")
    parser.add_argument("--work_dir", default="flux-memory-work", help="--measure: model, data and run folders.")
    parser.add_argument("--json", help="Also write the figures here.")
    args = parser.parse_args(argv)
    if not args.estimate and not args.measure:
        args.measure = torch.cuda.is_available()
        args.estimate = not args.measure
    return args


def script_defaults(rank):
    """train_diffusion_dpo_flux.py's LoRA targets and rank, from its own parse_args."""
    import train_diffusion_dpo_flux as flux

    args = flux.parse_args(["--rank", str(rank)] if rank else [])
    return flux.lora_target_modules(args), args.rank


def lora_matches(name, targets):
    return any(name == target or name.endswith("." + target) for target in targets)  # PEFT's rule for a name list


class EmulatedAutocast(TorchFunctionMode):
    """CUDA bf16 autocast's casts, for meta tensors (which autocast ignores): matmuls in bf16, layer norms in fp32."""

    LOW = {torch.nn.functional.linear, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm}
    FP32 = {torch.nn.functional.layer_norm, torch.nn.functional.group_norm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        dtype = torch.bfloat16 if func in self.LOW else torch.float32 if func in self.FP32 else None
        if dtype is not None:
            args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return func(*args, **(kwargs or {}))


class FlashAttention(torch.autograd.Function):
    """Stands in for SDPA on meta tensors, saving what the flash / memory-efficient kernels save: q, k, v, the
    output and the fp32 log-sum-exp (no attention matrix)."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out


def saved_bytes(block, *inputs, **kwargs):
    """Bytes autograd keeps for the backward of one forward of `block` (each storage once, parameters excluded),
    and the largest of them."""
    parameters = {p.untyped_storage()._cdata for p in block.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage()._cdata not in parameters:
            saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda query, key, value, **_: FlashAttention.apply(
        query, key, value
    )
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), EmulatedAutocast():
            block(*inputs, **kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return sum(saved.values()), max(saved.values())


def estimate(args):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    targets, rank = script_defaults(args.rank)
    with init_empty_weights():
        model = FluxTransformer2DModel(**DEV_CONFIG)
    # diffusers' 4-bit quantizer replaces every nn.Linear (Flux has no _keep_in_fp32_modules and the script passes
    # no llm_int8_skip_modules); their biases, and everything outside a Linear, stay in the weight dtype (bf16)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    total = sum(p.numel() for p in model.parameters())
    quantized = sum(m.weight.numel() for m in linears.values())
    nf4 = quantized // 2 + 4 * sum(-(-m.weight.numel() // NF4_BLOCK) for m in linears.values())
    lora_layers = {name: m for name, m in linears.items() if lora_matches(name, targets)}
    lora = sum(rank * (m.in_features + m.out_features) for m in lora_layers.values())
    lora_states = 4 * lora + 4 * lora + 2 * lora + 2 * 4 * -(-lora // ADAM8_BLOCK)  # weights, grads, Adam 8-bit

    # Activations: winner and loser stacked, so 2 sequences of image + text tokens through every block
    sequences, image_tokens, width = 2, (args.resolution // 16) ** 2, model.inner_dim
    tokens = image_tokens + args.max_sequence_length
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    checkpoints = blocks * sequences * tokens * width * 2  # each block's bf16 input, kept by gradient checkpointing
    # as build_models: the base frozen in bf16, the LoRA weights trainable in fp32
    model.to(torch.bfloat16).requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    cast_training_params(model, dtype=torch.float32)
    with torch.device("meta"):
        hidden = torch.empty(sequences, image_tokens, width, dtype=torch.bfloat16, requires_grad=True)
        text = torch.empty(sequences, args.max_sequence_length, width, dtype=torch.bfloat16, requires_grad=True)
        temb = torch.empty(sequences, width, dtype=torch.bfloat16)
        rotary = (torch.empty(tokens, 128), torch.empty(tokens, 128))
        per_block = [
            saved_bytes(block, hidden, text, temb, image_rotary_emb=rotary)
            for block in (model.transformer_blocks[0], model.single_transformer_blocks[0])
        ]
    # the backward through one recomputed block: its saved activations plus gradient buffers, taken as two of its
    # largest saved tensors (the gradient flowing in and the one being formed)
    recompute = max(saved + 2 * largest for saved, largest in per_block)
    dequantized = max(2 * m.weight.numel() for m in linears.values())  # bnb dequantizes one weight per matmul
    rows = [
        ("NF4 weights", f"{quantized / 1e9:.3f} B params x 0.5 B + fp32 absmax per {NF4_BLOCK}", nf4),
        ("bf16 leftovers", f"{(total - quantized) / 1e6:.1f} M params (biases, norms) x 2 B", 2 * (total - quantized)),
        ("LoRA + 8-bit AdamW", f"rank {rank}, {len(lora_layers)} layers, {lora / 1e6:.1f} M x 10 B", lora_states),
        ("checkpointed block inputs", f"{blocks} blocks x {sequences} x {tokens} tokens x {width} x 2 B", checkpoints),
        ("one block's recompute", "saved activations (meta, bf16 autocast) + 2 largest as grads", recompute),
        ("dequantized weight", "largest Linear in bf16, transient", dequantized),
    ]
    peak = sum(row[2] for row in rows)
    print(f"FLUX.1 [dev] LoRA DPO, {args.resolution} px, 1 pair (2 sequences of {tokens} tokens), NF4 base\n")
    print("| part | how | GiB |\n| --- | --- | --- |")
    for part, how, size in rows:
        print(f"| {part} | {how} | {size / GIB:.2f} |")
    print(f"| **total** | the reference (adapter off, inference mode) adds no saved tensors | **{peak / GIB:.2f}** |")
    verdict = "fits" if peak < CARD_GIB * GIB else "does not fit"
    print(f"\n{peak / GIB:.2f} GiB of {CARD_GIB} GiB: {verdict} (estimate)")
    return {
        "mode": "estimate",
        "parameters": total,
        "quantized_parameters": quantized,
        "lora_parameters": lora,
        "rows_gib": {part: size / GIB for part, _, size in rows},
        "block_saved_gib": {"double": per_block[0][0] / GIB, "single": per_block[1][0] / GIB},
        "peak_gib": peak / GIB,
    }


def build_assets(work, resolution):
    """A FLUX.1 [dev]-shaped pipeline (the real transformer and VAE layout, random weights; one-layer text encoders
    of CLIP-L's and T5-XXL's widths) and 8 pairs of 512 px images."""
    import tiny_assets
    from diffusers import FluxTransformer2DModel

    model_dir, data_dir = work / "flux-dev-random", work / "data"
    if not (model_dir / "transformer" / "config.json").exists():
        presets = tiny_assets.FLUX_PRESETS
        presets["memory"] = {
            "transformer": presets["tiny"]["transformer"],  # replaced by FLUX.1 [dev]'s below
            "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024),
            "text": dict(hidden_size=768, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1),
            "t5": dict(d_model=4096, d_ff=64, d_kv=8, num_heads=4, num_layers=1),
        }
        tiny_assets.build_tiny_flux_pipeline(str(model_dir), preset="memory")
        # 12B parameters, initialised in bf16 (24 GB): on the GPU when it has room to spare, else on the CPU
        large_gpu = torch.cuda.get_device_properties(0).total_memory > 48 * GIB
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda" if large_gpu else "cpu"):
            transformer = FluxTransformer2DModel(**DEV_CONFIG)
        torch.set_default_dtype(torch.float32)
        transformer.save_pretrained(model_dir / "transformer", max_shard_size="10GB")
        del transformer
        torch.cuda.empty_cache()
    if not data_dir.exists():
        tiny_assets.build_pickapic_dataset(str(data_dir), n_pairs=8, n_ties=0, image_size=resolution)
    return model_dir, data_dir


def measure(args):
    work = Path(args.work_dir).resolve()
    model_dir, data_dir = build_assets(work, args.resolution)
    peak_file = work / "peak.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "peak_memory_runner.py"),
        str(ROOT / "train_diffusion_dpo_flux.py"),
        f"--pretrained_model_name_or_path={model_dir}",
        f"--dataset_name={data_dir}",
        f"--resolution={args.resolution}",
        f"--max_sequence_length={args.max_sequence_length}",
        *("--mixed_precision=bf16", "--quantize_base=nf4", "--gradient_checkpointing", "--use_8bit_adam"),
        *("--train_batch_size=1", "--train_mode=lora", f"--max_train_steps={args.steps}", "--report_to=none"),
        *(["--rank", str(args.rank)] if args.rank else []),
        f"--precompute_cache_dir={work / 'cache'}",
        f"--output_dir={work / 'run'}",
        "--checkpointing_steps=1000000",
        "--seed=0",
    ]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PEAK_MEMORY_FILE": str(peak_file)})
    peak = json.loads(peak_file.read_text())
    allocated, reserved = peak["max_memory_allocated"] / GIB, peak["max_memory_reserved"] / GIB
    print(f"peak allocated {allocated:.2f} GiB, reserved {reserved:.2f} GiB ({torch.cuda.get_device_name()})")
    fits = reserved < CARD_GIB
    print(f"{'fits' if fits else 'does not fit'} in {CARD_GIB} GiB (reserved; plus the CUDA context)")
    return {"mode": "measure", "allocated_gib": allocated, "reserved_gib": reserved, "command": command}


def main(args):
    result = measure(args) if args.measure else estimate(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(parse_args())
