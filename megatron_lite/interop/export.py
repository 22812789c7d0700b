"""Export: our full serial tensors to a Hugging Face directory that `from_pretrained` loads.

Two sources, one writer. `export_checkpoint` reads a DCP checkpoint written by any layout (ZeRO-1
included: the model tensors are layout-independent) in one process, one output shard at a time.
`export_chunks` is collective over a live job: each pipeline stage gathers its tensors over TP and
its first rank writes them to a part file (rank 0 keeps its own stage's in memory); rank 0 then
assembles the shards from them.

With a template (the directory the model was imported from), the output repeats its file layout
(which tensor in which shard), its per-tensor dtypes, its config.json (our fields updated) and its
tokenizer and generation files, so import followed by export gives the same files back.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import torch

from megatron_lite.interop.hf_dir import HFCheckpointError, HFDirectory, HFWriter, plan_shards
from megatron_lite.interop.mapping import Mapping
from megatron_lite.models.config import ModelConfig

DEFAULT_MAX_SHARD = 5 * 10**9
TIED_DUPLICATE = "lm_head.weight"


def hf_config(cfg: ModelConfig, mapping: Mapping, dtype: torch.dtype, template: HFDirectory | None) -> dict:
    """config.json: the template's (if any) with every field we own set from `cfg`."""
    config = dict(template.config) if template is not None else {}
    config.update(mapping.family.to_hf_config(cfg))
    if mapping.family.name == "llama":  # transformers 4 reads these; 5 reads rope_parameters
        rope = config["rope_parameters"]
        config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = None if rope["rope_type"] == "default" else {
            k: v for k, v in rope.items() if k != "rope_theta"}
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[dtype_key] = str(dtype).removeprefix("torch.")
    return config


def write_hf(out: str, cfg: ModelConfig, fetch: Callable[[list[str]], dict[str, torch.Tensor]],
             template: HFDirectory | None = None, dtype: torch.dtype | None = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD) -> str:
    """Write the HF directory `out` from `fetch(our names) -> our full tensors`; returns its path."""
    mapping = Mapping(cfg)
    keys = list(mapping.rules)
    duplicate = template is not None and cfg.tie_embeddings and TIED_DUPLICATE in template.tensors
    if duplicate:
        keys.append(TIED_DUPLICATE)

    def dtype_of(key: str, tensor_dtype: torch.dtype) -> torch.dtype:
        if dtype is not None:
            return dtype
        if template is not None and key in template.tensors:
            return template.tensors[key].dtype
        return tensor_dtype

    if template is not None and all(k in template.weight_map for k in keys):
        files = {k: template.weight_map[k] for k in keys}
    else:
        itemsize = (dtype or torch.float32).itemsize
        files = plan_shards({k: torch.Size(mapping.hf_shapes[_rule_key(mapping, k)]).numel() * itemsize for k in keys},
                            max_shard_bytes)
    written_dtypes = set()
    with HFWriter(out) as writer:
        for name in sorted(set(files.values())):
            in_file = [k for k in keys if files[k] == name]
            wanted = sorted({ours for k in in_file for ours in mapping.rules[_rule_key(mapping, k)].ours})
            ours = fetch(wanted)
            tensors = {}
            for key in in_file:
                tensor = mapping.hf_tensor(mapping.rules[_rule_key(mapping, key)], ours)
                tensors[key] = tensor.to(dtype_of(key, tensor.dtype)).contiguous()
                written_dtypes.add(tensors[key].dtype)
            del ours
            writer.write_file(name, tensors)
        main_dtype = dtype or (torch.bfloat16 if torch.bfloat16 in written_dtypes else next(iter(written_dtypes)))
        writer.write_json("config.json", hf_config(cfg, mapping, main_dtype, template))
        writer.copy_side_files(template.path if template is not None else None)
        return writer.commit()


def _rule_key(mapping: Mapping, key: str) -> str:
    """The rule that makes `key`: a tied model's duplicate output embedding is the input embedding."""
    return mapping.where["embedding.word.weight"][0].hf if key == TIED_DUPLICATE and key not in mapping.rules else key


