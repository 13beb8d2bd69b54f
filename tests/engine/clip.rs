//! CLIP tokenizer and text encoder parity with transformers 5 (`cargo test --test clip`).
//!
//! Fixtures:
//! - `fixtures/reference/tokenizer.json`, `fixtures/reference/text_encoder_<model>.safetensors`
//!   and `fixtures/models/<model>/{tokenizer,text_encoder}`: written by `fixtures/make_fixtures.py`.
//! - `fixtures/clip_extra/`: written by `fixtures/make_clip_extra.py` (token ids of more prompts for
//!   the tokenizer configs in `fixtures/tokenizers/`, and a tiny `CLIPTextModelWithProjection`).
//! - `fixtures/real_configs/`: real `text_encoder*/config.json` and weight-name listings
//!   (`keys.txt`) of SD1.5, SDXL and LCM_Dreamshaper_v7.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use lcm::config::read_config;
use lcm::loaders::weights::load_component;
use lcm::models::clip_text_model::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection, EosTokenId};
use lcm::models::clip_tokenizer::ClipTokenizer;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let got = got.to_dtype(DType::F64).unwrap();
    let want = want.to_dtype(DType::F64).unwrap();
    let diff = (&got - &want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let norm = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    diff / norm.max(1e-30)
}

fn check_close(what: &str, got: &Tensor, want: &Tensor) -> f64 {
    let e = rel_l2(got, want);
    eprintln!("{what}: relative L2 error {e:.3e}");
    assert!(e < TOL, "{what}: relative L2 error {e:.3e} >= {TOL:e}");
    e
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

// ------------------------------------------------------------------------------------------
// Tokenizer

/// Copies `fixtures/tokenizers/<name>` (configs only) next to the real SD1.5 vocab/merges.
fn assembled_tokenizer_dir(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("tokenizers").join(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let vocab_src = fixtures().join("models/tiny-sd/tokenizer");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(vocab_src.join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn check_prompts(tok: &ClipTokenizer, what: &str, prompts: &[Value], want: &[Value]) {
    assert_eq!(prompts.len(), want.len());
    for (p, w) in prompts.iter().zip(want) {
        let p = p.as_str().unwrap();
        let got = tok.encode_padded(p).unwrap();
        assert_eq!(got, ids_of(w), "{what}: prompt {p:?}");
        assert_eq!(got.len(), tok.max_length());
    }
}

#[test]
fn tokenizer_sd15_matches_transformers() {
    let r = read_json(&fixtures().join("reference/tokenizer.json"));
    let prompts = r["prompts"].as_array().unwrap();
    let tok = ClipTokenizer::from_dir(fixtures().join("models/tiny-sd/tokenizer")).unwrap();
    assert_eq!((tok.max_length(), tok.pad_id(), tok.bos_id(), tok.eos_id()), (77, 49407, 49406, 49407));
    check_prompts(&tok, "sd15", prompts, r["sd15"].as_array().unwrap());
    if let Some(lens) = r.get("sd15_untruncated_len").and_then(Value::as_array) {
        for (p, n) in prompts.iter().zip(lens) {
            assert_eq!(tok.encode(p.as_str().unwrap()).unwrap().len() as u64, n.as_u64().unwrap(), "{p}");
        }
    }
    // tiny-lcm's tokenizer (LCM_Dreamshaper_v7 configs: added_tokens_decoder layout) gives the
    // same ids on these prompts (the fixture script asserts it for transformers).
    let lcm = ClipTokenizer::from_dir(fixtures().join("models/tiny-lcm/tokenizer")).unwrap();
    assert_eq!(lcm.pad_id(), 49407);
    check_prompts(&lcm, "tiny-lcm", prompts, r["sd15"].as_array().unwrap());
}

#[test]
fn tokenizer_sd2_tokenizer_json_matches_transformers() {
    let r = read_json(&fixtures().join("reference/tokenizer.json"));
    let prompts = r["prompts"].as_array().unwrap();
    let dir = fixtures().join("models/tiny-sd2/tokenizer");
    assert!(dir.join("tokenizer.json").exists() && !dir.join("vocab.json").exists());
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    assert_eq!((tok.max_length(), tok.pad_id(), tok.bos_id(), tok.eos_id()), (77, 0, 49406, 49407));
    check_prompts(&tok, "sd2", prompts, r["sd2"].as_array().unwrap());
    if let Some(lens) = r.get("sd2_untruncated_len").and_then(Value::as_array) {
        for (p, n) in prompts.iter().zip(lens) {
            assert_eq!(tok.encode(p.as_str().unwrap()).unwrap().len() as u64, n.as_u64().unwrap(), "{p}");
        }
    }
}

#[test]
fn tokenizer_configs_match_transformers_on_tricky_prompts() {
    let r = read_json(&fixtures().join("clip_extra/tokenizer_ids.json"));
    let prompts = r["prompts"].as_array().unwrap();
    let tokenizers = r["tokenizers"].as_object().unwrap();
    assert_eq!(tokenizers.len(), 4);
    for (name, want) in tokenizers {
        let dir = assembled_tokenizer_dir(name);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.pad_id() as u64, want["pad_id"].as_u64().unwrap(), "{name} pad id");
        assert_eq!(tok.max_length() as u64, want["max_length"].as_u64().unwrap(), "{name} max length");
        check_prompts(&tok, name, prompts, want["padded"].as_array().unwrap());
        for (p, w) in prompts.iter().zip(want["unpadded"].as_array().unwrap()) {
            let p = p.as_str().unwrap();
            assert_eq!(tok.encode(p).unwrap(), ids_of(w), "{name} (unpadded): prompt {p:?}");
        }
    }
}

#[test]
fn tokenizer_truncation_keeps_bos_first_75_and_eos() {
    let tok = ClipTokenizer::from_dir(fixtures().join("models/tiny-sd/tokenizer")).unwrap();
    let long = vec!["photo"; 200].join(" ");
    let full = tok.encode(&long).unwrap();
    assert_eq!(full.len(), 202);
    let padded = tok.encode_padded(&long).unwrap();
    assert_eq!(padded.len(), 77);
    assert_eq!(padded[0], 49406);
    assert_eq!(&padded[1..76], &full[1..76]);
    assert_eq!(padded[76], 49407);
    assert_eq!(tok.encode_padded("").unwrap(), [vec![49406, 49407], vec![49407; 75]].concat());
}

#[test]
fn tokenizer_missing_or_corrupt_files_are_one_line_errors_naming_the_file() {
    let src = fixtures().join("models/tiny-sd/tokenizer");
    let setup = |files: &[(&str, Option<&str>)]| {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
        for (name, content) in files {
            let p = tmp.path().join(name);
            match content {
                Some(c) => std::fs::write(&p, c).unwrap(),
                None => std::fs::remove_file(&p).unwrap(),
            }
        }
        tmp
    };
    // (files written (None: removed), what the error must name)
    type Case<'a> = (Vec<(&'a str, Option<&'a str>)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("vocab.json", None)], "vocab.json"),
        (vec![("vocab.json", Some("{\"a\": 0, "))], "vocab.json"),
        (vec![("vocab.json", Some("[1, 2]"))], "vocab.json"),
        (vec![("merges.txt", None)], "merges.txt"),
        (vec![("merges.txt", Some("#version: 0.2\ni n\nthis is bad\n"))], "merges.txt"),
        (vec![("tokenizer_config.json", Some("{ not json"))], "tokenizer_config.json"),
        (vec![("special_tokens_map.json", Some("[]"))], "special_tokens_map.json"),
        (vec![("tokenizer.json", Some("{\"model\": {\"type\": \"BPE\"}}"))], "tokenizer.json"),
    ];
    for (files, name) in cases {
        let dir = setup(&files);
        let msg = err_text(ClipTokenizer::from_dir(dir.path()));
        assert!(msg.contains(name), "error for {files:?} should name {name}: {msg}");
        assert!(!msg.contains('\n'), "error should be one line: {msg:?}");
    }
    // A merge whose tokens are not in the vocabulary.
    let dir = setup(&[("merges.txt", Some("#version: 0.2\nqqqq zzzz\n"))]);
    let msg = err_text(ClipTokenizer::from_dir(dir.path()));
    assert!(!msg.contains('\n') && msg.contains(&dir.path().display().to_string()), "{msg}");
    let msg = err_text(ClipTokenizer::from_dir(fixtures().join("no-such-tokenizer")));
    assert!(msg.contains("no-such-tokenizer"), "{msg}");
}

// ------------------------------------------------------------------------------------------
// Text encoder parity

fn load_reference(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_text_encoder(dir: &Path) -> (ClipTextConfig, VarBuilder<'static>) {
    let cfg: ClipTextConfig = read_config(&dir.join("config.json")).unwrap();
    let vb = load_component(dir, None, DType::F32, &Device::Cpu).unwrap();
    (cfg, vb)
}

fn text_encoder_parity(model: &str) {
    let dir = fixtures().join("models").join(model).join("text_encoder");
    let (cfg, vb) = load_text_encoder(&dir);
    let te = ClipTextModel::new(vb, &cfg).unwrap();
    let r = load_reference(&fixtures().join(format!("reference/text_encoder_{model}.safetensors")));
    let ids = &r["input_ids"];
    assert_eq!(ids.dtype(), DType::I64);
    let out = te.forward(ids).unwrap();
    check_close(&format!("{model} last_hidden_state"), &out.last_hidden_state, &r["last_hidden_state"]);
    check_close(&format!("{model} pooler_output"), &out.pooler_output, &r["pooler_output"]);
    check_close(
        &format!("{model} penultimate_hidden_state"),
        &out.penultimate_hidden_state,
        &r["penultimate_hidden_state"],
    );
    if let Some(want) = r.get("clip_skip_1") {
        let got = te.final_layer_norm(&out.penultimate_hidden_state).unwrap();
        check_close(&format!("{model} clip_skip_1"), &got, want);
    }
    // u32 ids give the same result.
    let out32 = te.forward(&ids.to_dtype(DType::U32).unwrap()).unwrap();
    assert_eq!(rel_l2(&out32.last_hidden_state, &out.last_hidden_state), 0.0);
    // All hidden states: [-1] is the last layer before the final layer norm, [-2] the penultimate.
    let all = te.forward_hidden_states(ids).unwrap();
    assert_eq!(all.hidden_states.len(), cfg.num_hidden_layers + 1);
    let n = all.hidden_states.len();
    assert_eq!(rel_l2(&all.hidden_states[n - 2], &out.penultimate_hidden_state), 0.0);
    assert_eq!(rel_l2(&te.final_layer_norm(&all.hidden_states[n - 1]).unwrap(), &out.last_hidden_state), 0.0);
}

#[test]
fn text_encoder_tiny_sd_matches_transformers() {
    text_encoder_parity("tiny-sd");
}

#[test]
fn text_encoder_tiny_lcm_matches_transformers() {
    text_encoder_parity("tiny-lcm");
}

#[test]
fn text_encoder_tiny_sd2_matches_transformers() {
    text_encoder_parity("tiny-sd2");
}

#[test]
fn text_encoder_with_projection_matches_transformers() {
    let dir = fixtures().join("clip_extra/tiny-clip-proj");
    let (cfg, vb) = load_text_encoder(&dir);
    assert_eq!(cfg.max_position_embeddings, 80);
    let te = ClipTextModelWithProjection::new(vb.clone(), &cfg).unwrap();
    let r = load_reference(&fixtures().join("clip_extra/text_encoder_tiny-clip-proj.safetensors"));
    for tag in ["", "short_"] {
        let out = te.forward(&r[&format!("{tag}input_ids")]).unwrap();
        for (name, got) in [
            ("last_hidden_state", &out.last_hidden_state),
            ("penultimate_hidden_state", &out.penultimate_hidden_state),
            ("pooler_output", &out.pooler_output),
            ("text_embeds", &out.text_embeds),
        ] {
            check_close(&format!("tiny-clip-proj {tag}{name}"), got, &r[&format!("{tag}{name}")]);
        }
    }
    // The first-occurrence pooling rule (eos_token_id != 2) on the same weights.
    let mut cfg997 = cfg.clone();
    cfg997.eos_token_id = Some(EosTokenId::One(997));
    let te997 = ClipTextModel::new(vb, &cfg997).unwrap();
    let out = te997.forward(&r["input_ids"]).unwrap();
    check_close("tiny-clip-proj pooler_output (eos 997)", &out.pooler_output, &r["pooler_output_eos997"]);
    // Longer than max_position_embeddings: an error.
    let too_long = Tensor::zeros((1, 81), DType::U32, &Device::Cpu).unwrap();
    assert!(te.forward(&too_long).is_err());
    let bad_id = Tensor::new(&[[0u32, 1000]], &Device::Cpu).unwrap();
    assert!(te.forward(&bad_id).is_err());
}

// ------------------------------------------------------------------------------------------
// Weight names of real checkpoints

/// A weight source built from a `keys.txt` listing: answers every request with a zero-strided
/// zero tensor of the listed shape (no memory), records the names used, and errors on unknown
/// names or on shapes that differ from the listing.
#[derive(Clone)]
struct Listing {
    shapes: Arc<BTreeMap<String, Vec<usize>>>,
    used: Arc<Mutex<HashSet<String>>>,
}

impl Listing {
    fn read(path: &Path, strip_prefix: Option<&str>) -> Self {
        let text = std::fs::read_to_string(path).unwrap();
        let mut shapes = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (name, rest) = line.split_once(' ').unwrap();
            let dims = rest.split_once('[').unwrap().1.split_once(']').unwrap().0;
            let dims: Vec<usize> =
                dims.split(',').filter(|d| !d.is_empty()).map(|d| d.trim().parse().unwrap()).collect();
            let name = match strip_prefix {
                Some(p) => name.strip_prefix(p).unwrap_or(name),
                None => name,
            };
            shapes.insert(name.to_string(), dims);
        }
        Self { shapes: Arc::new(shapes), used: Arc::new(Mutex::new(HashSet::new())) }
    }

    fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }

    fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        self.shapes.keys().filter(|k| !used.contains(*k)).cloned().collect()
    }
}

