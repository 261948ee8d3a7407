/*
 * Block-quantized weights multiplied in their compressed form on an x86 CPU (AVX2, or
 * AVX-512 VNNI where the build is given -mavx512vnni: `dpbusd` instead of `maddubs`).
 *
 * Why: torch's CPU kernels for compressed weights (int4pack, int8pack) want bf16
 * activations; on an AVX2 CPU without native bf16 they ran 10-30x slower than memory
 * allows, and torch has no 5-bit kernel at all, so GGUF Q5_0 layers were held as int8
 * (8 bits a weight where the file has 5.5). Here activations are rounded to int8 per
 * block of 32 (Q8_0's rule, what llama.cpp does), products are exact integer sums, and
 * each block's sum is scaled once.
 *
 * Two kinds of records, each holding 8 rows x 32 input features (one block per row):
 *   Q5 (176 bytes), GGUF Q5_0's own bits: w = (code - 16) * d, code in 0..31
 *     nib[4][32]  byte r*4+t of vector v: code of weight (r, 4v+t) in the low nibble,
 *                 of weight (r, 4(v+4)+t) in the high nibble (low 4 bits of the code);
 *     hb[32]      byte r*4+t, bit i: bit 4 of the code of weight (r, 4i+t);
 *     d[8]        the rows' fp16 scales.
 *   Q7 (272 bytes), for types the Q5 and Q4 grids cannot hold (Q6_K, Q8_0):
 *     w = (code - 64) * d, code in 1..127, requantized per block of 32 at load;
 *     codes[8][32] byte r*4+t of vector i: code of weight (r, 4i+t);
 *     d[8]        fp16 scales.
 *   7 bits, not 8: `maddubs` adds two u8 x s8 products in int16, and 2 x 127 x 127 fits
 *   where 2 x 255 x 127 saturates (FBGEMM's trap on such CPUs).
 *   Q4 (160 bytes), 4-bit types with a minimum (Q4_K, Q4_0, Q4_1): w = code * d - m,
 *     code in 0..15; Q4_K's per-32 scale d * sc and minimum dmin * m rounded to fp16
 *     (2^-11 relative, against a grid step of 1/15 of the block's range);
 *     nib[4][32]  as in Q5 (the low 4 bits are the whole code);
 *     d[8], m[8]  fp16 scales and minimums.
 * One 32-byte vector holds 4 consecutive codes of 8 rows: `maddubs` against 4 activation
 * bytes broadcast gives 8 rows' partial sums at once, so no horizontal sums are needed.
 * Rows are packed in groups of 8, each group a run of records, one per block.
 *
 * A row's result does not depend on the other rows of its batch (each row is rounded
 * and summed on its own, in the same order), so a sequence gives the same bits alone or
 * batched. Compiled at run time by block_kernel.py with the C compiler torch.compile
 * uses; OpenMP resolves to the runtime torch has already loaded, so both share one
 * thread team.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
#define Q5_RECORD 176
#define Q7_RECORD 272
#define Q4_RECORD 160
/* Records prefetched ahead: 4 left the two streams at 9-13 GB/s of this EPYC's 17; 32
 * (5-9 kB) measured best of 4-96 for one row over all 24 layers. */
#ifndef PREFETCH
#define PREFETCH 32
#endif

/* ------------------------------------------------------------------------------------ */
/* packing (load time)                                                                   */

/* `src`: n rows of k/32 GGUF Q5_0 blocks (22 bytes: fp16 d, uint32 qh, 16 bytes qs).
 * `dst`: rows/8 * k/32 records (rows % 8 == 0). */
