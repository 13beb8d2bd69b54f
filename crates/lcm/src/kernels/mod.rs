//! Our own CPU kernels for the hot paths (matrix multiply, convolution, attention, group norm),
//! on f32 slices. `crate::ops` routes CPU f32 tensors here and everything else to candle, so
//! model code never sees the difference and the GPU path is untouched.

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub mod amx_conv;
pub mod attention;
pub mod conv;
pub mod gemm;
pub mod int8;
pub mod norm;
pub mod winograd;

/// The instruction set the CPU kernels use, chosen once at run time: the best the CPU has, or
/// a lower one named by `LCM_CPU_PATH` (`portable`, `avx2`, `avx512`, `avx512-bf16`,
/// `amx-bf16`), for
/// comparing paths on one machine. The f32 vector paths give the same numbers bit for bit (the
/// wider kernels run the same multiply-add chains on more lanes at once); bf16 weights are
/// computed in bf16 only from `avx512-bf16` up (below it they are widened to f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuPath {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA (+ F16C for f16 weights).
    Avx2,
    /// AVX-512 F on top of AVX2 (512-bit micro-kernel).
    Avx512,
    /// AVX-512 with the BF16 dot products (`vdpbf16ps`): as `Avx512` for f32, and models whose
    /// weights are kept in bf16 multiply in bf16 (operands rounded to bf16, f32 sums).
    Avx512Bf16,
    /// AMX tiles for the bf16 products (`tdpbf16ps`, a 16x32 by 32x16 block per instruction):
    /// the same operands and f32 sums as `Avx512Bf16`, whose kernels it keeps for the rest.
    AmxBf16,
}

impl CpuPath {
    pub const ALL: [CpuPath; 5] =
        [CpuPath::Portable, CpuPath::Avx2, CpuPath::Avx512, CpuPath::Avx512Bf16, CpuPath::AmxBf16];

    /// The name `LCM_CPU_PATH` and `lcm bench` use.
    pub fn name(self) -> &'static str {
        match self {
            CpuPath::Portable => "portable",
            CpuPath::Avx2 => "avx2",
            CpuPath::Avx512 => "avx512",
            CpuPath::Avx512Bf16 => "avx512-bf16",
            CpuPath::AmxBf16 => "amx-bf16",
        }
    }

    pub fn parse(name: &str) -> Option<CpuPath> {
        CpuPath::ALL.into_iter().find(|p| p.name() == name.trim().to_ascii_lowercase())
    }

    /// The best path this CPU supports.
    pub fn detected() -> CpuPath {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                if is_x86_feature_detected!("avx512f") {
                    if is_x86_feature_detected!("avx512bf16") {
                        if amx::available() {
                            return CpuPath::AmxBf16;
                        }
                        return CpuPath::Avx512Bf16;
                    }
                    return CpuPath::Avx512;
                }
                return CpuPath::Avx2;
            }
        }
        CpuPath::Portable
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        self <= CpuPath::detected()
    }

    /// The path the kernels take (checked once): `LCM_CPU_PATH` when it names a path this CPU
    /// has, else the best one (an unknown or unsupported name is reported by [`CpuPath::check_env`]).
    pub fn current() -> CpuPath {
        use std::sync::OnceLock;
        static PATH: OnceLock<CpuPath> = OnceLock::new();
        *PATH.get_or_init(|| match std::env::var("LCM_CPU_PATH").ok().and_then(|v| CpuPath::parse(&v)) {
            Some(p) if p.supported() => p,
            _ => CpuPath::detected(),
        })
    }

    /// A one-line error when `LCM_CPU_PATH` names no path, or one this CPU lacks.
    pub fn check_env() -> Result<(), String> {
        let Ok(v) = std::env::var("LCM_CPU_PATH") else { return Ok(()) };
        let names: Vec<&str> = CpuPath::ALL.iter().map(|p| p.name()).collect();
        match CpuPath::parse(&v) {
            None => Err(format!("LCM_CPU_PATH={v:?} is not a CPU path (one of: {})", names.join(", "))),
            Some(p) if !p.supported() => {
                Err(format!("LCM_CPU_PATH={v:?}: this CPU lacks it (best here: {})", CpuPath::detected().name()))
            }
            Some(_) => Ok(()),
        }
    }
}

