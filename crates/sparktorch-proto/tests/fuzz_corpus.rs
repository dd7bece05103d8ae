//! The `frame_decoder` fuzz target's inputs, replayed by `cargo test` / `cargo nextest` on
//! stable Rust (no cargo-fuzz, no nightly): every file of its corpus, and a fixed set of
//! deterministic mutations of each (bit flips, truncations, inserted bytes, overwritten length
//! fields), run through the target's own checks (`fuzz/fuzz_targets/frame_decoder_check.rs`).

#![allow(dead_code)]

include!("../fuzz/fuzz_targets/frame_decoder_check.rs");

/// Mutations tried per corpus file.
const MUTATIONS_PER_FILE: u64 = 400;

/// A small deterministic generator (xorshift64*), so every run replays the same inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `seed`: 1 to 4 edits.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut buf = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !buf.is_empty() => {
                let i = rng.below(buf.len());
                buf[i] ^= 1 << rng.below(8);
            }
            1 if !buf.is_empty() => {
                let at = rng.below(buf.len());
                buf.truncate(at);
            }
            2 => {
                let at = rng.below(buf.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                buf.splice(at..at, bytes);
            }
            3 if buf.len() >= 8 => {
                // a length-sized word somewhere in the header
                let at = rng.below(buf.len().min(HEADER_LEN) - 3);
                let v = [0u32, 1, u32::MAX, 1 << 31, rng.next() as u32][rng.below(5)];
                buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                if !buf.is_empty() {
                    let i = rng.below(buf.len());
                    buf[i] = [0u8, 0xff, 0x7f, 0x80][rng.below(4)];
                }
            }
        }
    }
    buf
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/frame_decoder");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("the frame_decoder corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read(&p).expect("corpus file"),
            )
        })
        .collect()
}

#[test]
fn the_corpus_passes_the_targets_checks() {
    let files = corpus();
    assert!(files.len() >= 10, "the corpus is missing: {}", files.len());
    for (_, data) in &files {
        check(data);
    }
}

#[test]
fn mutations_of_the_corpus_pass_the_targets_checks() {
    for (i, (_, data)) in corpus().iter().enumerate() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
        for _ in 0..MUTATIONS_PER_FILE {
            check(&mutate(&mut rng, data));
        }
    }
}
