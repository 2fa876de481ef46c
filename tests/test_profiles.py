import pytest

from d2mc.errors import UserError
from d2mc.profiles import builtin_profiles, load_profile

GOOD = """
name = "my-board"
description = "a board"
kind = "gpu"
memory_bandwidth_gbps = 100.0
memory_gb = 16
sm = "8.7"
tensorrt_precisions = ["fp16"]
bandwidth_efficiency = 0.8
compute_efficiency = 0.5
kernel_overhead_us = 5

[peak_tflops]
fp16 = 10.0

[source]
memory_bandwidth_gbps = "datasheet"
memory_gb = "datasheet"
sm = "datasheet"
tensorrt_precisions = "support matrix"
peak_tflops = "datasheet"
bandwidth_efficiency = "assumed"
compute_efficiency = "assumed"
kernel_overhead_us = "assumed"
"""


def test_builtin_profiles_cover_the_jetson_family():
    names = {p.name for p in builtin_profiles()}
    assert {"orin-agx", "orin-agx-32gb", "orin-nx-16gb", "orin-nano-8gb", "orin-nano-super", "thor",
            "host-cpu"} <= names
    for p in builtin_profiles():
        assert p.source["memory_bandwidth_gbps"] and p.source["peak_tflops"]


def test_aliases_and_orin_figures():
    orin = load_profile("jetson-agx-orin-64gb")
    assert orin.name == "orin-agx" and orin.memory_bandwidth_gbps == 204.8 and orin.sm == "8.7"
    assert "fp8" not in orin.tensorrt_precisions
    assert orin.peak_for("int4") == orin.peak_tflops["int8"]


