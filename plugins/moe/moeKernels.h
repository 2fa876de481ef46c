// CUDA kernels of the D2mcMoE TensorRT plugin: routing, per-token GEMV experts (decode) and grouped experts
// (prefill), with expert weights in the tensor type or as int4/int8 codes with block scales (dequantized as they
// are read). The math is pinned by tests/moe_reference.py; docs/tensorrt-plugin.md has the contract.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace d2mc
{

struct MoeShape
{
    int32_t tokens;       // T: rows of hidden (batch x sequence)
    int32_t hidden;       // H
    int32_t intermediate; // I
    int32_t numExperts;   // E: routed experts
    int32_t numShared;    // S: always-active experts, first in fc1/fc2
    int32_t topK;
    int32_t normalize; // 0: softmax probability; 1: renormalised over the top-k; 2: every chosen expert weight 1
    int32_t weightBits{0}; // 0: fc1/fc2 in the tensor type; 4 or 8: signed codes, w = code * scale
    int32_t blockSize{0};  // codes per scale along a row (a multiple of kBlockMultiple) when quantized
};

// The expert weights. Quantized (weightBits 4 or 8): fc1 [S+E, 2I, H * bits / 8] and fc2 [S+E, H, I * bits / 8]
// bytes of signed codes (int4: two per byte, the even column in the low nibble), fc1Scales [S+E, 2I, H / blockSize]
// and fc2Scales [S+E, H, I / blockSize] in the tensor type. Float: fc1 [S+E, 2I, H], fc2 [S+E, H, I], no scales.
struct MoeWeights
{
    void const* fc1;
    void const* fc2;
    void const* fc1Scales{nullptr};
    void const* fc2Scales{nullptr};
};

enum class MoeDataType : int32_t
{
    kFLOAT = 0,
    kHALF = 1
};

// Tokens at or below this count take the GEMV path (weights read once per token: the decode case); above it,
// tokens are grouped by expert so each expert's weights are read once per tile of tokens (the prefill case).
constexpr int32_t kGemvMaxTokens = 8;
constexpr int32_t kMaxExperts = 64;
constexpr int32_t kMaxTopK = 8;
// A block of codes is a whole number of 32-bit words (8 int4 or 4 int8 codes), which the GEMV path reads at once.
constexpr int32_t kBlockMultiple = 16;

// Bytes of scratch memory enqueueMoe needs for `shape` (TensorRT hands it over as the plugin workspace).
size_t moeWorkspaceSize(MoeShape const& shape, MoeDataType type);

// out[T, H] = sum_{s < S} expert_s(x) + sum_{j < k} w_j * expert_{S + idx_j}(x); 0 on success, else a CUDA error.
int32_t enqueueMoe(MoeShape const& shape, MoeDataType type, void const* hidden, void const* logits,
    MoeDataType logitsType, MoeWeights const& weights, void* out, void* workspace, cudaStream_t stream);

} // namespace d2mc
