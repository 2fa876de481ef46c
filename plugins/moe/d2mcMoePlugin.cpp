#include "d2mcMoePlugin.h"

#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string_view>

using namespace nvinfer1;

// visible even when the library hides its other symbols (TENSORRTAPI is empty outside TensorRT's own build)
#define D2MC_EXPORT __attribute__((visibility("default")))

namespace d2mc
{
namespace
{

// The library is loaded by IPluginRegistry::loadLibrary (or trtexec --dynamicPlugins), which hands over a logger
// finder; messages go to the application's TensorRT logger.
class LoggerFinder
{
public:
    void set(ILoggerFinder* finder)
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr)
        {
            mFinder = finder;
        }
    }
    void error(std::string const& message)
    {
        std::lock_guard<std::mutex> lock(mMutex);
        ILogger* logger = mFinder ? mFinder->findLogger() : nullptr;
        std::string const text = std::string(kPluginName) + ": " + message;
        if (logger != nullptr)
        {
            logger->log(ILogger::Severity::kERROR, text.c_str());
        }
    }

private:
    ILoggerFinder* mFinder{nullptr};
    std::mutex mMutex;
};

LoggerFinder gLogger;

// the first kRequiredFields must be given; the others default (normalize 1, float weights)
char const* const kIntFields[]
    = {"num_experts", "num_shared", "top_k", "hidden_size", "intermediate_size", "normalize", "weight_bits", "block_size"};
constexpr int32_t kNbIntFields = sizeof(kIntFields) / sizeof(kIntFields[0]);
constexpr int32_t kRequiredFields = 5;

int32_t* intField(MoeParams& p, std::string_view name)
{
    if (name == "num_experts")
        return &p.numExperts;
    if (name == "num_shared")
        return &p.numShared;
    if (name == "top_k")
        return &p.topK;
    if (name == "hidden_size")
        return &p.hiddenSize;
    if (name == "intermediate_size")
        return &p.intermediateSize;
    if (name == "normalize")
        return &p.normalize;
    if (name == "weight_bits")
        return &p.weightBits;
    if (name == "block_size")
        return &p.blockSize;
    return nullptr;
}

int64_t readInt(PluginField const& field)
{
    switch (field.type)
    {
    case PluginFieldType::kINT32: return *static_cast<int32_t const*>(field.data);
    case PluginFieldType::kINT64: return *static_cast<int64_t const*>(field.data);
    case PluginFieldType::kINT16: return *static_cast<int16_t const*>(field.data);
    case PluginFieldType::kINT8: return *static_cast<int8_t const*>(field.data);
    default: throw std::invalid_argument(std::string("field ") + field.name + " must be an integer");
    }
}

MoeDataType toMoeType(DataType type)
{
    return type == DataType::kHALF ? MoeDataType::kHALF : MoeDataType::kFLOAT;
}

bool sameDim(int64_t actual, int64_t expected)
{
    return actual == -1 || actual == expected; // -1: dynamic, checked at the next configure
}

bool sameMatrix(Dims const& dims, int64_t experts, int64_t rows, int64_t cols)
{
    return dims.nbDims == 3 && sameDim(dims.d[0], experts) && sameDim(dims.d[1], rows) && sameDim(dims.d[2], cols);
}

} // namespace

std::string MoeParams::validate() const
{
    std::ostringstream problems;
    if (numExperts < 1 || numExperts > kMaxExperts)
        problems << "num_experts=" << numExperts << " must be in 1.." << kMaxExperts << "; ";
    if (numShared < 0)
        problems << "num_shared=" << numShared << " must be >= 0; ";
    if (topK < 1 || topK > kMaxTopK || topK > numExperts)
        problems << "top_k=" << topK << " must be in 1..min(num_experts, " << kMaxTopK << "); ";
    if (hiddenSize < 1 || intermediateSize < 1)
        problems << "hidden_size and intermediate_size must be positive; ";
    if (normalize < 0 || normalize > 2)
        problems << "normalize must be 0, 1 or 2; ";
    if (activation != "swiglu")
        problems << "activation '" << activation << "' is not swiglu; ";
    if (weightBits != 0 && weightBits != 4 && weightBits != 8)
        problems << "weight_bits=" << weightBits << " must be 0 (float weights), 4 or 8; ";
    else if (weightBits == 0 && blockSize != 0)
        problems << "block_size=" << blockSize << " needs quantized weights (weight_bits 4 or 8); ";
    else if (weightBits != 0
        && (blockSize < kBlockMultiple || blockSize % kBlockMultiple != 0 || hiddenSize % blockSize != 0
            || intermediateSize % blockSize != 0))
        problems << "block_size=" << blockSize << " must be a multiple of " << kBlockMultiple
                 << " dividing hidden_size and intermediate_size; ";
    return problems.str();
}

