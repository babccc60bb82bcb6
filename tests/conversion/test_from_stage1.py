"""Stage 2 from a (fine-tuned) stage-1 checkpoint: native -> partial_rope -> tune -> mla (method.md 4, Pipeline)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import hf_mla_vlm  # noqa: F401  (registers the MLA classes with the Auto classes)
from hf_mla_vlm import cli
from hf_mla_vlm.conversion_scripts.calibration import DEFAULT_CALIBRATION
from hf_mla_vlm.conversion_scripts.convert import calibration_statistics, convert
from hf_mla_vlm.conversion_scripts.rope_selection import save_rank_file, scores_to_ranks
from hf_mla_vlm.conversion_scripts.svd import activation_aware_svd
from hf_mla_vlm.conversion_scripts.weights import kv_source_matrix
from hf_mla_vlm.registry import arch_spec
from hf_mla_vlm.tiny_models import TINY_ARCHS
from tests.utils import load_native, mixed_batch, relative_error


HEAD_DIM, ROPE_DIM = 32, 8  # tiny models: hidden 128, 4 query heads, 2 kv heads, 2 layers
FULL_KV_RANK = 2 * HEAD_DIM - ROPE_DIM  # latent = rows of [W_k_nope; W_v]: every low-rank init is exact
STAGE1 = dict(rope_dim=ROPE_DIM, kv_rank=8, rope_strategy="uniform", mla_stage="partial_rope")


def _convert(source, out, **kwargs):
    return convert(source, out, progress=False, return_model=True, **kwargs)


def _perturb(model, std: float = 0.02, seed: int = 1) -> None:
    """Stand-in for stage-1 fine-tuning: move q_proj, k_nope_proj and v_proj (weights and biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn in model.mla_attention_modules():
            for proj in (attn.q_proj, attn.k_nope_proj, attn.v_proj):
                for param in proj.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def stage1(native_checkpoints, tmp_path_factory):
    """Per arch: the stage-1 folder straight from the native checkpoint and a perturbed ("fine-tuned") copy."""
    root = tmp_path_factory.mktemp("stage1")
    folders = {}
    for arch, native in native_checkpoints.items():
        plain = root / f"{arch}-stage1"
        model = _convert(native, plain, **STAGE1).model
        _perturb(model)
        tuned = root / f"{arch}-stage1-tuned"
        shutil.copytree(plain, tuned)
        model.save_pretrained(tuned)
        (tuned / "finetune_report.json").write_text("{}\n")  # like `hf_mla_vlm.training` writes
        folders[arch] = plain, tuned
    return folders


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("svd", ["weight", "md"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_rank_stage2_reproduces_the_tuned_stage1_model(arch, svd, stage1, tmp_path):
    _, tuned = stage1[arch]
    result = _convert(tuned, tmp_path / "mla", kv_rank=FULL_KV_RANK, svd=svd, num_samples=6)
    reference, processor = load_native(tuned)
    inputs = mixed_batch(processor, arch)
    keep = inputs["attention_mask"].bool()
    assert relative_error(_logits(reference, inputs), _logits(result.model, inputs), keep) < 1e-5  # measured ~1e-6

    settings = result.report["settings"]
    assert settings["source_stage"] == "partial_rope" and settings["mla_stage"] == "mla"
    assert settings["rope_dim"] == ROPE_DIM and settings["rope_strategy"] == "stage-1 source"
    assert result.model.config.rope_pairs == reference.config.rope_pairs
    assert not {"mla_conversion_report.json", "finetune_report.json"} & set(result.report["copied_from_source"])
    # q_proj, k_rope_proj, o_proj (and their biases) are copied as they are: already permuted in stage 1.
    written = load_file(result.output_dir / "model.safetensors")
    source = reference.state_dict()
    kept = ("q_proj", "k_rope_proj", "o_proj")
    copied = [k for k in source if "language_model" in k and any(f".self_attn.{p}." in k for p in kept)]
    has_bias = any("language_model" in k and k.endswith("self_attn.q_proj.bias") for k in source)  # Qwen2 text
    assert len(copied) == 2 * (5 if has_bias else 3)
    for key in copied:
        assert torch.equal(written[key], source[key]), key


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_stage2_uses_the_stage1_weights(arch, stage1, native_checkpoints, tmp_path):
    """From the tuned stage-1 model the result differs from the same conversion of the native model (which equals the
    untuned stage-1 model)."""
    plain, tuned = stage1[arch]
    settings = dict(kv_rank=FULL_KV_RANK, rope_dim=ROPE_DIM)
    from_native = _convert(native_checkpoints[arch], tmp_path / "n", rope_strategy="uniform", **settings).model
    from_plain = _convert(plain, tmp_path / "p", **settings).model
    from_tuned = _convert(tuned, tmp_path / "t", **settings).model
    _, processor = load_native(tuned)
    inputs = mixed_batch(processor, arch)
    keep = inputs["attention_mask"].bool()
    native_logits = _logits(from_native, inputs)
    assert relative_error(native_logits, _logits(from_plain, inputs), keep) < 1e-5
    assert relative_error(native_logits, _logits(from_tuned, inputs), keep) > 1e-2


def test_md_statistics_come_from_the_stage1_model(stage1, native_checkpoints, tmp_path):
    """Stage 2's MD-SVD factors are those of the tuned stage-1 weights on the tuned stage-1 model's activations."""
    arch, layer, rank = "qwen2_5_vl", 1, 2 * 8  # layer 1: its inputs depend on the (tuned) layer-0 attention
    _, tuned = stage1[arch]
    result = _convert(tuned, tmp_path / "mla", kv_rank=8, svd="md", num_samples=6)
    assert result.report["calibration"]["attention"] == "partial_rope"

    def stats_of(folder):
        model, _ = load_native(folder)
        ids = result.model.config.image_token_ids
        return model, calibration_statistics(
            model, folder, arch_spec(arch), ids, calibration=DEFAULT_CALIBRATION, num_samples=6, progress=False
        )

    tuned_model, tuned_stats = stats_of(tuned)
    _, native_stats = stats_of(native_checkpoints[arch])
    assert tuned_stats.settings["attention"] == "partial_rope" and native_stats.settings["attention"] == "native"
    assert torch.isnan(tuned_stats.layers[layer].mkl).all()  # rotary statistics are not collected on stage 1
    # Same layer-0 inputs (embeddings untouched), different layer-1 inputs (tuned layer-0 attention).
    torch.testing.assert_close(tuned_stats.layers[0].cov["image"], native_stats.layers[0].cov["image"])
    assert not torch.allclose(tuned_stats.layers[layer].cov["image"], native_stats.layers[layer].cov["image"])

    prefix = f"model.language_model.layers.{layer}.self_attn."
    attention = {k[len(prefix) :]: v for k, v in tuned_model.state_dict().items() if k.startswith(prefix)}
    weight, _ = kv_source_matrix(attention)
    for modality in ("text", "image"):
        expected = activation_aware_svd(weight, tuned_stats.layers[layer].cov[modality], rank)
        other = activation_aware_svd(weight, native_stats.layers[layer].cov[modality], rank)
        written = result.model.model.language_model.layers[layer].self_attn.kv_a_proj[modality].weight
        torch.testing.assert_close(written, expected.down)
        assert relative_error(expected.up @ expected.down, other.up @ other.down) > 1e-3

    with pytest.raises(ValueError, match="collected on a native model, but the source is partial_rope"):
        convert(tuned, tmp_path / "bad", kv_rank=8, svd="md", statistics=native_stats, progress=False)
    reused = convert(tuned, tmp_path / "reused", kv_rank=8, svd="md", statistics=tuned_stats, progress=False)
    assert torch.equal(
        load_file(reused.output_dir / "model.safetensors")[prefix + "kv_a_proj.image.weight"], expected.down
    )


def test_stage1_source_errors(stage1, native_checkpoints, tmp_path):
    plain, tuned = stage1["llava"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="rope_dim=16 differs from the stage-1 source's rope_dim=8"):
        convert(tuned, out, rope_dim=16, kv_rank=8, progress=False)
    with pytest.raises(ValueError, match="'high' selects other rotary pairs"):
        convert(tuned, out, rope_strategy="high", kv_rank=8, progress=False)  # the source kept "uniform"
    for strategy in ("mkl", "2-norm"):
        with pytest.raises(ValueError, match="cannot be re-selected after stage-1 training"):
            convert(tuned, out, rope_strategy=strategy, kv_rank=8, progress=False)
    ranks = tmp_path / "ranks.safetensors"  # keeps the highest-frequency pairs
    save_rank_file(scores_to_ranks(-torch.arange(HEAD_DIM // 2.0).expand(2, 2, -1)), ranks)
    with pytest.raises(ValueError, match="selects other rotary pairs"):
        convert(tuned, out, rope_ranks=ranks, kv_rank=8, progress=False)
    with pytest.raises(ValueError, match="rope_min_per_axis"):
        convert(stage1["qwen2_5_vl"][1], out, kv_rank=8, rope_min_per_axis={"h": 1}, progress=False)
    with pytest.raises(ValueError, match="converts to mla_stage='mla' only"):
        convert(tuned, out, kv_rank=8, mla_stage="partial_rope", progress=False)
    mla = convert(native_checkpoints["llava"], tmp_path / "mla", rope_dim=8, kv_rank=8, progress=False).output_dir
    with pytest.raises(ValueError, match="already an MLA checkpoint"):
        convert(mla, out, kv_rank=8, progress=False)
    with pytest.raises(ValueError, match="rope_dim .* is required"):
        convert(native_checkpoints["llava"], out, kv_rank=8, progress=False)
    assert not out.exists()
    # Settings that reproduce the source's pairs are accepted.
    convert(tuned, out, rope_dim=ROPE_DIM, rope_strategy="uniform", kv_rank=8, progress=False)


def test_cli_stage2_from_stage1(stage1, tmp_path, capsys):
    _, tuned = stage1["llava_next"]
    out = tmp_path / "mla"
    argv = ["convert", str(tuned), "--out", str(out), "--kv-rank", "8", "--svd", "md", "--num-samples", "6", "--quiet"]
    assert cli.main(argv) == 0
    report = json.loads((out / "mla_conversion_report.json").read_text())
    assert report["settings"]["source_stage"] == "partial_rope" and report["settings"]["rope_dim"] == ROPE_DIM
    assert cli.main(argv[:4] + ["--kv-rank", "8", "--rope-strategy", "mkl", "--overwrite"]) == 2
    assert "cannot be re-selected" in capsys.readouterr().err
