# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The converted folder's model card and the report's summaries (the cache sizes come from `cache_size`)."""

import json

from ..modeling.latent_cache import SIDE_ROW_MULTIPLE


def activation_error_summary(layer_reports: list[dict]) -> dict:
    """Mean over layers of the held-out activation errors: `heldout_share` (per modality, the held-out share of the
    calibration conversations) and `heldout_prose` (text branch, on prose the calibration never saw)."""
    summary = {}
    share = [r["activation_error_heldout_share"] for r in layer_reports if "activation_error_heldout_share" in r]
    for modality in ("text", "image"):
        values = [r[modality] for r in share if modality in r]
        if values:
            summary.setdefault("heldout_share", {})[modality] = sum(values) / len(values)
    prose = [r["activation_error_heldout_prose"] for r in layer_reports if "activation_error_heldout_prose" in r]
    if prose:
        summary["heldout_prose"] = {"text": sum(prose) / len(prose)}
    return summary


def evaluation_rows(evaluation) -> list[tuple[str, str]]:
    """`(metric, value)` rows of a report's `"evaluation"` entry, as the model card prints them.

    Nested dicts are flattened with dotted keys (`{"fidelity": {"top1": 0.98}}` -> `fidelity.top1`), floats are
    written with 6 significant digits, lists and other values as JSON. A non-dict evaluation is one `value` row.
    """
    if not isinstance(evaluation, dict):
        return [("value", _card_value(evaluation))]
    rows = []
    for key, value in evaluation.items():
        if isinstance(value, dict) and value:
            rows += [(f"{key}.{sub}", text) for sub, text in evaluation_rows(value)]
        else:
            rows.append((str(key), _card_value(value)))
    return rows


def _card_value(value) -> str:
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


# What each held-out error of the report is measured on.
HELDOUT_TERMS = {
    "heldout_share": "held-out share of the calibration conversations (same kind of text and images)",
    "heldout_prose": "held-out prose: Wikipedia test-split paragraphs, never part of any calibration source",
}


def approximation_section(summary: dict | None) -> list[str]:
    """Markdown lines of the card's "Approximation error" section (mean over layers of the relative activation
    error `||(W - W')X|| / ||WX||` of `[W_k_nope; W_v]`); empty without a calibrated conversion."""
    if not summary:
        return []
    lines = [
        "## Approximation error (measured at conversion)",
        "",
        "Mean over layers of `||(W - W')X|| / ||WX||` for the factorised `[W_k_nope; W_v]`, on inputs `X` the "
        "factorisation never saw (per layer in `mla_conversion_report.json`).",
        "",
        "| measured on | modality | error |",
        "|---|---|---|",
    ]
    for key, values in summary.items():
        lines += [f"| {HELDOUT_TERMS.get(key, key)} | {m} | {v:.4g} |" for m, v in values.items()]
    return lines + [""]


def evaluation_section(evaluation) -> list[str]:
    """Markdown lines of the card's "Evaluation" section; empty when the report has no (or an empty) evaluation."""
    if evaluation is None or evaluation == {} or evaluation == []:
        return []
    lines = [
        "## Evaluation (measured)",
        "",
        "Numbers measured on the converted checkpoint and recorded under `evaluation` in "
        "`mla_conversion_report.json`.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {metric} | {value} |" for metric, value in evaluation_rows(evaluation)]
    return lines + [""]


# What the converted cache holds per token and layer (the model card's size row): its element count includes the
# zero padding of the side row.
CONVERTED_CACHE_TERMS = (
    "latent `n_kv * kv_rank` + side row of `n_kv * rope_dim` rope keys and 1 modality flag, zero-padded to a "
    f"multiple of {SIDE_ROW_MULTIPLE} elements; the count includes the padding"
)


def cache_change(reduction: float, digits: int = 1) -> str:
    """`reduction` (`1 - converted / original`) in words: "47.9% smaller than", "3.1% larger than" or "the same
    size as" (followed by what it is compared with)."""
    percent = round(100 * reduction, digits)
    if percent == 0:
        return "the same size as"
    return f"{abs(percent):.{digits}f}% {'smaller' if percent > 0 else 'larger'} than"


def finetune_summary(finetune_report: dict) -> dict:
    """What a folder's report keeps of one recovery fine-tuning (a `finetune_report.json`), under `"fine_tuning"`."""
    settings, training = finetune_report["settings"], finetune_report.get("training", {})
    return {
        "stage": settings["stage"],
        "mla_stage": settings.get("mla_stage"),
        "objective": settings["objective"],
        "teacher": settings.get("teacher"),
        "label_weight": settings.get("label_weight"),
        "data": settings.get("data"),
        "steps": training.get("steps"),
        "tokens_seen": training.get("tokens_seen"),
        "trainable_parameters": finetune_report.get("parameters", {}).get("trainable"),
        "date": finetune_report.get("date"),
    }


# Where the project's own measurements of conversion and recovery quality live (the card links, never copies, them).
RECOVERY_RESULTS = "`benchmarks/results/recovery_quality.md` of hf-mla-vlm"