MoeParams paramsFromFields(PluginFieldCollection const* fc)
{
    if (fc == nullptr)
    {
        throw std::invalid_argument("no fields");
    }
    MoeParams params;
    bool seen[kNbIntFields] = {};
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        std::string_view const name = field.name;
        if (int32_t* target = intField(params, name))
        {
            *target = static_cast<int32_t>(readInt(field));
            for (int32_t k = 0; k < kNbIntFields; ++k)
            {
                seen[k] = seen[k] || name == kIntFields[k];
            }
        }
        else if (name == "activation")
        {
            if (field.type != PluginFieldType::kCHAR)
                throw std::invalid_argument("field activation must be a string");
            char const* text = static_cast<char const*>(field.data);
            params.activation.assign(text, strnlen(text, static_cast<size_t>(field.length)));
        }
        // plugin_version / plugin_namespace select the creator; other fields are ignored
    }
    for (int32_t k = 0; k < kRequiredFields; ++k)
    {
        if (!seen[k])
            throw std::invalid_argument(std::string("missing field ") + kIntFields[k]);
    }
    std::string const problems = params.validate();
    if (!problems.empty())
    {
        throw std::invalid_argument(problems);
    }
    return params;
}

int64_t tokensOf(Dims const& dims) noexcept
{
    int64_t tokens = 1;
    for (int32_t i = 0; i + 1 < dims.nbDims; ++i)
    {
        tokens *= dims.d[i];
    }
    return tokens;
}

MoePlugin::MoePlugin(MoeParams params)
    : mParams(std::move(params))
{
    buildSerializedFields();
}

MoePlugin::MoePlugin(MoePlugin const& other)
    : mParams(other.mParams)
{
    buildSerializedFields(); // the field pointers must point into this copy
}

void MoePlugin::buildSerializedFields()
{
    mSerialized.clear();
    mSerialized.emplace_back("num_experts", &mParams.numExperts, PluginFieldType::kINT32, 1);
    mSerialized.emplace_back("num_shared", &mParams.numShared, PluginFieldType::kINT32, 1);
    mSerialized.emplace_back("top_k", &mParams.topK, PluginFieldType::kINT32, 1);
    mSerialized.emplace_back("hidden_size", &mParams.hiddenSize, PluginFieldType::kINT32, 1);
    mSerialized.emplace_back("intermediate_size", &mParams.intermediateSize, PluginFieldType::kINT32, 1);
    mSerialized.emplace_back("normalize", &mParams.normalize, PluginFieldType::kINT32, 1);
    mSerialized.emplace_back("weight_bits", &mParams.weightBits, PluginFieldType::kINT32, 1);
    mSerialized.emplace_back("block_size", &mParams.blockSize, PluginFieldType::kINT32, 1);
    mSerialized.emplace_back("activation", mParams.activation.c_str(), PluginFieldType::kCHAR,
        static_cast<int32_t>(mParams.activation.size() + 1));
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerialized.size());
    mSerializedCollection.fields = mSerialized.data();
}

IPluginCapability* MoePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* MoePlugin::clone() noexcept
{
    try
    {
        return new MoePlugin(*this);
    }
    catch (std::exception const& e)
    {
        gLogger.error(e.what());
    }
    return nullptr;
}

char const* MoePlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MoePlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MoePlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t MoePlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t MoePlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != mParams.nbInputs() || nbOutputs != 1)
    {
        gLogger.error(mParams.weightBits == 0
                ? "takes 4 inputs (hidden, router_logits, fc1, fc2) and gives 1 output"
                : "with quantized weights takes 6 inputs (hidden, router_logits, fc1, fc2, fc1_scales, fc2_scales) "
                  "and gives 1 output");
        return -1;
    }
    Dims const& hidden = in[0].desc.dims;
    Dims const& logits = in[1].desc.dims;
    int64_t const experts = mParams.numShared + mParams.numExperts;
    int64_t const h = mParams.hiddenSize;
    int64_t const i = mParams.intermediateSize;
    bool ok = hidden.nbDims >= 2 && sameDim(hidden.d[hidden.nbDims - 1], h) && logits.nbDims >= 2
        && sameDim(logits.d[logits.nbDims - 1], mParams.numExperts);
    if (mParams.weightBits == 0)
    {
        ok = ok && sameMatrix(in[2].desc.dims, experts, 2 * i, h) && sameMatrix(in[3].desc.dims, experts, h, i);
    }
    else
    {
        int64_t const perByte = 8 / mParams.weightBits;
        int64_t const block = mParams.blockSize;
        ok = ok && sameMatrix(in[2].desc.dims, experts, 2 * i, h / perByte)
            && sameMatrix(in[3].desc.dims, experts, h, i / perByte)
            && sameMatrix(in[4].desc.dims, experts, 2 * i, h / block)
            && sameMatrix(in[5].desc.dims, experts, h, i / block);
    }
    if (!ok)
    {
        gLogger.error(mParams.weightBits == 0
                ? "input shapes do not match the attributes (hidden [T,H], router_logits [T,E], fc1 [S+E,2I,H], "
                  "fc2 [S+E,H,I])"
                : "input shapes do not match the attributes (hidden [T,H], router_logits [T,E], fc1 [S+E,2I,H*bits/8], "
                  "fc2 [S+E,H,I*bits/8], fc1_scales [S+E,2I,H/block_size], fc2_scales [S+E,H,I/block_size])");
        return -1;
    }
    return 0;
}

