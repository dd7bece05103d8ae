//! Unit tests over every optimizer: validation, defaults, state, schedules.

use crate::{build, AtomicF32, HyperValue, Hyperparameters, OptimError, Parallelism, SUPPORTED};

fn h(items: &[(&str, HyperValue)]) -> Hyperparameters {
    items.iter().map(|(n, v)| (n.to_string(), *v)).collect()
}

use HyperValue::{Bool as B, Float as F, Pair as P};

/// Every optimizer with options that switch on every buffer it can keep.
fn configs() -> Vec<(&'static str, Hyperparameters)> {
    vec![
        ("SGD", h(&[("lr", F(0.1))])),
        (
            "SGD",
            h(&[
                ("momentum", F(0.9)),
                ("nesterov", B(true)),
                ("weight_decay", F(0.1)),
            ]),
        ),
        ("Adam", h(&[("amsgrad", B(true)), ("weight_decay", F(0.1))])),
        ("AdamW", h(&[("amsgrad", B(true))])),
        (
            "Adagrad",
            h(&[("lr_decay", F(0.1)), ("initial_accumulator_value", F(0.2))]),
        ),
        ("RMSprop", h(&[("momentum", F(0.5)), ("centered", B(true))])),
        ("Adadelta", h(&[("weight_decay", F(0.1))])),
        ("Adamax", h(&[("maximize", B(true))])),
        (
            "NAdam",
            h(&[
                ("decoupled_weight_decay", B(true)),
                ("weight_decay", F(0.1)),
            ]),
        ),
        ("RAdam", h(&[("betas", P(0.9, 0.9))])),
    ]
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    // A small deterministic generator (xorshift) keeps the tests dependency-free.
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn build_covers_supported_case_insensitively() {
    for name in SUPPORTED {
        let o = build(&name.to_ascii_uppercase(), &Vec::new(), 3).expect("builds");
        assert_eq!(o.name(), *name);
        assert_eq!(o.len(), 3);
    }
    let e = build("LBFGS", &Vec::new(), 3).err().expect("rejected");
    assert!(matches!(e, OptimError::UnknownOptimizer { .. }));
    assert!(e.to_string().contains("RAdam"), "{e}");
}

#[test]
fn defaults_are_torchs() {
    let get = |name: &str, key: &str| {
        let o = build(name, &Vec::new(), 1).expect("builds");
        o.hyperparameters()
            .into_iter()
            .find(|(n, _)| n == key)
            .map(|(_, v)| v)
    };
    assert_eq!(get("SGD", "lr"), Some(F(1e-3)));
    assert_eq!(get("Adam", "lr"), Some(F(1e-3)));
    assert_eq!(get("Adam", "betas"), Some(P(0.9, 0.999)));
    assert_eq!(get("Adam", "eps"), Some(F(1e-8)));
    assert_eq!(get("Adam", "weight_decay"), Some(F(0.0)));
    assert_eq!(get("AdamW", "weight_decay"), Some(F(1e-2)));
    assert_eq!(get("Adagrad", "lr"), Some(F(1e-2)));
    assert_eq!(get("Adagrad", "eps"), Some(F(1e-10)));
    assert_eq!(get("RMSprop", "alpha"), Some(F(0.99)));
    assert_eq!(get("Adadelta", "lr"), Some(F(1.0)));
    assert_eq!(get("Adadelta", "rho"), Some(F(0.9)));
    assert_eq!(get("Adadelta", "eps"), Some(F(1e-6)));
    assert_eq!(get("Adamax", "lr"), Some(F(2e-3)));
    assert_eq!(get("NAdam", "lr"), Some(F(2e-3)));
    assert_eq!(get("NAdam", "momentum_decay"), Some(F(4e-3)));
    assert_eq!(get("RAdam", "decoupled_weight_decay"), Some(B(false)));
}

#[test]
fn validation_matches_torch() {
    type Case<'a> = (&'a str, &'a [(&'a str, HyperValue)], &'a str);
    let bad: &[Case] = &[
        ("SGD", &[("lr", F(-0.1))], "lr"),
        ("SGD", &[("momentum", F(-0.1))], "momentum"),
        ("SGD", &[("nesterov", B(true))], "nesterov"),
        (
            "SGD",
            &[
                ("nesterov", B(true)),
                ("momentum", F(0.9)),
                ("dampening", F(0.1)),
            ],
            "nesterov",
        ),
        ("Adam", &[("betas", P(1.0, 0.9))], "betas[0]"),
        ("Adam", &[("betas", P(0.9, -0.1))], "betas[1]"),
        ("Adam", &[("eps", F(-1.0))], "eps"),
        ("Adam", &[("lr", F(f64::NAN))], "lr"),
        ("AdamW", &[("weight_decay", F(-1.0))], "weight_decay"),
        ("Adagrad", &[("lr_decay", F(-1.0))], "lr_decay"),
        (
            "Adagrad",
            &[("initial_accumulator_value", F(-1.0))],
            "initial_accumulator_value",
        ),
        ("RMSprop", &[("alpha", F(-0.5))], "alpha"),
        ("Adadelta", &[("rho", F(1.5))], "rho"),
        ("NAdam", &[("momentum_decay", F(-1.0))], "momentum_decay"),
        ("RAdam", &[("betas", P(0.9, 1.0))], "betas[1]"),
    ];
    for (opt, hp, name) in bad {
        match build(opt, &h(hp), 1) {
            Err(OptimError::OutOfRange { name: n, .. }) => assert_eq!(n, *name, "{opt}"),
            other => panic!("{opt} {hp:?}: expected OutOfRange, got {:?}", other.err()),
        }
    }
    // Accepted edges.
    for (opt, hp) in [
        ("SGD", h(&[("nesterov", B(true)), ("momentum", F(0.9))])),
        ("Adadelta", h(&[("rho", F(1.0))])),
        ("RMSprop", h(&[("alpha", F(1.5))])),
        ("Adam", h(&[("lr", F(0.0)), ("betas", P(0.0, 0.0))])),
    ] {
        assert!(build(opt, &hp, 1).is_ok(), "{opt} {hp:?}");
    }
}

