// CUDA kernels of relora's fused ops (f32), compiled at run time with NVRTC by src/ops/cuda.rs.
// Each mirrors the CPU kernel of the op's Rust file: same formulas, same order of the
// element-wise arithmetic, so CPU and GPU differ only in the order of the row reductions.
// No headers: NVRTC provides expf, sqrtf, fmaxf and the warp intrinsics built in.

#define WARP 32

// Sum of `v` over the block; every thread gets the total. `sh` holds 32 floats. The block size
// is a multiple of 32. The leading barrier lets a block call this twice in a row safely.
__device__ float block_sum(float v, float* sh) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & (WARP - 1)) == 0) sh[threadIdx.x / WARP] = v;
    __syncthreads();
    int lane = threadIdx.x & (WARP - 1);
    float t = lane < (int)(blockDim.x / WARP) ? sh[lane] : 0.0f;
    for (int o = WARP / 2; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// Maximum of `v` over the block, as block_sum.
__device__ float block_max(float v, float* sh) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & (WARP - 1)) == 0) sh[threadIdx.x / WARP] = v;
    __syncthreads();
    int lane = threadIdx.x & (WARP - 1);
    float t = lane < (int)(blockDim.x / WARP) ? sh[lane] : __int_as_float(0xff800000);
    for (int o = WARP / 2; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}

#define GRID_STRIDE(i, n)                                                                     \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;   \
         i < (n); i += (unsigned long long)blockDim.x * gridDim.x)

// y = silu(g) * u over n elements.
extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* y,
                                      unsigned long long n) {
    GRID_STRIDE(i, n) {
        float a = g[i];
        y[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

// out[0..n] = dg, out[n..2n] = du.
extern "C" __global__ void swiglu_bwd(const float* g, const float* u, const float* dy,
                                      float* out, unsigned long long n) {
    GRID_STRIDE(i, n) {
        float a = g[i], d = dy[i];
        float s = 1.0f / (1.0f + expf(-a));
        out[n + i] = d * a * s;
        out[i] = d * u[i] * s * (1.0f + a * (1.0f - s));
    }
}

// y[i] += s * u[i]: the scaled low-rank path added to the frozen projection.
extern "C" __global__ void add_scaled(float* y, const float* u, float s, unsigned long long n) {
    GRID_STRIDE(i, n) { y[i] += s * u[i]; }
}

// One block a row of x [rows, h]: y = x * r * w with r = 1 / sqrt(mean(x^2) + eps).
extern "C" __global__ void rms_fwd(const float* x, const float* w, float* y, int h, float eps) {
    __shared__ float sh[WARP];
    const float* xr = x + (unsigned long long)blockIdx.x * h;
    float* yr = y + (unsigned long long)blockIdx.x * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss, sh);
    float r = 1.0f / sqrtf(ss / (float)h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) yr[j] = xr[j] * r * w[j];
}

// Each block walks rows blockIdx.x, blockIdx.x + gridDim.x, ...: writes dx for them and adds
// their dw terms into its own row of `partial` [gridDim.x, h]; col_sum then reduces `partial`.
extern "C" __global__ void rms_bwd(const float* x, const float* w, const float* dy, float* dx,
                                   float* partial, int rows, int h, float eps) {
    __shared__ float sh[WARP];
    float* pr = partial + (unsigned long long)blockIdx.x * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) pr[j] = 0.0f;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + (unsigned long long)row * h;
        const float* dr = dy + (unsigned long long)row * h;
        float* dxr = dx + (unsigned long long)row * h;
        float ss = 0.0f, dot = 0.0f;
        for (int j = threadIdx.x; j < h; j += blockDim.x) {
            ss += xr[j] * xr[j];
            dot += dr[j] * w[j] * xr[j];
        }
        ss = block_sum(ss, sh);
        dot = block_sum(dot, sh);
        float r = 1.0f / sqrtf(ss / (float)h + eps);
        float c = r * r * r * dot / (float)h;
        for (int j = threadIdx.x; j < h; j += blockDim.x) {
            dxr[j] = r * dr[j] * w[j] - xr[j] * c;
            pr[j] += dr[j] * xr[j] * r;
        }
    }
}

// out[j] = sum over rows of m[row, j], m [rows, h].
extern "C" __global__ void col_sum(const float* m, float* out, int rows, int h) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= h) return;
    float s = 0.0f;
    for (int i = 0; i < rows; i++) s += m[(unsigned long long)i * h + j];
    out[j] = s;
}

// One block a row of the scores [.., t, t]; the row's query position is row % t and keys
// 0..=i are visible: y = softmax(scale * x) there, 0 above the diagonal.
extern "C" __global__ void causal_softmax_fwd(const float* x, float* y, int t, float scale) {
    __shared__ float sh[WARP];
    unsigned long long row = blockIdx.x;
    int i = (int)(row % (unsigned long long)t);
    const float* xr = x + row * t;
    float* yr = y + row * t;
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, xr[j] * scale);
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) s += expf(xr[j] * scale - m);
    s = block_sum(s, sh);
    float inv = 1.0f / s;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        yr[j] = j <= i ? expf(xr[j] * scale - m) * inv : 0.0f;
}

