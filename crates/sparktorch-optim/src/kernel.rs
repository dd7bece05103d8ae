//! The machinery shared by every optimizer: an element-wise update rule ([`Algorithm`]) run over
//! flat buffers by a [`Driver`], sequentially or in parallel chunks, with exclusive access or over
//! relaxed atomics, and the generic [`Elementwise`] optimizer that owns the state.
//!
//! An algorithm is written once, as a pure function of one element
//! `(param, grad, [state; N]) -> (param', [state'; N])` plus per-step scalars computed once per
//! step; both step flavours and both schedules run that same function, so they agree bit for bit.

use std::cell::RefCell;
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;
use sparktorch_proto::payload::decode_bf16_words;

use crate::{AtomicF32, Hyperparameters, OptimError, Optimizer, OptimizerState};

/// When and how a step is split into chunks that rayon updates in parallel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parallelism {
    /// Buffers shorter than this are updated sequentially on the calling thread (below it the
    /// cost of waking rayon's workers exceeds the work).
    pub min_len: usize,
    /// Elements per parallel chunk (large enough to amortise scheduling, small enough to balance).
    pub chunk_len: usize,
}

impl Parallelism {
    /// Never split: every step runs on the calling thread.
    pub const SEQUENTIAL: Parallelism = Parallelism {
        min_len: usize::MAX,
        chunk_len: usize::MAX,
    };
}

impl Default for Parallelism {
    /// Parallel from 256Ki elements, in chunks of 64Ki (see `docs/benchmarks.md`).
    fn default() -> Self {
        Parallelism {
            min_len: 1 << 18,
            chunk_len: 1 << 16,
        }
    }
}

impl Parallelism {
    fn chunk_for(&self, len: usize) -> Option<usize> {
        (len >= self.min_len && len > self.chunk_len && rayon::current_num_threads() > 1)
            .then_some(self.chunk_len.max(1))
    }
}

/// Scalar (non-buffer) optimizer state, updated once per step under a small lock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepState {
    /// Steps taken so far (torch's `state["step"]`).
    pub step: u64,
    /// NAdam's running product of momentum coefficients; torch keeps it as an `f32` tensor.
    pub mu_product: f32,
    /// SGD: whether `momentum_buffer` exists yet (torch creates it from the first gradient).
    pub initialized: bool,
}

impl Default for StepState {
    fn default() -> Self {
        StepState {
            step: 0,
            mu_product: 1.0,
            initialized: false,
        }
    }
}

/// Runs an element-wise update over the buffers of one step.
pub trait Driver {
    /// Apply `f(param, grad, state) -> (param', state')` to every element. `N` must equal the
    /// number of buffers the algorithm declared in [`Algorithm::buffers`].
    fn run<const N: usize, F>(self, f: F)
    where
        F: Fn(f32, f32, [f32; N]) -> (f32, [f32; N]) + Sync;
}

/// One `torch.optim` algorithm, element-wise.
pub trait Algorithm: Send + Sync + Sized + 'static {
    /// Per-step scalars (bias corrections, step sizes), computed once per step.
    type Scalars: Copy + Send + Sync;

    /// Parse and validate hyperparameters (torch's names, defaults and range checks).
    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError>;

    /// The `torch.optim` class name.
    fn name(&self) -> &'static str;

    /// Every hyperparameter with defaults filled in.
    fn hyperparameters(&self) -> Hyperparameters;

    /// The per-element state buffers this configuration keeps, by torch's name, with their
    /// initial value, in the order [`Algorithm::apply`] takes them.
    fn buffers(&self) -> Vec<(&'static str, f32)>;

    /// Whether the buffers exist in torch's state yet (SGD's momentum buffer is created by the
    /// first step); absent buffers are neither exported nor required on import.
    fn buffers_live(&self, st: &StepState) -> bool {
        let _ = st;
        true
    }

    /// True when torch creates the buffers from the first gradient rather than at step 0 (SGD's
    /// momentum buffer): importing no buffers at a step > 0 is then legal (torch's `None`).
    fn lazy_buffers(&self) -> bool {
        false
    }

    /// Scalar state beyond `step`, by torch's name.
    fn export_scalars(&self, st: &StepState) -> Vec<(String, f64)> {
        let _ = st;
        Vec::new()
    }

    /// Restore scalar state beyond `step` (`st.step` is already set).
    fn import_scalars(
        &self,
        st: &mut StepState,
        scalars: &[(String, f64)],
    ) -> Result<(), OptimError> {
        let _ = st;
        match scalars.first() {
            None => Ok(()),
            Some((name, _)) => Err(OptimError::BadState {
                optimizer: self.name(),
                reason: format!("unexpected scalar state {name:?}"),
            }),
        }
    }

    /// Advance the scalar state by one step and compute that step's scalars.
    fn begin_step(&self, st: &mut StepState) -> Self::Scalars;

    /// Run the element-wise update of one step through `d`.
    fn apply<D: Driver>(&self, sc: Self::Scalars, d: D);
}

