"""Vision features computed once per training image, kept on disk beside the dataset and reused
by later epochs and later runs (`train.cache_vision_features`).

With the vision tower and the projector frozen (decoder LoRA), a page's image features are a
pure function of the frozen weights and their code, the pixels the processor makes of the
page, and the numeric setting they run in. Training runs no augmentation (scan-like
augmentation happens when a dataset is built, so it is part of the stored image), so the
pixels are a pure function of the stored image bytes and the processor and vision settings.
The cache key is made of exactly those inputs:

- context: sha256 of the frozen vision + projector parameters and buffers (names, dtypes,
  shapes, bytes) and the model class; the vision settings (mode, sizes, tiling); the
  processor's image settings; the source of the code that turns a page into features; the
  device type and mixed precision; the versions of torch, transformers, Pillow and ocrtune.
  One folder per context: DATASET.vision_cache/CONTEXT/ (DATASET is the DatasetDict folder).
- image: sha256 of the image's stored bytes. One file per image: CONTEXT/IMAGE.safetensors.

Change any of them and the key is another one, so a stale entry is never found. Each entry is
written to a temp file and renamed into place, and carries its own key and the sha256 of its
tensor: an entry that does not parse or verify (a truncated write, a disk error) is counted
as corrupt, recomputed and rewritten. Old contexts stay on disk until deleted by hand.

A batch whose samples are all cached takes their features; any other batch is encoded whole,
exactly as an uncached run encodes it, and its new images are stored. So the first epoch of
a cold cache is the uncached computation itself; a feature reused later was encoded in
another batch, which can change it by float rounding only (batched kernels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from data_prep.errors import InputError

KEY = "train.cache_vision_features"
FORMAT = 1  # bump when the entry layout or the key's recipe changes: old entries are then never found
SUFFIX = ".vision_cache"


class FeatureCacheError(InputError):
    pass


def _v1_encode(base, batch: dict) -> list[torch.Tensor]:
    return base.model.image_features(batch["pixel_values"], batch.get("pixel_values_local"),
                                     batch.get("images_spatial_crop"))


def _ocr2_encode(base, batch: dict) -> list[torch.Tensor]:
    # The call DeepseekOcr2Model.forward makes on pixels, with the same arguments.
    out = base.model.get_image_features(batch["pixel_values"], batch.get("pixel_values_local"),
                                        batch.get("num_local_patches"), return_dict=True).pooler_output
    if isinstance(out, torch.Tensor):  # older transformers (5.13): every image's features in one tensor
        counts = (batch["input_ids"] == base.config.image_token_id).sum(dim=1).tolist()
        return list(torch.split(out, counts))
    return list(out)


def _ocr2_feed(base, batch: dict, features: list[torch.Tensor]) -> dict:
    # What DeepseekOcr2Model.forward does with the pixels' features, done here: the features,
    # concatenated and cast to the embeddings' dtype, scattered over the image placeholders'
    # embeddings; the model then runs from inputs_embeds. (transformers' own door for
    # precomputed features, mm_encoder_outputs, is newer than transformers 5.13, which drops
    # it silently and would train on the placeholders' bare embeddings.)
    ids = batch["input_ids"]
    embeds = base.get_input_embeddings()(ids)
    mask = (ids == base.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, torch.cat(features).to(embeds.device, embeds.dtype))
    return {"input_ids": None, "inputs_embeds": embeds}


def _v1_settings(processor) -> dict:
    return {f.name: getattr(processor, f.name) for f in dataclasses.fields(processor) if f.name != "tokenizer"}


def _ocr2_settings(processor) -> dict:
    return {"image_processor": processor.image_processor.to_dict(), "patch_size": processor.patch_size,
            "downsample_ratio": processor.downsample_ratio}


@dataclass(frozen=True)
class _Family:
    image_inputs: tuple[str, ...]  # the batch keys only the vision side reads
    encode: Callable[..., list[torch.Tensor]]  # (base model, batch) -> one [placeholders, hidden] per sample
    feed: Callable[..., dict]  # (base model, batch, features) -> the forward's keyword arguments
    processor_settings: Callable[..., dict]
    code: tuple[str, ...]  # ocrtune modules on the page -> features path besides the classes' own


FAMILIES = {
    "deepseek_ocr": _Family(("pixel_values", "pixel_values_local", "images_spatial_crop"), _v1_encode,
                            lambda base, batch, features: {"image_features": features}, _v1_settings, ()),
    "deepseek_ocr2": _Family(("pixel_values", "pixel_values_local", "num_local_patches"), _ocr2_encode,
                             _ocr2_feed, _ocr2_settings, ("finetune.models.deepseek_ocr2.processor",)),
}


def unsupported(model_type: str) -> str | None:
    """Why a family cannot cache (None if it can)."""
    if model_type not in FAMILIES:
        return f"{KEY}: supported for {', '.join(FAMILIES)}, not {model_type}"
    return None


def cache_root(data_path: str | Path) -> Path:
    """DATASET.vision_cache beside the DatasetDict folder: the dataset's own folder stays as
    `ocrtune data build` wrote it."""
    data_path = Path(data_path).resolve()
    return data_path.parent / (data_path.name + SUFFIX)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def weights_fingerprint(base: torch.nn.Module, prefixes: tuple[str, ...]) -> str:
    """sha256 of every parameter and buffer under `prefixes`: names, dtypes, shapes and bytes."""
    named = sorted(((n, t) for n, t in [*base.named_parameters(), *base.named_buffers()] if _under(n, prefixes)),
                   key=lambda item: item[0])
    if not named:  # a layout naming no weights would key every model alike
        raise RuntimeError(f"no weights under {prefixes}: the family's layout does not match the model")
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def image_hashes(split, indices) -> dict[str, str]:
    """sample id -> sha256 of its image's stored bytes, for the rows `indices` of `split`."""
    from datasets import Image

    raw = split.select_columns(["id", "image"]).cast_column("image", Image(decode=False)).select(list(indices))
    out: dict[str, str] = {}
    for row in raw:
        data = row["image"]["bytes"]
        if data is None:  # an image stored as a path rather than inline
            data = Path(row["image"]["path"]).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if out.setdefault(row["id"], digest) != digest:  # a batch names its samples by id alone
            raise FeatureCacheError(f"{KEY}: the id {row['id']!r} names two different images in the training "
                                    "split; ids must be unique (rebuild the dataset) or turn the cache off")
    return out