// dx = scale * y * (dy - sum_j(y dy)) a row.
extern "C" __global__ void causal_softmax_bwd(const float* y, const float* dy, float* dx, int t,
                                              float scale) {
    __shared__ float sh[WARP];
    unsigned long long row = blockIdx.x;
    const float* yr = y + row * t;
    const float* dr = dy + row * t;
    float* dxr = dx + row * t;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x) dot += yr[j] * dr[j];
    dot = block_sum(dot, sh);
    for (int j = threadIdx.x; j < t; j += blockDim.x) dxr[j] = scale * yr[j] * (dr[j] - dot);
}

// AdamW's arithmetic, shared by the per-tensor and the grouped kernels so that both round
// alike: the new moments from the (already scaled) gradient, and the parameter update
// p = p d - k m / (sqrt(v) inv + eps).
__device__ __forceinline__ float adamw_m(float m, float g, float b1, float b1c) {
    return m * b1 + g * b1c;
}
__device__ __forceinline__ float adamw_v(float v, float g, float b2, float b2c) {
    return v * b2 + (g * g) * b2c;
}
__device__ __forceinline__ float adamw_p(float p, float m, float v, float inv, float eps, float k,
                                         float d) {
    float u = (m / (sqrtf(v) * inv + eps)) * k;
    return p * d - u;
}

// AdamW's new moments into out [2, n]: m' then v', from the gradient times `gs` (clipping's
// coefficient). The old moments are only read.
extern "C" __global__ void adamw_moments(const float* g, const float* m, const float* v,
                                         float* out, float gs, float b1, float b1c, float b2,
                                         float b2c, unsigned long long n) {
    GRID_STRIDE(i, n) {
        float gi = g[i] * gs;
        out[i] = adamw_m(m[i], gi, b1, b1c);
        out[n + i] = adamw_v(v[i], gi, b2, b2c);
    }
}

// AdamW's parameter update in place.
extern "C" __global__ void adamw_apply(float* p, const float* m, const float* v, float inv,
                                       float eps, float k, float d, unsigned long long n) {
    GRID_STRIDE(i, n) { p[i] = adamw_p(p[i], m[i], v[i], inv, eps, k, d); }
}

// One tensor of a grouped AdamW update; the layout of `GroupEntry` in adamw_group.rs.
struct AdamWGroupEntry {
    float* p;
    const float* g;
    float* m;
    float* v;
    unsigned long long n;
    float step_size;  // lr / (1 - b1^t)
    float inv_bc2;    // 1 / sqrt(1 - b2^t)
    float decay;      // 1 - lr wd, or 1
    float pad;
};

// AdamW over many tensors in one launch, in one pass: blockIdx.y picks the tensor, the blocks
// along x stride over its elements (GRID_STRIDE reads only the x dimension). Moments and parameter are updated in place (the caller
// checked that no two written ranges overlap).
extern "C" __global__ void adamw_group(const AdamWGroupEntry* entries, float gs, float b1,
                                       float b1c, float b2, float b2c, float eps) {
    const AdamWGroupEntry e = entries[blockIdx.y];
    GRID_STRIDE(i, e.n) {
        float gi = e.g[i] * gs;
        float m = adamw_m(e.m[i], gi, b1, b1c);
        float v = adamw_v(e.v[i], gi, b2, b2c);
        e.m[i] = m;
        e.v[i] = v;
        e.p[i] = adamw_p(e.p[i], m, v, e.inv_bc2, eps, e.step_size, e.decay);
    }
}

