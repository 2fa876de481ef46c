// D2mcMoE: a TensorRT IPluginV3 running one Dense2MoE block's experts (routing + SwiGLU experts) on SM 8.0+,
// in particular Jetson Orin (SM 8.7), where TensorRT's own MoE layer does not run.
// Contract (ONNX node, attributes, inputs): docs/tensorrt-plugin.md and d2mc/ops/moe.py.
#pragma once

#include "NvInfer.h"
#include "NvInferRuntime.h"
#include "moeKernels.h"

#include <string>
#include <vector>

namespace d2mc
{

constexpr char const* kPluginName{"D2mcMoE"};
constexpr char const* kPluginVersion{"1"};
constexpr char const* kPluginNamespace{"d2mc"};

struct MoeParams
{
    int32_t numExperts{0};
    int32_t numShared{0};
    int32_t topK{1};
    int32_t hiddenSize{0};
    int32_t intermediateSize{0};
    int32_t normalize{1};
    int32_t weightBits{0}; // 0: fc1/fc2 in the hidden state's type; 4 or 8: int8-typed codes plus two scale inputs
    int32_t blockSize{0};
    std::string activation{"swiglu"};

    // Empty when valid, else what is wrong (reported through the TensorRT logger).
    std::string validate() const;
    // hidden, router_logits, fc1, fc2 (and fc1_scales, fc2_scales when the weights are quantized)
    int32_t nbInputs() const noexcept
    {
        return weightBits == 0 ? 4 : 6;
    }
};

// Reads the creator's fields (as the ONNX parser or deserialisation passes them); throws on a bad field.
MoeParams paramsFromFields(nvinfer1::PluginFieldCollection const* fc);

class MoePlugin : public nvinfer1::IPluginV3,
                  public nvinfer1::IPluginV3OneCore,
                  public nvinfer1::IPluginV3OneBuild,
                  public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit MoePlugin(MoeParams params);
    MoePlugin(MoePlugin const& other);
    ~MoePlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    MoeParams const& params() const noexcept
    {
        return mParams;
    }
    // The kernels' view of a call with `tokens` rows.
    MoeShape shapeFor(int32_t tokens) const noexcept;

private:
    void buildSerializedFields();

    MoeParams mParams;
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

class MoePluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    MoePluginCreator();
    ~MoePluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

// Tokens of a hidden-state tensor: the product of every dimension but the last (H).
int64_t tokensOf(nvinfer1::Dims const& dims) noexcept;

} // namespace d2mc
