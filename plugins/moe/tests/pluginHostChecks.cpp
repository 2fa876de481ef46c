// Host-side checks of the D2mcMoE plugin's bookkeeping (creator, fields, types, shapes, workspace): everything
// TensorRT asks of a plugin before it runs a kernel, so these run on a machine without a GPU.
// Exit code 0 and "ok N" when every check passes; each failure is printed.
#include "d2mcMoePlugin.h"

#include <cstdio>
#include <cstring>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace
{
int gChecks = 0;
int gFailures = 0;

void check(bool ok, char const* what)
{
    ++gChecks;
    if (!ok)
    {
        ++gFailures;
        std::printf("FAILED: %s\n", what);
    }
}

struct Fields
{
    std::vector<PluginField> fields;
    std::vector<int32_t> ints;
    std::string activation = "swiglu";
    PluginFieldCollection collection{};

    Fields(int32_t experts, int32_t shared, int32_t topK, int32_t hidden, int32_t inter, int32_t normalize,
        int32_t weightBits = 0, int32_t blockSize = 0)
        : ints{experts, shared, topK, hidden, inter, normalize, weightBits, blockSize}
    {
        char const* names[] = {"num_experts", "num_shared", "top_k", "hidden_size", "intermediate_size", "normalize",
            "weight_bits", "block_size"};
        for (int i = 0; i < 8; ++i)
        {
            fields.emplace_back(names[i], &ints[i], PluginFieldType::kINT32, 1);
        }
        fields.emplace_back("activation", activation.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(activation.size()));
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
    }
};

DynamicPluginTensorDesc desc(DataType type, std::vector<int64_t> dims, std::vector<int64_t> maxDims = {})
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    d.max.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.desc.dims.d[i] = dims[i];
        d.max.d[i] = maxDims.empty() ? dims[i] : maxDims[i];
    }
    return d;
}
} // namespace