/// `torch.lerp(a, b, w)` as ATen computes it for `f32` (two formulas, chosen by `|w| < 0.5`).
#[inline(always)]
pub(crate) fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// `torch.maximum`: NaN in either operand gives NaN.
#[inline(always)]
pub(crate) fn maximum(a: f32, b: f32) -> f32 {
    if a.is_nan() || a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn sequential<const N: usize, F>(p: &mut [f32], g: &[f32], mut b: [&mut [f32]; N], f: &F)
where
    F: Fn(f32, f32, [f32; N]) -> (f32, [f32; N]),
{
    let n = p.len();
    let g = &g[..n];
    for bk in b.iter_mut() {
        let whole = std::mem::take(bk);
        *bk = &mut whole[..n];
    }
    for i in 0..n {
        let s: [f32; N] = std::array::from_fn(|k| b[k][i]);
        let (np, ns) = f(p[i], g[i], s);
        p[i] = np;
        for k in 0..N {
            b[k][i] = ns[k];
        }
    }
}

/// Where a step reads the parameters from: the buffer it writes (in place) or another one.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// Read and write the same buffer.
    InPlace,
    /// Read these values (same length as the destination), write the destination: the step of
    /// a double-buffered store, which never copies the model first.
    From(&'a [f32]),
}

/// The gradients a step reads.
#[derive(Debug, Clone, Copy)]
pub enum Grads<'a> {
    /// `f32` values.
    F32(&'a [f32]),
    /// bfloat16 words in wire order (little-endian), as a push carried them: widened to `f32`
    /// (exactly) [`WIDEN_BLOCK`] at a time into a per-thread scratch buffer that stays in
    /// cache, so no model-size `f32` copy of the gradient is ever written or read.
    Bf16(&'a [u16]),
}

impl Grads<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(g) => g.len(),
            Self::Bf16(w) => w.len(),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A second output of a step: each chunk of new values, narrowed by `encode` into the matching
/// chunk of `out` (same length as the values) right after the step wrote it, while it is still
/// in cache: what a store does to keep a bfloat16 copy of every version without a second pass
/// over the model.
pub struct Narrowed<'a> {
    /// One word per value.
    pub out: &'a mut [u16],
    /// Writes `values`' words into `out` (same length).
    pub encode: fn(&[f32], &mut [u16]),
}

/// Elements widened at a time from bfloat16 (256 KiB of `f32`: in a core's L2 cache).
pub(crate) const WIDEN_BLOCK: usize = 1 << 16;

thread_local! {
    /// Each thread's scratch for widened bfloat16 gradients (at most [`WIDEN_BLOCK`] values).
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// An element type gradients arrive in.
trait GradElem: Copy + Send + Sync {
    /// Whether a chunk of any length can be read as `f32` without a scratch buffer.
    const DIRECT: bool;
    /// Call `f` with `chunk` as `f32` values.
    fn as_f32<R>(chunk: &[Self], f: impl FnOnce(&[f32]) -> R) -> R;
}

impl GradElem for f32 {
    const DIRECT: bool = true;
    #[inline(always)]
    fn as_f32<R>(chunk: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
        f(chunk)
    }
}

impl GradElem for u16 {
    const DIRECT: bool = false;
    #[inline(always)]
    fn as_f32<R>(chunk: &[u16], f: impl FnOnce(&[f32]) -> R) -> R {
        WIDENED.with(|scratch| {
            // `f` runs one chunk's element loop (no rayon call, no re-entry): the borrow is
            // never taken twice.
            let mut scratch = scratch.borrow_mut();
            scratch.resize(chunk.len(), 0.0);
            decode_bf16_words(chunk, &mut scratch);
            f(&scratch)
        })
    }
}

/// [`sequential`] reading the parameters from `src` and writing them to `dst`.
#[inline(always)]
fn sequential_into<const N: usize, F>(
    src: &[f32],
    dst: &mut [f32],
    g: &[f32],
    mut b: [&mut [f32]; N],
    f: &F,
) where
    F: Fn(f32, f32, [f32; N]) -> (f32, [f32; N]),
{
    let n = dst.len();
    let (src, g) = (&src[..n], &g[..n]);
    for bk in b.iter_mut() {
        let whole = std::mem::take(bk);
        *bk = &mut whole[..n];
    }
    for i in 0..n {
        let s: [f32; N] = std::array::from_fn(|k| b[k][i]);
        let (np, ns) = f(src[i], g[i], s);
        dst[i] = np;
        for k in 0..N {
            b[k][i] = ns[k];
        }
    }
}

/// Run one chunk: in place, or from the matching chunk of the source.
#[inline(always)]
fn chunk<const N: usize, F>(
    src: Option<&[f32]>,
    p: &mut [f32],
    g: &[f32],
    b: [&mut [f32]; N],
    f: &F,
) where
    F: Fn(f32, f32, [f32; N]) -> (f32, [f32; N]),
{
    match src {
        None => sequential(p, g, b, f),
        Some(s) => sequential_into(s, p, g, b, f),
    }
}

/// Exclusive access: plain `f32` slices.
pub(crate) struct Exclusive<'a> {
    pub(crate) params: &'a mut [f32],
    pub(crate) source: Source<'a>,
    pub(crate) grads: Grads<'a>,
    pub(crate) bufs: Vec<&'a mut [f32]>,
    pub(crate) par: Parallelism,
    pub(crate) narrowed: Option<Narrowed<'a>>,
}

impl Driver for Exclusive<'_> {
    fn run<const N: usize, F>(self, f: F)
    where
        F: Fn(f32, f32, [f32; N]) -> (f32, [f32; N]) + Sync,
    {
        let Ok(bufs) = <[&mut [f32]; N]>::try_from(self.bufs) else {
            // Cannot happen: `Elementwise` allocates exactly `Algorithm::buffers()` buffers, and
            // every algorithm runs with N equal to that count (covered by every unit test).
            unreachable!("algorithm buffer count does not match its kernel");
        };
        let src = match self.source {
            Source::InPlace => None,
            Source::From(s) => Some(s),
        };
        let narrowed = self.narrowed;
        match self.grads {
            Grads::F32(g) => exclusive(src, self.params, g, bufs, narrowed, self.par, &f),
            Grads::Bf16(w) => exclusive(src, self.params, w, bufs, narrowed, self.par, &f),
        }
    }
}

