# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Behaviour shared by the converted vision-language models: attention swap, modality mask, Hub-ready saving.

Part of the remote-code bundle: imports only torch, transformers and flat siblings.
"""

import inspect
import json
import os
import re
import sys
from pathlib import Path

import torch

from .mla_attention import MLAAttention


# Files of the remote-code bundle that every architecture ships, beside its own configuration/modeling files.
COMMON_REMOTE_FILES = {
    "configuration_mla_common.py": "configuration",
    "mla_attention.py": "modeling",
    "modeling_mla_common.py": "modeling",
    "reference.py": "kernels",
}
AUTO_CLASSES = ("AutoModel", "AutoModelForImageTextToText")
_RELATIVE_IMPORT = re.compile(r"^from \.+(?:\w+\.)*(\w+) import", flags=re.MULTILINE)


def forward_signature_with_mask(parent_forward) -> inspect.Signature:
    """The parent's `forward` signature plus a keyword-only `image_token_mask` (generate() inspects signatures)."""
    signature = inspect.signature(parent_forward)
    params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter("image_token_mask", inspect.Parameter.KEYWORD_ONLY, default=None))
    params += [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=params)


class MLAModelMixin:
    """Mixed in front of a native `...ForConditionalGeneration` class.

    * replaces every text-decoder attention by [`MLAAttention`] (the vision side is untouched);
    * computes the image-token mask from `input_ids` (or takes `image_token_mask`) and threads it down to the
      attention layers through `**kwargs`;
    * saves a Hub-compatible folder: in-memory weight names, `auto_map`, and the remote-code files copied flat.
    """

    def _swap_text_attention(self) -> None:
        for layer_idx, layer in enumerate(self.model.language_model.layers):
            layer.self_attn = MLAAttention(self.config, layer_idx)

    def mla_attention_modules(self) -> list[MLAAttention]:
        return [layer.self_attn for layer in self.model.language_model.layers]

    def image_token_mask(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        image_token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Boolean `(batch, seq_len)` mask of the tokens routed through the image branch."""
        if image_token_mask is not None and (input_ids is None or image_token_mask.shape == input_ids.shape):
            if inputs_embeds is not None and image_token_mask.shape != inputs_embeds.shape[:2]:
                raise ValueError(
                    f"image_token_mask has shape {tuple(image_token_mask.shape)} but inputs_embeds covers "
                    f"{tuple(inputs_embeds.shape[:2])} tokens."
                )
            return image_token_mask.bool()
        if input_ids is not None:
            # Comparisons with Python ints: no id tensor is built and copied to the device at every decode step.
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token_id in self.config.image_token_ids:
                mask |= input_ids == token_id
            return mask
        if self.config.mla_stage == "mla" and self.config.modality_split:
            raise ValueError(
                "This MLA model routes image and text tokens through different projections and cannot tell them "
                "apart from `inputs_embeds` alone: pass `input_ids`, or pass `image_token_mask` (bool, "
                "(batch, seq_len), True for image tokens) together with `inputs_embeds`."
            )
        return None

    def _mla_forward(self, parent_forward, input_ids, args, kwargs):
        mask = self.image_token_mask(input_ids, kwargs.get("inputs_embeds"), kwargs.pop("image_token_mask", None))
        if mask is not None:
            kwargs["image_token_mask"] = mask
        return parent_forward(self, input_ids, *args, **kwargs)

    # --- Hub format ---------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args, save_original_format: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained` writing in-memory weight names, then the flat remote-code bundle and
        `auto_map`, so the folder loads with `trust_remote_code=True` where `hf_mla_vlm` is not installed."""
        config_module = type(self.config).__module__.rsplit(".", 1)[-1]
        model_module = type(self).__module__.rsplit(".", 1)[-1]
        self.config.auto_map = {
            "AutoConfig": f"{config_module}.{type(self.config).__name__}",
            **{auto: f"{model_module}.{type(self).__name__}" for auto in AUTO_CLASSES},
        }
        super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)
        write_remote_code(self, save_directory)


def _module_dir(obj) -> Path:
    return Path(sys.modules[type(obj).__module__].__file__).resolve().parent


def remote_code_files(model) -> dict[str, Path]:
    """Remote-code file name -> source path, for a model loaded from the package or from remote code."""
    config_module = type(model.config).__module__.rsplit(".", 1)[-1]
    model_module = type(model).__module__.rsplit(".", 1)[-1]
    config_dir, model_dir = _module_dir(model.config), _module_dir(model)
    files = {
        f"{config_module}.py": config_dir / f"{config_module}.py",
        f"{model_module}.py": model_dir / f"{model_module}.py",
    }
    # In the package the files live in `configuration/`, `modeling/` and `kernels/`; in a remote-code folder they
    # are all siblings of the modeling file.
    in_package = model_dir.name == "modeling" and (model_dir.parent / "kernels").is_dir()
    for name, subdir in COMMON_REMOTE_FILES.items():
        files[name] = (model_dir.parent / subdir if in_package else model_dir) / name
    return files


def write_remote_code(model, save_directory: str | os.PathLike) -> None:
    """Copy the remote-code files flat into `save_directory` (relative imports become `from .module import`)."""
    save_directory = Path(save_directory)
    for name, source in remote_code_files(model).items():
        text = _RELATIVE_IMPORT.sub(r"from .\1 import", source.read_text())
        (save_directory / name).write_text(text)
    config_path = save_directory / "config.json"
    config = json.loads(config_path.read_text())
    missing = [
        name
        for name in config.get("auto_map", {}).values()
        if not (save_directory / f"{name.split('.')[0]}.py").exists()
    ]
    if missing:
        raise RuntimeError(f"auto_map points to modules that were not written: {missing}")


__all__ = ["MLAModelMixin", "forward_signature_with_mask", "remote_code_files", "write_remote_code"]