/// AVX2 + FMA in use (the CPU has them and `LCM_CPU_PATH` does not say `portable`).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    CpuPath::current() >= CpuPath::Avx2
}

/// Whether the CPU converts half floats in hardware (F16C), checked once.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_f16c() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| has_avx2_fma() && is_x86_feature_detected!("f16c"))
}

/// An element type our kernels read weights in: f32 itself, or half precision (`f16`, `bf16`)
/// widened to f32 as the packers copy it (so no f32 copy of a half-precision weight is ever
/// made; activations and accumulation stay f32).
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// `dst[i] = src[i]` widened to f32, for `min(src.len(), dst.len())` values.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// The values themselves when they are f32, so f32 operands keep their plain copy paths.
    fn as_f32(_s: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn widen(src: &[f32], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
    }
    #[inline(always)]
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Elem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn widen(src: &[half::f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        #[cfg(target_arch = "x86_64")]
        {
            if has_f16c() {
                // SAFETY: F16C checked; both slices hold `n` values.
                return unsafe { x86::widen_f16(src.as_ptr().cast(), &mut dst[..n]) };
            }
        }
        for (d, s) in dst[..n].iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

impl Elem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    fn widen(src: &[half::bf16], dst: &mut [f32]) {
        // bf16 is the top half of an f32: a shift, which this loop vectorises to.
        #[inline(always)]
        fn body(src: &[half::bf16], dst: &mut [f32]) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = f32::from_bits((s.to_bits() as u32) << 16);
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn fast(src: &[half::bf16], dst: &mut [f32]) {
                body(src, dst)
            }
            if has_avx2_fma() {
                return unsafe { fast(src, dst) };
            }
        }
        body(src, dst)
    }
}

/// A raw pointer that may cross threads: each task writes a disjoint part of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Below this many FLOPs a task runs on the calling thread: fork/join would cost more.
const MIN_PARALLEL_WORK: usize = 4_000_000;

/// How many pieces [`parallel_chunks`] cuts `0..total` into.
pub(crate) fn parallel_pieces(total: usize, align: usize, work: usize) -> usize {
    total.div_ceil(piece_len(total, align, work).max(1))
}

/// The length of [`parallel_chunks`]' pieces: `total` when it runs on the calling thread.
fn piece_len(total: usize, align: usize, work: usize) -> usize {
    let threads = rayon::current_num_threads();
    if threads <= 1 || work < MIN_PARALLEL_WORK || total <= align {
        return total;
    }
    let pieces = (threads * 4).min(total.div_ceil(align)).max(1);
    total.div_ceil(pieces).div_ceil(align) * align
}

/// Run `f(start, len)` over `0..total` cut into pieces (multiples of `align`, except the last)
/// on rayon's pool: a few pieces per thread so a busy core does not hold everyone up.
pub(crate) fn parallel_chunks(total: usize, align: usize, work: usize, f: impl Fn(usize, usize) + Sync) {
    let chunk = piece_len(total, align, work);
    if chunk >= total {
        f(0, total);
        return;
    }
    use rayon::prelude::*;
    (0..total.div_ceil(chunk)).into_par_iter().for_each(|i| {
        let start = i * chunk;
        f(start, chunk.min(total - start));
    });
}

/// `y[r] = W x[r] + b` for a few rows `x[r]` (`W` is `[out, in]` row-major): one dot product
/// per output, the outputs shared out among threads. Half-precision `W` rows are widened a
/// block at a time.
pub(crate) fn gemv_rows<W: Elem>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = vec![0f32; rows * n];
    let yp = SendPtr(y.as_mut_ptr());
    parallel_chunks(n, 16, 2 * rows * n * k, |j0, len| {
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            for j in j0..j0 + len {
                let d = dot_any(xr, &w[j * k..(j + 1) * k]) + bias.map_or(0.0, |b| b[j]);
                // SAFETY: chunks own disjoint output columns.
                unsafe { *yp.get().add(r * n + j) = d };
            }
        }
    });
    y
}