#[test]
fn unknown_and_mistyped_hyperparameters_are_rejected() {
    let e = build("Adam", &h(&[("momentum", F(0.9))]), 1)
        .err()
        .expect("rejected");
    let msg = e.to_string();
    assert!(matches!(e, OptimError::UnknownHyperparameter { .. }));
    assert!(
        msg.contains("momentum") && msg.contains("amsgrad") && msg.contains("betas"),
        "{msg}"
    );
    assert!(build("AdamW", &h(&[("decoupled_weight_decay", B(true))]), 1).is_err());
    assert!(build("SGD", &h(&[("foreach", B(false))]), 1).is_err());
    let e = build("Adam", &h(&[("amsgrad", F(1.0))]), 1)
        .err()
        .expect("rejected");
    assert!(matches!(e, OptimError::WrongType { .. }), "{e}");
    let e = build("Adam", &h(&[("betas", F(0.9))]), 1)
        .err()
        .expect("rejected");
    assert!(matches!(e, OptimError::WrongType { .. }), "{e}");
}

#[test]
fn relaxed_equals_exclusive_and_parallel_equals_sequential() {
    let n = 10_007;
    let small = Parallelism {
        min_len: 1,
        chunk_len: 1000,
    };
    for (name, hp) in configs() {
        let mut seq = build(name, &hp, n).expect("builds");
        seq.set_parallelism(Parallelism::SEQUENTIAL);
        let mut par = build(name, &hp, n).expect("builds");
        par.set_parallelism(small);
        let mut rel = build(name, &hp, n).expect("builds");
        rel.set_parallelism(Parallelism::SEQUENTIAL);
        let mut rel_par = build(name, &hp, n).expect("builds");
        rel_par.set_parallelism(small);
        // Double-buffered: step from one buffer into the other, then swap them.
        let (mut into_seq, mut into_par) = (
            build(name, &hp, n).expect("builds"),
            build(name, &hp, n).expect("builds"),
        );
        into_seq.set_parallelism(Parallelism::SEQUENTIAL);
        into_par.set_parallelism(small);
        let init = data(n, 1);
        let (mut p_seq, mut p_par) = (init.clone(), init.clone());
        let (p_rel, p_rel_par) = (AtomicF32::vec_from(&init), AtomicF32::vec_from(&init));
        let (mut cur_seq, mut next_seq) = (init.clone(), vec![f32::NAN; n]);
        let (mut cur_par, mut next_par) = (init.clone(), vec![f32::NAN; n]);
        for s in 0..7 {
            let g = data(n, 100 + s);
            seq.step(&mut p_seq, &g);
            par.step(&mut p_par, &g);
            rel.step_relaxed(&p_rel, &g);
            rel_par.step_relaxed(&p_rel_par, &g);
            into_seq.step_into(&cur_seq, &mut next_seq, &g);
            std::mem::swap(&mut cur_seq, &mut next_seq);
            into_par.step_into(&cur_par, &mut next_par, &g);
            std::mem::swap(&mut cur_par, &mut next_par);
        }
        assert_eq!(bits(&p_seq), bits(&p_par), "{name}: parallel step");
        assert_eq!(bits(&p_seq), bits(&cur_seq), "{name}: step_into");
        assert_eq!(bits(&p_seq), bits(&cur_par), "{name}: parallel step_into");
        assert_eq!(seq.export_state(), into_par.export_state(), "{name}: state");
        assert_eq!(
            bits(&p_seq),
            bits(&AtomicF32::snapshot(&p_rel)),
            "{name}: relaxed"
        );
        assert_eq!(
            bits(&p_seq),
            bits(&AtomicF32::snapshot(&p_rel_par)),
            "{name}: relaxed parallel"
        );
        assert_eq!(seq.export_state(), par.export_state(), "{name}: state");
        assert_eq!(seq.export_state(), rel_par.export_state(), "{name}: state");
        assert!(p_seq.iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn step_into_with_equals_widening_first_then_narrowing_every_path() {
    use crate::kernel::WIDEN_BLOCK;
    use crate::{Grads, Narrowed};
    // Run on an explicit 2-thread pool, so the parallel paths run in parallel on any machine.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a rayon pool");
    pool.install(|| {
        assert_eq!(rayon::current_num_threads(), 2);
        let pars = [
            Parallelism::SEQUENTIAL,
            // Parallel, chunks smaller than a widening block.
            Parallelism {
                min_len: 1,
                chunk_len: 5000,
            },
            // Parallel, chunks larger than a block (capped to one when widening or narrowing).
            Parallelism {
                min_len: 1,
                chunk_len: 3 * WIDEN_BLOCK / 2,
            },
            Parallelism::default(),
        ];
        // A model within one block (the direct path) and one over several, not a multiple of
        // a block and above the default parallel threshold; both with a model-buffer tail.
        for n in [1_000, 4 * WIDEN_BLOCK + 1234] {
            for (name, hp) in configs() {
                for par in pars {
                    for bf16 in [false, true] {
                        for narrow in [false, true] {
                            check_step_into_with(name, &hp, n, par, bf16, narrow);
                        }
                    }
                }
            }
        }
    });

    fn check_step_into_with(
        name: &str,
        hp: &Hyperparameters,
        n: usize,
        par: Parallelism,
        bf16: bool,
        narrow: bool,
    ) {
        let what = format!("{name} n={n} {par:?} bf16={bf16} narrowed={narrow}");
        let build_one = || {
            let mut o = crate::with_model_buffers(build(name, hp, n - 3).expect("builds"), 3);
            o.set_parallelism(par);
            o
        };
        let (mut reference, mut tested) = (build_one(), build_one());
        let (mut cur_r, mut next_r) = (data(n, 1), vec![f32::NAN; n]);
        let (mut cur_t, mut next_t) = (cur_r.clone(), vec![f32::NAN; n]);
        for s in 0..3 {
            // bfloat16 words in wire order (one in every 97 a NaN's, one a subnormal's).
            let words: Vec<u16> = data(n, 200 + s)
                .iter()
                .enumerate()
                .map(|(i, v)| match i % 97 {
                    0 => 0x7fc1,
                    1 => 0x0001,
                    _ => (v.to_bits() >> 16) as u16,
                })
                .map(u16::to_le)
                .collect();
            let widened: Vec<f32> = words
                .iter()
                .map(|w| f32::from_bits(u32::from(u16::from_le(*w)) << 16))
                .collect();
            let f32_grads = data(n, 300 + s);
            let (g_ref, grads) = if bf16 {
                (widened.as_slice(), Grads::Bf16(&words))
            } else {
                (f32_grads.as_slice(), Grads::F32(&f32_grads))
            };
            reference.step_into(&cur_r, &mut next_r, g_ref);
            let mut copy = vec![0u16; n];
            let narrowed = narrow.then(|| Narrowed {
                out: &mut copy,
                encode: sparktorch_proto::payload::encode_bf16_words,
            });
            tested.step_into_with(&cur_t, &mut next_t, grads, narrowed);
            if narrow {
                let mut want = vec![1u16; n];
                sparktorch_proto::payload::encode_bf16_words(&next_r, &mut want);
                assert_eq!(copy, want, "{what}: narrowed copy");
            }
            std::mem::swap(&mut cur_r, &mut next_r);
            std::mem::swap(&mut cur_t, &mut next_t);
        }
        assert_eq!(bits(&cur_r), bits(&cur_t), "{what}: values");
        // Bit for bit (the NaN gradients leave NaNs in some states).
        let state_bits = |st: crate::OptimizerState| {
            let bufs: Vec<(String, Vec<u32>)> = st
                .buffers
                .iter()
                .map(|(k, v)| (k.clone(), bits(v)))
                .collect();
            (st.step, st.scalars, bufs)
        };
        assert_eq!(
            state_bits(reference.export_state()),
            state_bits(tested.export_state()),
            "{what}: state"
        );
    }
}

#[test]
fn state_roundtrip_continues_identically() {
    let n = 33;
    for (name, hp) in configs() {
        let mut a = build(name, &hp, n).expect("builds");
        let mut p = data(n, 7);
        for s in 0..5 {
            a.step(&mut p, &data(n, 50 + s));
        }
        let st = a.export_state();
        assert_eq!(st.step, 5, "{name}");
        let mut b = build(name, &hp, n).expect("builds");
        b.import_state(&st).expect("imports");
        assert_eq!(b.export_state(), st, "{name}");
        let mut q = p.clone();
        for s in 0..3 {
            let g = data(n, 90 + s);
            a.step(&mut p, &g);
            b.step(&mut q, &g);
        }
        assert_eq!(bits(&p), bits(&q), "{name}: continued after import");
    }
}

#[test]
fn state_names_follow_torch() {
    let names = |name: &str, hp: Hyperparameters| {
        let mut o = build(name, &hp, 2).expect("builds");
        o.step(&mut [1.0, 2.0], &[0.5, -0.5]);
        let st = o.export_state();
        let mut v: Vec<String> = st.buffers.iter().map(|(n, _)| n.clone()).collect();
        v.extend(st.scalars.iter().map(|(n, _)| n.clone()));
        v
    };
    assert_eq!(names("SGD", Vec::new()), Vec::<String>::new());
    assert_eq!(
        names("SGD", h(&[("momentum", F(0.9))])),
        ["momentum_buffer"]
    );
    assert_eq!(
        names("Adam", h(&[("amsgrad", B(true))])),
        ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    );
    assert_eq!(names("Adagrad", Vec::new()), ["sum"]);
    assert_eq!(
        names("RMSprop", h(&[("momentum", F(0.9)), ("centered", B(true))])),
        ["square_avg", "momentum_buffer", "grad_avg"]
    );
    assert_eq!(names("Adadelta", Vec::new()), ["square_avg", "acc_delta"]);
    assert_eq!(names("Adamax", Vec::new()), ["exp_avg", "exp_inf"]);
    assert_eq!(
        names("NAdam", Vec::new()),
        ["exp_avg", "exp_avg_sq", "mu_product"]
    );
    assert_eq!(names("RAdam", Vec::new()), ["exp_avg", "exp_avg_sq"]);
}

#[test]
fn bad_state_is_rejected() {
    let mut o = build("Adam", &Vec::new(), 4).expect("builds");
    let mut st = o.export_state();
    // Fresh state (step 0, no buffers) is fine.
    assert!(o.import_state(&st).is_ok());
    st.step = 3;
    st.buffers.clear();
    assert!(
        matches!(o.import_state(&st), Err(OptimError::BadState { .. })),
        "step without buffers"
    );
    st.buffers = vec![("exp_avg".into(), vec![0.0; 4])];
    let e = o.import_state(&st).expect_err("missing exp_avg_sq");
    assert!(e.to_string().contains("exp_avg_sq"), "{e}");
    st.buffers.push(("exp_avg_sq".into(), vec![0.0; 5]));
    assert!(o.import_state(&st).is_err(), "wrong length");
    st.buffers[1].1.truncate(4);
    st.buffers.push(("max_exp_avg_sq".into(), vec![0.0; 4]));
    assert!(
        o.import_state(&st).is_err(),
        "amsgrad buffer into plain Adam"
    );
    st.buffers.pop();
    assert!(o.import_state(&st).is_ok());
    st.scalars.push(("mu_product".into(), 0.5));
    assert!(o.import_state(&st).is_err(), "NAdam scalar into Adam");
    // SGD with momentum before its first step has no buffer (torch's None).
    let mut s = build("SGD", &h(&[("momentum", F(0.9))]), 2).expect("builds");
    assert!(s.export_state().buffers.is_empty());
    let mut p = [1.0, 1.0];
    s.step(&mut p, &[1.0, 2.0]);
    assert_eq!(
        s.export_state().buffers,
        vec![("momentum_buffer".to_string(), vec![1.0, 2.0])]
    );
}

#[test]
fn sgd_momentum_buffer_starts_as_the_first_gradient() {
    let hp = h(&[("lr", F(1.0)), ("momentum", F(0.5)), ("dampening", F(0.5))]);
    let mut o = build("SGD", &hp, 1).expect("builds");
    let mut p = [0.0f32];
    o.step(&mut p, &[2.0]);
    assert_eq!(p, [-2.0]); // no dampening on the first step
    o.step(&mut p, &[2.0]);
    assert_eq!(p, [-2.0 - (0.5 * 2.0 + 0.5 * 2.0)]);
}
