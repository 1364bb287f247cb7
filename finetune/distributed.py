"""The process layout of a training run: the one Accelerator, and what each topology can do.

How a run is launched picks the topology; the run config stays the same:

    python -m finetune.train RUN.yaml                                       one process
    torchrun --nproc_per_node N -m finetune.train RUN.yaml                   DDP
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m finetune.train RUN.yaml   FSDP2
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml -m finetune.train RUN.yaml   ZeRO-3

accelerate reads the launch (its environment variables) when the Accelerator is built. This
module builds it, makes FSDP2 and DeepSpeed real on CPU processes too (accelerate alone would
quietly run both as plain DDP there), and refuses, with the reason and before any weight is
loaded, what a topology cannot do.

Under DeepSpeed the engine applies the optimizer step inside accelerate's backward of the last
micro-batch, so a non-finite loss or gradient is reported (exit 2, as elsewhere) after that
update instead of before it; the checkpoints written before it are untouched.
"""

from __future__ import annotations

import importlib.util
import os

from finetune.config import TrainSettings
from finetune.errors import OcrtuneError

# FSDP2 came in accelerate 1.6, but before 1.14 it left the LM head inside the root unit: the
# chunked loss (finetune/loss.py), which calls the head outside the model's forward, then met
# sharded weights. 1.14 gives the head its own unit, gathered whenever it runs. Tested: 1.14, 1.15.
FSDP2_MIN_ACCELERATE = "1.14.0"
DEEPSPEED_INSTALL = "pip install deepspeed"


class TopologyError(OcrtuneError, RuntimeError):
    pass


def _launched_with(kind: str) -> bool:
    """Whether `accelerate launch` was given an FSDP or DeepSpeed config (it says so in the
    environment of every process it starts)."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def make_accelerator(t: TrainSettings, report_to: list[str], on_gpu: bool):
    """The run's Accelerator, built once, first: it decides device, precision and process layout."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    # cpu=True without a GPU: accelerate then runs torchrun/accelerate-launch ranks
    # as multi-CPU (gloo) instead of N independent single-process runs.
    cpu = not on_gpu and not torch.backends.mps.is_available()
    handlers = []
    if _launched_with("DEEPSPEED"):
        _check_deepspeed()
        if cpu:
            # accelerate starts DeepSpeed only where it may use a device (cpu=False; with
            # cpu=True it silently trains plain data parallel instead). Without a GPU DeepSpeed
            # picks its own CPU accelerator, which runs ZeRO over gloo: the process group
            # accelerate opens for it must be gloo as well.
            cpu, handlers = False, [InitProcessGroupKwargs(backend="gloo")]
    if _launched_with("FSDP"):
        _check_fsdp_version()
    mixed = t.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(
        cpu=cpu,
        kwargs_handlers=handlers,
        mixed_precision=mixed,
        # sync_with_dataloader=False: an epoch boundary must not end an accumulation window
        # early, or the per-token normalisation in fit() would be wrong for that step.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum, sync_with_dataloader=False),
        log_with=report_to or None,
    )
    if _launched_with("FSDP"):
        _fsdp_on_cpu_processes(accelerator)
    return accelerator


def _check_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise TopologyError(f"the accelerate config selects DeepSpeed, which is not installed: {DEEPSPEED_INSTALL}, "
                            "or pick another topology (configs/accelerate/multi_gpu.yaml, fsdp.yaml)")


def _check_fsdp_version() -> None:
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("accelerate")) < Version(FSDP2_MIN_ACCELERATE):
        raise TopologyError(f"the accelerate config selects FSDP, which ocrtune runs as FSDP2: that needs "
                            f"accelerate >= {FSDP2_MIN_ACCELERATE} (installed: {version('accelerate')}); "
                            f"pip install 'accelerate>={FSDP2_MIN_ACCELERATE}'")


def _fsdp_on_cpu_processes(accelerator) -> None:
    """FSDP2 on CPU processes (gloo), as the launch config asked.

    accelerate turns an FSDP launch into FSDP only on accelerator devices (GPU, XPU, NPU, ...);
    on CPU processes its state stays plain multi-CPU data parallel, silently, although the
    launcher announced FSDP. torch's FSDP2 (`fully_shard`) itself shards CPU tensors over gloo,
    and accelerate's FSDP2 path (prepare, clip_grad_norm_, get_state_dict, save_state and
    load_state) is device-agnostic, so the plugin accelerate builds from the launch config is
    handed to its state here: the run then shards exactly as on GPUs. This is what the CPU
    tests exercise (configs/accelerate/fsdp_cpu.yaml)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return  # a GPU run (accelerate did it already) or a single process (nothing to shard)
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set from the config
    if plugin.fsdp_version != 2:
        raise TopologyError(f"fsdp_config.fsdp_version {plugin.fsdp_version}: FSDP on CPU processes runs as FSDP2 "
                            "only; set fsdp_version: 2 (configs/accelerate/fsdp_cpu.yaml)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)  # what accelerate does for GPU ranks
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # both states agree, as accelerate keeps them


def sharded(accelerator) -> bool:
    """Whether weights and optimizer state may be sharded per process (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _check_deepspeed_config(ds: dict, t: TrainSettings) -> None:
    gas = ds.get("gradient_accumulation_steps")
    if gas not in (None, "auto", t.grad_accum):
        raise TopologyError(f"train.grad_accum={t.grad_accum} but the DeepSpeed config says "
                            f"gradient_accumulation_steps={gas}: make them equal")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        return
    if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        # Found out otherwise only after the last step, when the adapter cannot be written.
        raise TopologyError("DeepSpeed ZeRO-3 without deepspeed_config.zero3_save_16bit_model: true: the adapter "
                            "is gathered from the shards when training ends, which needs it "
                            "(configs/accelerate/deepspeed_zero3.yaml sets it)")
    if t.loss_chunk_tokens:
        # The chunked loss runs the LM head outside the model's forward and recomputes it in
        # backward, where ZeRO-3 has partitioned its weight again: the recomputation differs.
        raise TopologyError(f"train.loss_chunk_tokens={t.loss_chunk_tokens}: the chunked loss does not work under "
                            "DeepSpeed ZeRO-3 (the LM head's weight is partitioned again when the chunk is "
                            "recomputed); set train.loss_chunk_tokens=0, or use ZeRO-2 or FSDP (fsdp.yaml)")


def check_topology(accelerator, t: TrainSettings, validation_every: int, quantization: str) -> bool:
    """Refuse what the process layout cannot do; returns whether weights are sharded."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        _check_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, t)
    if not sharded(accelerator):
        return False
    if validation_every:
        # Every forward of a sharded model is a collective (weights are gathered layer by
        # layer), but validation gives each process its own pages and greedy decoding runs
        # each page to its own length: the processes would wait on each other forever.
        raise TopologyError(f"validation.every_steps={validation_every}: validation during training is not "
                            f"supported under {kind.value} (processes decode pages of different lengths, and "
                            "every forward of a sharded model needs all of them); set validation.every_steps=0 "
                            "and evaluate the adapter or checkpoints with `ocrtune eval`, or train with DDP")
    if quantization != "none":
        # accelerate's FSDP2 path leaves integer 4-bit weights out of the shards, and neither FSDP
        # nor DeepSpeed has been run with them here: refused rather than half-working.
        raise TopologyError(f"model.quantization {quantization}: QLoRA is not supported under {kind.value}; "
                            "train it on one GPU or with DDP (configs/accelerate/multi_gpu.yaml)")
    return True  # train.cache_vision_features refuses sharded weights itself (finetune/feature_cache.py)