/// One chunk of an exclusive step: its source values (when not in place), parameters,
/// gradients, state buffers and narrowed copy (when one is written).
type Job<'a, const N: usize, G> = (
    Option<&'a [f32]>,
    &'a mut [f32],
    &'a [G],
    [&'a mut [f32]; N],
    Option<&'a mut [u16]>,
);

/// One exclusive step over `params` (from `src` when given) with gradients of element type
/// `G`: in chunks that rayon updates in parallel when `par` says so, else on this thread (in
/// [`WIDEN_BLOCK`] blocks when the gradients need widening). Element-wise: the chunking never
/// changes a result.
fn exclusive<const N: usize, F, G: GradElem>(
    src: Option<&[f32]>,
    params: &mut [f32],
    grads: &[G],
    bufs: [&mut [f32]; N],
    narrowed: Option<Narrowed<'_>>,
    par: Parallelism,
    f: &F,
) where
    F: Fn(f32, f32, [f32; N]) -> (f32, [f32; N]) + Sync,
{
    let (out, encode) = match narrowed {
        Some(Narrowed { out, encode }) => (Some(out), Some(encode)),
        None => (None, None),
    };
    let parallel = par.chunk_for(params.len());
    let c = match parallel {
        None if (G::DIRECT && out.is_none()) || params.len() <= WIDEN_BLOCK => {
            G::as_f32(grads, |g| chunk(src, params, g, bufs, f));
            if let (Some(out), Some(encode)) = (out, encode) {
                encode(params, out);
            }
            return;
        }
        None => WIDEN_BLOCK,
        Some(c) if G::DIRECT && out.is_none() => c,
        Some(c) => c.min(WIDEN_BLOCK),
    };
    let mut its = bufs.map(|b| b.chunks_mut(c));
    let mut srcs = src.map(|s| s.chunks(c));
    let mut outs = out.map(|o| o.chunks_mut(c));
    let jobs: Vec<_> = params
        .chunks_mut(c)
        .zip(grads.chunks(c))
        .map(|(pc, gc)| {
            // Every buffer (and the source, and the narrowed copy) has params' length (checked
            // in `Elementwise::step_into_with`), so each iterator yields a chunk here; the
            // empty default is never used.
            let bc: [&mut [f32]; N] = its.each_mut().map(|it| it.next().unwrap_or_default());
            let sc = srcs.as_mut().map(|it| it.next().unwrap_or_default());
            let oc = outs.as_mut().map(|it| it.next().unwrap_or_default());
            (sc, pc, gc, bc, oc)
        })
        .collect();
    let run = |job: Job<'_, N, G>| {
        let (sc, pc, gc, bc, oc) = job;
        G::as_f32(gc, |g| chunk(sc, &mut *pc, g, bc, f));
        if let (Some(oc), Some(encode)) = (oc, encode) {
            encode(pc, oc);
        }
    };
    if parallel.is_some() {
        jobs.into_par_iter().for_each(run);
    } else {
        jobs.into_iter().for_each(run);
    }
}

