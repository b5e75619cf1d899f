"""Serving xorgemm fine-tunes in vLLM: a `vllm.general_plugins` entry point (the `xorgemm[vllm]` extra).

    from vllm import LLM
    from vllm.lora.request import LoRARequest
    llm = LLM(model=BASE, **xorgemm.vllm.engine_args(max_finetunes=4))
    llm.generate(prompts, sampling, lora_request=LoRARequest("legal", 1, "legal.xor.safetensors"))

A request names its fine-tune the way vLLM requests name a LoRA adapter; one without gets the base. The
plugin rides vLLM's LoRA routing (the per-token adapter slots of its Punica wrapper) and serves every
tensor a fine-tune changes per row: Linear layers through XorLinear (a quantization LinearMethod), and
norms, embeddings and the head through dense per-fine-tune copies (xorgemm.serving.routing). The private
vLLM internals it patches are all in patches.py; the supported vLLM versions are SUPPORTED_VLLM.
"""
from __future__ import annotations

SUPPORTED_VLLM = ("0.32.0",)


def check_version():
    """Raises a one-line RuntimeError unless the installed vLLM is one the plugin supports (its patches touch
    private vLLM internals that change between releases)."""
    try:
        import vllm
    except ImportError:
        raise RuntimeError("xorgemm's vLLM plugin needs vLLM: pip install vllm 'xorgemm[vllm]'") from None
    if vllm.__version__ not in SUPPORTED_VLLM:
        raise RuntimeError(f"xorgemm's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)}, not {vllm.__version__}")


# Full CUDA graphs of decode steps over the eager model, no torch.compile: the plugin's steps run the same
# kernels on the same tensors whatever the LoRA slots hold (docs/vllm.md), but Dynamo has not been tested
# over its layers. Prefill and mixed steps run eagerly.
GRAPHS = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}


def _graphs_by_default() -> bool:
    """CUDA graphs where vLLM runs on a CUDA GPU; elsewhere there are none to capture."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def engine_args(max_finetunes: int = 4, *, eager: bool | None = None) -> dict:
    """Keyword arguments for `vllm.LLM` / `AsyncEngineArgs` that serve up to `max_finetunes` fine-tunes per
    batch through the xorgemm plugin: on a CUDA GPU decode steps in CUDA graphs, elsewhere eagerly
    (`eager` forces either). Checks the vLLM version first."""
    check_version()
    if max_finetunes < 1:
        raise ValueError(f"max_finetunes must be at least 1, got {max_finetunes}")
    if eager is None:
        eager = not _graphs_by_default()
    steps = {"enforce_eager": True} if eager else {"compilation_config": dict(GRAPHS)}
    return {"quantization": "xorgemm", "enable_lora": True, "max_loras": int(max_finetunes), "max_lora_rank": 8,
            **steps, "hf_overrides": {"quantization_config": {"quant_method": "xorgemm"}}}


def cli_args(max_finetunes: int = 4, *, eager: bool | None = None) -> list[str]:
    """The same as `vllm serve` flags (what `python -m xorgemm.vllm args --max-finetunes K [--eager]` prints)."""
    import json

    a = engine_args(max_finetunes, eager=eager)
    # Compact JSON, no spaces: the flags survive the shell's word splitting of `$(python -m xorgemm.vllm args)`.
    compact = lambda v: json.dumps(v, separators=(",", ":"))  # noqa: E731
    eager_steps = a.get("enforce_eager")
    steps = ["--enforce-eager"] if eager_steps else ["--compilation-config", compact(a["compilation_config"])]
    return ["--quantization", a["quantization"], "--enable-lora", "--max-loras", str(a["max_loras"]),
            "--max-lora-rank", str(a["max_lora_rank"]), *steps, "--hf-overrides", compact(a["hf_overrides"])]


def register():
    """The vllm.general_plugins entry point: runs in every vLLM process."""
    check_version()  # vLLM logs and swallows a plugin's exception: engine_args / `args` check it up front too
    from vllm.model_executor.layers.quantization import register_quantization_config

    from xorgemm.vllm.method import XorgemmConfig
    from xorgemm.vllm.patches import apply_patches

    register_quantization_config("xorgemm")(XorgemmConfig)
    apply_patches()