void q5_pack(const uint8_t *src, int64_t rows, int64_t k, uint8_t *dst) {
    const int64_t nb = k / QK;
    for (int64_t g = 0; g < rows / 8; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *rec = dst + (g * nb + b) * Q5_RECORD;
            memset(rec, 0, Q5_RECORD);
            for (int r = 0; r < 8; r++) {
                const uint8_t *blk = src + ((g * 8 + r) * nb + b) * 22;
                uint32_t qh;
                memcpy(&qh, blk + 2, 4);
                uint8_t code[QK];
                for (int j = 0; j < 16; j++) {
                    code[j] = (blk[6 + j] & 0x0F) | (((qh >> j) & 1) << 4);
                    code[j + 16] = (blk[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
                }
                for (int v = 0; v < 4; v++)
                    for (int t = 0; t < 4; t++)
                        rec[v * 32 + r * 4 + t] =
                            (code[4 * v + t] & 0x0F) | ((code[4 * (v + 4) + t] & 0x0F) << 4);
                for (int i = 0; i < 8; i++)
                    for (int t = 0; t < 4; t++)
                        rec[128 + r * 4 + t] |= ((code[4 * i + t] >> 4) & 1) << i;
                memcpy(rec + 160 + 2 * r, blk, 2);
            }
        }
    }
}

/* float32 rows (rows, k) -> GGUF Q5_0 blocks, ggml's reference rounding: for weights of
 * other types that only need a coarse pass (a rescored output head). */
void q5_quantize(const float *w, int64_t rows, int64_t k, uint8_t *dst) {
    const int64_t nb = k / QK;
    for (int64_t i = 0; i < rows * nb; i++) {
        const float *x = w + i * QK;
        uint8_t *blk = dst + i * 22;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; j++)
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        const float d = max / -16.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t h = _cvtss_sh(d, 0);
        memcpy(blk, &h, 2);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            int a = (int8_t)(x[j] * id + 16.5f), b = (int8_t)(x[16 + j] * id + 16.5f);
            a = a < 31 ? a : 31;
            b = b < 31 ? b : 31;
            blk[6 + j] = (uint8_t)((a & 0x0F) | ((b & 0x0F) << 4));
            qh |= ((uint32_t)(a & 0x10) >> 4) << j;
            qh |= ((uint32_t)(b & 0x10) >> 4) << (j + 16);
        }
        memcpy(blk + 2, &qh, 4);
    }
}

/* Bytes of a record of `kind` (4, 5 or 7), and where its fp16 scales start: after the
 * codes (Q4's minimums follow the scales). */
static inline int64_t record_bytes(int kind) {
    return kind == 4 ? Q4_RECORD : kind == 5 ? Q5_RECORD : Q7_RECORD;
}

static inline int64_t scales_at(int kind) {
    return kind == 4 ? 128 : record_bytes(kind) - 16;
}

/* ------------------------------------------------------------------------------------ */
/* fp16                                                                          */

static inline float f16_to_f32(uint16_t h) {
    return _cvtsh_ss(h);
}

/* ------------------------------------------------------------------------------------ */
/* activations: Q8_0 rounding, per row and block of 32                                   */

/* 8 floats of row data at `at`: float32, or bf16 widened (exactly). */
static inline __m256 load8(const void *x, int bf16, int64_t at) {
    if (!bf16) return _mm256_loadu_ps((const float *)x + at);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* x: m rows of k floats (`bf16` != 0: bf16 values). qa: int8 codes, ad: scales,
 * asum: the sum of each block's codes (for the weights' code offset, applied once).
 * Per block: d = amax / 127, code = round-to-even(v * (1 / d)), as Q8_0 rounds. */