// Sum of double values over the block, as block_sum. `sh` holds 32 doubles.
__device__ double block_sum_f64(double v, double* sh) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & (WARP - 1)) == 0) sh[threadIdx.x / WARP] = v;
    __syncthreads();
    int lane = threadIdx.x & (WARP - 1);
    double t = lane < (int)(blockDim.x / WARP) ? sh[lane] : 0.0;
    for (int o = WARP / 2; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// One tensor of a grouped sum of squares; the layout of `SquaresEntry` in sum_squares.rs.
struct SquaresEntry {
    const float* x;
    unsigned long long n;
};

// The sums of squares of many tensors in one launch: blockIdx.y picks the tensor, and
// partials[blockIdx.y * gridDim.x + blockIdx.x] = this block's grid-stride share of it. The
// grid is fixed by the caller, so the result does not depend on scheduling.
extern "C" __global__ void sum_squares_group(const SquaresEntry* entries, double* partials) {
    __shared__ double sh[WARP];
    const SquaresEntry e = entries[blockIdx.y];
    double s = 0.0;
    GRID_STRIDE(i, e.n) {
        double v = (double)e.x[i];
        s += v * v;
    }
    s = block_sum_f64(s, sh);
    if (threadIdx.x == 0) partials[(unsigned long long)blockIdx.y * gridDim.x + blockIdx.x] = s;
}

// out[0] = sum of partials [n], by one block in a fixed order.
extern "C" __global__ void sum_f64(const double* partials, unsigned long long n, double* out) {
    __shared__ double sh[WARP];
    double s = 0.0;
    for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
    s = block_sum_f64(s, sh);
    if (threadIdx.x == 0) out[0] = s;
}

// bf16 (its bits in an unsigned short) widened to f32: exact.
__device__ float bf16_to_f32(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }

// Rotary embedding of x [rows, d] (row at position row % t), one thread per pair (j, j + d/2):
// forward y = x cos + rot(x) sin; inverse (the backward) rotates by the opposite angle.
extern "C" __global__ void rotary(const float* x, const float* cs, const float* sn, float* y,
                                  int t, int d, int inverse, unsigned long long pairs) {
    int h = d / 2;
    GRID_STRIDE(i, pairs) {
        unsigned long long row = i / h;
        int j = (int)(i % h);
        int p = (int)(row % (unsigned long long)t);
        const float* xr = x + row * d;
        float* yr = y + row * d;
        const float* c = cs + (unsigned long long)p * d;
        const float* s = sn + (unsigned long long)p * d;
        float a = xr[j], b = xr[j + h];
        if (inverse) {
            yr[j] = a * c[j] + b * s[j + h];
            yr[j + h] = b * c[j + h] - a * s[j];
        } else {
            yr[j] = a * c[j] - b * s[j];
            yr[j + h] = b * c[j + h] + a * s[j + h];
        }
    }
}

// f32 rounded to the nearest bf16 (ties to even), NaN kept quiet.
__device__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// out = bf16(w + s d) over n elements: an adapted projection's effective weight W + s B A, from
// the f32 weight and the f32 product B A, scaled, added and rounded in one pass.
extern "C" __global__ void add_scaled_to_bf16(const float* w, const float* d, float s,
                                              unsigned short* out, unsigned long long n) {
    GRID_STRIDE(i, n) { out[i] = f32_to_bf16(w[i] + s * d[i]); }
}

// causal_softmax_fwd on bf16 scores and probabilities, with the arithmetic in f32.
extern "C" __global__ void causal_softmax_fwd_bf16(const unsigned short* x, unsigned short* y,
                                                   int t, float scale) {
    __shared__ float sh[WARP];
    unsigned long long row = blockIdx.x;
    int i = (int)(row % (unsigned long long)t);
    const unsigned short* xr = x + row * t;
    unsigned short* yr = y + row * t;
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, bf16_to_f32(xr[j]) * scale);
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) s += expf(bf16_to_f32(xr[j]) * scale - m);
    s = block_sum(s, sh);
    float inv = 1.0f / s;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        yr[j] = j <= i ? f32_to_bf16(expf(bf16_to_f32(xr[j]) * scale - m) * inv) : 0;
}

// causal_softmax_bwd on bf16, with the arithmetic in f32.
extern "C" __global__ void causal_softmax_bwd_bf16(const unsigned short* y,
                                                   const unsigned short* dy, unsigned short* dx,
                                                   int t, float scale) {
    __shared__ float sh[WARP];
    unsigned long long row = blockIdx.x;
    const unsigned short* yr = y + row * t;
    const unsigned short* dr = dy + row * t;
    unsigned short* dxr = dx + row * t;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x) dot += bf16_to_f32(yr[j]) * bf16_to_f32(dr[j]);
    dot = block_sum(dot, sh);
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        dxr[j] = f32_to_bf16(scale * bf16_to_f32(yr[j]) * (bf16_to_f32(dr[j]) - dot));
}

// Cross-entropy of each row of logits [n, vocab] against its target: out [2, n] holds the loss
// (log-sum-exp minus the target's logit), then the log-sum-exp for the backward. One block per
// row. A target outside the vocabulary (the host checks the batch before it gets here) gives a
// NaN loss instead of a read out of bounds.
extern "C" __global__ void cross_entropy_fwd(const float* x, const unsigned int* t, float* out,
                                             int vocab, unsigned long long n) {
    __shared__ float sh[WARP];
    unsigned long long row = blockIdx.x;
    const float* xr = x + row * vocab;
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, xr[j]);
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(xr[j] - m);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        float lse = m + logf(s);
        unsigned int target = t[row];
        out[row] = target < (unsigned int)vocab ? lse - xr[target] : __int_as_float(0x7fc00000);
        out[n + row] = lse;
    }
}

// dlogits = dloss (softmax(row) - onehot(target)) from dl [2, n]: each row's dloss, then its
// log-sum-exp from the forward.
extern "C" __global__ void cross_entropy_bwd(const float* x, const unsigned int* t,
                                             const float* dl, float* dx, int vocab,
                                             unsigned long long n) {
    unsigned long long row = blockIdx.x;
    const float* xr = x + row * vocab;
    float* dxr = dx + row * vocab;
    float d = dl[row];
    float lse = dl[n + row];
    unsigned int target = t[row];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float g = d * expf(xr[j] - lse);
        dxr[j] = (unsigned int)j == target ? g - d : g;
    }
}
