// CUDA kernels of the D2mcMoE plugin (SM 8.0 and newer; built for Jetson Orin as sm_87).
//
// Rounding points match tests/moe_reference.py: routing in fp32; gate and up products accumulated in fp32,
// the SwiGLU activation stored in the tensor type; down products accumulated in fp32, weighted and summed in fp32,
// rounded once to the tensor type.
//
// Expert weights are read through an accessor: DenseWeights (the tensor type) or QuantWeights (int4/int8 signed
// codes, one scale per block of a row), which dequantizes each code as it is read: code * scale is exact in fp32, so
// quantized experts compute with exactly the weights the codes stand for and only the bytes read differ.
//
// Decode (T <= kGemvMaxTokens): one warp per output row. gateUpGemv reads each selected expert's gate and up rows
// once per token, downGemv reads each down row once per token and sums the token's experts in registers: the
// weights are streamed exactly once per token, which is what a memory-bound decode step costs.
// Prefill: tokens are grouped by expert (count, scan, scatter), then one tiled GEMM per expert group reads each
// expert's weights once per 32-token tile; combine adds the weighted expert rows back per token.
#include "moeKernels.h"

#include <cuda_fp16.h>
#include <math_constants.h>

namespace d2mc
{
namespace
{

constexpr int32_t kWarp = 32;
constexpr int32_t kThreads = 256;
constexpr int32_t kWarpsPerBlock = kThreads / kWarp;
constexpr int32_t kTileRows = 32;
constexpr int32_t kTileCols = 32;
constexpr int32_t kTileK = 32;
constexpr size_t kAlign = 256;

__device__ __forceinline__ float toFloat(float v)
{
    return v;
}
__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

// Weights in the tensor type, a [rows, k] matrix per call.
template <typename T>
struct DenseWeights
{
    T const* data;

    __device__ __forceinline__ float at(size_t row, int32_t col, int32_t k) const
    {
        return toFloat(data[row * k + col]);
    }

    // This lane's share of (row . x) and (row + 1 . x), reading x once.
    __device__ __forceinline__ float2 pairDot(size_t row, T const* x, int32_t k, int32_t lane) const
    {
        T const* first = data + row * k;
        T const* second = first + k;
        float2 acc = make_float2(0.0f, 0.0f);
        for (int32_t c = lane; c < k; c += kWarp)
        {
            float const xv = toFloat(x[c]);
            acc.x += xv * toFloat(first[c]);
            acc.y += xv * toFloat(second[c]);
        }
        return acc;
    }

    __device__ __forceinline__ float dot(size_t row, T const* x, int32_t k, int32_t lane) const
    {
        T const* w = data + row * k;
        float acc = 0.0f;
        for (int32_t c = lane; c < k; c += kWarp)
        {
            acc += toFloat(x[c]) * toFloat(w[c]);
        }
        return acc;
    }
};

// Symmetric block-quantized weights: Bits-bit signed codes packed along each row (int4: the even column in the low
// nibble), one scale (tensor type) per blockSize codes. k is a multiple of blockSize, itself a multiple of
// kBlockMultiple, so every row starts on a 32-bit word and every word of codes lies inside one block.
template <typename T, int32_t Bits>
struct QuantWeights
{
    static constexpr int32_t kPerWord = 32 / Bits;

    int8_t const* codes;
    T const* scales;
    int32_t blockSize;

    // Code j of a word, sign-extended: shift it to the top, then arithmetically back down.
    __device__ __forceinline__ static float code(uint32_t word, int32_t j)
    {
        return static_cast<float>(static_cast<int32_t>(word << (32 - Bits * (j + 1))) >> (32 - Bits));
    }

    __device__ __forceinline__ float at(size_t row, int32_t col, int32_t k) const
    {
        size_t const index = row * k + col;
        uint32_t const byte = static_cast<uint8_t>(codes[index * Bits / 8]);
        uint32_t const shift = Bits == 4 ? static_cast<uint32_t>(index & 1) * 4 : 0;
        return code(byte >> shift, 0) * toFloat(scales[row * (k / blockSize) + col / blockSize]);
    }

