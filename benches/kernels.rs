//! Kernel rates (GFLOP/s) of `lcm::ops` against candle's stock kernels, on the shapes that
//! dominate SD1.5: `cargo bench --bench kernels [-- NAME...]`.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn rate(name: &str, flops: f64, mut f: impl FnMut()) {
    f();
    let mut best = f64::MAX;
    let mut total = 0.0;
    let mut n = 0;
    while total < 3.0 || n < 3 {
        let t = Instant::now();
        f();
        let s = t.elapsed().as_secs_f64();
        best = best.min(s);
        total += s;
        n += 1;
    }
    println!("{name:<48} {:>8.1} GFLOP/s  (best {:.4} s of {n})", flops / best / 1e9, best);
}

/// The AMX 3x3 convolution on a kernel packed once, where this CPU has it.
fn amx_conv_rate(x: &[f32], w: &[f32], c: usize, hw: usize, co: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use lcm::kernels::amx_conv;
        if amx_conv::applies(c, co, 3, 1, 1) {
            let wt = amx_conv::ConvTiles::new(w, co, c);
            let fl = 2.0 * (co * c * 9 * hw * hw) as f64;
            rate(&format!("conv3x3 {c}->{co} {hw}^2 amx tiles"), fl, || {
                amx_conv::conv3x3(x, &wt, None, 1, hw, hw);
            });
        }
    }
    let _ = (x, w, c, hw, co);
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let want = |n: &str| args.is_empty() || args.iter().any(|a| n.contains(a.as_str()));
    println!("CPU path {}", lcm::kernels::CpuPath::current().name());
    let dev = Device::Cpu;
    if want("gemm") {
        for &s in &[512usize, 2048] {
            let a = Tensor::randn(0f32, 1., (s, s), &dev)?;
            let b = Tensor::randn(0f32, 1., (s, s), &dev)?;
            let fl = 2.0 * (s * s * s) as f64;
            rate(&format!("gemm {s}^3 lcm::ops::linear"), fl, || {
                lcm::ops::linear(&a, &b, None).unwrap();
            });
            let bb = b.to_dtype(candle_core::DType::BF16)?;
            rate(&format!("gemm {s}^3 bf16 weights"), fl, || {
                lcm::ops::linear(&a, &bb, None).unwrap();
            });
            rate(&format!("gemm {s}^3 candle matmul"), fl, || {
                a.matmul(&b.t().unwrap()).unwrap();
            });
        }
    }
    if want("linear") {
        for &(rows, i, o) in &[
            (4096usize, 320usize, 320usize),
            (4096, 320, 2560),
            (4096, 320, 1280),
            (1024, 320, 2560),
            (4096, 320, 2048),
            (4096, 320, 2576),
            (4096, 1280, 320),
            (1024, 640, 5120),
            (77, 768, 3072),
        ] {
            let x = Tensor::randn(0f32, 1., (rows, i), &dev)?;
            let w = Tensor::randn(0f32, 1., (o, i), &dev)?;
            let fl = 2.0 * (rows * i * o) as f64;
            rate(&format!("linear {rows}x{i}->{o} lcm::ops::linear"), fl, || {
                lcm::ops::linear(&x, &w, None).unwrap();
            });
            // bf16 weights: bf16 products where the CPU has them, else widened to f32.
            let wb = w.to_dtype(candle_core::DType::BF16)?;
            rate(&format!("linear {rows}x{i}->{o} bf16 weights"), fl, || {
                lcm::ops::linear(&x, &wb, None).unwrap();
            });
            // As a model holds them on AMX: packed once at load.
            if lcm::kernels::CpuPath::current() >= lcm::kernels::CpuPath::AmxBf16 {
                let v = wb.flatten_all()?.to_vec1::<half::bf16>()?;
                let wt = lcm::kernels::gemm::Strided { data: &v[..], row_stride: 1, col_stride: i };
                let packed = lcm::kernels::gemm::PackedB::new(i, o, &wt, lcm::kernels::gemm::Arith::Bf16);
                let tiled = lcm::nn::TiledWeight { operand: lcm::nn::TiledOperand::Right(packed), dims: vec![o, i] };
                rate(&format!("linear {rows}x{i}->{o} bf16 packed at load"), fl, || {
                    lcm::ops::linear_tiled(&x, &tiled, None).unwrap();
                });
            }
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let wq = lcm::kernels::int8::Int8Matrix::quantize(
                &w.flatten_all()?.to_vec1::<f32>()?,
                o,
                i,
                lcm::kernels::int8::Side::Right,
            );
            rate(&format!("linear {rows}x{i}->{o} int8 weights"), fl, || {
                lcm::kernels::int8::linear(&xs, rows, &wq, None);
            });
        }
    }
    if want("conv") {
        for &(c, hw, co) in &[
            (320usize, 64usize, 320usize),
            (640, 32, 640),
            (1280, 16, 1280),
            (640, 16, 640),
            (128, 256, 128),
            (512, 64, 512),
            (4, 64, 320),
        ] {
            let x = Tensor::randn(0f32, 1., (1, c, hw, hw), &dev)?;
            let w = Tensor::randn(0f32, 1., (co, c, 3, 3), &dev)?;
            let fl = 2.0 * (co * c * 9 * hw * hw) as f64;
            rate(&format!("conv3x3 {c}->{co} {hw}^2 lcm::ops::conv2d"), fl, || {
                lcm::ops::conv2d(&x, &w, None, 1, 1).unwrap();
            });
            let wb = w.to_dtype(candle_core::DType::BF16)?;
            rate(&format!("conv3x3 {c}->{co} {hw}^2 bf16 weights"), fl, || {
                lcm::ops::conv2d(&x, &wb, None, 1, 1).unwrap();
            });
            let (xs, ws): (Vec<f32>, Vec<f32>) = (x.flatten_all()?.to_vec1()?, w.flatten_all()?.to_vec1()?);
            amx_conv_rate(&xs, &ws, c, hw, co);
            let wq = lcm::kernels::int8::Int8Matrix::quantize(&ws, co, c * 9, lcm::kernels::int8::Side::Left);
            let shape = lcm::kernels::conv::ConvShape {
                batch: 1,
                c_in: c,
                h: hw,
                w: hw,
                c_out: co,
                kh: 3,
                kw: 3,
                stride: 1,
                padding: 1,
            };
            rate(&format!("conv3x3 {c}->{co} {hw}^2 int8 weights"), fl, || {
                lcm::kernels::int8::conv2d(&xs, &wq, None, &shape);
            });
            rate(&format!("conv3x3 {c}->{co} {hw}^2 candle"), fl, || {
                x.conv2d(&w, 1, 1, 1, 1).unwrap();
            });
        }
    }
    // The autoencoder's large images: bf16 weights only (the f32 and candle rows take minutes).
    if want("vae_conv") {
        for &(c, hw) in &[(512usize, 128usize), (256, 256), (128, 512), (256, 512)] {
            let x = Tensor::randn(0f32, 1., (1, c, hw, hw), &dev)?;
            let w = Tensor::randn(0f32, 1., (c, c, 3, 3), &dev)?;
            let fl = 2.0 * (c * c * 9 * hw * hw) as f64;
            let wb = w.to_dtype(candle_core::DType::BF16)?;
            rate(&format!("conv3x3 {c}->{c} {hw}^2 bf16 weights"), fl, || {
                lcm::ops::conv2d(&x, &wb, None, 1, 1).unwrap();
            });
            amx_conv_rate(&x.flatten_all()?.to_vec1()?, &w.flatten_all()?.to_vec1()?, c, hw, c);
        }
    }
    if want("attention") {
        for &(l, heads, d) in &[(4096usize, 8usize, 40usize), (1024, 8, 80)] {
            let q = Tensor::randn(0f32, 1., (1, heads, l, d), &dev)?;
            let fl = 4.0 * (heads * l * l * d) as f64;
            rate(&format!("attention {heads}x{l}x{d} lcm::ops::attention"), fl, || {
                lcm::ops::attention(&q, &q, &q, 0.1, false, q.dtype()).unwrap();
            });
            let bf16 = q.to_dtype(candle_core::DType::BF16)?;
            rate(&format!("attention {heads}x{l}x{d} bf16 products"), fl, || {
                lcm::ops::attention(&q, &q, &q, 0.1, false, bf16.dtype()).unwrap();
            });
        }
    }
    if want("group_norm") {
        let x = Tensor::randn(0f32, 1., (1, 128, 512, 512), &dev)?;
        let w = Tensor::ones(128, candle_core::DType::F32, &dev)?;
        let t = Instant::now();
        for _ in 0..3 {
            lcm::ops::group_norm(&x, 32, &w, &w, 1e-6).unwrap();
        }
        println!("group_norm 128x512^2: {:.4} s", t.elapsed().as_secs_f64() / 3.0);
    }
    Ok(())
}
