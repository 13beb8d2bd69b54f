//! The `lcm` binary: diffusers' images from a folder it has never seen, PNG metadata, and one-line
//! errors with a non-zero exit on bad input.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lcm(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lcm"));
    cmd.args(args).env("HF_HUB_OFFLINE", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A fresh copy of a fixture model under a name the code has never seen.
fn fresh_model(tmp: &Path, fixture: &str) -> PathBuf {
    let dst = tmp.join(format!("{fixture}-copy"));
    copy_dir(&common::fixtures().join("models").join(fixture), &dst);
    dst
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must fail: non-zero exit, one `error:` line, no panic.
fn assert_clean_error(o: &Output, must_contain: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert_ne!(o.status.code(), Some(101), "panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    // One short line: details are for `RUST_LOG`, not for the message (temporary paths here are
    // ~40 characters longer than a user's would be).
    assert!(lines[0].chars().count() <= 240, "{} characters: {err}", lines[0].chars().count());
    assert!(err.to_lowercase().contains(&must_contain.to_lowercase()), "expected `{must_contain}` in: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
}

fn reference_image(case_name: &str) -> Vec<u8> {
    let refs = common::reference("pipelines.safetensors");
    refs[case_name].flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn assert_close(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    let max = got.iter().zip(want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(max <= 2, "{what}: max pixel difference {max}/255");
}

#[test]
fn generates_diffusers_image_from_unseen_lcm_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fresh_model(tmp.path(), "tiny-lcm");
    let out = tmp.path().join("cat.png");
    let o = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--seed",
            "0",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let img = lcm::image_io::read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (32, 32));
    assert_close(&img.pixels, &reference_image("lcm_steps4"), "cli lcm_steps4");
    let params = lcm::image_io::read_png_parameters(&out).unwrap().expect("parameters chunk");
    assert!(
        params.starts_with("a photo of a cat\nSteps: 4, Sampler: LCM, CFG scale: 8.5, Seed: 0, Size: 32x32"),
        "{params}"
    );

    // The output exists now: refused without --overwrite, and the file is untouched.
    let before = std::fs::read(&out).unwrap();
    let again = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "another",
            "--seed",
            "1",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&again, "already exists");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let forced = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "another",
            "--seed",
            "1",
            "--output",
            out.to_str().unwrap(),
            "--overwrite",
        ],
        &[],
    );
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_ne!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn cfg_with_negative_prompt_and_numbered_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fresh_model(tmp.path(), "tiny-sd");
    let out = tmp.path().join("dog.png");
    let o = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a dog",
            "--negative-prompt",
            "blurry, low quality",
            "--guidance-scale",
            "2",
            "--steps",
            "4",
            "--seed",
            "0",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_close(&lcm::image_io::read_png(&out).unwrap().pixels, &reference_image("sd_lcm_cfg_on_neg_steps4"), "cfg");
    let params = lcm::image_io::read_png_parameters(&out).unwrap().unwrap();
    assert!(params.contains("\nNegative prompt: blurry, low quality\n"), "{params}");

    let out2 = tmp.path().join("car.png");
    let o = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red car parked on a street",
            "--guidance-scale",
            "2",
            "--steps",
            "2",
            "--seed",
            "5",
            "--num-images",
            "2",
            "--output",
            out2.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want = reference_image("sd_lcm_cfg_on_steps2_n2");
    let half = want.len() / 2;
    for (i, chunk) in [&want[..half], &want[half..]].iter().enumerate() {
        let img = lcm::image_io::read_png(&tmp.path().join(format!("car-{}.png", i + 1))).unwrap();
        assert_close(&img.pixels, chunk, "batch image");
    }
    assert!(!out2.exists());
}

#[test]
fn unet_replacement_from_a_path() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fresh_model(tmp.path(), "tiny-sd");
    let unet = fresh_model(tmp.path(), "tiny-lcm").join("unet");
    let out = tmp.path().join("swap.png");
    let o = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--unet",
            unet.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--guidance-scale",
            "8.5",
            "--seed",
            "0",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_close(
        &lcm::image_io::read_png(&out).unwrap().pixels,
        &reference_image("sd_with_lcm_unet_g8.5"),
        "unet swap",
    );
}

#[test]
fn bad_input_gives_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("x.png");
    let o = out.to_str().unwrap();
    let run = |model: &Path, extra: &[&str]| {
        let mut args =
            vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "p", "--seed", "0", "--output", o];
        args.extend_from_slice(extra);
        lcm(&args, &[])
    };

    assert_clean_error(&run(&t.join("nope"), &[]), "");
    assert_clean_error(
        &lcm(&["generate", "--model", "./no/such/folder", "--prompt", "p", "--output", o], &[]),
        "does not exist",
    );

    // A hub id that is not in the (empty) cache, offline: says so and how to pass a folder.
    let o2 = lcm(
        &["generate", "--model", "some-org/some-model", "--prompt", "p", "--output", o],
        &[("HF_HOME", t.to_str().unwrap())],
    );
    assert_clean_error(&o2, "local");

    let good = fresh_model(t, "tiny-lcm");
    assert_clean_error(&run(&good, &["--width", "33"]), "multiple");
    assert_clean_error(&run(&good, &["--steps", "0"]), "steps");
    assert_clean_error(&run(&good, &["--variant", "fp16"]), "fp16");

    // Missing component.
    let m = t.join("m1");
    copy_dir(&good, &m);
    std::fs::remove_dir_all(m.join("vae")).unwrap();
    assert_clean_error(&run(&m, &[]), "vae");

    // Truncated weights.
    let m = t.join("m2");
    copy_dir(&good, &m);
    let w = m.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(&run(&m, &[]), "diffusion_pytorch_model.safetensors");

    // Not a safetensors file at all.
    let m = t.join("m3");
    copy_dir(&good, &m);
    std::fs::write(m.join("vae/diffusion_pytorch_model.safetensors"), b"this is not safetensors").unwrap();
    assert_clean_error(&run(&m, &[]), "vae");

    // A config missing a key: like transformers, the default (hidden_size 512) is used, which
    // the weights then contradict.
    let m = t.join("m4");
    copy_dir(&good, &m);
    let cfg_path = m.join("text_encoder/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_clean_error(&run(&m, &[]), "shape mismatch for text_model.embeddings.token_embedding.weight");

    // A config with a value of the wrong type, and one that is not JSON.
    let m = t.join("m6");
    copy_dir(&good, &m);
    let cfg_path = m.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["layers_per_block"] = serde_json::json!("two");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_clean_error(&run(&m, &[]), "unet/config.json");
    std::fs::write(m.join("scheduler/scheduler_config.json"), "{ not json").unwrap();
    std::fs::copy(good.join("unet/config.json"), &cfg_path).unwrap();
    assert_clean_error(&run(&m, &[]), "scheduler_config.json");

    // A tensor of the wrong shape (config and weights disagree).
    let m = t.join("m5");
    copy_dir(&good, &m);
    let cfg_path = m.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["cross_attention_dim"] = serde_json::json!(48);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_clean_error(&run(&m, &[]), "shape");

    // An inpainting (9-channel) UNet cannot do text-to-image.
    let unet9 = common::fixtures().join("models/unets/inpaint9");
    assert_clean_error(&run(&good, &["--unet", unet9.to_str().unwrap()]), "inpainting UNet");
    assert!(!out.exists(), "no output may be written on errors");
}