def export_checkpoint(root: str, out: str, step: int | None = None, template: str | None = None,
                      dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD) -> str:
    """A DCP checkpoint under `root` (the newest usable step, or `step`) to the HF directory `out`.
    template: an HF directory to mirror (default: the one the run imported, if it still exists)."""
    from megatron_lite.checkpoint import dcp_io, store
    from megatron_lite.checkpoint.boxes import Box
    from megatron_lite.checkpoint.checkpoint import _quiet_single_process, select_checkpoint

    chosen = select_checkpoint(root, step)
    if chosen is None:
        raise FileNotFoundError(f"no checkpoint under {root!r}: no step_* directory")
    path = store.step_dir(root, chosen)
    try:  # the trainer saves its run config with every checkpoint
        saved = store.read_json(os.path.join(path, store.META))["extra"]["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        saved = None
    if not isinstance(saved, dict):
        raise HFCheckpointError(f"checkpoint {store.step_dir(root, chosen)} holds no run config (saved outside the "
                                "trainer): its model architecture is unknown")
    saved = dict(saved)
    saved.pop("name", None)
    source = saved.pop("path", None)
    cfg = ModelConfig(**saved)
    if template is None and source and os.path.isfile(os.path.join(source, "config.json")):
        template = source
    metadata = dcp_io.read_metadata(path)

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        boxes, out_tensors = {}, {}
        for name in names:
            fqn = f"model.{name}"
            md = metadata.state_dict_metadata.get(fqn)
            if md is None:
                raise HFCheckpointError(f"checkpoint {path} has no tensor {fqn}")
            tensor = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            boxes[fqn] = [Box((0,) * tensor.dim(), tuple(tensor.shape), tensor)]
            out_tensors[name] = tensor
        with _quiet_single_process():
            dcp_io.read_boxes(path, boxes, [])
        return out_tensors

    return write_hf(out, cfg, fetch, HFDirectory(template) if template else None, dtype, max_shard_bytes)


@torch.no_grad()
def export_chunks(chunks, layout, out: str, cfg: ModelConfig, template: str | None = None,
                  dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD) -> str | None:
    """Collective: the live model of every rank to the HF directory `out` (written by rank 0, which
    returns its path; the others return None). Every rank raises if any rank failed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from megatron_lite.parallel import comm
    from megatron_lite.parallel.sharding import gather_full, spec_of

    parts = os.path.abspath(out) + ".parts"
    error = None
    try:
        tensors = {}
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                spec = spec_of(param)
                if spec.tie is not None and not spec.tie.primary:
                    continue
                full = gather_full(param, spec, layout)
                if layout.tp.rank == 0 and layout.dp.rank == 0:
                    tensors[name] = full.cpu()
        if tensors and layout.rank != 0:  # rank 0 keeps its own stage's tensors in memory
            os.makedirs(parts, exist_ok=True)
            save_file(tensors, os.path.join(parts, f"stage{layout.pp.rank}.safetensors"))
            tensors = {}
    except Exception as err:  # noqa: BLE001 - every rank must hear of it
        error = f"rank {layout.rank}: {type(err).__name__}: {err}"
    _raise_any(comm.all_gather_object(error, layout.group("world")))
    result = None
    if layout.rank == 0:
        try:
            handles = {}
            for part in sorted(os.listdir(parts)) if os.path.isdir(parts) else ():
                handle = safe_open(os.path.join(parts, part), framework="pt")
                handles.update({key: handle for key in handle.keys()})

            def fetch(names):
                return {name: tensors[name] if name in tensors else handles[name].get_tensor(name) for name in names}

            result = write_hf(out, cfg, fetch, HFDirectory(template) if template else None, dtype, max_shard_bytes)
        except Exception as err:  # noqa: BLE001
            error = f"rank 0: {type(err).__name__}: {err}"
        finally:
            shutil.rmtree(parts, ignore_errors=True)
    _raise_any(comm.all_gather_object(error, layout.group("world")))
    return result


def _raise_any(errors: list) -> None:
    errors = [e for e in errors if e]
    if errors:
        raise HFCheckpointError("export failed: " + "; ".join(errors))
