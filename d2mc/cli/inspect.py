"""``d2mc inspect MODEL``: dimensions, parameters by component and their bytes, KV-cache size."""

from __future__ import annotations

import click

from d2mc.cli.common import (
    config_only_option,
    console,
    human_bytes,
    human_count,
    json_option,
    model_argument,
    print_json,
    table,
)
from d2mc.inspection import COMPONENTS, WEIGHT_PRECISIONS, inspect_model
from d2mc.loading import load_model


@click.command("inspect")
@model_argument
@config_only_option
@json_option
def command(model: str, config_only: bool, as_json: bool) -> None:
    """Describe MODEL: a hub id, a checkpoint directory, a .gguf file, or smollm2-135m."""
    info = inspect_model(load_model(model, config_only=config_only, tokenizer=False))
    if as_json:
        print_json(info)
        return
    out = console()
    dims = [["family", info["family"]], ["layers", info["layers"]],
            ["layers with attention", info["attention_layers"]], ["hidden", info["hidden_size"]],
            ["intermediate", info["intermediate_size"]], ["attention heads", info["attention_heads"]],
            ["KV heads", info["kv_heads"]], ["head dim", info["head_dim"]], ["vocab", info["vocab_size"]],
            ["tied embeddings", "yes" if info["tied_embeddings"] else "no"],
            ["max positions", info["max_position_embeddings"]]]
    out.print(table(f"{info['model']}" + (" (config only)" if config_only else ""), ["", ""], dims))
    out.print()
    params = info["parameters"]
    rows = [[c, f"{params[c]:,}", *(human_bytes(info["bytes"][p][c]) for p in WEIGHT_PRECISIONS)]
            for c in (*COMPONENTS, "total") if params[c] or c == "total"]
    out.print(table("parameters", ["component", "parameters", *WEIGHT_PRECISIONS], rows))
    if info["tied_embeddings"]:
        out.print("lm_head shares the embedding matrix (tied): no parameters of its own")
    out.print(f"\ntotal {human_count(params['total'])} parameters, "
              f"{human_count(info['active_parameters_per_token'])} active per token")
    kv = info["kv_cache_bytes_per_token"]
    out.print("KV cache per token: " + ", ".join(f"{human_bytes(v)} ({p})" for p, v in kv.items()))
