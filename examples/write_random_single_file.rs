//! Write a full-size single-file checkpoint with deterministic random weights from a key listing
//! (used by `tests/fixtures/make_single_file_fixtures.py` to make the file diffusers' reference
//! is computed from; `tests/single_file.rs` writes the same file).
//!
//! `cargo run --example write_random_single_file -- LISTING(.txt|.txt.gz) OUT.safetensors SEED`
use std::io::Read;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listing, out, seed] = args.as_slice() else {
        anyhow::bail!("usage: write_random_single_file LISTING OUT.safetensors SEED")
    };
    let mut text = String::new();
    let file = std::fs::File::open(listing)?;
    if listing.ends_with(".gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)?;
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)?;
    }
    let listing = lcm::testing::parse_key_listing(&text)?;
    lcm::testing::write_random_checkpoint(&listing, out.as_ref(), seed.parse()?, "F16")?;
    Ok(())
}