    __device__ __forceinline__ uint32_t const* words(size_t row, int32_t k) const
    {
        return reinterpret_cast<uint32_t const*>(codes + row * k / (8 / Bits));
    }

    // The lane takes whole words: kPerWord codes against kPerWord consecutive x values, scaled once per word.
    __device__ __forceinline__ float2 pairDot(size_t row, T const* x, int32_t k, int32_t lane) const
    {
        uint32_t const* first = words(row, k);
        uint32_t const* second = words(row + 1, k);
        T const* firstScales = scales + row * (k / blockSize);
        T const* secondScales = firstScales + k / blockSize;
        float2 acc = make_float2(0.0f, 0.0f);
        for (int32_t w = lane; w < k / kPerWord; w += kWarp)
        {
            uint32_t const a = first[w];
            uint32_t const b = second[w];
            int32_t const col = w * kPerWord;
            float partA = 0.0f;
            float partB = 0.0f;
#pragma unroll
            for (int32_t j = 0; j < kPerWord; ++j)
            {
                float const xv = toFloat(x[col + j]);
                partA += xv * code(a, j);
                partB += xv * code(b, j);
            }
            acc.x += partA * toFloat(firstScales[col / blockSize]);
            acc.y += partB * toFloat(secondScales[col / blockSize]);
        }
        return acc;
    }

