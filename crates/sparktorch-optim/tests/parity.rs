//! Replays the torch.optim reference trajectories of `tests/fixtures/trajectories.txt`
//! (written by `tests/parity/gen_fixtures.py`) through every optimizer, both step flavours.

use sparktorch_optim::{build, AtomicF32, HyperValue, Hyperparameters};

/// Largest accepted |ours - torch| / max(1, |torch|) on any parameter after any step. torch's
/// vectorised CPU kernels fuse multiply-adds (`vfmadd`) where we round twice, so single elements
/// differ by an ulp now and then (relative 6e-8); over 50 steps that stays below this bound.
/// Relative above 1 because an ulp of a parameter that has grown to 16 is already 1.9e-6.
const TOL: f32 = 1e-6;

struct Case {
    id: String,
    optimizer: String,
    hyper: Hyperparameters,
    init: Vec<f32>,
    grads: Vec<Vec<f32>>,
    params: Vec<Vec<f32>>,
    step: u64,
    scalars: Vec<(String, f32)>,
    buffers: Vec<(String, Vec<f32>)>,
}

fn floats(words: &[&str]) -> Vec<f32> {
    words
        .iter()
        .map(|w| f32::from_bits(u32::from_str_radix(w, 16).expect("hex float")))
        .collect()
}

fn parse_hyper(words: &[&str]) -> Hyperparameters {
    words
        .iter()
        .map(|w| {
            let (name, v) = w.split_once('=').expect("name=value");
            let (kind, v) = v.split_once(':').expect("kind:value");
            let value = match kind {
                "f" => HyperValue::Float(v.parse().expect("float")),
                "b" => HyperValue::Bool(v == "1"),
                "p" => {
                    let (a, b) = v.split_once(':').expect("pair");
                    HyperValue::Pair(a.parse().expect("float"), b.parse().expect("float"))
                }
                _ => panic!("unknown kind {kind}"),
            };
            (name.to_string(), value)
        })
        .collect()
}

fn load() -> Vec<Case> {
    let text = include_str!("fixtures/trajectories.txt");
    let mut cases = Vec::new();
    let mut cur: Option<Case> = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&key, rest)) = words.split_first() else {
            continue;
        };
        if key == "case" {
            cur = Some(Case {
                id: rest[0].to_string(),
                optimizer: String::new(),
                hyper: Vec::new(),
                init: Vec::new(),
                grads: Vec::new(),
                params: Vec::new(),
                step: 0,
                scalars: Vec::new(),
                buffers: Vec::new(),
            });
            continue;
        }
        let c = cur.as_mut().expect("line outside a case");
        match key {
            "optimizer" => c.optimizer = rest[0].to_string(),
            "hyper" => c.hyper = parse_hyper(rest),
            "len" => {}
            "init" => c.init = floats(rest),
            "grad" => c.grads.push(floats(rest)),
            "param" => c.params.push(floats(rest)),
            "step" => c.step = rest[0].parse().expect("step"),
            "scalar" => c.scalars.push((rest[0].to_string(), floats(&rest[1..])[0])),
            "buffer" => c.buffers.push((rest[0].to_string(), floats(&rest[1..]))),
            "end" => cases.push(cur.take().expect("case")),
            _ => panic!("unknown line {key}"),
        }
    }
    assert!(cases.len() >= 29, "fixture truncated");
    cases
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn trajectories_match_torch() {
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for c in load() {
        let n = c.init.len();
        let mut opt = build(&c.optimizer, &c.hyper, n).expect("build");
        let relaxed = build(&c.optimizer, &c.hyper, n).expect("build");
        let mut p = c.init.clone();
        let pa = AtomicF32::vec_from(&c.init);
        let (mut worst, mut worst_rel, mut bit_equal, mut steps_equal) =
            (0.0f32, 0.0f32, 0usize, 0usize);
        for (g, want) in c.grads.iter().zip(&c.params) {
            opt.step(&mut p, g);
            relaxed.step_relaxed(&pa, g);
            assert_eq!(
                AtomicF32::snapshot(&pa)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{}: step_relaxed differs from step",
                c.id
            );
            worst = worst.max(max_diff(&p, want));
            worst_rel = worst_rel.max(max_rel_diff(&p, want));
            bit_equal += p
                .iter()
                .zip(want)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            steps_equal += usize::from(p == *want);
        }
        let st = opt.export_state();
        assert_eq!(st.step, c.step, "{}: step", c.id);
        let mut names: Vec<_> = st.buffers.iter().map(|(n, _)| n.clone()).collect();
        let mut want_names: Vec<_> = c.buffers.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        want_names.sort();
        assert_eq!(names, want_names, "{}: state buffer names", c.id);
        for (name, want) in &c.buffers {
            let (_, got) = st.buffers.iter().find(|(n, _)| n == name).expect("buffer");
            let d = max_diff(got, want);
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            assert!(d <= TOL * scale, "{}: buffer {name} differs by {d}", c.id);
        }
        for (name, want) in &c.scalars {
            let (_, got) = st.scalars.iter().find(|(n, _)| n == name).expect("scalar");
            assert_eq!(*got as f32, *want, "{}: scalar {name}", c.id);
        }
        let total = n * c.grads.len();
        report.push(format!(
            "{:<22} max|diff| {:.3e}  max rel {:.3e}  bit-equal elements {}/{}  bit-equal steps {}/{}",
            c.id,
            worst,
            worst_rel,
            bit_equal,
            total,
            steps_equal,
            c.grads.len()
        ));
        if worst_rel > TOL {
            failures.push(c.id.clone());
        }
    }
    println!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "cases over tolerance: {failures:?}\n{}",
        report.join("\n")
    );
}
