//! Any text as a prompt through CLIP's tokenizer (the real SD1.5 vocabulary): every string a user
//! or an HTTP client can send.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static TOK: OnceLock<lcm::models::clip_tokenizer::ClipTokenizer> = OnceLock::new();
    let tok = TOK.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models/tiny-sd/tokenizer");
        lcm::models::clip_tokenizer::ClipTokenizer::from_dir(dir).unwrap()
    });
    let text = String::from_utf8_lossy(data);
    if let Ok(ids) = tok.encode_padded(&text) {
        assert_eq!(ids.len(), tok.max_length());
    }
    let _ = tok.encode(&text);
});
