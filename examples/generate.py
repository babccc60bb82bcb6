"""Generate with a converted MLA checkpoint and print the bytes its KV cache really holds.

Usage:
    python generate.py ./llava-next-mla                   # a folder written by convert.py (or a Hub id)
    python generate.py                                    # converts a tiny random LLaVA-NeXT first, offline
    python generate.py ./qwen2-5-vl-mla --image photo.jpg --prompt "what is in the image ?"

Loading uses only Transformers: trust_remote_code=True runs the remote-code files shipped in the folder (the model
itself does not need hf_mla_vlm). This script uses hf_mla_vlm for the default test image and the cache byte count.
"""

import argparse
import tempfile

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def tiny_converted_model(folder: str) -> str:
    """Build and convert a tiny random LLaVA-NeXT (needs hf_mla_vlm; only used when no model is given)."""
    import hf_mla_vlm
    from hf_mla_vlm.tiny_models import save_tiny_vlm

    source = save_tiny_vlm("llava_next", f"{folder}/tiny-llava-next")
    return str(
        hf_mla_vlm.convert(source, f"{folder}/tiny-llava-next-mla", rope_dim=8, kv_rank=8, progress=False).output_dir
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Greedy generation with a converted MLA checkpoint.")
    parser.add_argument("model", nargs="?", help="converted folder or Hub repo id (default: a tiny converted model)")
    parser.add_argument("--image", help="image file (default: a random test image)")
    parser.add_argument("--prompt", default="describe the image")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or tiny_converted_model(tmp)
        print(f"Loading {model_path} (trust_remote_code=True)")
        model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, dtype="auto").eval()
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)

        if args.image:
            image = Image.open(args.image).convert("RGB")
        else:
            from hf_mla_vlm.tiny_models import tiny_image

            image = tiny_image()
        # One user turn with an image placeholder and the question, formatted by the checkpoint's chat template.
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[image], text=[text], return_tensors="pt").to(model.device)

        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True
            )
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        print(f"Prompt: {text!r}")
        print(f"Generated: {processor.batch_decode(new_tokens, skip_special_tokens=True)[0]!r}")

        # The returned cache holds every token fed to the model (prompt incl. image tokens, and all but the last
        # generated token). For an MLA model it stores only the latent, the kept rotary key dims and a modality flag.
        from hf_mla_vlm.cache_size import cache_nbytes
        from hf_mla_vlm.compat import output_cache

        cache = output_cache(out)
        cached_tokens = cache.get_seq_length()
        nbytes = cache_nbytes(cache)
        print(f"KV cache: {nbytes} bytes for {cached_tokens} tokens = {nbytes / cached_tokens:g} bytes per token")


if __name__ == "__main__":
    main()
