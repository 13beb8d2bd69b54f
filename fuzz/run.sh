#!/usr/bin/env bash
# Build the fuzz targets with libFuzzer's coverage instrumentation (stable Rust) and run them.
#   fuzz/run.sh [SECONDS] [TARGET...]   (default: 60 s each, every target)
# Corpora are seeded from the test fixtures into fuzz/corpus/TARGET (not committed); crashes land
# in fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"; shift || true
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(safetensors configs tokenizer tokenizer_files image keys)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation out of build scripts and proc macros.
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --bins --target "$host" --target-dir target
bin="target/$host/release"
fx=../tests/fixtures
seed_into() { local t=$1; shift; mkdir -p "corpus/$t"; for f in "$@"; do [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 200000 ] && cp "$f" "corpus/$t/$(echo "${f#../}" | tr '/' '_')"; done; true; }
seed_into safetensors $(find $fx -name '*.safetensors' -size -200k | head -40)
seed_into configs $(find $fx -name '*.json' -size -50k | head -80)
seed_into image $(find $fx/images -type f | head -20)
# Key listings of real checkpoints and LoRAs (`name [d0,d1] DTYPE` lines).
seed_into keys $(find $fx/real_configs -name 'keys.txt' -size -200k | head -40)
# Small CLIP tokenizer folders (made by seeds/make_tokenizer_seeds.py).
seed_into tokenizer_files seeds/tokenizer_files/*
mkdir -p corpus/tokenizer && printf 'a photograph of an astronaut riding a horse' > corpus/tokenizer/p1 \
  && printf '一只红色的狐狸 🦊, <|endoftext|> (masterpiece:1.2)' > corpus/tokenizer/p2
failed=0
for t in "${targets[@]}"; do
  mkdir -p "artifacts/$t"
  echo "== $t: ${secs} s"
  if ! "$bin/$t" "corpus/$t" -max_total_time="$secs" -rss_limit_mb=4096 -timeout=10 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 > "artifacts/$t.log" 2>&1; then
    failed=1
    grep -E "ERROR|SUMMARY|panicked" "artifacts/$t.log" | head -5
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "artifacts/$t.log" || true
done
exit $failed
