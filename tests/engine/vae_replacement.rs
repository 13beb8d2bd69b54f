//! `vae=` replacements (`--vae`: a tiny AutoencoderTiny, another AutoencoderKL) and per-step
//! previews through a tiny autoencoder (`--preview`), against diffusers'
//! LatentConsistencyModelPipeline (`tests/fixtures/make_vae_fixtures.py`).
use crate::common;

use lcm::models::vae::Autoencoder;
use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions};
use std::path::PathBuf;
use std::process::Command;

fn fixture(p: &str) -> PathBuf {
    common::fixtures().join(p)
}

fn reference(name: &str) -> Vec<u8> {
    let t = candle_core::safetensors::load(fixture("vaes/reference/pipelines.safetensors"), &candle_core::Device::Cpu)
        .unwrap();
    t[name].flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of a cat".into(),
        num_inference_steps: 4,
        guidance_scale: Some(8.5),
        width: Some(32),
        height: Some(32),
        seed: 0,
        ..Default::default()
    }
}

fn assert_close(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    let max = got.iter().zip(want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(max <= 2, "{what}: max pixel difference {max}/255");
}

fn load(vae: Option<&str>) -> LcmPipeline {
    let opts = LoadOptions { vae: vae.map(|v| fixture(v).to_str().unwrap().to_string()), ..Default::default() };
    LcmPipeline::load(fixture("models/tiny-lcm").to_str().unwrap(), &opts).unwrap()
}

#[test]
fn replaced_autoencoders_match_diffusers() {
    for (vae, case) in [("vaes/taesd-tiny", "lcm_taesd"), ("vaes/kl-alt", "lcm_kl_alt")] {
        let pipe = load(Some(vae));
        let image = &pipe.generate(&request(), |_, _| {}).unwrap()[0];
        assert_close(&image.pixels, &reference(case), case);
    }
}

#[test]
fn previews_match_diffusers_callback() {
    let pipe = load(None);
    let tiny = Autoencoder::load(&fixture("vaes/taesd-tiny"), None, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    assert!(tiny.is_tiny());
    let mut previews = Vec::new();
    let image = pipe
        .generate_with_callback(&request(), |step| {
            assert_eq!(step.total, 4);
            previews.push(pipe.decode_latents(&tiny, step.denoised, step.num_frames)?.remove(0));
            Ok(())
        })
        .unwrap();
    assert_close(&image[0].pixels, &reference("lcm_preview.final"), "final");
    assert_eq!(previews.len(), 4);
    for (i, p) in previews.iter().enumerate() {
        assert_close(&p.pixels, &reference(&format!("lcm_preview.step{i}")), &format!("step {i}"));
    }
    // A callback error stops the generation.
    let err = pipe.generate_with_callback(&request(), |_| anyhow::bail!("stop here")).unwrap_err();
    assert!(err.to_string().contains("stop here"));
}

fn lcm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lcm")).args(args).env("HF_HUB_OFFLINE", "1").output().unwrap()
}

fn png_pixels(path: &std::path::Path) -> Vec<u8> {
    lcm::image_io::read_png(path).unwrap().pixels
}

#[test]
fn cli_vae_and_previews() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("models/tiny-lcm");
    let taesd = fixture("vaes/taesd-tiny");
    let out = tmp.path().join("cat.png");
    let previews = tmp.path().join("previews");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--steps",
            "4",
            "--width",
            "32",
            "--height",
            "32",
            "--seed",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        lcm(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // --vae with the tiny autoencoder.
    let o = run(&["--vae", taesd.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close(&png_pixels(&out), &reference("lcm_taesd"), "cli --vae");
    // --preview with the same tiny autoencoder: one PNG per step, the model's own VAE at the end.
    let out2 = tmp.path().join("cat2.png");
    let o = run(&[
        "--preview",
        previews.to_str().unwrap(),
        "--preview-vae",
        taesd.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close(&png_pixels(&out2), &reference("lcm_preview.final"), "cli final");
    for i in 0..4 {
        let p = previews.join(format!("step-{:02}.png", i + 1));
        assert_close(&png_pixels(&p), &reference(&format!("lcm_preview.step{i}")), &format!("cli step {i}"));
    }
    // Existing previews are not overwritten without --overwrite; nothing is generated.
    let out3 = tmp.path().join("cat3.png");
    let o = run(&[
        "--preview",
        previews.to_str().unwrap(),
        "--preview-vae",
        taesd.to_str().unwrap(),
        "-o",
        out3.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.trim().lines().count() == 1 && err.contains("--overwrite"), "{err}");
    assert!(!out3.exists());
    // A UNet folder is not an autoencoder.
    let unet = model.join("unet");
    let o = run(&["--vae", unet.to_str().unwrap(), "-o", out3.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && o.status.code() != Some(101) && err.trim().lines().count() == 1, "{err}");
    assert!(err.contains("UNet2DConditionModel") && err.contains("not an AutoencoderKL or AutoencoderTiny"), "{err}");
}

/// Latents with the wrong channel count are an error, for both kinds of autoencoder (the CPU
/// convolution checks the input against the kernel).
#[test]
fn wrong_latent_channels_are_errors() {
    for vae in ["vaes/kl-alt", "vaes/taesd-tiny"] {
        let ae = Autoencoder::load(&fixture(vae), None, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let z = candle_core::Tensor::zeros(
            (1, ae.latent_channels() + 1, 4, 4),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let err = ae.decode(&z).unwrap_err();
        assert!(err.to_string().contains("channels"), "{vae}: {err}");
    }
}