/// Concurrent (HOGWILD!) access: relaxed atomic loads and stores.
pub(crate) struct Relaxed<'a> {
    pub(crate) params: &'a [AtomicF32],
    pub(crate) grads: &'a [f32],
    pub(crate) bufs: Vec<&'a [AtomicF32]>,
    pub(crate) par: Parallelism,
}

impl Driver for Relaxed<'_> {
    fn run<const N: usize, F>(self, f: F)
    where
        F: Fn(f32, f32, [f32; N]) -> (f32, [f32; N]) + Sync,
    {
        let Ok(bufs) = <[&[AtomicF32]; N]>::try_from(self.bufs) else {
            // Cannot happen: see `Exclusive::run`.
            unreachable!("algorithm buffer count does not match its kernel");
        };
        let (params, grads) = (self.params, self.grads);
        let n = params.len();
        let grads = &grads[..n];
        let bufs = bufs.map(|b| &b[..n]);
        let body = |lo: usize, hi: usize| {
            for i in lo..hi {
                let s: [f32; N] = std::array::from_fn(|k| bufs[k][i].load());
                let (np, ns) = f(params[i].load(), grads[i], s);
                params[i].store(np);
                for k in 0..N {
                    bufs[k][i].store(ns[k]);
                }
            }
        };
        match self.par.chunk_for(n) {
            None => body(0, n),
            Some(c) => (0..n.div_ceil(c))
                .into_par_iter()
                .for_each(|ci| body(ci * c, ((ci + 1) * c).min(n))),
        }
    }
}

/// An optimizer made of an element-wise [`Algorithm`] and its state over `len` elements.
pub struct Elementwise<A: Algorithm> {
    /// The update rule and its hyperparameters.
    algo: A,
    /// Number of parameter elements.
    len: usize,
    /// Buffer names and initial values (`algo.buffers()`), cached.
    layout: Vec<(&'static str, f32)>,
    /// The per-element state buffers, in `layout` order; atomics so HOGWILD! steps can share them.
    bufs: Vec<Vec<AtomicF32>>,
    /// Step count and other scalars; a tiny lock taken once per step.
    scalars: Mutex<StepState>,
    /// How large steps are split across threads.
    par: Parallelism,
}

impl<A: Algorithm> Elementwise<A> {
    /// Build from hyperparameters (missing ones take torch's defaults) for `len` elements.
    pub fn new(hyper: &Hyperparameters, len: usize) -> Result<Self, OptimError> {
        let algo = A::from_hyper(hyper)?;
        let layout = algo.buffers();
        let bufs = layout
            .iter()
            .map(|&(_, v)| AtomicF32::vec_filled(v, len))
            .collect();
        Ok(Self {
            algo,
            len,
            layout,
            bufs,
            scalars: Mutex::new(StepState::default()),
            par: Parallelism::default(),
        })
    }

    fn check_lengths(&self, params: usize, grads: usize) {
        assert!(
            params == self.len && grads == self.len,
            "{}: params ({params}) and grads ({grads}) must both have the optimizer's length ({})",
            self.algo.name(),
            self.len
        );
    }

    /// One exclusive step writing `params`, reading them from `source`.
    fn step_exclusive(
        &mut self,
        params: &mut [f32],
        source: Source<'_>,
        grads: Grads<'_>,
        narrowed: Option<Narrowed<'_>>,
    ) {
        let st = self
            .scalars
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let sc = self.algo.begin_step(st);
        let bufs = self
            .bufs
            .iter_mut()
            .map(|b| AtomicF32::as_mut_f32(b))
            .collect();
        self.algo.apply(
            sc,
            Exclusive {
                params,
                source,
                grads,
                bufs,
                par: self.par,
                narrowed,
            },
        );
    }

