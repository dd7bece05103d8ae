//! `torch.optim.SGD` (plain form; momentum and the rest come with the optimizers issue).

use crate::hyper::HyperReader;
use crate::{AtomicF32, HyperValue, Hyperparameters, OptimError, Optimizer, OptimizerState};

const ACCEPTED: &[&str] = &["lr"];

/// Stochastic gradient descent: `p -= lr * g`.
pub struct Sgd {
    lr: f32,
    len: usize,
    step: std::sync::atomic::AtomicU64,
}

impl Sgd {
    /// Build from hyperparameters (torch defaults: `lr=1e-3`).
    pub fn new(hyper: &Hyperparameters, len: usize) -> Result<Self, OptimError> {
        let r = HyperReader::new("SGD", hyper, ACCEPTED)?;
        let lr = r.float("lr", 1e-3)?;
        r.check(lr >= 0.0, "lr", lr, "must be >= 0")?;
        Ok(Self {
            lr: lr as f32,
            len,
            step: Default::default(),
        })
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &'static str {
        "SGD"
    }

    fn hyperparameters(&self) -> Hyperparameters {
        vec![("lr".into(), HyperValue::Float(self.lr as f64))]
    }

    fn len(&self) -> usize {
        self.len
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), grads.len(), "params and grads differ in length");
        *self.step.get_mut() += 1;
        let lr = self.lr;
        for (p, g) in params.iter_mut().zip(grads) {
            *p += -lr * g;
        }
    }

    fn step_relaxed(&self, params: &[AtomicF32], grads: &[f32]) {
        assert_eq!(params.len(), grads.len(), "params and grads differ in length");
        self.step.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let lr = self.lr;
        for (p, g) in params.iter().zip(grads) {
            p.store(p.load() + -lr * g);
        }
    }

    fn export_state(&self) -> OptimizerState {
        OptimizerState {
            step: self.step.load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        }
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        *self.step.get_mut() = state.step;
        Ok(())
    }
}
