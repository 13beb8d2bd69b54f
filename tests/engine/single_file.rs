//! Single-file checkpoints in the original CompVis / SGM layouts: every key of the real layouts
//! maps to diffusers' names (listings made and checked with diffusers' own converters by
//! `tests/fixtures/make_single_file_fixtures.py`), the architecture is detected, and a random
//! full-size SD1.5 file generates diffusers' `from_single_file` image.
use crate::common;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use lcm::loaders::single_file::{map_listing, Architecture, Component};
use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions};
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

const ARCHS: [Architecture; 6] = [
    Architecture::Sd15,
    Architecture::Sd15Inpainting,
    Architecture::Sd21,
    Architecture::Sd2Inpainting,
    Architecture::Sdxl,
    Architecture::SdxlInpainting,
];

fn listing_text(arch: Architecture) -> String {
    let path = common::fixtures().join("single_file").join(format!("{}_keys.txt.gz", arch.name()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap()).read_to_string(&mut text).unwrap();
    text
}

fn listing(arch: Architecture) -> Vec<(String, Vec<usize>)> {
    lcm::testing::parse_key_listing(&listing_text(arch)).unwrap().into_iter().map(|t| (t.name, t.shape)).collect()
}

fn config(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

/// diffusers' names and shapes of one component of an original-layout listing.
fn mapped(arch: Architecture, component: Component) -> BTreeMap<String, Vec<usize>> {
    let c = arch.configs();
    let lpb = config(c.unet)["layers_per_block"].as_u64().unwrap() as usize;
    let up = config(c.vae)["up_block_types"].as_array().unwrap().len();
    let out: BTreeMap<_, _> = map_listing(arch, component, &listing(arch), lpb, up).unwrap().into_iter().collect();
    assert!(!out.is_empty(), "{arch:?} {component:?}: nothing mapped");
    out
}

fn diffusers_keys(path: &str) -> BTreeMap<String, Vec<usize>> {
    let mut keys = common::read_keys(&common::fixtures().join("real_configs").join(path));
    keys.retain(|k, _| !k.ends_with("position_ids"));
    keys
}

#[test]
fn architectures_are_detected_from_the_keys() {
    for arch in ARCHS {
        let shapes: BTreeMap<String, Vec<usize>> = listing(arch).into_iter().collect();
        let got = Architecture::detect(|n| shapes.get(n).cloned()).unwrap();
        assert_eq!(got, arch);
    }
    // A LoRA or a diffusers-named UNet is not a single-file checkpoint.
    let err = Architecture::detect(|n| (n == "down_blocks.0.resnets.0.conv1.weight").then(|| vec![320, 320, 3, 3]))
        .unwrap_err();
    assert!(err.to_string().contains("not a Stable Diffusion single-file checkpoint"), "{err}");
}

/// The real SD1.5 / SD1.5-inpainting / SDXL layouts map onto exactly the diffusers folders'
/// names and shapes (the diffusers listings are verified against the hub's file sizes).
#[test]
fn real_layouts_map_to_every_diffusers_weight() {
    let cases = [
        (Architecture::Sd15, Component::Unet, "sd15/unet/keys.txt"),
        (Architecture::Sd15, Component::Vae, "sd15/vae/keys.txt"),
        (Architecture::Sd15, Component::TextEncoder, "sd15/text_encoder/keys.txt"),
        (Architecture::Sd15Inpainting, Component::Unet, "sd15-inpainting/unet/keys.txt"),
        (Architecture::Sdxl, Component::Unet, "sdxl/unet/keys.txt"),
        (Architecture::Sdxl, Component::Vae, "sdxl/vae/keys.txt"),
        (Architecture::Sdxl, Component::TextEncoder, "sdxl/text_encoder/keys.txt"),
        (Architecture::Sdxl, Component::TextEncoder2, "sdxl/text_encoder_2/keys.txt"),
    ];
    for (arch, component, keys) in cases {
        common::assert_same_keys(&format!("{arch:?} {component:?}"), &mapped(arch, component), &diffusers_keys(keys));
    }
    // The UNet, VAE and text encoders take disjoint parts of the file.
    for arch in ARCHS {
        let c = arch.configs();
        let lpb = config(c.unet)["layers_per_block"].as_u64().unwrap() as usize;
        let all = listing(arch);
        let mut owner: BTreeMap<String, Component> = BTreeMap::new();
        for component in [Component::Unet, Component::Vae, Component::TextEncoder, Component::TextEncoder2] {
            for (name, _) in &all {
                let one = vec![(name.clone(), vec![1usize; 4])];
                if let Ok(m) = map_listing(arch, component, &one, lpb, 4) {
                    if !m.is_empty() {
                        if let Some(prev) = owner.insert(name.clone(), component) {
                            panic!("{arch:?}: {name} mapped by {prev:?} and {component:?}");
                        }
                    }
                }
            }
        }
    }
}

/// A backend handing out zeros for names the mapped listing has with the asked shape, and
/// recording what was asked (zeros are allocated lazily, so full-size models cost little).
struct ListedZeros {
    shapes: BTreeMap<String, Vec<usize>>,
    asked: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for ListedZeros {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.shapes.get(name) {
            Some(shape) if shape.as_slice() == s.dims() => {}
            other => candle_core::bail!("{name}: model wants {s:?}, single file gives {other:?}"),
        }
        self.asked.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unchecked {name}")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

/// The names a model asked for, with their shapes.
type Asked = Arc<Mutex<BTreeMap<String, Vec<usize>>>>;

fn builder(shapes: &BTreeMap<String, Vec<usize>>) -> (candle_nn::VarBuilder<'static>, Asked) {
    let asked = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = ListedZeros { shapes: shapes.clone(), asked: asked.clone() };
    (candle_nn::VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu), asked)
}

/// The architectures without a diffusers key listing here (SD2.1, SD2 inpainting, SDXL
/// inpainting): our networks built from the built-in configs ask for exactly the mapped names
/// and shapes (SD2's text encoder leaves OpenCLIP's last block and projection unused, as
/// diffusers does).
#[test]
fn other_layouts_build_their_networks_from_the_mapped_weights() {
    use lcm::models::clip_text_model::{ClipTextModel, ClipTextModelWithProjection};
    use lcm::models::unet::UNet2DConditionModel;
    use lcm::models::vae::kl::AutoencoderKL;
    for arch in [Architecture::Sd21, Architecture::Sd2Inpainting, Architecture::SdxlInpainting] {
        let c = arch.configs();
        let check = |component: Component, build: &dyn Fn(candle_nn::VarBuilder<'static>) -> anyhow::Result<()>| {
            let mut shapes = mapped(arch, component);
            let (vb, asked) = builder(&shapes);
            build(vb).unwrap_or_else(|e| panic!("{arch:?} {component:?}: {e:#}"));
            if arch == Architecture::Sd2Inpainting || arch == Architecture::Sd21 {
                shapes.retain(|k, _| !k.starts_with("text_model.encoder.layers.23.") && k != "text_projection.weight");
            }
            common::assert_same_keys(&format!("{arch:?} {component:?}"), &asked.lock().unwrap(), &shapes);
        };
        check(Component::Unet, &|vb| UNet2DConditionModel::new(vb, &serde_json::from_str(c.unet)?).map(|_| ()));
        check(Component::Vae, &|vb| AutoencoderKL::new(vb, &serde_json::from_str(c.vae)?).map(|_| ()));
        check(Component::TextEncoder, &|vb| {
            Ok(ClipTextModel::new(vb, &serde_json::from_str(c.text_encoder)?).map(|_| ())?)
        });
        if let Some(te2) = c.text_encoder_2 {
            check(Component::TextEncoder2, &|vb| {
                Ok(ClipTextModelWithProjection::new(vb, &serde_json::from_str(te2)?).map(|_| ())?)
            });
        }
    }
}

/// A random full-size SD1.5 single file (written here, 2 GB in float16) gives diffusers'
/// `StableDiffusionPipeline.from_single_file` image with the LCMScheduler, within 2/255.
#[test]
fn random_sd15_single_file_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("community-model.safetensors");
    let keys = lcm::testing::parse_key_listing(&listing_text(Architecture::Sd15)).unwrap();
    lcm::testing::write_random_checkpoint(&keys, &path, 0, "F16").unwrap();
    let pipe = LcmPipeline::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let request = GenerateRequest {
        prompt: "a photo of a cat".into(),
        num_inference_steps: 2,
        guidance_scale: Some(1.0),
        width: Some(64),
        height: Some(64),
        seed: 0,
        ..Default::default()
    };
    let image = &pipe.generate(&request, |_, _| {}).unwrap()[0];
    let want = image::open(common::fixtures().join("single_file/sd15_reference.png")).unwrap().to_rgb8();
    let got = &image.pixels;
    assert_eq!(got.len(), want.as_raw().len());
    let max = got.iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(max <= 2, "max pixel difference {max}/255");
}

#[test]
fn bad_single_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let load = |p: &std::path::Path| {
        LcmPipeline::load(p.to_str().unwrap(), &LoadOptions::default()).err().map(|e| format!("{e:#}")).unwrap()
    };
    // Pickles are refused without being read.
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::write(&ckpt, b"\x80\x02not really a pickle").unwrap();
    assert!(load(&ckpt).contains("pickled PyTorch checkpoint"), "{}", load(&ckpt));
    // Missing.
    let missing = tmp.path().join("nope.safetensors");
    assert!(load(&missing).contains("does not exist"), "{}", load(&missing));
    // Not a checkpoint at all, and a truncated one.
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"hello").unwrap();
    assert!(load(&junk).contains("cannot load weights"), "{}", load(&junk));
    // A LoRA file is not a model.
    let lora = common::fixtures().join("loras/peft_unet_te/pytorch_lora_weights.safetensors");
    assert!(load(&lora).contains("not a Stable Diffusion single-file checkpoint"), "{}", load(&lora));
}