/// `a · b` with `b` in any element type: half-precision values are widened a block at a time
/// into the same eight partial sums, so the result is bit for bit [`dot`] of the widened values.
fn dot_any<W: Elem>(a: &[f32], b: &[W]) -> f32 {
    if let Some(b) = W::as_f32(b) {
        return dot(a, b);
    }
    const BLOCK: usize = 256; // a multiple of 8: blocks keep the lanes' order
    let mut buf = [0f32; BLOCK];
    let mut acc = [0f32; 8];
    let mut tail = 0.0;
    for (ac, bc) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        W::widen(bc, &mut buf);
        tail = dot_lanes(ac, &buf[..bc.len()], &mut acc);
    }
    acc.iter().sum::<f32>() + tail
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let tail = dot_lanes(a, b, &mut acc);
    acc.iter().sum::<f32>() + tail
}

/// Adds `a · b` into eight partial sums, except the last `len % 8` products, whose sum it
/// returns.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32], acc: &mut [f32; 8]) -> f32 {
    // Eight independent partial sums so the compiler vectorises without reassociating (plain
    // multiply-add: `mul_add` without a compile-time FMA target is a libm call).
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    tail
}

/// Elementwise `a + b`, split over threads.
pub(crate) fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    let yp = SendPtr(y.as_mut_ptr());
    parallel_chunks(a.len(), 4096, a.len() * 16, |i0, n| {
        // SAFETY: chunks own disjoint ranges.
        let out = unsafe { std::slice::from_raw_parts_mut(yp.get().add(i0), n) };
        for ((o, x), y) in out.iter_mut().zip(&a[i0..i0 + n]).zip(&b[i0..i0 + n]) {
            *o = x + y;
        }
    });
    y
}

/// Nearest-neighbour 2x upsampling of `planes` planes of `h x w`.
pub(crate) fn upsample_nearest2x(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0f32; planes * 4 * h * w];
    let yp = SendPtr(y.as_mut_ptr());
    parallel_chunks(planes, 1, planes * h * w * 64, |p0, np| {
        // SAFETY: chunks own disjoint planes.
        let out = unsafe { std::slice::from_raw_parts_mut(yp.get().add(p0 * 4 * h * w), np * 4 * h * w) };
        for (src, dst) in x[p0 * h * w..(p0 + np) * h * w].chunks_exact(w).zip(out.chunks_exact_mut(4 * w)) {
            let (a, b) = dst.split_at_mut(2 * w);
            for (i, v) in src.iter().enumerate() {
                a[2 * i] = *v;
                a[2 * i + 1] = *v;
            }
            b.copy_from_slice(a);
        }
    });
    y
}

/// `x[i] = exp(scale * (x[i] - sub))` in place; returns the sum of the results.
pub(crate) fn exp_sub_inplace(x: &mut [f32], sub: f32, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if CpuPath::current() >= CpuPath::Avx512 {
            // SAFETY: AVX-512 F checked.
            return unsafe { x86::exp_sub_inplace16(x, sub, scale) };
        }
        if has_avx2_fma() {
            return unsafe { x86::exp_sub_inplace(x, sub, scale) };
        }
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = ((*v - sub) * scale).exp();
        sum += *v;
    }
    sum
}

/// The largest value of `x` (`-inf` for none).
pub(crate) fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if CpuPath::current() >= CpuPath::Avx512 {
            // SAFETY: AVX-512 F checked.
            return unsafe { x86::max16(x) };
        }
    }
    x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `x[i] = x[i] * sigmoid(x[i])` in place.
pub(crate) fn silu_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            return unsafe { x86::silu_inplace(x) };
        }
    }
    for v in x.iter_mut() {
        *v /= 1.0 + (-*v).exp();
    }
}

/// Exact-form GELU, `x * (1 + erf(x / sqrt 2)) / 2`, times `mul` when given (GEGLU's
/// `hidden * gelu(gate)`), written to `out`. erf is Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7),
/// the approximation PyTorch's vectorised CPU GELU uses.
pub(crate) fn gelu_erf(x: &[f32], mul: Option<&[f32]>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            return unsafe { x86::gelu_erf(x, mul, out) };
        }
    }
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = gelu_scalar(v) * mul.map_or(1.0, |m| m[i]);
    }
}

