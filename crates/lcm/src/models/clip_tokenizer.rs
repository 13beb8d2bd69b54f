//! The CLIP tokenizer, token for token the one transformers 5 builds (`CLIPTokenizer`, backed by
//! the `tokenizers` library).
//!
//! transformers builds the same pipeline whichever files a tokenizer folder ships:
//! byte-level BPE (`end_of_word_suffix = "</w>"`, unk `<|endoftext|>`) over the vocabulary and
//! merges, a normalizer `NFC -> Replace(\s+ -> " ") -> Lowercase`, a pre-tokenizer
//! `Split(CLIP regex, Removed, invert) -> ByteLevel(add_prefix_space = false)` and a
//! `<|startoftext|> ... <|endoftext|>` post-processor. The vocabulary and merges come from
//! `tokenizer.json` when the folder has one (the layout transformers 5 saves), otherwise from
//! `vocab.json` + `merges.txt` (the layout Stable Diffusion repositories ship).
//!
//! The special tokens are registered as transformers registers them, because their flags change
//! how prompts are split: a pad token given as a plain string (SD2.x / SDXL `tokenizer_2` pad
//! with `"!"`) becomes an added token of its own, so `"wow!!"` encodes `!` as three separate pad
//! ids; and whether `<|endoftext|>` is matched before or after lower-casing depends on where its
//! definition came from.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// The pre-tokenizer regex of transformers' `CLIPTokenizer`.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `CLIPTokenizer`'s defaults for the named special tokens it takes.
const DEFAULT_UNK: &str = "<|endoftext|>";
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_PAD: &str = "<|endoftext|>";

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in its order (the order tokens get registered).
const SPECIAL_ATTRS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// CLIP's context length; used when `tokenizer_config.json` names no `model_max_length`.
const DEFAULT_MAX_LENGTH: usize = 77;