static void quantize_rows(const void *x, int bf16, int64_t m, int64_t k, int8_t *qa,
                          float *ad, int32_t *asum) {
    const int64_t nb = k / QK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 inf = _mm256_set1_ps(INFINITY);
    for (int64_t i = 0; i < m; i++) {
        for (int64_t b = 0; b < nb; b++) {
            const int64_t at = i * k + b * QK;
            __m256 v[4], amax = _mm256_setzero_ps();
            int bad = 0;
            for (int j = 0; j < 4; j++) {
                v[j] = load8(x, bf16, at + 8 * j);
                const __m256 a = _mm256_andnot_ps(sign, v[j]);
                /* not below inf, or unordered: inf or NaN */
                bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
                amax = _mm256_max_ps(amax, a);
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            /* a NaN or inf input makes its rows' outputs NaN, as a float product would */
            const float d = bad ? NAN : _mm_cvtss_f32(h) / 127.0f;
            const float id = !bad && d > 0.0f ? 1.0f / d : 0.0f;
            const __m256 vid = _mm256_set1_ps(id);
            __m256i q[4];
            for (int j = 0; j < 4; j++)
                q[j] = _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(v[j], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            /* sum of codes, then int32 -> int8 in order (packs interleave 128-bit lanes) */
            const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                                _mm256_add_epi32(q[2], q[3]));
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
            const __m256i p16a = _mm256_packs_epi32(q[0], q[1]);
            const __m256i p16b = _mm256_packs_epi32(q[2], q[3]);
            const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
            const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            _mm256_storeu_si256((__m256i *)(qa + at), _mm256_permutevar8x32_epi32(p8, order));
            ad[i * nb + b] = d;
            asum[i * nb + b] = _mm_cvtsi128_si32(s);
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* the product                                                                           */

/* Codes of one Q5 record as 8 vectors: w[i] holds codes (r, 4i+t) at byte r*4+t. */
static inline void unpack_q5(const uint8_t *rec, __m256i w[8]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    const __m256i hb = _mm256_loadu_si256((const __m256i *)(rec + 128));
    for (int v = 0; v < 4; v++) {
        const __m256i n = _mm256_loadu_si256((const __m256i *)(rec + 32 * v));
        /* bit v (then v + 4) of each hb byte moved to bit 4; shifts are per 16-bit lane,
         * the mask keeps only each byte's own bit */
        const __m256i h_lo = _mm256_and_si256(_mm256_slli_epi16(hb, 4 - v), bit4);
        const __m256i h_hi = _mm256_and_si256(_mm256_srli_epi16(hb, v), bit4);
        w[v] = _mm256_or_si256(_mm256_and_si256(n, low4), h_lo);
        w[v + 4] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(n, 4), low4), h_hi);
    }
}

/* Codes of one Q4 record, in the same order as `unpack_q5`. */
static inline void unpack_q4(const uint8_t *rec, __m256i w[8]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int v = 0; v < 4; v++) {
        const __m256i n = _mm256_loadu_si256((const __m256i *)(rec + 32 * v));
        w[v] = _mm256_and_si256(n, low4);
        w[v + 4] = _mm256_and_si256(_mm256_srli_epi16(n, 4), low4);
    }
}

/* 4 activation codes broadcast to every 32-bit lane, straight from memory (a copy of the
 * row on the stack first would stall on store forwarding). */
static inline __m256i bcast4(const int8_t *a) {
    int32_t v;
    memcpy(&v, a, 4);
    return _mm256_set1_epi32(v);
}

#ifdef __AVX512VNNI__
/* With VNNI (AVX-512 VNNI on 256-bit vectors), `dpbusd` adds four u8 x s8 products
 * into int32 in one instruction, with no int16 step to saturate: 8 instructions a
 * record where `maddubs` needs 8 + 8 (Q7) or 8 + 9 (Q5). The sums are the same integers
 * either way, so both builds give the same bits. */
static inline __m256i dot_q5(const __m256i w[8], const int8_t *a) {
    __m256i s0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[0], bcast4(a));
    __m256i s1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[4], bcast4(a + 16));
    for (int i = 1; i < 4; i++) {
        s0 = _mm256_dpbusd_epi32(s0, w[i], bcast4(a + 4 * i));
        s1 = _mm256_dpbusd_epi32(s1, w[i + 4], bcast4(a + 16 + 4 * i));
    }
    return _mm256_add_epi32(s0, s1);
}