    fn bad(&self, reason: String) -> OptimError {
        OptimError::BadState {
            optimizer: self.algo.name(),
            reason,
        }
    }
}

impl<A: Algorithm> Optimizer for Elementwise<A> {
    fn name(&self) -> &'static str {
        self.algo.name()
    }

    fn hyperparameters(&self) -> Hyperparameters {
        self.algo.hyperparameters()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn set_parallelism(&mut self, par: Parallelism) {
        self.par = par;
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        self.check_lengths(params.len(), grads.len());
        self.step_exclusive(params, Source::InPlace, Grads::F32(grads), None);
    }

    fn step_into(&mut self, src: &[f32], dst: &mut [f32], grads: &[f32]) {
        self.check_lengths(dst.len(), grads.len());
        self.check_lengths(src.len(), grads.len());
        self.step_exclusive(dst, Source::From(src), Grads::F32(grads), None);
    }

    fn step_into_with(
        &mut self,
        src: &[f32],
        dst: &mut [f32],
        grads: Grads<'_>,
        narrowed: Option<Narrowed<'_>>,
    ) {
        self.check_lengths(dst.len(), grads.len());
        self.check_lengths(src.len(), grads.len());
        if let Some(n) = &narrowed {
            self.check_lengths(n.out.len(), grads.len());
        }
        self.step_exclusive(dst, Source::From(src), grads, narrowed);
    }

    fn step_relaxed(&self, params: &[AtomicF32], grads: &[f32]) {
        self.check_lengths(params.len(), grads.len());
        let sc = {
            let mut st = self.scalars.lock().unwrap_or_else(PoisonError::into_inner);
            self.algo.begin_step(&mut st)
        };
        let bufs = self.bufs.iter().map(Vec::as_slice).collect();
        self.algo.apply(
            sc,
            Relaxed {
                params,
                grads,
                bufs,
                par: self.par,
            },
        );
    }

    fn export_state(&self) -> OptimizerState {
        let st = *self.scalars.lock().unwrap_or_else(PoisonError::into_inner);
        let buffers = if self.algo.buffers_live(&st) {
            self.layout
                .iter()
                .zip(&self.bufs)
                .map(|(&(name, _), b)| (name.to_string(), AtomicF32::snapshot(b)))
                .collect()
        } else {
            Vec::new()
        };
        OptimizerState {
            step: st.step,
            scalars: self.algo.export_scalars(&st),
            buffers,
        }
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        if let Some((name, _)) = state
            .buffers
            .iter()
            .find(|(n, _)| !self.layout.iter().any(|(l, _)| l == n))
        {
            let expected: Vec<_> = self.layout.iter().map(|(n, _)| *n).collect();
            return Err(self.bad(format!(
                "unexpected buffer {name:?} (this configuration keeps: [{}])",
                expected.join(", ")
            )));
        }
        if let Some((name, b)) = state.buffers.iter().find(|(_, b)| b.len() != self.len) {
            return Err(self.bad(format!(
                "buffer {name:?} has {} elements, expected {}",
                b.len(),
                self.len
            )));
        }
        let mut st = StepState {
            step: state.step,
            ..StepState::default()
        };
        self.algo.import_scalars(&mut st, &state.scalars)?;
        let found = |name: &str| state.buffers.iter().rev().find(|(n, _)| n == name);
        let present = self
            .layout
            .iter()
            .filter(|(n, _)| found(n).is_some())
            .count();
        // All buffers, or none: none is a fresh state (step 0), or SGD before its first step.
        if present == 0 {
            st.initialized = false;
            if state.step > 0 && !self.layout.is_empty() && !self.algo.lazy_buffers() {
                return Err(self.bad(format!(
                    "step is {} but no state buffers were given",
                    state.step
                )));
            }
            for ((_, init), b) in self.layout.iter().zip(&mut self.bufs) {
                AtomicF32::as_mut_f32(b).fill(*init);
            }
        } else if present < self.layout.len() {
            let missing: Vec<_> = self
                .layout
                .iter()
                .filter(|(n, _)| found(n).is_none())
                .map(|(n, _)| *n)
                .collect();
            return Err(self.bad(format!("missing buffer(s): {}", missing.join(", "))));
        } else {
            st.initialized = true;
            for ((name, _), b) in self.layout.iter().zip(&mut self.bufs) {
                if let Some((_, v)) = found(name) {
                    AtomicF32::as_mut_f32(b).copy_from_slice(v);
                }
            }
        }
        *self
            .scalars
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = st;
        Ok(())
    }
}