/// A CLIP tokenizer loaded from a diffusers `tokenizer/` folder.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Load the tokenizer of a folder holding `tokenizer.json` or `vocab.json` + `merges.txt`,
    /// plus optionally `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            bail!("tokenizer folder {} does not exist", dir.display());
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object_opt(&config_path)?.unwrap_or_default();
        let tokenizer_json_path = dir.join("tokenizer.json");
        let tokenizer_json = read_json_object_opt(&tokenizer_json_path)?;

        // Vocabulary and merges: tokenizer.json wins over vocab.json + merges.txt, as in
        // transformers.
        let (vocab, merges) = match &tokenizer_json {
            Some(json) => vocab_merges_from_tokenizer_json(json, &tokenizer_json_path)?,
            None => (read_vocab(&dir.join("vocab.json"))?, read_merges(&dir.join("merges.txt"))?),
        };
        let special_map = read_json_object_opt(&dir.join("special_tokens_map.json"))?;
        Self::build(dir, &config, special_map, tokenizer_json.as_ref(), vocab, merges)
    }

    /// The CLIP tokenizer of the Stable Diffusion models with the BPE merges built into this
    /// binary (single-file checkpoints ship no tokenizer files), configured by a
    /// `tokenizer_config.json` and `special_tokens_map.json` (SD1.x pads with `<|endoftext|>`,
    /// SD2.x / SDXL's second tokenizer with `!`).
    pub fn embedded(tokenizer_config: &str, special_tokens_map: &str) -> Result<Self> {
        let origin = Path::new("<built-in CLIP tokenizer>");
        let object = |text: &str| -> Result<Map<String, Value>> {
            match serde_json::from_str(text) {
                Ok(Value::Object(m)) => Ok(m),
                _ => bail!("invalid built-in tokenizer config"),
            }
        };
        let merges = parse_merges(CLIP_BPE_MERGES, origin)?;
        let vocab = clip_vocab(&merges);
        Self::build(origin, &object(tokenizer_config)?, Some(object(special_tokens_map)?), None, vocab, merges)
    }

    fn build(
        dir: &Path,
        config: &Map<String, Value>,
        special_map: Option<Map<String, Value>>,
        tokenizer_json: Option<&Map<String, Value>>,
        vocab: Vocab,
        merges: Vec<(String, String)>,
    ) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let specials = resolve_special_tokens(dir, config, special_map, tokenizer_json)?;

        let unk = specials.named.get("unk_token").map(|s| s.content().to_string());
        let mut bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false);
        if let Some(unk) = unk {
            bpe = bpe.unk_token(unk);
        }
        let bpe = bpe
            .build()
            .map_err(|e| anyhow::anyhow!("invalid tokenizer in {}: {}", dir.display(), one_line(&e.to_string())))?;

        let mut tokenizer = Tokenizer::new(bpe);
        let replace = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
            .map_err(|e| anyhow::anyhow!("tokenizer normalizer: {e}"))?;
        tokenizer.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(replace),
            NormalizerWrapper::Lowercase(Lowercase),
        ]))));
        let split =
            Split::new(SplitPattern::Regex(CLIP_SPLIT_REGEX.to_string()), SplitDelimiterBehavior::Removed, true)
                .map_err(|e| anyhow::anyhow!("tokenizer pre-tokenizer: {e}"))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]))));
        tokenizer.add_tokens(&specials.added);

        let id_of = |key: &str, default: &str| -> Result<u32> {
            let content = specials.named.get(key).map(|s| s.content()).unwrap_or(default);
            tokenizer
                .token_to_id(content)
                .with_context(|| format!("tokenizer in {}: {key} `{content}` is not in the vocabulary", dir.display()))
        };
        let bos_id = id_of("bos_token", DEFAULT_BOS)?;
        let eos_id = id_of("eos_token", DEFAULT_EOS)?;
        let pad_id = id_of("pad_token", DEFAULT_PAD)?;

        let max_length = match config.get("model_max_length") {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => match v.as_u64().or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)) {
                Some(n) if n >= 2 => n.min(usize::MAX as u64) as usize,
                _ => bail!("invalid config {}: `model_max_length` is {v}", config_path.display()),
            },
        };

        Ok(Self { tokenizer, bos_id, eos_id, pad_id, max_length })
    }

    /// Token ids with `<|startoftext|>` / `<|endoftext|>`, no truncation and no padding
    /// (`tokenizer(text).input_ids`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        ids.push(self.bos_id);
        ids.extend(self.encode_raw(text)?);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// Exactly `tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
    /// truncation=True).input_ids`: `bos`, the first `max_length - 2` tokens, `eos`, then pad
    /// ids up to `max_length`.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let mut body = self.encode_raw(text)?;
        body.truncate(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(body);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// Token ids without any special token added (`add_special_tokens=False`).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize prompt: {}", one_line(&e.to_string())))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `model_max_length` (77 for every CLIP tokenizer).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of the pad token (49407 `<|endoftext|>` for SD1.x, 0 `!` for SD2.x / SDXL `tokenizer_2`).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of a token string (vocabulary or added token), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

// ---------------------------------------------------------------------------------------------
// Special / added token resolution, following transformers' `PreTrainedTokenizerBase.
// _from_pretrained` and `TokenizersBackend.__init__`.

/// `tokenizers.AddedToken`'s fields; equality is over every field, as in `tokenizers`.
#[derive(Clone, Debug, PartialEq)]
struct TokenDef {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

impl TokenDef {
    /// `AddedToken(**obj)`; `special` defaults to false (or `force_special`), `normalized` to
    /// `not special`.
    fn from_object(obj: &Map<String, Value>, force_special: bool, file: &Path) -> Result<Self> {
        let content = match obj.get("content") {
            Some(Value::String(s)) => s.clone(),
            _ => bail!("invalid {}: an added token has no string `content`", file.display()),
        };
        let flag = |k: &str| obj.get(k).and_then(Value::as_bool);
        let special = if force_special { true } else { flag("special").unwrap_or(false) };
        Ok(Self {
            content,
            single_word: flag("single_word").unwrap_or(false),
            lstrip: flag("lstrip").unwrap_or(false),
            rstrip: flag("rstrip").unwrap_or(false),
            normalized: flag("normalized").unwrap_or(!special),
            special,
        })
    }

    fn to_added(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized)
    }
}

/// A special token value as transformers holds it: a plain string or an `AddedToken`.
#[derive(Clone, Debug, PartialEq)]
enum TokenSpec {
    Str(String),
    Def(TokenDef),
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            Self::Str(s) => s,
            Self::Def(d) => &d.content,
        }
    }
}

