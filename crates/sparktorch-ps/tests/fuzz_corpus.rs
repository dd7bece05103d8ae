//! The `server_session` fuzz target's inputs, replayed by `cargo test` / `cargo nextest` on
//! stable Rust: every file of its corpus and deterministic mutations of each, each driving a
//! real server over an in-memory pipe on a paused clock, through the target's own harness and
//! checks (`crates/sparktorch-proto/fuzz/fuzz_targets/server_session_check.rs`).

#![allow(dead_code)]

include!("../../sparktorch-proto/fuzz/fuzz_targets/server_session_check.rs");

/// Mutations tried per corpus file (each runs a server session).
const MUTATIONS_PER_FILE: u64 = 40;

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

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut buf = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(3) {
            // keep the control byte (the state and mode) most of the time
            0 if buf.len() > 1 => {
                let i = 1 + rng.below(buf.len() - 1);
                buf[i] ^= 1 << rng.below(8);
            }
            1 if buf.len() > 1 => {
                let at = 1 + rng.below(buf.len() - 1);
                buf.truncate(at);
            }
            _ => {
                let at = rng.below(buf.len() + 1).max(1).min(buf.len());
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                buf.splice(at..at, bytes);
            }
        }
    }
    buf
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../sparktorch-proto/fuzz/corpus/server_session"
    );
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("the server_session corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).expect("corpus file"))
        .collect()
}

#[test]
fn the_corpus_passes_the_targets_checks() {
    let files = corpus();
    assert!(!files.is_empty(), "the server_session corpus is missing");
    for data in &files {
        check(data);
    }
}

#[test]
fn mutations_of_the_corpus_pass_the_targets_checks() {
    for (i, data) in corpus().iter().enumerate() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (i as u64 + 1));
        for _ in 0..MUTATIONS_PER_FILE {
            check(&mutate(&mut rng, data));
        }
    }
}
