import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from d2mc.cli import cli, main
from tests.conftest import requires_real_model


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_inspect_table_and_json(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    result = invoke("inspect", path)
    assert result.exit_code == 0
    assert "qwen3" in result.output and "KV cache per token" in result.output
    info = json.loads(invoke("inspect", path, "--json").stdout)
    assert info["parameters"]["total"] == sum(v for k, v in info["parameters"].items() if k != "total")
    assert info["kv_heads"] == 2 and info["bytes"]["fp16"]["total"] == 2 * info["parameters"]["total"]


def test_targets_lists_profiles_with_sources():
    result = invoke("targets")
    assert result.exit_code == 0
    for name in ("orin-agx", "orin-nano-super", "thor", "host-cpu"):
        assert name in result.output
    assert "DS-10662-001" in result.output
    assert "precisions = int4: bandwidth_efficiency=0.803, kernel_overhead_us=8.12: fitted" in result.output
    assert json.loads(invoke("targets", "orin-agx", "--json").stdout)[0]["sm"] == "8.7"


@pytest.mark.parametrize("args, message", [
    (["inspect", "/no/such/model"], "error: no such file or directory: '/no/such/model'"),
    (["targets", "mars-rover"], "error: unknown device profile 'mars-rover'"),
    (["profile", Path(__file__).parent / "data" / "qwen3-0.6b-config.json", "--config-only", "--precision", "int4",
      "--block-size", "96"], "error: --block-size must be a power of two"),
])
def test_user_errors_are_one_line_with_exit_code_1(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.real_model
@requires_real_model
def test_inspect_embedded_model():
    result = invoke("inspect", "smollm2-135m", "--config-only")
    assert "134.5M parameters" in result.output


def test_option_errors_name_option_keys_in_python_and_flags_on_the_command_line(tiny_checkpoint, capsys):
    from d2mc.cli import build, export
    from d2mc.cli.common import option_flags_of
    from d2mc.errors import OptionError
    from d2mc.latency import profile_model

    error = OptionError("lower {max_kv} or {max_batch} (not {2, 3})")
    assert str(error) == "lower max_kv or max_batch (not {2, 3})" and error.keys == ("max_kv", "max_batch")
    assert option_flags_of(build.command)["max_kv"] == "--max-kv"
    assert option_flags_of(export.command)["flavour"] == "--format"
    assert "legacy_flavour" not in option_flags_of(export.command)  # the hidden old spelling is not offered
    path = str(tiny_checkpoint("llama"))
    with pytest.raises(OptionError, match=r"^engine times an artifact's TensorRT engine: give an ARTIFACT and "
                                          r"measure$"):
        profile_model(path, "orin-agx", context=64, config_only=True, engine=True)
    with pytest.raises(SystemExit) as info:
        main(["profile", path, "--context", "64", "--config-only", "--engine"])
    assert info.value.code == 1
    assert capsys.readouterr().err == ("error: --engine times an artifact's TensorRT engine: give an ARTIFACT and "
                                       "--measure\n")


@pytest.mark.parametrize("given, method", [
    ({}, "auto"),
    ({"speedup": 1.3}, "auto"),
    ({"method": "drop-layers"}, "drop-layers"),
    ({"recipe": "lfuc-recover.toml"}, None),  # the recipe's
    ({"remove_attention": 6}, "lfuc"),
    ({"plan_text": "11-17"}, "lfuc"),
    ({"top_k": 2}, "lfuc"),
    ({"shared_expert": True}, "lfuc"),
    ({"no_normalize": True}, "lfuc"),
])
def test_compile_plans_auto_unless_an_option_fixes_the_plan_shape(given, method):
    from d2mc.cli.compile import default_method

    plan = {"method": None, "recipe": None, "remove_attention": None, "plan_text": None, "top_k": 1,
            "shared_expert": False, "no_normalize": False, "speedup": None, **given}
    assert default_method(plan) == method