struct Specials {
    /// Named special tokens (`bos_token`, ...) after resolution.
    named: HashMap<&'static str, TokenSpec>,
    /// What gets registered as added tokens, one entry per content, in id-assignment order.
    added: Vec<AddedToken>,
}

/// A config value for a special token: a string, or an AddedToken dict (`__type` optional).
fn parse_spec(v: &Value, force_special: bool, file: &Path) -> Result<Option<TokenSpec>> {
    Ok(match v {
        Value::String(s) => Some(TokenSpec::Str(s.clone())),
        Value::Object(o) => Some(TokenSpec::Def(TokenDef::from_object(o, force_special, file)?)),
        _ => None,
    })
}

fn resolve_special_tokens(
    dir: &Path,
    config: &Map<String, Value>,
    special_map: Option<Map<String, Value>>,
    tokenizer_json: Option<&Map<String, Value>>,
) -> Result<Specials> {
    let config_path = dir.join("tokenizer_config.json");
    let mut named: HashMap<&'static str, TokenSpec> = HashMap::new();
    for key in SPECIAL_ATTRS {
        if let Some(v) = config.get(key) {
            if let Some(spec) = parse_spec(v, false, &config_path)? {
                named.insert(key, spec);
            }
        }
    }
    let mut extras: Vec<TokenSpec> = Vec::new();
    let extra_list = |v: Option<&Value>, force: bool, file: &Path| -> Result<Vec<TokenSpec>> {
        let mut out = Vec::new();
        if let Some(Value::Array(items)) = v {
            for item in items {
                if let Some(spec) = parse_spec(item, force, file)? {
                    out.push(spec);
                }
            }
        }
        Ok(out)
    };
    extras.extend(extra_list(
        config.get("extra_special_tokens").or_else(|| config.get("additional_special_tokens")),
        false,
        &config_path,
    )?);

    let mut decoder: BTreeMap<u64, TokenDef> = BTreeMap::new();
    let mut by_content: HashMap<String, TokenDef> = HashMap::new();
    if let Some(Value::Object(entries)) = config.get("added_tokens_decoder") {
        for (id, tok) in entries {
            let id: u64 = id.parse().with_context(|| {
                format!("invalid {}: added_tokens_decoder key `{id}` is not an id", config_path.display())
            })?;
            let Value::Object(obj) = tok else {
                bail!("invalid {}: added_tokens_decoder[{id}] is not an object", config_path.display())
            };
            let def = TokenDef::from_object(obj, false, &config_path)?;
            by_content.insert(def.content.clone(), def.clone());
            decoder.insert(id, def);
        }
    } else {
        // Legacy layout: special_tokens_map.json overrides tokenizer_config.json ...
        let map_path = dir.join("special_tokens_map.json");
        if let Some(map) = special_map {
            for key in SPECIAL_ATTRS {
                if let Some(v) = map.get(key) {
                    if let Some(spec) = parse_spec(v, true, &map_path)? {
                        named.insert(key, spec);
                    }
                }
            }
            let more = extra_list(
                map.get("extra_special_tokens").or_else(|| map.get("additional_special_tokens")),
                true,
                &map_path,
            )?;
            for spec in more {
                if !extras.contains(&spec) {
                    extras.push(spec);
                }
            }
        }
        // ... and tokenizer.json's `added_tokens` define the added tokens.
        if let Some(Value::Array(items)) = tokenizer_json.and_then(|j| j.get("added_tokens")) {
            let file = dir.join("tokenizer.json");
            for item in items {
                let Value::Object(obj) = item else {
                    bail!("invalid {}: an entry of `added_tokens` is not an object", file.display())
                };
                let id = obj
                    .get("id")
                    .and_then(Value::as_u64)
                    .with_context(|| format!("invalid {}: an entry of `added_tokens` has no `id`", file.display()))?;
                let def = TokenDef::from_object(obj, false, &file)?;
                by_content.insert(def.content.clone(), def.clone());
                decoder.insert(id, def);
            }
        }
    }

    // Named tokens given as strings take the definition of the added token of that content.
    if !by_content.is_empty() {
        for spec in named.values_mut() {
            if let TokenSpec::Str(s) = spec {
                if let Some(def) = by_content.get(s.as_str()) {
                    *spec = TokenSpec::Def(def.clone());
                }
            }
        }
    }
    // CLIPTokenizer's defaults.
    named.entry("unk_token").or_insert_with(|| TokenSpec::Str(DEFAULT_UNK.into()));
    named.entry("bos_token").or_insert_with(|| TokenSpec::Str(DEFAULT_BOS.into()));
    named.entry("eos_token").or_insert_with(|| TokenSpec::Str(DEFAULT_EOS.into()));
    named.entry("pad_token").or_insert_with(|| TokenSpec::Str(DEFAULT_PAD.into()));

    // TokenizersBackend.__init__: the added-token definitions (by id), then every named and
    // extra special token whose content is not among them and which is not already queued.
    let mut queue: Vec<TokenSpec> = decoder.values().cloned().map(TokenSpec::Def).collect();
    let encoder: HashSet<String> = queue.iter().map(|s| s.content().to_string()).collect();
    let ordered_named = SPECIAL_ATTRS.iter().filter_map(|k| named.get(k));
    for spec in ordered_named.chain(extras.iter()) {
        if !encoder.contains(spec.content()) && !queue.contains(spec) {
            queue.push(spec.clone());
        }
    }
    let named_contents: HashSet<&str> = named.values().map(|s| s.content()).collect();
    let defs = queue.into_iter().map(|spec| match spec {
        TokenSpec::Str(content) => {
            TokenDef { content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }
        }
        TokenSpec::Def(mut d) => {
            if !d.special && named_contents.contains(d.content.as_str()) {
                d.special = true;
            }
            d
        }
    });
    // `tokenizers` keeps the last definition registered for a content (at the id of the first).
    let mut order: Vec<String> = Vec::new();
    let mut last: HashMap<String, TokenDef> = HashMap::new();
    for d in defs {
        if d.content.is_empty() {
            continue;
        }
        if !last.contains_key(&d.content) {
            order.push(d.content.clone());
        }
        last.insert(d.content.clone(), d);
    }
    let added = order.iter().map(|c| last[c].to_added()).collect();
    Ok(Specials { named, added })
}

