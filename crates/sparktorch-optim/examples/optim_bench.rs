//! Times one Adam step over 25M parameters (sequential vs parallel chunks, exclusive vs relaxed)
//! beside this machine's memory bandwidth (STREAM-style copy and triad, same process, same run).
//!
//! ```text
//! cargo run --release -p sparktorch-optim --example optim_bench [-- <elements> <repeats>]
//! ```
//! Prints a Markdown table (median of `repeats` timed runs after one warm-up).

use std::time::{Duration, Instant};

use rayon::prelude::*;
use sparktorch_optim::{build, AtomicF32, Parallelism};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(repeats: usize, mut f: impl FnMut()) -> Duration {
    f(); // warm-up: page faults, rayon start
    median(
        (0..repeats)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn gbs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(25_000_000);
    let repeats = args.get(1).copied().unwrap_or(7);
    let threads = rayon::current_num_threads();
    println!("elements: {n}, repeats: {repeats} (median), rayon threads: {threads}\n");

    // Memory bandwidth: copy (8 B/elem) and triad a = b + s*c (12 B/elem), STREAM accounting.
    let b: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let c: Vec<f32> = (0..n).map(|i| (i % 997) as f32 * 1e-3).collect();
    let mut a = vec![0.0f32; n];
    let copy_seq = time(repeats, || a.copy_from_slice(&b));
    let copy_par = time(repeats, || {
        a.par_chunks_mut(1 << 16)
            .zip(b.par_chunks(1 << 16))
            .for_each(|(x, y)| x.copy_from_slice(y))
    });
    let triad = |x: &mut [f32], y: &[f32], z: &[f32]| {
        for ((x, y), z) in x.iter_mut().zip(y).zip(z) {
            *x = y + 0.5 * z;
        }
    };
    let triad_seq = time(repeats, || triad(&mut a, &b, &c));
    let triad_par = time(repeats, || {
        a.par_chunks_mut(1 << 16)
            .zip(b.par_chunks(1 << 16))
            .zip(c.par_chunks(1 << 16))
            .for_each(|((x, y), z)| triad(x, y, z))
    });
    // In place, like an optimizer: a = 0.5*a + b reads a and b and writes a back (12 B/elem,
    // no write-allocate traffic since every written line was just read).
    let axpy = |x: &mut [f32], y: &[f32]| {
        for (x, y) in x.iter_mut().zip(y) {
            *x = 0.5 * *x + y;
        }
    };
    let inplace_seq = time(repeats, || axpy(&mut a, &b));
    let inplace_par = time(repeats, || {
        a.par_chunks_mut(1 << 16)
            .zip(b.par_chunks(1 << 16))
            .for_each(|(x, y)| axpy(x, y))
    });
    std::hint::black_box(&a);
    drop((a, c));

    // Adam: reads p, g, m, v and writes p, m, v: 28 bytes per element.
    let adam_bytes = 28 * n;
    let g: Vec<f32> = b.iter().map(|x| x - 0.5).collect();
    let mut p = b;
    let mut run = |par: Parallelism| {
        let mut o = build("Adam", &Vec::new(), n).expect("Adam builds");
        o.set_parallelism(par);
        time(repeats, || o.step(&mut p, &g))
    };
    let adam_seq = run(Parallelism::SEQUENTIAL);
    let adam_par = run(Parallelism::default());
    let pa = AtomicF32::vec_from(&p);
    drop(p);
    let run_relaxed = |par: Parallelism| {
        let mut o = build("Adam", &Vec::new(), n).expect("Adam builds");
        o.set_parallelism(par);
        time(repeats, || o.step_relaxed(&pa, &g))
    };
    let rel_seq = run_relaxed(Parallelism::SEQUENTIAL);
    let rel_par = run_relaxed(Parallelism::default());

    let row = |what: &str, bytes: usize, d: Duration| {
        println!(
            "| {what} | {:.1} ms | {:.1} GB/s |",
            d.as_secs_f64() * 1e3,
            gbs(bytes, d)
        );
    };
    println!("| what | median time | effective bandwidth |");
    println!("|---|---|---|");
    row("copy, 1 thread (8 B/elem)", 8 * n, copy_seq);
    row(&format!("copy, {threads} threads"), 8 * n, copy_par);
    row("triad, 1 thread (12 B/elem)", 12 * n, triad_seq);
    row(&format!("triad, {threads} threads"), 12 * n, triad_par);
    row(
        "in-place a = 0.5a + b, 1 thread (12 B/elem)",
        12 * n,
        inplace_seq,
    );
    row(
        &format!("in-place a = 0.5a + b, {threads} threads"),
        12 * n,
        inplace_par,
    );
    row(
        "Adam step, exclusive, sequential (28 B/elem)",
        adam_bytes,
        adam_seq,
    );
    row(
        "Adam step, exclusive, parallel chunks",
        adam_bytes,
        adam_par,
    );
    row(
        "Adam step, relaxed (HOGWILD!), sequential",
        adam_bytes,
        rel_seq,
    );
    row(
        "Adam step, relaxed (HOGWILD!), parallel chunks",
        adam_bytes,
        rel_par,
    );
    let best_bw = gbs(12 * n, inplace_par).max(gbs(12 * n, inplace_seq));
    println!(
        "\nbandwidth bound for one Adam step (28 B/elem at the best in-place bandwidth, {best_bw:.1} GB/s): {:.1} ms",
        adam_bytes as f64 / (best_bw * 1e9) * 1e3
    );
}
