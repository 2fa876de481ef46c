"""How right the Jetson profiles are: predicted against published batch-1 decode of real devices.

The rows (tests/data/published_decode.toml) are TensorRT Edge-LLM's published decode throughput of Qwen3 0.6B to 8B
with INT4 AWQ weights (group 128, fp16 LM head, fp16 KV cache) at 2,048 cached tokens. Rows marked "fit" are what the
profile's [precisions.int4] figures were fitted on (orin-agx, thor); rows marked "check" are held out: their profiles
(the other Orin modules) take their datasheet figures and the efficiencies fitted on AGX Orin, and were not fitted on
any row of their own device. Also prints Llama-3.2-1B decode at context 512 on orin-agx (fp16 and int4).

``--fit`` refits the [precisions.int4] figures of each device with "fit" rows: least squares on the relative error
of the rows over the int4 bandwidth efficiency and the int4 per-kernel overhead, the profile's own (float) figures
held, and prints them with the errors they give.

    python benchmarks/device_roofline.py [--fit] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
TABLE = DATA / "published_decode.toml"
SETTING_KEYS = ("precision", "block_size", "zero_points", "lm_head_precision", "kv_precision", "context")


@cache
def load_arch(model: str):
    from d2mc.loading import load_model

    return load_model(DATA / f"{model}-config.json", config_only=True).arch


def load_rows() -> tuple[dict, list[dict]]:
    """The published sources and rows, each row with the roofline settings of its source."""
    from d2mc.roofline import RooflineSettings

    table = tomllib.loads(TABLE.read_text())
    rows = []
    for row in table["rows"]:
        source = table["sources"][row["source"]]
        settings = RooflineSettings(**{k: source[k] for k in SETTING_KEYS if k in source})
        rows.append({**row, "settings": settings, "published_s": 1.0 / row["tokens_per_s"]})
    return table["sources"], rows


def predict(row: dict, profile=None) -> float:
    """Predicted seconds of the row's decode step on its profile (or on ``profile``)."""
    from d2mc.profiles import load_profile
    from d2mc.roofline import estimate_phase

    profile = profile or load_profile(row["profile"])
    return estimate_phase(load_arch(row["model"]), profile, "decode", row["settings"]).seconds


def fit_precision(rows: list[dict], precision: str = "int4") -> dict:
    """Least squares over ``rows`` (one device) of the bandwidth efficiency and per-kernel overhead of the operators
    whose weights are at ``precision``, on the relative error; every other operator keeps the profile's figures.

    At batch-1 decode those operators are memory-bound, so a row's time is linear in 1/efficiency and the overhead:
    float part + bytes / (bandwidth x efficiency) + kernels x overhead."""
    import numpy as np

    from d2mc.profiles import load_profile
    from d2mc.roofline import estimate_phase

    profile = load_profile(rows[0]["profile"])
    bare = dataclasses.replace(profile, precisions={})
    design, target = [], []
    for row in rows:
        cost = estimate_phase(load_arch(row["model"]), bare, "decode", row["settings"])
        fitted = [o for o in cost.ops if o.weights == precision]
        if any(o.bound != "memory" for o in fitted):
            raise ValueError(f"{row['model']} on {profile.name}: a {precision} operator is compute-bound")
        rest = cost.seconds - sum(o.seconds for o in fitted)
        streamed = sum(o.bytes / (profile.memory_bandwidth_gbps * 1e9 * profile.op_bandwidth_efficiency.get(o.op, 1.0))
                       for o in fitted)
        kernels = sum(o.kernels for o in fitted)
        t = row["published_s"]
        design.append([streamed / t, kernels * 1e-6 / t])
        target.append((t - rest) / t)
    (inverse_efficiency, overhead_us), *_ = np.linalg.lstsq(np.array(design), np.array(target), rcond=None)
    figures = {"bandwidth_efficiency": 1.0 / inverse_efficiency, "kernel_overhead_us": overhead_us}
    fitted_profile = dataclasses.replace(profile, precisions={precision: figures})
    errors = [predict(row, fitted_profile) / row["published_s"] - 1 for row in rows]
    return {"profile": profile.name, "precision": precision, **figures, "rows": len(rows),
            "max_abs_error": max(abs(e) for e in errors)}