static inline __m256i dot_q7(const uint8_t *rec, const int8_t *a) {
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int i = 0; i < 8; i += 2) {
        s0 = _mm256_dpbusd_epi32(s0, _mm256_loadu_si256((const __m256i *)(rec + 32 * i)),
                                 bcast4(a + 4 * i));
        s1 = _mm256_dpbusd_epi32(s1, _mm256_loadu_si256((const __m256i *)(rec + 32 * i + 32)),
                                 bcast4(a + 4 * i + 4));
    }
    return _mm256_add_epi32(s0, s1);
}
#else
/* One row's sum over one Q5 record: 8 rows' int32 dot products of codes and activations. */
static inline __m256i dot_q5(const __m256i w[8], const int8_t *a) {
    const __m256i ones = _mm256_set1_epi16(1);
    /* at most 4 maddubs in int16: 4 * 2 * 31 * 127 < 32768 */
    __m256i s0 = _mm256_maddubs_epi16(w[0], bcast4(a));
    __m256i s1 = _mm256_maddubs_epi16(w[4], bcast4(a + 16));
    for (int i = 1; i < 4; i++) {
        s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(w[i], bcast4(a + 4 * i)));
        s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(w[i + 4], bcast4(a + 16 + 4 * i)));
    }
    return _mm256_add_epi32(_mm256_madd_epi16(s0, ones), _mm256_madd_epi16(s1, ones));
}

/* The same over a Q7 record: one maddubs per int16 -> int32 step (2 x 127 x 127 fits,
 * two of them do not). */
static inline __m256i dot_q7(const uint8_t *rec, const int8_t *a) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s = _mm256_setzero_si256();
    for (int i = 0; i < 8; i++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(rec + 32 * i));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(w, bcast4(a + 4 * i)), ones));
    }
    return s;
}

#endif

/* y (m, n) float32 = x (m, k) @ W.T for W packed as `kind` (4, 5 or 7); x float32 or
 * bf16. Each record is unpacked once and multiplied with every row of x, so prompt chunks
 * reuse it too. Inlined per kind, so each loop is compiled for its own record. */
static inline __attribute__((always_inline)) void linear(const int kind, const void *x,
                                                         int bf16, int64_t m, int64_t k,
                                                         const uint8_t *packed, int64_t n,
                                                         float *y, int threads) {
    const int64_t nb = k / QK;
    const int64_t record = record_bytes(kind), scales = scales_at(kind);
    const int32_t offset = kind == 5 ? 16 : 64;
    int8_t *qa = malloc((size_t)(m * k));
    float *ad = malloc(sizeof(float) * (size_t)(m * nb));
    int32_t *asum = malloc(sizeof(int32_t) * (size_t)(m * nb));
    quantize_rows(x, bf16, m, k, qa, ad, asum);
    const int64_t groups = n / 8;
#pragma omp parallel num_threads(threads)
    {
        float *acc = aligned_alloc(32, sizeof(float) * 8 * (size_t)m);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *recs = packed + g * nb * record;
            memset(acc, 0, sizeof(float) * 8 * (size_t)m);
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *rec = recs + b * record;
                for (int64_t at = 0; at < record; at += 64)
                    _mm_prefetch((const char *)(rec + PREFETCH * record + at), _MM_HINT_T0);
                __m256i w[8];
                if (kind == 5) unpack_q5(rec, w);
                if (kind == 4) unpack_q4(rec, w);
                const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + scales)));
                /* Q4's minimums: w = code * d - m sums to d * dot - m * (sum of codes) */
                const __m256 wm = kind == 4 ? _mm256_cvtph_ps(_mm_loadu_si128(
                                                  (const __m128i *)(rec + scales + 16)))
                                            : _mm256_setzero_ps();
                for (int64_t i = 0; i < m; i++) {
                    const int8_t *a = qa + i * k + b * QK;
                    const __m256 av = _mm256_set1_ps(ad[i * nb + b]);
                    float *o = acc + 8 * i;
                    if (kind == 4) {
                        const __m256 sa = _mm256_set1_ps((float)asum[i * nb + b]);
                        const __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(dot_q5(w, a)), wd,
                                                         _mm256_mul_ps(wm, sa));
                        _mm256_store_ps(o, _mm256_fmadd_ps(t, av, _mm256_load_ps(o)));
                        continue;
                    }
                    __m256i s = kind == 5 ? dot_q5(w, a) : dot_q7(rec, a);
                    s = _mm256_sub_epi32(s, _mm256_set1_epi32(offset * asum[i * nb + b]));
                    const __m256 scale = _mm256_mul_ps(wd, av);
                    _mm256_store_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale,
                                                       _mm256_load_ps(o)));
                }
            }
            for (int64_t i = 0; i < m; i++)
                _mm256_storeu_ps(y + i * n + g * 8, _mm256_load_ps(acc + 8 * i));
        }
        free(acc);
    }
    free(qa);
    free(ad);
    free(asum);
}