// ---------------------------------------------------------------------------------------------
// Files.

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn read_json_object_opt(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => bail!("invalid {}: not a JSON object", path.display()),
        Err(e) => bail!("invalid {}: {e}", path.display()),
    }
}

fn read_vocab(path: &PathBuf) -> Result<Vocab> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read tokenizer vocabulary {}: {e}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid tokenizer vocabulary {}: {e}", path.display()))?;
    vocab_from_value(&value).with_context(|| format!("invalid tokenizer vocabulary {}", path.display()))
}

fn vocab_from_value(value: &Value) -> Result<Vocab> {
    let Value::Object(m) = value else { bail!("not a JSON object of token -> id") };
    let mut vocab = Vocab::with_capacity(m.len());
    for (token, id) in m {
        let id = id
            .as_u64()
            .filter(|id| *id <= u32::MAX as u64)
            .with_context(|| format!("token `{token}` has id {id}, not a token id"))?;
        vocab.insert(token.clone(), id as u32);
    }
    Ok(vocab)
}

/// `merges.txt`: one `left right` pair a line; `#version` lines are skipped (as `tokenizers`
/// does).
fn read_merges(path: &PathBuf) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read tokenizer merges {}: {e}", path.display()))?;
    parse_merges(&text, path)
}

/// The `merges.txt` every Stable Diffusion tokenizer ships (openai/clip-vit-large-patch14's, sha256
/// 9fd691f7…051a); SD2.x and SDXL use the same file.
pub const CLIP_BPE_MERGES: &str = include_str!("clip_bpe_merges.txt");

