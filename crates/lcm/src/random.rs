//! A random generator that reproduces PyTorch's CPU generator bit for bit:
//! `torch.Generator("cpu").manual_seed(seed)` followed by `torch.randn(shape, generator=...)`.
//!
//! PyTorch's CPU engine is MT19937 seeded with the low 32 bits of the seed. `randn` on a
//! contiguous float32 tensor of 16 or more elements first draws one 24-bit uniform per element,
//! then turns each block of 16 into normals with Box-Muller (`normal_fill`; on x86 with AVX2 the
//! vectorised `normal_fill_16_AVX2`, whose `log` and `sincos` are the Cephes polynomials of
//! avx_mathfun, reproduced here in scalar f32 so the results are identical). When the element
//! count is not a multiple of 16 the last 16 values are redrawn and recomputed. Tensors with
//! fewer than 16 elements use the scalar double-precision path, which caches its second normal
//! sample in the generator.

const N: usize = 624;
const M: usize = 397;

/// How PyTorch's CPU `randn` draws float16 / bfloat16 tensors of 16 or more values; it changed
/// between PyTorch versions, so fp16 noise (diffusers' fp16 pipelines) depends on the version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HalfRandn {
    /// PyTorch 2.15 (the newest checked): blocks of 16 drawn and transformed in f32 (24-bit
    /// uniforms, the f32 Box-Muller), each block rounded; a tail is redrawn right after the last
    /// whole block.
    #[default]
    Blocked,
    /// PyTorch 2.11 (and, by its code, earlier): 11-bit (f16) / 8-bit (bf16) uniforms stored in
    /// the tensor, Box-Muller with every intermediate (`log`, `sqrt`, angle, `cos`, `sin`) rounded
    /// to the dtype; a tail is redrawn after all values, as in f32.
    HalfMath,
}

impl HalfRandn {
    /// `LCM_TORCH_HALF_RANDN`: `blocked` (default; PyTorch 2.15) or `half-math` (PyTorch 2.11).
    pub fn from_env() -> Self {
        match std::env::var("LCM_TORCH_HALF_RANDN").as_deref() {
            Ok("half-math") | Ok("legacy") => Self::HalfMath,
            _ => Self::Blocked,
        }
    }
}