def _dropout(base: torch.nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Vision-side modules that drop out while training: their features differ at every step."""
    found = []
    for name, module in base.named_modules():
        if not _under(name, prefixes):
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(name)
        found += [f"{name}.{a}" for a in ("attention_dropout", "dropout")
                  if isinstance(getattr(module, a, None), float) and getattr(module, a) > 0]
    return found


def _source_hash(module_name: str) -> str:
    return hashlib.sha256(Path(inspect.getsourcefile(sys.modules[module_name])).read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "pillow", "ocrtune"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _write_atomic(path: Path, data: bytes) -> None:
    """A temp file in the same folder renamed onto `path`: readers see the old entry or the
    whole new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared dataset's cache is read by others too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tensor_sha(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}\n".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _decode(data: bytes, context: str, image: str) -> torch.Tensor:
    """The entry's tensor; ValueError when it does not parse or verify."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n])["__metadata__"]
        tensor = load(data)["features"]
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:  # json's errors are ValueErrors
        raise ValueError(f"unreadable: {exc}") from None
    if (meta.get("format"), meta.get("context"), meta.get("image")) != (str(FORMAT), context, image):
        raise ValueError("written for another key")
    if meta.get("sha256") != _tensor_sha(tensor):
        raise ValueError("checksum mismatch")
    return tensor


class VisionFeatureCache:
    def __init__(self, folder: Path, context: str, image_keys: dict[str, str],
                 encode: Callable[[dict], list[torch.Tensor]], feed: Callable[[list[torch.Tensor]], dict],
                 image_inputs: tuple[str, ...], autocast: Callable[[], ContextManager], say: Callable[[str], None]):
        """Entries under `folder` for context key `context`; `image_keys` maps a sample id to
        its image's key; `encode(batch)` runs the frozen vision side (under `autocast()`, the
        context the training forward runs in) and `feed(features)` turns features into the
        forward's keyword arguments in place of the batch's `image_inputs`."""
        self.folder, self.context, self.image_keys = folder, context, image_keys
        self.encode, self.feed, self.image_inputs = encode, feed, image_inputs
        self.autocast, self.say = autocast, say
        self.hits = self.misses = self.written = self.corrupt = 0
        self.sizes: dict[str, int] = {}  # entry -> bytes on disk, for every entry this run used

    def path(self, image: str) -> Path:
        return self.folder / f"{image}.safetensors"

    def inputs(self, batch: dict) -> dict:
        """The batch with its image inputs replaced by cached or freshly encoded features."""
        keys = [self.image_keys[i] for i in batch["ids"]]
        found = [self._read(k) for k in keys]
        if all(f is not None for f in found):
            device = batch["input_ids"].device
            features = [f.to(device) for f in found]
            self.hits += len(keys)
        else:
            with torch.no_grad(), self.autocast():
                features = [f.detach() for f in self.encode(batch)]
            self.misses += len(keys)
            written = set()  # one write per image, even if it repeats in the batch
            for key, feature, old in zip(keys, features, found):
                if old is None and key not in written:
                    self._write(key, feature)
                    written.add(key)
        return {k: v for k, v in batch.items() if k not in self.image_inputs} | self.feed(batch, features)

    def _read(self, image: str) -> torch.Tensor | None:
        path = self.path(image)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            tensor = _decode(data, self.context, image)
        except ValueError as exc:
            self.corrupt += 1
            self.sizes.pop(image, None)
            self.say(f"{KEY}: {path} is corrupt ({exc}); recomputing it")
            return None
        self.sizes[image] = len(data)
        return tensor

    def _write(self, image: str, feature: torch.Tensor) -> None:
        from safetensors.torch import save

        t = feature.detach().to("cpu").contiguous()
        data = save({"features": t}, metadata={"format": str(FORMAT), "context": self.context, "image": image,
                                               "sha256": _tensor_sha(t)})
        path = self.path(image)
        try:
            _write_atomic(path, data)
        except OSError as exc:
            raise FeatureCacheError(f"{KEY}: cannot write {path} ({exc}); free space there or turn the "
                                    "cache off") from None
        self.written += 1
        self.sizes[image] = len(data)

    def summary(self) -> dict:
        """For train_summary.json: hits/misses count samples served from the cache / encoded."""
        return {"path": str(self.folder), "images": len(self.sizes), "hits": self.hits, "misses": self.misses,
                "written": self.written, "corrupt": self.corrupt, "bytes": sum(self.sizes.values())}


def open_cache(model: torch.nn.Module, family, processor, vision: dict, data_path: str | Path, split, indices, *,
               device_type: str, precision: str, autocast: Callable[[], ContextManager], sharded: bool,
               say: Callable[[str], None]) -> VisionFeatureCache:
    """The cache for training `model` (PEFT-wrapped or not) of `family` on rows `indices` of
    `split` (the DatasetDict at `data_path`), with the processor and `vision` settings
    (VisionSettings.as_dict()) the run encodes pages with; `device_type` and `precision`
    (accelerate's mixed_precision) are the numeric setting the features are computed in."""
    if (why := unsupported(family.MODEL_TYPE)) is not None:
        raise FeatureCacheError(why)
    if sharded:  # the vision side is called outside the forward, where sharded weights are not gathered
        raise FeatureCacheError(f"{KEY}: not available with FSDP or DeepSpeed (sharded weights); use DDP or "
                                "turn the cache off")
    spec = FAMILIES[family.MODEL_TYPE]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefixes = tuple(family.LAYOUT.vision) + tuple(family.LAYOUT.projector)
    trained = [n for n, p in base.named_parameters() if p.requires_grad and _under(n, prefixes)]
    if trained:
        raise FeatureCacheError(f"{KEY}: the vision side trains ({trained[0]}, ...), so its features change "
                                "every step; freeze it or turn the cache off")
    if dropping := _dropout(base, prefixes):
        raise FeatureCacheError(f"{KEY}: the vision side drops out while training ({', '.join(dropping[:3])}), "
                                "so its features differ at every step; turn the cache off")
    code = {type(base).__module__, type(processor).__module__, *spec.code}
    if hasattr(processor, "image_processor"):
        code.add(type(processor.image_processor).__module__)
    context = {
        "format": FORMAT, "family": family.MODEL_TYPE, "model_class": f"{type(base).__module__}.{type(base).__name__}",
        "weights": weights_fingerprint(base, prefixes), "vision": vision,
        "processor": spec.processor_settings(processor), "image_feature": repr(split.features["image"]),
        "code": {m: _source_hash(m) for m in sorted(code)}, "device": device_type, "precision": precision,
        "versions": _versions(),
    }
    text = json.dumps(context, sort_keys=True, indent=1, default=str) + "\n"
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    folder = cache_root(data_path) / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "context.json", text.encode())  # what the key was made of, for a reader
    except OSError as exc:
        raise FeatureCacheError(f"{KEY}: cannot write the cache at {folder} ({exc}); make it writable or turn "
                                "the cache off") from None
    return VisionFeatureCache(folder, key, image_hashes(split, indices), lambda batch: spec.encode(base, batch),
                              lambda batch, features: spec.feed(base, batch, features), spec.image_inputs,
                              autocast, say)
