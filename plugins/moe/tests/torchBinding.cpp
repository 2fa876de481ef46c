// The plugin's kernels called from PyTorch, so any CUDA machine (with or without TensorRT) can test them against
// tests/moe_reference.py: tests/targets/test_tensorrt.py builds this with torch.utils.cpp_extension.
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include "moeKernels.h"

namespace
{
d2mc::MoeDataType typeOf(torch::Tensor const& t)
{
    TORCH_CHECK(t.scalar_type() == torch::kHalf || t.scalar_type() == torch::kFloat, "fp16 or fp32 tensors only");
    return t.scalar_type() == torch::kHalf ? d2mc::MoeDataType::kHALF : d2mc::MoeDataType::kFLOAT;
}
} // namespace

// fc1/fc2 in hidden's type (weightBits 0), or int8-typed codes with scales in hidden's type (weightBits 4 or 8).
torch::Tensor run(torch::Tensor hidden, torch::Tensor logits, torch::Tensor fc1, torch::Tensor fc2,
    torch::Tensor fc1Scales, torch::Tensor fc2Scales, int64_t numExperts, int64_t numShared, int64_t topK,
    int64_t normalize, int64_t weightBits, int64_t blockSize)
{
    TORCH_CHECK(hidden.is_cuda() && logits.is_cuda() && fc1.is_cuda() && fc2.is_cuda(), "CUDA tensors only");
    auto x = hidden.contiguous();
    auto l = logits.contiguous();
    auto w1 = fc1.contiguous();
    auto w2 = fc2.contiguous();
    auto s1 = fc1Scales.contiguous();
    auto s2 = fc2Scales.contiguous();
    int64_t const hiddenSize = x.size(-1);
    d2mc::MoeShape const shape{static_cast<int32_t>(x.numel() / hiddenSize), static_cast<int32_t>(hiddenSize),
        static_cast<int32_t>(w1.size(1) / 2), static_cast<int32_t>(numExperts), static_cast<int32_t>(numShared),
        static_cast<int32_t>(topK), static_cast<int32_t>(normalize), static_cast<int32_t>(weightBits),
        static_cast<int32_t>(blockSize)};
    bool const quantized = weightBits != 0;
    TORCH_CHECK(!quantized || (w1.scalar_type() == torch::kInt8 && s1.is_cuda() && s2.is_cuda()),
        "quantized weights: int8 codes and CUDA scales");
    d2mc::MoeWeights const weights{
        w1.data_ptr(), w2.data_ptr(), quantized ? s1.data_ptr() : nullptr, quantized ? s2.data_ptr() : nullptr};
    auto const type = typeOf(x);
    auto workspace = torch::empty(
        {static_cast<int64_t>(d2mc::moeWorkspaceSize(shape, type))}, x.options().dtype(torch::kUInt8));
    auto out = torch::empty_like(x);
    int32_t const status = d2mc::enqueueMoe(shape, type, x.data_ptr(), l.data_ptr(), typeOf(l), weights,
        out.data_ptr(), workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == 0, "D2mcMoE kernels failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
    return out;
}

torch::Tensor moe(torch::Tensor hidden, torch::Tensor logits, torch::Tensor fc1, torch::Tensor fc2, int64_t numExperts,
    int64_t numShared, int64_t topK, int64_t normalize)
{
    return run(hidden, logits, fc1, fc2, fc1, fc2, numExperts, numShared, topK, normalize, 0, 0);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("moe", &moe, "D2mcMoE kernels: hidden, router_logits, fc1, fc2, num_experts, num_shared, top_k, normalize");
    m.def("moe_quantized", &run,
        "D2mcMoE kernels with quantized experts: hidden, router_logits, fc1, fc2 (int8 codes), fc1_scales, "
        "fc2_scales, num_experts, num_shared, top_k, normalize, weight_bits, block_size");
}
