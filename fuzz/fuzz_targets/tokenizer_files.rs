//! Any bytes as the files of a tokenizer folder (`vocab.json`, `merges.txt`,
//! `tokenizer_config.json`, `special_tokens_map.json`, `tokenizer.json`): load it as a model
//! folder's tokenizer is loaded, then tokenize a prompt with it.
//!
//! The input is the five files in that order, separated by NUL bytes; an empty part is a missing
//! file (the loader must say which one).
#![no_main]
mod common;
use libfuzzer_sys::fuzz_target;

const FILES: [&str; 5] =
    ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"];

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch_dir("tokenizer");
    let mut parts = data.split(|b| *b == 0);
    for name in FILES {
        let path = dir.join(name);
        match parts.next() {
            Some(part) if !part.is_empty() => std::fs::write(&path, part).unwrap(),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    if let Ok(tok) = lcm::models::clip_tokenizer::ClipTokenizer::from_dir(&dir) {
        if let Ok(ids) = tok.encode_padded("a photograph of an astronaut, 宇航员 🚀") {
            assert_eq!(ids.len(), tok.max_length());
        }
    }
});