fn gelu_scalar(x: f32) -> f32 {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (0.327_591_1 * z + 1.0);
    let r = (((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6;
    let erf = 1.0 - r * t * (-z * z).exp();
    0.5 * x * (1.0 + erf.copysign(x))
}

/// Layer normalization of each `width`-long row (two passes: mean, then centred variance).
pub(crate) fn layer_norm(x: &[f32], width: usize, weight: &[f32], bias: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let rows = x.len() / width.max(1);
    let yp = SendPtr(y.as_mut_ptr());
    parallel_chunks(rows, 1, x.len() * 8, |r0, n| {
        // SAFETY: each chunk writes its own rows.
        let ys = unsafe { std::slice::from_raw_parts_mut(yp.get().add(r0 * width), n * width) };
        for (xr, yr) in x[r0 * width..(r0 + n) * width].chunks_exact(width).zip(ys.chunks_exact_mut(width)) {
            let mean = xr.iter().sum::<f32>() / width as f32;
            let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (i, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                *o = (v - mean) * rstd * weight[i] + bias.map_or(0.0, |b| b[i]);
            }
        }
    });
    y
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// IEEE half -> f32, 8 at a time with F16C's `vcvtph2ps`; `src` holds `dst.len()` values.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen_f16(src: *const u16, dst: &mut [f32]) {
        let n = dst.len();
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.add(i).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        if i < n {
            let mut tail = [0u16; 8];
            std::ptr::copy_nonoverlapping(src.add(i), tail.as_mut_ptr(), n - i);
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(tail.as_ptr().cast())));
            dst[i..].copy_from_slice(&out[..n - i]);
        }
    }

    /// exp on 8 lanes: `2^n * p(r)` with `x = n ln2 + r`, |r| <= ln2/2, a degree-6 polynomial
    /// (Cephes' expf coefficients, ~1 ulp); inputs below -87.3 give 0.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.376_26));
        let xc = _mm256_max_ps(x, _mm256_set1_ps(-87.336_55));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            xc,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let y = _mm256_mul_ps(p, pow2n);
        // Below the smallest normal: 0 (softmax of masked or far-off scores).
        _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.336_55)))
    }

    /// exp on 16 lanes: [`exp8`]'s steps on AVX-512 (the same results lane for lane).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.376_26));
        let xc = _mm512_max_ps(x, _mm512_set1_ps(-87.336_55));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            xc,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let r2 = _mm512_mul_ps(r, r);
        p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        let pow2n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        )));
        let y = _mm512_mul_ps(p, pow2n);
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.336_55));
        _mm512_maskz_mov_ps(keep, y)
    }

    /// Lanes `0..n` of 16 (all of them from 16 up).
    #[inline]
    pub(super) fn lanes16(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// The largest value (`-inf` for none).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max16(x: &[f32]) -> f32 {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..x.len()).step_by(16) {
            let v = _mm512_maskz_loadu_ps(lanes16(x.len() - i), x.as_ptr().add(i));
            m = _mm512_mask_max_ps(m, lanes16(x.len() - i), m, v);
        }
        _mm512_reduce_max_ps(m)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_sub_inplace16(x: &mut [f32], sub: f32, scale: f32) -> f32 {
        let (s, b) = (_mm512_set1_ps(scale), _mm512_set1_ps(-sub * scale));
        let mut acc = _mm512_setzero_ps();
        for i in (0..x.len()).step_by(16) {
            let k = lanes16(x.len() - i);
            let p = x.as_mut_ptr().add(i);
            let v = _mm512_maskz_mov_ps(k, exp16(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, p), s, b)));
            _mm512_mask_storeu_ps(p, k, v);
            acc = _mm512_add_ps(acc, v);
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sub_inplace(x: &mut [f32], sub: f32, scale: f32) -> f32 {
        let (s, b) = (_mm256_set1_ps(scale), _mm256_set1_ps(-sub * scale));
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = exp8(_mm256_fmadd_ps(_mm256_loadu_ps(c.as_ptr()), s, b));
            _mm256_storeu_ps(c.as_mut_ptr(), v);
            acc = _mm256_add_ps(acc, v);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum: f32 = lanes.iter().sum();
        for v in chunks.into_remainder() {
            *v = (*v * scale - sub * scale).exp();
            sum += *v;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_inplace(x: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            let e = exp8(_mm256_sub_ps(zero, v));
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_div_ps(v, _mm256_add_ps(one, e)));
        }
        for v in chunks.into_remainder() {
            *v /= 1.0 + (-*v).exp();
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_erf(x: &[f32], mul: Option<&[f32]>, out: &mut [f32]) {
        let n = x.len().min(out.len());
        let sign = _mm256_set1_ps(-0.0);
        let one = _mm256_set1_ps(1.0);
        let half = _mm256_set1_ps(0.5);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let u = _mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
            let s = _mm256_and_ps(sign, u);
            let z = _mm256_xor_ps(s, u);
            let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.327_591_1), z, one));
            let mut r = _mm256_fmadd_ps(_mm256_set1_ps(1.061_405_4), t, _mm256_set1_ps(-1.453_152));
            r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421_413_8));
            r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284_496_74));
            r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254_829_6));
            let e = exp8(_mm256_xor_ps(sign, _mm256_mul_ps(z, z)));
            let erf = _mm256_fnmadd_ps(_mm256_mul_ps(e, t), r, one);
            let erf = _mm256_xor_ps(s, erf);
            let mut g = _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, erf));
            if let Some(m) = mul {
                g = _mm256_mul_ps(g, _mm256_loadu_ps(m.as_ptr().add(i)));
            }
            _mm256_storeu_ps(out.as_mut_ptr().add(i), g);
            i += 8;
        }
        for j in i..n {
            out[j] = super::gelu_scalar(x[j]) * mul.map_or(1.0, |m| m[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Elem;

    /// Half floats widen exactly (F16C and the portable path agree with `half`, subnormals,
    /// infinities and odd tails included), and few-row linears over half weights match f64.
    #[test]
    fn half_weights_widen_and_gemv() {
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let mut got = vec![0f32; all.len()];
        for len in [all.len(), 13, 7] {
            half::f16::widen(&all[..len], &mut got[..len]);
            for (h, g) in all[..len].iter().zip(&got) {
                let want = h.to_f32();
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{h:?}: {g} vs {want}");
            }
        }
        let allb: Vec<half::bf16> = (0..=u16::MAX).map(half::bf16::from_bits).collect();
        half::bf16::widen(&allb, &mut got);
        for (h, g) in allb.iter().zip(&got) {
            let want = h.to_f32();
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()));
        }

        let mut seed = 3u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        let (rows, k, n) = (3, 700, 37);
        let x: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let bias: Vec<f32> = (0..n).map(|_| rnd()).collect();
        let wh: Vec<half::f16> = w.iter().map(|v| half::f16::from_f32(*v)).collect();
        let wb: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let check = |y: Vec<f32>, wv: Vec<f32>| {
            for r in 0..rows {
                for j in 0..n {
                    let want: f64 =
                        bias[j] as f64 + (0..k).map(|p| x[r * k + p] as f64 * wv[j * k + p] as f64).sum::<f64>();
                    assert!((y[r * n + j] as f64 - want).abs() < 1e-4, "{} vs {want}", y[r * n + j]);
                }
            }
        };
        check(super::gemv_rows(&x, rows, k, &wh, n, Some(&bias)), wh.iter().map(|v| v.to_f32()).collect());
        check(super::gemv_rows(&x, rows, k, &wb, n, Some(&bias)), wb.iter().map(|v| v.to_f32()).collect());
    }

    #[test]
    fn gelu_and_exp_match_libm() {
        let x: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) / 97.0).collect();
        let mut y = vec![0f32; x.len()];
        super::gelu_erf(&x, None, &mut y);
        for (&v, &g) in x.iter().zip(&y) {
            if v.abs() > 4.0 {
                // Beyond the series' reach: gelu(x) -> max(x, 0) within 2e-4.
                assert!((g - v.max(0.0)).abs() < 2e-4, "gelu({v}) = {g}");
                continue;
            }
            let want = 0.5 * v as f64 * (1.0 + libm_erf(v as f64 / 2f64.sqrt()));
            assert!((g as f64 - want).abs() < 2e-6 * (1.0 + want.abs()), "gelu({v}) = {g}, want {want}");
        }
        let mut e = x.clone();
        let sum = super::exp_sub_inplace(&mut e, 1.0, 2.0);
        let want: f64 = x.iter().map(|&v| ((v as f64 - 1.0) * 2.0).exp()).sum();
        assert!((sum as f64 - want).abs() < 1e-5 * want);
        for (&v, &g) in x.iter().zip(&e) {
            let w = ((v as f64 - 1.0) * 2.0).exp();
            assert!((g as f64 - w).abs() <= 3e-6 * w + 1e-38, "exp: {g} vs {w}");
        }
    }

    /// erf by its Maclaurin series in f64 (accurate for |x| < 3).
    fn libm_erf(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
            if n > 400.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