def quality_section(report: dict) -> list[str]:
    """Markdown lines of the card's "Quality" section: the recovery fine-tuning the weights have had (the report's
    `"fine_tuning"` list, oldest first; none for a plain conversion) and where this checkpoint's measured quality is
    (the "Evaluation" section, or the command that records it)."""
    stages = report.get("fine_tuning") or []
    lines = ["## Quality", ""]
    if not stages:
        lines += [
            "No recovery fine-tuning: these are the converted weights as the factorisation left them. A conversion "
            "that cuts the KV cache loses text and vision quality until it is fine-tuned, e.g. by self-distillation "
            "from the original (`hf-mla-vlm finetune FOLDER --objective distill --teacher SOURCE`); hf-mla-vlm's "
            f"measurements at several cuts, before and after recovery, are in {RECOVERY_RESULTS}.",
            "",
        ]
    else:
        lines += [
            "Recovery fine-tuning these weights have had (oldest first; `finetune_report.json` has the last one in "
            f"full). hf-mla-vlm's measurements of each recovery route on its zoo models are in {RECOVERY_RESULTS}.",
            "",
            "| stage | objective | teacher | label weight | data | steps | tokens seen | trainable parameters |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for entry in stages:
            stage = entry.get("stage")
            if entry.get("mla_stage") is not None:  # the form the stage trains: "1 (partial_rope)", "2 (mla)"
                stage = f"{stage} ({entry['mla_stage']})"
            cells = [stage] + [entry.get(key) for key in ("objective", "teacher", "label_weight", "data", "steps")]
            cells += [entry.get("tokens_seen"), entry.get("trainable_parameters")]
            lines.append("| " + " | ".join("-" if cell is None else _card_value(cell) for cell in cells) + " |")
        lines.append("")
    if report.get("evaluation") in (None, {}, []):
        lines += [
            "This checkpoint's own quality has not been measured: `hf-mla-vlm evaluate FOLDER --reference SOURCE "
            "--text-file wikipedia --record` (perplexity, KL and top-1 against the original) and `--task vqa "
            "--record` write the numbers into `mla_conversion_report.json` and this card.",
            "",
        ]
    else:
        lines += ['This checkpoint\'s measured quality is under "Evaluation" below.', ""]
    return lines


def model_card(report: dict) -> str:
    """README.md of a converted folder: Hub metadata, settings, KV bytes, the quality section (the recovery
    fine-tuning the weights have had), the measured evaluation (when the report has an `"evaluation"` entry) and
    how to load it."""
    s, kv = report["settings"], report["kv_cache"]
    base = report["source"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- hf-mla-vlm",
        "- mla",
        "- multi-head-latent-attention",
        f"- {report['model_type']}",
    ]
    if report.get("source_is_hub_id"):
        lines.append(f"base_model: {base}")
    lines += [
        "---",
        "",
        f"# {report['model_type']}: {base} converted to Multi-Head Latent Attention",
        "",
        "Converted with [hf-mla-vlm](https://pypi.org/project/hf-mla-vlm/) (MHA2MLA-VLM): partial RoPE plus a "
        "low-rank latent per modality. The KV cache holds only the latent, the kept rotary key dims and one "
        "modality flag per token and layer.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in s.items()]
    lines += [
        "",
        f"## KV cache per token (all layers, {kv['bytes_per_element']}-byte elements)",
        "",
        "| cache | elements per layer | bytes per token | reduction |",
        "|---|---|---|---|",
        f"| original GQA cache (`2 * n_kv * head_dim`) | {kv['original']} | {kv['original_bytes_per_token']} | - |",
        f"| converted ({CONVERTED_CACHE_TERMS}) | {kv['converted']} | {kv['converted_bytes_per_token']} | "
        f"{cache_change(kv['reduction_vs_original_gqa_cache'], 2)} the real cache |",
        f"| MHA-equivalent (`2 * n_q * head_dim`, the paper's convention) | {kv['mha_equivalent']} | "
        f"{kv['mha_equivalent_bytes_per_token']} | "
        f"{cache_change(kv['reduction_vs_mha_equivalent_paper_convention'], 2)} it (paper-style) |",
        "",
    ]
    if kv["converted"] > kv["original"]:
        lines += [
            "At this setting the converted cache is larger than the original one: the latent plus the padded side row "
            "exceed `2 * n_kv * head_dim` elements (choose a smaller `kv_rank` or `rope_dim` to save memory).",
            "",
        ]
    lines += quality_section(report)
    lines += approximation_section(report.get("activation_error_summary"))
    lines += evaluation_section(report.get("evaluation"))
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'model = AutoModelForImageTextToText.from_pretrained("PATH_OR_REPO", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "CONVERTED_CACHE_TERMS",
    "HELDOUT_TERMS",
    "RECOVERY_RESULTS",
    "activation_error_summary",
    "approximation_section",
    "cache_change",
    "evaluation_rows",
    "evaluation_section",
    "finetune_summary",
    "model_card",
    "quality_section",
]