/// PyTorch-compatible CPU random generator.
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    state: [u32; N],
    index: usize,
    next_double_normal: Option<f64>,
    half_randn: HalfRandn,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn manual_seed(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            state[j] = 1812433253u32.wrapping_mul(state[j - 1] ^ (state[j - 1] >> 30)).wrapping_add(j as u32);
        }
        Self { state, index: N, next_double_normal: None, half_randn: HalfRandn::from_env() }
    }

    /// Draw float16 / bfloat16 noise as this PyTorch version's CPU kernel does.
    pub fn with_half_randn(mut self, mode: HalfRandn) -> Self {
        self.half_randn = mode;
        self
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut v = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// One 32-bit draw of the engine (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `generator->random64()`: the first draw is the high word.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled to [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits scaled to [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `at::normal_distribution<double>(0, 1)`, with PyTorch's cached second sample.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(numel elements, dtype=float32, generator=self)` in row-major order.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        self.normal_fill(numel, Self::uniform_f32, normal_fill_16)
    }

    /// PyTorch's `normal_fill` (numel >= 16): one uniform per value, Box-Muller on each block of
    /// 16 in place, and when `numel` is not a multiple of 16 the last 16 redrawn from fresh
    /// uniforms and transformed again. f32 and PyTorch 2.11's half types differ only in the
    /// uniforms and the transform.
    fn normal_fill(
        &mut self,
        numel: usize,
        uniform: impl Fn(&mut Self) -> f32,
        fill16: impl Fn(&mut [f32]),
    ) -> Vec<f32> {
        let mut data: Vec<f32> = (0..numel).map(|_| uniform(self)).collect();
        for start in (0..numel - 15).step_by(16) {
            fill16(&mut data[start..start + 16]);
        }
        if !numel.is_multiple_of(16) {
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = uniform(self);
            }
            fill16(tail);
        }
        data
    }

    /// `torch.randn(numel, dtype=dtype, generator=self)` on the CPU, as f32 values: the f16 /
    /// bf16 draws of [`randn_half`](Self::randn_half), else the f32 ones.
    pub fn randn_as(&mut self, numel: usize, dtype: candle_core::DType) -> Vec<f32> {
        match dtype {
            candle_core::DType::F16 | candle_core::DType::BF16 => self.randn_half(numel, dtype),
            _ => self.randn(numel),
        }
    }

    /// `torch.randn(numel, dtype=float16 / bfloat16, generator=self)` on the CPU, the values
    /// (exactly representable in `dtype`) as f32, as the generator's [`HalfRandn`] says.
    /// PyTorch 2.15 draws these 16 at a time in f32 and rounds each block; when `numel` is not a
    /// multiple of 16 the last 16 are redrawn from the uniforms right after the last whole block
    /// (the f32 path redraws after all `numel`), so the values there, and every later draw,
    /// differ from rounding the f32 result. PyTorch 2.11 computes in the half type itself.
    pub fn randn_half(&mut self, numel: usize, dtype: candle_core::DType) -> Vec<f32> {
        let round = |v: f32| match dtype {
            candle_core::DType::BF16 => half::bf16::from_f32(v).to_f32(),
            _ => half::f16::from_f32(v).to_f32(),
        };
        if numel >= 16 && self.half_randn == HalfRandn::HalfMath {
            return self.randn_half_math(numel, dtype, round);
        }
        if numel < 16 {
            // `static_cast<scalar_t>(normal_distribution<double>)`: rounded from f64 directly.
            return (0..numel)
                .map(|_| {
                    let v = self.normal_f64();
                    match dtype {
                        candle_core::DType::BF16 => half::bf16::from_f64(v).to_f32(),
                        _ => half::f16::from_f64(v).to_f32(),
                    }
                })
                .collect();
        }
        let mut block = [0f32; 16];
        let mut draw_block = |g: &mut Self| {
            for v in block.iter_mut() {
                *v = g.uniform_f32();
            }
            normal_fill_16(&mut block);
            block.map(round)
        };
        let mut data = Vec::with_capacity(numel);
        for _ in 0..numel / 16 {
            data.extend(draw_block(self));
        }
        if !numel.is_multiple_of(16) {
            let tail = draw_block(self);
            data.truncate(numel - 16);
            data.extend(tail);
        }
        data
    }

    /// [`HalfRandn::HalfMath`]: PyTorch 2.11's `normal_fill<Half/BFloat16>` (numel >= 16).
    fn randn_half_math(&mut self, numel: usize, dtype: candle_core::DType, round: impl Fn(f32) -> f32) -> Vec<f32> {
        // `uniform_real_distribution<scalar_t>`: `digits` random bits (11 for f16, 8 for bf16).
        let digits = if dtype == candle_core::DType::BF16 { 8 } else { 11 };
        let uniform = |g: &mut Self| (g.next_u32() & ((1 << digits) - 1)) as f32 / (1u32 << digits) as f32;
        // std::log / sqrt / cos / sin on c10::Half return Half: each result is rounded. The
        // functions are evaluated in f64 and rounded to f32 first (correctly rounded f32 math),
        // which gives PyTorch's values once rounded to the half type.
        let fill16 = |d: &mut [f32]| {
            let two_pi = 2.0 * std::f64::consts::PI;
            for j in 0..8 {
                let u1 = 1.0 - d[j];
                let log = round(((u1 as f64).ln()) as f32);
                let radius = round(((round(-2.0 * log) as f64).sqrt()) as f32);
                let theta = round((two_pi * d[j + 8] as f64) as f32) as f64;
                // `radius * cos(theta) * std + mean` with std 1, mean 0: the `+ 0` turns a -0 into +0.
                d[j] = round(radius * round(theta.cos() as f32) + 0.0);
                d[j + 8] = round(radius * round(theta.sin() as f32) + 0.0);
            }
        };
        self.normal_fill(numel, uniform, fill16)
    }

    /// `torch.randn(shape, generator=self)` as a candle tensor (f32, CPU).
    pub fn randn_tensor<S: Into<candle_core::Shape>>(&mut self, shape: S) -> candle_core::Result<candle_core::Tensor> {
        let shape = shape.into();
        let data = self.randn(shape.elem_count());
        candle_core::Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
    }

    /// diffusers' `randn_tensor(shape, generator=cpu_generator, device=device, dtype=dtype)`:
    /// drawn on the CPU in `dtype` (f16 / bf16 draw differently from f32, see
    /// [`randn_half`](Self::randn_half)), then moved to `device`. This is what makes a GPU run
    /// start from the same noise as diffusers' (and as a CPU run in the same dtype).
    pub fn randn_on<S: Into<candle_core::Shape>>(
        &mut self,
        shape: S,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let shape = shape.into();
        let data = self.randn_as(shape.elem_count(), dtype);
        candle_core::Tensor::from_vec(data, shape, &candle_core::Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }
}