impl SimpleBackend for Listing {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(dims) = self.shapes.get(name) else { candle_core::bail!("cannot find tensor {name}") };
        if dims.as_slice() != s.dims() {
            candle_core::bail!("shape mismatch for {name}: expected {s:?}, listed {dims:?}")
        }
        self.used.lock().unwrap().insert(name.to_string());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(dims) = self.shapes.get(name) else { candle_core::bail!("cannot find tensor {name}") };
        self.used.lock().unwrap().insert(name.to_string());
        Tensor::zeros((), dtype, dev)?.broadcast_as(dims.as_slice())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

fn real(rel: &str) -> PathBuf {
    fixtures().join("real_configs").join(rel)
}

#[test]
fn real_text_encoder_names_are_all_consumed() {
    // (config, listing, with projection); LCM_Dreamshaper_v7 is an SD1.5 finetune: same names.
    let cases = [
        ("sd15/text_encoder/config.json", "sd15/text_encoder/keys.txt", false),
        ("lcm-dreamshaper-v7/text_encoder/config.json", "sd15/text_encoder/keys.txt", false),
        ("sdxl/text_encoder/config.json", "sdxl/text_encoder/keys.txt", false),
        ("sdxl/text_encoder_2/config.json", "sdxl/text_encoder_2/keys.txt", true),
    ];
    for (config, keys, projection) in cases {
        let cfg: ClipTextConfig = read_config(&real(config)).unwrap();
        let listing = Listing::read(&real(keys), None);
        if projection {
            let te = ClipTextModelWithProjection::new(listing.var_builder(), &cfg).unwrap();
            assert_eq!(te.config().hidden_act, "gelu");
        } else {
            ClipTextModel::new(listing.var_builder(), &cfg).unwrap();
        }
        let unused = listing.unused();
        let ignorable = ["text_model.embeddings.position_ids".to_string()];
        assert!(unused.iter().all(|k| ignorable.contains(k)), "{config}: unused weights {unused:?}");
        assert!(listing.used.lock().unwrap().len() > 190, "{config}");
    }
    // The transformers-5 layout (no `text_model.` prefix) of the same names.
    let cfg: ClipTextConfig = read_config(&real("sd15/text_encoder/config.json")).unwrap();
    let listing = Listing::read(&real("sd15/text_encoder/keys.txt"), Some("text_model."));
    ClipTextModel::new(listing.var_builder(), &cfg).unwrap();
    assert_eq!(listing.unused(), vec!["embeddings.position_ids".to_string()]);
}

#[test]
fn real_configs_parse_with_transformers_defaults() {
    let sd15: ClipTextConfig = read_config(&real("sd15/text_encoder/config.json")).unwrap();
    assert_eq!((sd15.hidden_size, sd15.num_hidden_layers, sd15.num_attention_heads), (768, 12, 12));
    assert_eq!((sd15.hidden_act.as_str(), sd15.eos_token_id.clone()), ("quick_gelu", Some(EosTokenId::One(2))));
    let te2: ClipTextConfig = read_config(&real("sdxl/text_encoder_2/config.json")).unwrap();
    assert_eq!((te2.hidden_size, te2.num_hidden_layers, te2.projection_dim), (1280, 32, Some(1280)));
    let d = ClipTextConfig::default();
    assert_eq!((d.vocab_size, d.hidden_size, d.intermediate_size, d.projection_dim), (49408, 512, 2048, Some(512)));
    assert_eq!((d.hidden_act.as_str(), d.layer_norm_eps, d.max_position_embeddings), ("quick_gelu", 1e-5, 77));
    assert_eq!(d.eos_token_id, Some(EosTokenId::One(49407)));
    // A bad config is an error naming the file.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("config.json");
    std::fs::write(&bad, r#"{"hidden_size": "big"}"#).unwrap();
    let msg = err_text(read_config::<ClipTextConfig>(&bad));
    assert!(msg.contains(&bad.display().to_string()) && !msg.contains('\n'), "{msg}");
}

#[test]
fn weight_of_wrong_shape_or_missing_is_an_error_naming_it() {
    let src = fixtures().join("models/tiny-sd2/text_encoder");
    let cfg: ClipTextConfig = read_config(&src.join("config.json")).unwrap();
    let weights = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "encoder.layers.1.mlp.fc1.weight";
    let write = |tensors: &HashMap<String, Tensor>| {
        let tmp = tempfile::tempdir().unwrap();
        candle_core::safetensors::save(tensors, tmp.path().join("model.safetensors")).unwrap();
        tmp
    };
    let mut wrong = weights.clone();
    wrong.insert(name.to_string(), Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap());
    let dir = write(&wrong);
    let vb = load_component(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
    let msg = format!("{}", ClipTextModel::new(vb, &cfg).unwrap_err());
    assert!(msg.contains(name), "{msg}");

    let mut missing = weights.clone();
    missing.remove("final_layer_norm.bias");
    let dir = write(&missing);
    let vb = load_component(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
    let msg = format!("{}", ClipTextModel::new(vb, &cfg).unwrap_err());
    assert!(msg.contains("final_layer_norm.bias"), "{msg}");

    // Through the listing backend, in the real `text_model.` layout.
    let cfg: ClipTextConfig = read_config(&real("sd15/text_encoder/config.json")).unwrap();
    let mut listing = Listing::read(&real("sd15/text_encoder/keys.txt"), None);
    let mut shapes = (*listing.shapes).clone();
    shapes.insert("text_model.encoder.layers.7.self_attn.v_proj.weight".into(), vec![768, 767]);
    listing.shapes = Arc::new(shapes);
    let msg = format!("{}", ClipTextModel::new(listing.var_builder(), &cfg).unwrap_err());
    assert!(msg.contains("text_model.encoder.layers.7.self_attn.v_proj.weight"), "{msg}");
}