def predict_llama() -> list[dict]:
    """Llama-3.2-1B decode at context 512 on orin-agx: fp16, and int4 (group 128) with an fp16 or an int4 LM head."""
    from d2mc.loading import load_model
    from d2mc.profiles import load_profile
    from d2mc.roofline import RooflineSettings, estimate_phase

    arch = load_model(DATA / "llama-3.2-1b-config.json", config_only=True).arch
    profile = load_profile("orin-agx")
    cases = {"fp16": RooflineSettings(context=512, precision="fp16"),
             "int4, fp16 LM head": RooflineSettings(context=512, precision="int4", lm_head_precision="fp16"),
             "int4, int4 LM head": RooflineSettings(context=512, precision="int4")}
    lines = []
    for name, settings in cases.items():
        cost = estimate_phase(arch, profile, "decode", settings)
        lines.append({"model": "Llama-3.2-1B", "weights": name, "profile": profile.name, "context": 512,
                      "bytes": cost.bytes, "predicted_ms": cost.seconds * 1e3})
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="refit the int4 figures of the calibrated devices")
    parser.add_argument("--json")
    args = parser.parse_args()

    sources, rows = load_rows()
    records = []
    for row in rows:
        predicted = predict(row)
        error = predicted / row["published_s"] - 1
        records.append({k: row[k] for k in ("source", "device", "profile", "model", "tokens_per_s", "role")}
                       | {"context": row["settings"].context, "published_ms": row["published_s"] * 1e3,
                          "predicted_ms": predicted * 1e3, "error": error})
    print("Batch-1 decode, published (TensorRT Edge-LLM, INT4 AWQ group 128, fp16 LM head and KV cache) against "
          "the roofline:")
    print_table(["model", "device", "profile", "role", "tokens/s", "published ms", "predicted ms", "error"],
                [[r["model"], r["device"], r["profile"], r["role"], r["tokens_per_s"], f"{r['published_ms']:.2f}",
                  f"{r['predicted_ms']:.2f}", f"{r['error']:+.1%}"] for r in records])
    summary = {}
    for profile in dict.fromkeys(r["profile"] for r in records):
        mine = [r for r in records if r["profile"] == profile]
        summary[profile] = {"role": mine[0]["role"], "rows": len(mine),
                            "max_abs_error": max(abs(r["error"]) for r in mine)}
    print()
    print_table(["profile", "rows", "role", "max |error|"],
                [[p, s["rows"], s["role"], f"{s['max_abs_error']:.1%}"] for p, s in summary.items()])
    for name, source in sources.items():
        print(f"source {name}: {source['title']}, {source['url']}")

    fits = []
    if args.fit:
        for profile in dict.fromkeys(r["profile"] for r in rows if r["role"] == "fit"):
            fits.append(fit_precision([r for r in rows if r["profile"] == profile and r["role"] == "fit"]))
        print()
        print_table(["profile", "rows", "int4 bandwidth_efficiency", "int4 kernel_overhead_us", "max |error|"],
                    [[f["profile"], f["rows"], f"{f['bandwidth_efficiency']:.4f}", f"{f['kernel_overhead_us']:.3f}",
                      f"{f['max_abs_error']:.2%}"] for f in fits])

    llama = predict_llama()
    print()
    print_table(["model", "weights", "profile", "context", "bytes read (GB)", "predicted ms"],
                [[r["model"], r["weights"], r["profile"], r["context"], f"{r['bytes'] / 1e9:.3f}",
                  f"{r['predicted_ms']:.2f}"] for r in llama])
    write_json(args.json, {"sources": sources, "rows": records, "summary": summary, "fits": fits, "llama": llama})


if __name__ == "__main__":
    main()