void q4_linear(const void *x, int bf16, int64_t m, int64_t k, const uint8_t *packed,
               int64_t n, float *y, int threads) {
    linear(4, x, bf16, m, k, packed, n, y, threads);
}

void q5_linear(const void *x, int bf16, int64_t m, int64_t k, const uint8_t *packed,
               int64_t n, float *y, int threads) {
    linear(5, x, bf16, m, k, packed, n, y, threads);
}

void q7_linear(const void *x, int bf16, int64_t m, int64_t k, const uint8_t *packed,
               int64_t n, float *y, int threads) {
    linear(7, x, bf16, m, k, packed, n, y, threads);
}

/* float32 -> bf16, rounded to nearest even (as torch rounds), 16 values into 32 bytes. */
static inline __m256i to_bf16(__m256 a, __m256 b) {
    const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    __m256i ia = _mm256_castps_si256(a), ib = _mm256_castps_si256(b);
    ia = _mm256_srli_epi32(
        _mm256_add_epi32(ia, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ia, 16), one))), 16);
    ib = _mm256_srli_epi32(
        _mm256_add_epi32(ib, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ib, 16), one))), 16);
    /* packus interleaves 128-bit lanes: a0-3 b0-3 a4-7 b4-7; put them back in order */
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(ia, ib), 0xD8);
}

/* One record of `kind` row by row: row[r] holds the 32 codes of row r in order, and its
 * weights are code * d[r] - mn[r] (mn = offset * d for Q5 and Q7, so exact in float32). */
