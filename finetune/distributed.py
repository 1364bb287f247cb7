"""The process layout of a training run: the one Accelerator, and what each topology can do.

How a run is launched picks the topology; the run config stays the same:

    python -m finetune.train RUN.yaml                                       one process
    torchrun --nproc_per_node N -m finetune.train RUN.yaml                   DDP
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m finetune.train RUN.yaml   FSDP2

accelerate reads the launch (its environment variables) when the Accelerator is built. This
module builds it, makes FSDP2 real on CPU processes too (below), and refuses, with the reason
and before any weight is loaded, what a topology cannot do.
"""

from __future__ import annotations

import importlib.util
import os

import torch

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
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    if _launched_with("DEEPSPEED"):
        _check_deepspeed(on_gpu)
    if _launched_with("FSDP"):
        _check_fsdp_version()
    mixed = t.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(
        # cpu=True without a GPU: accelerate then runs torchrun/accelerate-launch ranks
        # as multi-CPU (gloo) instead of N independent single-process runs.
        cpu=not on_gpu and not torch.backends.mps.is_available(),
        mixed_precision=mixed,
        # sync_with_dataloader=False: an epoch boundary must not end an accumulation window
        # early, or the per-token normalisation in fit() would be wrong for that step.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum, sync_with_dataloader=False),
        log_with=report_to or None,
    )
    if _launched_with("FSDP"):
        _fsdp_on_cpu_processes(accelerator)
    return accelerator


def _check_deepspeed(on_gpu: bool) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise TopologyError(f"the accelerate config selects DeepSpeed, which is not installed: {DEEPSPEED_INSTALL} "
                            "(on a machine with GPUs and the CUDA toolkit), or pick another topology "
                            "(configs/accelerate/multi_gpu.yaml, fsdp.yaml)")
    if not on_gpu:
        # accelerate starts DeepSpeed only on accelerator devices; on CPU processes it would
        # quietly train plain data parallel while the user believes ZeRO shards the state.
        raise TopologyError("the accelerate config selects DeepSpeed, but no GPU is visible: accelerate runs "
                            "DeepSpeed on GPUs only. On CPU processes use configs/accelerate/fsdp_cpu.yaml "
                            "(FSDP2, sharded the same way as ZeRO-3) or configs/accelerate/cpu.yaml")


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
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # the two states agree, as accelerate keeps them


def sharded(accelerator) -> bool:
    """Whether weights and optimizer state may be sharded per process (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def check_topology(accelerator, t: TrainSettings, validation_every: int) -> bool:
    """Refuse what the process layout cannot do; returns whether weights are sharded."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        gas = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_accumulation_steps")
        if gas not in (None, "auto", t.grad_accum):
            raise TopologyError(f"train.grad_accum={t.grad_accum} but the DeepSpeed config says "
                                f"gradient_accumulation_steps={gas}: make them equal")
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
    if t.cache_vision_features:
        # The cache runs the vision tower outside the model's forward, where sharded weights
        # are not gathered.
        raise TopologyError(f"train.cache_vision_features: not supported under {kind.value} (the cache runs the "
                            "vision tower outside the sharded model's forward); set it to false or train with DDP")
    return True