/// A model diffusers already downloaded sits in the Hugging Face cache
/// (`HF_HOME/hub/models--org--name/{refs/main,snapshots/<commit>/...}`): it is reused offline.
#[test]
fn hub_repo_id_resolves_from_the_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hf/hub/models--tiny-org--tiny-lcm");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(&common::fixtures().join("models/tiny-lcm"), &repo.join("snapshots").join(commit));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let out = tmp.path().join("cat.png");
    let hf_home = tmp.path().join("hf");
    let args = [
        "generate",
        "--model",
        "tiny-org/tiny-lcm",
        "--prompt",
        "a photo of a cat",
        "--seed",
        "0",
        "--output",
        out.to_str().unwrap(),
    ];
    let o = lcm(&args, &[("HF_HOME", hf_home.to_str().unwrap())]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_close(&lcm::image_io::read_png(&out).unwrap().pixels, &reference_image("lcm_steps4"), "from cache");

    // HF_HUB_CACHE points straight at the hub folder.
    let out2 = tmp.path().join("cat2.png");
    let args2 = [
        "generate",
        "--model",
        "tiny-org/tiny-lcm",
        "--prompt",
        "a photo of a cat",
        "--seed",
        "0",
        "--output",
        out2.to_str().unwrap(),
    ];
    let o = lcm(&args2, &[("HF_HOME", "/nonexistent"), ("HF_HUB_CACHE", hf_home.join("hub").to_str().unwrap())]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// An argument naming an existing local path is a path, even when it looks like `org/name`.
#[test]
fn existing_path_wins_over_repo_id() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&common::fixtures().join("models/tiny-lcm"), &tmp.path().join("SimianLuo/LCM_Dreamshaper_v7"));
    let o = Command::new(env!("CARGO_BIN_EXE_lcm"))
        .current_dir(tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.path().join("empty-cache"))
        .args([
            "generate",
            "--model",
            "SimianLuo/LCM_Dreamshaper_v7",
            "--prompt",
            "a photo of a cat",
            "--seed",
            "0",
            "--output",
            "cat.png",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let img = lcm::image_io::read_png(&tmp.path().join("cat.png")).unwrap();
    assert_close(&img.pixels, &reference_image("lcm_steps4"), "local org/name path");
}

/// `--variant fp16` picks `*.fp16.safetensors` (loaded into f32, as diffusers does without
/// `torch_dtype`); without it the plain files are used even when both are present.
#[test]
fn variant_picks_fp16_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fresh_model(tmp.path(), "tiny-lcm");
    for (comp, file) in
        [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]
    {
        let src = model.join(comp).join(format!("{file}.safetensors"));
        let tensors = candle_core::safetensors::load(&src, &candle_core::Device::Cpu).unwrap();
        let half: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .into_iter()
            .map(|(k, v)| {
                let v =
                    if v.dtype() == candle_core::DType::F32 { v.to_dtype(candle_core::DType::F16).unwrap() } else { v };
                (k, v)
            })
            .collect();
        candle_core::safetensors::save(&half, model.join(comp).join(format!("{file}.fp16.safetensors"))).unwrap();
    }
    let run = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--seed",
            "0",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = lcm(&args, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        lcm::image_io::read_png(&out).unwrap().pixels
    };
    let plain = run("plain.png", &[]);
    assert_close(&plain, &reference_image("lcm_steps4"), "plain weights beside fp16 ones");
    let half = run("half.png", &["--variant", "fp16"]);
    assert_ne!(half, plain, "fp16 weights must have been used");
    let mean_diff = half.iter().zip(&plain).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / half.len() as f64;
    assert!(mean_diff < 8.0, "fp16 image far from the f32 one: mean diff {mean_diff}");
}

#[test]
fn lora_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fresh_model(tmp.path(), "tiny-sd");
    let loras = common::fixtures().join("loras");
    let run = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a dog",
            "--guidance-scale",
            "1",
            "--steps",
            "2",
            "--seed",
            "1",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        (lcm(&args, &[]), out)
    };
    let listing = common::reference_json("lora_pipelines.json");
    let case = listing["cases"].as_array().unwrap().iter().find(|c| c["name"] == "kohya_w0.7_steps2").unwrap().clone();
    assert_eq!(case["seed"], 1);
    let kohya = loras.join("kohya/style_lora.safetensors");
    let (o, out) = run("k.png", &["--lora", &format!("{}@0.7", kohya.display())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = common::reference("lora_pipelines.safetensors")["kohya_w0.7_steps2"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_close(&lcm::image_io::read_png(&out).unwrap().pixels, &want, "--lora kohya@0.7");

    // A partial match: a warning with counts, and the image is made.
    let (o, out) = run("p.png", &["--lora", loras.join("partial").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: LoRA `partial`: 12 of its keys match nothing"), "{}", stderr(&o));
    assert!(out.exists());

    // Nothing matches: an error naming some keys; a bad weight; a missing file.
    let (o, _) = run("n.png", &["--lora", loras.join("nomatch").to_str().unwrap()]);
    assert_clean_error(&o, "another base model");
    let (o, _) = run("n.png", &["--lora", &format!("{}@strong", kohya.display())]);
    assert_clean_error(&o, "not a weight");
    let (o, _) = run("n.png", &["--lora", tmp.path().join("missing.safetensors").to_str().unwrap()]);
    assert_clean_error(&o, "missing.safetensors");
    let not_lora = model.join("vae/diffusion_pytorch_model.safetensors");
    let (o, _) = run("n.png", &["--lora", not_lora.to_str().unwrap()]);
    assert_clean_error(&o, "not a LoRA");
}

#[test]
fn sdxl_from_an_unseen_folder_with_cfg() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fresh_model(tmp.path(), "tiny-sdxl");
    let listing = common::reference_json("sdxl_pipelines.json");
    let case =
        listing["cases"].as_array().unwrap().iter().find(|c| c["name"] == "sdxl_base_cfg2_neg_steps4").unwrap().clone();
    let out = tmp.path().join("xl.png");
    let seed = case["seed"].to_string();
    let o = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--negative-prompt",
            case["negative_prompt"].as_str().unwrap(),
            "--guidance-scale",
            "2",
            "--seed",
            &seed,
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want = common::reference("sdxl_pipelines.safetensors")["sdxl_base_cfg2_neg_steps4"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_close(&lcm::image_io::read_png(&out).unwrap().pixels, &want, "sdxl cli");
    let params = lcm::image_io::read_png_parameters(&out).unwrap().unwrap();
    assert!(params.contains("Pipeline: StableDiffusionXLPipeline"), "{params}");
}

#[test]
fn image_to_image_and_inpainting_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let photo = fx.join("images/photo_45x37.png");
    let mask = fx.join("images/mask_45x37.png");
    let model = fresh_model(tmp.path(), "tiny-lcm");
    let run = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a mountain lake at sunset, photo",
            "--seed",
            "0",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        (lcm(&args, &[]), out)
    };
    // Image-to-image: the output takes the image's size rounded down to the VAE factor (45x37 -> 44x36).
    let (o, out) = run("i2i.png", &["--image", photo.to_str().unwrap(), "--strength", "0.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = lcm::image_io::read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (44, 36));
    let want = common::reference("img2img_pipelines.safetensors")["lcm_img2img_s0.5"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_close(&img.pixels, &want, "cli img2img");
    assert!(lcm::image_io::read_png_parameters(&out).unwrap().unwrap().contains("Denoising strength: 0.5"));

    // Inpainting runs (the LCM folder's 4-channel UNet, latent blending) and, as diffusers'
    // StableDiffusionInpaintPipeline, defaults to the UNet's size (sample_size 16 x factor 2),
    // not the image's.
    let (o, out) =
        run("inp.png", &["--image", photo.to_str().unwrap(), "--mask-image", mask.to_str().unwrap(), "--steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = lcm::image_io::read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (32, 32));

    // A mask of another size is resized to the output, as diffusers' mask processor does.
    let other_mask = fx.join("images/mask_50x30.png");
    let (o, out) = run(
        "other-mask.png",
        &["--image", photo.to_str().unwrap(), "--mask-image", other_mask.to_str().unwrap(), "--steps", "2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(lcm::image_io::read_png(&out).unwrap().width, 32);

    // Errors: strength out of range, mask without image, unreadable image.
    for s in ["--strength=0", "--strength=1.5", "--strength=-0.2"] {
        let (o, _) = run("e.png", &["--image", photo.to_str().unwrap(), s]);
        assert_clean_error(&o, "strength");
    }
    let (o, _) = run("e.png", &["--mask-image", mask.to_str().unwrap()]);
    assert_clean_error(&o, "mask image needs an image");
    let bogus = tmp.path().join("bogus.png");
    std::fs::write(&bogus, b"not an image").unwrap();
    let (o, _) = run("e.png", &["--image", bogus.to_str().unwrap()]);
    assert_clean_error(&o, "bogus.png");
    // A 9-channel inpainting UNet without a mask.
    let unet9 = fx.join("models/unets/inpaint9");
    let sd = fresh_model(tmp.path(), "tiny-sd");
    let o = lcm(
        &[
            "generate",
            "--model",
            sd.to_str().unwrap(),
            "--unet",
            unet9.to_str().unwrap(),
            "--prompt",
            "p",
            "--image",
            photo.to_str().unwrap(),
            "--output",
            tmp.path().join("e.png").to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&o, "inpainting");
    assert!(!tmp.path().join("e.png").exists());
}

/// `--lora org/name` resolves through the Hugging Face cache like models do.
#[test]
fn lora_from_the_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = tmp.path().join("hf/hub/models--latent-consistency--lcm-lora-tiny");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(
        common::fixtures().join("loras/lcm_like/pytorch_lora_weights.safetensors"),
        snap.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let model = fresh_model(tmp.path(), "tiny-sd");
    let listing = common::reference_json("lora_pipelines.json");
    let case = listing["cases"].as_array().unwrap().iter().find(|c| c["name"] == "lcm_like_w1").unwrap().clone();
    let out = tmp.path().join("l.png");
    let (steps, seed, g) =
        (case["num_inference_steps"].to_string(), case["seed"].to_string(), case["guidance_scale"].to_string());
    let o = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--lora",
            "latent-consistency/lcm-lora-tiny",
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--steps",
            &steps,
            "--seed",
            &seed,
            "--guidance-scale",
            &g,
            "--output",
            out.to_str().unwrap(),
        ],
        &[("HF_HOME", tmp.path().join("hf").to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want =
        common::reference("lora_pipelines.safetensors")["lcm_like_w1"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_close(&lcm::image_io::read_png(&out).unwrap().pixels, &want, "hub lora");
}

/// ControlNet, T2I-Adapter and Canny flags: the CLI reproduces diffusers' ControlNet / Adapter
/// pipeline references from copies under unseen names, and refuses bad combinations cleanly.
#[test]
fn controlnet_adapter_and_canny_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let photo = fx.join("images/photo_45x37.png");
    let photo2 = fx.join("images/photo_50x30.png");
    let cn_a = tmp.path().join("my-controlnet");
    copy_dir(&fx.join("controlnets/sd"), &cn_a);
    let cn_b = fx.join("controlnets/sd_bgr");
    let sd = fresh_model(tmp.path(), "tiny-sd");
    let lora = fx.join("loras/lcm_like");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |out: &str, args: &[String]| {
        let out = tmp.path().join(out);
        let mut all: Vec<String> = vec!["generate".into(), "--output".into(), s(&out)];
        all.extend_from_slice(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        (lcm(&all, &[]), out)
    };
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let refs = common::reference("controlnet_pipelines.safetensors");
    let want = |name: &str, r: &std::collections::HashMap<String, candle_core::Tensor>| {
        r[name].flatten_all().unwrap().to_vec1::<u8>().unwrap()
    };

    // One ControlNet + LCM-LoRA; the output takes the control image's size (45x37 -> 44x36).
    let base = [v(&["--model", &s(&sd), "--lora", &s(&lora), "--guidance-scale", "1"])].concat();
    let (o, out) = run(
        "cn.png",
        &[
            base.clone(),
            v(&[
                "--controlnet",
                &s(&cn_a),
                "--control-image",
                &s(&photo),
                "--controlnet-scale",
                "0.8",
                "--seed",
                "0",
                "--prompt",
                "a mountain lake at sunset, photo",
            ]),
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let img = lcm::image_io::read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (44, 36));
    assert_close(&img.pixels, &want("sd_cn_lcmlora_g1", &refs), "cli controlnet");
    assert!(lcm::image_io::read_png_parameters(&out)
        .unwrap()
        .unwrap()
        .contains("ControlNet: my-controlnet (scale 0.8"));

    // Two ControlNets with per-ControlNet scales and guidance windows.
    let (o, out) = run(
        "multi.png",
        &[
            base.clone(),
            v(&[
                "--controlnet",
                &s(&cn_a),
                "--control-image",
                &s(&photo),
                "--controlnet",
                &s(&cn_b),
                "--control-image",
                &s(&photo2),
                "--controlnet-scale",
                "0.6",
                "--controlnet-scale",
                "1.1",
                "--control-guidance-start",
                "0",
                "--control-guidance-start",
                "0.25",
                "--control-guidance-end",
                "0.5",
                "--control-guidance-end",
                "1",
                "--width",
                "32",
                "--height",
                "32",
                "--seed",
                "2",
                "--prompt",
                "a mountain lake at sunset, photo",
            ]),
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_close(
        &lcm::image_io::read_png(&out).unwrap().pixels,
        &want("sd_multicn_start_end", &refs),
        "cli multi-controlnet",
    );

    // T2I-Adapter on SDXL with LCM-LoRA-SDXL and a conditioning factor.
    let xl = fresh_model(tmp.path(), "tiny-sdxl");
    let arefs = common::reference("adapter_pipelines.safetensors");
    let (o, out) = run(
        "ad.png",
        &[v(&[
            "--model",
            &s(&xl),
            "--lora",
            &s(&fx.join("loras/sdxl_lcm_like")),
            "--guidance-scale",
            "1",
            "--adapter",
            &s(&fx.join("adapters/full_xl")),
            "--adapter-image",
            &s(&photo),
            "--adapter-scale",
            "0.9",
            "--adapter-conditioning-factor",
            "0.5",
            "--width",
            "40",
            "--height",
            "32",
            "--seed",
            "3",
            "--prompt",
            "a mountain lake at sunset, photo",
        ])]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_close(
        &lcm::image_io::read_png(&out).unwrap().pixels,
        &want("sdxl_adapter_lcmlora_factor0.5", &arefs),
        "cli adapter",
    );

    // `lcm canny` writes a binary edge map of the same size; `--canny` runs it on the fly.
    let edges = tmp.path().join("edges.png");
    let o = lcm(&["canny", &s(&photo), &s(&edges)], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = lcm::image_io::read_png(&edges).unwrap();
    assert_eq!((e.width, e.height), (45, 37));
    assert!(e.pixels.iter().all(|&p| p == 0 || p == 255) && e.pixels.contains(&255));
    let o = lcm(&["canny", &s(&photo), &s(&edges)], &[]);
    assert_clean_error(&o, "already exists");
    let o = lcm(&["canny", &s(&tmp.path().join("missing.png")), &s(&tmp.path().join("x.png"))], &[]);
    assert_clean_error(&o, "missing.png");
    let (o, canny_out) = run(
        "canny_fly.png",
        &[
            base.clone(),
            v(&[
                "--controlnet",
                &s(&cn_a),
                "--control-image",
                &s(&photo),
                "--canny",
                "--steps",
                "1",
                "--seed",
                "5",
                "--prompt",
                "p",
            ]),
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (o, edges_out) = run(
        "canny_file.png",
        &[
            base.clone(),
            v(&[
                "--controlnet",
                &s(&cn_a),
                "--control-image",
                &s(&edges),
                "--steps",
                "1",
                "--seed",
                "5",
                "--prompt",
                "p",
            ]),
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        lcm::image_io::read_png(&canny_out).unwrap().pixels == lcm::image_io::read_png(&edges_out).unwrap().pixels,
        "--canny differs from `lcm canny` + --control-image"
    );

    // Errors: one line, non-zero exit, no output written.
    let cn1 = v(&["--controlnet", &s(&cn_a)]);
    let img1 = v(&["--control-image", &s(&photo)]);
    let p = v(&["--prompt", "p"]);
    for (args, msg) in [
        ([base.clone(), cn1.clone(), p.clone()].concat(), "--control-image"),
        ([base.clone(), cn1.clone(), img1.clone(), img1.clone(), p.clone()].concat(), "one image per ControlNet"),
        (
            [
                base.clone(),
                cn1.clone(),
                img1.clone(),
                v(&["--controlnet-scale", "1", "--controlnet-scale", "2", "--controlnet-scale", "3"]),
                p.clone(),
            ]
            .concat(),
            "--controlnet-scale",
        ),
        ([base.clone(), v(&["--controlnet-scale", "0.5"]), p.clone()].concat(), "need --controlnet"),
        (
            [base.clone(), v(&["--controlnet", &s(&fx.join("controlnets/sdxl"))]), img1.clone(), p.clone()].concat(),
            "another base model",
        ),
        (
            [base.clone(), cn1.clone(), img1.clone(), v(&["--pipeline", "lcm"]), p.clone()].concat(),
            "use the StableDiffusion pipeline",
        ),
        (
            [
                base.clone(),
                cn1.clone(),
                img1.clone(),
                v(&["--control-guidance-start", "0.9", "--control-guidance-end", "0.2"]),
                p.clone(),
            ]
            .concat(),
            "guidance start",
        ),
        ([base.clone(), cn1.clone(), img1.clone(), v(&["--canny", "--canny-low=-5"]), p.clone()].concat(), "threshold"),
        ([base.clone(), v(&["--adapter", &s(&fx.join("adapters/full_sd"))]), p.clone()].concat(), "--adapter-image"),
        (
            [
                base.clone(),
                v(&[
                    "--adapter",
                    &s(&fx.join("adapters/full_sd")),
                    "--adapter-image",
                    &s(&photo),
                    "--adapter-conditioning-factor",
                    "1.5",
                ]),
                p.clone(),
            ]
            .concat(),
            "conditioning factor",
        ),
        ([base.clone(), v(&["--controlnet", &s(&tmp.path().join("nope"))]), img1.clone(), p.clone()].concat(), "nope"),
    ] {
        let (o, out) = run("err.png", &args);
        assert_clean_error(&o, msg);
        assert!(!out.exists());
    }
}

/// `--controlnet org/name` resolves through the Hugging Face cache (files at the repo root, as
/// lllyasviel/sd-controlnet-canny has them); an uncached repo offline is one clear line.
#[test]
fn controlnet_from_the_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = tmp.path().join("hf/hub/models--lllyasviel--sd-controlnet-tiny");
    let snap = repo.join("snapshots").join(commit);
    copy_dir(&fx.join("controlnets/sd"), &snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let model = fresh_model(tmp.path(), "tiny-sd");
    let out = tmp.path().join("c.png");
    let hf = [("HF_HOME", tmp.path().join("hf").to_str().unwrap().to_string())];
    let envs: Vec<(&str, &str)> = hf.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = |cn: &str| {
        vec![
            "generate".to_string(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--lora".into(),
            fx.join("loras/lcm_like").to_str().unwrap().into(),
            "--guidance-scale".into(),
            "1".into(),
            "--controlnet".into(),
            cn.into(),
            "--control-image".into(),
            fx.join("images/photo_45x37.png").to_str().unwrap().into(),
            "--controlnet-scale".into(),
            "0.8".into(),
            "--seed".into(),
            "0".into(),
            "--prompt".into(),
            "a mountain lake at sunset, photo".into(),
            "--output".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let a = args("lllyasviel/sd-controlnet-tiny");
    let o = lcm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &envs);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = common::reference("controlnet_pipelines.safetensors")["sd_cn_lcmlora_g1"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_close(&lcm::image_io::read_png(&out).unwrap().pixels, &want, "hub controlnet");
    std::fs::remove_file(&out).unwrap();
    let a = args("lllyasviel/not-cached");
    let o = lcm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &envs);
    assert_clean_error(&o, "offline");
}

/// `lcm animate`: diffusers' AnimateDiff frames from an unseen copy (LCM-LoRA + motion LoRA at
/// diffusers' set_adapters weights), as numbered PNGs and as a looping 10 fps GIF; clean errors.
#[test]
fn animate_writes_png_frames_and_gif() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let model = fresh_model(tmp.path(), "tiny-sd");
    let adapter = tmp.path().join("my-motion-adapter");
    copy_dir(&fx.join("motion_adapters/tiny_sd"), &adapter);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let lcm_lora = format!("{}@0.55", s(&fx.join("loras/lcm_like")));
    let motion_lora = format!("{}@1.2", s(&fx.join("loras/motion_like")));
    let args = |out: &Path, extra: &[&str]| {
        let mut a: Vec<String> = [
            "animate",
            "--model",
            &s(&model),
            "--motion-adapter",
            &s(&adapter),
            "--lora",
            &lcm_lora,
            "--lora",
            &motion_lora,
            "--beta-schedule",
            "linear",
            "--guidance-scale",
            "1",
            "--seed",
            "1",
            "--prompt",
            "a small red house next to the lake",
            "--output",
            &s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run = |a: Vec<String>| lcm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let want = common::reference("animatediff_pipelines.safetensors")["sd_lcm0.55_motion1.2_8f"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();

    let png = tmp.path().join("clip.png");
    let o = run(args(&png, &["--frames", "8"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let mut got = Vec::new();
    for i in 1..=8 {
        let f = tmp.path().join(format!("clip-{i}.png"));
        got.extend(lcm::image_io::read_png(&f).unwrap().pixels);
    }
    assert!(!tmp.path().join("clip-9.png").exists());
    assert_close(&got, &want, "cli animate frames");

    let gif = tmp.path().join("clip.gif");
    let o = run(args(&gif, &["--frames", "8"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let decoder =
        image::codecs::gif::GifDecoder::new(std::io::BufReader::new(std::fs::File::open(&gif).unwrap())).unwrap();
    use image::AnimationDecoder;
    let frames = decoder.into_frames().collect_frames().unwrap();
    assert_eq!(frames.len(), 8);
    assert_eq!(frames[0].delay().numer_denom_ms(), (100, 1));
    assert_eq!(frames[0].buffer().dimensions(), (32, 32));
    let bytes = std::fs::read(&gif).unwrap();
    assert!(bytes.windows(11).any(|w| w == b"NETSCAPE2.0"), "GIF must loop");

    // Existing output kept; bad extension, zero frames, too many frames, missing adapter: one line.
    let o = run(args(&gif, &["--frames", "8"]));
    assert_clean_error(&o, "already exists");
    for (out, extra, msg) in [
        ("x.mp4", vec!["--frames", "8"], ".gif"),
        ("x.gif", vec!["--frames", "0"], "number of frames"),
        ("x.gif", vec!["--frames", "30"], "motion_max_seq_length"),
    ] {
        let o = run(args(&tmp.path().join(out), &extra));
        assert_clean_error(&o, msg);
        assert!(!tmp.path().join(out).exists());
    }
    let mut a = args(&tmp.path().join("y.gif"), &["--frames", "2"]);
    let i = a.iter().position(|x| x == "--motion-adapter").unwrap();
    a[i + 1] = s(&tmp.path().join("nope"));
    assert_clean_error(&run(a), "nope");
    // a motion adapter for another UNet shape
    let mut a = args(&tmp.path().join("z.gif"), &["--frames", "2"]);
    a[i + 1] = s(&fx.join("controlnets/sd"));
    assert_clean_error(&run(a), "MotionAdapter");
}

/// `lcm bench` refuses bad settings before writing anything.
#[test]
fn bench_rejects_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bench-model");
    for bad in [["--size", "100"], ["--runs", "0"], ["--steps", "0"]] {
        let o = lcm(&["bench", "--dir", dir.to_str().unwrap(), bad[0], bad[1]], &[]);
        assert_clean_error(&o, "--size must be a positive multiple of 8");
        assert!(!dir.exists());
    }
}

/// `lcm download`: fails cleanly where the hub cannot be reached, offline, or for a local path.
#[test]
fn download_fails_cleanly_without_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().to_str().unwrap();
    // Nothing listens on port 9 of this machine: the request is refused at once.
    let o = lcm(
        &["download", "SimianLuo/LCM_Dreamshaper_v7"],
        &[("HF_HUB_OFFLINE", "0"), ("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HOME", cache)],
    );
    assert_clean_error(&o, "cannot download `SimianLuo/LCM_Dreamshaper_v7` from the Hugging Face hub");
    let o = lcm(&["download", "SimianLuo/LCM_Dreamshaper_v7"], &[("HF_HOME", cache)]);
    assert_clean_error(&o, "HF_HUB_OFFLINE is set");
    let model = common::fixtures().join("models/tiny-lcm");
    let o = lcm(&["download", model.to_str().unwrap()], &[]);
    assert_clean_error(&o, "local path");
}

/// `--device`: unknown names, and CUDA in a build without the `cuda` feature, are one-line errors
/// before anything loads; `--device cpu` is the default.
#[test]
fn device_flag_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let model = common::fixtures().join("models/tiny-lcm");
    let base = ["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--output", out.to_str().unwrap()];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    assert_clean_error(&lcm(&with(&base, &["--device", "gpu"]), &[]), "unknown device `gpu`");
    assert_clean_error(&lcm(&with(&base, &["--device", "cuda:x"]), &[]), "expected cpu, cuda or cuda:N");
    #[cfg(not(feature = "cuda"))]
    assert_clean_error(&lcm(&with(&base, &["--device", "cuda:1"]), &[]), "built without CUDA");
    assert_clean_error(&lcm(&["bench", "--device", "tpu"], &[]), "unknown device `tpu`");
    assert!(!out.exists());
    let o = lcm(&with(&base, &["--device", "cpu", "--width", "32", "--height", "32", "--steps", "1"]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
}

/// `LCM_CPU_PATH`: every f32 path this CPU has gives diffusers' image (the vector paths the same
/// bytes); a path the CPU lacks is skipped with its name printed; a bad name is a one-line error.
/// `--dtype int8` on every CPU path the machine has: the 8-bit kernel's paths (AVX512-VNNI on
/// `avx512` and up) give one image bit for bit; the others multiply dequantized weights in f32;
/// all stay near the f32 image.
#[test]
fn int8_runs_on_every_cpu_path() {
    use lcm::kernels::CpuPath;
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixtures().join("models/tiny-lcm");
    let run = |path: &str, dtype: &str, out: &Path| {
        let args = [
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--seed",
            "0",
            "--dtype",
            dtype,
            "--output",
            out.to_str().unwrap(),
        ];
        let o = lcm(&args, &[("LCM_CPU_PATH", path)]);
        assert!(o.status.success(), "{path} {dtype}: {}", stderr(&o));
        lcm::image_io::read_png(out).unwrap().pixels
    };
    let full = run("portable", "f32", &tmp.path().join("f32.png"));
    let mut vnni_image: Option<Vec<u8>> = None;
    for path in CpuPath::ALL {
        if !path.supported() {
            println!("skipped: CPU path {} (this CPU lacks it)", path.name());
            continue;
        }
        let img = run(path.name(), "int8", &tmp.path().join(format!("{}.png", path.name())));
        let max = img.iter().zip(&full).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        println!("{}: int8 vs f32 max {max}/255", path.name());
        assert!(max <= 16, "{}: int8 vs f32 max {max}/255", path.name());
        if path >= CpuPath::Avx512 && lcm::kernels::int8::Int8Path::current() == lcm::kernels::int8::Int8Path::Vnni {
            match &vnni_image {
                None => vnni_image = Some(img),
                Some(p) => assert!(*p == img, "{}: not the other 8-bit paths' image", path.name()),
            }
        }
    }
}

#[test]
fn every_cpu_path_gives_the_diffusers_image() {
    use lcm::kernels::CpuPath;
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixtures().join("models/tiny-lcm");
    let run = |path: &str, out: &Path| {
        lcm(
            &[
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "a photo of a cat",
                "--seed",
                "0",
                "--output",
                out.to_str().unwrap(),
            ],
            &[("LCM_CPU_PATH", path)],
        )
    };
    let mut vector_image: Option<Vec<u8>> = None;
    for path in CpuPath::ALL {
        if !path.supported() {
            println!("skipped: CPU path {} (this CPU lacks it)", path.name());
            continue;
        }
        let out = tmp.path().join(format!("{}.png", path.name()));
        let o = run(path.name(), &out);
        assert!(o.status.success(), "{}: {}", path.name(), stderr(&o));
        let img = lcm::image_io::read_png(&out).unwrap();
        assert_close(&img.pixels, &reference_image("lcm_steps4"), path.name());
        if path != CpuPath::Portable {
            match &vector_image {
                None => vector_image = Some(img.pixels),
                Some(p) => assert!(*p == img.pixels, "{}: not the other vector paths' image", path.name()),
            }
        }
    }
    let out = tmp.path().join("bad.png");
    assert_clean_error(&run("sse9", &out), "not a CPU path");
    assert!(!out.exists());
    if let Some(lacking) = CpuPath::ALL.into_iter().find(|p| !p.supported()) {
        assert_clean_error(&run(lacking.name(), &out), "this CPU lacks it");
    }
}

/// Generates with the tiny LCM into `out`, with `extra` flags.
fn tiny_generate(out: &Path, extra: &[&str]) -> Output {
    let model = common::fixtures().join("models/tiny-lcm");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of a cat",
        "--seed",
        "0",
        "--steps",
        "2",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lcm(&args, &[])
}

/// Temporary files a write left in `dir`.
fn litter(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".lcm-"))
        .collect()
}

/// Prompts in any language are written (as PNG `iTXt`), over an existing file with --overwrite,
/// and read back whole.
#[test]
fn unicode_prompts_are_written_as_itxt() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fox.png");
    std::fs::write(&out, b"the user's old image").unwrap();
    let model = common::fixtures().join("models/tiny-lcm");
    let prompt = "一只红色的狐狸 🦊 dans la neige, ёлка";
    let o = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
            "--steps",
            "2",
            "--overwrite",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let params = lcm::image_io::read_png_parameters(&out).unwrap().unwrap();
    assert!(params.starts_with(prompt), "{params}");
    // A Latin-1 prompt still goes in a tEXt chunk, as PIL writes it.
    let latin = tmp.path().join("latin.png");
    let o = lcm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "crème brûlée",
            "--steps",
            "2",
            "--output",
            latin.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&latin).unwrap();
    assert!(bytes.windows(4).any(|w| w == b"tEXt") && !bytes.windows(4).any(|w| w == b"iTXt"));
    assert!(litter(tmp.path()).is_empty());
}

/// The extension names the format (as PIL's `save`); an unknown one, a missing folder or an
/// output that is a folder is refused before anything is generated.
#[test]
fn outputs_take_the_format_their_extension_names() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, magic) in [
        ("a.jpg", &b"\xff\xd8\xff"[..]),
        ("b.JPEG", b"\xff\xd8\xff"),
        ("c.webp", b"RIFF"),
        ("d.gif", b"GIF8"),
        ("e.png", b"\x89PNG"),
    ] {
        let out = tmp.path().join(name);
        let o = tiny_generate(&out, &[]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(std::fs::read(&out).unwrap().starts_with(magic), "{name}");
        let img = lcm::image_processor::Image8::read(&out).unwrap();
        assert_eq!((img.width, img.height), (32, 32), "{name}");
    }
    for (name, msg) in [
        ("out.xyz", "unknown image extension .xyz"),
        ("noext", "no file extension"),
        ("missing/out.png", "does not exist"),
    ] {
        let out = tmp.path().join(name);
        let t = std::time::Instant::now();
        assert_clean_error(&tiny_generate(&out, &[]), msg);
        assert!(!out.exists(), "{name}");
        assert!(t.elapsed().as_secs_f64() < 20.0);
    }
    let dir = tmp.path().join("taken.png");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep"), b"x").unwrap();
    assert_clean_error(&tiny_generate(&dir, &["--overwrite"]), "is a folder");
    assert!(dir.join("keep").exists());
    // Several images: every numbered name is checked before generating.
    let many = tmp.path().join("many.png");
    std::fs::write(tmp.path().join("many-2.png"), b"old").unwrap();
    assert_clean_error(&tiny_generate(&many, &["--num-images", "3"]), "already exists");
    assert!(!tmp.path().join("many-1.png").exists());
    assert_eq!(std::fs::read(tmp.path().join("many-2.png")).unwrap(), b"old");
    assert!(litter(tmp.path()).is_empty());
}

/// A write that fails leaves what was there and no temporary file; without overwrite, a file
/// that appeared meanwhile is not replaced.
#[test]
fn failed_writes_keep_the_old_file() {
    let tmp = tempfile::tempdir().unwrap();
    let img = lcm::image_io::RgbImage { width: 2, height: 1, pixels: vec![1, 2, 3, 4, 5, 6] };
    let path = tmp.path().join("old.png");
    std::fs::write(&path, b"old").unwrap();
    let e = lcm::image_io::write_image(&path, &img, None, false).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    // The rename onto a non-empty folder fails after the temporary file was written.
    let dir = tmp.path().join("dir.png");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("inside"), b"x").unwrap();
    assert!(lcm::image_io::write_image(&dir, &img, None, true).is_err());
    assert!(dir.join("inside").exists());
    // A buffer that does not match its size is refused before any file is touched.
    let bad = lcm::image_io::RgbImage { width: 3, height: 3, pixels: vec![0; 5] };
    assert!(lcm::image_io::write_image(&path, &bad, None, true).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert!(litter(tmp.path()).is_empty(), "{:?}", litter(tmp.path()));
    lcm::image_io::write_image(&path, &img, Some("p"), true).unwrap();
    assert_eq!(lcm::image_io::read_png(&path).unwrap(), img);
}

/// A process killed at any moment leaves either the old file or the complete new image.
#[test]
fn a_killed_run_leaves_the_old_or_the_new_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixtures().join("models/tiny-lcm");
    let out = tmp.path().join("out.png");
    let (mut old, mut new) = (0, 0);
    for i in 0..12u64 {
        std::fs::write(&out, b"OLD").unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_lcm"))
            .args([
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "a photo of a cat",
                "--steps",
                "2",
                "--width",
                "64",
                "--height",
                "64",
                "--overwrite",
                "--output",
                out.to_str().unwrap(),
            ])
            .env("HF_HUB_OFFLINE", "1")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(i * i * 8));
        let _ = child.kill();
        let _ = child.wait();
        let bytes = std::fs::read(&out).unwrap();
        if bytes == b"OLD" {
            old += 1;
        } else {
            let img = lcm::image_io::read_png(&out)
                .unwrap_or_else(|e| panic!("kill after {} ms left a broken file: {e}", i * i * 8));
            assert_eq!((img.width, img.height), (64, 64));
            new += 1;
        }
    }
    println!("killed runs: {old} left the old file, {new} the new image");
    assert!(old > 0, "no kill landed before the write");
}

/// Sizes and counts that cannot fit in memory are refused at once, naming the limit.
#[test]
fn absurd_sizes_are_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("big.png");
    for extra in [
        &["--width", "100000", "--height", "100000"][..],
        &["--num-images", "100000000"],
        &["--width", "262144", "--height", "262144", "--num-images", "3"],
    ] {
        let t = std::time::Instant::now();
        assert_clean_error(&tiny_generate(&out, extra), "GB available");
        assert!(t.elapsed().as_secs_f64() < 20.0, "{extra:?} took {:?}", t.elapsed());
        assert!(!out.exists());
    }
    let model = common::fixtures().join("models/tiny-lcm");
    let motion = common::fixtures().join("motion_adapters/tiny_lcm");
    let gif = tmp.path().join("v.gif");
    let o = lcm(
        &[
            "animate",
            "--model",
            model.to_str().unwrap(),
            "--motion-adapter",
            motion.to_str().unwrap(),
            "--prompt",
            "p",
            "--num-videos",
            "1000000000",
            "--output",
            gif.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&o, "GB available");
    let o = lcm(
        &[
            "animate",
            "--model",
            model.to_str().unwrap(),
            "--motion-adapter",
            motion.to_str().unwrap(),
            "--prompt",
            "p",
            "--output",
            tmp.path().join("v.xyz").to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&o, "unknown image extension");
}

/// A pipeline class we do not run is named, not run as Stable Diffusion; a grayscale init image
/// is converted to RGB; a missing LoRA file is "no such file", not a hub lookup.
#[test]
fn unsupported_classes_grayscale_images_and_missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fresh_model(tmp.path(), "tiny-lcm");
    let index = model.join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let out = tmp.path().join("o.png");
    for class in ["FluxPipeline", "StableDiffusion3Pipeline", "KandinskyV22Pipeline"] {
        std::fs::write(&index, text.replace("LatentConsistencyModelPipeline", class)).unwrap();
        let o = lcm(
            &["generate", "--model", model.to_str().unwrap(), "--prompt", "p", "--output", out.to_str().unwrap()],
            &[],
        );
        assert_clean_error(&o, class);
        assert!(stderr(&o).contains("it runs LatentConsistencyModel"), "{}", stderr(&o));
    }
    std::fs::write(&index, &text).unwrap();

    let gray_path = tmp.path().join("gray.png");
    let gray = lcm::image_processor::Image8 {
        width: 40,
        height: 24,
        channels: 1,
        pixels: (0..40 * 24).map(|i| (i % 251) as u8).collect(),
    };
    let rgb = gray.to_rgb();
    lcm::image_io::write_image(
        &gray_path,
        &lcm::image_io::RgbImage { width: 40, height: 24, pixels: rgb.pixels.clone() },
        None,
        false,
    )
    .unwrap();
    // Re-encode as an 8-bit grayscale PNG.
    {
        let f = std::fs::File::create(&gray_path).unwrap();
        let mut enc = png::Encoder::new(f, 40, 24);
        enc.set_color(png::ColorType::Grayscale);
        enc.write_header().unwrap().write_image_data(&gray.pixels).unwrap();
    }
    assert_eq!(lcm::image_processor::Image8::read(&gray_path).unwrap().channels, 1);
    let run = |image: &Path, out: &Path| tiny_generate(out, &["--image", image.to_str().unwrap(), "--strength", "0.5"]);
    let (a, b) = (tmp.path().join("from-gray.png"), tmp.path().join("from-rgb.png"));
    let rgb_path = tmp.path().join("rgb.png");
    lcm::image_io::write_image(
        &rgb_path,
        &lcm::image_io::RgbImage { width: 40, height: 24, pixels: rgb.pixels },
        None,
        false,
    )
    .unwrap();
    let (oa, ob) = (run(&gray_path, &a), run(&rgb_path, &b));
    assert!(oa.status.success() && ob.status.success(), "{} {}", stderr(&oa), stderr(&ob));
    // The same image as its RGB conversion.
    assert_eq!(lcm::image_io::read_png(&a).unwrap(), lcm::image_io::read_png(&b).unwrap());

    let o = tiny_generate(&out, &["--lora", "no-such-style.safetensors"]);
    assert_clean_error(&o, "no such file: no-such-style.safetensors");
}
