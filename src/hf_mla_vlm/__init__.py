# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""hf-mla-vlm: convert LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL to Multi-Head Latent Attention.

Importing the package registers the converted configs and models with `AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText`, so `from_pretrained` works without `trust_remote_code`.

The registration needs torch and transformers, which take seconds to import, so it happens when they are first
needed rather than in `import hf_mla_vlm` itself (the command line's `--help` then starts without them):

* at once, if transformers is already imported;
* otherwise right after the first import of transformers, or of any module of this package other than the
  import-free `cli`, `dtypes`, `errors` and `registry`, completes;
* or on first access to one of the names below (`hf_mla_vlm.LlavaMLAConfig`, `hf_mla_vlm.convert`, ...).

The Auto classes cannot be reached without importing transformers, so after `import hf_mla_vlm` they always see
the MLA classes, as if the registration had run in the import. `register()` runs it explicitly (idempotent).
"""

import importlib
import importlib.abc
import sys
import threading

from .registry import ARCHITECTURES


__version__ = "0.1.0"


def _attribute(module: str, name: str):
    return lambda: getattr(importlib.import_module(module, __name__), name)


# The exported names, each resolved (imported) on first access; the classes through the registry.
_EXPORTS = {
    "PEFT_TARGET_MODULES": _attribute(".modeling.mla_attention", "PEFT_TARGET_MODULES"),
    "MLAAttention": _attribute(".modeling.mla_attention", "MLAAttention"),
    "MLAQuantizedCache": _attribute(".modeling.quantized_cache", "MLAQuantizedCache"),
    "MLAStaticQuantizedCache": _attribute(".modeling.quantized_cache", "MLAStaticQuantizedCache"),
    "ConversionResult": _attribute(".conversion_scripts.convert", "ConversionResult"),
    "convert": _attribute(".conversion_scripts.convert", "convert"),
}
for _spec in ARCHITECTURES.values():
    _EXPORTS[f"{_spec.class_prefix}MLAConfig"] = lambda spec=_spec: spec.mla_config_class
    _EXPORTS[f"{_spec.class_prefix}MLAModel"] = lambda spec=_spec: spec.mla_base_model_class
    _EXPORTS[f"{_spec.class_prefix}MLAForConditionalGeneration"] = lambda spec=_spec: spec.mla_model_class
# Modules that import neither torch nor transformers: importing them does not trigger the registration.
_IMPORT_FREE = frozenset(f"{__name__}.{name}" for name in ("cli", "dtypes", "errors", "registry"))
_lock = threading.RLock()
_state = {"registered": False, "running": False}


def register() -> None:
    """Register the MLA configs and models with the Auto classes (and the Triton decode kernel on CUDA); idempotent.

    Runs by itself when transformers or a model module is imported (see the module docstring); call it only to
    force the registration early."""
    with _lock:
        if _state["registered"] or _state["running"]:
            return
        _state["running"] = True
        try:
            from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

            from .compat import warn_if_untested
            from .kernels import is_triton_available
            from .modeling.mla_attention import register_decode_kernel

            warn_if_untested()
            for spec in ARCHITECTURES.values():
                AutoConfig.register(spec.mla_model_type, spec.mla_config_class, exist_ok=True)
                AutoModel.register(spec.mla_config_class, spec.mla_base_model_class, exist_ok=True)
                AutoModelForImageTextToText.register(spec.mla_config_class, spec.mla_model_class, exist_ok=True)
            # Absorbed decode on CUDA through the Triton kernel; the torch reference elsewhere.
            if is_triton_available():
                from .kernels.decode_op import mla_decode_dispatch

                register_decode_kernel("cuda", mla_decode_dispatch)
            _state["registered"] = True
        finally:
            _state["running"] = False
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `register()` once the outermost import of transformers or of a model module of this package is done.

    Outermost: a module of this package that imports transformers, or another one, is complete only when the import
    that started it is; registering earlier would meet that module half-initialised."""

    def __init__(self) -> None:
        self.depth = 0

    def find_spec(self, fullname, path=None, target=None):
        ours = fullname.startswith(f"{__name__}.") and fullname not in _IMPORT_FREE
        if _state["registered"] or _state["running"] or not (ours or fullname == "transformers"):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to the real loader (and puts it back on the module), then registers when no such import is open."""

    def __init__(self, loader, finder: _RegisterAfterImport) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        with _lock:
            self.finder.depth += 1
        try:
            self.loader.exec_module(module)
        finally:
            with _lock:
                self.finder.depth -= 1
                outermost = self.finder.depth == 0
        if outermost:
            register()


_FINDER = _RegisterAfterImport()
if "transformers" in sys.modules:
    register()
else:
    sys.meta_path.insert(0, _FINDER)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _EXPORTS[name]()
    register()
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "PEFT_TARGET_MODULES",
    "ConversionResult",
    "LlavaMLAConfig",
    "LlavaMLAForConditionalGeneration",
    "LlavaMLAModel",
    "LlavaNextMLAConfig",
    "LlavaNextMLAForConditionalGeneration",
    "LlavaNextMLAModel",
    "LlavaOnevisionMLAConfig",
    "LlavaOnevisionMLAForConditionalGeneration",
    "LlavaOnevisionMLAModel",
    "MLAAttention",
    "MLAQuantizedCache",
    "MLAStaticQuantizedCache",
    "Qwen2VLMLAConfig",
    "Qwen2VLMLAForConditionalGeneration",
    "Qwen2VLMLAModel",
    "Qwen2_5_VLMLAConfig",
    "Qwen2_5_VLMLAForConditionalGeneration",
    "Qwen2_5_VLMLAModel",
    "convert",
    "register",
]
