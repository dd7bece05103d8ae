//! Model buffers beside the trainable parameters: an [`Optimizer`] adapter.
//!
//! A model's trained state is more than its trainable parameters: BatchNorm's running mean and
//! variance (and any buffer a module updates in `forward`) change while it trains. The server
//! keeps those buffers at the tail of its flat vector, after the `trainable` elements. Workers
//! push, for the tail, the *change* their forward pass made to the buffers they pulled (a delta,
//! not a gradient), and the tail is updated by adding it: no optimizer, no learning rate.
//!
//! So in every mode the tail follows what the workers' forward passes did to it:
//! - one worker: the server's buffers are that worker's buffers (plain PyTorch, up to one
//!   rounding of `x + (y - x)` in `f32`);
//! - synchronous: the round's deltas are averaged like gradients (weighted by batch size), so a
//!   BatchNorm running mean moves by the mean of the workers' batch statistics;
//! - async / hogwild: each push adds its worker's delta, as each push steps the parameters.
//!
//! A buffer the model never changes gets a zero delta: `x + 0.0` is `x` exactly.

use crate::atomic::AtomicF32;
use crate::{Grads, Hyperparameters, Narrowed, OptimError, Optimizer, OptimizerState, Parallelism};

/// An optimizer for the first `inner.len()` elements whose tail of `buffers` elements is
/// updated by adding the pushed values.
pub struct WithModelBuffers {
    /// Steps the trainable head.
    inner: Box<dyn Optimizer>,
    /// Length of the tail (model buffers).
    buffers: usize,
}

impl WithModelBuffers {
    /// `inner` for the trainable head, plus a tail of `buffers` elements.
    pub fn new(inner: Box<dyn Optimizer>, buffers: usize) -> Self {
        Self { inner, buffers }
    }
}

/// `inner`, extended by a tail of `buffers` model-buffer elements (`inner` itself when 0).
pub fn with_model_buffers(inner: Box<dyn Optimizer>, buffers: usize) -> Box<dyn Optimizer> {
    if buffers == 0 {
        inner
    } else {
        Box::new(WithModelBuffers::new(inner, buffers))
    }
}

impl Optimizer for WithModelBuffers {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn hyperparameters(&self) -> Hyperparameters {
        self.inner.hyperparameters()
    }

    fn len(&self) -> usize {
        self.inner.len() + self.buffers
    }

    fn trainable_len(&self) -> usize {
        self.inner.len()
    }

    fn set_parallelism(&mut self, par: Parallelism) {
        self.inner.set_parallelism(par);
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        let n = self.inner.len();
        let (head, tail) = params.split_at_mut(n);
        self.inner.step(head, &grads[..n]);
        for (b, d) in tail.iter_mut().zip(&grads[n..]) {
            *b += *d;
        }
    }

    fn step_into(&mut self, src: &[f32], dst: &mut [f32], grads: &[f32]) {
        let n = self.inner.len();
        let (head, tail) = dst.split_at_mut(n);
        self.inner.step_into(&src[..n], head, &grads[..n]);
        for ((b, s), d) in tail.iter_mut().zip(&src[n..]).zip(&grads[n..]) {
            *b = *s + *d;
        }
    }