/// Box-Muller on 16 uniforms: the first 8 give the radii, the last 8 the angles.
fn normal_fill_16(data: &mut [f32]) {
    let two_pi = (2.0f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * cephes_logf(u1)).sqrt();
        let theta = two_pi * u2;
        let (s, c) = cephes_sincosf(theta);
        data[j] = radius * c;
        data[j + 8] = radius * s;
    }
}

// avx_mathfun's polynomials as PyTorch's x86 build runs them: the compiler fuses each
// multiply feeding an add into one FMA, so `mul_add` is used exactly there (verified bit for bit
// against torch.randn on 2^20 samples).

/// avx_mathfun's `log256_ps` for one lane (inputs here are in (0, 1]).
fn cephes_logf(x: f32) -> f32 {
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    // if x < sqrt(1/2) { e -= 1; x = x + x - 1 } else { x = x - 1 }, in avx_mathfun's order.
    let small = x < std::f32::consts::FRAC_1_SQRT_2;
    let tmp = if small { x } else { 0.0 };
    x -= 1.0;
    if small {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = 7.037_683_6E-2_f32;
    for c in [
        -1.151_461E-1_f32,
        1.167_699_84E-1,
        -1.242_014_1E-1,
        1.424_932_3E-1,
        -1.666_805_7E-1,
        2.000_071_4E-1,
        -2.499_999_4E-1,
        3.333_333E-1,
    ] {
        y = y.mul_add(x, c);
    }
    y *= x;
    y = y.mul_add(z, e * -2.121_944_4e-4_f32);
    y = (-z).mul_add(0.5, y);
    e.mul_add(0.693_359_4_f32, x + y)
}

/// avx_mathfun's `sincos256_ps` for one lane: returns (sin, cos).
fn cephes_sincosf(x: f32) -> (f32, f32) {
    let sign_in = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    let y = x * 1.273_239_5_f32; // 4 / pi
    let mut j = y as i32; // truncation, as _mm256_cvttps_epi32
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let poly_mask = (j & 2) == 0;
    // Extended-precision range reduction x - j * pi/4.
    x = y.mul_add(-0.785_156_25_f32, x);
    x = y.mul_add(-2.418_756_5e-4_f32, x);
    x = y.mul_add(-3.774_895e-8_f32, x);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_in ^ swap_sign_sin;
    let z = x * x;
    let mut yc = 2.443_315_7E-5_f32;
    yc = yc.mul_add(z, -1.388_731_6E-3);
    yc = yc.mul_add(z, 4.166_664_6E-2);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    let mut ys = -1.951_529_6E-4_f32;
    ys = ys.mul_add(z, 8.332_161E-3);
    ys = ys.mul_add(z, -1.666_665_5E-1);
    ys *= z;
    ys = ys.mul_add(x, x);
    let (s, c) = if poly_mask { (ys, yc) } else { (yc, ys) };
    (f32::from_bits(s.to_bits() ^ sign_sin), f32::from_bits(c.to_bits() ^ sign_cos))
}