    __device__ __forceinline__ float dot(size_t row, T const* x, int32_t k, int32_t lane) const
    {
        uint32_t const* w = words(row, k);
        T const* rowScales = scales + row * (k / blockSize);
        float acc = 0.0f;
        for (int32_t i = lane; i < k / kPerWord; i += kWarp)
        {
            uint32_t const word = w[i];
            int32_t const col = i * kPerWord;
            float part = 0.0f;
#pragma unroll
            for (int32_t j = 0; j < kPerWord; ++j)
            {
                part += toFloat(x[col + j]) * code(word, j);
            }
            acc += part * toFloat(rowScales[col / blockSize]);
        }
        return acc;
    }
};

__device__ __forceinline__ float silu(float v)
{
    return v / (1.0f + __expf(-v));
}

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int32_t offset = kWarp / 2; offset > 0; offset >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warpMax(float v)
{
#pragma unroll
    for (int32_t offset = kWarp / 2; offset > 0; offset >>= 1)
    {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// One warp per token: softmax over E <= 64 logits (two per lane), top-k by repeated warp argmax of the logits (a
// saturated softmax rounds probabilities to equal values; the lower index wins ties, like a stable sort), then the
// weights as `normalize` says (probability, renormalised, or 1).
template <typename L>
__global__ void routeKernel(L const* logits, MoeShape s, int32_t* topIdx, float* topW)
{
    int32_t const token = (blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
    int32_t const lane = threadIdx.x % kWarp;
    if (token >= s.tokens)
    {
        return;
    }
    L const* row = logits + static_cast<size_t>(token) * s.numExperts;
    float const v0 = lane < s.numExperts ? toFloat(row[lane]) : -CUDART_INF_F;
    float const v1 = lane + kWarp < s.numExperts ? toFloat(row[lane + kWarp]) : -CUDART_INF_F;
    float const m = warpMax(fmaxf(v0, v1));
    float const e0 = lane < s.numExperts ? __expf(v0 - m) : 0.0f;
    float const e1 = lane + kWarp < s.numExperts ? __expf(v1 - m) : 0.0f;
    float const sum = warpSum(e0 + e1);
    float const p0 = e0 / sum;
    float const p1 = e1 / sum;
    float l0 = v0; // the logits left to choose from; -inf: never picked
    float l1 = v1;

    float weights[kMaxTopK];
    int32_t indices[kMaxTopK];
    float picked = 0.0f;
#pragma unroll
    for (int32_t j = 0; j < kMaxTopK; ++j)
    {
        if (j < s.topK)
        {
            float best = l1 > l0 ? l1 : l0;
            float bestP = l1 > l0 ? p1 : p0;
            int32_t bestIdx = l1 > l0 ? lane + kWarp : lane;
#pragma unroll
            for (int32_t offset = kWarp / 2; offset > 0; offset >>= 1)
            {
                float const other = __shfl_xor_sync(0xffffffffu, best, offset);
                float const otherP = __shfl_xor_sync(0xffffffffu, bestP, offset);
                int32_t const otherIdx = __shfl_xor_sync(0xffffffffu, bestIdx, offset);
                if (other > best || (other == best && otherIdx < bestIdx))
                {
                    best = other;
                    bestP = otherP;
                    bestIdx = otherIdx;
                }
            }
            weights[j] = bestP;
            indices[j] = bestIdx;
            picked += bestP;
            if (bestIdx == lane)
            {
                l0 = -CUDART_INF_F;
            }
            if (bestIdx == lane + kWarp)
            {
                l1 = -CUDART_INF_F;
            }
        }
    }
    if (lane == 0)
    {
#pragma unroll
        for (int32_t j = 0; j < kMaxTopK; ++j)
        {
            if (j < s.topK)
            {
                topIdx[token * s.topK + j] = indices[j];
                topW[token * s.topK + j]
                    = s.normalize == 2 ? 1.0f : (s.normalize == 1 ? weights[j] / picked : weights[j]);
            }
        }
    }
}

__device__ __forceinline__ int32_t slotExpert(MoeShape const& s, int32_t const* topIdx, int32_t token, int32_t slot)
{
    return slot < s.numShared ? slot : s.numShared + topIdx[token * s.topK + slot - s.numShared];
}

// Decode: act[token, slot, i] = silu(x . gate_i) * (x . up_i) for each of the token's S + k experts.
template <typename T, typename W>
__global__ void gateUpGemv(T const* x, W fc1, int32_t const* topIdx, MoeShape s, T* act)
{
    int32_t const slots = s.numShared + s.topK;
    int32_t const pair = blockIdx.y; // token * slots + slot
    int32_t const token = pair / slots;
    int32_t const expert = slotExpert(s, topIdx, token, pair % slots);
    int32_t const i = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
    int32_t const lane = threadIdx.x % kWarp;
    if (i >= s.intermediate)
    {
        return;
    }
    // interleaved: row 2i gate_i, row 2i+1 up_i
    size_t const gateRow = static_cast<size_t>(expert) * 2 * s.intermediate + 2 * i;
    float2 const dots = fc1.pairDot(gateRow, x + static_cast<size_t>(token) * s.hidden, s.hidden, lane);
    float const g = warpSum(dots.x);
    float const u = warpSum(dots.y);
    if (lane == 0)
    {
        act[static_cast<size_t>(pair) * s.intermediate + i] = fromFloat<T>(silu(g) * u);
    }
}

// Decode: out[token, h] = sum over the token's experts of weight * (act . down_h).
template <typename T, typename W>
__global__ void downGemv(T const* act, W fc2, int32_t const* topIdx, float const* topW, MoeShape s, T* out)
{
    int32_t const slots = s.numShared + s.topK;
    int32_t const token = blockIdx.y;
    int32_t const h = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
    int32_t const lane = threadIdx.x % kWarp;
    if (h >= s.hidden)
    {
        return;
    }
    float acc = 0.0f;
    for (int32_t slot = 0; slot < slots; ++slot)
    {
        int32_t const expert = slotExpert(s, topIdx, token, slot);
        float const weight = slot < s.numShared ? 1.0f : topW[token * s.topK + slot - s.numShared];
        T const* a = act + (static_cast<size_t>(token) * slots + slot) * s.intermediate;
        size_t const row = static_cast<size_t>(expert) * s.hidden + h;
        acc += weight * warpSum(fc2.dot(row, a, s.intermediate, lane));
    }
    if (lane == 0)
    {
        out[static_cast<size_t>(token) * s.hidden + h] = fromFloat<T>(acc);
    }
}

__global__ void countKernel(int32_t const* topIdx, int32_t assignments, int32_t* counts)
{
    int32_t const a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a < assignments)
    {
        atomicAdd(&counts[topIdx[a]], 1);
    }
}

// E <= 64: one thread is enough and keeps the offsets exact.
__global__ void scanKernel(int32_t const* counts, int32_t experts, int32_t* offsets, int32_t* cursor)
{
    if (threadIdx.x == 0 && blockIdx.x == 0)
    {
        offsets[0] = 0;
        for (int32_t e = 0; e < experts; ++e)
        {
            offsets[e + 1] = offsets[e] + counts[e];
            cursor[e] = 0;
        }
    }
}

// Each (token, slot) assignment gets a row in its expert's group; posOf remembers where, for combine.
__global__ void scatterKernel(int32_t const* topIdx, int32_t assignments, int32_t topK, int32_t const* offsets,
    int32_t* cursor, int32_t* permToken, int32_t* posOf)
{
    int32_t const a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a < assignments)
    {
        int32_t const e = topIdx[a];
        int32_t const pos = offsets[e] + atomicAdd(&cursor[e], 1);
        permToken[pos] = a / topK;
        posOf[a] = pos;
    }
}

// Group g < S: shared expert g over all tokens (rows S*0.. in act); g >= S: routed expert g - S over its tokens.
struct Group
{
    int32_t rows;
    int32_t base; // first row in act / y
    int32_t expert;
    int32_t const* tokens; // nullptr: row r is token r
};

__device__ __forceinline__ Group groupOf(MoeShape const& s, int32_t g, int32_t const* counts, int32_t const* offsets,
    int32_t const* permToken)
{
    if (g < s.numShared)
    {
        return Group{s.tokens, g * s.tokens, g, nullptr};
    }
    int32_t const e = g - s.numShared;
    return Group{counts[e], s.numShared * s.tokens + offsets[e], g, permToken + offsets[e]};
}

// Prefill: act[base + r, i] = silu(x_r . gate_i) * (x_r . up_i), a 32-row x 32-column tile per block.
template <typename T, typename W>
__global__ void groupedGateUp(T const* x, W fc1, int32_t const* counts, int32_t const* offsets,
    int32_t const* permToken, MoeShape s, T* act)
{
    Group const grp = groupOf(s, blockIdx.z, counts, offsets, permToken);
    int32_t const row0 = blockIdx.y * kTileRows;
    if (row0 >= grp.rows)
    {
        return;
    }
    int32_t const col0 = blockIdx.x * kTileCols;
    __shared__ float tileX[kTileRows][kTileK + 1];
    __shared__ float tileW[2 * kTileCols][kTileK + 1];
    int32_t const tx = threadIdx.x % kWarp;
    int32_t const ty = threadIdx.x / kWarp; // rows ty*4 .. ty*4+3
    float g[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float u[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    size_t const firstRow = static_cast<size_t>(grp.expert) * 2 * s.intermediate;
    for (int32_t k0 = 0; k0 < s.hidden; k0 += kTileK)
    {
        for (int32_t id = threadIdx.x; id < kTileRows * kTileK; id += kThreads)
        {
            int32_t const r = id / kTileK;
            int32_t const c = id % kTileK;
            int32_t const row = row0 + r;
            float v = 0.0f;
            if (row < grp.rows && k0 + c < s.hidden)
            {
                int32_t const token = grp.tokens ? grp.tokens[row] : row;
                v = toFloat(x[static_cast<size_t>(token) * s.hidden + k0 + c]);
            }
            tileX[r][c] = v;
        }
        for (int32_t id = threadIdx.x; id < 2 * kTileCols * kTileK; id += kThreads)
        {
            int32_t const n = id / kTileK;
            int32_t const c = id % kTileK;
            int32_t const fcRow = 2 * col0 + n;
            tileW[n][c] = (fcRow < 2 * s.intermediate && k0 + c < s.hidden) ? fc1.at(firstRow + fcRow, k0 + c, s.hidden)
                                                                           : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int32_t c = 0; c < kTileK; ++c)
        {
            float const gw = tileW[2 * tx][c];
            float const uw = tileW[2 * tx + 1][c];
#pragma unroll
            for (int32_t q = 0; q < 4; ++q)
            {
                float const xv = tileX[ty * 4 + q][c];
                g[q] += xv * gw;
                u[q] += xv * uw;
            }
        }
        __syncthreads();
    }
    int32_t const i = col0 + tx;
    if (i < s.intermediate)
    {
#pragma unroll
        for (int32_t q = 0; q < 4; ++q)
        {
            int32_t const row = row0 + ty * 4 + q;
            if (row < grp.rows)
            {
                act[static_cast<size_t>(grp.base + row) * s.intermediate + i] = fromFloat<T>(silu(g[q]) * u[q]);
            }
        }
    }
}

// Prefill: y[base + r, h] = act[base + r] . down_h (fp32, unweighted), a 32 x 32 tile per block.
template <typename T, typename W>
__global__ void groupedDown(T const* act, W fc2, int32_t const* counts, int32_t const* offsets,
    int32_t const* permToken, MoeShape s, float* y)
{
    Group const grp = groupOf(s, blockIdx.z, counts, offsets, permToken);
    int32_t const row0 = blockIdx.y * kTileRows;
    if (row0 >= grp.rows)
    {
        return;
    }
    int32_t const col0 = blockIdx.x * kTileCols;
    __shared__ float tileA[kTileRows][kTileK + 1];
    __shared__ float tileW[kTileCols][kTileK + 1];
    int32_t const tx = threadIdx.x % kWarp;
    int32_t const ty = threadIdx.x / kWarp;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    size_t const firstRow = static_cast<size_t>(grp.expert) * s.hidden;
    for (int32_t k0 = 0; k0 < s.intermediate; k0 += kTileK)
    {
        for (int32_t id = threadIdx.x; id < kTileRows * kTileK; id += kThreads)
        {
            int32_t const r = id / kTileK;
            int32_t const c = id % kTileK;
            tileA[r][c] = (row0 + r < grp.rows && k0 + c < s.intermediate)
                ? toFloat(act[static_cast<size_t>(grp.base + row0 + r) * s.intermediate + k0 + c])
                : 0.0f;
        }
        for (int32_t id = threadIdx.x; id < kTileCols * kTileK; id += kThreads)
        {
            int32_t const n = id / kTileK;
            int32_t const c = id % kTileK;
            tileW[n][c] = (col0 + n < s.hidden && k0 + c < s.intermediate)
                ? fc2.at(firstRow + col0 + n, k0 + c, s.intermediate)
                : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int32_t c = 0; c < kTileK; ++c)
        {
            float const w = tileW[tx][c];
#pragma unroll
            for (int32_t q = 0; q < 4; ++q)
            {
                acc[q] += tileA[ty * 4 + q][c] * w;
            }
        }
        __syncthreads();
    }
    int32_t const h = col0 + tx;
    if (h < s.hidden)
    {
#pragma unroll
        for (int32_t q = 0; q < 4; ++q)
        {
            int32_t const row = row0 + ty * 4 + q;
            if (row < grp.rows)
            {
                y[static_cast<size_t>(grp.base + row) * s.hidden + h] = acc[q];
            }
        }
    }
}

// Prefill: out[t, h] = sum_shared y + sum_j w_j * y[row of assignment (t, j)], one rounding.
template <typename T>
__global__ void combineKernel(
    float const* y, float const* topW, int32_t const* posOf, MoeShape s, T* out)
{
    size_t const idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= static_cast<size_t>(s.tokens) * s.hidden)
    {
        return;
    }
    int32_t const t = static_cast<int32_t>(idx / s.hidden);
    int32_t const h = static_cast<int32_t>(idx % s.hidden);
    float acc = 0.0f;
    for (int32_t sh = 0; sh < s.numShared; ++sh)
    {
        acc += y[(static_cast<size_t>(sh) * s.tokens + t) * s.hidden + h];
    }
    for (int32_t j = 0; j < s.topK; ++j)
    {
        int32_t const a = t * s.topK + j;
        acc += topW[a] * y[(static_cast<size_t>(s.numShared) * s.tokens + posOf[a]) * s.hidden + h];
    }
    out[idx] = fromFloat<T>(acc);
}

size_t aligned(size_t bytes)
{
    return (bytes + kAlign - 1) / kAlign * kAlign;
}

// The workspace, carved in a fixed order; sizes are those of the grouped path, which needs the most.
struct Workspace
{
    int32_t* topIdx;
    float* topW;
    int32_t* counts;
    int32_t* offsets;
    int32_t* cursor;
    int32_t* permToken;
    int32_t* posOf;
    void* act;
    float* y;
    size_t bytes;

    Workspace(MoeShape const& s, size_t elementSize, void* base)
    {
        size_t const assignments = static_cast<size_t>(s.tokens) * s.topK;
        size_t const rows = static_cast<size_t>(s.tokens) * (s.numShared + s.topK);
        char* p = static_cast<char*>(base);
        size_t offset = 0;
        auto take = [&](size_t n) {
            char* at = p ? p + offset : nullptr;
            offset += aligned(n);
            return at;
        };
        topIdx = reinterpret_cast<int32_t*>(take(assignments * sizeof(int32_t)));
        topW = reinterpret_cast<float*>(take(assignments * sizeof(float)));
        counts = reinterpret_cast<int32_t*>(take(kMaxExperts * sizeof(int32_t)));
        offsets = reinterpret_cast<int32_t*>(take((kMaxExperts + 1) * sizeof(int32_t)));
        cursor = reinterpret_cast<int32_t*>(take(kMaxExperts * sizeof(int32_t)));
        permToken = reinterpret_cast<int32_t*>(take(assignments * sizeof(int32_t)));
        posOf = reinterpret_cast<int32_t*>(take(assignments * sizeof(int32_t)));
        act = take(rows * s.intermediate * elementSize);
        y = reinterpret_cast<float*>(take(rows * s.hidden * sizeof(float)));
        bytes = offset;
    }
};

size_t elementSize(MoeDataType type)
{
    return type == MoeDataType::kHALF ? sizeof(__half) : sizeof(float);
}

int32_t ceilDiv(int32_t a, int32_t b)
{
    return (a + b - 1) / b;
}

template <typename T, typename W>
int32_t runExperts(MoeShape const& s, T const* x, W fc1, W fc2, T* out, Workspace const& ws, cudaStream_t stream)
{
    T* act = static_cast<T*>(ws.act);
    if (s.tokens <= kGemvMaxTokens)
    {
        dim3 const gateGrid(ceilDiv(s.intermediate, kWarpsPerBlock), s.tokens * (s.numShared + s.topK));
        gateUpGemv<T, W><<<gateGrid, kThreads, 0, stream>>>(x, fc1, ws.topIdx, s, act);
        dim3 const downGrid(ceilDiv(s.hidden, kWarpsPerBlock), s.tokens);
        downGemv<T, W><<<downGrid, kThreads, 0, stream>>>(act, fc2, ws.topIdx, ws.topW, s, out);
        return static_cast<int32_t>(cudaGetLastError());
    }
    int32_t const assignments = s.tokens * s.topK;
    cudaMemsetAsync(ws.counts, 0, s.numExperts * sizeof(int32_t), stream);
    countKernel<<<ceilDiv(assignments, kThreads), kThreads, 0, stream>>>(ws.topIdx, assignments, ws.counts);
    scanKernel<<<1, 1, 0, stream>>>(ws.counts, s.numExperts, ws.offsets, ws.cursor);
    scatterKernel<<<ceilDiv(assignments, kThreads), kThreads, 0, stream>>>(
        ws.topIdx, assignments, s.topK, ws.offsets, ws.cursor, ws.permToken, ws.posOf);
    int32_t const groups = s.numShared + s.numExperts;
    dim3 const gateGrid(ceilDiv(s.intermediate, kTileCols), ceilDiv(s.tokens, kTileRows), groups);
    groupedGateUp<T, W><<<gateGrid, kThreads, 0, stream>>>(x, fc1, ws.counts, ws.offsets, ws.permToken, s, act);
    dim3 const downGrid(ceilDiv(s.hidden, kTileCols), ceilDiv(s.tokens, kTileRows), groups);
    groupedDown<T, W><<<downGrid, kThreads, 0, stream>>>(act, fc2, ws.counts, ws.offsets, ws.permToken, s, ws.y);
    size_t const outputs = static_cast<size_t>(s.tokens) * s.hidden;
    combineKernel<T><<<static_cast<uint32_t>((outputs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        ws.y, ws.topW, ws.posOf, s, out);
    return static_cast<int32_t>(cudaGetLastError());
}

// The experts with the weight accessor the shape's weightBits asks for.
template <typename T>
int32_t runWithWeights(MoeShape const& s, T const* x, MoeWeights const& w, T* out, Workspace const& ws,
    cudaStream_t stream)
{
    switch (s.weightBits)
    {
    case 0:
        return runExperts(s, x, DenseWeights<T>{static_cast<T const*>(w.fc1)},
            DenseWeights<T>{static_cast<T const*>(w.fc2)}, out, ws, stream);
    case 4:
        return runExperts(s, x,
            QuantWeights<T, 4>{static_cast<int8_t const*>(w.fc1), static_cast<T const*>(w.fc1Scales), s.blockSize},
            QuantWeights<T, 4>{static_cast<int8_t const*>(w.fc2), static_cast<T const*>(w.fc2Scales), s.blockSize},
            out, ws, stream);
    case 8:
        return runExperts(s, x,
            QuantWeights<T, 8>{static_cast<int8_t const*>(w.fc1), static_cast<T const*>(w.fc1Scales), s.blockSize},
            QuantWeights<T, 8>{static_cast<int8_t const*>(w.fc2), static_cast<T const*>(w.fc2Scales), s.blockSize},
            out, ws, stream);
    default: return static_cast<int32_t>(cudaErrorInvalidValue);
    }
}

bool validWeights(MoeShape const& s, MoeWeights const& w)
{
    if (s.weightBits == 0)
    {
        return s.blockSize == 0;
    }
    return (s.weightBits == 4 || s.weightBits == 8) && s.blockSize >= kBlockMultiple && s.blockSize % kBlockMultiple == 0
        && s.hidden % s.blockSize == 0 && s.intermediate % s.blockSize == 0 && w.fc1Scales != nullptr
        && w.fc2Scales != nullptr;
}

} // namespace

size_t moeWorkspaceSize(MoeShape const& shape, MoeDataType type)
{
    return Workspace(shape, elementSize(type), nullptr).bytes;
}

int32_t enqueueMoe(MoeShape const& shape, MoeDataType type, void const* hidden, void const* logits,
    MoeDataType logitsType, MoeWeights const& weights, void* out, void* workspace, cudaStream_t stream)
{
    if (shape.tokens == 0)
    {
        return 0;
    }
    if (shape.numExperts < 1 || shape.numExperts > kMaxExperts || shape.topK < 1 || shape.topK > kMaxTopK
        || shape.topK > shape.numExperts || !validWeights(shape, weights))
    {
        return static_cast<int32_t>(cudaErrorInvalidValue);
    }
    Workspace const ws(shape, elementSize(type), workspace);
    int32_t const routeBlocks = ceilDiv(shape.tokens * kWarp, kThreads);
    if (logitsType == MoeDataType::kHALF)
    {
        routeKernel<__half>
            <<<routeBlocks, kThreads, 0, stream>>>(static_cast<__half const*>(logits), shape, ws.topIdx, ws.topW);
    }
    else
    {
        routeKernel<float>
            <<<routeBlocks, kThreads, 0, stream>>>(static_cast<float const*>(logits), shape, ws.topIdx, ws.topW);
    }
    if (type == MoeDataType::kHALF)
    {
        return runWithWeights(
            shape, static_cast<__half const*>(hidden), weights, static_cast<__half*>(out), ws, stream);
    }
    return runWithWeights(shape, static_cast<float const*>(hidden), weights, static_cast<float*>(out), ws, stream);
}

} // namespace d2mc
