//! Server-side optimizers for the sparktorch parameter server.
//!
//! The parameter server keeps a model as one flat `f32` buffer (every tensor of the
//! `state_dict`, in order). Every optimizer that `torch.optim` offers for this product is
//! element-wise: the update of element `i` depends only on `params[i]`, `grads[i]`, per-element
//! state buffers (`exp_avg[i]`, ...) and per-step scalars (step count, bias corrections). So an
//! optimizer here works over flat slices, and large buffers are updated in parallel chunks.
//!
//! Two ways to step, one per training style:
//! - [`Optimizer::step`]: exclusive access (`async` with locking, `synchronous`);
//! - [`Optimizer::step_relaxed`]: concurrent steps over relaxed atomics (HOGWILD!): no data race
//!   in Rust's sense, but updates may interleave element by element, as the algorithm allows.
//!
//! Numerics follow `torch.optim` (2.x, single-tensor "for-loop" implementation, `f32` math where
//! torch does it in `f32`), so that one worker training through the server equals plain PyTorch.

mod adam;
mod adam_family;
mod adaptive;
pub mod atomic;
mod error;
mod hyper;
pub mod kernel;
mod model_buffers;
mod sgd;
#[cfg(test)]
mod tests;

pub use adam::{Adam, AdamAlgo, AdamW, AdamWAlgo};
pub use adam_family::{Adamax, AdamaxAlgo, NAdam, NAdamAlgo, RAdam, RAdamAlgo};
pub use adaptive::{Adadelta, AdadeltaAlgo, Adagrad, AdagradAlgo, RmsProp, RmsPropAlgo};
pub use atomic::AtomicF32;
pub use error::OptimError;
pub use hyper::{HyperValue, Hyperparameters};
pub use kernel::{Elementwise, Grads, Narrowed, Parallelism};
pub use model_buffers::{with_model_buffers, WithModelBuffers};
pub use sgd::{Sgd, SgdAlgo};

/// A snapshot of an optimizer's state, named as `torch.optim` names it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OptimizerState {
    /// Number of steps taken (torch's per-parameter `step`; equal for every tensor here).
    pub step: u64,
    /// Scalar state beyond `step` (e.g. NAdam's `mu_product`), by torch's name.
    pub scalars: Vec<(String, f64)>,
    /// Per-element state buffers over the flat parameters, by torch's name (`exp_avg`, ...).
    pub buffers: Vec<(String, Vec<f32>)>,
}

/// An optimizer over one flat `f32` parameter buffer of a fixed length.
pub trait Optimizer: Send + Sync {
    /// The `torch.optim` class name this optimizer matches (`"SGD"`, `"Adam"`, ...).
    fn name(&self) -> &'static str;

    /// Every hyperparameter with defaults filled in, as torch's `param_groups[0]` shows them.
    fn hyperparameters(&self) -> Hyperparameters;

    /// Number of parameter elements this optimizer was built for.
    fn len(&self) -> usize;

    /// Number of leading elements the optimizer steps; the rest (model buffers, see
    /// [`WithModelBuffers`]) is updated by adding the pushed deltas. Equal to [`Self::len`] for
    /// a plain optimizer.
    fn trainable_len(&self) -> usize {
        self.len()
    }

    /// True when built for zero elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How large steps are split into parallel chunks (default: [`Parallelism::default`]).
    /// Results do not depend on it: every element's update is independent of the others.
    fn set_parallelism(&mut self, par: Parallelism) {
        let _ = par;
    }

    /// One step with exclusive access. `params.len() == grads.len() == self.len()`.
    fn step(&mut self, params: &mut [f32], grads: &[f32]);

    /// One exclusive step that reads the parameters from `src` and writes the stepped values
    /// to `dst` (both of [`Self::len`] elements), leaving `src` untouched: what a
    /// double-buffered store does instead of copying the model before stepping it. The result
    /// (values and state) is bit-identical to `dst.copy_from_slice(src); self.step(dst, grads)`,
    /// which is the default implementation.
    fn step_into(&mut self, src: &[f32], dst: &mut [f32], grads: &[f32]) {
        dst.copy_from_slice(src);
        self.step(dst, grads);
    }

    /// [`Self::step_into`], generalised: the gradients may be bfloat16 words in wire order
    /// ([`Grads::Bf16`], as a bfloat16 push carries them), and the step may also write the new
    /// values narrowed ([`Narrowed`], e.g. a bfloat16 copy for pulls). Widening bfloat16 is
    /// exact, so the values and state are bit-identical to widening `grads` to `f32`, calling
    /// `step_into`, then narrowing `dst` whole, which is the default implementation (it
    /// allocates the widened copy); the element-wise optimizers widen and narrow chunk by
    /// chunk as they step instead.
    fn step_into_with(
        &mut self,
        src: &[f32],
        dst: &mut [f32],
        grads: Grads<'_>,
        narrowed: Option<Narrowed<'_>>,
    ) {
        match grads {
            Grads::F32(g) => self.step_into(src, dst, g),
            Grads::Bf16(w) => {
                let mut wide = vec![0.0; w.len()];
                sparktorch_proto::payload::decode_bf16_words(w, &mut wide);
                self.step_into(src, dst, &wide);
            }
        }
        if let Some(Narrowed { out, encode }) = narrowed {
            encode(dst, out);
        }
    }

    /// One step that may run concurrently with other `step_relaxed` calls (HOGWILD!).
    /// Every element of `params` and of the state is loaded and stored with relaxed atomics.
    fn step_relaxed(&self, params: &[AtomicF32], grads: &[f32]);

    /// The state as torch names it, for checkpoints and `state_dict` export.
    fn export_state(&self) -> OptimizerState;

    /// Replace the state (from a checkpoint or a torch `state_dict`).
    fn import_state(&mut self, state: &OptimizerState) -> Result<(), OptimError>;
}

/// Names accepted by [`build`], as `torch.optim` class names.
pub const SUPPORTED: &[&str] = &[
    "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam",
];

/// Build the optimizer called `name` (a `torch.optim` class name, case-insensitive) for `len`
/// parameter elements, with the given hyperparameters (missing ones take torch's defaults).
pub fn build(
    name: &str,
    hyper: &Hyperparameters,
    len: usize,
) -> Result<Box<dyn Optimizer>, OptimError> {
    match name.to_ascii_lowercase().as_str() {
        "sgd" => Ok(Box::new(Sgd::new(hyper, len)?)),
        "adam" => Ok(Box::new(Adam::new(hyper, len)?)),
        "adamw" => Ok(Box::new(AdamW::new(hyper, len)?)),
        "adagrad" => Ok(Box::new(Adagrad::new(hyper, len)?)),
        "rmsprop" => Ok(Box::new(RmsProp::new(hyper, len)?)),
        "adadelta" => Ok(Box::new(Adadelta::new(hyper, len)?)),
        "adamax" => Ok(Box::new(Adamax::new(hyper, len)?)),
        "nadam" => Ok(Box::new(NAdam::new(hyper, len)?)),
        "radam" => Ok(Box::new(RAdam::new(hyper, len)?)),
        _ => Err(OptimError::UnknownOptimizer {
            name: name.to_string(),
            supported: SUPPORTED.join(", "),
        }),
    }
}