def test_own_profile_file(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    profile = load_profile(path)
    assert profile.name == "my-board" and profile.achievable_bandwidth == pytest.approx(80e9)


@pytest.mark.parametrize("edit, message", [
    (lambda t: 'colour = "red"\n' + t, "field 'colour' is not a profile field"),
    (lambda t: t.replace("memory_gb = 16\n", ""), "field 'memory_gb' is missing"),
    (lambda t: t.replace("memory_bandwidth_gbps = 100.0", "memory_bandwidth_gbps = -3"),
     "field 'memory_bandwidth_gbps' must be positive"),
    (lambda t: t.replace("memory_bandwidth_gbps = 100.0", 'memory_bandwidth_gbps = "fast"'),
     "field 'memory_bandwidth_gbps' must be a number"),
    (lambda t: t.replace("fp16 = 10.0", "fp12 = 10.0"), "field 'peak_tflops.fp12' is not a precision"),
    (lambda t: t.replace("bandwidth_efficiency = 0.8", "bandwidth_efficiency = 1.5"),
     "field 'bandwidth_efficiency' must be a fraction"),
    (lambda t: t.replace('sm = "datasheet"\n', ""), "field 'source.sm' is missing"),
    (lambda t: t.replace('sm = "8.7"', 'sm = "eight"'), "field 'sm' must be a compute capability"),
    (lambda t: t.replace('kind = "gpu"', 'kind = "fpga"'), "field 'kind' must be one of gpu, cpu"),
    (lambda t: t + "[[[", "not valid TOML"),
    (lambda t: t.replace("memory_bandwidth_gbps = 100.0", "memory_bandwidth_gbps = nan"),
     "field 'memory_bandwidth_gbps' must be a finite number, not nan"),
    (lambda t: t.replace("kernel_overhead_us = 5", "kernel_overhead_us = inf"),
     "field 'kernel_overhead_us' must be a finite number, not inf"),
    (lambda t: t.replace("fp16 = 10.0", "fp16 = -inf"), "field 'peak_tflops.fp16' must be a finite number"),
])
def test_bad_profile_is_one_line_naming_file_and_field(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(UserError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown device profile 'orin-mega': choose one of .*orin-agx"):
        load_profile("orin-mega")


def test_missing_profile_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_profile(tmp_path / "none.toml")


def test_operator_bandwidth_efficiency_is_optional_and_checked(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD.replace('[source]', '[op_bandwidth_efficiency]\nattention = 0.5\n\n[source]')
                    + 'op_bandwidth_efficiency = "fitted"\n')
    profile = load_profile(path)
    assert profile.bandwidth_for("attention") == pytest.approx(0.5 * profile.achievable_bandwidth)
    assert profile.bandwidth_for("mlp") == profile.achievable_bandwidth
    path.write_text(GOOD.replace('[source]', '[op_bandwidth_efficiency]\nsoftmax = 0.5\n\n[source]')
                    + 'op_bandwidth_efficiency = "fitted"\n')
    with pytest.raises(UserError, match="field 'op_bandwidth_efficiency.softmax' is not an operator class"):
        load_profile(path)
    path.write_text(GOOD.replace('[source]', '[op_bandwidth_efficiency]\nattention = 0.5\n\n[source]'))
    with pytest.raises(UserError, match="field 'source.op_bandwidth_efficiency' is missing"):
        load_profile(path)


INT4 = """
[precisions.int4]
bandwidth_efficiency = 0.7
kernel_overhead_us = 8.0
"""


def with_table(table: str, source: str = 'precisions = "fitted"\n') -> str:
    return GOOD.replace("[source]", table + "\n[source]") + source


def test_per_precision_figures_apply_to_their_precision_only(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(with_table(INT4))
    profile = load_profile(path)
    assert profile.precisions == {"int4": {"bandwidth_efficiency": 0.7, "kernel_overhead_us": 8.0}}
    int4 = profile.for_precision("int4")
    assert int4.achievable_bandwidth == pytest.approx(70e9) and int4.kernel_overhead_us == 8.0
    assert int4.compute_efficiency == profile.compute_efficiency  # not overridden: the profile's own
    assert profile.for_precision("fp16") is profile
    # the tables describe the profile's own runtime: another runtime's view has none
    path.write_text(with_table(INT4 + "\n[runtimes.pytorch-cpu]\nkernel_overhead_us = 40.0\n",
                               'precisions = "fitted"\nruntimes = "fitted"\n'))
    assert load_profile(path).for_runtime("pytorch-cpu").for_precision("int4").kernel_overhead_us == 40.0


def test_a_runtime_may_carry_per_precision_figures_of_its_own(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(with_table(INT4 + "\n[runtimes.onnxruntime-cpu]\nkernel_overhead_us = 2.0\n"
                                      "[runtimes.onnxruntime-cpu.precisions.int4]\nbandwidth_efficiency = 0.3\n"
                                      "compute_efficiency = 0.25\ncompute_precision = \"int8\"\n"
                                      "[runtimes.onnxruntime-cpu.precisions.int8]\nbandwidth_efficiency = 0.5\n",
                               'precisions = "fitted"\nruntimes = "fitted"\n').replace("fp16 = 10.0",
                                                                                      "fp16 = 10.0\nint8 = 40.0"))
    profile = load_profile(path)
    ort = profile.for_runtime("onnxruntime-cpu")
    assert ort.kernel_overhead_us == 2.0 and set(ort.precisions) == {"int4", "int8"}
    int4 = ort.for_precision("int4")
    assert int4.achievable_bandwidth == pytest.approx(30e9) and int4.kernel_overhead_us == 2.0
    # the int4 kernels compute at int8 whatever the activations are; the others at what they are asked
    assert int4.achievable_flops("fp16") == pytest.approx(0.25 * 40e12)
    assert ort.for_precision("int8").achievable_flops("fp16") == pytest.approx(0.5 * 10e12)
    # the profile's own runtime keeps its own tables
    assert profile.for_precision("int4").achievable_bandwidth == pytest.approx(70e9)


def test_a_measured_profile_names_its_machine(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD + '\n[machine]\ncpu = "AMD EPYC"\ncores = 2\nmeasured = "2026-12-01 11:50"\n')
    assert load_profile(path).machine == {"cpu": "AMD EPYC", "cores": 2, "measured": "2026-12-01 11:50"}
    path.write_text(GOOD + "\n[machine]\ncores = [2]\n")
    with pytest.raises(UserError, match="field 'machine' must be a table"):
        load_profile(path)


def test_a_profile_without_precision_tables_still_loads(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    assert load_profile(path).precisions == {}


@pytest.mark.parametrize("table, message", [
    ("[precisions.int4]\nbandwidth_efficiency = nan\n",
     "field 'precisions.int4.bandwidth_efficiency' must be a finite number, not nan"),
    ("[precisions.int4]\nkernel_overhead_us = inf\n",
     "field 'precisions.int4.kernel_overhead_us' must be a finite number, not inf"),
    ("[precisions.int4]\nbandwidth_efficiency = 0\n", "field 'precisions.int4.bandwidth_efficiency' must be positive"),
    ("[precisions.int4]\ncompute_efficiency = -0.5\n",
     "field 'precisions.int4.compute_efficiency' must be positive"),
    ("[precisions.int4]\nbandwidth_efficiency = 1.2\n",
     "field 'precisions.int4.bandwidth_efficiency' must be a fraction in (0, 1]"),
    ("[precisions.int4]\nmemory_bandwidth_gbps = 50.0\n",
     "field 'precisions.int4.memory_bandwidth_gbps' cannot be set per precision (known: bandwidth_efficiency, "
     "compute_efficiency, kernel_overhead_us, compute_precision)"),
    ("[precisions.int4]\nbandwidth_efficiency = \"high\"\n",
     "field 'precisions.int4.bandwidth_efficiency' must be a number, not 'high'"),
    ("[precisions.int3]\nbandwidth_efficiency = 0.5\n", "field 'precisions.int3' is not a precision"),
    ("precisions = 3\n", "field 'precisions' must be tables [precisions.NAME]"),
    ("[precisions.int4]\ncompute_precision = \"int8\"\n",
     "field 'precisions.int4.compute_precision' must name a precision of peak_tflops (fp16), not 'int8'"),
    ("[runtimes.onnxruntime-cpu.precisions.int4]\nbandwidth_efficiency = 2.0\n",
     "field 'runtimes.onnxruntime-cpu.precisions.int4.bandwidth_efficiency' must be a fraction in (0, 1]"),
    ("[runtimes.onnxruntime-cpu.precisions.int5]\nbandwidth_efficiency = 0.5\n",
     "field 'runtimes.onnxruntime-cpu.precisions.int5' is not a precision"),
    ("[runtimes.onnxruntime-cpu]\nprecisions = 1\n",
     "field 'runtimes.onnxruntime-cpu.precisions' must be tables [runtimes.onnxruntime-cpu.precisions.NAME]"),
])
def test_bad_precision_tables_are_one_line_naming_file_and_key(tmp_path, table, message):
    path = tmp_path / "bad.toml"
    text = with_table(table) if table.startswith("[") else table + with_table("")
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_profile(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_precision_table_needs_its_source(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(with_table(INT4, source=""))
    with pytest.raises(UserError, match="field 'source.precisions' is missing"):
        load_profile(path)



def test_shipped_jetson_profiles_carry_int4_figures_with_their_source():
    for name in ("orin-agx", "thor", "orin-agx-32gb", "orin-nx-16gb", "orin-nano-8gb", "orin-nano-super"):
        profile = load_profile(name)
        assert set(profile.precisions) == {"int4"}
        assert "Edge-LLM" in profile.source["precisions"]