static inline __attribute__((always_inline)) void record_rows(int kind, const uint8_t *rec,
                                                              __m256i row[8], float d[8],
                                                              float mn[8]) {
    __m256i w[8];
    if (kind == 5) unpack_q5(rec, w);
    else if (kind == 4) unpack_q4(rec, w);
    else
        for (int i = 0; i < 8; i++) w[i] = _mm256_loadu_si256((const __m256i *)(rec + 32 * i));
    /* w[i] lane r = codes (r, 4i..4i+3): an 8 x 8 transpose of 32-bit lanes gives row r's
     * 32 codes, in order, in one vector */
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(w[i], w[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(w[i], w[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        row[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
        row[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
    }
    const float offset = kind == 5 ? 16.0f : kind == 7 ? 64.0f : 0.0f;
    uint16_t ds[8], ms[8];
    memcpy(ds, rec + scales_at(kind), 16);
    if (kind == 4) memcpy(ms, rec + scales_at(kind) + 16, 16);
    for (int r = 0; r < 8; r++) {
        d[r] = f16_to_f32(ds[r]);
        mn[r] = kind == 4 ? f16_to_f32(ms[r]) : offset * d[r];
    }
}

/* Records of `kind` (4, 5 or 7) as the weight (n, k), row-major: float32 (`bf16` 0: for
 * checks and fallbacks) or bf16, each weight rounded once, for prompt chunks, which
 * multiply faster through a bf16 GEMM where the CPU has native bf16 (oneDNN: ~800
 * GFLOP/s on two Zen 4 cores, against ~450 for the integer product at M = 256). */
static inline __attribute__((always_inline)) void expand(const int kind, const uint8_t *packed,
                                                         int64_t n, int64_t k, void *out,
                                                         const int bf16, int threads) {
    const int64_t nb = k / QK, record = record_bytes(kind);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < n / 8; g++) {
        for (int64_t b = 0; b < nb; b++) {
            __m256i row[8];
            float d[8], mn[8];
            record_rows(kind, packed + (g * nb + b) * record, row, d, mn);
            for (int r = 0; r < 8; r++) {
                const uint8_t *codes = (const uint8_t *)&row[r];
                __m256 f[4];
                for (int j = 0; j < 4; j++) {
                    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * j)));
                    f[j] = _mm256_fmsub_ps(_mm256_cvtepi32_ps(c), _mm256_set1_ps(d[r]), _mm256_set1_ps(mn[r]));
                }
                const int64_t at = (g * 8 + r) * k + b * QK;
                if (bf16) {
                    uint16_t *o = (uint16_t *)out + at;
                    _mm256_storeu_si256((__m256i *)o, to_bf16(f[0], f[1]));
                    _mm256_storeu_si256((__m256i *)(o + 16), to_bf16(f[2], f[3]));
                } else {
                    for (int j = 0; j < 4; j++) _mm256_storeu_ps((float *)out + at + 8 * j, f[j]);
                }
            }
        }
    }
}

/* One loop compiled per kind and output type, as `linear` is per kind. (Holding a whole
 * record's floats at once spilled registers: 15-30 % slower than this row-by-row loop.) */
void blocks_expand(int kind, const uint8_t *packed, int64_t n, int64_t k, void *out, int bf16,
                   int threads) {
    if (bf16) {
        if (kind == 4) expand(4, packed, n, k, out, 1, threads);
        else if (kind == 5) expand(5, packed, n, k, out, 1, threads);
        else expand(7, packed, n, k, out, 1, threads);
    } else {
        if (kind == 4) expand(4, packed, n, k, out, 0, threads);
        else if (kind == 5) expand(5, packed, n, k, out, 0, threads);
        else expand(7, packed, n, k, out, 0, threads);
    }
}

/* float32 rows (rows, k), rows % 8 == 0 -> Q7 records: per row and block of 32,
 * d = amax / 63 (stored as fp16; codes are rounded against the stored d). */
void q7_pack(const float *w, int64_t rows, int64_t k, uint8_t *dst) {
    const int64_t nb = k / QK;
    for (int64_t g = 0; g < rows / 8; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *rec = dst + (g * nb + b) * Q7_RECORD;
            for (int r = 0; r < 8; r++) {
                const float *x = w + (g * 8 + r) * k + b * QK;
                float amax = 0.0f;
                for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
                const uint16_t h = _cvtss_sh(amax / 63.0f, 0);
                memcpy(rec + 256 + 2 * r, &h, 2);
                const float d = f16_to_f32(h);
                const float id = d > 0.0f ? 1.0f / d : 0.0f;
                for (int j = 0; j < QK; j++) {
                    int q = (int)nearbyintf(x[j] * id);
                    q = q > 63 ? 63 : (q < -63 ? -63 : q);
                    rec[(j / 4) * 32 + r * 4 + (j % 4)] = (uint8_t)(q + 64);
                }
            }
        }
    }
}

/* codes uint8 (rows, k) in 0..15 and fp16 d, m (rows, k/32 each), rows % 8 == 0 ->
 * Q4 records. */
void q4_pack(const uint8_t *codes, const uint16_t *d, const uint16_t *mins, int64_t rows,
             int64_t k, uint8_t *dst) {
    const int64_t nb = k / QK;
    for (int64_t g = 0; g < rows / 8; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *rec = dst + (g * nb + b) * Q4_RECORD;
            for (int r = 0; r < 8; r++) {
                const int64_t row = g * 8 + r;
                const uint8_t *c = codes + row * k + b * QK;
                for (int v = 0; v < 4; v++)
                    for (int t = 0; t < 4; t++)
                        rec[v * 32 + r * 4 + t] =
                            (c[4 * v + t] & 0x0F) | ((c[4 * (v + 4) + t] & 0x0F) << 4);
                memcpy(rec + 128 + 2 * r, d + row * nb + b, 2);
                memcpy(rec + 144 + 2 * r, mins + row * nb + b, 2);
            }
        }
}