#[test]
fn cli_refuses_a_pickle_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("v1-5-pruned-emaonly.ckpt");
    std::fs::write(&ckpt, b"\x80\x02").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lcm"))
        .args(["generate", "--model", ckpt.to_str().unwrap(), "--prompt", "x", "-o"])
        .arg(tmp.path().join("o.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.status.code() != Some(101), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("pickled PyTorch checkpoint"), "{err}");
    assert!(!tmp.path().join("o.png").exists());
}

/// The built-in tokenizer (merges in the binary, vocabulary derived from them) equals the one
/// read from the real `tokenizer/` and `tokenizer_2/` files, pad token included.
#[test]
fn built_in_tokenizers_equal_the_real_files() {
    use lcm::models::clip_tokenizer::ClipTokenizer;
    let sdxl = Architecture::Sdxl.configs();
    let (tok2, special2) = sdxl.tokenizer_2.unwrap();
    let cases = [
        (Architecture::Sd15.configs().tokenizer, "models/tiny-sd/tokenizer"),
        ((tok2, special2), "models/tiny-sdxl/tokenizer_2"),
    ];
    for ((config, special), dir) in cases {
        let built_in = ClipTokenizer::embedded(config, special).unwrap();
        let files = ClipTokenizer::from_dir(common::fixtures().join(dir)).unwrap();
        assert_eq!(
            (built_in.pad_id(), built_in.bos_id(), built_in.eos_id()),
            (files.pad_id(), files.bos_id(), files.eos_id()),
            "{dir}"
        );
        for prompt in ["a photo of a cat", "wow!! <|endoftext|> Ünïcödé 東京 🎉 don't", "", &"long ".repeat(100)]
        {
            assert_eq!(
                built_in.encode_padded(prompt).unwrap(),
                files.encode_padded(prompt).unwrap(),
                "{dir}: {prompt}"
            );
        }
    }
}