    fn step_into_with(
        &mut self,
        src: &[f32],
        dst: &mut [f32],
        grads: Grads<'_>,
        narrowed: Option<Narrowed<'_>>,
    ) {
        let len = self.len();
        assert!(
            src.len() == len && dst.len() == len && grads.len() == len,
            "{}: src ({}), dst ({}) and grads ({}) must all have the optimizer's length ({len})",
            self.name(),
            src.len(),
            dst.len(),
            grads.len()
        );
        if let Some(n) = &narrowed {
            assert_eq!(
                n.out.len(),
                len,
                "{}: the narrowed copy's length",
                self.name()
            );
        }
        let n = self.inner.len();
        let (head, tail) = dst.split_at_mut(n);
        let (inner_out, tail_out) = match narrowed {
            Some(Narrowed { out, encode }) => {
                let (a, b) = out.split_at_mut(n);
                (Some(Narrowed { out: a, encode }), Some((b, encode)))
            }
            None => (None, None),
        };
        let (inner_grads, tail_grads) = match grads {
            Grads::F32(g) => (Grads::F32(&g[..n]), Grads::F32(&g[n..])),
            Grads::Bf16(w) => (Grads::Bf16(&w[..n]), Grads::Bf16(&w[n..])),
        };
        self.inner
            .step_into_with(&src[..n], head, inner_grads, inner_out);
        // The model's buffers (running statistics): the pushed delta added, widened if need be.
        match tail_grads {
            Grads::F32(g) => {
                for ((b, s), d) in tail.iter_mut().zip(&src[n..]).zip(g) {
                    *b = *s + *d;
                }
            }
            Grads::Bf16(w) => {
                let mut d = vec![0.0; w.len()];
                sparktorch_proto::payload::decode_bf16_words(w, &mut d);
                for ((b, s), d) in tail.iter_mut().zip(&src[n..]).zip(&d) {
                    *b = *s + *d;
                }
            }
        }
        if let Some((out, encode)) = tail_out {
            encode(tail, out);
        }
    }

    fn step_relaxed(&self, params: &[AtomicF32], grads: &[f32]) {
        let n = self.inner.len();
        self.inner.step_relaxed(&params[..n], &grads[..n]);
        for (b, d) in params[n..].iter().zip(&grads[n..]) {
            b.store(b.load() + *d);
        }
    }

    fn export_state(&self) -> OptimizerState {
        self.inner.export_state()
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        self.inner.import_state(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{build, HyperValue};

    fn adam(len: usize) -> Result<Box<dyn Optimizer>, OptimError> {
        build("Adam", &vec![("lr".into(), HyperValue::Float(0.1))], len)
    }

    #[test]
    fn head_is_stepped_by_the_optimizer_and_tail_adds_the_deltas() -> Result<(), OptimError> {
        let mut plain = adam(2)?;
        let mut both = with_model_buffers(adam(2)?, 3);
        assert_eq!((both.len(), both.trainable_len()), (5, 2));
        let mut p = vec![1.0, -1.0];
        let mut pb = vec![1.0, -1.0, 0.5, 7.0, 1e30];
        for _ in 0..3 {
            plain.step(&mut p, &[0.3, -0.2]);
            both.step(&mut pb, &[0.3, -0.2, 0.25, 0.0, 0.0]);
        }
        assert_eq!(&pb[..2], &p[..]);
        // Deltas add up; an untouched buffer (zero deltas) keeps its exact value.
        assert_eq!(&pb[2..], &[1.25, 7.0, 1e30]);
        assert_eq!(both.export_state(), plain.export_state());
        Ok(())
    }

    #[test]
    fn relaxed_step_matches_the_exclusive_one() -> Result<(), OptimError> {
        let mut a = with_model_buffers(adam(2)?, 2);
        let b = with_model_buffers(adam(2)?, 2);
        let mut pa = vec![0.5, 0.25, 3.0, -4.0];
        let cells = AtomicF32::vec_from(&pa);
        let g = [0.1, 0.2, -1.0, 0.5];
        a.step(&mut pa, &g);
        b.step_relaxed(&cells, &g);
        assert_eq!(AtomicF32::snapshot(&cells), pa);
        Ok(())
    }

    #[test]
    fn step_into_matches_the_in_place_step() -> Result<(), OptimError> {
        let mut a = with_model_buffers(adam(2)?, 2);
        let mut b = with_model_buffers(adam(2)?, 2);
        let mut pa = vec![0.5, 0.25, 3.0, -4.0];
        let src = pa.clone();
        let mut dst = vec![f32::NAN; 4];
        let g = [0.1, 0.2, -1.0, 0.5];
        a.step(&mut pa, &g);
        b.step_into(&src, &mut dst, &g);
        assert_eq!(dst, pa);
        assert_eq!(src, [0.5, 0.25, 3.0, -4.0]);
        assert_eq!(a.export_state(), b.export_state());
        Ok(())
    }

    #[test]
    fn zero_buffers_is_the_inner_optimizer() -> Result<(), OptimError> {
        let o = with_model_buffers(adam(4)?, 0);
        assert_eq!((o.len(), o.trainable_len()), (4, 4));
        Ok(())
    }
}