bool MoePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != mParams.nbInputs() || nbOutputs != 1 || pos < 0 || pos > nbInputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    bool const floating = desc.type == DataType::kHALF || desc.type == DataType::kFLOAT;
    if (pos == 0 || pos == 1)
    {
        return floating; // router logits may stay fp32 while the experts run in fp16
    }
    if ((pos == 2 || pos == 3) && mParams.weightBits != 0)
    {
        return desc.type == DataType::kINT8; // codes: int8, or two int4 per byte
    }
    return desc.type == inOut[0].desc.type; // float weights, scales and output share the hidden state's type
}

int32_t MoePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || nbInputs != mParams.nbInputs())
    {
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t MoePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != mParams.nbInputs() || nbOutputs != 1)
    {
        return -1;
    }
    outputs[0] = inputs[0];
    return 0;
}

MoeShape MoePlugin::shapeFor(int32_t tokens) const noexcept
{
    return MoeShape{tokens, mParams.hiddenSize, mParams.intermediateSize, mParams.numExperts, mParams.numShared,
        mParams.topK, mParams.normalize, mParams.weightBits, mParams.blockSize};
}

size_t MoePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    int64_t const maxTokens = tokensOf(inputs[0].max);
    return moeWorkspaceSize(shapeFor(static_cast<int32_t>(maxTokens)), toMoeType(inputs[0].desc.type));
}

int32_t MoePlugin::onShapeChange(
    PluginTensorDesc const* /*in*/, int32_t /*nbInputs*/, PluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept
{
    return 0; // the token count is read from the descriptors at each enqueue
}

int32_t MoePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    int64_t const tokens = tokensOf(inputDesc[0].dims);
    bool const quantized = mParams.weightBits != 0;
    MoeWeights const weights{inputs[2], inputs[3], quantized ? inputs[4] : nullptr, quantized ? inputs[5] : nullptr};
    int32_t const status = enqueueMoe(shapeFor(static_cast<int32_t>(tokens)), toMoeType(inputDesc[0].type), inputs[0],
        inputs[1], toMoeType(inputDesc[1].type), weights, outputs[0], workspace, stream);
    if (status != 0)
    {
        gLogger.error(std::string("kernel launch failed: ") + cudaGetErrorString(static_cast<cudaError_t>(status)));
    }
    return status;
}

IPluginV3* MoePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* MoePlugin::getFieldsToSerialize() noexcept
{
    return &mSerializedCollection;
}

MoePluginCreator::MoePluginCreator()
{
    for (char const* name : kIntFields)
    {
        mFields.emplace_back(name, nullptr, PluginFieldType::kINT32, 1);
    }
    mFields.emplace_back("activation", nullptr, PluginFieldType::kCHAR, 0);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* MoePluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MoePluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MoePluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

PluginFieldCollection const* MoePluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* MoePluginCreator::createPlugin(char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        return new MoePlugin(paramsFromFields(fc));
    }
    catch (std::exception const& e)
    {
        gLogger.error(e.what());
    }
    return nullptr;
}

} // namespace d2mc

// Entry points of a plugin library loaded dynamically (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins),
// which is also what lets TensorRT serialise the library into the engine (setPluginsToSerialize).
extern "C" D2MC_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static d2mc::MoePluginCreator sCreator;
    static IPluginCreatorInterface* const kCreators[] = {&sCreator};
    nbCreators = 1;
    return kCreators;
}

extern "C" D2MC_EXPORT void setLoggerFinder(ILoggerFinder* finder)
{
    d2mc::gLogger.set(finder);
}