/// CLIP's vocabulary follows from its merges, as OpenAI's `SimpleTokenizer` builds it: the 256
/// byte symbols, the same with `</w>`, one token per merge, then the two special tokens. (Equal
/// to the shipped `vocab.json`, id for id.)
fn clip_vocab(merges: &[(String, String)]) -> Vocab {
    let bytes = bytes_to_unicode();
    let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    tokens.extend(bytes.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect()
}

/// CLIP's `vocab.json` (token -> id), built from [`CLIP_BPE_MERGES`] as OpenAI's tokenizer builds it.
pub fn clip_vocab_json() -> String {
    let merges = parse_merges(CLIP_BPE_MERGES, Path::new("<built-in CLIP tokenizer>")).unwrap_or_default();
    let mut tokens: Vec<(String, u32)> = clip_vocab(&merges).into_iter().collect();
    tokens.sort_by_key(|(_, id)| *id);
    let map: serde_json::Map<String, Value> = tokens.into_iter().map(|(t, id)| (t, Value::from(id))).collect();
    Value::Object(map).to_string()
}

/// GPT-2's byte -> printable character table, in its order (printable bytes first).
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut chars: Vec<char> = (0..256u32).filter(|b| printable(*b)).filter_map(char::from_u32).collect();
    // The other bytes map to 256, 257, ... in byte order.
    let others = (0..256u32).filter(|b| !printable(*b)).count() as u32;
    chars.extend((256..256 + others).filter_map(char::from_u32));
    chars
}

fn parse_merges(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            bail!("invalid tokenizer merges {}: line {} is not `left right`", path.display(), n + 1);
        }
        merges.push((parts[0].to_string(), parts[1].to_string()));
    }
    Ok(merges)
}

type VocabMerges = (Vocab, Vec<(String, String)>);

fn vocab_merges_from_tokenizer_json(json: &Map<String, Value>, path: &Path) -> Result<VocabMerges> {
    let model = match json.get("model") {
        Some(Value::Object(m)) => m,
        _ => bail!("invalid {}: no `model` object", path.display()),
    };
    if let Some(kind) = model.get("type").and_then(Value::as_str) {
        if kind != "BPE" {
            bail!("invalid {}: model type is `{kind}`, a CLIP tokenizer needs `BPE`", path.display());
        }
    }
    let vocab = match model.get("vocab") {
        Some(v) => vocab_from_value(v).with_context(|| format!("invalid {}: model.vocab", path.display()))?,
        None => bail!("invalid {}: no `model.vocab`", path.display()),
    };
    let mut merges = Vec::new();
    if let Some(Value::Array(items)) = model.get("merges") {
        for (n, item) in items.iter().enumerate() {
            let pair = match item {
                Value::String(s) => {
                    let parts: Vec<&str> = s.split(' ').collect();
                    (parts.len() == 2).then(|| (parts[0].to_string(), parts[1].to_string()))
                }
                Value::Array(a) if a.len() == 2 => match (&a[0], &a[1]) {
                    (Value::String(l), Value::String(r)) => Some((l.clone(), r.clone())),
                    _ => None,
                },
                _ => None,
            };
            match pair {
                Some(p) => merges.push(p),
                None => bail!("invalid {}: model.merges[{n}] is not a pair", path.display()),
            }
        }
    }
    Ok((vocab, merges))
}