int main()
{
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    check(count == 1, "one creator");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "D2mcMoE") == 0, "creator name D2mcMoE");
    check(std::strcmp(creator->getPluginVersion(), "1") == 0, "creator version 1");
    check(std::strcmp(creator->getPluginNamespace(), "d2mc") == 0, "creator namespace d2mc");
    check(creator->getFieldNames()->nbFields == 9, "nine documented fields");

    Fields good(3, 1, 2, 64, 128, 1);
    IPluginV3* plugin = creator->createPlugin("moe", &good.collection, TensorRTPhase::kBUILD);
    check(plugin != nullptr, "plugin from valid fields");
    Fields bad(2, 0, 3, 64, 128, 1); // top_k > num_experts
    check(creator->createPlugin("moe", &bad.collection, TensorRTPhase::kBUILD) == nullptr, "top_k > experts refused");

    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(std::strcmp(core->getPluginName(), "D2mcMoE") == 0, "core name");

    // serialisation round trip: the fields TensorRT stores re-create the same plugin
    PluginFieldCollection const* stored = runtime->getFieldsToSerialize();
    IPluginV3* restored = creator->createPlugin("moe", stored, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "plugin from serialised fields");
    auto const& p = static_cast<d2mc::MoePlugin*>(restored)->params();
    check(p.numExperts == 3 && p.numShared == 1 && p.topK == 2 && p.hiddenSize == 64 && p.intermediateSize == 128
            && p.normalize == 1 && p.activation == "swiglu",
        "serialised fields round trip");

    DataType in[4] = {DataType::kHALF, DataType::kFLOAT, DataType::kHALF, DataType::kHALF};
    DataType out[1];
    check(build->getOutputDataTypes(out, 1, in, 4) == 0 && out[0] == DataType::kHALF, "output type = hidden type");

    // T = 16 tokens of H = 64; E = 3 routed + 1 shared, I = 128
    std::vector<DynamicPluginTensorDesc> io = {desc(DataType::kHALF, {16, 64}, {4096, 64}),
        desc(DataType::kFLOAT, {16, 3}, {4096, 3}), desc(DataType::kHALF, {4, 256, 64}),
        desc(DataType::kHALF, {4, 64, 128}), desc(DataType::kHALF, {16, 64}, {4096, 64})};
    check(build->supportsFormatCombination(0, io.data(), 4, 1), "fp16 hidden");
    check(build->supportsFormatCombination(1, io.data(), 4, 1), "fp32 router logits beside fp16 hidden");
    check(build->supportsFormatCombination(2, io.data(), 4, 1), "fp16 fc1 with fp16 hidden");
    io[2].desc.type = DataType::kFLOAT;
    check(!build->supportsFormatCombination(2, io.data(), 4, 1), "fc1 type must equal hidden type");
    io[2].desc.type = DataType::kHALF;
    io[0].desc.type = DataType::kINT32;
    check(!build->supportsFormatCombination(0, io.data(), 4, 1), "int32 hidden refused");
    io[0].desc.type = DataType::kHALF;

    check(build->configurePlugin(io.data(), 4, io.data() + 4, 1) == 0, "matching shapes accepted");
    auto wrong = io;
    wrong[2] = desc(DataType::kHALF, {4, 128, 64}); // fc1 not [S+E, 2I, H]
    check(build->configurePlugin(wrong.data(), 4, wrong.data() + 4, 1) != 0, "fc1 shape mismatch refused");
    auto dynamic = io;
    dynamic[0] = desc(DataType::kHALF, {-1, 64}, {4096, 64});
    check(build->configurePlugin(dynamic.data(), 4, dynamic.data() + 4, 1) == 0, "dynamic token dimension accepted");

    size_t const workspace = build->getWorkspaceSize(io.data(), 4, io.data() + 4, 1);
    size_t const expected = d2mc::moeWorkspaceSize(
        d2mc::MoeShape{4096, 64, 128, 3, 1, 2, true}, d2mc::MoeDataType::kHALF);
    check(workspace == expected && workspace > 4096u * 3 * 128 * 2, "workspace sized for the max token count");

    Dims threeD{};
    threeD.nbDims = 3;
    threeD.d[0] = 2;
    threeD.d[1] = 7;
    threeD.d[2] = 64;
    check(d2mc::tokensOf(threeD) == 14, "[B, S, H] has B*S tokens");

    // int4 experts: H = 64, I = 128, block 32; fc1 [4, 256, 32] and fc2 [4, 64, 64] int8, scales [.., 2] and [.., 4]
    Fields int4(3, 1, 2, 64, 128, 1, 4, 32);
    IPluginV3* quantized = creator->createPlugin("moe", &int4.collection, TensorRTPhase::kBUILD);
    check(quantized != nullptr, "int4 plugin from valid fields");
    auto* qbuild = static_cast<IPluginV3OneBuild*>(quantized->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* qruntime
        = static_cast<IPluginV3OneRuntime*>(quantized->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    IPluginV3* qrestored = creator->createPlugin("moe", qruntime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME);
    check(qrestored != nullptr && static_cast<d2mc::MoePlugin*>(qrestored)->params().weightBits == 4
            && static_cast<d2mc::MoePlugin*>(qrestored)->params().blockSize == 32,
        "weight_bits and block_size survive serialisation");
    std::vector<DynamicPluginTensorDesc> qio = {desc(DataType::kHALF, {16, 64}, {4096, 64}),
        desc(DataType::kFLOAT, {16, 3}, {4096, 3}), desc(DataType::kINT8, {4, 256, 32}),
        desc(DataType::kINT8, {4, 64, 64}), desc(DataType::kHALF, {4, 256, 2}), desc(DataType::kHALF, {4, 64, 4}),
        desc(DataType::kHALF, {16, 64}, {4096, 64})};
    for (int32_t pos = 0; pos < 7; ++pos)
    {
        check(qbuild->supportsFormatCombination(pos, qio.data(), 6, 1), "int4 inputs and output accepted");
    }
    check(!qbuild->supportsFormatCombination(2, qio.data(), 4, 1), "an int4 plugin refuses 4 inputs");
    check(!build->supportsFormatCombination(2, qio.data(), 6, 1), "a float plugin refuses 6 inputs");
    qio[2].desc.type = DataType::kHALF;
    check(!qbuild->supportsFormatCombination(2, qio.data(), 6, 1), "int4 fc1 must be int8-typed bytes");
    qio[2].desc.type = DataType::kINT8;
    qio[4].desc.type = DataType::kFLOAT;
    check(!qbuild->supportsFormatCombination(4, qio.data(), 6, 1), "scales take the hidden state's type");
    qio[4].desc.type = DataType::kHALF;
    DataType qin[6] = {DataType::kHALF, DataType::kFLOAT, DataType::kINT8, DataType::kINT8, DataType::kHALF,
        DataType::kHALF};
    check(qbuild->getOutputDataTypes(out, 1, qin, 6) == 0 && out[0] == DataType::kHALF, "int4 output = hidden type");
    check(qbuild->configurePlugin(qio.data(), 6, qio.data() + 6, 1) == 0, "packed int4 shapes accepted");
    auto unpacked = qio;
    unpacked[2] = desc(DataType::kINT8, {4, 256, 64}); // one code per byte is the int8 layout, not int4's
    check(qbuild->configurePlugin(unpacked.data(), 6, unpacked.data() + 6, 1) != 0, "unpacked int4 fc1 refused");
    auto blocks = qio;
    blocks[5] = desc(DataType::kHALF, {4, 64, 2}); // fc2 scales for blocks of 64, not 32
    check(qbuild->configurePlugin(blocks.data(), 6, blocks.data() + 6, 1) != 0, "scales of another block refused");
    check(qbuild->configurePlugin(qio.data(), 4, qio.data() + 6, 1) != 0, "4 inputs refused when quantized");
    Fields badBlock(3, 1, 2, 64, 128, 1, 4, 48); // 48 does not divide H = 64
    check(creator->createPlugin("moe", &badBlock.collection, TensorRTPhase::kBUILD) == nullptr, "block 48 refused");
    Fields badBits(3, 1, 2, 64, 128, 1, 3, 32);
    check(creator->createPlugin("moe", &badBits.collection, TensorRTPhase::kBUILD) == nullptr, "3 bits refused");
    Fields blockWithoutBits(3, 1, 2, 64, 128, 1, 0, 32);
    check(creator->createPlugin("moe", &blockWithoutBits.collection, TensorRTPhase::kBUILD) == nullptr,
        "a block size without weight bits refused");
    check(qbuild->getWorkspaceSize(qio.data(), 6, qio.data() + 6, 1) == workspace,
        "int4 weights need no more workspace than fp16 ones");

    delete qrestored;
    delete quantized;
    delete restored;
    delete plugin;
    if (gFailures)
    {
        std::printf("%d of %d checks failed\n", gFailures, gChecks);
        return 1;
    }
    std::printf("ok %d\n", gChecks);
    return 0;
}
