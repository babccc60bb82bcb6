"""`graft_vlm`: a VLM around any decoder LM keeps every weight (biases included) and the LM's text-only logits."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from hf_mla_vlm.conversations import encode_conversations
from hf_mla_vlm.errors import InputError
from hf_mla_vlm.graft import GRAFT_ARCHS, check_graftable, graft_vlm, mrope_section, placeholder_tokens
from hf_mla_vlm.tiny_models import build_tiny_tokenizer, tiny_image


def _tiny_lm(kind: str, vocab_size: int, seed: int = 0, **overrides):
    """A random `Qwen2ForCausalLM` (q/k/v biases, made non-zero) or `LlamaForCausalLM` (no biases)."""
    sizes = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    sizes.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**sizes)) if kind == "qwen2" else LlamaForCausalLM(LlamaConfig(**sizes))
    with torch.no_grad():
        for param in model.parameters():  # biases too (initialised to zero): every weight must be seen to move
            param.normal_(0.0, 0.2)
    return model.eval()


def _plain_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A word-level tokenizer without any image placeholder."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _text_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _probe(vocab_size: int, skip: set[int]) -> torch.Tensor:
    ids = [i for i in range(5, vocab_size) if i not in skip][:24]
    return torch.tensor([ids, ids[::-1]])


def _biases(model, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix) and k.endswith("bias")}


@pytest.mark.parametrize("arch", GRAFT_ARCHS)
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_graft_keeps_the_text_logits_and_every_bias(kind, arch):
    tokenizer = build_tiny_tokenizer(vocab_size=160)
    lm = _tiny_lm(kind, len(tokenizer))
    model, processor = graft_vlm(lm, tokenizer, arch)
    placeholders = {tokenizer.convert_tokens_to_ids(t) for t in placeholder_tokens(arch)}
    ids = _probe(len(tokenizer), placeholders)
    torch.testing.assert_close(_text_logits(model, ids), _text_logits(lm, ids), rtol=1e-5, atol=1e-5)

    source = _biases(lm, "model.")
    grafted = _biases(model, "model.language_model.")
    if kind == "qwen2":
        assert {k.rsplit(".", 2)[-2] for k in source} == {"q_proj", "k_proj", "v_proj"}
        assert all(source[k].abs().sum() > 0 for k in source)  # the test would not see zeros replace them
        for key, bias in source.items():
            torch.testing.assert_close(grafted[key], bias, rtol=0, atol=0)
    else:
        assert not source and all(b.abs().sum() == 0 for b in grafted.values())  # Qwen-VL's biases: zeros

    # The processor and the vision side fit: an image conversation runs through the grafted model.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    conversation = type("C", (), {"messages": messages, "images": [tiny_image(size=(56, 56))]})()
    (inputs,) = encode_conversations(processor, [conversation])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(logits).all()


def test_graft_appends_missing_placeholders_without_changing_the_text_logits():
    tokenizer = _plain_tokenizer()
    lm = _tiny_lm("qwen2", len(tokenizer))
    model, processor = graft_vlm(lm, tokenizer, "qwen2_5_vl")
    added = len(placeholder_tokens("qwen2_5_vl"))
    assert len(processor.tokenizer) == len(tokenizer) + added
    assert model.config.text_config.vocab_size == len(tokenizer) + added
    ids = _probe(len(tokenizer), set())
    grafted = _text_logits(model, ids)
    torch.testing.assert_close(grafted[..., : len(tokenizer)], _text_logits(lm, ids), rtol=1e-5, atol=1e-5)
    assert processor.tokenizer("w7 w8")["input_ids"] == tokenizer("w7 w8")["input_ids"]


def test_graft_refuses_a_head_dim_qwen_cannot_represent():
    tokenizer = build_tiny_tokenizer(vocab_size=160)
    lm = _tiny_lm("llama", len(tokenizer), head_dim=32)  # hidden 64 / 4 heads would be 16
    for arch in ("qwen2_5_vl", "qwen2_vl"):
        with pytest.raises(InputError, match="head_dim"):
            graft_vlm(lm, tokenizer, arch)
    model, _ = graft_vlm(lm, tokenizer, "llava")  # LLaVA keeps the LM's own class, any head_dim
    ids = _probe(len(tokenizer), {tokenizer.convert_tokens_to_ids("<image>")})
    torch.testing.assert_close(_text_logits(model, ids), _text_logits(lm, ids), rtol=1e-5, atol=1e-5)


def test_graft_refuses_weights_it_would_drop():
    """Llama with `attention_bias=True` has an o_proj bias, which Qwen-VL's attention has no place for."""
    tokenizer = build_tiny_tokenizer(vocab_size=160)
    lm = _tiny_lm("llama", len(tokenizer), attention_bias=True)
    with pytest.raises(InputError, match=r"no place for .*o_proj\.bias"):
        graft_vlm(lm, tokenizer, "qwen2_5_vl")
    model, _ = graft_vlm(lm, tokenizer, "llava_next")
    assert _biases(model, "model.language_model.").keys() == _biases(lm, "model.").keys()


def test_graft_refuses_scaled_rope_and_unknown_architectures():
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=rope)
    with pytest.raises(InputError, match="rope_type 'linear'"):
        check_graftable(config, "qwen2_vl")
    with pytest.raises(InputError, match="Unknown architecture"):
        check_graftable(config, "gpt2")


@pytest.mark.parametrize(("head_dim", "section"), [(128, [16, 24, 24]), (64, [8, 12, 12]), (16, [2, 3, 3])])
def test_mrope_section_matches_qwen(head_dim, section):
    assert mrope_section(head_dim) == section and sum(section) == head_dim // 2


def test_a_grafted_qwen2_lm_converts_exactly_at_full_rank_with_its_biases(tmp_path):
    """Grafted into Qwen2.5-VL, a Qwen2 LM's q/k/v biases reach the MLA model: full-rank conversion is exact."""
    from hf_mla_vlm.conversion_scripts.convert import convert

    tokenizer = build_tiny_tokenizer(vocab_size=160)
    lm = _tiny_lm("qwen2", len(tokenizer))
    model, processor = graft_vlm(lm, tokenizer, "qwen2_5_vl")
    model.save_pretrained(tmp_path / "native")
    processor.save_pretrained(tmp_path / "native")
    head_dim = lm.config.hidden_size // lm.config.num_attention_heads
    result = convert(tmp_path / "native", tmp_path / "mla", rope_dim=head_dim, kv_rank=head_dim, progress=False,
                     return_model=True)  # fmt: skip
    ids = _probe(len(tokenizer), {tokenizer.convert_tokens_to_ids(t) for t in placeholder_tokens("qwen2_5_vl")})
    torch.testing.assert_close(_text_logits(result.model, ids), _text_logits(lm, ids), rtol=1e-4, atol=1e-4)
